"""Meta-training of the learned operator across short distillation episodes, by one of two estimators
of the meta-gradient (``--method``):

* ``tbptt``: truncated backpropagation through the unrolled training (below);
* ``es``: antithetic evolution strategies on the validation loss at the *end* of whole episodes
  (Salimans et al. 2017; Metz et al. 2019), free of the short-horizon bias of truncated unrolls.

An episode is a fresh student (drawn from a small family, seeded) trained by the operator on
minibatches of the train split with cached teacher logits. Every ``unroll`` steps the mean
validation cross-entropy of the student over those steps (val split minibatches) is backpropagated
into the operator's weights phi, the meta-optimizer (Adam, clipped) steps, and the episode goes on
from detached tensors, so memory stays bounded however long the episode is.

The gradient fed to the operator is built in logit space,

    g = J_s^T [ (1 - beta) * dCE/ds + beta * d(T^2 KL)/ds (T) ]    (T^2 KL: KL alone with --kd-form paper),

with the student Jacobian ``J_s`` taken at detached weights (first order) but the bracket kept
differentiable in beta and T: the meta-gradient then reaches the head that chooses beta_t and T_t
(with fully detached gradients it would be exactly zero, since beta and T act only through g).

Truncated unrolls are biased towards the short term (Wu et al. 2018): measured here, they shrink
the step scale, beta and T and make the operator worse at longer horizons. ES instead perturbs phi
by ``+-sigma*eps``, runs the same episode (same student, same batches) with both operators to its
end, and estimates ``grad_phi E[L] ~ (L+ - L-) / (2 sigma) * eps``: no backpropagation, no graph,
an unbiased gradient of the Gaussian-smoothed end-of-episode validation loss.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import seeds as seed_ranges
from .checkpoint import load_checkpoint, save_atomic
from .config import ES_PARAMS, MetaConfig, TrainConfig
from .data import Normalize, Splits, load_splits
from .distill import batch_ce, kd_gradient
from .distributed import Dist
from .errors import Diverged, UserError
from .fingerprint import FILE as FINGERPRINT
from .fingerprint import check_fingerprint, file_digest, record_fingerprint
from .models import apply, build_model, split_state
from .operators import Adam, Operator, StepContext
from .operators.learned import LSTMOperator, LSTMOperatorConfig, LSTMOperatorNet, load_operator
from .runlog import RunLog
from .teacher import load_model_checkpoint, teacher_logits, teacher_path
from .train import train


class Episode:
    """A student being trained by the operator: its tensors, the operator's state and a batch stream."""

    def __init__(self, splits: Splits, logits: torch.Tensor, operator: LSTMOperator, student: str, seed: int, length: int, cfg: MetaConfig):
        self.model = build_model(student, seed=seed).to(cfg.device)
        self.params, self.buffers = split_state(self.model)
        self.state = operator.init(self.params)
        self.splits, self.logits, self.cfg = splits, logits, cfg
        self.step, self.length, self.student, self.seed = 0, length, student, seed
        self.diverged = False
        self.gen = torch.Generator().manual_seed(seed)
        self.normalize = Normalize(splits.dataset.mean, splits.dataset.std, cfg.device)

    @property
    def done(self) -> bool:
        return self.step >= self.length

    def batch(self, split: str):
        """A minibatch drawn with replacement by the episode's generator: (normalized x, y, indices)."""
        idx = torch.randint(len(self.splits.split(split)[1]), (self.cfg.batch_size,), generator=self.gen)
        return *self.images(split, idx), idx

    def images(self, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images ``idx`` of ``split``, normalized, and their labels, on the episode's device."""
        x, y = self.splits.split(split)
        return self.normalize(x[idx]), y[idx].to(self.cfg.device)

    def snapshot(self) -> dict:
        """Everything needed to continue this episode exactly (for resumable meta-training)."""
        return {"student": self.student, "seed": self.seed, "length": self.length, "step": self.step, "params": self.params,
                "buffers": self.buffers, "state": self.state, "generator": self.gen.get_state()}

    @classmethod
    def restore(cls, snap: dict, splits: Splits, logits: torch.Tensor, operator: LSTMOperator, cfg: MetaConfig) -> Episode:
        ep = cls(splits, logits, operator, snap["student"], snap["seed"], snap["length"], cfg)
        dev = cfg.device
        ep.step = snap["step"]
        ep.params, ep.buffers, ep.state = ({k: v.to(dev) for k, v in snap[key].items()} for key in ("params", "buffers", "state"))
        ep.gen.set_state(snap["generator"])
        return ep

    def detach(self) -> None:
        """The truncation boundary: nothing computed so far stays in the graph."""
        self.params = {k: v.detach() for k, v in self.params.items()}
        self.state = {k: v.detach() for k, v in self.state.items()}


def train_step(operator: LSTMOperator, ep: Episode) -> None:
    """One operator step of the episode on a train minibatch, with the KD (beta, T) the operator chose."""
    x, y, idx = ep.batch("train")
    kd = operator.kd(ep.state)
    grads, ce, kdl = kd_gradient(ep.model, ep.params, ep.buffers, x, y, ep.logits[idx.to(ep.logits.device)], kd.beta, kd.temperature,
                                 ep.cfg.second_order, ep.cfg.kd_form)
    beta = float(kd.beta.detach())
    ctx = StepContext(ep.step, ep.length, (1 - beta) * ce + beta * kdl, ce, kdl)
    ep.params, ep.state, _ = operator.step(ep.params, grads, ep.state, ctx)
    ep.step += 1


def unroll(operator: LSTMOperator, ep: Episode, k: int) -> torch.Tensor:
    """``k`` operator steps of an episode; returns the mean validation CE after each (a graph to phi)."""
    losses = []
    for _ in range(min(k, ep.length - ep.step)):
        train_step(operator, ep)
        xv, yv, _ = ep.batch("val")
        losses.append(batch_ce(ep.model, ep.params, ep.buffers, xv, yv))
    return torch.stack(losses).mean()


DIVERGED_LOSS = 10.0  # end-of-episode loss counted for a diverged episode (chance is ln 10 = 2.3)


def episode_end_loss(operator: LSTMOperator, ep: Episode, n_val: int, objective: str = "ce") -> float:
    """Runs the episode to its end, then the student's validation CE, or error rate with
    ``objective="error"`` (eval mode, running BatchNorm statistics), on ``n_val`` images drawn by the
    episode's generator; a diverged episode scores ``DIVERGED_LOSS`` (CE) or 0.9 (error)."""
    while not ep.done:
        train_step(operator, ep)
        ep.detach()
    xv, yv = ep.images("val", torch.randperm(len(ep.splits.split("val")[1]), generator=ep.gen)[:n_val])
    with torch.no_grad():
        logits = apply(ep.model, ep.params, ep.buffers, xv, train=False)
        ce = float(F.cross_entropy(logits, yv))
    ep.diverged = not math.isfinite(ce)
    if ep.diverged:
        return DIVERGED_LOSS if objective == "ce" else 0.9
    return ce if objective == "ce" else float((logits.argmax(1) != yv).float().mean())


def es_gradient(net: nn.Module, loss_of: Callable[[nn.Module], float], sigma: float, gen: torch.Generator,
                trained: Callable[[str], bool] = lambda name: True) -> tuple[list[torch.Tensor], tuple[float, float]]:
    """One antithetic ES estimate of the gradient of ``loss_of`` (smoothed by N(0, sigma^2)) w.r.t. the
    parameters of ``net``: ``(L(phi + sigma eps) - L(phi - sigma eps)) / (2 sigma) * eps``. Returns it
    and the two losses. ``loss_of`` gets a perturbed copy of ``net``; for a low-variance estimate it
    must evaluate both on the same episode (common random numbers). Parameters whose name fails
    ``trained`` are not perturbed (their estimate is zero): fewer dimensions, less variance."""
    eps = [torch.randn(p.shape, generator=gen).to(p) * trained(name) for name, p in net.named_parameters()]
    losses = []
    for sign in (1.0, -1.0):
        probe = copy.deepcopy(net).requires_grad_(False)
        with torch.no_grad():
            for p, e in zip(probe.parameters(), eps):
                p.add_(sign * sigma * e)
        losses.append(loss_of(probe))
    coeff = (losses[0] - losses[1]) / (2 * sigma)
    return [coeff * e for e in eps], (losses[0], losses[1])


# ----------------------------------------------------------------------------------------------
# The meta-training loop


def meta_train(cfg: MetaConfig, resume: bool = False, splits: Splits | None = None, dist: Dist | None = None) -> dict:
    """Meta-train the operator; under torchrun (``dist``) every rank runs its own episodes, their
    meta-gradients are averaged before each meta-step, and rank 0 validates and writes."""
    cfg.validate()
    main = dist is None or dist.main
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    state_path, best_path = run_dir / "meta_checkpoint.pt", Path(cfg.out) if cfg.out else run_dir / "operator-best.pt"
    if state_path.exists() and not resume:
        raise UserError(f"{run_dir} already holds a meta-training run: pass --resume or another --run-name")
    torch.manual_seed(cfg.seed)
    splits = splits or load_splits(cfg.dataset, cfg.data_root)
    teacher_file = teacher_path(cfg.teacher)
    teacher, _ = load_model_checkpoint(teacher_file, cfg.device)
    logits = teacher_logits(teacher, teacher_file, splits, cfg.device, progress=cfg.progress)["train"].to(cfg.device)
    decisive = {**cfg.decisive(), "teacher": file_digest(teacher_file), "init": file_digest(cfg.init) if cfg.init else None}
    if resume and state_path.exists():
        if (run_dir / FINGERPRINT).exists():  # the same experiment only (a run saved before fingerprints is not checked)
            check_fingerprint(run_dir, decisive, "meta-training run")
    elif main:  # a fresh run: its own fingerprint
        record_fingerprint(run_dir, decisive)

    if cfg.init:  # continue from a saved operator (its own config wins over --hidden/--base-scale)
        net = load_operator(cfg.init, cfg.device).net
    else:
        net = LSTMOperatorNet(LSTMOperatorConfig(hidden=cfg.hidden, base_scale=cfg.base_scale)).to(cfg.device)
    operator = LSTMOperator(net)
    meta_opt = torch.optim.Adam(net.parameters(), lr=cfg.meta_lr)
    meta_step, episode_idx, skipped, best, wall = 0, 0, 0, -1.0, 0.0
    if resume and state_path.exists():
        ck = load_checkpoint(state_path, kind="operator")
        try:
            net.load_state_dict(ck["weights"])
            meta_opt.load_state_dict(ck["meta_optimizer"])
        except (RuntimeError, ValueError) as exc:  # another --hidden, or a run saved by an older operator
            raise UserError(f"{state_path} does not fit this operator ({str(exc).splitlines()[0]}): start a new --run-name") from exc
        meta_step, episode_idx, skipped, best, wall = (ck["progress"][k] for k in ("meta_step", "episode", "skipped", "best_val_acc", "wall_s"))
    log = RunLog(run_dir, {**asdict(cfg), "operator": operator.config()}, resume_step=meta_step, write=main)
    students = cfg.students.split(",")

    def new_episode() -> Episode:
        frac = meta_step / cfg.meta_steps
        length = cfg.lengths[min(int(frac * len(cfg.lengths)), len(cfg.lengths) - 1)]
        rng = random.Random(cfg.seed * 7919 + episode_key())
        return Episode(splits, logits, operator, rng.choice(students), seed=seed_ranges.META_TRAIN.start + cfg.seed * 100_000 + episode_key(), length=length, cfg=cfg)

    def episode_key() -> int:
        return episode_idx * (dist.world if dist else 1) + (dist.rank if dist else 0)  # distinct episodes on every rank

    episode_path = run_dir / f"episode-rank{dist.rank if dist else 0}.pt"

    def save_progress() -> None:
        """The operator and meta-optimizer (rank 0) and this rank's episode in progress (every rank;
        ES meta-steps run whole episodes, so there is none in progress between them)."""
        if ep is not None:
            save_atomic({"meta_step": meta_step, "episode": ep.snapshot()}, episode_path)
        if main:
            operator.save(state_path, meta_optimizer=meta_opt.state_dict(),
                          progress={"meta_step": meta_step, "episode": episode_idx, "skipped": skipped, "best_val_acc": best, "wall_s": wall})

    adam_cache: dict = {}

    def validate() -> None:
        """Meta-validation, its seeds shared among the ranks; the best operator so far (the initial one
        included) is kept by rank 0."""
        nonlocal best, wall
        wall = time.perf_counter() - t_start
        if dist:
            dist.check_identical(list(net.parameters()), "operator weights")
        res = meta_validate(operator, cfg, splits, run_dir / "metaval" / f"step{meta_step}", adam_cache, dist)
        if main:
            log.scalars(meta_step, res, "metaval/")
            if res["lstm_val_acc"] > best:
                best = res["lstm_val_acc"]
                operator.save(best_path, meta={"meta_step": meta_step, "val_acc": best, "config": asdict(cfg)})
            log.row({"step": meta_step, **res, "best_val_acc": best, "skipped": skipped, "wall_s": round(wall, 1)})
        save_progress()

    def tbptt_gradient() -> dict | None:
        """Backpropagates one truncated unroll into p.grad; None when it is not finite."""
        meta_loss = unroll(operator, ep, cfg.unroll)
        if not bool(torch.isfinite(meta_loss)):
            return None
        meta_loss.backward()
        ep.detach()
        if not all(bool(torch.isfinite(p.grad).all()) for p in net.parameters() if p.grad is not None):
            return None
        return {"loss": meta_loss.item(), "episode_length": ep.length, "beta": float(ep.state["beta"]),
                "temperature": float(ep.state["temperature"]), "step_scale": float(ep.state["scale"])}

    def es_meta_gradient() -> dict:
        """The mean of ``cfg.pairs`` antithetic ES estimates into p.grad; each pair runs one fresh
        episode twice, once with each perturbed operator."""
        nonlocal episode_idx
        total, losses, finals = None, [], []
        trained = lambda name: name.startswith(ES_PARAMS[cfg.es_params])

        def end_loss(probe: nn.Module) -> float:
            ep = new_episode()  # the same student, initialization and batches for both members of the pair
            loss = episode_end_loss(LSTMOperator(probe), ep, cfg.es_eval, cfg.es_objective)
            finals.append({"beta": float(ep.state["beta"]), "temperature": float(ep.state["temperature"]),
                           "step_scale": float(ep.state["scale"]), "episode_length": ep.length, "diverged": ep.diverged})
            return loss

        for _ in range(cfg.pairs):
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + episode_key())
            grads, pair = es_gradient(net, end_loss, cfg.sigma, gen, trained)
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
            losses.append(pair)
            episode_idx += 1
        for p, g in zip(net.parameters(), total):
            p.grad = g / cfg.pairs
        mean = lambda xs: sum(xs) / len(xs)
        return {"loss": mean([sum(pair) / 2 for pair in losses]), "loss_diff": mean([a - b for a, b in losses]),
                **{k: mean([st[k] for st in finals]) for k in ("beta", "temperature", "step_scale", "episode_length")},
                "diverged": sum(st["diverged"] for st in finals)}

    ep = None
    if cfg.method == "tbptt":
        ep = (_resumed_episode(episode_path, meta_step, splits, logits, operator, cfg) if meta_step else None) or new_episode()
    bar = tqdm(total=cfg.meta_steps, initial=meta_step, desc="meta-train", disable=not (cfg.progress and main), dynamic_ncols=True)
    t_start = time.perf_counter() - wall
    if meta_step == 0:
        validate()
    while meta_step < cfg.meta_steps and not _out_of_time(cfg, t_start, dist):
        meta_opt.zero_grad()
        stats = es_meta_gradient() if cfg.method == "es" else tbptt_gradient()
        finite = stats is not None
        if dist:
            finite = not dist.any(not finite)  # one rank's non-finite step is skipped by all
        if not finite:  # skip the step, restart the episode
            skipped += 1
            meta_opt.zero_grad()
            log.scalars(meta_step, {"skipped": skipped}, "meta/")
            episode_idx += 1
            if ep is not None:
                ep = new_episode()
            continue
        if dist:
            with_grad = [p for p in net.parameters() if p.grad is not None]
            for p, g in zip(with_grad, dist.average([p.grad for p in with_grad])):
                p.grad = g
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip)
        meta_opt.step()
        log.scalars(meta_step, {**stats, "grad_norm": grad_norm.item()}, "meta/")
        meta_step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", ep=f"{ep.student}:{ep.step}/{ep.length}" if ep else f"{episode_idx} episodes")
        if ep is not None and ep.done:
            episode_idx += 1
            ep = new_episode()
        if meta_step % cfg.validate_every == 0 or meta_step == cfg.meta_steps:
            validate()
    wall = time.perf_counter() - t_start
    save_progress()
    bar.close()
    log.close()
    return {"meta_steps": meta_step, "best_val_acc": best, "skipped": skipped, "wall_s": wall, "best": str(best_path)}


