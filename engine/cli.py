"""``equideq``: the headless command line, on the same engine as the workbench.

    equideq train --config FILE --out RUN_DIR [--resume CKPT] [--set KEY=VALUE ...]
    equideq evaluate --checkpoint CKPT --data PATH [--size native|N] [--json]
    equideq reconstruct --checkpoint CKPT --input SCAN --output FILE [--size native|N]
    equideq demo [--out RUN_DIR]
    equideq check-gradients [--json]
    equideq diagnose [--checkpoint CKPT] [--input SCAN] [--solver NAME] [--make-it-diverge] [--json]
    equideq pretrain --config FILE --output WEIGHTS [--steps N]
    equideq configs
    equideq --version

Every user-caused failure (bad file, bad config, mismatched checkpoint,
diverged run, a file-system refusal) ends with one line ``error: ...`` on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _parse_value(text: str):
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except Exception:
        return text


def _config_with_overrides(path: Optional[str], overrides: Sequence[str]):
    from engine.config import builtin_config, load_config

    if path is None:
        config = builtin_config("ct_phantom_quick")
    elif Path(path).suffix == "" and not Path(path).exists():
        config = builtin_config(path)
    else:
        config = load_config(path)
    changes = _parse_sets(overrides)
    return config.replace(**changes) if changes else config


def _parse_sets(overrides: Sequence[str]) -> dict:
    """``["solver.tol=1e-5", ...]`` -> ``{"solver.tol": 1e-05}`` (values parsed as TOML, else strings)."""
    from engine.errors import ConfigError

    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. solver.tol=1e-5), got '{item}'")
        changes[key.strip()] = _parse_value(value.strip())
    return changes


class _ProgressPrinter:
    """Turns engine events into a tqdm bar and log lines."""

    def __init__(self, total: int, start: int = 0, quiet: bool = False):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, unit="step", disable=quiet, dynamic_ncols=True)
        self.quiet = quiet
        self.failure: Optional[str] = None

    def __call__(self, event) -> None:
        from engine import events as ev

        if isinstance(event, ev.StepFinished):
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in event.losses.items()})
        elif isinstance(event, ev.ValidationFinished):
            if event.domain == "measurement":
                self.bar.write(f"step {event.step}: measurement-domain PSNR (A x vs y) {event.psnr:.2f} dB "
                               f"(baseline {event.baseline_psnr:.2f}), equivariance error "
                               f"{event.equivariance_error:.2e}")
            else:
                self.bar.write(f"step {event.step}: PSNR {event.psnr:.2f} dB (baseline {event.baseline_psnr:.2f}), "
                               f"SSIM {event.ssim:.3f}, equivariance error {event.equivariance_error:.2e}")
        elif isinstance(event, ev.LogMessage):
            if not self.quiet or event.level != "info":
                self.bar.write(f"{event.level}: {event.message}")
        elif isinstance(event, ev.CheckpointSaved):
            if not self.quiet:
                self.bar.write(f"checkpoint: {event.path}")
        elif isinstance(event, ev.RunFailed):
            self.failure = event.message

    def close(self) -> None:
        self.bar.close()


def _install_stop_handlers(control) -> None:
    """Ctrl-C / SIGTERM stop the run after the current step (a checkpoint is written)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        if control.stopped:
            raise KeyboardInterrupt
        print("\nstopping after this step (again to abort)...", file=sys.stderr)
        control.stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def cmd_train(args) -> int:
    from engine import distributed
    from engine.events import Observers, RunControl
    from engine.trainer import Trainer

    config = _config_with_overrides(args.config, args.set)
    control = RunControl()
    observers = Observers()
    # under torchrun: join the process group; rank 0 alone writes the run directory and prints
    joined = distributed.setup(config.run.device)
    context, device = joined if joined is not None else (None, None)
    main_rank = context is None or context.is_main  # the others print nothing: rank 0 reports for all
    try:
        # the bar starts after the set-up succeeded, so a set-up error is the only line on stderr
        trainer = Trainer(config, run_dir=args.out, observers=observers, control=control, resume_from=args.resume,
                          overwrite=getattr(args, "overwrite", False), device=device, distributed=context)
        printer = _ProgressPrinter(config.optim.steps, start=trainer.step, quiet=args.quiet or not main_rank)
        if main_rank:
            observers.add(printer)
        _install_stop_handlers(control)
        try:
            reason = trainer.run()
        finally:
            printer.close()
    except BaseException:
        if joined is not None:
            distributed.teardown(barrier=False)  # the others may wait in a collective: leave, do not wait
        raise
    if joined is not None:
        distributed.teardown()
    if not main_rank:
        return 0 if reason == "completed" else (EXIT_USER_ERROR if reason == "failed" else EXIT_INTERRUPTED)
    if reason == "failed":
        _err(printer.failure or "training failed")
        return EXIT_USER_ERROR
    print(f"{reason} at step {trainer.step}; run directory: {args.out}")
    if trainer.last_validation:
        v = trainer.last_validation
        if v.get("domain") == "measurement":
            print(f"validation (no reference images): measurement-domain PSNR {v['psnr']:.2f} dB "
                  f"(baseline {v['baseline_psnr']:.2f} dB), residual ||Ax - y||/||y|| {v['residual']:.3g}")
        else:
            print(f"validation PSNR {v['psnr']:.2f} dB (baseline {v['baseline_psnr']:.2f} dB), SSIM {v['ssim']:.3f}")
    return 0 if reason == "completed" else EXIT_INTERRUPTED


