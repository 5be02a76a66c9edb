"""Checkpoint and weights files that are hostile, damaged or unlucky (issue 10).

Each case ends, through the CLI run in-process, with exit code 2 and exactly
one ``error: ...`` line on stderr that names the file, never a traceback; the
library functions raise :class:`~engine.errors.CheckpointError`:

* a full disk inside ``torch.save`` (reported by PyTorch as ``RuntimeError:
  unexpected pos``) or while copying to ``last.pt``: the error names the target,
  no temporary file is left and the previous file is intact;
* a stride-0 ``as_strided`` view that claims 10^12 elements over one stored
  float (the finite check must not allocate its logical size), sparse and meta
  tensors;
* safetensors metadata JSON nested thousands of levels deep (``RecursionError``)
  or too large;
* ``--resume`` with a crafted optimiser / scheduler / model state;
* a negative, huge or non-integer ``step``;
* temporary files that killed saves left in a run folder are removed when the
  run folder is next trained in, and nothing else is;
* a checkpoint whose config names ``model.weights`` keeps working after that
  file moved (the checkpoint holds every weight).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import safety as ckpt_safety
from engine.checkpoint import format as ckpt_format
from engine.checkpoint import (Checkpoint, check_resume_state, load_checkpoint, publish_latest,
                               remove_stale_temp_files, save_checkpoint)
from engine.cli import main
from engine.config import ExperimentConfig, save_config
from engine.errors import CheckpointError
from engine.model import build_model

SIZE = 32


def tiny_config(**changes) -> ExperimentConfig:
    base = {"physics.img_size": SIZE, "physics.views": 12, "model.channels": 8, "model.depth": 1,
            "data.n_train": 4, "data.n_val": 1, "optim.steps": 1, "run.threads": 1,
            "solver.max_iter": 10, "backward_solver.max_iter": 10, "run.validate_every": 1000}
    base.update(changes)
    return ExperimentConfig().replace(**base)


def fresh_state(config: ExperimentConfig) -> dict:
    return {k: v.detach().clone() for k, v in build_model(config, load_weights=False).state_dict().items()}


def raw_content(tmp_path: Path, config: ExperimentConfig | None = None) -> dict:
    """The plain dict of a valid checkpoint, for crafting bad ones with ``torch.save``."""
    config = config or tiny_config()
    path = save_checkpoint(tmp_path / "raw_source.pt", Checkpoint(fresh_state(config), config.to_dict()))
    content = torch.load(path, weights_only=True)
    path.unlink()
    return content


def run_cli(argv, capsys) -> tuple[int, list[str], str]:
    """Run the CLI in-process: (exit code, stderr lines, stdout); a raw exception fails the test."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        pytest.fail(f"SystemExit({exc.code}) instead of an engine error")
    except BaseException as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"a raw {type(exc).__name__} escaped the CLI: {str(exc)[:300]}")
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err.splitlines(), captured.out


def assert_one_error(code: int, lines: list[str], culprit: str) -> str:
    assert code == 2, (code, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "slice.npy"
    np.save(path, np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32))
    return path


def evaluate_argv(ckpt: Path, data: Path) -> list:
    return ["evaluate", "--checkpoint", ckpt, "--data", data, "--json"]


# -- 1. a full disk inside torch.save ------------------------------------------------------------

def _failing_torch_save(error: BaseException):
    real_save = torch.save

    def save(obj, fh, *args, **kwargs):
        real_save(obj, fh, *args, **kwargs)  # a partial file, as a full disk leaves it
        fh.truncate(fh.tell() // 2)
        raise error

    return save


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos "
                                                "123 vs 456"),
                                   OSError(errno.ENOSPC, "No space left on device")],
                         ids=["unexpected-pos", "enospc"])
def test_disk_full_in_torch_save_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, error):
    config = tiny_config().to_dict()
    path = save_checkpoint(tmp_path / "a.pt", Checkpoint({"w": torch.ones(3)}, config, step=1, physics="x"))
    monkeypatch.setattr(torch, "save", _failing_torch_save(error))
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, Checkpoint({"w": torch.zeros(3)}, config, step=2, physics="x"))
    message = str(info.value)
    assert f"cannot write checkpoint {path}" in message and "\n" not in message
    if isinstance(error, RuntimeError):
        assert "is the disk full?" in message and "unexpected pos 123 vs 456" in message
        assert "enforce fail" not in message
    else:
        assert "No space left on device" in message
    monkeypatch.undo()
    assert load_checkpoint(path).step == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # and no temporary file is left


