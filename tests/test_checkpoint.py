"""Checkpoints: exact round trips (.pt and .safetensors), resuming, atomic saves under SIGKILL,
refusal of malicious pickles, specific errors for bad files, config / state compatibility."""

from __future__ import annotations

import json
import os
import pickle
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine import __version__
from engine.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    atomic_write,
    capture_rng_state,
    check_compatible,
    check_state_matches,
    compare_configs,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from engine.config import ExperimentConfig
from engine.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
FORMATS = [".pt", ".safetensors"]
PHYSICS_TEXT = "8-view parallel-beam CT at 16x16"  # saved explicitly: keeps deepinv out of these tests


# -- helpers ---------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self, hidden: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(2, hidden)
        self.head = nn.Conv2d(hidden, 1, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))))


def small_config(**changes) -> ExperimentConfig:
    cfg = ExperimentConfig().replace(**{"physics.img_size": 16, "physics.views": 8, "model.channels": 8})
    return cfg.replace(**changes) if changes else cfg


def train(model, opt, sched, steps: int):
    for _ in range(steps):
        x = torch.randn(2, 1, 8, 8)
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        model.calls += 1


def make_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    return model, opt, sched


def trained_checkpoint(steps: int = 3) -> tuple[Checkpoint, nn.Module, torch.optim.Optimizer, object]:
    model, opt, sched = make_setup()
    train(model, opt, sched, steps)
    random.random()
    random.gauss(0, 1)  # leaves a cached gauss_next in Python's state
    np.random.standard_normal(3)
    ckpt = Checkpoint(
        model_state=model.state_dict(),
        config=small_config().to_dict(),
        step=steps,
        optimizer_state=opt.state_dict(),
        scheduler_state=sched.state_dict(),
        metrics={"loss": [0.5, 0.25, 0.125], "psnr": 31.5, "best_psnr": np.float64(32.25)},
        rng_state=capture_rng_state(),
        physics=PHYSICS_TEXT,
    )
    return ckpt, model, opt, sched