def _scan_images(path: str, size: int, window=None, scan=None):
    """(image slices [N, size, size] in [0, 1], the first scan) of a scan file or folder (see :func:`_load_inputs`)."""
    scans = [scan] if scan is not None else _load_inputs(path)
    return _prepared(scans, size, window), scans[0]


def _load_inputs(path: str) -> list:
    """The scans in ``path``: one for a file or a DICOM series folder, one per file of a folder of scan files."""
    from engine.data import load_scan
    from engine.errors import ScanError

    target = Path(path)
    if target.is_dir() and not any(p.suffix.lower() == ".dcm" or p.suffix == "" for p in target.iterdir()):
        scans = [load_scan(item) for item in sorted(target.iterdir()) if item.is_file()]
        if not scans:
            raise ScanError(f"{path}: no scan files found")
        return scans
    return [load_scan(target)]


def _prepared(scans: list, size: int, window=None):
    import numpy as np

    from engine.data import prepare_slices

    stacks = [prepare_slices(scan, size, window=window) for scan in scans]
    return stacks[0] if len(stacks) == 1 else np.concatenate(stacks)


def _size_range() -> tuple[int, int]:
    """The image sides the engine reconstructs: physics.img_size's range."""
    from dataclasses import fields

    from engine.config import PhysicsConfig

    meta = next(f.metadata for f in fields(PhysicsConfig) if f.name == "img_size")
    return int(meta["min"]), int(meta["max"])


def _size_option(text: str):
    """``--size``: ``native`` or a number of pixels."""
    if text.strip().lower() == "native":
        return "native"
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'native' or a number of pixels, got {text!r}") from None
    low, high = _size_range()
    if not low <= size <= high:
        raise argparse.ArgumentTypeError(f"must be {low}..{high} pixels, got {size}")
    return size


def _image_size(scans: list, choice, model_size: int) -> int:
    """The side to reconstruct image scans at: the model's (no ``--size``), a number, or the scans' own."""
    from engine.data import native_size
    from engine.errors import ScanError

    if choice is None:
        return model_size
    if choice != "native":
        return int(choice)
    sizes = sorted({native_size(scan) for scan in scans})
    if len(sizes) > 1:
        raise ScanError(f"--size native: the scans have different sizes ({', '.join(map(str, sizes))} px); "
                        "give --size N")
    size, (low, high) = sizes[0], _size_range()
    if not low <= size <= high:
        raise ScanError(f"{Path(scans[0].source).name}: --size native is {size} px, outside the "
                        f"{low}..{high} px the engine reconstructs; give --size N")
    return size


def _modality_notes(scans: list, loaded, force: bool) -> list:
    """Notes for scans whose modality is unknown; ScanError for one of another modality unless ``force``."""
    from engine.errors import ScanError
    from engine.inference import check_modality

    owner = f"checkpoint {Path(loaded.source).name}"
    notes = []
    for scan in scans:
        check = check_modality(scan, loaded.modality, owner)
        if check.relation == "different" and not force:
            raise ScanError(f"{check.message}; use a model of that modality, or pass --force-modality to "
                            "reconstruct it anyway")
        if check.message:
            notes.append(check.message + (" (--force-modality)" if check.relation == "different" else ""))
    return list(dict.fromkeys(notes))


def _print_notes(notes) -> None:
    for note in dict.fromkeys(notes):
        print(f"note: {note}", file=sys.stderr)


