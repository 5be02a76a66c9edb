"""The checkpoint format: :class:`Checkpoint`, its encoding, the ``.pt`` / ``.safetensors`` containers, save and load.

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
``rng_state``        dict or None (:func:`~engine.checkpoint.rng.capture_rng_state`): ``torch`` (uint8 tensor),
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

Writes are atomic (:func:`engine.atomic.atomic_write`): the file is written to a
temporary file in the target's folder, flushed and ``fsync``-ed, then moved over
the target with ``os.replace``. A crash or kill during a save leaves the previous
checkpoint intact (and possibly a hidden ``.<name>.<pid>.<random>.tmp`` file,
which :func:`engine.atomic.remove_stale_temp_files` deletes when a run folder is
next opened for training). A write that fails (a full disk, also when ``torch.save``
reports it as ``RuntimeError: unexpected pos``) raises :class:`CheckpointError`
naming the target; the temporary file is removed and the previous file kept.
:func:`publish_latest` copies a checkpoint to ``last.<ext>`` the same way.

Reading (:func:`load_checkpoint`) refuses, with a one-line :class:`CheckpointError`
naming the file, and without allocating more than the file's own data, what
:mod:`engine.checkpoint.safety` finds: code in a pickle, tensors that are not
dense CPU-loadable arrays (sparse, meta) or whose elements overlap in memory (an
``expand`` / stride-0 ``as_strided`` view that claims more elements than it
stores), containers nested more than ``MAX_NESTING`` levels deep, safetensors
headers over ``MAX_SAFETENSORS_HEADER`` bytes or metadata JSON over
``MAX_METADATA_JSON`` characters, and a ``step`` that is not a whole number in
``0 .. 2**63 - 1``. Whether a checkpoint fits the current config, model and
optimiser is :mod:`engine.checkpoint.compatibility`'s concern.
"""

from __future__ import annotations

from __future__ import annotations

import datetime as _dt
import json
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

import engine
from engine.atomic import atomic_write
from engine.checkpoint.safety import (check_metadata_json, check_model_state, check_step, check_tree, check_type,
                                      classify_unpickling, metadata_too_deep, overlapping, pickle_code_refs,
                                      short_reason, sniff, unsafe_message)
from engine.config import CHECKPOINT_FORMATS, ExperimentConfig
from engine.errors import CheckpointError, ConfigError

#: The version of the layout described in the module docstring.
FORMAT_VERSION = 1
#: Value of the informative ``format`` key.
FORMAT_NAME = "equideq-checkpoint"

#: Keys without which a file is not an EquiDEQ checkpoint.
REQUIRED_KEYS = ("format_version", "config", "model_state")

_TORCH_SUFFIXES = CHECKPOINT_FORMATS["pt"]
_SAFETENSORS_SUFFIXES = CHECKPOINT_FORMATS["safetensors"]


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
        if overlapping(obj):  # an expanded view: store its elements (readers refuse overlapping views)
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


def _copy_file_contents(src_fh, dst_fh) -> None:
    """Copy an open file into another (a seam for tests that simulate a full disk)."""
    shutil.copyfileobj(src_fh, dst_fh, 2**20)


def publish_latest(src: str | os.PathLike, latest: str | os.PathLike) -> Path:
    """Make ``latest`` (a run's ``last.pt`` / ``last.safetensors``) a copy of the checkpoint ``src``, atomically.

    The copy goes through :func:`engine.atomic.atomic_write`: ``latest`` is either the old
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
        reason = exc.strerror or short_reason(exc)
        raise CheckpointError(f"cannot update {latest.name} in {latest.parent} (copying {src.name}): "
                              f"{reason}") from None
    return latest


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

def _read_torch(path: Path, name: str, kind: str, map_location) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise classify_unpickling(path, name, exc, kind) from None
    except MemoryError:
        raise CheckpointError(f"{name}: checkpoint is too large to load into memory") from None
    except Exception as exc:  # zip / stream / EOF errors all mean a broken file
        detail = "the archive is incomplete or damaged" if isinstance(exc, OSError) else short_reason(exc)
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
        raise CheckpointError(f"{name}: checkpoint is truncated or corrupt ({short_reason(exc)})") from None
    text = metadata["equideq"]
    check_metadata_json(text, name)
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
        raise metadata_too_deep(name) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{name}: checkpoint metadata is corrupt ({short_reason(exc)})") from None
    return content


def _newer_message(name: str, version: int) -> str:
    return f"{name}: written by a newer EquiDEQ (format {version}); this version reads format {FORMAT_VERSION}"


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
    check_type(name, "format_version", version, (int,), "an integer")
    if version < 1:
        raise CheckpointError(f"{name}: invalid format_version {version}")
    check_tree(content, name)  # before any operation on a tensor's elements
    check_model_state(content["model_state"], name)
    check_type(name, "config", content["config"], (Mapping,), "a table")
    step = content.get("step", 0)
    check_step(step, name)
    metrics = content.get("metrics") or {}
    check_type(name, "metrics", metrics, (Mapping,), "a dict")
    for key in ("optimizer_state", "scheduler_state", "rng_state"):
        if content.get(key) is not None:
            check_type(name, key, content[key], (Mapping,), "a dict or None")
    for key in ("physics", "software_version", "created"):
        if content.get(key) is not None:
            check_type(name, key, content[key], (str,), "a string")
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
    kind = sniff(path, name)
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
                refs = pickle_code_refs(fh.read(64 * 2**20))
        except OSError:
            refs = None
        if refs:  # an old-protocol pickle that imports code
            raise CheckpointError(unsafe_message(name, refs))
        raise CheckpointError(f"{name}: not a checkpoint: the file is neither a PyTorch (.pt) "
                              "nor a safetensors file")
    return _from_content(content, name, str(path))
