"""A run directory as the record of a training run: written while it trains, read back while it grows.

The run directory is the contract between a headless run (``equideq train --out RUN_DIR``, or the
workbench's own runs) and whoever shows it (the workbench's File > Open Run / Follow Run):

=============================  =======================================================================
``config.toml``                the run's config (written first)
``metrics.jsonl``              one JSON object per line: a step record ``{"step", <loss terms>, "total",
                               "lr", "grad_norm", "seconds", ...}`` (``spectral_radius``, ``safeguard``
                               and ``jacobian_weight`` at stability checks) or ``{"validation": {...}}``
``solves.jsonl``               one JSON object per training solve (:func:`solve_line`)
``snapshots/step_NNNNNN.npz``  the validation snapshot of step N (:func:`write_snapshot`)
``checkpoint_NNNNNN.pt``       checkpoints (or ``.safetensors``) and ``last.pt``, the newest of them
``finished.json``              how the run ended: ``{"reason": "completed" | "stopped" | "failed",
                               "step": N[, "message": "..."]}``; written last
=============================  =======================================================================

A solve line holds ``step``, ``direction`` (forward / backward), ``tag`` (``call i``: the model call
of the step), ``solver``, ``iterations`` and ``stop_reasons`` (one per sample), ``f_evals``,
``seconds``, ``tolerance``, ``tolerance_mode``, ``fallback``, ``max_iter`` and the residual traces
``abs_residuals`` / ``rel_residuals`` (``[iterations][batch]``, 6 significant digits; ``null`` where
a sample had stopped (NaN), ``1e999`` / ``-1e999`` for infinities). A snapshot file holds exactly
the arrays of a :class:`~engine.events.Snapshot` (``measurement``, ``baseline``, ``reconstruction``
and, when there are some, ``reference`` and ``mask``) with ``modality`` (a string) and ``step``;
it is read with ``allow_pickle=False``, so no file can run code.

Writing: :func:`record_run` attaches a :class:`RunRecordWriter` to a trainer's observers for the
length of its run (only rank 0 has a run directory under torchrun). The trainer builds these events
for any observer anyway; writing them costs a JSON line per solve and one ``.npz`` per validation.
Snapshots and ``finished.json`` are written atomically (:mod:`engine.atomic`); the JSON-lines files
are appended to, so their last line may be partly written when read.

Reading: :class:`RunRecordReader` turns a run directory into the events a live run emits, and on
each :meth:`~RunRecordReader.poll` only what is new: it keeps a byte offset per JSON-lines file,
leaves a partly written last line for the next poll, skips (and counts) garbled lines, picks up
files that appear later and starts again from the beginning when a file was rewritten under it (a
resume cuts the record back to its checkpoint; ``--overwrite`` replaces it). Files are read
newest-first (how the run ended, checkpoints, snapshots, metrics, solves, config: the reverse of
the order the trainer writes them), so whatever a poll reports of a step, it reports with every
record written before it. Imports no torch.
"""

from __future__ import annotations

import json
import math
import os
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from engine.atomic import atomic_write, atomic_write_text, remove_stale_temp_files
from engine.config import load_config
from engine.errors import EquiDEQError
from engine.events import (CheckpointSaved, Event, Observers, RunFailed, RunFinished, RunStarted, Snapshot,
                           SolveFinished, StabilityChecked, StepFinished, ValidationFinished)
from engine.outputs import (CONFIG_FILE, FINISHED_FILE, METRICS_FILE, SNAPSHOTS_DIR, SOLVES_FILE,
                            checkpoint_step, snapshot_name, snapshot_step)

#: The keys of a ``metrics.jsonl`` step record that are not loss terms (nor are keys ending in these suffixes).
STEP_RECORD_FIELDS = frozenset({"step", "lr", "grad_norm", "seconds", "jacobian_norm", "spectral_radius",
                                "safeguard", "jacobian_weight"})
