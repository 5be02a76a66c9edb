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
which is safe to delete).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import pickle
import pickletools
import random
import re
import secrets
import struct
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
]

#: The version of the layout described in the module docstring.
FORMAT_VERSION = 1
#: Value of the informative ``format`` key.
FORMAT_NAME = "equideq-checkpoint"

#: Keys without which a file is not an EquiDEQ checkpoint.
REQUIRED_KEYS = ("format_version", "config", "model_state")

_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
_SAFETENSORS_SUFFIXES = (".safetensors",)

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
    return path


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
        return "safetensors" if header_len + 8 <= size else "truncated-safetensors"
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
    try:
        document = json.loads(metadata["equideq"])
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
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{name}: checkpoint metadata is corrupt ({_short(exc)})") from None
    return content


def _newer_message(name: str, version: int) -> str:
    return f"{name}: written by a newer EquiDEQ (format {version}); this version reads format {FORMAT_VERSION}"


def _check_type(name: str, key: str, value: Any, types: tuple, label: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise CheckpointError(f"{name}: field '{key}' should be {label}, found {type(value).__name__}")


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
