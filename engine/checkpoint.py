"""Training checkpoints: one documented, versioned format in ``.pt`` or ``.safetensors``.

A checkpoint holds everything needed to resume a run bit-for-bit or to
reconstruct with a trained model: the weights, the validated experiment config
they were trained under, the optimiser / scheduler / RNG states, the step
count and the metrics so far. The same content is written in two containers,
chosen by the file extension.

Format (version 1)
==================

The logical content is a dict with these keys (see :class:`Checkpoint`):

===================  ======================================================================
``format``           the string ``"equideq-checkpoint"`` (informative; not required)
``format_version``   int, ``1``. Readers refuse files with a larger number.
``software_version`` str, ``engine.__version__`` of the writer
``created``          str, ISO-8601 UTC timestamp of the save
``step``             int, optimisation steps completed
``config``           dict, ``ExperimentConfig.to_dict()`` (validated when written and read)
``physics``          str, ``engine.physics.describe(config.physics)``
``metrics``          dict of floats / lists of floats (loss history, PSNR, ...)
``model_state``      dict str -> tensor, the model's ``state_dict()``
``optimizer_state``  ``optimizer.state_dict()`` or None
``scheduler_state``  ``scheduler.state_dict()`` or None
``rng_state``        dict or None (:func:`capture_rng_state`): ``torch`` (uint8 tensor),
                     ``cuda`` (list of uint8 tensors, optional), ``python``
                     (``{"version": int, "state": int64 tensor, "gauss_next": float|None}``),
                     ``numpy`` (``{"bit_generator": str, "keys": int64 tensor, "pos": int,
                     "has_gauss": int, "cached_gaussian": float}``)
===================  ======================================================================

Only tensors, ``int``/``float``/``bool``/``str``/``None``, lists, tuples and
dicts appear anywhere in it, so no reader ever has to unpickle arbitrary
Python objects.

``.pt`` / ``.pth`` / ``.ckpt``
    ``torch.save`` of exactly that dict. It loads with
    ``torch.load(path, weights_only=True)``; :func:`load_checkpoint` never
    loads any other way, and refuses (with :class:`~engine.errors.CheckpointError`)
    a file that would need arbitrary unpickling.

``.safetensors``
    Tensors live in the safetensors body: the model's under ``model/<key>``,
    every tensor found inside the other fields (optimiser moments and ``step``
    tensors, RNG states, ...) under a key made of its path, e.g.
    ``optimizer_state/state/0/exp_avg``. The safetensors metadata header holds
    ``format = "equideq-checkpoint"``, ``format_version = "1"`` and ``equideq``:
    a JSON document with every non-model field plus ``model_keys`` (the
    ``state_dict`` order). In that JSON, values JSON cannot express are tagged
    objects, so that the round trip is exact:

    * ``{"__tensor__": "<safetensors key>"}``: a tensor,
    * ``{"__tuple__": [...]}``: a tuple (e.g. Adam's ``betas``),
    * ``{"__dict__": [[key, value], ...]}``: a dict whose keys are not all
      plain strings (e.g. the optimiser's integer parameter ids), or that has
      a key of the form ``__name__``,
    * floats are written with ``repr`` precision; ``NaN`` / ``Infinity`` are
      allowed (Python's ``json`` extension).

Writes are atomic (:func:`atomic_write`): the file is written to a temporary
file in the target's folder, flushed and ``fsync``-ed, then moved over the
target with ``os.replace``. A crash or kill during a save leaves the previous
checkpoint intact (and possibly a hidden ``.<name>.<pid>.<random>.tmp`` file,
which :func:`remove_stale_temp_files` deletes when a run folder is next opened
for training). A write that fails (a full disk, also when ``torch.save`` reports it
as ``RuntimeError: unexpected pos``) raises :class:`CheckpointError` naming the
target; the temporary file is removed and the previous file kept.
:func:`publish_latest` copies a checkpoint to ``last.<ext>`` the same way.

Reading refuses, with a one-line :class:`CheckpointError` naming the file, and
without allocating more than the file's own data: tensors that are not dense
CPU-loadable arrays (sparse, meta) or whose elements overlap in memory (an
``expand`` / stride-0 ``as_strided`` view that claims more elements than it
stores), containers nested more than :data:`MAX_NESTING` levels deep, safetensors
headers over :data:`MAX_SAFETENSORS_HEADER` bytes or metadata JSON over
:data:`MAX_METADATA_JSON` characters, and a ``step`` that is not a whole number in
``0 .. 2**63 - 1``. :func:`check_resume_state` checks a checkpoint's model,
optimiser and scheduler states against the objects they are loaded into before
a run resumes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import json
import math
import os
import pickle
import pickletools
import random
import re
import secrets
import shutil
import struct
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch

import engine
from engine.config import ExperimentConfig, ModelConfig, PhysicsConfig
from engine.errors import CheckpointError, ConfigError

__all__ = [
    "FORMAT_VERSION",
    "FORMAT_NAME",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "compare_configs",
    "check_compatible",
    "check_state_matches",
    "capture_rng_state",
    "restore_rng_state",
    "atomic_write",
    "publish_latest",
    "remove_stale_temp_files",
    "check_resume_state",
]

#: The version of the layout described in the module docstring.
FORMAT_VERSION = 1
#: Value of the informative ``format`` key.
FORMAT_NAME = "equideq-checkpoint"

#: Keys without which a file is not an EquiDEQ checkpoint.
REQUIRED_KEYS = ("format_version", "config", "model_state")

_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
_SAFETENSORS_SUFFIXES = (".safetensors",)

#: Deepest nesting of dicts / lists / tuples accepted anywhere in a checkpoint.
MAX_NESTING = 64
#: Largest safetensors header (tensor index + metadata) read; the safetensors library's own limit.
MAX_SAFETENSORS_HEADER = 100_000_000
#: Largest ``equideq`` metadata JSON document parsed (a real one is a few kB to a few MB).
MAX_METADATA_JSON = 16 * 2**20
#: Largest step count accepted (an int64, as every step counter in PyTorch).
MAX_STEP = 2**63 - 1

#: Pickle opcodes that import or call Python objects (what ``weights_only`` forbids).
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


# ---------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """The content of one checkpoint file (see the module docstring for the format).

    ``source`` is where it was loaded from (not saved; empty for a new one).
    """

    model_state: dict
    config: dict
    step: int = 0
    optimizer_state: Optional[dict] = None
    scheduler_state: Optional[dict] = None
    metrics: dict = field(default_factory=dict)
    rng_state: Optional[dict] = None
    physics: str = ""
    software_version: str = engine.__version__
    format_version: int = FORMAT_VERSION
    created: str = ""
    source: str = field(default="", compare=False, repr=False)

    @property
    def name(self) -> str:
        """The file name for messages (``"checkpoint"`` when not loaded from a file)."""
        return Path(self.source).name if self.source else "checkpoint"

    def experiment_config(self) -> ExperimentConfig:
        """The stored config as a validated :class:`ExperimentConfig`.

        Raises :class:`CheckpointError` (carrying the :class:`ConfigError`
        text) when it no longer validates, e.g. after an option was removed.
        """
        return _validated_config(self.config, self.name)

    def summary(self) -> str:
        """One line for logs, file dialogs and the GUI's checkpoint panel."""
        parts = [f"step {self.step}"]
        if self.physics:
            parts.append(self.physics)
        if self.created:
            parts.append(f"saved {self.created}")
        parts.append(f"EquiDEQ {self.software_version}")
        return f"{self.name}: " + ", ".join(parts)


