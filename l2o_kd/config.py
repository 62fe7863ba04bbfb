"""The configuration of every command, as dataclasses: each default is declared here once, saved in
every run and checkpoint (``asdict``), and read by the command line for its flags.

This module imports no torch and, of the package, only its leaves (``errors``, ``seeds``, ``device``), so
``l2o-kd --help`` stays fast and every other module may read its choices. The names of models are the
registry's (``models.MODELS``): the commands check them where they build one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from . import seeds as seed_ranges
from .device import check_device
from .errors import UserError

CLASSIC_OPERATORS = ("sgd", "adam", "adamw")  # --operator; any other value is a learned-operator checkpoint
SCHEDULES = ("constant", "step", "cosine", "onecycle")  # --schedule (operators/schedules.py)
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")  # --dataset (data.py; imagefolder: any folder of class folders)
KD_FORMS = ("hinton", "paper", "reverse")  # the KD loss convention: T^2 KL(t||s), KL(t||s) or KL(s||t) (distill.py)
CLIP_MODES = ("norm", "value")  # how the hypergradient is clipped (hypergrad.py)
LOOKAHEADS = ("current", "base")  # the lr of the greedy hypergradient's look-ahead step (hypergrad.py)
HYPER_JVPS = ("exact", "difference")  # how the greedy hypergradient forms J a (hypergrad.py)
TUNE_KD_METHODS = ("greedy", "unrolled", "extrapolate", "extrapolate-periodic")  # --tune-kd (hypergrad.py)
GREEDY_METHODS = ("greedy", "extrapolate", "extrapolate-periodic")  # those that take greedy hyper-steps (and read hyper_jvp)
META_METHODS = ("tbptt", "es", "pes", "full")  # meta-train --method (meta.py)
ES_OBJECTIVES = ("ce", "error")  # meta-train --es-objective


def check_choice(flag: str, value: str, choices) -> None:
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def parse_seeds(text: str, flag: str) -> list[int]:
    """The seeds of a comma-separated flag such as ``--val-seeds 1000,1001``."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None


# train-teacher's recipe: where a teacher's run differs from TrainConfig's (a student's) defaults
TEACHER_RECIPE = {"model": "resnet20", "operator": "sgd", "beta": 0.0, "lr": 0.2, "schedule": "onecycle"}


