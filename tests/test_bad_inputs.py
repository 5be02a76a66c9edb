"""A generated corpus of bad inputs, each run through the CLI in-process.

Every case must end with exit code != 0 and exactly one line on stderr,
``error: ...``, naming the culprit file (or config key), and no traceback.
The corpus is written into a temporary folder by the module fixture: broken
DICOM, HDF5, NumPy and image files, absurd sizes (headers that claim
10^12 elements, never allocated), broken and malicious checkpoints, bad configs
and geometry mismatches between checkpoints and measured data.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from engine.checkpoint import Checkpoint, save_checkpoint
from engine.cli import main
from engine.config import ExperimentConfig, save_config
from engine.model import build_model
from engine.physics import detector_count
from tests.helpers import ct_dicom_bytes as dicom_bytes

SIZE = 32


def tiny_config(**changes) -> ExperimentConfig:
    base = {"physics.img_size": SIZE, "physics.views": 12, "model.channels": 8, "model.depth": 1,
            "data.n_train": 4, "data.n_val": 1, "optim.steps": 1, "run.threads": 1,
            "solver.max_iter": 10, "backward_solver.max_iter": 10}
    base.update(changes)
    return ExperimentConfig().replace(**base)


def write_checkpoint(path: Path, config: ExperimentConfig, state=None) -> Path:
    """A checkpoint of a freshly built model (no training: the corpus needs only a valid file)."""
    if state is None:
        state = {k: v.detach().clone() for k, v in build_model(config, load_weights=False).state_dict().items()}
    save_checkpoint(path, Checkpoint(model_state=state, config=config.to_dict()))
    return path


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class _Payload:
    """Unpickling this would run a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@dataclass
class Case:
    name: str
    argv: list
    culprit: str  # must appear in the error line (file name or config key)


