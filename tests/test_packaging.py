"""Packaging without a build: the version's one source, the resources found from a checkout, an
install and a (simulated) frozen bundle, user data outside the bundle, the version in every output,
and the packaging/ files' own consistency. The bundle's build itself is packaging/smoke_test.py (minutes);
a wheel is built here (seconds), from a copy of the sources, to see that it carries the resources."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest

import engine
from engine import resources
from engine.config import builtin_config, default_config_dir
from engine.export import export_image

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
ICON_SIZES = (16, 32, 48, 64, 128, 256, 512)


def load_packaging_module(name: str):
    """A module of packaging/ by file (a ``packaging`` package would shadow PyPI's ``packaging``)."""
    spec = importlib.util.spec_from_file_location(f"equideq_packaging_{name}", ROOT / "packaging" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def frozen(monkeypatch, tmp_path):
    """Pretend to be a PyInstaller bundle unpacked at tmp_path/bundle/_internal."""
    internal = tmp_path / "bundle" / "_internal"
    (internal / "resources" / "configs").mkdir(parents=True)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(internal), raising=False)
    monkeypatch.delenv(resources.RESOURCES_ENV, raising=False)
    return internal


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """Pretend to be installed from a wheel: engine/ in tmp_path/site-packages, the resources beside it
    as equideq_resources/ (no pyproject.toml there). Returns that resources folder."""
    site = tmp_path / "site-packages"
    (site / resources.RESOURCES_PACKAGE / "configs").mkdir(parents=True)
    (site / resources.RESOURCES_PACKAGE / "configs" / "shipped.toml").write_text('[run]\nname = "shipped"\n')
    monkeypatch.setattr(resources, "PACKAGE_ROOT", site)
    monkeypatch.delenv(resources.RESOURCES_ENV, raising=False)
    return site / resources.RESOURCES_PACKAGE


# -- the version: pyproject.toml's, read in one place -----------------------------------------------

def test_the_version_is_written_once_in_pyproject_and_engine_reads_it():
    project = PYPROJECT["project"]
    assert "version" not in project.get("dynamic", []) and "dynamic" not in PYPROJECT.get("tool", {}).get(
        "setuptools", {})
    assert engine.__version__ == project["version"]
    assert '__version__ = "' not in (ROOT / "engine" / "__init__.py").read_text(encoding="utf-8")


def test_outside_a_checkout_the_version_is_the_distributions(monkeypatch):
    from importlib import metadata

    monkeypatch.setattr(engine, "checkout_project", lambda: None)
    monkeypatch.setattr(metadata, "version", lambda dist: {"equideq": "7.8.9"}[dist])
    assert engine._version() == "7.8.9"

    def not_installed(dist):
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert engine._version() == "0+unknown"


def test_a_frozen_bundle_reads_no_pyproject(frozen):
    (frozen.parent / "pyproject.toml").write_text('[project]\nname = "equideq"\nversion = "0.0.1"\n')
    assert resources.checkout_project() is None


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".dcm", ".png"])
def test_every_export_but_bare_npy_carries_the_version(tmp_path, suffix):
    path = export_image(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), tmp_path / f"r{suffix}",
                        window=(0.0, 1.0))
    if suffix == ".npz":
        software = str(np.load(path)["software"])
    elif suffix == ".h5":
        with h5py.File(path, "r") as f:
            software = f["reconstruction"].attrs["software"]
    elif suffix == ".dcm":
        ds = pydicom.dcmread(path)
        assert ds.SoftwareVersions == engine.__version__
        software = ds.DerivationDescription
    else:
        from PIL import Image

        with Image.open(path) as im:
            software = im.info["Software"]
    assert software.startswith(f"EquiDEQ Workbench {engine.__version__}")


# -- resources: checkout, override, frozen bundle ----------------------------------------------------

def test_a_checkout_finds_its_resources_folder():
    assert resources.checkout_project()["name"] == "equideq"
    assert resources.resources_dir() == ROOT / "resources"
    assert default_config_dir() == ROOT / "resources" / "configs"
    assert builtin_config("ct_phantom_quick").run.name == "ct_phantom_quick"
    from engine.model import WEIGHTS_DIR

    assert WEIGHTS_DIR == ROOT / "resources" / "weights" and any(WEIGHTS_DIR.glob("*.pt"))
    assert resources.resource_path("help", "quick_guide.html").is_file()


def test_no_module_looks_for_resources_beside_its_own_file():
    offenders = [str(path.relative_to(ROOT)) for folder in ("engine", "workbench") for path in (ROOT / folder).rglob("*.py")
                 if path.name != "resources.py" and '/ "resources"' in path.read_text(encoding="utf-8")]
    assert offenders == []