def assert_same(a, b, where="root"):
    """Exact structural equality: tensors bit-equal with the same dtype and shape, types preserved."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.cpu(), b.cpu()), where
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


# -- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_is_exact(tmp_path, suffix):
    ckpt, *_ = trained_checkpoint()
    ckpt.optimizer_state["param_groups"][0]["note"] = float("inf")  # non-JSON floats survive too
    path = save_checkpoint(tmp_path / f"run{suffix}", ckpt)
    assert path == tmp_path / f"run{suffix}"
    back = load_checkpoint(path)

    assert_same(dict(ckpt.model_state), back.model_state, "model_state")
    assert_same(ckpt.optimizer_state, back.optimizer_state, "optimizer_state")
    assert_same(ckpt.scheduler_state, back.scheduler_state, "scheduler_state")
    assert_same(ckpt.rng_state, back.rng_state, "rng_state")
    assert back.metrics == {"loss": [0.5, 0.25, 0.125], "psnr": 31.5, "best_psnr": 32.25}
    assert type(back.metrics["best_psnr"]) is float
    assert back.step == 3
    assert back.config == small_config().to_dict()
    assert back.physics == PHYSICS_TEXT
    assert back.software_version == __version__
    assert back.format_version == FORMAT_VERSION == 1
    assert datetime.fromisoformat(back.created).tzinfo is not None
    assert back.source == str(path) and back.name == path.name
    assert back.experiment_config() == small_config()
    assert isinstance(back.optimizer_state["param_groups"][0]["betas"], tuple)
    assert back.optimizer_state["state"][0]["step"].dtype == ckpt.optimizer_state["state"][0]["step"].dtype
    assert ckpt.created == ""  # the caller's object is not modified
    assert "step 3" in back.summary() and path.name in back.summary()


def test_pt_is_plain_and_loads_with_weights_only(tmp_path):
    ckpt, *_ = trained_checkpoint()
    path = save_checkpoint(tmp_path / "run.pt", ckpt)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "equideq-checkpoint" and raw["format_version"] == 1
    assert set(raw) >= {"config", "model_state", "optimizer_state", "scheduler_state", "rng_state",
                        "metrics", "step", "physics", "software_version", "created"}


def test_safetensors_layout(tmp_path):
    from safetensors import safe_open

    ckpt, *_ = trained_checkpoint()
    path = save_checkpoint(tmp_path / "run.safetensors", ckpt)
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        meta = fh.metadata()
    assert {f"model/{k}" for k in ckpt.model_state} <= keys
    assert "optimizer_state/state/0/exp_avg" in keys and "optimizer_state/state/0/step" in keys
    assert "rng_state/torch" in keys
    assert meta["format"] == "equideq-checkpoint" and meta["format_version"] == "1"
    doc = json.loads(meta["equideq"])
    assert doc["step"] == 3 and doc["model_keys"] == list(ckpt.model_state)
    assert doc["config"]["physics"]["views"] == 8


def test_physics_and_created_filled_from_config(tmp_path):
    ckpt = Checkpoint(model_state={"w": torch.ones(2)}, config=small_config().to_dict())
    back = load_checkpoint(save_checkpoint(tmp_path / "a.pt", ckpt))
    assert back.physics == "8-view parallel-beam CT at 16x16"
    assert back.created and back.step == 0 and back.optimizer_state is None and back.metrics == {}


def test_partial_config_is_stored_normalised(tmp_path):
    ckpt = Checkpoint(model_state={}, config={"physics": {"views": 60}}, physics="x")
    back = load_checkpoint(save_checkpoint(tmp_path / "a.safetensors", ckpt))
    assert back.config == ExperimentConfig().replace(**{"physics.views": 60}).to_dict()


@pytest.mark.parametrize("suffix", FORMATS)
def test_adam_resume_gives_identical_next_steps(tmp_path, suffix):
    ckpt, model, opt, sched = trained_checkpoint(steps=3)
    path = save_checkpoint(tmp_path / f"resume{suffix}", ckpt)
    train(model, opt, sched, 2)  # the uninterrupted run continues
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_lr = opt.param_groups[0]["lr"]

    back = load_checkpoint(path)
    model2, opt2, sched2 = make_setup(seed=123)  # different initial weights
    model2.load_state_dict(back.model_state)
    opt2.load_state_dict(back.optimizer_state)
    sched2.load_state_dict(back.scheduler_state)
    restore_rng_state(back.rng_state)
    train(model2, opt2, sched2, 2)
    for key, value in expected.items():
        assert torch.equal(model2.state_dict()[key], value), key
    assert opt2.param_groups[0]["lr"] == expected_lr
    assert float(opt2.state_dict()["state"][0]["step"]) == 5.0


@pytest.mark.parametrize("suffix", FORMATS)
def test_rng_state_restores_torch_python_numpy(tmp_path, suffix):
    random.gauss(0, 1)
    state = capture_rng_state()
    expected = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal())
    path = save_checkpoint(tmp_path / f"r{suffix}", Checkpoint({}, small_config().to_dict(), rng_state=state,
                                                               physics="x"))
    torch.rand(10), random.random(), np.random.rand(5)
    restore_rng_state(load_checkpoint(path).rng_state)
    again = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal())
    assert torch.equal(expected[0], again[0])
    assert expected[1:3] == again[1:3]
    np.testing.assert_array_equal(expected[3], again[3])
    assert expected[4] == again[4]


def test_save_refuses_unpicklable_objects_and_converts_numpy(tmp_path):
    base = dict(model_state={"w": torch.ones(1)}, config=small_config().to_dict(), physics="x")
    with pytest.raises(CheckpointError, match=r"metrics\['fn'\].*only tensors, numbers"):
        save_checkpoint(tmp_path / "a.pt", Checkpoint(**base, metrics={"fn": object()}))
    with pytest.raises(CheckpointError, match="config does not validate.*physics.views"):
        save_checkpoint(tmp_path / "a.pt", Checkpoint({"w": torch.ones(1)}, {"physics": {"views": 1}}))
    with pytest.raises(CheckpointError, match=r"a\.npz.*\.pt, \.pth, \.ckpt or \.safetensors"):
        save_checkpoint(tmp_path / "a.npz", Checkpoint(**base))
    with pytest.raises(CheckpointError, match="model_state"):
        save_checkpoint(tmp_path / "a.pt", Checkpoint(model_state={"w": np.ones(2)}, config={}, physics="x"))
    assert not list(tmp_path.iterdir())
    back = load_checkpoint(save_checkpoint(tmp_path / "a.pt", Checkpoint(
        **base, metrics={"hist": np.array([1.0, 2.0]), "n": np.int64(3)})))
    assert back.metrics == {"hist": [1.0, 2.0], "n": 3}


def test_map_location(tmp_path):
    ckpt, *_ = trained_checkpoint()
    for suffix in FORMATS:
        back = load_checkpoint(save_checkpoint(tmp_path / f"m{suffix}", ckpt), map_location=torch.device("cpu"))
        assert all(v.device.type == "cpu" for v in back.model_state.values())


# -- atomic writes -----------------------------------------------------------------------------

def test_failed_save_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "a.pt", Checkpoint({"w": torch.ones(3)}, small_config().to_dict(), step=1,
                                                         physics="x"))
    real_save = torch.save

    def failing_save(obj, fh, *args, **kwargs):
        real_save(obj, fh, *args, **kwargs)
        fh.truncate(fh.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="cannot write checkpoint.*No space left"):
        save_checkpoint(path, Checkpoint({"w": torch.zeros(3)}, small_config().to_dict(), step=2, physics="x"))
    assert load_checkpoint(path).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_atomic_write_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "f.bin") as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


_WRITER = textwrap.dedent("""
    import os, sys, time, io
    import torch
    from engine.checkpoint import Checkpoint, save_checkpoint
    from engine.config import ExperimentConfig

    targets, mode, step = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3])
    cfg = ExperimentConfig().to_dict()
    big = torch.empty(4_000_000)  # 16 MB per save

    def save_all(step):
        big.fill_(step)
        ckpt = Checkpoint(model_state={"w": big, "marker": torch.tensor(step)}, config=cfg, step=step,
                          physics="test", optimizer_state={"state": {0: {"m": big[:1000] * 2}}, "param_groups": []})
        for target in targets:
            save_checkpoint(target, ckpt)

    save_all(step)
    print(step, flush=True)
    if mode == "pause-in-write":      # the next save stops half-way through writing its bytes
        real_save = torch.save
        def half_save(obj, fh, *a, **k):
            buf = io.BytesIO(); real_save(obj, buf, *a, **k)
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2]); fh.flush(); os.fsync(fh.fileno())
            print("paused", flush=True); time.sleep(60)
        torch.save = half_save
    elif mode == "pause-before-replace":  # the next save stops after fsync, before os.replace
        real_replace = os.replace
        def slow_replace(src, dst):
            print("paused", flush=True); time.sleep(60); real_replace(src, dst)
        os.replace = slow_replace
    while True:
        step += 1
        save_all(step)
        print(step, flush=True)