STEP_RECORD_SUFFIXES = ("_iterations", "_per_rank")
SNAPSHOT_ARRAYS = ("measurement", "baseline", "reconstruction", "reference", "mask")
REQUIRED_SNAPSHOT_ARRAYS = ("measurement", "baseline", "reconstruction")
END_REASONS = ("completed", "stopped", "failed")
#: a snapshot holds a few display images: a bigger file (uncompressed) is not one of ours
MAX_SNAPSHOT_BYTES = 256 * 2 ** 20
#: new bytes read from one JSON-lines file per poll (the rest comes with the next poll)
MAX_READ_BYTES = 32 * 2 ** 20
#: tries to read a snapshot (a synced folder may show it before it is complete) before it is skipped
SNAPSHOT_TRIES = 3
_TAIL = 64  # bytes before the offset compared on every read: a rewritten file does not match them


class RunRecordError(EquiDEQError):
    """A run directory, or a file in it, that cannot be read as a run's record."""


class NotARunDirectory(RunRecordError):
    """A folder without a run's config or metrics."""


# -- writing --------------------------------------------------------------------------------------
def _trace_json(trace) -> str:
    """``[iterations][batch]`` as JSON: 6 significant digits, NaN -> null, +-inf -> +-1e999."""
    a = np.asarray(trace, dtype=np.float64)
    if a.ndim != 2:
        a = a.reshape(len(a), -1) if a.ndim == 1 else np.zeros((0, 0))
    inf = math.inf
    # a plain loop: 3x faster than np.char.mod here (measured, 40 x 4 traces)
    return "[" + ",".join("[" + ",".join("null" if v != v else "%.6g" % v if -inf < v < inf else
                                         "1e999" if v > 0 else "-1e999" for v in row) + "]"
                          for row in a.tolist()) + "]"


def _number(value) -> Optional[float]:
    """A float for strict JSON (None for NaN or infinity)."""
    value = float(value)
    return value if math.isfinite(value) else None


def solve_line(event: SolveFinished) -> str:
    """One line of ``solves.jsonl`` (with its newline) for a solve."""
    head = {"step": event.step, "direction": event.direction, "tag": event.tag, "solver": event.solver,
            "iterations": [int(i) for i in np.asarray(event.iterations).reshape(-1)],
            "stop_reasons": list(event.stop_reasons), "f_evals": int(event.f_evals),
            "seconds": _number(event.seconds), "tolerance": _number(event.tolerance),
            "tolerance_mode": event.tolerance_mode, "fallback": event.fallback, "max_iter": event.max_iter}
    traces = (f'"abs_residuals": {_trace_json(event.abs_residuals)}, '
              f'"rel_residuals": {_trace_json(event.rel_residuals)}')
    return json.dumps(head, allow_nan=False)[:-1] + ", " + traces + "}\n"


def write_snapshot(run_dir: str | os.PathLike, event: Snapshot) -> Path:
    """``snapshots/step_NNNNNN.npz`` of ``run_dir``: the event's arrays, ``modality`` and ``step`` (atomic)."""
    folder = Path(run_dir) / SNAPSHOTS_DIR
    folder.mkdir(exist_ok=True)
    arrays = {name: np.asarray(getattr(event, name)) for name in SNAPSHOT_ARRAYS if getattr(event, name) is not None}
    path = folder / snapshot_name(event.step)
    with atomic_write(path) as fh:
        np.savez(fh, modality=np.array(str(event.modality)), step=np.array(int(event.step), dtype=np.int64),
                 **arrays)
    return path


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)


