"""Nothing lost, nothing torn: checkpoints saved from another thread while training runs, exact resume
from a validation step, metrics.jsonl after a resume, outputs that are never written over an input or
an existing file unasked, run folders that stay inside their root, and bad thread / device settings."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.atomic import temp_target
from engine.checkpoint import load_checkpoint
from engine.cli import main
from engine.config import ExperimentConfig, save_config
from engine.denoisers import save_denoiser_weights
from engine.errors import CheckpointError, ScanError
from engine.export import export_image
from engine.errors import EquiDEQError
from engine.events import Observers, RunControl, StepFinished
from engine.outputs import check_output_file, claim_run_dir, new_run_dir, run_folder_name, truncate_metrics
from engine.trainer import Trainer
from tests.test_trainer import params, tiny_config


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# -- commands into the training thread ------------------------------------------------------

def test_run_control_runs_commands_in_the_serving_thread_between_steps():
    control = RunControl()
    assert control.submit(lambda: threading.get_ident()).result() == threading.get_ident()  # idle: at once
    served = threading.Event()
    release = threading.Event()
    trainer_thread = {}

    def loop():
        with control.serving():
            trainer_thread["id"] = threading.get_ident()
            served.set()
            release.wait(5)
            control.wait_while_paused()

    worker = threading.Thread(target=loop)
    worker.start()
    served.wait(5)
    future = control.submit(lambda: threading.get_ident())
    assert not future.done()  # queued until the loop reaches a step boundary
    release.set()
    assert future.result(timeout=5) == trainer_thread["id"]
    worker.join(5)
    failing = control.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result()


def test_paused_run_still_serves_commands():
    control = RunControl()
    control.pause()
    done = threading.Event()

    def loop():
        with control.serving():
            control.wait_while_paused()
            done.set()

    worker = threading.Thread(target=loop)
    worker.start()
    assert control.submit(lambda: "saved").result(timeout=5) == "saved"
    assert not done.is_set()  # still paused
    control.resume()
    worker.join(5)
    assert done.is_set()


def test_checkpoints_saved_while_training_are_consistent(tmp_path):
    """Save from another thread as fast as possible; every file must hold one step's state exactly."""
    cfg = tiny_config(**{"optim.steps": 8, "run.validate_every": 100})
    truth: dict[int, tuple] = {}
    observers = Observers()
    trainer_box = {}

    def record(event):  # runs in the training thread, right after the optimiser step
        if isinstance(event, StepFinished):
            t = trainer_box["t"]
            moments = [s["exp_avg"].clone() for s in t.optimizer.state.values()]
            truth[event.step] = (params(t), moments, torch.get_rng_state().clone())

    observers.add(record)
    trainer = Trainer(cfg, run_dir=tmp_path / "run", observers=observers)
    trainer_box["t"] = trainer
    worker = threading.Thread(target=trainer.run)
    worker.start()
    saved = []
    while worker.is_alive() and len(saved) < 200:
        path = tmp_path / f"save_{len(saved):03d}.pt"
        trainer.save_checkpoint(path)
        saved.append(path)
    worker.join(60)
    assert len(saved) >= 3
    steps_seen = set()
    for path in saved:
        ckpt = load_checkpoint(path)
        if ckpt.step == 0:
            continue
        weights, moments, rng = truth[ckpt.step]
        flat = torch.cat([ckpt.model_state[k].reshape(-1) for k, _ in trainer.model.named_parameters()])
        assert torch.equal(flat, weights), f"{path.name}: weights are not those of step {ckpt.step}"
        stored = ckpt.optimizer_state["state"]
        assert all(int(stored[i]["step"]) == ckpt.step for i in stored)
        assert all(torch.equal(stored[i]["exp_avg"], m) for i, m in zip(sorted(stored), moments))
        assert torch.equal(ckpt.rng_state["torch"], rng)
        steps_seen.add(ckpt.step)
    assert steps_seen  # at least one mid-run state was checked


# -- resume ------------------------------------------------------------------------------------

def test_resume_from_a_validation_step_is_bit_exact_with_spectral_norm(tmp_path):
    cfg = tiny_config(**{"optim.steps": 12, "run.validate_every": 10, "run.checkpoint_every": 10,
                         "model.spectral_norm": True, "model.lipschitz": 0.99})
    straight = Trainer(cfg, run_dir=tmp_path / "straight")
    straight.run()
    resumed = Trainer(cfg, run_dir=tmp_path / "resumed", resume_from=tmp_path / "straight" / "checkpoint_000010.pt")
    assert resumed.step == 10
    resumed.run()
    assert [r["total"] for r in straight.history[10:]] == [r["total"] for r in resumed.history]
    assert torch.equal(params(straight), params(resumed))


def test_resume_in_the_same_folder_keeps_each_step_once_in_metrics(tmp_path):
    cfg = tiny_config(**{"optim.steps": 4, "run.checkpoint_every": 2, "run.validate_every": 2})
    run = tmp_path / "run"
    Trainer(cfg, run_dir=run).run()
    Trainer(cfg, run_dir=run, resume_from=run / "checkpoint_000002.pt").run()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "validation" not in r]
    val_steps = [r["validation"]["step"] for r in records if "validation" in r]
    assert train_steps == [1, 2, 3, 4]
    assert val_steps == [0, 2, 4]


def test_truncate_metrics_drops_later_and_torn_records(tmp_path):
    lines = [json.dumps({"step": 1}), json.dumps({"validation": {"step": 2}}), json.dumps({"step": 3}),
             '{"step": 4, "tot']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert truncate_metrics(tmp_path, 2) == 2
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [{"step": 1}, {"validation": {"step": 2}}]


# -- outputs -----------------------------------------------------------------------------------