def test_a_runtime_error_that_is_not_a_write_failure_is_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _failing_torch_save(RuntimeError("DefaultCPUAllocator: can't allocate")))
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*b\.pt: DefaultCPUAllocator") as info:
        save_checkpoint(tmp_path / "b.pt", Checkpoint({"w": torch.ones(3)}, tiny_config().to_dict(), physics="x"))
    assert "disk full" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_train_with_a_full_disk_gives_one_error_line(tmp_path, monkeypatch, capsys):
    save_config(tiny_config(), tmp_path / "c.toml")
    monkeypatch.setattr(torch, "save", _failing_torch_save(RuntimeError("unexpected pos 123 vs 456")))
    code, lines, _ = run_cli(["train", "--config", tmp_path / "c.toml", "--out", tmp_path / "run", "--quiet"],
                             capsys)
    line = assert_one_error(code, lines, "checkpoint_000001.pt")
    assert "disk full" in line
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


# -- 2. tensors that claim more than they store ---------------------------------------------------

def test_stride_zero_view_is_refused_without_allocating_its_logical_size(tmp_path):
    huge = torch.zeros(1).as_strided((10**6, 10**6), (0, 0))  # 10^12 elements over one stored float
    raw = raw_content(tmp_path)
    key = next(iter(raw["model_state"]))
    torch.save({**raw, "model_state": {**raw["model_state"], key: huge}}, tmp_path / "strided.pt")
    assert (tmp_path / "strided.pt").stat().st_size < 10**6
    started = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "strided.pt")
    message = str(info.value)
    assert message.startswith("strided.pt: refused: tensor model_state[") and "expanded view" in message
    assert "[1000000, 1000000]" in message and "storage of 1" in message
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("where", ["optimizer_state", "rng_state", "metrics"])
def test_expanded_views_are_refused_in_every_field(tmp_path, where):
    raw = raw_content(tmp_path)
    view = torch.zeros(4).expand(10**5, 4)
    value = {"state": {0: {"exp_avg": view}}, "param_groups": []} if where == "optimizer_state" else {"x": view}
    torch.save({**raw, where: value}, tmp_path / f"view_{where}.pt")
    with pytest.raises(CheckpointError, match=rf"view_{where}\.pt: refused: tensor {where}\[.*expanded view"):
        load_checkpoint(tmp_path / f"view_{where}.pt")


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_sparse_and_meta_tensors_are_refused(tmp_path, kind):
    raw = raw_content(tmp_path)
    key = next(iter(raw["model_state"]))
    shape = raw["model_state"][key].shape
    if kind == "sparse":
        bad = torch.zeros(shape).to_sparse()
    else:
        bad = torch.empty(shape, device="meta")
    torch.save({**raw, "model_state": {**raw["model_state"], key: bad}}, tmp_path / f"{kind}.pt")
    with pytest.raises(CheckpointError, match=rf"{kind}\.pt: refused: tensor model_state\['{key}'\] is a"):
        load_checkpoint(tmp_path / f"{kind}.pt")


def test_writer_stores_expanded_views_densely(tmp_path):
    expanded = torch.arange(3.0).expand(4, 3)
    path = save_checkpoint(tmp_path / "e.pt", Checkpoint({"w": expanded}, tiny_config().to_dict(), physics="x"))
    back = load_checkpoint(path).model_state["w"]
    assert torch.equal(back, expanded) and back.is_contiguous()


def test_deeply_nested_pt_content_is_refused(tmp_path):
    raw = raw_content(tmp_path)
    nested: list = []
    for _ in range(200):
        nested = [nested]
    torch.save({**raw, "metrics": {"deep": nested}}, tmp_path / "deep.pt")
    with pytest.raises(CheckpointError, match=r"deep\.pt: refused: metrics is nested more than 64 levels"):
        load_checkpoint(tmp_path / "deep.pt")