def _h5(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f[key] = value
    return path


def build_corpus(d: Path) -> list[Case]:
    rng = np.random.default_rng(0)
    good_cfg = tiny_config()
    good = write_checkpoint(d / "good.pt", good_cfg)
    mri_ckpt = write_checkpoint(d / "mri.pt", tiny_config(**{"physics.modality": "mri"}))
    ct60 = write_checkpoint(d / "ct60.pt", tiny_config(**{"physics.views": 60}))
    np.save(d / "good.npy", rng.random((SIZE, SIZE)).astype(np.float32))
    out = str(d / "out.npy")

    def evaluate(path, ckpt=good):
        return ["evaluate", "--checkpoint", str(ckpt), "--data", str(path), "--json"]

    def reconstruct(path, ckpt=good):
        return ["reconstruct", "--checkpoint", str(ckpt), "--input", str(path), "--output", out]

    def bad_file(name: str, data: bytes) -> Path:
        (d / name).write_bytes(data)
        return d / name

    cases: list[Case] = []

    def add(name, argv, culprit):
        cases.append(Case(name, argv, culprit))

    # -- DICOM ------------------------------------------------------------------------------
    full = dicom_bytes()
    add("dicom-truncated", evaluate(bad_file("truncated.dcm", full[: len(full) - 60])), "truncated.dcm")
    add("dicom-random-bytes", evaluate(bad_file("random.dcm", rng.bytes(2048))), "random.dcm")
    add("dicom-no-pixels", evaluate(bad_file("nopixels.dcm", dicom_bytes(pixels=None))), "nopixels.dcm")
    add("dicom-header-only", reconstruct(bad_file("preamble.dcm", b"\0" * 128 + b"DICM")), "preamble.dcm")
    add("dicom-short-pixels", evaluate(bad_file("short.dcm", dicom_bytes(64, 64, pixels=b"\0\1" * 10))),
        "short.dcm")
    add("dicom-absurd-size", evaluate(bad_file("huge.dcm", dicom_bytes(65535, 65535, pixels=b"\0" * 64,
                                                                          frames=4096))), "huge.dcm")
    add("dicom-empty-file", evaluate(bad_file("empty.dcm", b"")), "empty.dcm")

    # -- HDF5 -------------------------------------------------------------------------------
    add("h5-unknown-keys", evaluate(_h5(d / "keys.h5", foo=np.ones((4, 4)), bar=np.ones(3))), "keys.h5")
    add("h5-real-kspace", evaluate(_h5(d / "realk.h5", kspace=np.ones((2, 8, 8), np.float32)), mri_ckpt),
        "realk.h5")
    add("h5-kspace-5d", evaluate(_h5(d / "k5d.h5", kspace=np.ones((1, 1, 2, 8, 8), np.complex64)), mri_ckpt),
        "k5d.h5")
    nan_k = np.ones((1, SIZE, SIZE), np.complex64)
    nan_k[0, 3, 3] = np.nan
    add("h5-kspace-nan", reconstruct(_h5(d / "knan.h5", kspace=nan_k), mri_ckpt), "knan.h5")
    add("h5-mask-shape", evaluate(_h5(d / "kmask.h5", kspace=np.ones((1, SIZE, SIZE), np.complex64),
                                      mask=np.ones(7, np.float32)), mri_ckpt), "kmask.h5")
    add("h5-kspace-too-small", reconstruct(_h5(d / "ksmall.h5", kspace=np.ones((1, 16, 16), np.complex64)),
                                           mri_ckpt), "ksmall.h5")
    add("h5-kspace-all-zero", evaluate(_h5(d / "kzero.h5", kspace=np.zeros((1, SIZE, SIZE), np.complex64),
                                           mask=np.ones(SIZE, np.float32)), mri_ckpt), "kzero.h5")
    add("h5-kspace-for-ct-model", reconstruct(_h5(d / "kct.h5", kspace=np.ones((1, SIZE, SIZE), np.complex64))),
        "kct.h5")
    add("h5-sinogram-angle-count", evaluate(_h5(d / "angles.h5", sinogram=np.ones((1, 12, 46), np.float32),
                                                angles=np.arange(5.0))), "angles.h5")
    add("h5-sinogram-detectors", reconstruct(_h5(d / "detectors.h5", sinogram=np.ones((1, 12, 40), np.float32))),
        "detectors.h5")
    views30 = _h5(d / "views30.h5", sinogram=rng.random((2, 30, detector_count(SIZE))).astype(np.float32),
                  angles=np.linspace(0, 180, 30, endpoint=False))
    add("ckpt-60-views-data-30-views", reconstruct(views30, ct60), "views30.h5")
    add("h5-string-images", evaluate(_h5(d / "strings.h5", images=np.array([b"a", b"b"]))), "strings.h5")
    add("h5-1d-images", evaluate(_h5(d / "flat.h5", images=np.arange(10.0))), "flat.h5")
    add("h5-measurements-only-deepinv", evaluate(_h5(d / "yonly.h5", y_train=np.ones((2, 1, 8, 8)))), "yonly.h5")
    h5_full = (_h5(d / "whole.h5", images=rng.random((4, SIZE, SIZE)))).read_bytes()
    add("h5-truncated", evaluate(bad_file("cut.h5", h5_full[: len(h5_full) // 2])), "cut.h5")
    add("h5-random-bytes", evaluate(bad_file("noise.h5", b"\x89HDF\r\n\x1a\n" + rng.bytes(1000))), "noise.h5")

    # -- NumPy, images, unknown -------------------------------------------------------------
    nan_img = rng.random((SIZE, SIZE)).astype(np.float32)
    nan_img[1, 1] = np.nan
    np.save(d / "nan.npy", nan_img)
    add("npy-nan", evaluate(d / "nan.npy"), "nan.npy")
    inf_img = rng.random((SIZE, SIZE)).astype(np.float32)
    inf_img[2, 2] = np.inf
    np.save(d / "inf.npy", inf_img)
    add("npy-inf", reconstruct(d / "inf.npy"), "inf.npy")
    np.save(d / "constant.npy", np.full((3, SIZE, SIZE), 5.0, np.float32))
    add("npy-constant", evaluate(d / "constant.npy"), "constant.npy")
    np.save(d / "empty.npy", np.zeros((0, SIZE), np.float32))
    add("npy-empty", evaluate(d / "empty.npy"), "empty.npy")
    with open(d / "absurd.npy", "wb") as fh:  # a header claiming 10^6 x 10^6 float64, and no data
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (10**6, 10**6)})
    add("npy-absurd-header", evaluate(d / "absurd.npy"), "absurd.npy")
    whole = io.BytesIO()
    np.save(whole, rng.random((SIZE, SIZE)).astype(np.float32))
    add("npy-truncated", reconstruct(bad_file("short.npy", whole.getvalue()[:500])), "short.npy")
    np.save(d / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    add("npy-object-pickle", evaluate(d / "objects.npy"), "objects.npy")
    np.save(d / "4d.npy", np.ones((2, 2, SIZE, SIZE), np.float32))
    add("npy-4d", evaluate(d / "4d.npy"), "4d.npy")
    add("png-constant", evaluate(bad_file("flat.png", png_bytes(np.full((SIZE, SIZE), 7, np.uint8)))), "flat.png")
    add("png-empty-file", evaluate(bad_file("zero.png", b"")), "zero.png")
    png = png_bytes(rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8))
    add("png-truncated", reconstruct(bad_file("cut.png", png[: len(png) // 2])), "cut.png")
    add("unknown-format", evaluate(bad_file("mystery.xyz", rng.bytes(600))), "mystery.xyz")
    add("missing-file", evaluate(d / "does_not_exist.h5"), "does_not_exist.h5")
    add("npz-not-zip", evaluate(bad_file("fake.npz", b"PK\x03\x04" + rng.bytes(300))), "fake.npz")

    # -- checkpoints ------------------------------------------------------------------------
    blob = good.read_bytes()
    data = str(d / "good.npy")
    add("ckpt-truncated", ["evaluate", "--checkpoint", str(bad_file("cut.pt", blob[: len(blob) // 2])),
                           "--data", data], "cut.pt")
    add("ckpt-empty", ["evaluate", "--checkpoint", str(bad_file("empty.pt", b"")), "--data", data], "empty.pt")
    add("ckpt-random-bytes", ["reconstruct", "--checkpoint", str(bad_file("noise.pt", rng.bytes(4096))),
                              "--input", data, "--output", out], "noise.pt")
    state = {k: v.clone() for k, v in build_model(good_cfg, load_weights=False).state_dict().items()}
    key = next(k for k, v in state.items() if v.ndim == 4)
    state[key] = torch.zeros(3, 3, 3, 3)
    write_checkpoint(d / "wrongshape.pt", good_cfg, state)
    add("ckpt-wrong-shape", ["evaluate", "--checkpoint", str(d / "wrongshape.pt"), "--data", data],
        "wrongshape.pt")
    torch.save({k: v for k, v in state.items()}, d / "bare.pt")
    add("ckpt-bare-state-dict", ["evaluate", "--checkpoint", str(d / "bare.pt"), "--data", data], "bare.pt")
    marker = d / "PWNED"
    torch.save({"model_state": _Payload(marker), "config": {}, "format_version": 1}, d / "evil.pt")
    add("ckpt-pickle-payload", ["evaluate", "--checkpoint", str(d / "evil.pt"), "--data", data], "evil.pt")
    (d / "evil2.pt").write_bytes(pickle.dumps({"config": _Payload(marker)}, protocol=2))
    add("ckpt-raw-pickle-payload", ["reconstruct", "--checkpoint", str(d / "evil2.pt"), "--input", data,
                                    "--output", out], "evil2.pt")
    bad_cfg = good_cfg.to_dict()
    bad_cfg["solver"]["bogus"] = 1
    torch.save({"format_version": 1, "config": bad_cfg, "model_state": state}, d / "badconfig.pt")
    add("ckpt-config-unknown-key", ["evaluate", "--checkpoint", str(d / "badconfig.pt"), "--data", data],
        "badconfig.pt")
    write_checkpoint(d / "good.safetensors", good_cfg)
    st_blob = (d / "good.safetensors").read_bytes()
    add("ckpt-safetensors-truncated",
        ["evaluate", "--checkpoint", str(bad_file("cut.safetensors", st_blob[: len(st_blob) // 3])), "--data", data],
        "cut.safetensors")
    with zipfile.ZipFile(d / "notckpt.pt", "w") as zf:
        zf.writestr("hello.txt", "not a checkpoint")
    add("ckpt-zip-not-torch", ["evaluate", "--checkpoint", str(d / "notckpt.pt"), "--data", data], "notckpt.pt")

    # -- configs ----------------------------------------------------------------------------
    run = str(d / "run")
    (d / "unknown.toml").write_text("[solver]\nmax_iters = 10\n")
    add("config-unknown-key", ["train", "--config", str(d / "unknown.toml"), "--out", run], "solver.max_iters")
    (d / "range.toml").write_text("[physics]\nimg_size = 4\n")
    add("config-out-of-range", ["train", "--config", str(d / "range.toml"), "--out", run], "physics.img_size")
    (d / "type.toml").write_text("[optim]\nlr = 'fast'\n")
    add("config-wrong-type", ["train", "--config", str(d / "type.toml"), "--out", run], "optim.lr")
    (d / "syntax.toml").write_text("[physics\nimg_size = 32\n")
    add("config-bad-toml", ["train", "--config", str(d / "syntax.toml"), "--out", run], "syntax.toml")
    (d / "choice.yaml").write_text("loss:\n  mode: magic\n")
    add("config-bad-choice-yaml", ["train", "--config", str(d / "choice.yaml"), "--out", run], "loss.mode")
    save_config(good_cfg, d / "good.toml")
    add("config-override-unknown", ["train", "--config", str(d / "good.toml"), "--out", run,
                                    "--set", "physics.img_sz=32"], "physics.img_sz")
    nodata = tiny_config(**{"data.source": "files", "data.paths": [str(d / "nan.npy")]})
    save_config(nodata, d / "nandata.toml")
    add("config-training-file-with-nan", ["train", "--config", str(d / "nandata.toml"), "--out", run], "nan.npy")
    sup = tiny_config(**{"physics.modality": "mri", "data.source": "files", "loss.mode": "supervised",
                         "data.paths": [str(_h5(d / "kspace_only.h5",
                                                kspace=(rng.normal(size=(2, SIZE, SIZE)) * (1 + 1j)).astype(
                                                    np.complex64), mask=np.ones(SIZE, np.float32)))]})
    # an all-ones mask means fully sampled: give it zeros so it stays measurement-only
    with h5py.File(d / "kspace_only.h5", "a") as f:
        m = np.zeros(SIZE, np.float32)
        m[::2] = 1
        m[14:18] = 1
        f["mask"][...] = m
    save_config(sup, d / "supervised.toml")
    add("config-supervised-without-references", ["train", "--config", str(d / "supervised.toml"), "--out", run],
        "loss.mode")
    (d / "window.toml").write_text("[data]\nwindow = [400, -100]\n")
    add("config-bad-window", ["train", "--config", str(d / "window.toml"), "--out", run], "data.window")
    np.save(d / "three.npy", rng.random((3, SIZE, SIZE)).astype(np.float32))
    save_config(tiny_config(**{"data.source": "files", "data.paths": [str(d / "three.npy")],
                               "data.val_slices": "5:9"}), d / "slices.toml")
    add("config-val-slices-out-of-range", ["train", "--config", str(d / "slices.toml"), "--out", run],
        "data.val_slices")
    save_config(tiny_config(**{"data.source": "files", "data.paths": [str(d / "gone.dcm")]}), d / "gone.toml")
    add("config-missing-data-file", ["train", "--config", str(d / "gone.toml"), "--out", run], "gone.dcm")
    save_config(tiny_config(**{"physics.modality": "mri", "data.source": "files",
                               "data.paths": [str(d / "good.npy"), str(d / "kspace_only.h5")]}), d / "mixed.toml")
    add("config-mixed-images-and-kspace", ["train", "--config", str(d / "mixed.toml"), "--out", run], "data.paths")

    # -- run-time refusals: outputs, resume, slices --------------------------------------------
    (d / "occupied").write_text("a file where the run folder should go")
    add("train-out-is-a-file", ["train", "--config", str(d / "good.toml"), "--out", str(d / "occupied"),
                                "--quiet"], "occupied")
    add("train-resume-other-geometry", ["train", "--config", str(d / "good.toml"), "--out", run, "--resume",
                                        str(ct60)], "ct60.pt")
    add("reconstruct-bad-output-suffix", ["reconstruct", "--checkpoint", str(good), "--input", data,
                                          "--output", str(d / "recon.txt")], "recon.txt")
    add("reconstruct-slice-out-of-range", ["reconstruct", "--checkpoint", str(good), "--input", data,
                                           "--output", out, "--slice", "7"], "--slice")
    nan_state = {k: v.clone() for k, v in build_model(good_cfg, load_weights=False).state_dict().items()}
    next(v for v in nan_state.values() if v.is_floating_point() and v.numel() > 1).view(-1)[0] = float("nan")
    write_checkpoint(d / "nanweights.pt", good_cfg, nan_state)
    add("ckpt-nan-weights", ["reconstruct", "--checkpoint", str(d / "nanweights.pt"), "--input", data,
                             "--output", out], "nanweights.pt")
    add("h5-sinogram-nan-angles", reconstruct(_h5(d / "nanangles.h5", sinogram=np.ones((1, 12, 46), np.float32),
                                                  angles=np.full(12, np.nan))), "nanangles.h5")
    np.save(d / "kspace.npy", (rng.normal(size=(2, SIZE, SIZE)) * 1j).astype(np.complex64))
    add("npy-kspace-for-ct-model", evaluate(d / "kspace.npy"), "kspace.npy")
    return cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    return d, {case.name: case for case in build_corpus(d)}


def test_corpus_is_large_and_diverse(corpus):
    _, cases = corpus
    assert len(cases) >= 30 and sorted(cases) == sorted(CASES)  # every generated case is run below
    groups = {name.split("-")[0] for name in cases}
    assert groups >= {"dicom", "h5", "npy", "png", "ckpt", "config"}


CASES = [
    "dicom-truncated", "dicom-random-bytes", "dicom-no-pixels", "dicom-header-only", "dicom-short-pixels",
    "dicom-absurd-size", "dicom-empty-file",
    "h5-unknown-keys", "h5-real-kspace", "h5-kspace-5d", "h5-kspace-nan", "h5-mask-shape", "h5-kspace-too-small",
    "h5-kspace-all-zero", "h5-kspace-for-ct-model", "h5-sinogram-angle-count", "h5-sinogram-detectors",
    "ckpt-60-views-data-30-views", "h5-string-images", "h5-1d-images", "h5-measurements-only-deepinv",
    "h5-truncated", "h5-random-bytes",
    "npy-nan", "npy-inf", "npy-constant", "npy-empty", "npy-absurd-header", "npy-truncated", "npy-object-pickle",
    "npy-4d", "png-constant", "png-empty-file", "png-truncated", "unknown-format", "missing-file", "npz-not-zip",
    "ckpt-truncated", "ckpt-empty", "ckpt-random-bytes", "ckpt-wrong-shape", "ckpt-bare-state-dict",
    "ckpt-pickle-payload", "ckpt-raw-pickle-payload", "ckpt-config-unknown-key", "ckpt-safetensors-truncated",
    "ckpt-zip-not-torch",
    "config-unknown-key", "config-out-of-range", "config-wrong-type", "config-bad-toml", "config-bad-choice-yaml",
    "config-override-unknown", "config-training-file-with-nan", "config-supervised-without-references",
    "config-bad-window", "config-val-slices-out-of-range", "config-missing-data-file",
    "config-mixed-images-and-kspace",
    "train-out-is-a-file", "train-resume-other-geometry", "reconstruct-bad-output-suffix",
    "reconstruct-slice-out-of-range", "ckpt-nan-weights", "h5-sinogram-nan-angles", "npy-kspace-for-ct-model",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_one_error_line(corpus, name, capsys):
    folder, cases = corpus
    case = cases[name]
    try:
        code = main(case.argv)
    except SystemExit as exc:  # argparse-level refusals would exit here; none of these cases should
        pytest.fail(f"{name}: SystemExit({exc.code}) instead of an engine error")
    except BaseException as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{name}: a raw {type(exc).__name__} escaped the CLI: {exc}")
    captured = capsys.readouterr()
    assert code != 0, f"{name}: exit code 0 (stdout: {captured.out[-300:]!r})"
    lines = captured.err.splitlines()
    assert len(lines) == 1, f"{name}: stderr is not one line: {captured.err!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert case.culprit in line, f"{name}: the error does not name {case.culprit!r}: {line}"
    assert "Traceback" not in captured.err + captured.out
    assert not (folder / "PWNED").exists(), "a pickle payload ran"
