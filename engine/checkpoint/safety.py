"""What a checkpoint file may contain before anything in it is used: the reading side's defences.

Owns: recognising the container from the first bytes (:func:`sniff`), finding
the Python objects a pickle would import or call without running it
(:func:`pickle_code_refs`, :func:`classify_unpickling`) and the "unsafe file"
message, the checks on tensors (dense, with data, no overlapping elements:
:func:`tensor_problem`) and on the whole content tree (:func:`check_tree`), the
model-weight and field checks of :func:`~engine.checkpoint.format.load_checkpoint`,
and the reading limits :data:`MAX_NESTING`, :data:`MAX_SAFETENSORS_HEADER`,
:data:`MAX_METADATA_JSON` and :data:`MAX_STEP` (settable here or on
:mod:`engine.checkpoint`). Every refusal is a one-line :class:`CheckpointError`
naming the file; nothing here allocates more than the file's own data.
"""

from __future__ import annotations

import pickletools
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from engine.errors import CheckpointError

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


def short_reason(exc: BaseException, limit: int = 120) -> str:
    """The first sentence of ``exc``'s message, at most ``limit`` characters, for one-line errors."""
    text = str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shape_text(t: torch.Tensor) -> str:
    """``t``'s shape as ``[2, 3]``."""
    return "[" + ", ".join(str(int(s)) for s in t.shape) + "]"


# ---------------------------------------------------------------------------------------
# The container and pickled code
# ---------------------------------------------------------------------------------------

def sniff(path: Path, name: str) -> str:
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


def pickle_code_refs(data: bytes) -> Optional[list[str]]:
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


def unsafe_message(name: str, refs: list[str]) -> str:
    """The refusal of a file whose pickle would import or call ``refs``."""
    shown = ", ".join(dict.fromkeys(refs[:3])) if refs else "unknown"
    return (f"{name}: refused: the file contains Python objects ({shown}) that could run code when "
            "unpickled, so it was not loaded; only plain tensors and data are accepted")


def classify_unpickling(path: Path, name: str, exc: BaseException, kind: str) -> CheckpointError:
    """Turn a ``weights_only`` refusal into an 'unsafe' or a 'corrupt' error, without unpickling."""
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if match:
        return CheckpointError(unsafe_message(name, [match.group(1)]))
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
    refs = pickle_code_refs(data) if data is not None else None
    if refs:
        return CheckpointError(unsafe_message(name, refs))
    return CheckpointError(f"{name}: checkpoint is truncated or corrupt (its pickle data cannot be read)")


# ---------------------------------------------------------------------------------------
# Tensors and the content tree
# ---------------------------------------------------------------------------------------

def overlapping(t: torch.Tensor) -> bool:
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


def tensor_problem(t: torch.Tensor) -> Optional[str]:
    """Why ``t`` cannot be accepted from a file, or None; looks at metadata only."""
    if t.layout != torch.strided:
        return f"is a {str(t.layout).replace('torch.', '')} tensor; only dense tensors are accepted"
    if t.device.type == "meta":
        return "is a meta tensor without data"
    if t.is_quantized:
        return "is a quantized tensor; only dense tensors are accepted"
    if t.numel() and overlapping(t):
        stored = t.untyped_storage().nbytes() // max(t.element_size(), 1)
        return (f"is an expanded view that claims {shape_text(t)} = {t.numel()} elements over a storage of "
                f"{stored}; only dense tensors are accepted")
    return None


def check_tree(content: Mapping, name: str) -> None:
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
            problem = tensor_problem(obj)
            if problem:
                raise CheckpointError(f"{name}: refused: tensor {where} {problem}")
        elif isinstance(obj, (Mapping, list, tuple)):
            if depth > MAX_NESTING:
                raise CheckpointError(f"{name}: refused: {where.split('[')[0]} is nested more than "
                                      f"{MAX_NESTING} levels deep")
            items = obj.items() if isinstance(obj, Mapping) else enumerate(obj)
            stack.extend((v, f"{where}[{k!r}]", depth + 1) for k, v in items
                         if isinstance(v, (torch.Tensor, Mapping, list, tuple)))


def check_type(name: str, key: str, value: Any, types: tuple, label: str) -> None:
    """Refuse field ``key`` unless ``value`` is one of ``types`` (a bool only where ``bool`` is listed)."""
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise CheckpointError(f"{name}: field '{key}' should be {label}, found {type(value).__name__}")


def check_model_state(model_state: Any, name: str) -> None:
    """Refuse a ``model_state`` that is not a dict of string -> tensor, or has NaN / Inf weights.

    Run after :func:`check_tree`, so the finite check only reads dense tensors.
    """
    check_type(name, "model_state", model_state, (Mapping,), "a dict of tensors")
    for key, value in model_state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name}: model_state entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{name}: model weight '{key}' contains NaN or Inf values; the checkpoint is "
                                  "unusable (was it saved from a diverged run?)")


def check_step(step: Any, name: str) -> None:
    """Refuse a ``step`` that is not a whole number in ``0 .. MAX_STEP``."""
    check_type(name, "step", step, (int,), "an integer")
    if not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"{name}: field 'step' should be a step count from 0 to {MAX_STEP}, found {step}")


# ---------------------------------------------------------------------------------------
# The safetensors metadata document
# ---------------------------------------------------------------------------------------

def check_metadata_json(text: str, name: str) -> None:
    """Refuse an ``equideq`` metadata JSON document longer than :data:`MAX_METADATA_JSON` characters."""
    if len(text) > MAX_METADATA_JSON:
        raise CheckpointError(f"{name}: refused: its checkpoint metadata is {len(text)} characters of JSON, more "
                              f"than the {MAX_METADATA_JSON} a checkpoint has")


def metadata_too_deep(name: str) -> CheckpointError:
    """The error for metadata JSON nested deeper than the parser (or the decoder) can recurse."""
    return CheckpointError(f"{name}: checkpoint metadata is corrupt (its JSON is nested more than "
                           f"{MAX_NESTING} levels deep)")