def test_cli_refuses_a_stride_zero_checkpoint(tmp_path, data_file, capsys):
    raw = raw_content(tmp_path)
    key = next(iter(raw["model_state"]))
    huge = torch.zeros(1).as_strided((10**6, 10**6), (0, 0))
    torch.save({**raw, "model_state": {**raw["model_state"], key: huge}}, tmp_path / "strided.pt")
    code, lines, _ = run_cli(evaluate_argv(tmp_path / "strided.pt", data_file), capsys)
    assert "expanded view" in assert_one_error(code, lines, "strided.pt")


# -- 3. safetensors metadata -----------------------------------------------------------------------

def _safetensors_with_metadata(path: Path, document: str) -> Path:
    from safetensors.torch import save_file

    save_file({"model/w": torch.ones(1)}, str(path), metadata={"format_version": "1", "equideq": document})
    return path


def test_safetensors_metadata_nested_thousands_deep_is_refused(tmp_path):
    deep = '{"metrics": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = _safetensors_with_metadata(tmp_path / "nested.safetensors", deep)
    with pytest.raises(CheckpointError, match=r"nested\.safetensors: checkpoint metadata is corrupt \(its JSON is "
                                              r"nested more than 64 levels deep\)"):
        load_checkpoint(path)


def test_safetensors_metadata_nested_below_the_recursion_limit_is_refused(tmp_path):
    raw = raw_content(tmp_path)
    document = {k: v for k, v in raw.items() if k not in ("model_state", "optimizer_state", "scheduler_state",
                                                              "rng_state")}
    document["model_keys"] = ["w"]
    document["metrics"] = {"deep": json.loads("[" * 300 + "]" * 300)}
    path = _safetensors_with_metadata(tmp_path / "deep.safetensors", json.dumps(document))
    with pytest.raises(CheckpointError, match=r"deep\.safetensors: refused: metrics is nested more than 64"):
        load_checkpoint(path)


def test_safetensors_metadata_json_over_the_cap_is_refused(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path / "big.safetensors", Checkpoint({"w": torch.ones(2)}, tiny_config().to_dict(),
                                                                    physics="x"))
    monkeypatch.setattr(ckpt_safety, "MAX_METADATA_JSON", 100)
    with pytest.raises(CheckpointError, match=r"big\.safetensors: refused: its checkpoint metadata is \d+ "
                                              r"characters of JSON, more than the 100"):
        load_checkpoint(good)


def test_safetensors_header_over_the_cap_is_refused_before_reading_it(tmp_path):
    path = tmp_path / "hugeheader.safetensors"
    length = ckpt_safety.MAX_SAFETENSORS_HEADER + 1
    with open(path, "wb") as fh:  # sparse: the size is claimed, not written
        fh.write(struct.pack("<Q", length) + b"{")
        fh.seek(8 + length)
        fh.write(b"}")
    with pytest.raises(CheckpointError, match=rf"hugeheader\.safetensors: refused: its safetensors header is "
                                              rf"{length} bytes"):
        load_checkpoint(path)


def test_cli_refuses_nested_safetensors_metadata(tmp_path, data_file, capsys):
    path = _safetensors_with_metadata(tmp_path / "nested.safetensors", "[" * 50_000 + "]" * 50_000)
    code, lines, _ = run_cli(evaluate_argv(path, data_file), capsys)
    assert "nested" in assert_one_error(code, lines, "nested.safetensors")


# -- 4. --resume with a crafted optimiser / scheduler / model state ---------------------------------

def _trainer_like_states(config: ExperimentConfig):
    """A model, Adam and scheduler built as the trainer builds them, with one step of moments."""
    model = build_model(config, load_weights=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.optim.steps)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, scheduler


def _resume_checkpoint(tmp_path: Path, config: ExperimentConfig, name: str, mutate=None) -> Path:
    model, optimizer, scheduler = _trainer_like_states(config)
    ckpt = Checkpoint(model_state={k: v.detach().clone() for k, v in model.state_dict().items()},
                      config=config.to_dict(), step=1,
                      optimizer_state=copy.deepcopy(optimizer.state_dict()),
                      scheduler_state=dict(scheduler.state_dict()), metrics={"ei_weight": 1.0})
    path = save_checkpoint(tmp_path / name, ckpt)
    if mutate is not None:
        raw = torch.load(path, weights_only=True)
        mutate(raw)
        torch.save(raw, path)
    return path


