"""Where the app reads its shipped resources and where it writes the user's data.

Resources (``configs/``, ``weights/``, ``help/``, ``icons/``) are read from the first of:

1. ``$EQUIDEQ_RESOURCES``, when set (a folder laid out like ``resources/``);
2. a frozen bundle's own folder, ``sys._MEIPASS/resources`` (PyInstaller: ``packaging/equideq.spec``);
3. the source checkout this package sits in (``pyproject.toml`` of ``equideq`` beside ``engine/``):
   its ``resources/``, even when a copy is installed too;
4. an installed wheel's copy: ``equideq_resources/`` beside ``engine/`` in site-packages (the wheel
   ships ``resources/`` as that data-only package: ``[tool.setuptools]`` in ``pyproject.toml``).
   Beside this ``engine``, not wherever ``sys.path`` finds one, so code and resources come from the same
   install;
5. else ``resources/`` beside ``engine/`` (a source tree without ``pyproject.toml``).

User data (run directories) goes to ``./runs`` when the app runs from a source checkout, as it always
did there, and otherwise to the platform's user data folder (``platformdirs``: ``~/.local/share/equideq``
or ``$XDG_DATA_HOME/equideq`` on Linux): never into a frozen bundle, which may be read-only and is
replaced by the next install. Imports neither torch nor Qt, nor any other engine module.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

RESOURCES_ENV = "EQUIDEQ_RESOURCES"
DIST_NAME = "equideq"  # the distribution in pyproject.toml, and the user data folder's name
APP_AUTHOR = "EquiDEQ"  # the vendor folder platformdirs puts above it on Windows
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding engine/ (a checkout's root)
RESOURCES_PACKAGE = "equideq_resources"  # resources/ as installed from a wheel (pyproject.toml)


def frozen_bundle() -> Optional[Path]:
    """The folder a frozen (PyInstaller) app unpacked to, or None when running from source."""
    if getattr(sys, "frozen", False) and getattr(sys, "_MEIPASS", None):
        return Path(sys._MEIPASS).resolve()
    return None


@functools.lru_cache(maxsize=None)
def _project_table(pyproject: Path) -> Optional[dict]:
    try:
        import tomllib

        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    except (OSError, ValueError):
        return None
    return project if project.get("name") == DIST_NAME else None


def checkout_project() -> Optional[dict]:
    """The ``[project]`` table of the source checkout this package runs from, or None (installed, frozen)."""
    if frozen_bundle() is not None:
        return None
    return _project_table(PACKAGE_ROOT / "pyproject.toml")


def resources_dir() -> Path:
    """The resources folder (see the module's docstring for the order). Never raises: a missing
    folder makes callers fall back (no built-in configs listed, random initial weights)."""
    override = os.environ.get(RESOURCES_ENV)
    if override:
        return Path(override).expanduser().resolve()
    bundle = frozen_bundle()
    if bundle is not None:
        return bundle / "resources"
    if checkout_project() is not None:
        return PACKAGE_ROOT / "resources"
    installed = PACKAGE_ROOT / RESOURCES_PACKAGE
    if installed.is_dir():
        return installed
    return PACKAGE_ROOT / "resources"


def resource_path(*parts: str) -> Path:
    """A path under :func:`resources_dir`, e.g. ``resource_path("help", "quick_guide.html")``."""
    return resources_dir().joinpath(*parts)


def user_data_dir() -> Path:
    """The platform's folder for this user's EquiDEQ data (XDG_DATA_HOME on Linux); not created here."""
    import platformdirs

    return Path(platformdirs.user_data_dir(DIST_NAME, APP_AUTHOR))


def default_run_root(working_dir: Optional[str] = None) -> Path:
    """Where the workbench puts run directories unless told (``--run-root``): ``<working dir>/runs``
    from a source checkout, else ``<user data>/runs`` (a frozen bundle's working directory may be
    the bundle itself)."""
    if checkout_project() is not None:
        return Path(working_dir or os.getcwd()) / "runs"
    return user_data_dir() / "runs"