def _measured_input(path: str, loaded, size_choice=None):
    """(Measurements or None, Scan or None, the model at their size): the measurements when ``path`` is a file of
    raw measurements (k-space / sinogram), at the size ``--size`` asks for (:func:`engine.measured.measured_image_size`);
    the loaded scan of any other file (None for folders) and ``loaded`` itself."""
    from engine.data import load_scan
    from engine.data.measurements import MEASUREMENT_KINDS
    from engine.measured import check_measurement_kind, measured_image_size, measurements_from_scan

    target = Path(path)
    if not target.is_file():
        return None, None, loaded
    scan = load_scan(target)
    if scan.kind not in MEASUREMENT_KINDS:
        return None, scan, loaded
    owner = f"checkpoint {Path(loaded.source).name}"
    check_measurement_kind(scan, loaded.config.physics, owner)
    if size_choice is not None:
        loaded = loaded.at_size(measured_image_size(scan, loaded.config.physics,
                                                    None if size_choice == "native" else size_choice))
    return measurements_from_scan(scan, loaded.config.physics, owner=owner), scan, loaded


def cmd_evaluate(args) -> int:
    from engine.inference import load_model

    loaded = load_model(args.checkpoint)
    # measured data, or images to simulate y from
    source, scan, loaded = _measured_input(args.data, loaded, args.size)
    notes = []
    if source is None:
        scans = [scan] if scan is not None else _load_inputs(args.data)
        notes = _modality_notes(scans, loaded, args.force_modality)
        loaded = loaded.at_size(_image_size(scans, args.size, loaded.size))
        source = _prepared(scans, loaded.size, window=list(loaded.config.data.window) or None)
    result = loaded.evaluate(source, seed=args.seed).to_dict()
    result["image_size"] = loaded.size
    if args.json:  # stdout is the one JSON object, and the notes are in it
        result["notes"] = list(dict.fromkeys(list(result.get("notes", [])) + notes))
        print(json.dumps(result))
        return 0
    m, b = result["model"], result["baseline"]
    if result["domain"] == "measurement":
        print(f"{result['images']} measured slice(s) from {args.data}, no reference images: "
              "measurement-domain metrics (PSNR of A x against the measured y)")
    else:
        print(f"{result['images']} image(s) from {args.data} at {loaded.size}x{loaded.size}")
    print(f"{'':12s} {'PSNR (dB)':>10s} {'SSIM':>8s}")
    print(f"{'DEQ':12s} {m['psnr']:10.2f} {m['ssim']:8.4f}")
    print(f"{b['method']:12s} {b['psnr']:10.2f} {b['ssim']:8.4f}")
    print(f"equivariance error: reconstructor {result['equivariance_error']:.3e}, "
          f"operator at fixed point {result['operator_equivariance_error']:.3e}")
    for note in result.get("notes", []):
        print(f"note: {note}")
    _print_notes(notes)
    return 0


def _check_slice(index: int, count: int) -> None:
    if not 0 <= index < count:
        from engine.errors import ScanError

        raise ScanError(f"--slice {index} is outside 0..{count - 1}")


def cmd_reconstruct(args) -> int:
    from engine.data import scan_hu_window, to_hu
    from engine.export import export_image
    from engine.inference import load_model
    from engine.outputs import check_output_file

    check_output_file(args.output, [args.input, args.checkpoint], overwrite=args.overwrite)
    loaded = load_model(args.checkpoint)
    description = f"EquiDEQ DEQ reconstruction ({loaded.config.deq.gradient})"
    meas, scan, loaded = _measured_input(args.input, loaded, args.size)
    notes, source_slice = [], None
    if meas is not None:  # reconstruct from the stored measurements, not simulated ones
        index = args.slice if args.slice is not None else len(meas) // 2
        _check_slice(index, len(meas))
        result = loaded.reconstruct(meas, indices=[index])
        description += " from measured data"
        image, units, window = result.reconstruction[0], "normalised", (0.0, 1.0)
    else:  # y simulated from the one slice, seeded
        scans = [scan] if scan is not None else _load_inputs(args.input)
        notes = _modality_notes(scans, loaded, args.force_modality)
        loaded = loaded.at_size(_image_size(scans, args.size, loaded.size))
        intensity_window = list(loaded.config.data.window) or None
        images = _prepared(scans, loaded.size, window=intensity_window)
        index = args.slice if args.slice is not None else images.shape[0] // 2
        _check_slice(index, images.shape[0])
        result = loaded.reconstruct(images[index:index + 1])
        scan = scans[0]
        source_slice = index if len(scans) == 1 else None  # a slice of one scan: its geometry and UIDs
        hu_window = scan_hu_window(scan, intensity_window)
        if hu_window is not None:  # back to Hounsfield units through the window that made [0, 1]
            image, units, window = to_hu(result.reconstruction[0], hu_window), "HU", hu_window
        else:
            image, units, window = result.reconstruction[0], "normalised", (0.0, 1.0)
    export_image(image, args.output, window=window, source_scan=scan, source_slice=source_slice, units=units,
                 description=description, checkpoint_name=Path(args.checkpoint).name)
    size = f"{loaded.size}x{loaded.size}"
    if meas is not None:
        kind = "PSNR" if result.domain == "image" else "measurement-domain PSNR"
        print(f"slice {index} (measured) at {size}: {kind} {float(result.psnr[0]):.2f} dB "
              f"(baseline {float(result.baseline_psnr[0]):.2f} dB), residual ||Ax - y||/||y|| "
              f"{float(result.residual[0]):.3g} -> {args.output}")
        for note in dict.fromkeys(meas.notes):
            print(f"note: {note}")
    else:
        print(f"slice {index} at {size}: PSNR {float(result.psnr[0]):.2f} dB "
              f"(baseline {float(result.baseline_psnr[0]):.2f} dB) -> {args.output} ({units})")
    _print_notes(notes)
    return 0


