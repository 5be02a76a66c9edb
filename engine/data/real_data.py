"""Locate real scan files already installed on this machine (never downloads anything).

Each helper returns a :class:`~pathlib.Path` when the file exists, else None.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

__all__ = ["invesalius_head_ct_path", "colin27_t1_path", "pydicom_test_file", "INVESALIUS_CRANIUM", "COLIN27_T1"]

#: Debian package invesalius-examples: a head CT (108 slices of 256 x 256, HU)
INVESALIUS_CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
#: Debian package mricron: the Colin27 ("ch2") T1-weighted MRI template, 181 x 217 x 181
COLIN27_T1 = Path("/usr/share/mricron/templates/ch2.nii.gz")


def _existing(path: Path) -> Optional[Path]:
    return path if path.is_file() else None


def invesalius_head_ct_path() -> Optional[Path]:
    """InVesalius' example head CT ``Cranium.inv3``, or None."""
    return _existing(INVESALIUS_CRANIUM)


def colin27_t1_path() -> Optional[Path]:
    """The Colin27 T1 MRI template shipped with MRIcron (``ch2.nii.gz``), or None."""
    return _existing(COLIN27_T1)


def pydicom_test_file(name: str) -> Optional[Path]:
    """A test file bundled inside the installed pydicom package (e.g. ``CT_small.dcm``), or None.

    Only looks on disk in pydicom's ``data/test_files`` folder; it deliberately
    avoids ``pydicom.data.get_testdata_file``, which may download missing files.
    """
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return None
    spec = importlib.util.find_spec("pydicom")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        found = _existing(Path(root) / "data" / "test_files" / name)
        if found is not None:
            return found
    return None
