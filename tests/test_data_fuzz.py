"""Bounded fuzzing of load_scan: random and mutated bytes may only succeed or raise ScanError."""

from __future__ import annotations

import io
import os
import itertools
import plistlib
import tarfile

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.data import load_scan
from engine.data.scans import Scan
from engine.errors import ScanError
from tests.helpers import ct_dicom_bytes

SUFFIXES = (".dcm", ".h5", ".npy", ".npz", ".png", ".tif", ".inv3", ".nii", "")
_counter = itertools.count()


def _seeds(tmp) -> dict[str, bytes]:
    out = {".dcm": ct_dicom_bytes()}
    with h5py.File(tmp / "seed.h5", "w") as f:
        f["kspace"] = np.ones((1, 4, 4), np.complex64)
        f["mask"] = np.ones(4, np.float32)
    out[".h5"] = (tmp / "seed.h5").read_bytes()
    buf = io.BytesIO()
    np.save(buf, np.arange(16, dtype=np.float32).reshape(4, 4))
    out[".npy"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, images=np.ones((2, 4, 4)))
    out[".npz"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buf, format="PNG")
    out[".png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8)).save(buf, format="TIFF")
    out[".tif"] = buf.getvalue()
    buf = io.BytesIO()
    main = plistlib.dumps({"matrix": {"filename": "matrix.dat", "dtype": "int16", "shape": [1, 4, 4]},
                           "modality": "CT"})
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("main.plist", main), ("matrix.dat", np.zeros(16, "<i2").tobytes())):
            info = tarfile.TarInfo(f"p/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out[".inv3"] = buf.getvalue()
    try:
        import nibabel as nib

        img = nib.Nifti1Image(np.ones((4, 4, 2), np.int16), np.eye(4))
        out[".nii"] = img.to_bytes()
    except ImportError:  # pragma: no cover
        out[".nii"] = b""
    out[""] = out[".dcm"]
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    return tmp, _seeds(tmp)


def test_seed_files_load(workdir):
    tmp, seeds = workdir
    for suffix, data in seeds.items():
        if not data:
            continue
        p = tmp / f"seed_ok{suffix}"
        p.write_bytes(data)
        assert isinstance(load_scan(p), Scan), suffix


def _mutate(data: bytes, edits, cut) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    if cut is not None and buf:
        buf = buf[: cut % (len(buf) + 1)]
    return bytes(buf)


edit = st.tuples(st.integers(0, 2**16), st.integers(0, 255))


# EQUIDEQ_FUZZ_EXAMPLES=5000 for a long local run
@settings(max_examples=int(os.environ.get("EQUIDEQ_FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    suffix=st.sampled_from(SUFFIXES),
    mode=st.sampled_from(("random", "mutate", "mutate")),
    noise=st.binary(max_size=1500),
    edits=st.lists(edit, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 2**16)),
)
def test_load_scan_raises_only_scan_error(workdir, suffix, mode, noise, edits, cut):
    tmp, seeds = workdir
    data = noise if mode == "random" or not seeds[suffix] else _mutate(seeds[suffix], edits, cut)
    path = tmp / f"case{next(_counter)}{suffix}"
    path.write_bytes(data)
    try:
        scan = load_scan(path, max_voxels=2**20)
    except ScanError as exc:
        assert str(exc)  # a message
    else:
        assert isinstance(scan, Scan)
        arr = scan.data
        assert arr.size > 0 and np.isfinite(arr).all()
    finally:
        path.unlink()