@dataclass
class TrainConfig:
    model: str = "tiny"
    dataset: str = "cifar10"
    data_root: str | None = None
    download: bool = False
    teacher: str | None = None  # teacher checkpoint; None or beta == 0 (and no operator choosing beta): no KD
    beta: float = 0.5
    temperature: float = 4.0
    kd_form: str = "hinton"  # hinton: (1-beta) CE + beta T^2 KL(t||s) | paper: no T^2 (Gorpinich et al.) | reverse: KL(s||t), no T^2 (their code)
    operator: str = "sgd"  # sgd | adam | adamw | path to a learned-operator checkpoint
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | step | cosine | onecycle
    lr_step_epochs: float = 10.0  # "step" schedule: multiply lr by lr_gamma every this many epochs
    lr_gamma: float = 0.5
    tune_kd: str | None = None  # greedy | unrolled | extrapolate | extrapolate-periodic: (beta, T) moved by hypergradients
    hyper_lr: float = 0.25
    hyper_clip: float = 0.01
    hyper_clip_mode: str = "norm"  # norm: scale the hypergradient to norm <= clip | value: clamp each component to [-clip, clip]
    hyper_lookahead: str = "current"  # greedy look-ahead step at the current lr | base: at the base lr, hypergradient x (current / base lr)
    hyper_jvp: str = "difference"  # greedy J a: one forward at w + eps a (the training forward gives f(w)) | exact: forward mode
    hyper_every: int = 1
    hyper_unroll: int = 3
    extrapolate_after: float = 0.5  # extrapolate: fraction of the run spent in the greedy phase
    periodic_greedy: int = 10  # extrapolate-periodic: greedy steps per cycle (the points of the fitted line)
    periodic_follow: int = 90  # extrapolate-periodic: steps per cycle that follow the fitted line
    bn_updates: int = 0  # extra no-grad train-mode forwards of each training batch (they move only BatchNorm running statistics)
    epochs: float = 10.0
    steps: int | None = None  # wins over epochs
    batch_size: int = 128
    augment: bool = False
    train_subset: int | None = None  # use only this many training images (a fixed subset, e.g. the paper's 12,800)
    seed: int = 0
    init: str | None = None  # start from the weights of this model checkpoint (fine-tuning) instead of seed's initialization
    device: str = "cpu"
    channels_last: bool = False
    amp: bool = False  # bf16 autocast for the student's forward/backward (the loss and the operator stay float32)
    runs_dir: str = "runs"
    run_name: str | None = None
    eval_every: int | None = None  # steps between evaluations (and checkpoints) [default: one epoch]
    eval_at_start: bool = False  # also evaluate the initial student (a row at step 0)
    trajectory_every: int = 0  # > 0: keep the flattened parameters every this many steps in trajectory.pt
    log_every: int = 20  # steps between TensorBoard step scalars
    hist_every: int = 500  # steps between per-layer update norms / update histograms
    progress: bool = True
    tensorboard: bool = True

    # Fields that do not decide a run's result: where and how it is logged, found and shown.
    NOT_DECISIVE: ClassVar[frozenset[str]] = frozenset({
        "runs_dir", "run_name", "progress", "tensorboard", "device", "eval_every", "log_every", "hist_every", "trajectory_every",
        "eval_at_start", "data_root", "download"})

    HYPER: ClassVar[frozenset[str]] = frozenset({
        "hyper_lr", "hyper_clip", "hyper_clip_mode", "hyper_lookahead", "hyper_jvp", "hyper_every", "hyper_unroll", "extrapolate_after",
        "periodic_greedy", "periodic_follow"})
    # What a learned operator decides for itself (its steps, (beta, T), the KD convention it was meta-trained
    # with): given with one, these flags would be silently ignored, so the CLI refuses them.
    LEARNED_DECIDES: ClassVar[frozenset[str]] = HYPER | {
        "lr", "momentum", "nesterov", "weight_decay", "schedule", "lr_step_epochs", "lr_gamma", "beta", "temperature", "kd_form", "tune_kd"}

    def decisive(self) -> dict[str, Any]:
        """The fields that decide the run's result (files such as the teacher enter by digest, elsewhere),
        without those the run does not use: the hypergradient settings without --tune-kd (and J a's
        form without greedy hyper-steps), the step schedule's period and factor under another schedule."""
        unused = set(self.NOT_DECISIVE)
        if not self.tune_kd:
            unused |= self.HYPER
        if self.tune_kd not in GREEDY_METHODS:
            unused.add("hyper_jvp")
        if self.schedule != "step":
            unused |= {"lr_step_epochs", "lr_gamma"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in unused}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A saved config (``asdict``, with any extra keys a run records beside it); one made by a version
        that lacks one of its fields is refused with one line naming that field."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise UserError(f"this run's config has no field {missing[0]!r}: it was saved by another version of l2o-kd")
        return cls(**{n: d[n] for n in names})

    def validate(self, check_operator: bool = True) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise UserError(f"--beta must lie in [0, 1], got {self.beta}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")
        check_choice("--kd-form", self.kd_form, KD_FORMS)
        check_choice("--schedule", self.schedule, SCHEDULES)
        check_choice("--hyper-clip-mode", self.hyper_clip_mode, CLIP_MODES)
        check_choice("--hyper-lookahead", self.hyper_lookahead, LOOKAHEADS)
        check_choice("--hyper-jvp", self.hyper_jvp, HYPER_JVPS)
        if self.hyper_every < 1 or self.hyper_unroll < 1:
            raise UserError("--hyper-every and --hyper-unroll must be positive")
        if self.periodic_greedy < 1 or self.periodic_follow < 0:
            raise UserError("--periodic-greedy must be positive and --periodic-follow non-negative")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.steps is None and not self.epochs > 0 or self.steps is not None and self.steps < 1:
            raise UserError("--epochs (or --steps) must be positive")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if self.bn_updates < 0:
            raise UserError(f"--bn-updates must be non-negative, got {self.bn_updates}")
        if self.learned and self.tune_kd:
            raise UserError(f"--tune-kd {self.tune_kd}: the learned operator {self.operator} chooses its own (beta, T)")
        if check_operator and self.learned and not Path(self.operator).is_file():
            raise UserError(f"unknown operator {self.operator!r}: use {', '.join(CLASSIC_OPERATORS)} or a learned-operator checkpoint (file not found)")
        if self.init and not Path(self.init).is_file():
            raise UserError(f"--init: checkpoint not found: {self.init}")
        check_device(self.device)

    @property
    def learned(self) -> bool:
        """A learned operator chooses its own steps and (beta, T): ``operator`` names a checkpoint (whose
        kind, ``operator``, is checked when it is loaded) rather than a classic operator."""
        return self.operator not in CLASSIC_OPERATORS

    @property
    def name(self) -> str:
        return self.run_name or f"{self.model}-{Path(self.operator).stem}-b{self.beta:g}-T{self.temperature:g}-s{self.seed}"