def test_the_environment_names_another_resources_folder(monkeypatch, tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.toml").write_text('[run]\nname = "mine"\n')
    monkeypatch.setenv(resources.RESOURCES_ENV, str(tmp_path))
    assert resources.resource_path("configs") == tmp_path / "configs"
    assert builtin_config("mine").run.name == "mine"


def test_a_frozen_bundle_reads_resources_from_its_own_folder(frozen):
    assert resources.frozen_bundle() == frozen
    assert resources.resources_dir() == frozen / "resources"
    assert default_config_dir() == frozen / "resources" / "configs"


def test_an_installed_wheel_reads_the_resources_installed_beside_engine(installed):
    assert resources.checkout_project() is None
    assert resources.resources_dir() == installed
    assert default_config_dir() == installed / "configs"
    assert builtin_config("shipped").run.name == "shipped"


def test_the_environment_and_a_frozen_bundle_come_before_an_installed_copy(installed, frozen, monkeypatch, tmp_path):
    assert resources.resources_dir() == frozen / "resources"
    monkeypatch.setenv(resources.RESOURCES_ENV, str(tmp_path / "mine"))
    assert resources.resources_dir() == tmp_path / "mine"
    monkeypatch.setattr(sys, "frozen", False)
    assert resources.resources_dir() == tmp_path / "mine"


def test_a_checkout_reads_its_own_resources_even_beside_an_installed_copy(monkeypatch, tmp_path):
    checkout = tmp_path / "checkout"
    for folder in ("resources", resources.RESOURCES_PACKAGE):
        (checkout / folder / "configs").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text('[project]\nname = "equideq"\nversion = "0.0.1"\n')
    monkeypatch.setattr(resources, "PACKAGE_ROOT", checkout)
    monkeypatch.delenv(resources.RESOURCES_ENV, raising=False)
    assert resources.resources_dir() == checkout / "resources"


def test_a_bare_source_tree_falls_back_to_resources_beside_engine(monkeypatch, tmp_path):
    monkeypatch.setattr(resources, "PACKAGE_ROOT", tmp_path)  # no pyproject.toml, no installed copy
    monkeypatch.delenv(resources.RESOURCES_ENV, raising=False)
    assert resources.resources_dir() == tmp_path / "resources"


def test_pyproject_lists_every_package_of_engine_and_workbench():
    setuptools_table = PYPROJECT["tool"]["setuptools"]
    packages = {".".join(init.parent.relative_to(ROOT).parts) for folder in ("engine", "workbench")
                for init in (ROOT / folder).rglob("__init__.py")}
    assert set(setuptools_table["packages"]) == packages | {resources.RESOURCES_PACKAGE}
    assert setuptools_table["package-dir"] == {resources.RESOURCES_PACKAGE: "resources"}


def test_a_wheel_carries_the_resources_and_its_install_finds_them(tmp_path):
    """Build a wheel (setuptools' own build, ~2 s) from a copy of the sources, unpack it as an install
    would and ask a fresh interpreter, outside any checkout, where the resources are."""
    pytest.importorskip("setuptools", minversion="64")  # pyproject.toml's [build-system]
    source = tmp_path / "source"
    for folder in ("engine", "workbench", "resources"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-c", "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))",
                            str(tmp_path / "dist")], cwd=source, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "absent from the `packages` configuration" not in build.stderr  # resources' subfolders as data
    with zipfile.ZipFile(tmp_path / "dist" / build.stdout.split()[-1]) as wheel:
        names = set(wheel.namelist())
        wheel.extractall(tmp_path / "site")
    # the same files as the bundle (packaging/equideq.spec): all but the weights' build notes and script
    shipped = {f"{resources.RESOURCES_PACKAGE}/{path.relative_to(ROOT / 'resources').as_posix()}"
               for path in (ROOT / "resources").rglob("*") if path.is_file() and path.suffix not in (".md", ".sh")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert not any(name.endswith((".md", ".sh")) for name in names)
    modules = {path.relative_to(ROOT).as_posix() for folder in ("engine", "workbench")
               for path in (ROOT / folder).rglob("*.py")}
    assert modules <= names, sorted(modules - names)

    env = {key: value for key, value in os.environ.items() if key != resources.RESOURCES_ENV}
    env["PYTHONPATH"] = str(tmp_path / "site")
    probe = subprocess.run([sys.executable, "-S", "-c", "import engine.resources as r; print(r.__file__); "
                            "print(r.resources_dir())"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)  # -S: no site-packages, so no editable install of the checkout
    assert probe.returncode == 0, probe.stderr
    module, found = probe.stdout.splitlines()
    assert Path(module).is_relative_to(tmp_path / "site")
    assert Path(found) == (tmp_path / "site" / resources.RESOURCES_PACKAGE).resolve()
    assert (Path(found) / "configs" / "ct_phantom_quick.toml").is_file() and any(Path(found, "weights").glob("*.pt"))


def test_the_icon_ships_at_every_hicolor_size():
    from PIL import Image

    for size in ICON_SIZES:
        with Image.open(ROOT / "resources" / "icons" / f"equideq-{size}.png") as im:
            assert im.size == (size, size) and im.mode == "RGBA"
    assert (ROOT / "resources" / "icons" / "equideq.svg").is_file()
    assert (ROOT / "resources" / "icons" / "equideq.ico").is_file()
    assert load_packaging_module("make_icons").SIZES == ICON_SIZES


# -- user data: never inside the bundle --------------------------------------------------------------

def test_a_checkout_keeps_its_runs_in_the_working_directory(tmp_path):
    assert resources.default_run_root(str(tmp_path)) == tmp_path / "runs"


def test_a_frozen_bundle_writes_runs_to_the_user_data_folder(frozen, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(frozen.parent)  # started from its own folder, as a file manager may do
    root = resources.default_run_root()
    assert not root.is_relative_to(frozen.parent)
    assert root == resources.user_data_dir() / "runs"
    if sys.platform.startswith("linux"):
        assert root == tmp_path / "data" / "equideq" / "runs"


def test_an_installed_package_writes_runs_to_the_user_data_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(resources, "PACKAGE_ROOT", tmp_path / "site-packages")  # no pyproject.toml there
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert resources.checkout_project() is None
    assert resources.default_run_root(str(tmp_path)) == resources.user_data_dir() / "runs"


def test_the_workbench_defaults_its_run_root_through_engine_resources():
    source = (ROOT / "workbench" / "app.py").read_text(encoding="utf-8")
    assert "default_run_root()" in source and "os.getcwd()" not in source


# -- packaging/ itself ------------------------------------------------------------------------------

def test_the_bundle_leaves_out_files_by_pattern_with_a_reason():
    contents = load_packaging_module("bundle_contents")
    assert contents.excluded_file("PySide6/Qt/translations/qt_de.qm")
    assert contents.excluded_file("torch/test/Dict_test") and contents.excluded_file("torch\\bin\\test_api")
    assert contents.excluded_file("torch/bin/torch_shm_manager") is None  # torch.multiprocessing's helper
    assert contents.excluded_file("torch/lib/libtorch_cpu.so") is None
    assert contents.excluded_file("resources/weights/resunet_c16_d2_none_nosn_in1.pt") is None
    assert all(why.strip() for why in {**contents.EXCLUDED_MODULES, **contents.EXCLUDED_FILES}.values())


def test_the_smoke_test_writes_configs_the_engine_reads(tmp_path):
    smoke = load_packaging_module("smoke_test")
    config = tomllib.loads((ROOT / "resources" / "configs" / "ct_phantom_quick.toml").read_text("utf-8"))
    for (table, key), value in smoke.TWO_STEPS.items():
        config[table][key] = value
    (tmp_path / "two.toml").write_text(smoke.toml_text(config), encoding="utf-8")
    from engine.config import load_config

    loaded = load_config(tmp_path / "two.toml")
    assert loaded.optim.steps == 2 and loaded.to_dict() == builtin_config("ct_phantom_quick").replace(
        **{"optim.steps": 2, "run.checkpoint_every": 2, "run.validate_every": 2, "data.n_train": 8}).to_dict()


def test_the_desktop_entry_names_the_app_and_its_icon():
    entry = (ROOT / "packaging" / "linux" / "equideq-workbench.desktop").read_text(encoding="utf-8")
    fields = dict(line.split("=", 1) for line in entry.splitlines() if "=" in line)
    assert fields["Exec"] == "equideq-workbench" and fields["Icon"] == "equideq-workbench"
    assert fields["Type"] == "Application" and fields["Terminal"] == "false"
    if shutil.which("desktop-file-validate"):  # Debian's desktop-file-utils
        result = subprocess.run(["desktop-file-validate", str(ROOT / "packaging" / "linux" / "equideq-workbench.desktop")],
                                capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout == "", result.stdout


def test_the_smoke_test_mode_passes_only_a_completed_run_and_reconstruction(capsys):
    from types import SimpleNamespace

    from workbench.app import SMOKE_MARKER, _report_smoke_test

    def outcome(run, reconstructed, errors=()):
        report = {"run": run, "reconstructed": reconstructed}
        code = _report_smoke_test(report, SimpleNamespace(errors=list(errors)))
        line = capsys.readouterr().out.strip()
        assert line.startswith(SMOKE_MARKER) and json.loads(line[len(SMOKE_MARKER):])["ok"] == (code == 0)
        return code

    assert outcome("completed", True) == 0
    assert outcome("failed", False) == outcome("completed", False) == 1
    assert outcome("completed", True, [("Reconstruct failed", "no scan")]) == 1