def cmd_diagnose(args) -> int:
    from engine.config import builtin_config
    from engine.data.phantoms import phantom_batch
    from engine.diagnostics import MAKE_IT_DIVERGE
    from engine.diagnostics.inspect import TRAINING_SECTIONS, apply_settings, inspect, record_forward
    from engine.errors import ConfigError
    from engine.inference import load_model, model_from_config

    changes = dict(MAKE_IT_DIVERGE) if args.make_it_diverge else {}
    if args.solver:
        changes["solver.name"] = args.solver
    changes.update(_parse_sets(args.set))
    if args.checkpoint:
        loaded = load_model(args.checkpoint)
        config = loaded.config.replace(**changes) if changes else loaded.config  # validates every value
        fixed = [k for k in apply_settings(loaded.model, changes) if k.split(".")[0] not in TRAINING_SECTIONS]
        if fixed:
            raise ConfigError(f"{', '.join(fixed)}: a trained checkpoint's model and physics are fixed; "
                              "diagnose changes only solver.*, backward_solver.*, deq.stepsize and deq.relaxation")
    else:  # the built-in model, built with the changes
        config = builtin_config(args.config or "ct_phantom_quick")
        config = config.replace(**changes) if changes else config
        loaded = model_from_config(config)
    if args.input:
        meas, scan, _ = _measured_input(args.input, loaded)
        if meas is not None:
            index = args.slice if args.slice is not None else len(meas) // 2
            _check_slice(index, len(meas))
            problem = loaded.problem(meas, indices=[index])
        else:
            images, _ = _scan_images(args.input, loaded.size, window=list(loaded.config.data.window) or None,
                                     scan=scan)
            index = args.slice if args.slice is not None else images.shape[0] // 2
            _check_slice(index, images.shape[0])
            problem = loaded.problem(images[index:index + 1], seed=args.seed)
        what = f"slice {index} of {Path(args.input).name}"
    else:
        problem = loaded.problem(phantom_batch("shepp_logan", 1, loaded.size, seed=args.seed), seed=args.seed)
        what = "a Shepp-Logan phantom"
    rec = record_forward(loaded.model, problem.y, problem.physics, tag=what)
    result = inspect(loaded.model, problem.physics, rec, 0, config=config)
    if args.json:
        print(json.dumps({**result.to_dict(), "input": what, "changes": changes}))
        return 0
    s = rec.summary(0)
    source = Path(args.checkpoint).name if args.checkpoint else "the built-in default model"
    print(f"{s['solver']} forward solve of {what} ({loaded.size}x{loaded.size}, {source})")
    if changes:
        print("settings changed: " + ", ".join(f"{k}={v!r}" for k, v in changes.items()))
    print(f"  stop reason {s['stop_reason']} after {s['iterations']} iterations (max_iter {s['max_iter']}); "
          f"{s['stop_mode']} residual {s['first_residual']:.3g} -> best {s['best_residual']:.3g} -> final "
          f"{s['final_residual']:.3g} (tolerance {s['tolerance']:.3g}, {s['dtype']})")
    if s["fallback"]:
        print(f"  fallback {s['fallback']} took over from iteration {s['fallback_from']}")
    radius = "not measured" if result.spectral_radius is None else f"{result.spectral_radius:.4g}"
    lip = "not measured" if result.denoiser_lipschitz is None else f"{result.denoiser_lipschitz:.4g}"
    print(f"  spectral radius of dF/dx where the solve ended: {radius}; denoiser Lipschitz estimate: {lip}")
    if not result.diagnoses:
        print("diagnosis: converged cleanly, nothing to fix")
    for i, d in enumerate(result.diagnoses, 1):
        print(f"{i}. {d.kind}: {d.explanation}")
        sets = " ".join(f"--set {k}={v}" for k, v in d.remedy.changes.items())
        print(f"   remedy: {d.remedy.description}" + (f"  [{sets}]" if sets else ""))
    return 0


