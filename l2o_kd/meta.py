"""Meta-training of the learned operator across distillation episodes, by one of three estimators
of the meta-gradient (``--method``, objects in :mod:`l2o_kd.estimators`):

* ``tbptt``: truncated backpropagation: every ``--unroll`` steps the mean validation CE over those
  steps (val minibatches) is backpropagated into phi, then the episode goes on from detached tensors.
  Measured here: biased towards small steps, beta and T (the short-horizon bias).
* ``es``: antithetic evolution strategies on the validation loss at the *end* of whole episodes
  (Salimans et al. 2017; Metz et al. 2019): unbiased, two whole episodes per meta-step.
* ``pes``: persistent ES (Vicol et al. 2021): pairs of episodes advanced ``--unroll`` steps per
  meta-step, unbiased for the sum over truncations of the validation loss at their ends (the whole
  learning curve), one truncation per meta-step.
* ``full``: backpropagation through whole episodes (Andrychowicz et al. 2016), the full-horizon
  meta-gradient of the objective at the episode's end (validation CE, or a smooth error): no truncation
  bias, exact with ``--second-order``. Affordable on the cheap students of :mod:`l2o_kd.models`
  (``cnn16``, ``mlp8``: the image average-pooled, the full image's teacher logits as KD targets).

An episode (a *particle*) is a fresh student (drawn from ``--students``, seeded in the meta-training
range of :mod:`l2o_kd.seeds`) trained by the operator with :func:`l2o_kd.step.training_step`, the
step deploy takes, on the batches deploy would draw for that seed, with cached teacher logits.
``--pairs`` particles (pairs for ES/PES) form the population of a meta-step; under torchrun every
rank has its own and the meta-gradients are averaged. With ``--vmap`` the ES/PES particles of one
student advance together (:func:`advance_together`: :func:`l2o_kd.step.population_step`, one vmapped
step for all of them, each with its perturbed weights), for a GPU.

For TBPTT the gradient fed to the operator is built in logit space,

    g = J_s^T [ (1 - beta) * dCE/ds + beta * d(T^2 KL)/ds (T) ]    (T^2 KL: KL alone with --kd-form paper),

with the student Jacobian ``J_s`` at detached weights (first order) but the bracket differentiable in
beta and T, so the meta-gradient reaches the head that chooses beta_t and T_t; it equals deploy's
gradient (tested).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import seeds as seed_ranges
from .checkpoint import load_checkpoint, save_atomic
from .config import ES_PARAMS, MetaConfig, TrainConfig
from .data import BatchLoader, Splits, load_splits
from .distill import batch_ce
from .distributed import Dist
from .errors import Diverged, UserError
from .estimators import ES, PES, TBPTT, GradientEstimator, TruncationSchedule
from .fingerprint import FILE as FINGERPRINT
from .fingerprint import check_fingerprint, file_digest, record_fingerprint
from .models import apply, build_model, check_model, split_state
from .operators import Adam, Operator
from .operators.learned import LSTMOperator, LSTMOperatorConfig, LSTMOperatorNet, load_operator
from .runlog import RunLog
from .step import population_step, training_step
from .teacher import load_model_checkpoint, teacher_logits, teacher_path
from .train import train


class Episode:
    """A student being trained by the operator: its tensors, the operator's state and its batches,
    drawn as deploy draws them (``BatchLoader`` epochs of the train split, shuffled by ``seed``)."""

    def __init__(self, splits: Splits, logits: torch.Tensor, operator: LSTMOperator, student: str, seed: int, length: int, cfg: MetaConfig,
                 loaders: tuple[BatchLoader, BatchLoader] | None = None):
        self.model = build_model(student, seed=seed, num_classes=splits.dataset.num_classes).to(cfg.device)
        self.params, self.buffers = split_state(self.model)
        self.state = operator.init(self.params)
        self.splits, self.logits, self.cfg = splits, logits, cfg
        self.step, self.length, self.student, self.seed = 0, length, student, seed
        self.diverged = False
        self.train_loader, self.val_loader = loaders or episode_loaders(splits, cfg)

    @property
    def done(self) -> bool:
        return self.step >= self.length

    def snapshot(self) -> dict:
        """Everything needed to continue this episode exactly (for resumable meta-training)."""
        return {"student": self.student, "seed": self.seed, "length": self.length, "step": self.step, "params": self.params,
                "buffers": self.buffers, "state": self.state, "diverged": self.diverged}

    @classmethod
    def restore(cls, snap: dict, splits: Splits, logits: torch.Tensor, operator: LSTMOperator, cfg: MetaConfig,
                loaders: tuple[BatchLoader, BatchLoader] | None = None) -> Episode:
        ep = cls(splits, logits, operator, snap["student"], snap["seed"], snap["length"], cfg, loaders)
        dev = cfg.device
        ep.step, ep.diverged = snap["step"], snap.get("diverged", False)
        ep.params, ep.buffers, ep.state = ({k: v.to(dev) for k, v in snap[key].items()} for key in ("params", "buffers", "state"))
        return ep

    def detach(self) -> None:
        """The truncation boundary: nothing computed so far stays in the graph."""
        self.params = {k: v.detach() for k, v in self.params.items()}
        self.state = {k: v.detach() for k, v in self.state.items()}


def episode_loaders(splits: Splits, cfg: MetaConfig) -> tuple[BatchLoader, BatchLoader]:
    """The train and val batch streams of episodes (deploy's: shuffled, full batches); the order is a
    function of the episode's seed, so episodes can share them (and one copy of the data on a GPU)."""
    kw = dict(mean=splits.dataset.mean, std=splits.dataset.std, shuffle=True, drop_last=True, device=cfg.device)
    return BatchLoader(*splits.split("train"), cfg.batch_size, **kw), BatchLoader(*splits.split("val"), cfg.batch_size, **kw)


def train_step(operator: LSTMOperator, ep: Episode, differentiable: bool = False) -> None:
    """One operator step of the episode: :func:`l2o_kd.step.training_step`, the step deploy takes."""
    b = ep.train_loader.batch_at(ep.step, ep.seed)
    out = training_step(operator, ep.model, ep.params, ep.buffers, ep.state, b.x, b.y, ep.logits[b.idx.to(ep.logits.device)], step=ep.step,
                        total_steps=ep.length, kd_form=ep.cfg.kd_form, fixed_kd=(TrainConfig.beta, TrainConfig.temperature),
                        differentiable=differentiable, second_order=ep.cfg.second_order)
    ep.params, ep.state = out.params, out.state
    ep.step += 1


def advance(operator: LSTMOperator, ep: Episode, k: int) -> None:
    """``k`` operator steps of an episode (at most to its end), no graph."""
    with torch.no_grad():
        for _ in range(min(k, ep.length - ep.step)):
            train_step(operator, ep)


def advance_together(nets: list[nn.Module], eps: list[Episode], k: int) -> None:
    """``k`` steps of episodes of one student at one step and length, each with its operator weights
    (``nets``), by one vmapped :func:`l2o_kd.step.population_step` per step: the steps they take alone
    (up to rounding; tested). Stacks their tensors, and gives each its own back (copies) at the end."""
    stack = lambda dicts: {key: torch.stack([d[key] for d in dicts]) for key in dicts[0]}
    params, buffers, state = (stack([getattr(ep, a) for ep in eps]) for a in ("params", "buffers", "state"))
    weights = stack([dict(net.named_parameters()) for net in nets])
    first, operator = eps[0], LSTMOperator(nets[0])
    with torch.no_grad():
        for _ in range(min(k, first.length - first.step)):
            batches = [ep.train_loader.batch_at(ep.step, ep.seed) for ep in eps]
            x, y = torch.stack([b.x for b in batches]), torch.stack([b.y for b in batches])
            t_logits = torch.stack([ep.logits[b.idx.to(ep.logits.device)] for ep, b in zip(eps, batches)])
            params, state, _ = population_step(operator, first.model, params, buffers, state, x, y, t_logits, weights, step=first.step,
                                               total_steps=first.length, kd_form=first.cfg.kd_form,
                                               fixed_kd=(TrainConfig.beta, TrainConfig.temperature))
            for ep in eps:
                ep.step += 1
    for i, ep in enumerate(eps):
        ep.params, ep.buffers, ep.state = ({key: v[i].clone() for key, v in d.items()} for d in (params, buffers, state))


def unroll(operator: LSTMOperator, ep: Episode, k: int) -> torch.Tensor:
    """``k`` operator steps of an episode; returns the mean validation CE after each (a graph to phi),
    after step t on batch t + 1 of the episode's validation stream (``val_loader.batch_at``, seed + 7)."""
    losses = []
    for _ in range(min(k, ep.length - ep.step)):
        train_step(operator, ep, differentiable=True)
        vb = ep.val_loader.batch_at(ep.step, ep.seed + 7)
        losses.append(batch_ce(ep.model, ep.params, ep.buffers, vb.x, vb.y))
    return torch.stack(losses).mean()


DIVERGED_LOSS = 10.0  # objective counted for a diverged episode (chance is ln 10 = 2.3)
SMOOTH_ERROR_TEMPERATURE = 0.1  # full's "error" objective: 1 - softmax(logits / this)[label], a differentiable error rate


def _val_logits(ep: Episode, n_val: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's logits (eval mode, running BatchNorm statistics; in the graph when its weights are) of
    ``n_val`` validation images drawn from (episode seed, step), and their labels."""
    gen = torch.Generator().manual_seed(ep.seed * 10_007 + ep.step)
    xv, yv = ep.splits.split("val")
    idx = torch.randperm(len(yv), generator=gen)[:n_val]
    logits = apply(ep.model, ep.params, ep.buffers, ep.val_loader.normalize(xv[idx]), train=False)
    return logits, yv[idx].to(logits.device)


def unroll_whole(operator: LSTMOperator, ep: Episode, n_val: int, objective: str = "ce") -> torch.Tensor:
    """The episode run to its end through the differentiable training step; the objective at its end (a graph
    to phi through every step: the full-horizon meta-loss): validation CE, or with ``objective="error"`` the
    smooth error ``1 - softmax(logits / SMOOTH_ERROR_TEMPERATURE)[label]``, on ``n_val`` validation images."""
    while not ep.done:
        train_step(operator, ep, differentiable=True)
    logits, y = _val_logits(ep, n_val)
    if objective == "ce":
        return F.cross_entropy(logits, y)
    return 1 - F.softmax(logits / SMOOTH_ERROR_TEMPERATURE, 1).gather(1, y[:, None]).mean()


def episode_loss(ep: Episode, n_val: int, objective: str = "ce") -> float:
    """The student's validation CE, or error rate with ``objective="error"`` (eval mode, running
    BatchNorm statistics), on ``n_val`` validation images drawn from (episode seed, step), so both
    members of an antithetic pair see the same images; a diverged episode scores ``DIVERGED_LOSS``
    (CE) or 0.9 (error)."""
    with torch.no_grad():
        logits, yv = _val_logits(ep, n_val)
        ce = float(F.cross_entropy(logits, yv))
    ep.diverged = ep.diverged or not math.isfinite(ce)
    if ep.diverged:
        return DIVERGED_LOSS if objective == "ce" else 0.9
    return ce if objective == "ce" else float((logits.argmax(1) != yv).float().mean())


def episode_end_loss(operator: LSTMOperator, ep: Episode, n_val: int, objective: str = "ce") -> float:
    """Runs the episode to its end (no graph), then :func:`episode_loss`."""
    advance(operator, ep, ep.length - ep.step)
    return episode_loss(ep, n_val, objective)


class OperatorTask:
    """Meta-training's :class:`l2o_kd.estimators.Task`: particles are :class:`Episode` s of a student
    drawn from ``cfg.students`` (by the particle's key), seeded in the meta-training range."""

    def __init__(self, splits: Splits, logits: torch.Tensor, cfg: MetaConfig, operator: LSTMOperator):
        self.splits, self.logits, self.cfg = splits, logits, cfg
        self.students = cfg.students.split(",")
        self._init_operator = operator  # for init() only: the state's shapes and start values do not depend on phi
        self.loaders = episode_loaders(splits, cfg)

    def new_particle(self, key: int, length: int) -> Episode:
        student = random.Random(self.cfg.seed * 7919 + key).choice(self.students)
        seed = seed_ranges.META_TRAIN.start + self.cfg.seed * 100_000 + key
        return Episode(self.splits, self.logits, self._init_operator, student, seed=seed, length=length, cfg=self.cfg, loaders=self.loaders)

    def unroll(self, net, ep: Episode, k: int) -> torch.Tensor:
        if self.cfg.method == "full":  # k is the whole episode (no truncation)
            return unroll_whole(LSTMOperator(net), ep, self.cfg.es_eval, self.cfg.es_objective)
        return unroll(LSTMOperator(net), ep, k)

    def advance(self, net, ep: Episode, k: int) -> None:
        advance(LSTMOperator(net), ep, k)

    def advance_all(self, moves: list[tuple[nn.Module, Episode, int]]) -> None:
        """With ``cfg.vmap``, the particles of one student, step, length and k advanced together
        (:func:`advance_together`); else one by one."""
        if not self.cfg.vmap:
            for net, ep, k in moves:
                self.advance(net, ep, k)
            return
        groups: dict[tuple, list] = {}
        for net, ep, k in moves:
            groups.setdefault((ep.student, ep.step, ep.length, k), []).append((net, ep))
        for (*_, k), members in groups.items():
            advance_together([net for net, _ in members], [ep for _, ep in members], k)

    def loss(self, ep: Episode) -> float:
        return episode_loss(ep, self.cfg.es_eval, self.cfg.es_objective)

    def detach(self, ep: Episode) -> None:
        ep.detach()

    def snapshot(self, ep: Episode) -> dict:
        return ep.snapshot()

    def restore(self, snap: dict) -> Episode:
        return Episode.restore(snap, self.splits, self.logits, self._init_operator, self.cfg, self.loaders)

    def describe(self, ep: Episode) -> dict[str, float]:
        return {"beta": float(ep.state["beta"]), "temperature": float(ep.state["temperature"]), "step_scale": float(ep.state["scale"]),
                "episode_length": ep.length, "diverged": float(ep.diverged)}


def make_estimator(cfg: MetaConfig, task, next_key) -> GradientEstimator:
    """The estimator of ``cfg.method`` over ``task``; ``next_key()`` numbers the particles."""
    schedule = TruncationSchedule(tuple(cfg.lengths), cfg.unroll)
    trained = lambda name: name.startswith(ES_PARAMS[cfg.es_params])
    if cfg.method in ("tbptt", "full"):  # full: TBPTT whose one truncation is the whole episode
        return TBPTT(task, schedule if cfg.method == "tbptt" else TruncationSchedule(schedule.lengths, None), next_key, cfg.pairs, trained)
    kind = ES if cfg.method == "es" else PES
    return kind(task, schedule, next_key, cfg.pairs, sigma=cfg.sigma, noise_seed=cfg.seed, trained=trained)


# ----------------------------------------------------------------------------------------------
# The meta-training loop


def meta_train(cfg: MetaConfig, resume: bool = False, splits: Splits | None = None, dist: Dist | None = None) -> dict:
    """Meta-train the operator; under torchrun (``dist``) every rank runs its own episodes, their
    meta-gradients are averaged before each meta-step, and rank 0 validates and writes."""
    run = MetaTraining(cfg, resume, splits, dist)
    if run.meta_step == 0:
        run.validate()  # the starting operator is a candidate too
    while not run.done():
        run.take_meta_step()
    return run.finish()


class MetaTraining:
    """One meta-training run: its operator and meta-optimizer, its estimator's particles, its counters (all
    resumable), meta-validation and the best operator so far."""

    def __init__(self, cfg: MetaConfig, resume: bool, splits: Splits | None, dist: Dist | None):
        cfg.validate()
        for student in cfg.students.split(",") + cfg.val_student_list:
            check_model(student)
        self.cfg, self.dist, self.main = cfg, dist, dist is None or dist.main
        self.run_dir = Path(cfg.runs_dir) / cfg.run_name
        self.state_path = self.run_dir / "meta_checkpoint.pt"
        self.best_path = Path(cfg.out) if cfg.out else self.run_dir / "operator-best.pt"
        if self.state_path.exists() and not resume:
            raise UserError(f"{self.run_dir} already holds a meta-training run: pass --resume or another --run-name")
        resume = resume and self.state_path.exists()
        torch.manual_seed(cfg.seed)
        self.splits = splits or load_splits(cfg.dataset, cfg.data_root)
        teacher_file = teacher_path(cfg.teacher)
        logits = teacher_logits(load_model_checkpoint(teacher_file, cfg.device)[0], teacher_file, self.splits, cfg.device,
                                progress=cfg.progress)["train"].to(cfg.device)
        self._fingerprint(teacher_file, resume)
        self.net = starting_operator(cfg).net
        self.operator = LSTMOperator(self.net)
        self.meta_opt = torch.optim.Adam(self.net.parameters(), lr=cfg.meta_lr)
        self.meta_step, self.episode, self.skipped, self.best, self.wall = 0, 0, 0, -1.0, 0.0
        if resume:
            self._restore()
        self.log = RunLog(self.run_dir, {**asdict(cfg), "operator": self.operator.config()}, resume_step=self.meta_step, write=self.main)
        self.estimator = make_estimator(cfg, OperatorTask(self.splits, logits, cfg, self.operator), self.next_key)
        self.estimator_path = self.run_dir / f"estimator-rank{dist.rank if dist else 0}.pt"
        if self.meta_step:
            self.episode = _resume_estimator(self.estimator, self.estimator_path, self.meta_step, self.episode)
        self.adam_cache: dict = {}  # meta-validation's reference Adam runs do not change
        self.bar = tqdm(total=cfg.meta_steps, initial=self.meta_step, desc=f"meta-train ({self.estimator.name})",
                        disable=not (cfg.progress and self.main), dynamic_ncols=True)
        self.t_start = time.perf_counter() - self.wall

    def _fingerprint(self, teacher_file: Path, resume: bool) -> None:
        """A resumed run must be the same experiment; a fresh run records what decides it."""
        cfg = self.cfg
        decisive = {**cfg.decisive(), "teacher": file_digest(teacher_file), "init": file_digest(cfg.init) if cfg.init else None}
        if resume:
            if (self.run_dir / FINGERPRINT).exists():  # (a run saved before fingerprints is not checked)
                check_fingerprint(self.run_dir, decisive, "meta-training run")
        elif self.main:
            record_fingerprint(self.run_dir, decisive)

    def _restore(self) -> None:
        ck = load_checkpoint(self.state_path, kind="operator")
        try:
            self.net.load_state_dict(ck["weights"])
            self.meta_opt.load_state_dict(ck["meta_optimizer"])
        except (RuntimeError, ValueError) as exc:  # another --hidden, or a run saved by an older operator
            raise UserError(f"{self.state_path} does not fit this operator ({str(exc).splitlines()[0]}): start a new --run-name") from exc
        progress = ck["progress"]
        self.meta_step, self.episode, self.skipped, self.best, self.wall = (
            progress[k] for k in ("meta_step", "episode", "skipped", "best_val_acc", "wall_s"))

    def next_key(self) -> int:
        """A new particle's key: distinct on every rank, counted in ``episode`` (saved)."""
        world, rank = (self.dist.world, self.dist.rank) if self.dist else (1, 0)
        self.episode += 1
        return (self.episode - 1) * world + rank

    def save_progress(self) -> None:
        """This rank's estimator (its particles in progress: every rank) and the operator and
        meta-optimizer (rank 0). The estimator is written first: a kill between the two writes leaves
        an estimator from a later meta-step, which resume then ignores (fresh particles)."""
        save_atomic({"meta_step": self.meta_step, "estimator": self.estimator.state_dict(), "next_key": self.episode}, self.estimator_path)
        if self.main:
            progress = {"meta_step": self.meta_step, "episode": self.episode, "skipped": self.skipped, "best_val_acc": self.best,
                        "wall_s": self.wall}
            self.operator.save(self.state_path, meta_optimizer=self.meta_opt.state_dict(), progress=progress)

    def validate(self) -> None:
        """Meta-validation, its seeds shared among the ranks; the best operator so far (the initial one
        included) is kept by rank 0."""
        self.wall = time.perf_counter() - self.t_start
        if self.dist:
            self.dist.check_identical(list(self.net.parameters()), "operator weights")
        res = meta_validate(self.operator, self.cfg, self.splits, self.run_dir / "metaval" / f"step{self.meta_step}", self.adam_cache, self.dist)
        if self.main:
            self.log.scalars(self.meta_step, res, "metaval/")
            if res["lstm_val_acc"] > self.best:
                self.best = res["lstm_val_acc"]
                self.operator.save(self.best_path, meta={"meta_step": self.meta_step, "val_acc": self.best, "config": asdict(self.cfg)})
            self.log.row({"step": self.meta_step, **res, "best_val_acc": self.best, "skipped": self.skipped, "wall_s": round(self.wall, 1)})
        self.save_progress()

    def done(self) -> bool:
        return self.meta_step >= self.cfg.meta_steps or _out_of_time(self.cfg, self.t_start, self.dist)

    def take_meta_step(self) -> None:
        """One meta-gradient estimate and Adam step (clipped); a non-finite estimate is skipped and counted."""
        self.meta_opt.zero_grad()
        grads, stats = self.estimator.estimate(self.net, self.meta_step / self.cfg.meta_steps)
        finite = grads is not None
        if self.dist:
            finite = not self.dist.any(not finite)  # one rank's non-finite step is skipped by all
        if not finite:  # (the estimator restarted the particle involved)
            self._skip()
            return
        if self.dist:
            grads = self.dist.average(grads)
        for p, g in zip(self.net.parameters(), grads):
            p.grad = g
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.clip)
        self.meta_opt.step()
        self.log.scalars(self.meta_step, {**stats, "grad_norm": grad_norm.item()}, "meta/")
        self.meta_step += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{stats['loss']:.3f}", particles=self.episode)
        if self.meta_step % self.cfg.validate_every == 0 or self.meta_step == self.cfg.meta_steps:
            self.validate()

    def _skip(self) -> None:
        self.skipped += 1
        self.log.scalars(self.meta_step, {"skipped": self.skipped}, "meta/")
        if self.skipped >= MAX_SKIPPED and self.skipped > self.meta_step:  # most meta-gradients are not finite: nothing is learned
            self.save_progress()
            raise UserError(f"meta-training stopped: {self.skipped} of {self.skipped + self.meta_step} meta-gradients were not finite "
                            f"(the run so far is saved in {self.run_dir}); try a smaller --meta-lr or --base-scale")

    def finish(self) -> dict:
        self.wall = time.perf_counter() - self.t_start
        self.save_progress()
        self.bar.close()
        self.log.close()
        return {"meta_steps": self.meta_step, "best_val_acc": self.best, "skipped": self.skipped, "wall_s": self.wall, "best": str(self.best_path)}


def starting_operator(cfg: MetaConfig) -> LSTMOperator:
    """The operator meta-training starts from: ``--init``'s (its own config wins over --hidden, --base-scale, ...)
    or a fresh one; refused when ``--es-params`` names weights it lacks or ``--vmap`` cannot run it."""
    if cfg.init:
        net = load_operator(cfg.init, cfg.device).net
    else:
        net = LSTMOperatorNet(LSTMOperatorConfig(hidden=cfg.hidden, base_scale=cfg.base_scale, normalize_update=cfg.normalize_update,
                                                 per_coordinate=cfg.per_coordinate, rms_floor=cfg.rms_floor, mix=cfg.mix)).to(cfg.device)
    missing = [p for p in ES_PARAMS[cfg.es_params] if not any(name.startswith(p) for name, _ in net.named_parameters())]
    if missing:
        raise UserError(f"--es-params {cfg.es_params}: this operator (per-coordinate part {net.cfg.per_coordinate!r}) has no weights {', '.join(missing)}")
    if cfg.vmap and net.cfg.per_coordinate != "mlp":  # nn.LSTM over coordinates has no batching rule (the mlp's is written out)
        raise UserError(f"--vmap: this operator's per-coordinate part {net.cfg.per_coordinate!r} does not run under vmap; use --per-coordinate mlp")
    return LSTMOperator(net)


MAX_SKIPPED = 10  # meta-training stops once at least this many meta-steps were skipped as non-finite, and more than were taken


def _resume_estimator(estimator: GradientEstimator, path: Path, meta_step: int, next_key: int) -> int:
    """The estimator's particles at the checkpoint and this rank's particle counter (ranks count their
    own: a restarted particle on one rank moves only its counter); fresh particles and rank 0's counter
    when the file is missing or from another meta-step (killed between the two writes of a checkpoint)."""
    if not path.exists():
        return next_key
    saved = torch.load(path, weights_only=True, map_location="cpu")
    if saved["meta_step"] != meta_step:
        return next_key
    estimator.load_state_dict(saved["estimator"])
    return saved.get("next_key", next_key)


def _out_of_time(cfg: MetaConfig, t_start: float, dist: Dist | None) -> bool:
    late = cfg.minutes is not None and time.perf_counter() - t_start >= 60 * cfg.minutes
    return dist.any(late) if dist else late  # all ranks stop together


def meta_validate(operator: Operator, cfg: MetaConfig, splits: Splits, out_dir: Path, adam_cache: dict | None = None,
                  dist: Dist | None = None) -> dict:
    """The operator and the reference Adam on held-out seeds of each meta-validation student at
    ``val_horizon`` steps; mean val accuracy of each over the (student, seed) runs, a diverged run
    counting 0 (Adam's runs do not change between validations: ``adam_cache`` keeps them), and the
    operator's mean per student when there are several. Under torchrun each rank runs its share."""
    adam_cache = {} if adam_cache is None else adam_cache
    runs = [(student, seed) for student in cfg.val_student_list for seed in cfg.val_seed_list]
    accs = torch.zeros(2, len(runs), dtype=torch.float64)  # rows: lstm, adam
    for i, (student, seed) in enumerate(runs):
        if dist and i % dist.world != dist.rank:
            continue
        for row, (name, op) in enumerate((("lstm", operator), ("adam", Adam(lr=cfg.adam_lr)))):
            if name == "adam" and (student, seed) in adam_cache:
                accs[row, i] = adam_cache[student, seed]
                continue
            tc = TrainConfig(model=student, dataset=cfg.dataset, teacher=cfg.teacher, kd_form=cfg.kd_form, operator=name, steps=cfg.val_horizon,
                             batch_size=cfg.batch_size, seed=seed, device=cfg.device, runs_dir=str(out_dir),
                             run_name=f"{name}-s{seed}" if student == "tiny" else f"{name}-{student}-s{seed}", progress=False, log_every=10)
            try:
                accs[row, i] = train(tc, splits=splits, operator=op)["val_acc"]
            except Diverged:  # a diverging operator is a bad operator, not a crash of meta-training
                accs[row, i] = 0.0
            if name == "adam":
                adam_cache[student, seed] = float(accs[row, i])
    if dist:  # every run was made by exactly one rank; the others hold zeros there
        accs = dist.average([accs])[0] * dist.world
    lstm, adam = accs.mean(1).tolist()
    per_student = {}
    if len(cfg.val_student_list) > 1:
        n = len(cfg.val_seed_list)
        per_student = {f"lstm_val_acc_{student}": float(accs[0, j * n:(j + 1) * n].mean()) for j, student in enumerate(cfg.val_student_list)}
    return {"lstm_val_acc": lstm, "adam_val_acc": adam, "lstm_val_acc_std": float(accs[0].std()) if len(runs) > 1 else 0.0, **per_student}
