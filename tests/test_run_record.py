"""The run directory as a record (engine.run_record): what the trainer writes, and reading it while it grows.

Reader: a partly written last line waits for the next poll, a garbled line is skipped and counted, a
rewritten file (resume, overwrite) starts the record again, files that appear later are picked up;
snapshots round-trip without pickles. Writer: the trainer's record replays as the events it emitted,
a resume cuts the record back; and a run written by an ``equideq train`` subprocess is followed live.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.config import ExperimentConfig, builtin_config, save_config
from engine.events import (CheckpointSaved, Observers, RunFailed, RunFinished, RunStarted, Snapshot, SolveFinished,
                           StabilityChecked, StepFinished, ValidationFinished)
from engine.outputs import claim_run_dir, truncate_run
from engine.run_record import (NotARunDirectory, RunRecordError, RunRecordReader, RunRecordWriter, is_run_dir,
                               read_records, read_snapshot, record_run, solve_event, solve_line, write_snapshot)
from test_workbench_fakes import snapshot_event, solve_event as fake_solve

REPO = Path(__file__).resolve().parents[1]


class RecordedRun:
    """Writes a run directory as the trainer does (config, metrics, solves, snapshots, end), a step at a time."""

    def __init__(self, folder: Path, steps: int = 4) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        config = ExperimentConfig().replace(**{"optim.steps": steps, "physics.img_size": 16, "run.name": "recorded"})
        save_config(config, folder / "config.toml")
        self.writer = RunRecordWriter(folder)

    def metrics(self, record: dict) -> None:
        with open(self.folder / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def step(self, step: int) -> None:
        for direction in ("forward", "backward"):
            self.writer(fake_solve(step, direction, iters=5 + step % 3))
        self.metrics({"step": step, "mc": 0.6 / step, "ei": 0.4 / step, "total": 1.0 / step, "lr": 1e-3,
                      "grad_norm": 0.5, "seconds": 0.1, "forward_iterations": 5})

    def validate(self, step: int) -> None:
        self.metrics({"validation": {"step": step, "domain": "image", "psnr": 20.0 + step, "ssim": 0.5,
                                     "baseline_psnr": 18.0, "baseline_ssim": 0.4, "residual": 0.1}})
        self.writer(snapshot_event(step))

    def finish(self, reason: str = "completed", step: int = 0) -> None:
        self.writer(RunFinished(reason=reason, step=step))

    def run(self, steps: int, validate_every: int = 2) -> "RecordedRun":
        for step in range(1, steps + 1):
            self.step(step)
            if step % validate_every == 0:
                self.validate(step)
        return self


def kinds(events) -> list[str]:
    return [type(e).__name__ for e in events]


def steps_of(events, kind) -> list[int]:
    return [e.step for e in events if isinstance(e, kind)]


# -- reading -------------------------------------------------------------------------------------
def test_a_run_replays_in_the_order_a_live_run_emits(tmp_path):
    run = RecordedRun(tmp_path / "run").run(4)
    (tmp_path / "run" / "checkpoint_000004.pt").write_bytes(b"x")
    run.finish("completed", 4)
    poll = RunRecordReader(tmp_path / "run").poll()
    assert kinds(poll.events)[:5] == ["RunStarted", "SolveFinished", "SolveFinished", "StepFinished", "SolveFinished"]
    assert kinds(poll.events)[-4:] == ["ValidationFinished", "Snapshot", "CheckpointSaved", "RunFinished"]
    started = poll.events[0]
    assert started.total_steps == 4 and started.config["run"]["name"] == "recorded"
    assert steps_of(poll.events, StepFinished) == [1, 2, 3, 4]
    assert poll.events[3].losses == {"mc": 0.6, "ei": 0.4, "total": 1.0}  # lr, grad_norm, iterations are not losses
    assert steps_of(poll.events, ValidationFinished) == steps_of(poll.events, Snapshot) == [2, 4]
    assert poll.finished.reason == "completed" and poll.last_step == 4 and not poll.more
    assert RunRecordReader(tmp_path / "run").poll().events[-1] == poll.finished  # read again: the same
    empty = RunRecordReader(tmp_path / "run")
    empty.poll()
    assert empty.poll().events == []  # nothing new


def test_a_partly_written_last_line_waits_for_the_next_poll(tmp_path):
    run = RecordedRun(tmp_path / "run").run(1)
    reader = RunRecordReader(tmp_path / "run")
    assert steps_of(reader.poll().events, StepFinished) == [1]
    line = json.dumps({"step": 2, "total": 0.5, "lr": 1e-3, "seconds": 0.1}) + "\n"
    with open(run.folder / "metrics.jsonl", "a") as fh:
        fh.write(line[:17])  # as a writer caught mid-line leaves it
    poll = reader.poll()
    assert poll.events == [] and poll.warnings == [] and reader.skipped == 0
    with open(run.folder / "metrics.jsonl", "a") as fh:
        fh.write(line[17:])
    poll = reader.poll()
    assert steps_of(poll.events, StepFinished) == [2] and poll.events[0].losses == {"total": 0.5}


def test_a_garbled_line_is_skipped_and_counted(tmp_path):
    run = RecordedRun(tmp_path / "run")
    run.step(1)
    with open(run.folder / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "tot\n[1, 2]\n{"validation": {"psnr": 3}}\n')  # torn, not an object, no step
    with open(run.folder / "solves.jsonl", "ab") as fh:
        fh.write(b"\xff\xfe not json\n")
    run.step(3)
    reader = RunRecordReader(run.folder)
    poll = reader.poll()
    assert steps_of(poll.events, StepFinished) == [1, 3] and len(steps_of(poll.events, SolveFinished)) == 4
    assert reader.skipped == 4
    assert poll.warnings == ["metrics.jsonl: skipped 3 unreadable lines", "solves.jsonl: skipped 1 unreadable line"]


def test_a_whole_record_file_reads_past_bad_lines_and_the_read_size(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_records(path) == []  # not written yet
    lines = [json.dumps({"step": i, "total": 0.5 * i}) for i in range(1, 41)]
    lines[10] = '{"step": 11, "tot'  # torn by a kill
    path.write_text("\n".join(lines) + '\n{"step": 41, "tot')  # and a last line still being written
    # in reads of a few lines each, as of a file bigger than one read
    assert [r["step"] for r in read_records(path, max_bytes=64)] == [i for i in range(1, 41) if i != 11]


def test_a_rewritten_file_restarts_the_record(tmp_path):
    run = RecordedRun(tmp_path / "run").run(4)
    reader = RunRecordReader(run.folder)
    assert steps_of(reader.poll().events, StepFinished) == [1, 2, 3, 4]
    truncate_run(run.folder, 2)  # as a resume from the checkpoint of step 2 does
    run.step(3)
    run.step(4)
    run.step(5)  # grown past where the reader was: the bytes before its offset differ
    poll = reader.poll()
    assert poll.restarted and kinds(poll.events)[0] == "RunStarted"
    assert steps_of(poll.events, StepFinished) == [1, 2, 3, 4, 5]
    assert steps_of(poll.events, Snapshot) == [2]  # step 4's went with the abandoned steps
    assert sorted(set(steps_of(poll.events, SolveFinished))) == [1, 2, 3, 4, 5]
    (run.folder / "metrics.jsonl").write_text("")  # replaced by a new run (--overwrite)
    poll = reader.poll()
    assert poll.restarted and steps_of(poll.events, StepFinished) == []


def test_files_that_appear_later_are_picked_up(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    save_config(ExperimentConfig(), folder / "config.toml")  # the trainer's first file
    reader = RunRecordReader(folder)
    assert kinds(reader.poll().events) == ["RunStarted"]
    assert reader.poll().events == []
    run = RecordedRun(folder)
    run.step(1)
    run.validate(1)
    assert kinds(reader.poll().events) == ["SolveFinished", "SolveFinished", "StepFinished", "ValidationFinished",
                                           "Snapshot"]


def test_how_the_run_ended_is_reported_once_everything_before_it_was(tmp_path):
    run = RecordedRun(tmp_path / "run").run(2)
    observers = Observers()
    with record_run(observers, run.folder):
        observers.emit(RunFailed(message="stopped after 3 failed steps in a row", step=2))
        observers.emit(RunFinished(reason="failed", step=2))
    assert not observers.active  # the writer is attached for the run only
    reader = RunRecordReader(run.folder, max_bytes=200)  # a few lines per poll
    polls = [reader.poll()]
    while polls[-1].more:
        polls.append(reader.poll())
    assert len(polls) > 2 and all(p.finished is None for p in polls[:-1])
    events = [e for p in polls for e in p.events]
    assert steps_of(events, StepFinished) == [1, 2]
    assert kinds(events)[-2:] == ["RunFailed", "RunFinished"] and events[-2].message.startswith("stopped after 3")
    # a run that leaves its block with an exception is recorded as ended too
    other = RecordedRun(tmp_path / "crashed")
    with pytest.raises(MemoryError):
        with record_run(Observers(), other.folder) as writer:
            writer(StepFinished(step=7, losses={}, lr=0.0, seconds=0.0))
            raise MemoryError("out of memory")
    end = json.loads((other.folder / "finished.json").read_text())
    assert end == {"reason": "failed", "step": 7, "message": "the run ended with MemoryError: out of memory"}


def test_not_a_run_directory_says_why(tmp_path):
    with pytest.raises(NotARunDirectory, match="does not exist"):
        RunRecordReader(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotARunDirectory, match="is a file"):
        RunRecordReader(tmp_path / "file.txt")
    with pytest.raises(NotARunDirectory, match="neither config.toml nor metrics.jsonl"):
        RunRecordReader(tmp_path)
    assert not is_run_dir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    assert is_run_dir(tmp_path) and RunRecordReader(tmp_path).poll().events == []


# -- the files ------------------------------------------------------------------------------------
def test_a_solve_line_round_trips_with_stopped_and_infinite_residuals(tmp_path):
    event = fake_solve(3, "backward", iters=4, batch=3)
    event.abs_residuals[1, 2] = np.inf
    event.abs_residuals[2, 2] = -np.inf
    event.fallback, event.max_iter, event.tag = "fixed_point", 40, "call 1"
    line = solve_line(event)
    assert "NaN" not in line and "Infinity" not in line and line.endswith("}\n") and line.count("\n") == 1
    back = solve_event(json.loads(line))
    np.testing.assert_allclose(back.abs_residuals, event.abs_residuals, rtol=1e-5)  # 6 significant digits
    np.testing.assert_allclose(back.rel_residuals, event.rel_residuals, rtol=1e-5)
    assert np.isnan(back.rel_residuals).sum() == np.isnan(event.rel_residuals).sum() > 0
    np.testing.assert_array_equal(back.iterations, event.iterations)
    for name in ("direction", "solver", "stop_reasons", "f_evals", "seconds", "tolerance", "tolerance_mode",
                 "fallback", "step", "tag", "max_iter"):
        assert getattr(back, name) == getattr(event, name), name


def test_a_snapshot_round_trips_and_a_pickle_is_refused(tmp_path):
    event = snapshot_event(5, size=12, modality="mri")
    event.mask = (np.arange(144).reshape(12, 12) % 3 == 0)
    path = write_snapshot(tmp_path, event)
    assert path == tmp_path / "snapshots" / "step_000005.npz"
    back = read_snapshot(path)
    assert back.step == 5 and back.modality == "mri"
    for name in ("measurement", "baseline", "reconstruction", "reference", "mask"):
        np.testing.assert_array_equal(getattr(back, name), getattr(event, name))
    event.reference, event.mask = None, None
    back = read_snapshot(write_snapshot(tmp_path, event))
    assert back.reference is None and back.mask is None
    evil = tmp_path / "snapshots" / "step_000006.npz"
    np.savez(evil, measurement=np.array([{"code": 1}], dtype=object), baseline=np.zeros((2, 2)),
             reconstruction=np.zeros((2, 2)), modality=np.array("ct"), step=np.array(6))
    with pytest.raises(RunRecordError, match="step_000006.npz: not a readable snapshot"):
        read_snapshot(evil)
    (tmp_path / "snapshots" / "step_000007.npz").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(RunRecordError, match="step_000007.npz"):
        read_snapshot(tmp_path / "snapshots" / "step_000007.npz")


def test_an_unreadable_snapshot_is_tried_again_then_skipped(tmp_path):
    run = RecordedRun(tmp_path / "run")
    (run.folder / "snapshots").mkdir()
    (run.folder / "snapshots" / "step_000001.npz").write_bytes(b"not yet complete")
    reader = RunRecordReader(run.folder)
    assert [reader.poll().warnings for _ in range(2)] == [[], []]  # perhaps still being copied
    assert reader.poll().warnings == ["snapshots/step_000001.npz: not a readable snapshot (File is not a zip "
                                      "file); skipped"]
    assert reader.poll().warnings == [] and reader.skipped == 1


def test_resume_cuts_the_record_back_and_overwrite_removes_it(tmp_path):
    run = RecordedRun(tmp_path / "run").run(4)
    run.finish("stopped", 4)
    (run.folder / "snapshots" / "notes.txt").write_text("the user's")
    assert truncate_run(run.folder, 2) == 3  # step 3, step 4 and step 4's validation
    solves = [json.loads(line)["step"] for line in (run.folder / "solves.jsonl").read_text().splitlines()]
    assert solves == [1, 1, 2, 2]
    assert sorted(p.name for p in (run.folder / "snapshots").iterdir()) == ["notes.txt", "step_000002.npz"]
    assert not (run.folder / "finished.json").exists()
    claim_run_dir(run.folder, overwrite=True)
    assert sorted(p.name for p in run.folder.rglob("*")) == ["notes.txt", "snapshots"]
    (run.folder / "snapshots" / "notes.txt").unlink()
    RecordedRun(run.folder).run(2)
    claim_run_dir(run.folder, overwrite=True)
    assert list(run.folder.iterdir()) == []  # the snapshots folder too, once empty


def test_the_reader_imports_no_torch():
    code = "import sys, engine.run_record; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# -- written by the trainer ---------------------------------------------------------------------
TINY = {"physics.img_size": 32, "physics.views": 12, "data.n_train": 4, "data.n_val": 1, "model.channels": 8,
        "model.depth": 1, "solver.max_iter": 15, "backward_solver.max_iter": 15, "optim.batch_size": 2,
        "run.threads": 1, "run.checkpoint_every": 0}


def test_the_trainers_record_replays_as_the_events_it_emitted(tmp_path):
    from engine.trainer import Trainer

    live: list = []
    config = builtin_config("ct_phantom_quick").replace(**TINY, **{"optim.steps": 2, "run.validate_every": 2,
                                                                   "jacobian.monitor_every": 1})
    Trainer(config, run_dir=tmp_path / "run", observers=Observers([live.append])).run()
    recorded = RunRecordReader(tmp_path / "run").poll().events

    def same(kind, *names):
        mine, theirs = [e for e in recorded if isinstance(e, kind)], [e for e in live if isinstance(e, kind)]
        assert len(mine) == len(theirs) > 0, kind
        for a, b in zip(mine, theirs):
            for name in names:
                assert getattr(a, name) == getattr(b, name), (kind, name)
        return mine, theirs

    same(StepFinished, "step", "losses", "lr", "seconds", "grad_norm")
    same(StabilityChecked, "step", "spectral_radius", "limit", "penalty_weight", "action")
    same(ValidationFinished, "step", "psnr", "ssim", "baseline_psnr", "equivariance_error", "domain")
    mine, theirs = same(SolveFinished, "step", "direction", "tag", "solver", "stop_reasons", "f_evals",
                        "tolerance_mode", "max_iter")
    for a, b in zip(mine, theirs):
        np.testing.assert_allclose(a.rel_residuals, b.rel_residuals, rtol=1e-5)
    mine, theirs = same(Snapshot, "step", "modality")
    for a, b in zip(mine, theirs):
        np.testing.assert_array_equal(a.reconstruction, b.reconstruction)
    same(CheckpointSaved, "step")
    same(RunFinished, "reason", "step")


def test_follow_a_run_written_by_a_subprocess(tmp_path):
    """``equideq train`` in another process; the reader follows its run directory while it trains."""
    config = tmp_path / "tiny.toml"
    save_config(builtin_config("ct_phantom_quick").replace(**TINY, **{"optim.steps": 4, "run.validate_every": 2}),
                config)
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "train", "--config", str(config), "--out",
                                str(run), "--quiet"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    polls = []
    try:
        deadline = time.monotonic() + 600  # ~10 s on 2 idle cores; generous for a loaded machine
        while not is_run_dir(run):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        reader = RunRecordReader(run)
        while not polls or polls[-1].finished is None:
            assert time.monotonic() < deadline, "the run did not finish in time"
            polls.append(reader.poll())
            time.sleep(0.1)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    # followed while it trained: steps arrived before the end did, not all at once at the end
    assert any(p.finished is None and any(isinstance(e, StepFinished) for e in p.events) for p in polls)
    events = [e for p in polls for e in p.events]
    assert [type(e) for e in events].count(RunStarted) == 1 and isinstance(events[-1], RunFinished)
    assert events[-1].reason == "completed" and events[-1].step == 4
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_records = [r for r in records if "validation" not in r]
    validations = [r["validation"] for r in records if "validation" in r]
    steps = [e for e in events if isinstance(e, StepFinished)]
    assert [e.step for e in steps] == [r["step"] for r in step_records] == [1, 2, 3, 4]
    assert [e.losses["total"] for e in steps] == [r["total"] for r in step_records]
    assert set(steps[0].losses) == {"mc", "mc_above_noise", "ei", "total", "jacobian"}
    seen_validations = [e for e in events if isinstance(e, ValidationFinished)]
    assert [(e.step, e.psnr) for e in seen_validations] == [(v["step"], v["psnr"]) for v in validations]
    assert [v["step"] for v in validations] == [0, 2, 4]
    snapshots = [e for e in events if isinstance(e, Snapshot)]
    files = sorted((run / "snapshots").iterdir())
    assert [e.step for e in snapshots] == [0, 2, 4] and [f.name for f in files] == [
        "step_000000.npz", "step_000002.npz", "step_000004.npz"]
    for event, file in zip(snapshots, files):
        with np.load(file, allow_pickle=False) as data:
            np.testing.assert_array_equal(event.reconstruction, data["reconstruction"])
            assert event.reconstruction.shape == (32, 32)
    solve_lines = (run / "solves.jsonl").read_text().splitlines()
    solves = [e for e in events if isinstance(e, SolveFinished)]
    assert len(solves) == len(solve_lines) == 4 * 4  # EI: two model calls, each a forward and a backward solve
    assert [e.step for e in solves] == [json.loads(line)["step"] for line in solve_lines]
    assert all(math.isfinite(e.seconds) and e.rel_residuals.shape[1] == 2 for e in solves)
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [4]