def cmd_demo(args) -> int:
    import tempfile

    from engine.data import pydicom_test_file

    out = args.out or tempfile.mkdtemp(prefix="equideq-demo-")
    steps = [f"optim.steps={args.steps}"] if args.steps else []
    ns = argparse.Namespace(config=None, set=steps, out=out, resume=None, quiet=False,
                            overwrite=args.overwrite)
    code = cmd_train(ns)
    if code != 0:
        return code
    real = pydicom_test_file("CT_small.dcm")
    if real is not None:
        print(f"\nevaluating on a real CT slice it never saw: {real}")
        return cmd_evaluate(argparse.Namespace(checkpoint=str(Path(out) / "last.pt"), data=str(real), json=False,
                                               seed=0, size=None, force_modality=False))
    return 0


def cmd_check_gradients(args) -> int:
    from engine.gradcheck import check_gradients

    report = check_gradients(size=args.size, views=args.views, fidelity=args.fidelity)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(f"float64 CT {report.image_size}x{report.image_size}, {report.views} views, EI + MC loss, "
              f"{report.data_fidelity} data step (stepsize {report.stepsize:g}); "
              f"reference: unrolled autograd ({report.unrolled_iterations} iterations)")
        print(f"  implicit (adjoint fixed point, {report.backward_iterations} it)  rel. error "
              f"{report.implicit_rel_error:.3e}")
        print(f"  JFB (Jacobian-free)                        rel. error {report.jfb_rel_error:.3e}")
        print(f"  finite difference vs implicit directional  rel. error "
              f"{report.finite_difference_rel_error:.3e}")
    ok = report.implicit_rel_error < 1e-6
    if not ok:
        _err(f"implicit gradient disagrees with unrolled autograd ({report.implicit_rel_error:.2e} >= 1e-6)")
    return 0 if ok else 1


def cmd_pretrain(args) -> int:
    from engine.outputs import check_output_file
    from engine.physics import image_channels
    from engine.pretrain import PretrainSettings, main_pretrain

    check_output_file(args.output, [args.config], overwrite=args.overwrite)
    config = _config_with_overrides(args.config, args.set)
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    settings = PretrainSettings(sources=sources, steps=args.steps, image_size=args.image_size, patch=args.size,
                                batch=args.batch, sigma_max=args.sigma_max, lr=args.lr, seed=args.seed,
                                jacobian_weight=args.jacobian_weight, jacobian_target=args.jacobian_target,
                                jacobian_every=args.jacobian_every)
    main_pretrain(config.model, image_channels(config.physics), Path(args.output), settings)
    return 0


def cmd_configs(args) -> int:
    from engine.config import default_config_dir, describe_fields

    print("built-in configs:", ", ".join(sorted(p.stem for p in default_config_dir().glob("*.toml"))))
    if args.keys:
        for key, default, doc in describe_fields():
            print(f"  {key:32s} {default!r:14s} {doc}")
    return 0


def _version() -> str:
    from engine import __version__

    return __version__