""")


def _read_line(proc, deadline: float) -> str:
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.05)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            return line.strip()
        if proc.poll() is not None:
            break
    err = proc.stderr.read() if proc.poll() is not None else ""
    raise AssertionError(f"writer produced no output: {err[-2000:]}")


def _start_writer(script: Path, targets: list[Path], mode: str, step: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), ",".join(map(str, targets)), mode, str(step)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))


def _assert_consistent(path: Path, low: int, high: int) -> int:
    ckpt = load_checkpoint(path)  # must succeed: the previous complete version
    step = ckpt.step
    assert low <= step <= high, (path.name, step, low, high)
    assert int(ckpt.model_state["marker"]) == step  # one version throughout, never a mix
    w = ckpt.model_state["w"]
    assert w.numel() == 4_000_000 and float(w[0]) == float(w[-1]) == step
    assert torch.equal(ckpt.optimizer_state["state"][0]["m"], torch.full((1000,), 2.0 * step))
    return step


@pytest.mark.skipif(os.name != "posix", reason="uses SIGKILL and select on pipes")
def test_sigkill_during_saves_never_corrupts_the_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    targets = [tmp_path / "ckpt.pt", tmp_path / "ckpt.safetensors"]
    rng = random.Random(1234)
    kills_mid_save = 0

    # Kills at random moments of a save loop; a new writer starts at a higher step each time.
    for round_ in range(3):
        start = 1000 * (round_ + 1)
        proc = _start_writer(script, targets, "loop", start)
        try:
            last = int(_read_line(proc, time.monotonic() + 60))
            time.sleep(rng.uniform(0.0, 0.8))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        for line in proc.stdout.read().split():
            last = int(line)
        leftovers = list(tmp_path.glob(".ckpt.*.tmp"))
        kills_mid_save += bool(leftovers)
        for leftover in leftovers:
            leftover.unlink()
        for target in targets:
            _assert_consistent(target, last, last + 1)

    # Deterministic kills: half-way through writing the bytes, and after fsync but before os.replace.
    for round_, mode in enumerate(["pause-in-write", "pause-before-replace"]):
        start = 10_000 * (round_ + 1)
        proc = _start_writer(script, targets[:1], mode, start)
        try:
            assert int(_read_line(proc, time.monotonic() + 60)) == start
            assert _read_line(proc, time.monotonic() + 60) == "paused"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        temps = list(tmp_path.glob(".ckpt.pt.*.tmp"))
        assert len(temps) == 1 and temps[0].stat().st_size > 0  # the new bytes went to the temp file
        assert _assert_consistent(targets[0], start, start) == start  # the target is the old version
        temps[0].unlink()


# -- refusing malicious pickles ------------------------------------------------------------------

class _Payload:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_payload_is_really_malicious(tmp_path):
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(marker)))  # sanity check: unrestricted unpickling runs it
    assert marker.exists()


@pytest.mark.parametrize("container", ["torch.save", "pickle-p2", "pickle-p4", "pickle-p0", "torch-legacy"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"model_state": _Payload(marker), "config": {}, "format_version": 1}
    if container == "torch.save":
        torch.save(obj, path)
    elif container == "torch-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=int(container[-1])))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert not marker.exists(), "the pickle payload ran"
    assert "evil.pt" in message and "could run code" in message and "not loaded" in message
    assert "system" in message  # names what it would have called
    assert "\n" not in message


def test_malicious_safetensors_metadata_is_just_data(tmp_path):
    # A safetensors header is JSON, never unpickled: a pickle in it is only a string.
    from safetensors.torch import save_file

    marker = tmp_path / "pwned"
    doc = {"format_version": 1, "config": {}, "model_keys": [], "step": 0,
           "metrics": {"x": pickle.dumps(_Payload(marker), 0).decode("latin-1")}}
    save_file({"model/w": torch.ones(1)}, str(tmp_path / "s.safetensors"), metadata={"equideq": json.dumps(doc)})
    ckpt = load_checkpoint(tmp_path / "s.safetensors")
    assert isinstance(ckpt.metrics["x"], str) and not marker.exists()


# -- bad files -----------------------------------------------------------------------------------

def _good_raw(tmp_path) -> dict:
    return torch.load(save_checkpoint(tmp_path / "good.pt", Checkpoint(
        {"w": torch.arange(1000.0)}, small_config().to_dict(), physics="x")), weights_only=True)


def _bad_cases(tmp_path) -> dict:
    """name -> (path, [substrings the message must contain])"""
    cases = {}
    good = save_checkpoint(tmp_path / "good_st.safetensors", Checkpoint(
        {"w": torch.arange(1000.0)}, small_config().to_dict(), physics="x"))
    raw = _good_raw(tmp_path)
    data = (tmp_path / "good.pt").read_bytes()

    def put(name, content: bytes, *expect):
        p = tmp_path / name
        p.write_bytes(content)
        cases[name] = (p, list(expect))

    def put_torch(name, obj, *expect):
        p = tmp_path / name
        torch.save(obj, p)
        cases[name] = (p, list(expect))

    cases["missing.pt"] = (tmp_path / "missing.pt", ["not found"])
    put("empty.pt", b"", "empty")
    put("truncated.pt", data[: len(data) // 2], "truncated or corrupt")
    put("cut_tail.pt", data[:-7], "truncated or corrupt")
    put("truncated.safetensors", good.read_bytes()[:-100], "truncated or corrupt")
    put("random.pt", b"\x13\x37" + random.Random(0).randbytes(4094), "not a checkpoint")
    put("random_pickle.pt", b"\x80\x02" + bytes(range(7, 250)), "truncated or corrupt")
    put("text.safetensors", b"hello, this is not a checkpoint at all", "not a checkpoint")
    put_torch("bare_state_dict.pt", {"conv.weight": torch.ones(2), "conv.bias": torch.ones(1)},
              "not an EquiDEQ checkpoint", "missing keys: format_version, config, model_state", "bare")
    put_torch("no_config.pt", {k: v for k, v in raw.items() if k != "config"}, "missing keys: config")
    put_torch("a_list.pt", [torch.ones(1)], "not an EquiDEQ checkpoint", "list")
    put_torch("newer.pt", {**raw, "format_version": 2},
              "written by a newer EquiDEQ (format 2); this version reads format 1")
    bad_cfg = json.loads(json.dumps(raw["config"]))
    bad_cfg["solver"]["max_iter"] = 0
    put_torch("stale_range.pt", {**raw, "config": bad_cfg}, "no longer validates", "solver.max_iter must be >= 1")
    renamed = json.loads(json.dumps(raw["config"]))
    renamed["solver"]["tolerance"] = renamed["solver"].pop("tol")
    put_torch("stale_key.pt", {**raw, "config": renamed}, "no longer validates", "unknown config key 'solver.tolerance'")
    put_torch("bad_step.pt", {**raw, "step": "ten"}, "'step'", "integer")
    put_torch("bad_weights.pt", {**raw, "model_state": {"w": [1, 2]}}, "model_state", "not a tensor")

    from safetensors.torch import save_file

    doc = json.loads(json.dumps({k: v for k, v in raw.items() if k != "model_state"}))
    doc["format_version"] = 2
    save_file({"model/w": torch.ones(1)}, str(tmp_path / "newer.safetensors"),
              metadata={"format_version": "2", "equideq": json.dumps(doc)})
    cases["newer.safetensors"] = (tmp_path / "newer.safetensors", ["newer EquiDEQ (format 2)", "reads format 1"])
    save_file({"conv.weight": torch.ones(1)}, str(tmp_path / "bare.safetensors"))
    cases["bare.safetensors"] = (tmp_path / "bare.safetensors", ["not an EquiDEQ checkpoint", "missing keys"])
    save_file({"model/w": torch.ones(1)}, str(tmp_path / "badjson.safetensors"), metadata={"equideq": "{not json"})
    cases["badjson.safetensors"] = (tmp_path / "badjson.safetensors", ["metadata is corrupt"])
    (tmp_path / "folder.pt").mkdir()
    cases["folder.pt"] = (tmp_path / "folder.pt", ["folder"])
    return cases


def test_every_bad_checkpoint_raises_a_specific_one_line_error(tmp_path):
    for name, (path, expected) in _bad_cases(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert name in message, (name, message)
        assert "\n" not in message and len(message) < 400, (name, message)
        for fragment in expected:
            assert fragment in message, (name, fragment, message)


def test_experiment_config_reports_stale_config():
    ckpt = Checkpoint({}, {"solver": {"max_iter": 0}}, source="/runs/old.pt")
    with pytest.raises(CheckpointError, match=r"old\.pt: .*solver\.max_iter must be >= 1"):
        ckpt.experiment_config()


# -- compatibility with the current config and model ----------------------------------------------

def _cfg(**changes) -> ExperimentConfig:
    return ExperimentConfig().replace(**changes) if changes else ExperimentConfig()


def test_compare_configs_ct_views_message():
    trained = _cfg(**{"physics.views": 60, "physics.img_size": 128})
    current = _cfg(**{"physics.views": 30, "physics.img_size": 128})
    assert compare_configs(trained, current) == [
        "checkpoint was trained for 60-view CT at 128x128; current config is 30-view CT at 128x128"]


def test_compare_configs_each_relevant_field():
    base = _cfg()
    (size,) = compare_configs(base, _cfg(**{"physics.img_size": 256}))
    assert "30-view CT at 128x128" in size and "30-view CT at 256x256" in size
    (circle,) = compare_configs(base, _cfg(**{"physics.circle": True}))
    assert "inscribed circle" in circle
    (modality,) = compare_configs(base, _cfg(**{"physics.modality": "mri"}))
    assert modality == ("checkpoint was trained for 30-view CT at 128x128; current config is "
                        "4x-accelerated MRI with a random mask at 128x128")
    mri = _cfg(**{"physics.modality": "mri"})
    (accel,) = compare_configs(mri, mri.replace(**{"physics.acceleration": 8.0}))
    assert "4x-accelerated" in accel and "8x-accelerated" in accel
    (mask,) = compare_configs(mri, mri.replace(**{"physics.mask": "equispaced"}))
    assert "random mask" in mask and "equispaced mask" in mask
    (centre,) = compare_configs(mri, mri.replace(**{"physics.center_fraction": 0.04, "physics.mask_seed": 3}))
    assert "centre fraction 0.08, mask seed 0" in centre and "centre fraction 0.04, mask seed 3" in centre
    (channels,) = compare_configs(base, _cfg(**{"model.channels": 64}))
    assert channels == ("checkpoint was trained with a resunet denoiser (32 channels, depth 2, group norm, "
                        "spectral norm); current config has a resunet denoiser (64 channels, depth 2, "
                        "group norm, spectral norm)")
    for key, value, fragment in [("model.denoiser", "dncnn", "dncnn"), ("model.depth", 3, "depth 3"),
                                 ("model.norm", "none", "no norm"), ("model.spectral_norm", False, "no spectral")]:
        (diff,) = compare_configs(base, _cfg(**{key: value}))
        assert fragment in diff, (key, diff)
    two = compare_configs(base, _cfg(**{"physics.views": 90, "model.depth": 4}))
    assert len(two) == 2 and "90-view" in two[0] and "depth 4" in two[1]


def test_compare_configs_ignores_settings_that_keep_the_meaning():
    base = _cfg()
    other = _cfg(**{"solver.name": "broyden", "solver.tol": 1e-6, "optim.lr": 1e-3, "loss.mode": "mc",
                    "data.n_train": 8, "run.name": "x", "physics.noise_sigma": 0.05, "model.lipschitz": 0.9,
                    "physics.acceleration": 8.0})  # MRI settings do not matter for CT
    assert compare_configs(base, other) == []
    assert compare_configs(base, base) == []


def test_check_compatible(tmp_path):
    trained = _cfg(**{"physics.views": 60})
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "run_0200.pt", Checkpoint({}, trained.to_dict(), physics="x")))
    assert check_compatible(ckpt, trained.replace(**{"solver.tol": 1e-6})) == trained
    with pytest.raises(CheckpointError) as info:
        check_compatible(ckpt, _cfg(**{"physics.views": 30, "model.channels": 16}))
    message = str(info.value)
    assert message.startswith("run_0200.pt does not match the current config: (1) checkpoint was trained for "
                              "60-view CT at 128x128; current config is 30-view CT at 128x128; (2) ")
    assert "16 channels" in message and "Adopt the checkpoint's config" in message
    assert len(info.value.differences) == 2 and info.value.trained_config == trained


def test_check_state_matches():
    model = Tiny(hidden=4)
    check_state_matches(model.state_dict(), model)
    state = dict(model.state_dict())
    del state["conv.bias"]
    with pytest.raises(CheckpointError, match=r"run\.pt does not fit the model: key 'conv\.bias' is missing"):
        check_state_matches(state, model, name="run.pt")
    with pytest.raises(CheckpointError, match=r"unexpected key 'extra\.weight'$"):
        check_state_matches({**model.state_dict(), "extra.weight": torch.ones(1)}, model)
    with pytest.raises(CheckpointError) as info:
        check_state_matches(Tiny(hidden=8).state_dict(), model)
    assert ("'conv.weight' has shape [8, 1, 3, 3] in the checkpoint but [4, 1, 3, 3] in the model"
            in str(info.value))
    assert "more mismatches" in str(info.value)


def test_safetensors_whose_header_length_starts_with_the_pickle_opcode_is_read_as_safetensors(tmp_path):
    """The header length's low byte is 0x80 (pickle's PROTO opcode) for one checkpoint in 256."""
    import json
    import struct

    cfg = ExperimentConfig().to_dict()
    for pad in range(256):
        ckpt = Checkpoint(model_state={"w": torch.ones(3)}, config=cfg, step=1, physics="x" * (1 + pad))
        path = save_checkpoint(tmp_path / "c.safetensors", ckpt)
        header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
        if header_len & 0xFF == 0x80:
            break
    else:
        pytest.fail("no physics string gave a header length with low byte 0x80")
    assert json.loads(path.read_bytes()[8:8 + header_len])  # a genuine safetensors header
    back = load_checkpoint(path)
    assert back.physics == "x" * (1 + pad) and torch.equal(back.model_state["w"], torch.ones(3))