@dataclass
class CompareConfig:
    operators: str = "sgd,adam"
    seeds: int = 3  # seeds 0 .. seeds-1
    student: str = TrainConfig.model
    epochs: float = 20.0
    steps: int | None = None  # wins over epochs
    dataset: str = TrainConfig.dataset
    data_root: str | None = None
    download: bool = False
    teacher: str | None = None
    beta: float = TrainConfig.beta  # the fixed KD of the classic operators (and the start of the KD-tuning ones)
    temperature: float = TrainConfig.temperature
    kd_form: str = TrainConfig.kd_form
    hyper_clip_mode: str = TrainConfig.hyper_clip_mode  # of the KD-tuning operators (sgd+greedy ...)
    hyper_lookahead: str = TrainConfig.hyper_lookahead
    hyper_jvp: str = TrainConfig.hyper_jvp
    batch_size: int = TrainConfig.batch_size
    momentum: float = TrainConfig.momentum
    schedule: str = TrainConfig.schedule  # lr schedule of the classic operators (tuning runs included)
    lrs: dict[str, float] = field(default_factory=dict)  # fixed lrs per base operator (skip tuning it)
    tune_lr: int = 0  # grid size; 0: no tuning (DEFAULT_LR or --lr)
    tune_steps: int = 1000  # length of each tuning run (capped by the full run's length)
    tune_step: int = 0  # learned operators: their step multiplier K (ckpt:PATH@step=K) tuned over this many values; 0: K = 1
    kd_grid: list[list[float]] = field(default_factory=list)  # [beta, T] pairs tuned jointly with each classic lr; []: beta, T fixed
    target: float | None = None  # test accuracy for "steps to target" [default: best classic final mean]
    evals: int = 20  # evaluation points per run (plus the initial one)
    trajectory_points: int = 50  # flattened-parameter snapshots per run, for the trajectory plot
    device: str = TrainConfig.device
    out: str = "results/compare"
    progress: bool = True

    # The fields every run of the folder takes from it as they are (the others: per cell, tuned or derived).
    RUN_FIELDS: ClassVar[tuple[str, ...]] = ("dataset", "data_root", "teacher", "kd_form", "hyper_clip_mode", "hyper_lookahead",
                                             "hyper_jvp", "batch_size", "momentum", "schedule", "device", "progress")

    def validate(self) -> None:
        """Everything but the operators (``compare.parse_specs`` checks those)."""
        check_choice("--schedule", self.schedule, SCHEDULES)
        check_choice("--kd-form", self.kd_form, KD_FORMS)
        check_choice("--hyper-clip-mode", self.hyper_clip_mode, CLIP_MODES)
        check_choice("--hyper-lookahead", self.hyper_lookahead, LOOKAHEADS)
        check_choice("--hyper-jvp", self.hyper_jvp, HYPER_JVPS)
        if self.seeds < 1 or self.tune_lr < 0 or self.tune_step < 0 or self.evals < 1:
            raise UserError("--seeds and --evals must be positive, --tune-lr and --tune-step non-negative")
        if self.tune_step % 2 == 0 and self.tune_step:
            raise UserError(f"--tune-step {self.tune_step}: give an odd number of values, so that K = 1 (the operator as meta-trained) is one of them")
        for pair in self.kd_grid:
            if len(pair) != 2 or not 0 <= pair[0] <= 1 or not 0 < pair[1] < float("inf"):
                raise UserError(f"--tune-kd-grid: each pair is BETA:T with 0 <= BETA <= 1 and 0 < T < inf, got {pair}")
        seed_ranges.check(range(self.seeds), "evaluation", "--seeds")
        for name, lr in self.lrs.items():
            if name not in CLASSIC_OPERATORS or not lr > 0:
                raise UserError(f"--lr {name}={lr}: give a positive lr for one of {', '.join(CLASSIC_OPERATORS)}")


