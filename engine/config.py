"""Typed, validated experiment configs, loaded from and saved to TOML or YAML.

A peer-library failure we refuse to repeat: silently ignoring a misspelt
option. Every section here rejects unknown keys, wrong types and out-of-range
values with a :class:`~engine.errors.ConfigError` that names the dotted key
(``solver.max_iter``) and says what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from engine.atomic import atomic_write_text
from engine.errors import ConfigError
from engine.resources import resource_path
from engine.solver_names import SOLVER_NAMES

#: how the denoiser's arithmetic may run (engine/deq.py FixedPointOperator.set_execution)
AUTOCAST_MODES = ("off", "bf16")

# Names of the data-consistency steps (engine/data_fidelity.py implements them). Kept here, with the rule
# of which one a config may use, so that reading and validating a config never imports torch.
FIDELITIES = ("l2", "ramp")


def resolve_fidelity(name: str, modality: str, operator: str) -> str:
    """``auto`` -> ``ramp`` for CT with the PGD operator, else ``l2``; explicit names are checked."""
    if name == "auto":
        return "ramp" if modality == "ct" and operator == "pgd" else "l2"
    if name not in FIDELITIES:
        raise ValueError(f"unknown data fidelity '{name}' (known: auto, {', '.join(FIDELITIES)})")
    if name == "ramp" and modality != "ct":
        raise ValueError("deq.data_fidelity = 'ramp' is a CT sinogram weight; MRI uses 'l2' (or 'auto')")
    if name == "ramp" and operator != "pgd":
        raise ValueError("deq.data_fidelity = 'ramp' needs deq.operator = 'pgd' (HQS's proximal step is plain l2)")
    return name


#: File suffixes of configs: TOML, then YAML. Here, torch-free, so that the GUI's file rules use the same lists.
YAML_SUFFIXES = (".yaml", ".yml")
CONFIG_SUFFIXES = (".toml",) + YAML_SUFFIXES
#: Checkpoint file suffixes by format (``run.checkpoint_format`` names the format a run writes).
CHECKPOINT_FORMATS = {"pt": (".pt", ".pth", ".ckpt"), "safetensors": (".safetensors",)}
CHECKPOINT_SUFFIXES = tuple(suffix for suffixes in CHECKPOINT_FORMATS.values() for suffix in suffixes)


def _f(default, *, choices=None, min=None, max=None, doc="", factory=None):
    meta = {"choices": choices, "min": min, "max": max, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)



@dataclass
class PhysicsConfig:
    modality: str = _f("ct", choices=("ct", "mri"), doc="sparse-view CT or accelerated MRI")
    img_size: int = _f(128, min=8, max=1024, doc="image height = width in pixels")
    views: int = _f(30, min=2, max=2048, doc="CT: number of parallel-beam projection angles")
    circle: bool = _f(False, doc="CT: restrict the Radon transform to the inscribed circle")
    noise: str = _f("gaussian", choices=("none", "gaussian", "poisson"), doc="measurement noise model")
    noise_sigma: float = _f(0.01, min=0.0, max=10.0, doc="Gaussian noise standard deviation")
    poisson_gain: float = _f(0.01, min=1e-6, max=10.0, doc="Poisson noise gain (smaller = less noise)")
    acceleration: float = _f(4.0, min=1.0, max=32.0, doc="MRI: undersampling factor")
    center_fraction: float = _f(0.08, min=0.0, max=1.0, doc="MRI: fully sampled centre fraction")
    mask: str = _f("random", choices=("random", "equispaced", "gaussian"), doc="MRI: sampling pattern")
    mask_seed: int = _f(0, min=0, doc="MRI: seed of the sampling mask")


@dataclass
class DataConfig:
    source: str = _f("phantom", choices=("phantom", "files"), doc="procedural phantoms or scan files")
    paths: list = _f(None, factory=list, doc="scan files or folders (source = files)")
    phantom: str = _f("ellipses", choices=("ellipses", "shepp_logan"), doc="phantom family")
    n_train: int = _f(64, min=1, max=100000, doc="phantoms: training images")
    n_val: int = _f(4, min=1, max=10000, doc="phantoms: validation images")
    train_slices: str = _f("", doc="files: slice range for training, 'start:stop' (empty = all but val)")
    val_slices: str = _f("", doc="files: slice range for validation, 'start:stop'")
    window: list = _f(None, factory=list, doc="CT: [low, high] HU window mapped to [0, 1] (empty = auto)")
    seed: int = _f(0, min=0, doc="seed of the phantom generator and noise")


@dataclass
class ModelConfig:
    denoiser: str = _f("resunet", choices=("resunet", "dncnn"), doc="denoiser architecture")
    channels: int = _f(32, min=4, max=512, doc="base feature channels")
    depth: int = _f(2, min=1, max=5, doc="U-Net levels / DnCNN hidden layers // 3")
    norm: str = _f("group", choices=("group", "none"), doc="normalisation inside the denoiser")
    spectral_norm: bool = _f(True, doc="spectrally normalise every convolution")
    lipschitz: float = _f(0.95, min=0.05, max=1.0, doc="output scale bound of the denoiser")
    noise_level: bool = _f(False, doc="condition the denoiser on a noise-level map (DRUNet-style; the DEQ gives it "
                                      "deq.sigma); resunet only")
    weights: str = _f("", doc="local weights file for the denoiser ('' = the shipped pretrained one if it fits, else random)")


@dataclass
class DEQConfig:
    operator: str = _f("pgd", choices=("pgd", "hqs"), doc="fixed-point map: PGD or HQS (proximal) form")
    stepsize: float = _f(1.9, min=1e-6, max=10.0,
                         doc="PGD: step in units of 1/Lip(grad f) (below 2 keeps F contractive); HQS: prox gamma")
    data_fidelity: str = _f("auto", choices=("auto", "l2", "ramp"),
                            doc="PGD data term: ramp-filtered l2 (CT) or plain l2; auto = ramp for CT, l2 for MRI")
    gradient: str = _f("implicit", choices=("implicit", "jfb", "unrolled"), doc="how gradients cross the solve")
    unrolled_iterations: int = _f(20, min=1, max=1000, doc="iterations of the network when gradient = unrolled "
                                                           "(in training and at test time)")
    sigma: float = _f(0.03, min=1e-4, max=1.0, doc="noise level given to a noise-level-conditioned denoiser: "
                                                   "the DEQ's regularisation strength")
    learn_sigma: bool = _f(True, doc="train deq.sigma with the denoiser (log-parametrised)")
    relaxation: float = _f(1.0, min=0.01, max=1.0,
                           doc="weight a of the relaxed map x <- a F(x) + (1 - a) x (same fixed points; 1 = plain F)")


@dataclass
class SolverConfig:
    name: str = _f("anderson", choices=SOLVER_NAMES, doc="fixed-point solver")
    tol: float = _f(1e-4, min=0.0, max=1.0, doc="stopping tolerance")
    stop_mode: str = _f("rel", choices=("rel", "abs"), doc="residual the tolerance applies to")
    max_iter: int = _f(60, min=1, max=100000, doc="iteration cap")
    memory: int = _f(5, min=1, max=100, doc="Anderson/Broyden history size")
    damping: float = _f(1.0, min=0.01, max=1.0, doc="mixing weight beta (1 = undamped)")
    regularization: float = _f(1e-4, min=0.0, max=1.0, doc="Anderson ridge, relative to the residual scale")
    divergence_factor: float = _f(1e4, min=2.0, doc="residual above this multiple of its running minimum = diverged")
    fallback: str = _f("fixed_point", choices=("",) + SOLVER_NAMES, doc="solver that takes over diverged samples ('' = none)")
    max_restarts: int = _f(3, min=0, max=1000, doc="Anderson/Broyden restarts without progress after which a sample "
                                                   "counts as diverged")
    restart_factor: float = _f(10.0, min=1.0, doc="Anderson/Broyden clear a sample's history when its residual "
                                                  "exceeds this multiple of its best")


@dataclass
class JacobianConfig:
    penalty: float = _f(0.0, min=0.0, max=100.0,
                        doc="weight mu of mu * max(||dF/dx|| - target, 0) at the fixed point (0 = off)")
    target: float = _f(0.95, min=0.1, max=2.0, doc="Jacobian spectral norm the penalty pushes F below")
    power_iters: int = _f(8, min=1, max=200, doc="J^T J products of the penalty's top-singular-vector search")
    samples: int = _f(2, min=1, max=64, doc="samples of each batch the penalty and the monitor use")
    monitor_every: int = _f(10, min=0, doc="steps between spectral-radius estimates of dF/dx at the fixed point (0 = off)")
    radius_limit: float = _f(1.0, min=0.1, max=10.0, doc="spectral radius above which the safeguard acts")
    safeguard: str = _f("strengthen", choices=("strengthen", "rollback", "off"),
                        doc="above radius_limit: double the penalty, or also restore the last good weights")


@dataclass
class LossConfig:
    mode: str = _f("ei", choices=("ei", "mc", "supervised"), doc="EI (= MC + alpha * EI), MC only, or supervised")
    ei_weight: Union[float, str] = _f("auto", doc="alpha; 'auto' derives it from the operator scaling")
    transform: str = _f("rotate", choices=("rotate", "rotate90", "shift", "flip"), doc="EI group action")
    n_transforms: int = _f(1, min=1, max=16, doc="transforms sampled per step")
    ei_apply_noise: bool = _f(True, doc="simulate noise on A T_g x in the EI term")
    mc_noise_floor: bool = _f(False, doc="Gaussian noise: MC counts only the residual above sigma^2 "
                                         "(discrepancy principle; stops MC fitting the noise)")
    ei_warm_start: bool = _f(False, doc="start EI's second solve at T_g x1 (near its fixed point) instead of "
                                        "A^dagger(A T_g x1); implicit/jfb only (same fixed point, fewer iterations)")
    reuse_fixed_points: bool = _f(False, doc="start a training image's first solve at its fixed point from the last "
                                             "step that used it (kept in memory for the run); implicit/jfb only")


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, min=0.0, max=10.0, doc="Adam learning rate")
    steps: int = _f(200, min=1, max=10_000_000, doc="optimisation steps")
    batch_size: int = _f(4, min=1, max=1024, doc="images per step")
    grad_clip: float = _f(1.0, min=0.0, doc="gradient-norm clip (0 = off)")
    scheduler: str = _f("cosine", choices=("none", "cosine", "step"), doc="learning-rate schedule")
    weight_decay: float = _f(0.0, min=0.0, max=1.0, doc="Adam weight decay")


@dataclass
class RunConfig:
    name: str = _f("run", doc="run name")
    seed: int = _f(0, min=0, doc="seed of everything random")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"), doc="compute device")
    threads: int = _f(0, min=0, max=256, doc="torch threads in the engine (0 = cores - 1, at least 1)")
    checkpoint_every: int = _f(50, min=0, doc="steps between checkpoints (0 = only at the end)")
    validate_every: int = _f(10, min=1, doc="steps between validations and snapshots")
    checkpoint_format: str = _f("pt", choices=tuple(CHECKPOINT_FORMATS), doc="checkpoint file format")
    memory_format: str = _f("auto", choices=("auto", "channels_last", "contiguous"),
                            doc="denoiser activations' layout (auto = channels-last on the CPU: a training step "
                                "15 % faster at 128 px; contiguous on CUDA)")
    autocast: str = _f("off", choices=AUTOCAST_MODES,
                       doc="run the denoiser in bfloat16 (autocast); data step, fixed-point arithmetic and "
                           "residuals stay float32; the relative residual then plateaus at ~2e-3 to 1e-2")
    compile: bool = _f(False, doc="torch.compile the denoiser (first steps pay the compilation)")


@dataclass
class InspectConfig:
    record: bool = _f(True, doc="record every training solve (bounded iterates, residual maps) for the Solver "
                                "Inspector")
    frames: int = _f(24, min=2, max=1000, doc="iterates kept per recorded solve (every k-th; k doubles when full)")
    keep_steps: int = _f(4, min=1, max=100, doc="recent steps whose recordings are kept (failed steps included)")


@dataclass
class ExperimentConfig:
    physics: PhysicsConfig = field(default_factory=PhysicsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    deq: DEQConfig = field(default_factory=DEQConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    backward_solver: SolverConfig = field(default_factory=lambda: SolverConfig(tol=1e-4, max_iter=60))
    jacobian: JacobianConfig = field(default_factory=JacobianConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)

    # -- conversion -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ExperimentConfig":
        config = _build(cls, data, "")
        try:  # a choice that is valid alone but not with the rest of the config
            resolve_fidelity(config.deq.data_fidelity, config.physics.modality, config.deq.operator)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return config

    def replace(self, **sections_or_dotted: Any) -> "ExperimentConfig":
        """A validated copy with dotted keys changed: ``cfg.replace(**{"solver.tol": 1e-6})``."""
        data = self.to_dict()
        for key, value in sections_or_dotted.items():
            section, _, name = key.partition(".")
            if not name:
                raise ConfigError(f"replace() wants dotted keys like 'solver.tol', got '{key}'")
            if section not in data:
                raise ConfigError(_unknown(section, data.keys(), ""))
            data[section][name] = value
        return ExperimentConfig.from_dict(data)

    def validate(self) -> "ExperimentConfig":
        return ExperimentConfig.from_dict(self.to_dict())


def _unknown(key: str, known, prefix: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return f"unknown config key '{prefix}{key}'{hint} (known: {', '.join(sorted(known))})"


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(_unknown(str(key), known, prefix))
    values = {}
    for name, f in known.items():
        if name not in data:
            continue
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, data[name], key + ".")
        else:
            values[name] = _check_value(key, hint, data[name], f.metadata)
    return cls(**values)


def _check_value(key: str, hint, value, meta):
    if key.endswith("ei_weight"):
        if isinstance(value, str):
            if value != "auto":
                raise ConfigError(f"{key} must be a number >= 0 or 'auto', got '{value}'")
            return value
        hint = float
        meta = {**meta, "min": 0.0}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        value = float(value)
        if value != value:
            raise ConfigError(f"{key} must be a number, got NaN")
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
    elif hint is list or get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        value = list(value)
        if key == "data.window" and value:
            nums = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(value) != 2 or len(nums) != 2 or not all(v == v and abs(v) != float("inf") for v in nums) \
                    or not nums[0] < nums[1]:
                raise ConfigError(f"{key} must be [] (automatic) or [low, high] in HU with low < high, got {value!r}")
            value = [float(v) for v in nums]
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{key} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} must be <= {hi}, got {value}")
    return value


# -- files ------------------------------------------------------------------------------

def load_config(path: str | Path) -> ExperimentConfig:
    """Read a TOML (.toml) or YAML (.yaml/.yml) config; missing keys take defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in YAML_SUFFIXES:
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path.name}: config files must end in .toml, .yaml or .yml")
    except ConfigError:
        raise
    except Exception as exc:  # parser errors carry line numbers; keep them
        raise ConfigError(f"{path.name}: not valid {suffix[1:].upper()}: {exc}") from None
    try:
        return ExperimentConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path.name}: {exc}") from None


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write ``config`` as TOML (.toml) or YAML (.yaml/.yml), atomically (:func:`engine.atomic.atomic_write`)."""
    path = Path(path)
    data = config.to_dict()
    if path.suffix.lower() == ".toml":
        import tomli_w

        text = tomli_w.dumps(data)
    elif path.suffix.lower() in YAML_SUFFIXES:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        raise ConfigError(f"{path.name}: config files must end in .toml, .yaml or .yml")
    atomic_write_text(path, text)


def default_config_dir() -> Path:
    return resource_path("configs")


def builtin_config(name: str) -> ExperimentConfig:
    """One of the shipped configs in ``resources/configs`` by name (e.g. ``ct_phantom_quick``)."""
    path = default_config_dir() / f"{name}.toml"
    if not path.is_file():
        names = sorted(p.stem for p in default_config_dir().glob("*.toml"))
        raise ConfigError(f"no built-in config '{name}' (available: {', '.join(names)})")
    return load_config(path)


def describe_fields() -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every option: for --help texts and the settings dock."""
    out = []
    root = ExperimentConfig()
    for section in fields(ExperimentConfig):
        obj = getattr(root, section.name)
        for f in fields(obj):
            out.append((f"{section.name}.{f.name}", copy.deepcopy(getattr(obj, f.name)), f.metadata.get("doc", "")))
    return out