class RunRecordWriter:
    """An observer that writes a run's solves, snapshots and end into its run directory.

    ``seconds`` is the time spent writing (what recording costs the run).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.step = 0
        self.failure = ""
        self.ended = False
        self.seconds = 0.0

    def __call__(self, event: Event) -> None:
        started = time.perf_counter()
        if isinstance(event, SolveFinished):
            _append(self.run_dir / SOLVES_FILE, solve_line(event))
        elif isinstance(event, Snapshot):
            write_snapshot(self.run_dir, event)
        elif isinstance(event, StepFinished):
            self.step = int(event.step)
            return
        elif isinstance(event, RunStarted):
            self.step = int(event.start_step)
            remove_stale_temp_files(self.run_dir / SNAPSHOTS_DIR)  # what killed snapshot writes left behind
        elif isinstance(event, RunFailed):
            self.failure = event.message
            return
        elif isinstance(event, RunFinished):
            self.end(event.reason, event.step, self.failure if event.reason == "failed" else "")
        else:
            return
        self.seconds += time.perf_counter() - started

    def end(self, reason: str, step: int, message: str = "") -> None:
        """Write ``finished.json``: the run is over."""
        record = {"reason": reason, "step": int(step), **({"message": message} if message else {})}
        atomic_write_text(self.run_dir / FINISHED_FILE, json.dumps(record) + "\n")
        self.ended = True


@contextmanager
def record_run(observers: Observers, run_dir: Optional[str | os.PathLike]) -> Iterator[Optional[RunRecordWriter]]:
    """Record into ``run_dir`` what ``observers`` receive inside the block (nothing when ``run_dir`` is None).

    A run that leaves the block with an exception (no RunFinished) is recorded as failed
    (interrupted: stopped), so that a reader following it learns that it ended.
    """
    if run_dir is None:
        yield None
        return
    writer = RunRecordWriter(run_dir)
    observers.add(writer)
    try:
        yield writer
    except BaseException as exc:
        if not writer.ended:
            reason = "stopped" if isinstance(exc, KeyboardInterrupt) else "failed"
            try:
                writer.end(reason, writer.step, f"the run ended with {type(exc).__name__}: {exc}")
            except OSError:
                pass  # the original error is the one to report
        raise
    finally:
        observers.remove(writer)


# -- reading ---------------------------------------------------------------------------------------
def is_run_dir(path: str | os.PathLike) -> bool:
    """A folder holding a run's ``config.toml`` or ``metrics.jsonl``."""
    path = Path(path)
    return path.is_dir() and ((path / CONFIG_FILE).is_file() or (path / METRICS_FILE).is_file())


def check_run_dir(path: str | os.PathLike) -> Path:
    """``path`` as a run directory, or :class:`NotARunDirectory` saying why not."""
    path = Path(path)
    if not path.exists():
        raise NotARunDirectory(f"{path} does not exist")
    if not path.is_dir():
        raise NotARunDirectory(f"{path} is a file; a run directory is the folder 'equideq train --out' wrote")
    if not is_run_dir(path):
        raise NotARunDirectory(f"{path} is not a run directory: it holds neither {CONFIG_FILE} nor {METRICS_FILE} "
                               "(a run directory is the folder 'equideq train --out' wrote)")
    return path