def _first_state(raw) -> dict:
    return raw["optimizer_state"]["state"][0]


CRAFTED = {
    "moment-wrong-shape": (lambda r: _first_state(r).update(exp_avg=torch.zeros(5)),
                           "optimizer_state['state'][0]['exp_avg'] has shape [5] but its parameter has shape"),
    "state-not-a-dict": (lambda r: r["optimizer_state"].update(state=[1, 2]),
                         "optimizer_state['state'] should be a dict"),
    "state-missing-step": (lambda r: _first_state(r).pop("step"), "optimizer_state['state'][0] has no 'step'"),
    "state-of-unknown-parameter": (lambda r: r["optimizer_state"]["state"].update({9999: {}}),
                                   "optimizer_state['state'][9999] belongs to no parameter"),
    "group-missing-a-parameter": (lambda r: r["optimizer_state"]["param_groups"][0]["params"].pop(),
                                  "parameter group 0 holds"),
    "two-groups": (lambda r: r["optimizer_state"]["param_groups"].append(
        dict(r["optimizer_state"]["param_groups"][0])), "the optimiser state has 2 parameter groups"),
    "groups-not-a-list": (lambda r: r["optimizer_state"].update(param_groups="all"),
                          "optimizer_state['param_groups'] should be a list"),
    "lr-is-text": (lambda r: r["optimizer_state"]["param_groups"][0].update(lr="fast"),
                   "['lr'] should be a number"),
    "beta-of-one": (lambda r: r["optimizer_state"]["param_groups"][0].update(betas=(1.0, 0.999)),
                    "refused by Adam: Invalid beta parameter"),
    "no-eps": (lambda r: r["optimizer_state"]["param_groups"][0].pop("eps"), "has no 'eps'"),
    "scheduler-foreign-field": (lambda r: r["scheduler_state"].update(optimizer=0),
                                "scheduler_state has field 'optimizer'"),
    "scheduler-zero-period": (lambda r: r["scheduler_state"].update(T_max=0),
                              "scheduler_state['T_max'] should be positive"),
    "scheduler-base-lrs": (lambda r: r["scheduler_state"].update(base_lrs=[1e-3, 1e-3]),
                           "scheduler_state['base_lrs'] has 2 entries"),
    "model-weight-wrong-shape": (lambda r: r["model_state"].update(
        {next(k for k, v in r["model_state"].items() if v.ndim == 4): torch.zeros(2, 2, 3, 3)}),
        "does not fit the model"),
    "ei-weight-text": (lambda r: r["metrics"].update(ei_weight="big"), "metrics['ei_weight'] should be a number"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_resume_from_a_crafted_state_gives_one_error_line(tmp_path, capsys, case):
    config = tiny_config(**{"optim.steps": 3})
    save_config(config, tmp_path / "c.toml")
    mutate, expected = CRAFTED[case]
    path = _resume_checkpoint(tmp_path, config, f"{case}.pt", mutate)
    code, lines, _ = run_cli(["train", "--config", tmp_path / "c.toml", "--out", tmp_path / "run",
                              "--resume", path, "--quiet"], capsys)
    line = assert_one_error(code, lines, f"{case}.pt")
    assert expected in line, line


def test_check_resume_state_accepts_what_the_trainer_writes(tmp_path):
    from engine.trainer import Trainer

    config = tiny_config(**{"optim.steps": 2})
    trainer = Trainer(config)
    trainer.loss.alpha = 1.0  # what run() balances first
    trainer.train_step()
    assert trainer.optimizer.state_dict()["state"]  # Adam moments to check
    for suffix in (".pt", ".safetensors"):
        path = trainer.save_checkpoint(tmp_path / f"t{suffix}")
        check_resume_state(load_checkpoint(path), trainer.model, trainer.optimizer, trainer.scheduler)
    ok = _resume_checkpoint(tmp_path, config, "ok.pt")
    model, optimizer, scheduler = _trainer_like_states(config)
    check_resume_state(load_checkpoint(ok), model, optimizer, scheduler)


# -- 5. the step count ------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [-5, 2**70, 2.5, "ten", True], ids=["negative", "huge", "float", "text", "bool"])
def test_invalid_step_is_refused(tmp_path, step):
    raw = raw_content(tmp_path)
    torch.save({**raw, "step": step}, tmp_path / "step.pt")
    with pytest.raises(CheckpointError, match=r"step\.pt: field 'step' should be"):
        load_checkpoint(tmp_path / "step.pt")


def test_negative_step_in_safetensors_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "s.safetensors", Checkpoint({"w": torch.ones(2)}, tiny_config().to_dict(),
                                                                  physics="x"))
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    document = json.loads(metadata["equideq"])
    document["step"] = -5
    save_file(tensors, str(path), metadata={**metadata, "equideq": json.dumps(document)})
    with pytest.raises(CheckpointError, match=r"s\.safetensors: field 'step' should be a step count from 0 to"):
        load_checkpoint(path)


def test_cli_refuses_a_negative_step(tmp_path, data_file, capsys):
    raw = raw_content(tmp_path)
    torch.save({**raw, "step": -5}, tmp_path / "minus5.pt")
    code, lines, _ = run_cli(evaluate_argv(tmp_path / "minus5.pt", data_file), capsys)
    assert "-5" in assert_one_error(code, lines, "minus5.pt")


# -- 6. temporary files after a kill; a full disk while copying to last.pt ------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(path: Path, seconds: float = 3600) -> Path:
    old = time.time() - seconds
    os.utime(path, (old, old))
    return path


def _stale_and_keep(folder: Path) -> tuple[list[Path], list[Path]]:
    """(stale temporary files of ours, files that must stay) in ``folder``."""
    dead = _dead_pid()
    stale = [folder / f".checkpoint_000004.pt.{dead}.0123abcd.tmp", folder / f".last.pt.{dead}.89abcdef.tmp",
             folder / "last.pt.tmp", folder / "last.safetensors.tmp", folder / f".weights.pt.{dead}.tmp",
             folder / f".checkpoint_000002.pt.{os.getpid()}.00000000.tmp"]  # our pid, from before we started
    keep = [folder / "notes.tmp", folder / ".hidden.tmp", folder / "my.pt.tmp", folder / "last.pt.tmp.bak",
            folder / f".checkpoint_000004.pt.{os.getppid()}.0123abcd.tmp",  # its writer is alive
            folder / f".other.{dead}.nothex!.tmp"]
    for path in stale + keep:
        path.write_bytes(b"partial")
        _age(path)
    fresh = folder / f".checkpoint_000006.pt.{dead}.fedcba98.tmp"  # written after this process started
    fresh.write_bytes(b"in progress")
    keep.append(fresh)
    (folder / f".dir.pt.{dead}.0123abcd.tmp").mkdir()
    keep.append(folder / f".dir.pt.{dead}.0123abcd.tmp")
    target = folder / "user_data.bin"
    target.write_bytes(b"user")
    link = folder / f".link.pt.{dead}.0123abcd.tmp"
    link.symlink_to(target)
    keep += [target, link]
    return stale, keep


def test_remove_stale_temp_files_removes_only_ours(tmp_path):
    stale, keep = _stale_and_keep(tmp_path)
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() or p.is_symlink() for p in keep)
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_training_in_a_run_folder_cleans_stale_temp_files(tmp_path, capsys):
    config = tiny_config(**{"optim.steps": 2, "run.checkpoint_every": 1})
    save_config(config, tmp_path / "c.toml")
    run = tmp_path / "run"
    code, _, _ = run_cli(["train", "--config", tmp_path / "c.toml", "--out", run, "--quiet",
                          "--set", "optim.steps=1"], capsys)
    assert code == 0
    stale, keep = _stale_and_keep(run)  # what a kill during the next saves would leave
    code, lines, _ = run_cli(["train", "--config", tmp_path / "c.toml", "--out", run, "--quiet",
                              "--resume", run / "last.pt"], capsys)
    assert code == 0, lines
    assert not any(p.exists() for p in stale)
    assert all(p.exists() or p.is_symlink() for p in keep)
    assert load_checkpoint(run / "last.pt").step == 2