SEARCH_METHODS = ("random", "tpe")  # how l2o-kd search draws (beta, T)


@dataclass
class SearchConfig:
    method: str = "tpe"  # one of SEARCH_METHODS
    trials: int = 5
    retrain_seeds: str = "0,1,2"
    out: str = "results/search"

    def validate(self) -> list[int]:
        if self.method not in SEARCH_METHODS:
            raise UserError(f"unknown search method {self.method!r}: use {' or '.join(SEARCH_METHODS)}")
        if self.trials < 1:
            raise UserError("--trials must be positive")
        seeds = parse_seeds(self.retrain_seeds, "--retrain-seeds")
        seed_ranges.check(seeds, "evaluation", "--retrain-seeds")
        return seeds


PER_COORDINATE = {  # the learned operator's per-coordinate part (l2o_kd/operators/learned.py)
    "lstm": "an LSTM cell per coordinate (Andrychowicz et al.)",
    "mlp": "an LSTM per tensor, a small MLP per coordinate (VeLO's hierarchy)",
}

ES_PARAMS = {  # which operator weights --es-params meta-trains, by any method (the rest stay at their initialization)
    "all": ("",),
    "readout": ("coord_out.", "head.2."),  # the output layers, reading a fixed random LSTM
    "network-readouts": ("coord_out.", "head.2.weight"),  # those but the head's biases: network weights only, no prior scalar
    "coord-mlp": ("coord_in.", "coord_out.", "head.2.", "schedule."),  # --per-coordinate mlp: the per-coordinate MLP, the head's read-out and slopes
    "coord": ("coord_in.", "coord_out."),  # --per-coordinate mlp: the per-coordinate MLP only (the shape of each tensor's update)
    "bias": ("coord_out.bias", "head.2.bias"),  # the output biases: base beta, T, step scale, step magnitude, drift
    "head-bias": ("head.2.bias",),  # the global head's biases: base beta, T and step scale
    "schedule": ("head.2.bias", "schedule."),  # those biases and their slopes in progress t/T
    "mix": ("mix",),  # an operator made with mix=True: the weights of its terms (the shape of every coordinate's update)
    "mix-schedule": ("mix", "head.2.bias", "schedule."),  # those and the schedule
    # every weight but the designed prior's scalars (operators.learned.PRIOR: mix, schedule slopes, head output biases)
    "networks": ("lstm.", "coord_", "head.0.", "head.2.weight"),
    "shape": ("lstm.", "coord_"),  # the networks that shape each coordinate's update (not the head: step size, beta, T)
}