def read_snapshot(path: str | os.PathLike) -> Snapshot:
    """A snapshot file as the :class:`~engine.events.Snapshot` it recorded (no pickles: no file runs code)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            size = sum(info.file_size for info in archive.infolist())
        if size > MAX_SNAPSHOT_BYTES:
            raise RunRecordError(f"{path.name}: {size / 2 ** 20:.0f} MiB of arrays is not a snapshot "
                                 f"(at most {MAX_SNAPSHOT_BYTES // 2 ** 20} MiB)")
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in REQUIRED_SNAPSHOT_ARRAYS + ("modality", "step") if name not in data.files]
            if missing:
                raise RunRecordError(f"{path.name}: not a snapshot (no {', '.join(missing)})")
            arrays = {name: data[name] for name in SNAPSHOT_ARRAYS if name in data.files}
            modality, step = data["modality"], data["step"]
    except RunRecordError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise RunRecordError(f"{path.name}: not a readable snapshot ({exc})") from None
    for name, array in arrays.items():
        if array.ndim != 2 or array.dtype.kind not in "biufc":
            raise RunRecordError(f"{path.name}: {name} is not a 2D numeric image ({array.dtype}, {array.shape})")
    if modality.shape != () or modality.dtype.kind != "U" or step.shape != () or step.dtype.kind not in "iu":
        raise RunRecordError(f"{path.name}: modality and step must be a string and an integer")
    return Snapshot(step=int(step), modality=str(modality), **arrays)


def _trace(rows) -> np.ndarray:
    """A JSON trace back as ``[iterations, batch]`` float64 (null -> NaN)."""
    a = np.array(rows, dtype=np.float64)
    return a if a.ndim == 2 else np.zeros((0, 0))


def solve_event(record: dict) -> SolveFinished:
    """A ``solves.jsonl`` record as the :class:`~engine.events.SolveFinished` it recorded."""
    return SolveFinished(
        direction=str(record["direction"]), solver=str(record["solver"]),
        abs_residuals=_trace(record["abs_residuals"]), rel_residuals=_trace(record["rel_residuals"]),
        iterations=np.array(record["iterations"], dtype=np.int64).reshape(-1),
        stop_reasons=[None if r is None else str(r) for r in record["stop_reasons"]],
        f_evals=int(record["f_evals"]), seconds=_float(record.get("seconds")),
        tolerance=_float(record.get("tolerance")), tolerance_mode=str(record["tolerance_mode"]),
        fallback=record.get("fallback") or None, step=int(record["step"]), tag=str(record.get("tag", "")),
        max_iter=None if record.get("max_iter") is None else int(record["max_iter"]))


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def step_events(record: dict, config: dict) -> list[Event]:
    """A ``metrics.jsonl`` step record as its StepFinished (and StabilityChecked, when the record has one)."""
    step = record["step"]
    if not isinstance(step, int):
        raise TypeError("step is not an integer")
    losses = {key: float(value) for key, value in record.items() if _is_number(value)
              and key not in STEP_RECORD_FIELDS and not key.endswith(STEP_RECORD_SUFFIXES)}
    events: list[Event] = []
    if "spectral_radius" in record:
        jacobian = config.get("jacobian", {})
        radius, limit = _float(record["spectral_radius"]), _float(jacobian.get("radius_limit"))
        action = str(record.get("safeguard", "none"))
        events.append(StabilityChecked(
            step=step, spectral_radius=radius, limit=limit,
            penalty_weight=_float(record.get("jacobian_weight", jacobian.get("penalty"))), action=action,
            message="" if action == "none" else f"step {step}: spectral radius of dF/dx at the fixed point is "
                                                f"{radius:.3f} (> {limit:g}); safeguard {action.replace('_', ' ')}"))
    events.append(StepFinished(step=step, losses=losses, lr=_float(record.get("lr")),
                               seconds=_float(record.get("seconds")), grad_norm=_float(record.get("grad_norm"))))
    return events


_VALIDATION_FIELDS = tuple(f.name for f in fields(ValidationFinished))


def validation_event(record: dict) -> ValidationFinished:
    """A ``metrics.jsonl`` ``{"validation": {...}}`` record as its ValidationFinished."""
    return ValidationFinished(**{key: record[key] for key in _VALIDATION_FIELDS if key in record})


class _Rewritten(Exception):
    """A file was rewritten under the reader (truncated or replaced): everything is read again."""


class JsonLines:
    """A growing JSON-lines file read from a byte offset: only new bytes, whole lines only.

    A last line without its newline is left for the next read; a line that is not a
    JSON object is skipped and counted. The bytes just before the offset are kept
    and compared on every read, so a file truncated or replaced under the reader
    raises :class:`_Rewritten` even when it has grown past the offset again.
    """

    def __init__(self, path: Path, max_bytes: int = MAX_READ_BYTES) -> None:
        self.path, self.max_bytes = path, max_bytes
        self.offset = 0
        self._tail = b""
        self._in_long_line = False  # inside a line longer than max_bytes: skipped up to its newline

    def read(self) -> tuple[list[dict], int, bool]:
        """(the new records, lines skipped, whether more bytes are waiting)."""
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            if self.offset:
                raise _Rewritten(self.path.name) from None
            return [], 0, False
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size < self.offset:
                raise _Rewritten(self.path.name)
            fh.seek(self.offset - len(self._tail))
            data = fh.read(len(self._tail) + self.max_bytes)
        if data[:len(self._tail)] != self._tail:
            raise _Rewritten(self.path.name)
        data = data[len(self._tail):]
        more = self.offset + len(data) < size
        skipped = 0
        if self._in_long_line:
            cut = data.find(b"\n")
            if cut < 0:
                self._advance(data)
                return [], 0, more
            self._advance(data[:cut + 1])
            data, skipped, self._in_long_line = data[cut + 1:], 1, False
        end = data.rfind(b"\n")
        if end < 0:
            if more and len(data) >= self.max_bytes:  # one line longer than a read: garbage, skipped
                self._in_long_line = True
                self._advance(data)
            return [], skipped, more
        complete = data[:end + 1]
        self._advance(complete)
        records = []
        for line in complete.split(b"\n")[:-1]:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # torn by a kill, or not ours
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped += 1
        return records, skipped, more

    def _advance(self, consumed: bytes) -> None:
        self.offset += len(consumed)
        self._tail = (self._tail + consumed)[-_TAIL:]


def read_records(path: str | os.PathLike, max_bytes: int = MAX_READ_BYTES) -> list[dict]:
    """Every JSON object of a whole JSON-lines file of a run (``metrics.jsonl``, ``solves.jsonl``), read as
    :class:`JsonLines` reads it (a torn last line or a garbled one skipped); [] when the file is absent."""
    lines = JsonLines(Path(path), max_bytes)
    records, more = [], True
    while more:
        new, _, more = lines.read()
        records.extend(new)
    return records


@dataclass
class RecordPoll:
    """What one :meth:`RunRecordReader.poll` found."""

    events: list = field(default_factory=list)
    #: the record was rewritten (a resume or an overwrite): ``events`` start from its beginning again
    restarted: bool = False
    warnings: list = field(default_factory=list)  # skipped lines and unreadable files, in words
    more: bool = False  # more bytes were waiting than one poll reads: poll again at once
    finished: Optional[RunFinished] = None  # how the run ended, once it has
    last_step: int = 0  # the last training step recorded so far


#: the order of a step's events in a live run: its solves, its stability check, the step, its validation...
_RANK = {SolveFinished: 0, StabilityChecked: 1, StepFinished: 2, ValidationFinished: 3, Snapshot: 4,
         CheckpointSaved: 5}


def _order(event: Event) -> tuple:
    if isinstance(event, RunStarted):
        return (0, 0, 0)
    if isinstance(event, (RunFailed, RunFinished)):
        return (2, 0, isinstance(event, RunFinished))
    return (1, event.step or 0, _RANK[type(event)])


class RunRecordReader:
    """Reads a run directory incrementally: each :meth:`poll` returns the events recorded since the last.

    Raises :class:`NotARunDirectory` for a folder that holds no run. One thread at a time.
    """

    def __init__(self, run_dir: str | os.PathLike, max_bytes: int = MAX_READ_BYTES) -> None:
        self.run_dir = check_run_dir(run_dir)
        self.max_bytes = max_bytes
        self.skipped = 0  # lines and files skipped so far
        self._start()

    def _start(self) -> None:
        self._metrics = JsonLines(self.run_dir / METRICS_FILE, self.max_bytes)
        self._solves = JsonLines(self.run_dir / SOLVES_FILE, self.max_bytes)
        self.config: Optional[dict] = None
        self._snapshots: set[str] = set()
        self._snapshot_tries: dict[str, int] = {}
        self._checkpoints: set[str] = set()
        self.finished: Optional[RunFinished] = None
        self._end_message = ""
        self.last_step = 0

    def poll(self) -> RecordPoll:
        """The events recorded since the last poll (from the beginning after a rewrite: ``restarted``)."""
        if not self.run_dir.is_dir():
            raise RunRecordError(f"run directory {self.run_dir} is no longer there")
        try:
            try:
                return self._poll()
            except _Rewritten:
                self._start()
                try:
                    poll = self._poll()
                except _Rewritten:  # rewritten again while being read: the next poll starts afresh
                    self._start()
                    poll = RecordPoll()
                poll.restarted = True
                return poll
        except OSError as exc:
            name = Path(exc.filename).name if exc.filename else self.run_dir.name
            raise RunRecordError(f"cannot read {name} in {self.run_dir}: {exc.strerror or exc}") from None

    def _poll(self) -> RecordPoll:
        poll = RecordPoll()
        ended = self._read_end() if self.finished is None else None  # newest first: see the module's docstring
        poll.events += self._new_checkpoints()
        poll.events += self._new_snapshots(poll)
        metrics, skipped_metrics, more_metrics = self._metrics.read()
        solves, skipped_solves, more_solves = self._solves.read()
        if self.config is None and (metrics or (self.run_dir / CONFIG_FILE).is_file()):
            poll.events.append(self._run_started(poll))
        for record in metrics:
            try:
                if "validation" in record:
                    poll.events.append(validation_event(record["validation"]))
                else:
                    poll.events += step_events(record, self.config or {})
            except (KeyError, TypeError, ValueError):
                skipped_metrics += 1
        for record in solves:
            try:
                poll.events.append(solve_event(record))
            except (KeyError, TypeError, ValueError):
                skipped_solves += 1
        for name, count in ((METRICS_FILE, skipped_metrics), (SOLVES_FILE, skipped_solves)):
            if count:
                poll.warnings.append(f"{name}: skipped {count} unreadable line{'s' if count > 1 else ''}")
                self.skipped += count
        poll.more = more_metrics or more_solves or poll.more
        if ended is not None and not poll.more:  # reported once everything written before it has been
            if ended.reason == "failed" and self._end_message:
                poll.events.append(RunFailed(message=self._end_message, step=ended.step))
            poll.events.append(ended)
            self.finished = ended
        poll.events.sort(key=_order)
        self.last_step = max([self.last_step] + [e.step for e in poll.events if isinstance(e, StepFinished)])
        poll.finished, poll.last_step = self.finished, self.last_step
        return poll

    def _run_started(self, poll: RecordPoll) -> RunStarted:
        path = self.run_dir / CONFIG_FILE
        self.config = {}
        if path.is_file():
            try:
                self.config = load_config(path).to_dict()
            except EquiDEQError as exc:  # a config of another version: the curves are still worth showing
                poll.warnings.append(f"{exc}; showing the run without its config")
        steps = self.config.get("optim", {}).get("steps", 0)
        return RunStarted(run_dir=str(self.run_dir), config=self.config, device="", total_steps=int(steps))

    def _read_end(self) -> Optional[RunFinished]:
        try:
            record = json.loads((self.run_dir / FINISHED_FILE).read_text(encoding="utf-8"))
            reason, step = record["reason"], record["step"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):  # not complete yet (a synced copy): read again next time
            return None
        if reason not in END_REASONS or not isinstance(step, int):
            return None
        self._end_message = str(record.get("message", ""))
        return RunFinished(reason=reason, step=step, run_dir=str(self.run_dir))

    def _entries(self, folder: Path) -> list[str]:
        try:
            return [entry.name for entry in os.scandir(folder)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _new_checkpoints(self) -> list[Event]:
        events = []
        for name in self._entries(self.run_dir):
            step = checkpoint_step(name)
            if step is not None and name not in self._checkpoints:
                self._checkpoints.add(name)
                events.append(CheckpointSaved(step=step, path=str(self.run_dir / name)))
        return events

    def _new_snapshots(self, poll: RecordPoll) -> list[Event]:
        folder = self.run_dir / SNAPSHOTS_DIR
        events = []
        for name in sorted(self._entries(folder)):
            if snapshot_step(name) is None or name in self._snapshots:
                continue
            try:
                events.append(read_snapshot(folder / name))
            except RunRecordError as exc:
                tries = self._snapshot_tries[name] = self._snapshot_tries.get(name, 0) + 1
                if tries < SNAPSHOT_TRIES:
                    continue  # perhaps still being copied into place: try again next poll
                poll.warnings.append(f"{SNAPSHOTS_DIR}/{exc}; skipped")
                self.skipped += 1
            self._snapshots.add(name)
        return events