def _validated_config(config: Any, name: str) -> ExperimentConfig:
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{name}: the stored config is a {type(config).__name__}, not a table")
    try:
        return ExperimentConfig.from_dict(dict(config))
    except ConfigError as exc:
        raise CheckpointError(f"{name}: the checkpoint's config no longer validates: {exc}") from None


# ---------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------

def capture_rng_state() -> dict:
    """The torch (CPU and, if initialised, CUDA), Python ``random`` and NumPy global RNG states.

    Encoded with tensors and primitives only, as the checkpoint format requires.
    """
    version, internal, gauss_next = random.getstate()
    bitgen, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
        "numpy": {"bit_generator": str(bitgen), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping) -> None:
    """Restore what :func:`capture_rng_state` captured (missing parts are left alone).

    CUDA states are restored for as many devices as both the state and this
    machine have; they are skipped when CUDA is unavailable.
    """
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    py = state.get("python")
    if py is not None:
        internal = tuple(int(v) for v in py["state"].tolist())
        random.setstate((int(py["version"]), internal, py.get("gauss_next")))
    npy = state.get("numpy")
    if npy is not None:
        keys = npy["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state((npy["bit_generator"], keys, int(npy["pos"]), int(npy["has_gauss"]),
                             float(npy["cached_gaussian"])))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for index, value in enumerate(list(cuda)[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(value.to("cpu", torch.uint8), device=index)


# ---------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator:
    """Open a temporary file next to ``path`` for binary writing; on success it replaces ``path``.

    Usage::

        with atomic_write(target) as fh:
            fh.write(data)

    On leaving the block the file is flushed and ``fsync``-ed, then moved onto
    ``path`` with ``os.replace`` (atomic on POSIX and Windows), and the folder
    is ``fsync``-ed where that is possible. If the block raises, the temporary
    file is removed and ``path`` is untouched. A process killed inside the
    block leaves ``path`` as it was. The new file gets the usual permissions
    (``0o666`` minus the umask). The folder must exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _copy_file_contents(src_fh, dst_fh) -> None:
    """Copy an open file into another (a seam for tests that simulate a full disk)."""
    shutil.copyfileobj(src_fh, dst_fh, 2**20)


def publish_latest(src: str | os.PathLike, latest: str | os.PathLike) -> Path:
    """Make ``latest`` (a run's ``last.pt`` / ``last.safetensors``) a copy of the checkpoint ``src``, atomically.

    The copy goes through :func:`atomic_write`: ``latest`` is either the old
    file or the complete new one, never a torn copy, and a failed copy leaves
    no temporary file. Raises :class:`CheckpointError` naming ``latest`` and
    its folder (not the temporary file) when the copy fails, e.g. on a full
    disk. Returns ``latest``.
    """
    src, latest = Path(src), Path(latest)
    try:
        with open(src, "rb") as inp, atomic_write(latest) as out:
            _copy_file_contents(inp, out)
    except OSError as exc:
        reason = exc.strerror or _short(exc)
        raise CheckpointError(f"cannot update {latest.name} in {latest.parent} (copying {src.name}): "
                              f"{reason}") from None
    return latest


#: Temporary files of this project's writers: ``atomic_write`` (``.<name>.<pid>.<8 hex>.tmp``),
#: ``save_denoiser_weights`` (``.<name>.<pid>.tmp``) and older trainers' ``last.<ext>.tmp``.
_ATOMIC_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_WEIGHTS_TMP = re.compile(r"^\.(?P<name>.+\.(?:pt|pth|safetensors))\.(?P<pid>\d+)\.tmp$")
_LATEST_TMP = re.compile(r"^last\.(?:pt|safetensors)\.tmp$")

#: When this module was imported: no temporary file of this process is older.
_PROCESS_STARTED = time.time()


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (other than this one) may still be running; True when unknown."""
    if os.name != "posix":
        return False  # no safe probe (os.kill(pid, 0) would interrupt it on Windows): rely on the age
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that killed saves left in ``folder``; returns the paths removed.

    Only files named as this project's writers name them are considered
    (``.<name>.<pid>.<8 hex digits>.tmp`` from :func:`atomic_write`,
    ``.<name>.pt.<pid>.tmp`` from denoiser weight saves, and ``last.pt.tmp`` /
    ``last.safetensors.tmp`` from older versions' ``last.<ext>`` copies), only plain
    files (not links or folders), and only those last modified before this
    process started whose writer, where the name records it, is no longer
    running: a save in progress in this or another process is never touched,
    nor is any other file of the user's. Files that cannot be removed are skipped.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _ATOMIC_TMP.match(entry.name) or _WEIGHTS_TMP.match(entry.name)
        if match is None and not _LATEST_TMP.match(entry.name):
            continue
        try:
            if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_mtime >= _PROCESS_STARTED:
                continue  # written since this process started: possibly a save in progress
            if match is not None:
                pid = int(match.group("pid"))
                if pid != os.getpid() and _pid_alive(pid):
                    continue  # its writer may still be running
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except (OSError, ValueError):
            continue
    return removed


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------

def _plain(obj: Any, where: str) -> Any:
    """A copy of ``obj`` made only of tensors, primitives, lists, tuples and dicts.

    NumPy scalars become Python numbers and NumPy arrays become lists;
    parameters become plain tensors. Anything else is refused.
    """
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.is_quantized:
            raise CheckpointError(f"cannot save checkpoint: {where} is a {obj.layout} tensor; "
                                  "only dense tensors are stored")
        if obj.device.type == "meta":
            raise CheckpointError(f"cannot save checkpoint: {where} is a meta tensor without data")
        if _overlapping(obj):  # an expanded view: store its elements (readers refuse overlapping views)
            return obj.detach().clone(memory_format=torch.contiguous_format)
        return obj.detach()
    if obj is None or isinstance(obj, (bool, str)):
        return str(obj) if isinstance(obj, str) and type(obj) is not str else obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist(), where)
    if isinstance(obj, tuple):
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if isinstance(key, (np.integer, np.floating, np.bool_)):
                key = key.item()
            if not (key is None or isinstance(key, (str, int, float, bool))):
                raise CheckpointError(f"cannot save checkpoint: {where} has a key of type {type(key).__name__}; "
                                      "only strings and numbers are allowed as keys")
            out[key] = _plain(value, f"{where}[{key!r}]")
        return out
    raise CheckpointError(f"cannot save checkpoint: {where} is a {type(obj).__module__}.{type(obj).__qualname__}; "
                          "only tensors, numbers, strings, lists and dicts are stored")


def _content(ckpt: Checkpoint) -> dict:
    """The plain dict that is written (validating the config and filling ``physics``/``created``)."""
    if not isinstance(ckpt.model_state, Mapping):
        raise CheckpointError(f"cannot save checkpoint: model_state is a {type(ckpt.model_state).__name__}, "
                              "not a dict of tensors")
    for key, value in ckpt.model_state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"cannot save checkpoint: model_state[{key!r}] must map a string to a tensor, "
                                  f"got {type(value).__name__}")
    if isinstance(ckpt.step, bool) or not isinstance(ckpt.step, (int, np.integer)) or ckpt.step < 0:
        raise CheckpointError(f"cannot save checkpoint: step must be an integer >= 0, got {ckpt.step!r}")
    try:
        cfg = ExperimentConfig.from_dict(dict(ckpt.config))
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot save checkpoint: its config does not validate: {exc}") from None
    physics = ckpt.physics
    if not physics:
        from engine.physics import describe  # deferred: engine.physics imports deepinv

        physics = describe(cfg.physics)
    created = ckpt.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "software_version": str(ckpt.software_version),
        "created": str(created),
        "step": int(ckpt.step),
        "config": cfg.to_dict(),
        "physics": str(physics),
        "metrics": _plain(dict(ckpt.metrics or {}), "metrics"),
        "model_state": {k: _plain(v, f"model_state[{k!r}]") for k, v in ckpt.model_state.items()},
        "optimizer_state": _plain(ckpt.optimizer_state, "optimizer_state"),
        "scheduler_state": _plain(ckpt.scheduler_state, "scheduler_state"),
        "rng_state": _plain(ckpt.rng_state, "rng_state"),
    }


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` atomically; the extension picks the container.

    ``.pt`` / ``.pth`` / ``.ckpt``: ``torch.save``; ``.safetensors``: safetensors
    with a JSON metadata header. The config is validated first and stored
    normalised (all keys present). An empty ``physics`` is filled from the
    config, an empty ``created`` with the current UTC time (in the file only;
    ``ckpt`` is not modified). Creates missing parent folders. Returns the path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _TORCH_SUFFIXES + _SAFETENSORS_SUFFIXES:
        raise CheckpointError(f"{path.name}: checkpoint files must end in .pt, .pth, .ckpt or .safetensors")
    content = _content(ckpt)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix in _SAFETENSORS_SUFFIXES:
            from safetensors.torch import save as st_save

            tensors, metadata = _to_safetensors(content)
            blob = st_save(tensors, metadata=metadata)
            with atomic_write(path) as fh:
                fh.write(blob)
        else:
            with atomic_write(path) as fh:
                torch.save(content, fh)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    except RuntimeError as exc:
        # torch.save's C++ writer swallows the OSError of a failed write (a full disk, a
        # quota) and reports only that the file position is not where it expected
        raise CheckpointError(f"cannot write checkpoint {path}: {_write_failure(exc, path.parent)}") from None
    return path


def _write_failure(exc: RuntimeError, folder: Path) -> str:
    """What to say when the writer failed with a RuntimeError (how ``torch.save`` reports a full disk)."""
    lines = str(exc).strip().splitlines()
    detail = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", lines[0] if lines else "").strip()
    detail = (detail[:117] + "...") if len(detail) > 120 else (detail or type(exc).__name__)
    if not re.search(r"unexpected pos|writ|space|quota", detail, re.IGNORECASE):
        return detail
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    space = f" {free / 2**20:.0f} MiB free there" if free is not None else ""
    return f"the data could not be written (is the disk full?{space}): {detail}"


# -- safetensors encoding ----------------------------------------------------------------

def _is_tag(key: Any) -> bool:
    return isinstance(key, str) and len(key) > 4 and key.startswith("__") and key.endswith("__")


def _encode(obj: Any, path: str, tensors: dict) -> Any:
    """JSON-able form of ``obj``; tensors are moved into ``tensors`` (see the module docstring)."""
    if isinstance(obj, torch.Tensor):
        key = path
        n = 1
        while key in tensors:
            n += 1
            key = f"{path}#{n}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not _is_tag(k) for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[k, _encode(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    return obj  # None, bool, int, float, str


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (tag, value), = obj.items()
            if tag == "__tensor__":
                return tensors[value]
            if tag == "__tuple__":
                return tuple(_decode(v, tensors) for v in value)
            if tag == "__dict__":
                return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _to_safetensors(content: dict) -> tuple[dict, dict]:
    tensors: dict[str, torch.Tensor] = {}
    for key, value in content["model_state"].items():
        tensors[f"model/{key}"] = value.detach().to("cpu").contiguous().clone()
    rest = {k: v for k, v in content.items() if k != "model_state"}
    rest["model_keys"] = list(content["model_state"])
    document = {k: _encode(v, k, tensors) for k, v in rest.items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "equideq": json.dumps(document, allow_nan=True, separators=(",", ":")),
    }
    return tensors, metadata


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------

def _short(exc: BaseException, limit: int = 120) -> str:
    text = str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sniff(path: Path, name: str) -> str:
    """``"zip"`` (torch), ``"pickle"`` (legacy torch), ``"safetensors"``, ``"truncated-safetensors"`` or ``"other"``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot read checkpoint: {exc.strerror or exc}") from None
    if size == 0:
        raise CheckpointError(f"{name}: checkpoint file is empty (0 bytes)")
    if head.startswith(b"PK"):
        return "zip"
    # safetensors before pickle: its first byte is the low byte of the header length,
    # which is 0x80 (pickle's PROTO opcode) for one header length in 256
    if len(head) == 9 and head[8:9] == b"{":
        header_len = struct.unpack("<Q", head[:8])[0]
        if header_len + 8 > size:
            return "truncated-safetensors"
        if header_len > MAX_SAFETENSORS_HEADER:
            raise CheckpointError(f"{name}: refused: its safetensors header is {header_len} bytes, more than "
                                  f"the {MAX_SAFETENSORS_HEADER} bytes a checkpoint header may have")
        return "safetensors"
    if head.startswith(b"\x80"):
        return "pickle"
    return "other"


def _pickle_code_refs(data: bytes) -> Optional[list[str]]:
    """Names of the Python objects a pickle would import/call, without running it.

    ``None`` when ``data`` does not parse as a pickle; ``[]`` when it is a
    harmless one. Uses :func:`pickletools.genops`, which only parses.
    """
    refs: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            if opcode.name in ("GLOBAL", "INST"):
                refs.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL":
                refs.append(".".join(strings[-2:]) if len(strings) >= 2 else "a global")
            elif opcode.name in _CODE_OPCODES and not refs:
                refs.append("an object constructor")
    except Exception:
        return None
    return refs


def _unsafe_message(name: str, refs: list[str]) -> str:
    shown = ", ".join(dict.fromkeys(refs[:3])) if refs else "unknown"
    return (f"{name}: refused: the file contains Python objects ({shown}) that could run code when "
            "unpickled, so it was not loaded; only plain tensors and data are accepted")


def _classify_unpickling(path: Path, name: str, exc: BaseException, kind: str) -> CheckpointError:
    """Turn a ``weights_only`` refusal into an 'unsafe' or a 'corrupt' error, without unpickling."""
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if match:
        return CheckpointError(_unsafe_message(name, [match.group(1)]))
    data: Optional[bytes] = None
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.namelist() if m.endswith("data.pkl")]
                if members:
                    data = zf.read(members[0])
        else:
            with open(path, "rb") as fh:
                data = fh.read(64 * 2**20)
    except Exception:
        data = None
    refs = _pickle_code_refs(data) if data is not None else None
    if refs:
        return CheckpointError(_unsafe_message(name, refs))
    return CheckpointError(f"{name}: checkpoint is truncated or corrupt (its pickle data cannot be read)")


def _read_torch(path: Path, name: str, kind: str, map_location) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _classify_unpickling(path, name, exc, kind) from None
    except MemoryError:
        raise CheckpointError(f"{name}: checkpoint is too large to load into memory") from None
    except Exception as exc:  # zip / stream / EOF errors all mean a broken file
        detail = "the archive is incomplete or damaged" if isinstance(exc, OSError) else _short(exc)
        raise CheckpointError(f"{name}: checkpoint is truncated or corrupt ({detail})") from None


def _read_safetensors(path: Path, name: str, map_location) -> dict:
    from safetensors import safe_open

    device = "cpu"
    if isinstance(map_location, (str, torch.device)):
        device = str(map_location)
    try:
        with safe_open(str(path), framework="pt", device=device) as fh:
            metadata = fh.metadata() or {}
            keys = list(fh.keys())
            if "equideq" not in metadata:
                version = metadata.get("format_version")
                if version is not None and version.isdigit() and int(version) > FORMAT_VERSION:
                    raise CheckpointError(_newer_message(name, int(version)))
                hint = " (a bare safetensors weights file?)" if keys else ""
                raise CheckpointError(f"{name}: not an EquiDEQ checkpoint{hint}: the safetensors header has no "
                                      "checkpoint metadata (missing keys: " + ", ".join(REQUIRED_KEYS) + ")")
            tensors = {k: fh.get_tensor(k) for k in keys}
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{name}: checkpoint is truncated or corrupt ({_short(exc)})") from None
    text = metadata["equideq"]
    if len(text) > MAX_METADATA_JSON:
        raise CheckpointError(f"{name}: refused: its checkpoint metadata is {len(text)} characters of JSON, more "
                              f"than the {MAX_METADATA_JSON} a checkpoint has")
    try:
        document = json.loads(text)
        if not isinstance(document, dict):
            raise ValueError("metadata is not a JSON object")
        if isinstance(document.get("format_version"), int) and document["format_version"] > FORMAT_VERSION:
            raise CheckpointError(_newer_message(name, document["format_version"]))
        content = {k: _decode(v, tensors) for k, v in document.items()}
        model_keys = content.pop("model_keys", None)
        if model_keys is None:
            model_keys = [k[len("model/"):] for k in keys if k.startswith("model/")]
        content["model_state"] = {k: tensors[f"model/{k}"] for k in model_keys}
    except CheckpointError:
        raise
    except RecursionError:  # json and _decode recurse: "[[[[...]]]]" thousands deep
        raise CheckpointError(f"{name}: checkpoint metadata is corrupt (its JSON is nested more than "
                              f"{MAX_NESTING} levels deep)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{name}: checkpoint metadata is corrupt ({_short(exc)})") from None
    return content


def _newer_message(name: str, version: int) -> str:
    return f"{name}: written by a newer EquiDEQ (format {version}); this version reads format {FORMAT_VERSION}"


def _check_type(name: str, key: str, value: Any, types: tuple, label: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise CheckpointError(f"{name}: field '{key}' should be {label}, found {type(value).__name__}")


def _overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory (an ``expand`` or stride-0 ``as_strided`` view).

    Computed from the sizes and strides alone (nothing is allocated): sorted by
    stride, each dimension must step past everything the smaller ones reach.
    A tensor without overlaps needs at least ``numel`` elements of storage, so
    its logical size is bounded by the bytes the file really holds.
    """
    reach = 1  # elements spanned by the dimensions seen so far (max offset + 1)
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride < reach:
            return True
        reach += stride * (size - 1)
    return False


def _tensor_problem(t: torch.Tensor) -> Optional[str]:
    """Why ``t`` cannot be accepted from a file, or None; looks at metadata only."""
    if t.layout != torch.strided:
        return f"is a {str(t.layout).replace('torch.', '')} tensor; only dense tensors are accepted"
    if t.device.type == "meta":
        return "is a meta tensor without data"
    if t.is_quantized:
        return "is a quantized tensor; only dense tensors are accepted"
    if t.numel() and _overlapping(t):
        stored = t.untyped_storage().nbytes() // max(t.element_size(), 1)
        return (f"is an expanded view that claims {_shape(t)} = {t.numel()} elements over a storage of "
                f"{stored}; only dense tensors are accepted")
    return None


def _check_tree(content: Mapping, name: str) -> None:
    """Refuse tensors that are not dense data and containers nested too deeply, anywhere in ``content``.

    Iterative (no recursion), and reads only tensor metadata, so a hostile file
    costs nothing here: in particular no full-size operation ever runs on a
    view whose logical size is far beyond its storage (``torch.isfinite`` of a
    stride-0 10^6 x 10^6 view would allocate a terabyte).
    """
    stack: list[tuple[Any, str, int]] = [(v, str(k), 1) for k, v in content.items()]
    while stack:
        obj, where, depth = stack.pop()
        if isinstance(obj, torch.Tensor):
            problem = _tensor_problem(obj)
            if problem:
                raise CheckpointError(f"{name}: refused: tensor {where} {problem}")
        elif isinstance(obj, (Mapping, list, tuple)):
            if depth > MAX_NESTING:
                raise CheckpointError(f"{name}: refused: {where.split('[')[0]} is nested more than "
                                      f"{MAX_NESTING} levels deep")
            items = obj.items() if isinstance(obj, Mapping) else enumerate(obj)
            stack.extend((v, f"{where}[{k!r}]", depth + 1) for k, v in items
                         if isinstance(v, (torch.Tensor, Mapping, list, tuple)))


def _from_content(content: Any, name: str, source: str) -> Checkpoint:
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{name}: not an EquiDEQ checkpoint (the file holds a {type(content).__name__}, "
                              "not a checkpoint dict)")
    version = content.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(_newer_message(name, version))
    missing = [k for k in REQUIRED_KEYS if k not in content]
    if missing:
        bare = content and all(isinstance(v, torch.Tensor) for v in content.values())
        hint = "; it looks like a bare model state_dict without config" if bare else ""
        raise CheckpointError(f"{name}: not an EquiDEQ checkpoint (missing keys: {', '.join(missing)}){hint}")
    _check_type(name, "format_version", version, (int,), "an integer")
    if version < 1:
        raise CheckpointError(f"{name}: invalid format_version {version}")
    _check_tree(content, name)  # before any operation on a tensor's elements
    _check_type(name, "model_state", content["model_state"], (Mapping,), "a dict of tensors")
    for key, value in content["model_state"].items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name}: model_state entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{name}: model weight '{key}' contains NaN or Inf values; the checkpoint is "
                                  "unusable (was it saved from a diverged run?)")
    _check_type(name, "config", content["config"], (Mapping,), "a table")
    step = content.get("step", 0)
    _check_type(name, "step", step, (int,), "an integer")
    if not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"{name}: field 'step' should be a step count from 0 to {MAX_STEP}, found {step}")
    metrics = content.get("metrics") or {}
    _check_type(name, "metrics", metrics, (Mapping,), "a dict")
    for key in ("optimizer_state", "scheduler_state", "rng_state"):
        if content.get(key) is not None:
            _check_type(name, key, content[key], (Mapping,), "a dict or None")
    for key in ("physics", "software_version", "created"):
        if content.get(key) is not None:
            _check_type(name, key, content[key], (str,), "a string")
    ckpt = Checkpoint(
        model_state=dict(content["model_state"]),
        config=dict(content["config"]),
        step=int(step),
        optimizer_state=content.get("optimizer_state"),
        scheduler_state=content.get("scheduler_state"),
        metrics=dict(metrics),
        rng_state=content.get("rng_state"),
        physics=content.get("physics") or "",
        software_version=content.get("software_version") or "unknown",
        format_version=int(version),
        created=content.get("created") or "",
        source=source,
    )
    ckpt.experiment_config()  # refuse a config that no longer validates
    return ckpt


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    The container is recognised from the file's first bytes, not its name.
    ``.pt`` files are read only with ``torch.load(..., weights_only=True)``: a
    file that needs arbitrary unpickling is refused and nothing in it runs.
    ``map_location`` is passed to ``torch.load``; for safetensors a device
    string / ``torch.device`` is used (anything else loads to the CPU).

    Every failure raises :class:`CheckpointError` with a one-line message that
    names the file: missing, empty, truncated or corrupt, not a checkpoint,
    unsafe, not our format (naming the missing keys), written by a newer
    format version, or a config that no longer validates.
    """
    path = Path(path)
    name = path.name or str(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{name}: is a folder, not a checkpoint file")
    kind = _sniff(path, name)
    if kind in ("zip", "pickle"):
        content = _read_torch(path, name, kind, map_location)
    elif kind == "safetensors":
        content = _read_safetensors(path, name, map_location)
    elif kind == "truncated-safetensors":
        raise CheckpointError(f"{name}: checkpoint is truncated or corrupt (the safetensors header "
                              "is longer than the file)")
    else:
        try:
            with open(path, "rb") as fh:
                refs = _pickle_code_refs(fh.read(64 * 2**20))
        except OSError:
            refs = None
        if refs:  # an old-protocol pickle that imports code
            raise CheckpointError(_unsafe_message(name, refs))
        raise CheckpointError(f"{name}: not a checkpoint: the file is neither a PyTorch (.pt) "
                              "nor a safetensors file")
    return _from_content(content, name, str(path))


# ---------------------------------------------------------------------------------------
# Compatibility with the current config and model
# ---------------------------------------------------------------------------------------

def _physics_phrase(p: PhysicsConfig, details: set[str]) -> str:
    size = f"{p.img_size}x{p.img_size}"
    if p.modality == "ct":
        extra = ""
        if "circle" in details:
            extra = " restricted to the inscribed circle" if p.circle else " over the full square"
        return f"{p.views}-view CT{extra} at {size}"
    extra = []
    if "center_fraction" in details:
        extra.append(f"centre fraction {p.center_fraction:g}")
    if "mask_seed" in details:
        extra.append(f"mask seed {p.mask_seed}")
    tail = f" ({', '.join(extra)})" if extra else ""
    return f"{p.acceleration:g}x-accelerated MRI with a {p.mask} mask at {size}{tail}"


def _denoiser_phrase(m: ModelConfig) -> str:
    norm = "group norm" if m.norm == "group" else "no norm"
    sn = "spectral norm" if m.spectral_norm else "no spectral norm"
    return f"a {m.denoiser} denoiser ({m.channels} channels, depth {m.depth}, {norm}, {sn})"


_PHYSICS_FIELDS = {"ct": ("views", "circle"), "mri": ("acceleration", "mask", "center_fraction", "mask_seed")}
_ARCH_FIELDS = ("denoiser", "channels", "depth", "norm", "spectral_norm")


def compare_configs(trained: ExperimentConfig, current: ExperimentConfig) -> list[str]:
    """Differences that make the trained weights unusable or change what they mean.

    Compared: the physics (modality, image size, CT views and circle, MRI
    acceleration, mask, centre fraction and mask seed) and the denoiser
    architecture (denoiser, channels, depth, norm, spectral_norm). Each entry
    is one human-readable sentence, e.g. ``"checkpoint was trained for 60-view
    CT at 128x128; current config is 30-view CT at 128x128"``. Empty when
    compatible. Solver, loss, optimiser and data settings are free to differ.
    """
    out = []
    tp, cp = trained.physics, current.physics
    details: set[str] = set()
    if tp.modality == cp.modality:
        details = {f for f in _PHYSICS_FIELDS[tp.modality] if getattr(tp, f) != getattr(cp, f)}
    if tp.modality != cp.modality or tp.img_size != cp.img_size or details:
        hidden = details & {"circle", "center_fraction", "mask_seed"}
        out.append(f"checkpoint was trained for {_physics_phrase(tp, hidden)}; "
                   f"current config is {_physics_phrase(cp, hidden)}")
    tm, cm = trained.model, current.model
    if any(getattr(tm, f) != getattr(cm, f) for f in _ARCH_FIELDS):
        out.append(f"checkpoint was trained with {_denoiser_phrase(tm)}; "
                   f"current config has {_denoiser_phrase(cm)}")
    return out


def check_compatible(ckpt: Checkpoint, current: ExperimentConfig) -> ExperimentConfig:
    """Raise :class:`CheckpointError` if ``ckpt`` cannot be used as-is with ``current``.

    The message lists every difference from :func:`compare_configs` and says
    that the checkpoint's own config can be adopted instead. The raised error
    carries ``differences`` (the list) and ``trained_config`` (the
    checkpoint's validated :class:`ExperimentConfig`) for the CLI / GUI to
    offer that. Returns the checkpoint's config when compatible.
    """
    trained = ckpt.experiment_config()
    diffs = compare_configs(trained, current)
    if diffs:
        listed = diffs[0] if len(diffs) == 1 else " ".join(f"({i}) {d};" for i, d in enumerate(diffs, 1)).rstrip(";")
        err = CheckpointError(f"{ckpt.name} does not match the current config: {listed}. "
                              "Adopt the checkpoint's config to use it as trained.")
        err.differences = diffs
        err.trained_config = trained
        raise err
    return trained


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(int(s)) for s in t.shape) + "]"


def check_state_matches(model_state: Mapping[str, torch.Tensor], module: torch.nn.Module, *,
                        name: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``model_state`` fits ``module.state_dict()`` exactly.

    The message names the first missing key, else the first unexpected key,
    else the first shape mismatch (with both shapes), and how many other
    problems there are. ``name`` (e.g. the file name) starts the message.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in model_state]
    unexpected = [k for k in model_state if k not in expected]
    shapes = [k for k in expected if k in model_state and tuple(model_state[k].shape) != tuple(expected[k].shape)]
    problems = ([f"key '{k}' is missing from the checkpoint" for k in missing]
                + [f"the checkpoint has unexpected key '{k}'" for k in unexpected]
                + [f"'{k}' has shape {_shape(model_state[k])} in the checkpoint but {_shape(expected[k])} "
                   "in the model" for k in shapes])
    if problems:
        more = f" ({len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise CheckpointError(f"{name} does not fit the model: {problems[0]}{more}")


# ---------------------------------------------------------------------------------------
# Resuming: the stored optimiser / scheduler states against the objects they go into
# ---------------------------------------------------------------------------------------

#: Per-parameter state every non-empty entry of these optimisers holds (a missing one
#: makes ``load_state_dict`` or the next step fail with a KeyError).
_REQUIRED_PARAM_STATE = {"Adam": ("step", "exp_avg", "exp_avg_sq"), "AdamW": ("step", "exp_avg", "exp_avg_sq")}
#: Optimiser flags that change how a step runs (on which devices, with which kernels):
#: a stored value must agree with the optimiser's own (None and False alike).
_EXECUTION_FLAGS = ("capturable", "differentiable", "fused")
#: Scheduler fields that must be positive (a zero period divides by zero in ``step()``).
_POSITIVE_SCHEDULER_FIELDS = ("T_max", "step_size", "T_0", "total_steps")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind_problem(saved: Any, current: Any) -> Optional[str]:
    """Why ``saved`` cannot stand in for ``current`` (a hyper-parameter / scheduler field), or None."""
    if isinstance(current, bool):
        return None if isinstance(saved, bool) else f"should be true or false, found {_describe(saved)}"
    if current is None:
        if saved is None or isinstance(saved, (bool, str)) or (_is_real(saved) and math.isfinite(saved)):
            return None
        return f"should be a flag or a number, found {_describe(saved)}"
    if _is_real(current) or (isinstance(current, torch.Tensor) and current.numel() == 1):
        if isinstance(saved, torch.Tensor) and isinstance(current, torch.Tensor) and saved.numel() == 1:
            saved = float(saved)
        if not _is_real(saved):
            return f"should be a number, found {_describe(saved)}"
        return None if math.isfinite(saved) else f"should be a finite number, found {saved}"
    if isinstance(current, (list, tuple)):
        if not isinstance(saved, (list, tuple)):
            return f"should be a list of {len(current)}, found {_describe(saved)}"
        if len(saved) != len(current):
            return f"has {len(saved)} entries, the current one {len(current)}"
        for i, (s, c) in enumerate(zip(saved, current)):
            problem = _kind_problem(s, c)
            if problem:
                return f"entry {i} {problem}"
        return None
    if isinstance(current, str):
        return None if isinstance(saved, str) else f"should be a string, found {_describe(saved)}"
    if isinstance(current, Mapping):
        return None if isinstance(saved, Mapping) else f"should be a dict, found {_describe(saved)}"
    return None if type(saved) is type(current) else f"should be a {type(current).__name__}, found {_describe(saved)}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {_shape(value)}"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return f"a {type(value).__name__}"


def _check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer, fail) -> None:
    if not isinstance(state, Mapping):
        fail(f"optimizer_state is {_describe(state)}, not a dict")
    saved_state, groups = state.get("state"), state.get("param_groups")
    if not isinstance(saved_state, Mapping):
        fail(f"optimizer_state['state'] should be a dict of per-parameter states, found {_describe(saved_state)}")
    if not isinstance(groups, (list, tuple)):
        fail(f"optimizer_state['param_groups'] should be a list, found {_describe(groups)}")
    current = optimizer.param_groups
    if len(groups) != len(current):
        fail(f"the optimiser state has {len(groups)} parameter groups, the model's optimiser {len(current)}")
    params: dict[int, torch.Tensor] = {}
    flags: dict[int, Mapping] = {}
    for gi, (group, now) in enumerate(zip(groups, current)):
        where = f"optimizer_state['param_groups'][{gi}]"
        if not isinstance(group, Mapping):
            fail(f"{where} should be a dict, found {_describe(group)}")
        ids = group.get("params")
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            fail(f"{where}['params'] should be a list of parameter indices, found {_describe(ids)}")
        if len(ids) != len(now["params"]):
            fail(f"parameter group {gi} holds {len(ids)} parameters in the checkpoint but {len(now['params'])} "
                 "in the model's optimiser")
        for index, param in zip(ids, now["params"]):
            if index in params:
                fail(f"parameter index {index} appears twice in optimizer_state['param_groups']")
            params[index] = param
            flags[index] = group
        for key, value in now.items():
            if key in ("params", "param_names"):
                continue
            if key not in group:
                if key != "initial_lr" and (_is_real(value) or isinstance(value, (tuple, list, torch.Tensor))):
                    fail(f"{where} has no '{key}'")
                continue  # a flag that newer PyTorch versions add with its default when loading
            problem = _kind_problem(group[key], value)
            if problem:
                fail(f"{where}['{key}'] {problem}")
            if key in _EXECUTION_FLAGS and bool(group[key]) != bool(value):
                fail(f"{where}['{key}'] is {group[key]!r}, this optimiser runs with {value!r}")
        _check_hyper_parameters(group, optimizer, where, fail)
    required = _REQUIRED_PARAM_STATE.get(type(optimizer).__name__, ())
    for index, entry in saved_state.items():
        where = f"optimizer_state['state'][{index!r}]"
        if index not in params:
            fail(f"{where} belongs to no parameter of optimizer_state['param_groups']")
        if not isinstance(entry, Mapping):
            fail(f"{where} should be a dict, found {_describe(entry)}")
        param = params[index]
        needed = required + (("max_exp_avg_sq",) if required and flags[index].get("amsgrad") is True else ())
        missing = [k for k in needed if entry and k not in entry]
        if missing:
            fail(f"{where} has no '{missing[0]}'")
        for key, value in entry.items():
            if not isinstance(key, str):
                fail(f"{where} has a key {key!r} that is not a string")
            if key == "step":
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    value = float(value)
                if not _is_real(value) or not math.isfinite(value) or value < 0:
                    fail(f"{where}['step'] should be a step count, found {_describe(value)}")
            elif isinstance(value, torch.Tensor):
                if tuple(value.shape) != tuple(param.shape):
                    fail(f"{where}['{key}'] has shape {_shape(value)} but its parameter has shape {_shape(param)}")
                if value.dtype == torch.bool or (value.is_complex() and not param.is_complex()):
                    fail(f"{where}['{key}'] has dtype {str(value.dtype).replace('torch.', '')}, "
                         f"its parameter {str(param.dtype).replace('torch.', '')}")
            elif value is not None and not _is_real(value) and not isinstance(value, (bool, str)):
                fail(f"{where}['{key}'] is {_describe(value)}")


def _check_hyper_parameters(group: Mapping, optimizer: torch.optim.Optimizer, where: str, fail) -> None:
    """Let the optimiser's own constructor judge the stored values (it refuses e.g. ``betas`` >= 1,
    a negative ``lr``), on a one-element stand-in parameter; ``load_state_dict`` does not check them."""
    try:
        accepted = inspect.signature(type(optimizer).__init__).parameters
    except (TypeError, ValueError):
        return
    kwargs = {k: v for k, v in group.items()
              if k in accepted and k not in ("self", "params", "foreach") + _EXECUTION_FLAGS}
    try:
        type(optimizer)([torch.zeros(1, requires_grad=True)], **kwargs)
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        fail(f"{where} is refused by {type(optimizer).__name__}: {_short(exc)}")


def _check_scheduler_state(state: Any, scheduler, fail) -> None:
    if not isinstance(state, Mapping):
        fail(f"scheduler_state is {_describe(state)}, not a dict")
    current = scheduler.state_dict()
    kind = type(scheduler).__name__
    for key, value in state.items():
        if key not in current:
            # load_state_dict copies every field into the scheduler object: an unknown one
            # (e.g. 'optimizer') would replace its internals
            fail(f"scheduler_state has field {key!r}, which a {kind} scheduler does not have")
        problem = _kind_problem(value, current[key])
        if problem:
            fail(f"scheduler_state['{key}'] {problem}")
        if key in _POSITIVE_SCHEDULER_FIELDS and _is_real(current[key]) and not value > 0:
            fail(f"scheduler_state['{key}'] should be positive, found {value!r}")


def check_resume_state(ckpt: Checkpoint, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                       scheduler: Any = None) -> None:
    """Raise :class:`CheckpointError` unless ``ckpt`` can be loaded into these objects to continue a run.

    Checked before anything is loaded, so that a crafted or mismatched file is
    refused with one line naming it instead of failing inside PyTorch (or
    later, in the first training step): the model state (:func:`check_state_matches`);
    the optimiser state (a dict with ``state`` and ``param_groups``, as many
    groups and parameters as ``optimizer`` has, hyper-parameters of the right
    kind and finite, per-parameter tensors of their parameter's shape, a valid
    ``step``, the entries the optimiser needs); the scheduler state (only
    fields ``scheduler`` has, each of the right kind); and the metrics a
    resumed run reads (``ei_weight``, ``jacobian_weight``: numbers). States
    that are ``None`` in the checkpoint, or whose object is ``None``, are not checked.
    """
    name = ckpt.name

    def fail(problem: str):
        raise CheckpointError(f"{name}: cannot resume from it: {problem}")

    check_state_matches(ckpt.model_state, model, name=name)
    if optimizer is not None and ckpt.optimizer_state is not None:
        _check_optimizer_state(ckpt.optimizer_state, optimizer, fail)
    if scheduler is not None and ckpt.scheduler_state is not None:
        _check_scheduler_state(ckpt.scheduler_state, scheduler, fail)
    for key in ("ei_weight", "jacobian_weight"):
        value = (ckpt.metrics or {}).get(key)
        if value is not None and not _is_real(value):
            fail(f"metrics['{key}'] should be a number, found {_describe(value)}")