def _disk_full_after(n: int):
    def copy(src, dst):
        dst.write(src.read(n))
        raise OSError(errno.ENOSPC, "No space left on device")

    return copy


def test_publish_latest_on_a_full_disk_names_last_pt_and_keeps_it(tmp_path, monkeypatch):
    config = tiny_config().to_dict()
    old = save_checkpoint(tmp_path / "checkpoint_000001.pt", Checkpoint({"w": torch.ones(3)}, config, step=1,
                                                                         physics="x"))
    latest = publish_latest(old, tmp_path / "last.pt")
    assert latest.read_bytes() == old.read_bytes()
    new = save_checkpoint(tmp_path / "checkpoint_000002.pt", Checkpoint({"w": torch.zeros(3)}, config, step=2,
                                                                         physics="x"))
    monkeypatch.setattr(ckpt_format, "_copy_file_contents", _disk_full_after(100))
    with pytest.raises(CheckpointError) as info:
        publish_latest(new, tmp_path / "last.pt")
    message = str(info.value)
    assert message == (f"cannot update last.pt in {tmp_path} (copying checkpoint_000002.pt): "
                       "No space left on device")
    assert load_checkpoint(tmp_path / "last.pt").step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000001.pt", "checkpoint_000002.pt",
                                                          "last.pt"]