def _resumed_episode(path: Path, meta_step: int, splits, logits, operator, cfg: MetaConfig) -> Episode | None:
    """The episode that was in progress at the checkpoint, or None (then a fresh one starts)."""
    if not path.exists():
        return None
    saved = torch.load(path, weights_only=True, map_location="cpu")
    if saved["meta_step"] != meta_step:  # killed between the two writes: the episode is from another step
        return None
    return Episode.restore(saved["episode"], splits, logits, operator, cfg)


def _out_of_time(cfg: MetaConfig, t_start: float, dist: Dist | None) -> bool:
    late = cfg.minutes is not None and time.perf_counter() - t_start >= 60 * cfg.minutes
    return dist.any(late) if dist else late  # all ranks stop together


def meta_validate(operator: Operator, cfg: MetaConfig, splits: Splits, out_dir: Path, adam_cache: dict | None = None,
                  dist: Dist | None = None) -> dict:
    """The operator and the reference Adam on held-out seeds at ``val_horizon`` steps; mean val
    accuracy of each over the seeds, a diverged run counting 0 (Adam's runs do not change between
    validations: ``adam_cache`` keeps them). Under torchrun each rank runs its share of the seeds."""
    adam_cache = {} if adam_cache is None else adam_cache
    seeds = cfg.val_seed_list
    accs = torch.zeros(2, len(seeds), dtype=torch.float64)  # rows: lstm, adam
    for i, seed in enumerate(seeds):
        if dist and i % dist.world != dist.rank:
            continue
        for row, (name, op) in enumerate((("lstm", operator), ("adam", Adam(lr=cfg.adam_lr)))):
            if name == "adam" and seed in adam_cache:
                accs[row, i] = adam_cache[seed]
                continue
            tc = TrainConfig(model="tiny", dataset=cfg.dataset, teacher=cfg.teacher, kd_form=cfg.kd_form, operator=name, steps=cfg.val_horizon,
                             batch_size=cfg.batch_size, seed=seed, device=cfg.device, runs_dir=str(out_dir), run_name=f"{name}-s{seed}",
                             progress=False, log_every=10)
            try:
                accs[row, i] = train(tc, splits=splits, operator=op)["val_acc"]
            except Diverged:  # a diverging operator is a bad operator, not a crash of meta-training
                accs[row, i] = 0.0
            if name == "adam":
                adam_cache[seed] = float(accs[row, i])
    if dist:  # every seed was run by exactly one rank; the others hold zeros there
        accs = dist.average([accs])[0] * dist.world
    lstm, adam = accs.mean(1).tolist()
    return {"lstm_val_acc": lstm, "adam_val_acc": adam, "lstm_val_acc_std": float(accs[0].std()) if len(seeds) > 1 else 0.0}