def _add_size_options(p) -> None:
    p.add_argument("--size", type=_size_option, metavar="native|N",
                   help="image side to reconstruct at: 'native' (the scan's own: the longer side of its slices; "
                        "a sinogram's or k-space's measured grid) or N pixels, with the operator built for it "
                        "(the network is convolutional and runs at any size). Default: the model's training size. "
                        "Measurements fix their size: a sinogram allows only its own, k-space its own or smaller")
    p.add_argument("--force-modality", action="store_true",
                   help="use an image scan whose file says another modality than the model's (an MR image into "
                        "a CT model): refused without this, since measurements simulated from it would not be of "
                        "anything measured. A file that does not say its modality (NumPy, PNG, most NIfTI) is "
                        "taken as the model's, with a note on stderr (in the JSON's notes with --json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="equideq", description="EquiDEQ: self-supervised DEQ reconstruction "
                                     "for sparse-view CT and accelerated MRI.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: cores - 1)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a DEQ from a config")
    p.add_argument("--config", help="TOML/YAML config file or built-in name (default ct_phantom_quick)")
    p.add_argument("--out", required=True, help="run directory (config, metrics.jsonl, checkpoints)")
    p.add_argument("--resume", help="checkpoint to continue from (RUN_DIR may then hold that run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in RUN_DIR (its config, metrics and checkpoints are deleted)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="PSNR/SSIM and equivariance error on scans (images taken as ground truth; "
                                        "k-space/sinogram files reconstructed from their measurements)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="scan file or folder of scans")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated measurement noise")
    _add_size_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("reconstruct", help="reconstruct a scan slice and write it (.npy/.png/.h5/.dcm); "
                                           "k-space/sinogram files from their stored measurements")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True, help="image file (.npy .npz .png .h5 .dcm; in HU for a CT scan in HU, "
                                                    "else the model's [0, 1] scale); never the input")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--slice", type=int, help="slice index (default: the middle one)")
    _add_size_options(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("demo", help="a short self-supervised CT run on phantoms, evaluated on a real CT slice")
    p.add_argument("--out", help="run directory (default: a temporary one)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--steps", type=int, help="training steps (default: the config's, 20)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("check-gradients", help="implicit and JFB gradients vs unrolled autograd (float64)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--fidelity", choices=("ramp", "l2"), default="ramp",
                   help="CT data step checked (default ramp, as the shipped configs)")
    p.set_defaults(func=cmd_check_gradients)

    p = sub.add_parser("diagnose", help="run one recorded solve and say why it does (not) converge and what "
                                        "to change")
    p.add_argument("--checkpoint", help="checkpoint (default: the built-in config's model, shipped weights)")
    p.add_argument("--config", help="built-in config for the default model (default ct_phantom_quick)")
    p.add_argument("--input", help="scan file (default: a Shepp-Logan phantom); k-space/sinogram files are "
                                   "solved from their measurements")
    p.add_argument("--slice", type=int, help="slice index (default: the middle one)")
    p.add_argument("--solver", help="solver to use instead of the model's (fixed_point, anderson, broyden)")
    p.add_argument("--make-it-diverge", action="store_true",
                   help="the demonstration: no Jacobian penalty, data step 5 (> 2), plain iteration, no fallback")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a solver/DEQ setting, e.g. solver.damping=0.5 (a remedy's changes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated measurement noise / phantom")
    p.add_argument("--json", action="store_true", help="print one JSON object (spectral_radius, stop_reason, "
                                                       "diagnoses[kind, explanation, remedy], trace ...)")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("pretrain", help="pre-train the config's denoiser as a blind Gaussian denoiser "
                                        "(phantoms, training slices of the shipped scans, natural images)")
    p.add_argument("--config", help="config file or built-in name (its model and modality are used)")
    p.add_argument("--output", required=True, help="weights file (.pt or .safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--sources", default="phantoms",
                   help="comma-separated: phantoms, head_ct, colin27, natural (training slices only; default phantoms)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--size", type=int, default=64, help="training patch side (default 64)")
    p.add_argument("--image-size", type=int, default=128,
                   help="resolution the scans are prepared at before cropping: the DEQ's (default 128)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sigma-max", type=float, default=0.2, help="noise levels drawn from U(0, sigma-max)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--jacobian-weight", type=float, default=0.0,
                   help="weight of the Jacobian spectral-norm penalty (0 = unconstrained)")
    p.add_argument("--jacobian-target", type=float, default=0.95, help="norm the penalty pushes below")
    p.add_argument("--jacobian-every", type=int, default=1, help="apply the penalty every N steps (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("configs", help="list built-in configs (and every key with --keys)")
    p.add_argument("--keys", action="store_true")
    p.set_defaults(func=cmd_configs)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.errors import EquiDEQError

    try:
        from engine.trainer import configure_threads

        configure_threads(args.threads)
        return args.func(args)
    except EquiDEQError as exc:
        _err(" ".join(str(exc).split()))
        return EXIT_USER_ERROR
    except OSError as exc:  # the file system refused (permissions, disk full, a file where a folder must be)
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        _err(f"{where}{exc.strerror or exc}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