def test_reconstruct_never_writes_over_its_input_or_an_existing_file(tmp_path, capsys):
    cfg = tiny_config(**{"optim.steps": 1})
    Trainer(cfg, run_dir=tmp_path / "run").run()
    ckpt = tmp_path / "run" / "last.pt"
    scan = tmp_path / "scan.npy"
    volume = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    np.save(scan, volume)

    code, _, err = run_cli(capsys, "reconstruct", "--checkpoint", str(ckpt), "--input", str(scan),
                           "--output", str(scan), "--overwrite")
    assert code == 2 and "refusing to overwrite an input" in error_line(err)
    assert np.array_equal(np.load(scan), volume)

    out = tmp_path / "out.npy"
    out.write_bytes(b"mine")
    code, _, err = run_cli(capsys, "reconstruct", "--checkpoint", str(ckpt), "--input", str(scan),
                           "--output", str(out))
    assert code == 2 and "--overwrite" in error_line(err) and out.read_bytes() == b"mine"
    code, _, _ = run_cli(capsys, "reconstruct", "--checkpoint", str(ckpt), "--input", str(scan),
                         "--output", str(out), "--overwrite")
    assert code == 0 and np.load(out).shape == (32, 32)


def test_train_refuses_an_existing_run_unless_overwrite_or_resume(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--quiet", "--set", "optim.steps=2", "--set", "run.checkpoint_every=1",
            *sum((["--set", f"{k}={v}"] for k, v in [("physics.img_size", 32), ("physics.views", 12),
                                                      ("model.channels", 8), ("model.depth", 1),
                                                      ("data.n_train", 4), ("data.n_val", 1)]), [])]
    assert run_cli(capsys, *args)[0] == 0
    assert (run / "checkpoint_000001.pt").is_file()
    before = (run / "metrics.jsonl").read_bytes()
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "--overwrite" in error_line(err)
    assert (run / "metrics.jsonl").read_bytes() == before  # untouched
    (run / "notes.txt").write_text("the user's")
    code, _, _ = run_cli(capsys, *[a if a != "optim.steps=2" else "optim.steps=1" for a in args], "--overwrite")
    assert code == 0
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_000001.pt"]  # step 2's is gone
    assert load_checkpoint(run / "last.pt").step == 1
    assert (run / "notes.txt").read_text() == "the user's"
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1 and 2 not in steps


def test_output_checks():
    with pytest.raises(EquiDEQError, match="is the input"):
        check_output_file("a/../scan.npy", ["scan.npy"])
    with pytest.raises(EquiDEQError, match="is a file"):
        claim_run_dir(Path(__file__))


def test_overwrite_removes_the_runs_files_and_their_temporary_files_only(tmp_path):
    ours = ["config.toml", "metrics.jsonl", "checkpoint_000002.pt", "last.safetensors", "last.pt.tmp",
            f".checkpoint_000004.pt.{os.getpid()}.0123abcd.tmp", ".config.toml.77.89abcdef.tmp",
            ".metrics.jsonl.77.fedcba98.tmp"]
    theirs = ["notes.txt", "checkpoint.txt", ".hidden.tmp", "my.pt.tmp", ".weights.pt.77.0123abcd.tmp"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    claim_run_dir(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


def _failing_replace(targets: list[Path]):
    def replace(src, dst):
        targets.append((Path(src), Path(dst)))
        raise OSError(errno.ENOSPC, "No space left on device")

    return replace


def test_every_engine_writer_goes_through_the_atomic_writer(tmp_path, monkeypatch):
    """Config, metrics, denoiser weights and exports: a temporary file named for the target, the old file
    kept and no temporary file left when the final move fails."""
    config, metrics = tmp_path / "config.toml", tmp_path / "metrics.jsonl"
    weights, export = tmp_path / "weights.safetensors", tmp_path / "slice.npy"
    for path in (config, weights, export):
        path.write_bytes(b"old")
    metrics.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n")
    old_metrics = metrics.read_bytes()
    moves: list[tuple[Path, Path]] = []
    monkeypatch.setattr(os, "replace", _failing_replace(moves))
    with pytest.raises(OSError, match="No space left"):
        save_config(ExperimentConfig(), config)
    with pytest.raises(OSError, match="No space left"):
        truncate_metrics(tmp_path, 1)
    with pytest.raises(CheckpointError, match="cannot write denoiser weights to .*No space left"):
        save_denoiser_weights(torch.nn.Linear(2, 2), weights)
    with pytest.raises(ScanError, match="cannot write .*slice.npy.*No space left"):
        export_image(np.zeros((4, 4)), export)
    monkeypatch.undo()
    assert [dst for _, dst in moves] == [config, metrics, weights, export]
    assert all(src.parent == dst.parent and temp_target(src.name) == dst.name for src, dst in moves)
    assert all(p.read_bytes() == b"old" for p in (config, weights, export))
    assert metrics.read_bytes() == old_metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (config, metrics, weights, export))


def test_run_names_stay_inside_the_root(tmp_path):
    assert run_folder_name("/../../..") == "run"
    assert run_folder_name("ct head/../x") == "ct_head_.._x"
    folder = new_run_dir(tmp_path, "../../etc/evil", "20261201-120000")
    assert folder == tmp_path / "20261201-120000-etc_evil"
    folder.mkdir()
    assert new_run_dir(tmp_path, "../../etc/evil", "20261201-120000").name == folder.name + "-1"


# -- threads and devices -------------------------------------------------------------------------

def test_bad_threads_and_missing_cuda_are_one_error_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--threads", "-1", "configs")
    assert code == 2 and "threads" in error_line(err)
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "r"), "--set", "run.device=cuda")
        assert code == 2 and "CUDA" in error_line(err)
