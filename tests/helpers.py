"""Small building blocks shared by the engine tests."""

import io
import warnings

import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from torch import nn

from engine.config import PhysicsConfig, SolverConfig
from engine.deq import DEQReconstructor, FixedPointOperator
from engine.physics import build_physics


class SmoothDenoiser(nn.Module):
    """A small smooth contractive denoiser (tanh CNN, averaged): exact float64 gradients, no GroupNorm."""

    def __init__(self, channels: int = 1, hidden: int = 8, scale: float = 0.3):
        super().__init__()
        self.c1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.c2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.scale = scale

    def forward(self, x, sigma=None):
        return 0.5 * (x + self.scale * self.c2(torch.tanh(self.c1(x))))


class ExpansiveDenoiser(nn.Module):
    """Deliberately expansive: Lipschitz 1.8 (for divergence reporting)."""

    def forward(self, x, sigma=None):
        return 1.8 * x + 0.1


def tiny_ct(size=16, views=8, dtype=torch.float64):
    return build_physics(PhysicsConfig(img_size=size, views=views, noise="none"), dtype=dtype)


def make_deq(denoiser, gradient="implicit", solver="anderson", tol=1e-12, max_iter=400, iters=200,
             stop_mode="abs"):
    opts = SolverConfig(name=solver, tol=tol, max_iter=max_iter, stop_mode=stop_mode)
    return DEQReconstructor(FixedPointOperator(denoiser), opts, opts, gradient=gradient, unrolled_iterations=iters)


class SlowSmoothingDenoiser(nn.Module):
    """Nonlinear smoothing close to non-expansive (rate ~0.99): the slow null-space regime of trained DEQs."""

    def __init__(self, lipschitz: float = 0.99):
        super().__init__()
        self.lipschitz = lipschitz

    def forward(self, x, sigma=None):
        blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return self.lipschitz * (0.5 * x + 0.4 * blurred + 0.1 * torch.tanh(blurred))


def ct_dicom_bytes(rows=8, cols=8, *, frames=None, bits=16, pixels: bytes | None = b"", slope=1,
                   intercept=-1024, **tags) -> bytes:
    """A CT DICOM file in memory, for the reader, export and bad-input tests.

    ``pixels``: ``b""`` a 16-bit ramp of ``rows x cols`` (whatever ``bits`` says: what a wrong
    BitsAllocated then misdescribes), ``None`` no PixelData at all, other bytes as given.
    ``slope`` / ``intercept`` may be strings such as ``"NaN"``. ``tags`` are set as they are
    (``ImagePositionPatient=[...]``, ``FrameOfReferenceUID=...``).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if bits == 16 else 0
    with warnings.catch_warnings():  # pydicom warns that NaN and inf are not valid DS values
        warnings.simplefilter("ignore")
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if frames is not None:
        ds.NumberOfFrames = frames
    if pixels is not None:
        ds.PixelData = pixels if pixels else np.arange(rows * cols, dtype="<i2").tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