@dataclass
class MetaConfig:
    dataset: str = TrainConfig.dataset
    data_root: str | None = None
    teacher: str | None = None
    kd_form: str = TrainConfig.kd_form  # the KD loss convention of the episodes (and of meta-validation)
    # The defaults are the recipe of the shipped operator's learned numbers (docs/results/learned-operator.md, N4):
    # whole-episode antithetic ES on the mix and the schedule, 1,000-step episodes of `tiny`, the val error.
    students: str = "tiny"
    method: str = "es"  # tbptt | es | pes | full (backpropagation through whole episodes)
    unroll: int = 20  # tbptt, pes: steps per truncation
    curriculum: str = "1000"  # episode lengths, each used for an equal share of the budget
    meta_steps: int = 80
    minutes: float | None = None  # wall-clock budget; wins over meta_steps when reached first
    meta_lr: float = 0.05
    clip: float = 100.0
    batch_size: int = TrainConfig.batch_size
    second_order: bool = False
    sigma: float = 0.3  # es, pes: standard deviation of the perturbations of phi
    pairs: int = 1  # the population per meta-step and rank: es/pes antithetic pairs, tbptt episodes
    es_eval: int = 5000  # es, pes: validation images of the objective
    es_objective: str = "error"  # es, pes, full: validation "ce" or "error" (full: a smooth error, differentiable)
    es_params: str = "mix-schedule"  # a key of ES_PARAMS: the meta-trained weights (es and pes perturb only those)
    vmap: bool = False  # es, pes: advance a meta-step's particles of one student together, one vmapped step (for a GPU)
    # A fresh operator (no --init): these fields of its LSTMOperatorConfig, by default the shipped operator's architecture
    hidden: int = 20
    base_scale: float = 1e-3
    normalize_update: bool = True  # unit-RMS update shape per tensor: the global head alone sets the step size
    per_coordinate: str = "mlp"
    rms_floor: float = 1e-3
    mix: bool = True  # the prior direction a learned mix of momentum, Adam and sign terms
    init: str | None = None  # start from this operator checkpoint instead of a fresh operator
    validate_every: int = 5
    val_horizon: int = 1000
    val_seeds: str = "1000,1001,1002,1003"
    val_students: str = "tiny"  # meta-validation runs each seed on each of these students
    adam_lr: float = 0.00949  # the reference Adam of meta-validation (its lr tuned on val at 1,000 steps of tiny)
    seed: int = TrainConfig.seed
    device: str = TrainConfig.device
    runs_dir: str = TrainConfig.runs_dir
    run_name: str = "meta"
    out: str | None = None  # copy of the best operator [default: <run dir>/operator-best.pt]
    progress: bool = True

    # Fields that do not decide a meta-training run's result: where it is written and shown, and its
    # budget (a resumed run may be given more meta-steps; a curriculum of several lengths is then laid
    # over the new budget from where the run stands).
    NOT_DECISIVE: ClassVar[frozenset[str]] = frozenset({"runs_dir", "run_name", "out", "progress", "device", "data_root", "meta_steps", "minutes"})

    def decisive(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.NOT_DECISIVE}

    def validate(self) -> None:
        """Everything but the students' names (meta-training checks those against ``models.MODELS``)."""
        if self.unroll < 1 or self.meta_steps < 1 or self.validate_every < 1:
            raise UserError("--unroll, --meta-steps and --validate-every must be positive")
        if not self.meta_lr > 0:
            raise UserError(f"--meta-lr must be positive, got {self.meta_lr}")
        check_choice("--kd-form", self.kd_form, KD_FORMS)
        check_choice("--method", self.method, META_METHODS)
        if not (self.sigma > 0 and self.pairs >= 1 and self.es_eval >= 1):
            raise UserError("--sigma, --pairs and --es-eval must be positive")
        check_choice("--es-objective", self.es_objective, ES_OBJECTIVES)
        check_choice("--es-params", self.es_params, ES_PARAMS)
        if self.vmap and self.method in ("tbptt", "full"):
            raise UserError("--vmap advances ES and PES particles: use it with --method es or pes")
        check_choice("--per-coordinate", self.per_coordinate, PER_COORDINATE)
        if not self.rms_floor >= 0:
            raise UserError(f"--rms-floor must be >= 0, got {self.rms_floor}")
        seed_ranges.check(self.val_seed_list, "meta-validation", "--val-seeds")
        check_device(self.device)

    @property
    def val_seed_list(self) -> list[int]:
        return parse_seeds(self.val_seeds, "--val-seeds")

    @property
    def val_student_list(self) -> list[str]:
        return self.val_students.split(",")

    @property
    def lengths(self) -> list[int]:
        return [int(x) for x in self.curriculum.split(",")]
