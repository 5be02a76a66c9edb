"""Where the engine writes: run folders and output files, never over an input, never over a user's file unasked.

* :func:`claim_run_dir` — a training run's folder: new or empty, the folder of the
  run being resumed, or (with ``overwrite``) an old run whose files are removed
  first, so that no old checkpoint sits beside the new run's.
* :func:`truncate_metrics` — on resume, ``metrics.jsonl`` keeps only the records
  up to the checkpoint's step, so each step appears once; :func:`truncate_run`
  does the same to the whole run record (``solves.jsonl``, ``snapshots/``,
  ``finished.json``: :mod:`engine.run_record`).
* :func:`check_output_file` — an export or weights file: never one of the
  inputs, and not an existing file unless ``overwrite``.
* :func:`run_folder_name` — a config's ``run.name`` as a safe file name (the
  workbench's timestamped run folders stay inside their root).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional

from engine.atomic import atomic_write_text, temp_target
from engine.errors import EquiDEQError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"
#: one JSON line per training solve (:mod:`engine.run_record`)
SOLVES_FILE = "solves.jsonl"
#: the folder of the validation snapshots, ``step_NNNNNN.npz`` each (:func:`snapshot_name`)
SNAPSHOTS_DIR = "snapshots"
SNAPSHOT_PATTERN = "step_*.npz"
#: how the run ended (``{"reason", "step"[, "message"]}``), written last
FINISHED_FILE = "finished.json"
#: The files a training run writes into its folder: these and the temporary files of their writes
#: (:func:`engine.atomic.temp_target` names the file one was written for) are what ``overwrite`` removes,
#: with the snapshots in :data:`SNAPSHOTS_DIR`.
RUN_FILE_PATTERNS = (CONFIG_FILE, METRICS_FILE, SOLVES_FILE, FINISHED_FILE, "checkpoint_*.pt",
                     "checkpoint_*.safetensors", "last.pt", "last.safetensors")
MAX_RUN_NAME = 64


class OutputExistsError(EquiDEQError):
    """An output that exists already, written only with ``--overwrite``."""


def _is_run_file(name: str) -> bool:
    return any(fnmatch.fnmatch(written, pattern) for written in (name, temp_target(name)) if written
               for pattern in RUN_FILE_PATTERNS)


def checkpoint_name(step: int, extension: str) -> str:
    """``checkpoint_NNNNNN.<extension>``: the checkpoint a run writes at ``step`` (``pt`` / ``safetensors``)."""
    return f"checkpoint_{int(step):06d}.{extension}"


def checkpoint_step(name: str) -> Optional[int]:
    """The step of a checkpoint file name (:func:`checkpoint_name`), None for any other name."""
    match = re.fullmatch(r"checkpoint_(\d+)\.(pt|safetensors)", name)
    return int(match.group(1)) if match else None


def snapshot_name(step: int) -> str:
    return f"step_{int(step):06d}.npz"


def snapshot_step(name: str) -> Optional[int]:
    """The step of a snapshot file name (:func:`snapshot_name`), None for any other name."""
    match = re.fullmatch(r"step_(\d+)\.npz", name)
    return int(match.group(1)) if match else None


def _snapshot_files(folder: Path) -> list[Path]:
    """The snapshots in ``folder/snapshots`` and the temporary files of their writes."""
    snapshots = folder / SNAPSHOTS_DIR
    if not snapshots.is_dir() or snapshots.is_symlink():
        return []
    return sorted(path for path in snapshots.iterdir()
                  if any(fnmatch.fnmatch(written, SNAPSHOT_PATTERN)
                         for written in (path.name, temp_target(path.name)) if written))


def _run_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if _is_run_file(path.name)) + _snapshot_files(folder)


def _remove_snapshots_dir_if_empty(folder: Path) -> None:
    try:
        (folder / SNAPSHOTS_DIR).rmdir()
    except OSError:  # absent, or holds files of the user's
        pass


def claim_run_dir(folder: str | os.PathLike, *, resuming: bool = False, overwrite: bool = False) -> Path:
    """Make ``folder`` ready for a training run, or refuse with a message that says what to do.

    A missing or empty folder is used as is. A folder with other content is
    refused unless the run resumes (``resuming``: the old records are kept and
    later truncated to the checkpoint's step) or ``overwrite`` is given: then
    the previous run's own files (config, metrics, checkpoints) are deleted and
    any other file in the folder is left alone.
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise EquiDEQError(f"run directory {path} is a file, not a folder")
    if not path.exists() or not any(path.iterdir()) or resuming:
        return path
    if not overwrite:
        what = "a previous run" if _run_files(path) else "other files"
        raise OutputExistsError(f"run directory {path} already holds {what}; choose a new --out, "
                                "continue it with --resume CHECKPOINT, or replace it with --overwrite")
    for file in _run_files(path):
        file.unlink()
    _remove_snapshots_dir_if_empty(path)
    return path


def _record_step(record: object) -> Optional[int]:
    if not isinstance(record, dict):
        return None
    inner = record.get("validation")
    step = inner.get("step") if isinstance(inner, dict) else record.get("step")
    return step if isinstance(step, int) else None


def truncate_metrics(folder: str | os.PathLike, step: int) -> int:
    """Drop the records of ``metrics.jsonl`` after ``step`` (and torn lines); returns how many went.

    Used when a run resumes from the checkpoint of ``step``: the records of the
    abandoned steps after it would otherwise appear twice. Written atomically.
    """
    return _truncate_records(Path(folder) / METRICS_FILE, step)


def truncate_run(folder: str | os.PathLike, step: int) -> int:
    """Cut the run record in ``folder`` back to ``step``; returns how many ``metrics.jsonl`` records went.

    ``metrics.jsonl`` and ``solves.jsonl`` keep the records up to ``step``, the
    snapshots of later steps are deleted and ``finished.json`` goes (the run
    goes on), so a resumed run's record shows every step once.
    """
    folder = Path(folder)
    dropped = truncate_metrics(folder, step)
    _truncate_records(folder / SOLVES_FILE, step)
    for path in _snapshot_files(folder):
        snapshot = snapshot_step(path.name)  # None for temporary files: remove_stale_temp_files
        if snapshot is not None and snapshot > step:
            path.unlink(missing_ok=True)
    (folder / FINISHED_FILE).unlink(missing_ok=True)
    return dropped


def _truncate_records(path: Path, step: int) -> int:
    """Keep the JSON lines of ``path`` whose step is at most ``step``; returns how many went."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record_step = _record_step(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill
                record_step = None
            if record_step is not None and record_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += bool(line.strip())
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_file(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                      *, overwrite: bool = False) -> Path:
    """Refuse to write ``output`` over one of ``inputs`` (ever) or over an existing file (unless ``overwrite``)."""
    out = Path(output)
    for given in inputs:
        if given is None:
            continue
        source = Path(given)
        if _same_file(out, source) or out.resolve() == source.resolve():
            raise EquiDEQError(f"output {out} is the input {source}: refusing to overwrite an input; "
                               "choose another output file")
    if out.is_dir():
        raise EquiDEQError(f"output {out} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} exists; choose another name or pass --overwrite")
    return out


def run_folder_name(name: str) -> str:
    """``run.name`` as one safe path component: letters, digits, ``.-_``; never ``..`` or empty."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-")[:MAX_RUN_NAME]
    return safe or "run"


def new_run_dir(root: str | os.PathLike, name: str, stamp: str) -> Path:
    """A folder ``<root>/<stamp>-<safe name>`` that does not exist yet (``-1``, ``-2``, ... appended)."""
    root_path = Path(root)
    base = f"{stamp}-{run_folder_name(name)}"
    candidate, n = root_path / base, 1
    while candidate.exists():
        candidate, n = root_path / f"{base}-{n}", n + 1
    return candidate