def test_cli_train_with_a_full_disk_while_copying_to_last_pt(tmp_path, monkeypatch, capsys):
    save_config(tiny_config(), tmp_path / "c.toml")
    monkeypatch.setattr(ckpt_format, "_copy_file_contents", _disk_full_after(10))
    run = tmp_path / "run"
    code, lines, _ = run_cli(["train", "--config", tmp_path / "c.toml", "--out", run, "--quiet"], capsys)
    line = assert_one_error(code, lines, f"cannot update last.pt in {run}")
    assert ".tmp" not in line and "No space left on device" in line
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


# -- 7. a checkpoint outlives its denoiser weights file ------------------------------------------------

def test_checkpoint_works_after_its_denoiser_weights_file_moved(tmp_path, data_file, capsys):
    from engine.denoisers import build_denoiser, save_denoiser_weights
    from engine.physics import image_channels

    base = tiny_config(**{"optim.steps": 2})
    weights = tmp_path / "denoiser.pt"
    save_denoiser_weights(build_denoiser(base.model, image_channels(base.physics)), weights)
    config = base.replace(**{"model.weights": str(weights)})
    save_config(config, tmp_path / "c.toml")
    trained = _resume_checkpoint(tmp_path, config, "trained.pt")
    shutil.move(weights, tmp_path / "moved.pt")

    code, lines, out = run_cli(evaluate_argv(trained, data_file), capsys)
    assert code == 0 and not lines, lines
    assert json.loads(out)["images"] == 1
    code, lines, _ = run_cli(["train", "--config", tmp_path / "c.toml", "--out", tmp_path / "run", "--quiet",
                              "--resume", trained], capsys)
    assert code == 0, lines
    assert load_checkpoint(tmp_path / "run" / "last.pt").step == 2
    # a new run (no checkpoint) still needs the file, and says so
    code, lines, _ = run_cli(["train", "--config", tmp_path / "c.toml", "--out", tmp_path / "run2", "--quiet"],
                             capsys)
    assert "denoiser weights file not found" in assert_one_error(code, lines, "denoiser.pt")


def test_load_model_does_not_read_model_weights(tmp_path, monkeypatch):
    from engine import denoisers
    from engine.inference import load_model

    config = tiny_config(**{"model.weights": str(tmp_path / "gone.pt")})
    path = save_checkpoint(tmp_path / "k.pt", Checkpoint(fresh_state(config), config.to_dict()))

    def no_reads(*args, **kwargs):
        raise AssertionError("a weights file was read while loading a checkpoint")

    monkeypatch.setattr(denoisers, "load_denoiser_weights", no_reads)
    monkeypatch.setattr("engine.model.load_denoiser_weights", no_reads)
    loaded = load_model(path)
    state = load_checkpoint(path).model_state
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
