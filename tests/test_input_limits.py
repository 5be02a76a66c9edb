"""Bad inputs that ask for too much memory, or decode into garbage, run through the CLI.

Each file is small on disk but its header claims an array whose bytes (not just
its element count) are far above the per-file limit: a lazy float64 or
complex128 HDF5 dataset, an .npz member or sparse .npy file claiming gigabytes,
a 13000 x 13000 RGB PNG of zeros, a gzipped NIfTI header, an InVesalius tar
member, DICOM pixel data. Every case must end with exit code 2 and one line
``error: ...`` that names the file and the limit in bytes (and how to raise it),
and the reader must refuse it from the header: a child process loading every
file stays under 1 GiB of extra memory. None of these huge arrays is ever
allocated here; the files are written from headers, lazily or sparsely.

The DICOM cases are about silent garbage: BitsAllocated 8 (or 1) over 16-bit
pixel data, and a RescaleSlope or RescaleIntercept that is not finite.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import plistlib
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from engine.checkpoint import Checkpoint, save_checkpoint
from engine.cli import main
from engine.config import ExperimentConfig
from engine.data import MAX_SCAN_BYTES, MAX_SCAN_BYTES_ENV, load_scan
from engine.errors import ConfigError, ScanError
from engine.model import build_model
from tests.helpers import ct_dicom_bytes as dicom_bytes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LIMIT_TEXT = "1,073,741,824 bytes (1.0 GiB)"
#: extra memory a reader may use on any of these files (the issue's bound)
EXTRA_MEMORY_BOUND = 2**30


@pytest.fixture(autouse=True)
def _default_limit(monkeypatch):
    """Every case runs with the default limit unless it sets its own."""
    monkeypatch.delenv(MAX_SCAN_BYTES_ENV, raising=False)


def tiny_checkpoint(path: Path) -> Path:
    config = ExperimentConfig().replace(**{
        "physics.img_size": 32, "physics.views": 12, "model.channels": 8, "model.depth": 1,
        "run.threads": 1})
    state = {k: v.detach().clone() for k, v in build_model(config, load_weights=False).state_dict().items()}
    save_checkpoint(path, Checkpoint(model_state=state, config=config.to_dict()))
    return path


# -- builders: big claims, small files --------------------------------------------------------


def lazy_h5(path: Path, **datasets) -> Path:
    """Datasets created from (shape, dtype) only: HDF5 allocates their storage when written, never here."""
    with h5py.File(path, "w") as f:
        for key, (shape, dtype) in datasets.items():
            f.create_dataset(key, shape=shape, dtype=dtype)
    return path


def npy_header(shape, descr: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def sparse_npy(path: Path, shape, descr: str) -> Path:
    """A complete .npy file of zeros whose data is a hole in the file system (no blocks written)."""
    header = npy_header(shape, descr)
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + int(np.prod(shape)) * np.dtype(descr).itemsize)
    return path


def npz_claiming(path: Path, key: str, shape, descr: str) -> Path:
    """An .npz whose member header claims ``shape`` (the zip bomb's promise) over a few KB of zeros."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{key}.npy", npy_header(shape, descr) + bytes(4096))
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_zeros(path: Path, width: int, height: int, colour_type: int = 2, rows_of_data: int | None = None) -> Path:
    """A valid PNG of zeros (colour type 2 = RGB, 0 = L), compressed row by row; ``rows_of_data`` truncates it."""
    channels = {0: 1, 2: 3}[colour_type]
    row = bytes(1 + width * channels)  # filter byte 0 + zero samples
    deflate = zlib.compressobj(1)
    n_rows = height if rows_of_data is None else rows_of_data
    idat = b"".join(deflate.compress(row) for _ in range(n_rows)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def gz_nifti_claiming(path: Path, shape, dtype) -> Path:
    """A .nii.gz whose header claims ``shape`` of ``dtype``, followed by 1 KB of its data."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + bytes(4) + bytes(1024)))
    return path


def inv3(path: Path, matrix_shape, matrix_member_size: int, matrix_data: bytes = b"") -> Path:
    """A gzipped tar: main.plist describing an int16 volume, then a matrix.dat member whose tar
    header announces ``matrix_member_size`` bytes but which holds only ``matrix_data``."""
    main = plistlib.dumps({"matrix": {"filename": "matrix.dat", "dtype": "int16", "shape": list(matrix_shape)},
                           "modality": "CT", "spacing": [1.0, 1.0, 1.0]})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("project/main.plist")
        info.size = len(main)
        tar.addfile(info, io.BytesIO(main))
    raw = buf.getvalue().rstrip(b"\0")  # drop the end-of-archive blocks
    raw += bytes(-len(raw) % tarfile.BLOCKSIZE)
    member = tarfile.TarInfo("project/matrix.dat")
    member.size = matrix_member_size
    raw += member.tobuf(format=tarfile.GNU_FORMAT) + matrix_data
    if len(matrix_data) == matrix_member_size:  # a complete archive: padding and end-of-archive blocks
        raw += bytes(-len(raw) % tarfile.BLOCKSIZE) + bytes(2 * tarfile.BLOCKSIZE)
    path.write_bytes(gzip.compress(raw))
    return path


# -- the corpus -------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    path: Path
    expect: tuple  # texts the error line must hold besides the file name
    memory_probe: bool = True  # also loaded in the child process that measures memory


LIMIT = ("limit of " + DEFAULT_LIMIT_TEXT, MAX_SCAN_BYTES_ENV)
GIB = 2**30


def build_corpus(d: Path) -> dict[str, Case]:
    cases: list[Case] = []

    def add(name, path, expect=LIMIT, memory_probe=True):
        cases.append(Case(name, path, tuple(expect), memory_probe))

    # HDF5: 1-2 KB files whose lazy datasets claim 2^28 elements (the old element cap allowed it)
    add("h5-lazy-float64-images", lazy_h5(d / "images64.h5", images=((16, 4096, 4096), "f8")),
        LIMIT + ("dataset 'images'", "3,221,225,472 bytes"))  # 2 GiB stored + 1 GiB as float32
    add("h5-lazy-complex128-kspace", lazy_h5(d / "kspace128.h5", kspace=((16, 4096, 4096), "c16")),
        LIMIT + ("dataset 'kspace'",))
    add("h5-lazy-float64-sinogram", lazy_h5(d / "sino64.h5", sinogram=((16, 4096, 4096), "f8")),
        LIMIT + ("dataset 'sinogram'",))
    small_k = ((1, 256, 256), "c8")
    add("h5-reference-over-the-rest", lazy_h5(d / "kref.h5", kspace=small_k,
                                              reconstruction_rss=((16, 4096, 4096), "f4")),
        LIMIT + ("dataset 'reconstruction_rss'",))
    # NumPy: a sparse 2 GiB float64 .npy, a sparse complex128 one, an .npz member claiming 2 GiB
    add("npy-sparse-float64", sparse_npy(d / "sparse64.npy", (16, 4096, 4096), "<f8"), LIMIT)
    add("npy-sparse-complex128", sparse_npy(d / "sparse128.npy", (8, 4096, 4096), "<c16"), LIMIT)
    add("npz-member-claims-2gib", npz_claiming(d / "bomb.npz", "images", (16, 4096, 4096), "<f8"),
        LIMIT + ("array 'images'",))
    # Pillow: a real 13000 x 13000 RGB PNG of zeros (about 2 MB), and a header past Pillow's own guard
    add("png-13000-rgb-zeros", png_of_zeros(d / "big.png", 13000, 13000), LIMIT)
    add("png-over-pillow-limit", png_of_zeros(d / "huge.png", 20000, 20000, colour_type=0, rows_of_data=2),
        ("178,956,970 pixels", "PIL.Image.MAX_IMAGE_PIXELS"))
    # NIfTI: a gzipped header claiming 1024 x 1024 x 256 float64 (2^28 voxels: 2 GiB stored)
    add("nifti-gz-float64-header", gz_nifti_claiming(d / "big.nii.gz", (1024, 1024, 256), np.float64),
        LIMIT + ("NIfTI volume",))
    # InVesalius: a tar member announcing 2 GiB, and a plist volume of 2^28 int16 voxels
    add("inv3-member-claims-2gib", inv3(d / "member.inv3", (8, 8, 8), 2 * GIB),
        LIMIT + ("'matrix.dat'", "decompressed"))
    add("inv3-volume-over-limit", inv3(d / "volume.inv3", (64, 2048, 2048), 16, bytes(16)),
        LIMIT + ("InVesalius volume",))
    # DICOM: 4 frames of 8192 x 8192 16-bit pixels claimed (2^28 samples)
    add("dicom-pixels-over-limit", d / "frames.dcm", LIMIT + ("pixel data",))
    (d / "frames.dcm").write_bytes(dicom_bytes(8192, 8192, frames=4, pixels=bytes(64)))

    # DICOM silent garbage: a header that misdescribes 16-bit pixel data, non-finite rescale
    sixteen_bit = np.arange(64, dtype="<i2").tobytes()  # 8 x 8 pixels of 2 bytes
    (d / "bits8.dcm").write_bytes(dicom_bytes(bits=8, pixels=sixteen_bit))
    add("dicom-bits8-over-16bit-data", d / "bits8.dcm",
        ("pixel data is 128 bytes", "describes 64", "BitsAllocated 8"), memory_probe=False)
    (d / "bits1.dcm").write_bytes(dicom_bytes(bits=1, pixels=sixteen_bit))
    add("dicom-bits1-over-16bit-data", d / "bits1.dcm",
        ("pixel data is 128 bytes", "describes 8", "BitsAllocated 1"), memory_probe=False)
    (d / "nanslope.dcm").write_bytes(dicom_bytes(slope="NaN"))
    add("dicom-nan-slope", d / "nanslope.dcm", ("RescaleSlope nan", "not a finite number"), memory_probe=False)
    (d / "infintercept.dcm").write_bytes(dicom_bytes(intercept="-inf"))
    add("dicom-inf-intercept", d / "infintercept.dcm", ("RescaleIntercept -inf",), memory_probe=False)
    return {case.name: case for case in cases}


CASES = [
    "h5-lazy-float64-images", "h5-lazy-complex128-kspace", "h5-lazy-float64-sinogram",
    "h5-reference-over-the-rest", "npy-sparse-float64", "npy-sparse-complex128", "npz-member-claims-2gib",
    "png-13000-rgb-zeros", "png-over-pillow-limit", "nifti-gz-float64-header", "inv3-member-claims-2gib",
    "inv3-volume-over-limit", "dicom-pixels-over-limit", "dicom-bits8-over-16bit-data",
    "dicom-bits1-over-16bit-data", "dicom-nan-slope", "dicom-inf-intercept",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("input_limits")
    return d, tiny_checkpoint(d / "good.pt"), build_corpus(d)


def test_corpus_files_are_small(corpus):
    _, _, cases = corpus
    assert sorted(cases) == sorted(CASES)
    for case in cases.values():
        on_disk = os.stat(case.path).st_blocks * 512  # sparse files: the blocks actually written
        assert on_disk < 4 * 2**20, f"{case.name}: {on_disk:,} bytes on disk"


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_one_error_line(corpus, name, capsys):
    folder, checkpoint, cases = corpus
    case = cases[name]
    try:
        code = main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(case.path), "--json"])
    except BaseException as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{name}: a raw {type(exc).__name__} escaped the CLI: {exc}")
    captured = capsys.readouterr()
    assert code == 2, f"{name}: exit code {code} (stdout: {captured.out[-300:]!r})"
    lines = captured.err.splitlines()
    assert len(lines) == 1, f"{name}: stderr is not one line: {captured.err!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert case.path.name in line, f"{name}: the error does not name {case.path.name!r}: {line}"
    for text in case.expect:
        assert text in line, f"{name}: {text!r} missing from: {line}"
    assert "Traceback" not in captured.err + captured.out


_PROBE = r"""
import json, resource, sys
from engine.data import load_scan
from engine.errors import EquiDEQError

def peak_rss_since_last_call():
    # Linux: reset the peak-RSS mark to the current RSS, read the new peak after the load;
    # elsewhere the lifetime peak, which can only overstate what one load costs
    try:
        with open("/proc/self/status") as fh:
            status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if line.startswith("Vm")}
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return status["VmHWM"]
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

def current_rss():
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

for name, path in json.loads(sys.argv[1]):
    peak_rss_since_last_call()
    before = current_rss()
    try:
        load_scan(path)
        outcome = "loaded"
    except EquiDEQError as exc:
        outcome = str(exc)
    except BaseException as exc:
        outcome = f"raw {type(exc).__name__}: {exc}"
    print(json.dumps({"case": name, "outcome": outcome, "extra": peak_rss_since_last_call() - before}), flush=True)
"""


def test_readers_stay_under_1_gib_of_extra_memory(corpus):
    """A child process loads every file in turn; none may raise its peak RSS by 1 GiB or more."""
    _, _, cases = corpus
    todo = [(c.name, str(c.path)) for c in cases.values() if c.memory_probe]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    env.pop(MAX_SCAN_BYTES_ENV, None)
    run = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(todo)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["case"] for r in records] == [name for name, _ in todo]
    for record in records:
        assert MAX_SCAN_BYTES_ENV in record["outcome"] or "MAX_IMAGE_PIXELS" in record["outcome"], record
        assert record["extra"] < EXTRA_MEMORY_BOUND, f"{record['case']}: {record['extra']:,} bytes of extra memory"


# -- the limit itself: default, raising it, naming it ---------------------------------------


def test_default_limit_is_1_gib():
    assert MAX_SCAN_BYTES == 2**30


def test_environment_variable_raises_and_lowers_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "small.npy"
    np.save(path, np.ones((64, 64)))  # 32 KiB of float64 + a 16 KiB float32 copy
    monkeypatch.setenv(MAX_SCAN_BYTES_ENV, "16KiB")
    with pytest.raises(ScanError) as info:
        load_scan(path)
    message = str(info.value)
    assert "small.npy" in message and "limit of 16,384 bytes" in message
    assert f"{MAX_SCAN_BYTES_ENV}=16KiB" in message and "49,152 bytes" in message
    monkeypatch.setenv(MAX_SCAN_BYTES_ENV, "49152")
    assert load_scan(path).images.shape == (1, 64, 64)
    monkeypatch.setenv(MAX_SCAN_BYTES_ENV, "1MB")
    assert load_scan(path).images.shape == (1, 64, 64)


def test_max_bytes_argument_wins_over_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "small.npy"
    np.save(path, np.ones((64, 64), np.float32))  # float32 needs no copy: 16 KiB
    monkeypatch.setenv(MAX_SCAN_BYTES_ENV, "1KiB")
    assert load_scan(path, max_bytes=16384).images.shape == (1, 64, 64)
    with pytest.raises(ScanError, match="max_bytes="):
        load_scan(path, max_bytes=16383)


def test_a_raised_limit_reads_what_the_default_refuses(tmp_path, monkeypatch):
    path = lazy_h5(tmp_path / "wide.h5", images=((2, 64, 64), "f8"))
    with pytest.raises(ScanError, match="dataset 'images'"):
        load_scan(path, max_bytes=2 * 64 * 64 * 12 - 1)
    assert load_scan(path, max_bytes=2 * 64 * 64 * 12).images.shape == (2, 64, 64)


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5XB", "nan"])
def test_unreadable_limit_setting_is_one_error_line(corpus, value, monkeypatch, capsys):
    folder, checkpoint, _ = corpus
    np.save(folder / "fine.npy", np.ones((32, 32), np.float32))
    monkeypatch.setenv(MAX_SCAN_BYTES_ENV, value)
    with pytest.raises(ConfigError, match=MAX_SCAN_BYTES_ENV):
        load_scan(folder / "fine.npy")
    code = main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(folder / "fine.npy"), "--json"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and MAX_SCAN_BYTES_ENV in lines[0], lines


def test_deepinv_ground_truth_is_counted_as_the_float32_stack(tmp_path):
    path = lazy_h5(tmp_path / "dinv.h5", x_train=((8, 3, 16, 16), "f8"))
    with pytest.raises(ScanError, match="deepinv ground truth"):
        load_scan(path, max_bytes=8 * 16 * 16 * 4 - 1)
    with h5py.File(path, "a") as f:
        f["x_train"][...] = np.random.default_rng(0).random((8, 3, 16, 16))
        x = f["x_train"][()]
    scan = load_scan(path)
    np.testing.assert_allclose(scan.images, np.tensordot([0.299, 0.587, 0.114], x, axes=([0], [1])), rtol=1e-6)


def test_rgb_png_within_the_limit_still_reads_as_luma(tmp_path):
    path = png_of_zeros(tmp_path / "wide.png", 300, 200)
    scan = load_scan(path)
    assert scan.images.shape == (1, 200, 300) and scan.metadata["BitDepth"] == "uint8"
    # the page costs 4 (Pillow) + 4 (NumPy) bytes per pixel, the float32 stack 4 more
    with pytest.raises(ScanError, match="one decoded page"):
        load_scan(path, max_bytes=300 * 200 * 12 - 1)
    assert load_scan(path, max_bytes=300 * 200 * 12).images.shape == (1, 200, 300)


def test_dicom_padding_shorter_than_a_frame_is_not_a_mismatch(tmp_path):
    """Odd lengths are padded to even, and trailing padding shorter than a frame is dropped
    (noted in the metadata); a whole frame or more of extra data is refused."""
    odd = np.arange(3 * 3, dtype=np.uint8).tobytes()  # 9 bytes for 3 x 3 8-bit pixels
    for name, pixels, padding in (("padded.dcm", odd + b"\0", None), ("trailing.dcm", odd + bytes(7), "6")):
        (tmp_path / name).write_bytes(dicom_bytes(3, 3, bits=8, pixels=pixels))
        scan = load_scan(tmp_path / name)
        np.testing.assert_array_equal(scan.images[0].ravel(), np.arange(9) - 1024)
        assert scan.metadata.get("PixelDataPadding", "").split(" ")[0] == (padding or "")
    (tmp_path / "excess.dcm").write_bytes(dicom_bytes(3, 3, bits=8, pixels=odd + bytes(9)))
    with pytest.raises(ScanError, match=r"excess\.dcm: pixel data is 18 bytes but the header describes 9"):
        load_scan(tmp_path / "excess.dcm")


def test_padded_real_dicom_still_loads():
    from engine.data import pydicom_test_file

    path = pydicom_test_file("MR_small_padded.dcm")  # 128 bytes of padding after 64 x 64 16-bit pixels
    if path is None:
        pytest.skip("pydicom's test files are not installed")
    scan = load_scan(path)
    assert scan.images.shape == (1, 64, 64) and scan.metadata["PixelDataPadding"].startswith("128 ")
