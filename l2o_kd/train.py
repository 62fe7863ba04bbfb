"""The one training loop: ``train-teacher``, ``deploy`` and ``compare`` all run :func:`train`.

Read top to bottom: load data -> build the student -> (teacher logits) -> build the operator ->
resume if asked -> for each step: KD loss with the operator's (beta, T), gradients, operator step ->
evaluate + log + checkpoint every epoch.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint as ckpt_io
from .config import TrainConfig
from .data import BatchLoader, Splits, load_splits
from .device import peak_memory_mb
from .distributed import Dist, cross_rank_batchnorm
from .errors import Diverged, UserError
from .fingerprint import differences, file_digest
from .hypergrad import Batches
from .models import apply, build_model, check_model, split_state
from .operators import Operator, Schedule, StepContext, classic_operator, global_norm
from .runlog import RunLog, read_metrics
from .step import training_step
from .teacher import Teacher, load_model_checkpoint, teacher_path


def run_length(steps: int | None, epochs: float, n_train: int, batch_size: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run: full batches only; ``steps`` wins over ``epochs``."""
    steps_per_epoch = n_train // batch_size
    if steps_per_epoch < 1:
        raise UserError(f"--batch-size {batch_size} is larger than the {n_train} training images")
    return steps_per_epoch, steps or max(1, round(epochs * steps_per_epoch))


# ----------------------------------------------------------------------------------------------
# Pieces of the loop


@torch.no_grad()
def evaluate(model, params, buffers, loader: BatchLoader, dist: Dist | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole split (eval-mode BatchNorm); under torchrun each
    rank's loader holds its share of the split and the per-rank sums are combined."""
    sums = torch.zeros(3, dtype=torch.float64, device=loader.device)  # loss sum, correct, count
    for b in loader.epoch():
        logits = apply(model, params, buffers, b.x, train=False)
        sums[0] += torch.nn.functional.cross_entropy(logits, b.y, reduction="sum").double()
        sums[1] += (logits.argmax(1) == b.y).sum()
        sums[2] += len(b.y)
    if dist is not None:  # the means over ranks have the same ratios as the sums
        sums = dist.average([sums])[0]
    loss_sum, correct, n = sums.tolist()
    return loss_sum / max(n, 1), correct / max(n, 1)


def build_operator(cfg: TrainConfig, steps_per_epoch: int, total_steps: int, device: str) -> Operator:
    if cfg.learned:
        from .operators.learned import load_operator

        return load_operator(cfg.operator, device=device)
    step_size = max(1, round(cfg.lr_step_epochs * steps_per_epoch))
    sched = Schedule(cfg.schedule, step_size=step_size, gamma=cfg.lr_gamma)
    op = classic_operator(cfg.operator, cfg.lr, sched, cfg.momentum, cfg.nesterov, cfg.weight_decay)
    if cfg.tune_kd:
        from .hypergrad import HyperKD

        switch = max(1, round(cfg.extrapolate_after * total_steps))
        op = HyperKD(op, cfg.tune_kd, cfg.beta, cfg.temperature, cfg.hyper_lr, cfg.hyper_clip, cfg.hyper_every, cfg.hyper_unroll, switch,
                     kd_form=cfg.kd_form, clip_mode=cfg.hyper_clip_mode, lookahead=cfg.hyper_lookahead, jvp=cfg.hyper_jvp,
                     greedy_len=cfg.periodic_greedy, follow_len=cfg.periodic_follow)
    return op


def resolve_teacher(cfg: TrainConfig, operator: Operator) -> Path | None:
    wants_kd = cfg.beta > 0 or operator.chooses_kd
    if not wants_kd:
        return None
    return teacher_path(cfg.teacher)


def _prepare_run_dir(cfg: TrainConfig, resume: bool) -> tuple[Path, dict | None]:
    run_dir = Path(cfg.runs_dir) / cfg.name
    path = run_dir / "checkpoint.pt"
    if not resume:
        if path.exists():
            raise UserError(f"{run_dir} already holds a run: pass --resume to continue it or choose another --run-name")
        return run_dir, None
    if not path.exists():
        return run_dir, None  # nothing to resume: start fresh
    return run_dir, ckpt_io.load_checkpoint(path, kind="model")


def run_fingerprint(cfg: TrainConfig, teacher_file: Path | None, operator_given: bool = False) -> dict[str, Any]:
    """What decides the run's result: its decisive config, with the teacher, a learned operator and the
    initial weights by content (their paths do not matter, their bytes do). An operator object given to
    the run (``operator_given``, e.g. one being meta-trained) enters by its label, ``cfg.operator``."""
    learned = file_digest(cfg.operator) if cfg.learned and not operator_given else None
    fingerprint = {**cfg.decisive(), "operator": learned or cfg.operator, "teacher": file_digest(teacher_file)}
    if cfg.init:
        fingerprint["init"] = file_digest(cfg.init)
    return fingerprint


def initial_weights(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Load ``cfg.init``'s weights (a teacher or student checkpoint of the same model) into ``model``
    (``cfg.validate`` has checked the file exists)."""
    saved, ck = load_model_checkpoint(cfg.init)  # (weights that do not fit their own model: one UserError line)
    if ck["model"] != cfg.model:
        raise UserError(f"--init: {cfg.init} holds a {ck['model']!r}, not a {cfg.model!r}")
    model.load_state_dict(saved.state_dict())


def _check_resume(ck: dict, fingerprint: dict[str, Any], run_dir: Path) -> None:
    """Refuse to continue a run whose result-deciding configuration differs from this one (or that
    records none: it was saved by a version of l2o-kd without fingerprints)."""
    saved = ck["config"].get("fingerprint")
    if saved is None:
        raise UserError(f"--resume: the run in {run_dir} records no fingerprint of its configuration: start it again under another --run-name")
    diff = differences(fingerprint, saved)
    if diff:
        both = fingerprint.keys() & saved.keys()
        key, now, then = min(diff, key=lambda d: d[0] not in both)  # one both runs name, if any
        raise UserError(f"--resume: {key} is {now!r} but the run in {run_dir} used {then!r}")


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, resume: bool = False, splits: Splits | None = None, operator: Operator | None = None,
          dist: Dist | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` with ``cfg.operator`` (or the given ``operator`` object, e.g. one being
    meta-trained) and return the last metrics row. With ``dist`` (under torchrun) every rank trains on
    its shard of each batch, gradients are averaged, and only rank 0 writes."""
    run = TrainingRun(cfg, resume, splits, operator, dist)
    if cfg.eval_at_start and not run.resumed:  # (a run resumed from its step-0 checkpoint has that row already)
        run.trajectory.add(0, run.params)
        run.evaluation(_Sums())
    return run.run()


class TrainingRun:
    """One student's run: its data, model tensors, operator and state, teacher, log and checkpoint."""

    def __init__(self, cfg: TrainConfig, resume: bool, splits: Splits | None, operator: Operator | None, dist: Dist | None):
        cfg.validate(check_operator=operator is None)
        check_model(cfg.model)
        self.cfg, self.dist, self.main = cfg, dist, dist is None or dist.main
        dev = self.device = dist.device if dist else cfg.device
        self.run_dir, ck = _prepare_run_dir(cfg, resume)
        torch.manual_seed(cfg.seed)
        torch.backends.cudnn.benchmark = dev.startswith("cuda")
        splits = splits or load_splits(cfg.dataset, cfg.data_root, cfg.download)
        if cfg.train_subset:
            splits = splits.subset(cfg.train_subset)
        self._loaders(splits)
        self.model = self._model(splits.dataset.num_classes)
        self.params, self.buffers = split_state(self.model)
        self.operator = operator or build_operator(cfg, self.steps_per_epoch, self.total_steps, dev)
        if dist and self.operator.needs_batches:
            raise UserError("--tune-kd is not supported under torchrun yet: run hypergradient tuning in one process")
        teacher_file = resolve_teacher(cfg, self.operator)
        self.teacher = Teacher(teacher_file, splits, cfg.augment, dev, progress=cfg.progress and self.main) if teacher_file else None
        fingerprint = run_fingerprint(cfg, teacher_file, operator_given=operator is not None)
        self.state = self.operator.init(self.params)
        self.step, self.wall_s, self.resumed = 0, 0.0, ck is not None
        if ck is not None:
            _check_resume(ck, fingerprint, self.run_dir)
            self.params, self.buffers = ({k: v.to(dev) for k, v in ck[key].items()} for key in ("params", "buffers"))
            self.state = _to_device(ck["train_state"]["operator"], dev)
            self.step, self.wall_s = ck["train_state"]["step"], ck["train_state"]["wall_s"]
        self.config = {**asdict(cfg), "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                       "operator_config": self.operator.config(), "teacher_path": str(teacher_file) if teacher_file else None,
                       "fingerprint": fingerprint}
        self.log = RunLog(self.run_dir, self.config, resume_step=self.step, tensorboard=cfg.tensorboard, write=self.main)
        self.num_classes = splits.dataset.num_classes
        self.trajectory = Trajectory(self.run_dir, cfg.trajectory_every if self.main else 0, keep_upto=self.step)

    def _loaders(self, splits: Splits) -> None:
        """The shuffled training stream, the evaluation splits (this rank's share) and the val stream of hypergradients."""
        cfg, ds = self.cfg, splits.dataset
        kw = dict(mean=ds.mean, std=ds.std, device=self.device, channels_last=cfg.channels_last)
        self.train_loader = BatchLoader(splits.train_x, splits.train_y, cfg.batch_size, shuffle=True, augment=cfg.augment, drop_last=True, **kw)
        self.steps_per_epoch, self.total_steps = run_length(cfg.steps, cfg.epochs, len(splits.train_y), cfg.batch_size)
        self.eval_loaders = {s: BatchLoader(*_share(splits.split(s), self.dist), 1000, shuffle=False, **kw) for s in ("val", "test")}
        self.val_stream = BatchLoader(*splits.split("val"), cfg.batch_size, shuffle=True, drop_last=True, **kw)

    def _model(self, num_classes: int) -> torch.nn.Module:
        model = build_model(self.cfg.model, seed=self.cfg.seed, num_classes=num_classes)
        if self.cfg.init:
            initial_weights(self.cfg, model)
        model = model.to(self.device)
        if self.dist:
            cross_rank_batchnorm(model)
        return model.to(memory_format=torch.channels_last) if self.cfg.channels_last else model

    def save(self) -> None:
        if self.main:
            ckpt_io.save_checkpoint(self.run_dir / "checkpoint.pt", "model", self.config, model=self.cfg.model, num_classes=self.num_classes,
                                    params=self.params, buffers=self.buffers,
                                    train_state={"operator": self.state, "step": self.step, "wall_s": self.wall_s})

    def evaluation(self, sums: _Sums) -> dict[str, Any]:
        """Validation and test metrics at this step, logged, with the checkpoint and trajectory written."""
        row = {"step": self.step, "epoch": self.step / self.steps_per_epoch, **sums.means(), "wall_s": round(self.wall_s, 3),
               "peak_mem_mb": peak_memory_mb(self.device)}
        for split, loader in self.eval_loaders.items():
            row[f"{split}_loss"], row[f"{split}_acc"] = evaluate(self.model, self.params, self.buffers, loader, self.dist)
        self.log.row(row)
        self.trajectory.save()
        self.save()
        return row

    def take_step(self, batch) -> Any:
        """One training step on ``batch`` (this rank's shard of it under torchrun); the step's result."""
        cfg, dist = self.cfg, self.dist
        t_logits = self.teacher.logits(batch) if self.teacher else None
        batches = None
        if self.operator.needs_batches:  # the model, this step's batch and the val batch of this step
            batches = Batches(self.model, self.buffers, batch.x, batch.y, t_logits, functools.partial(_xy, self.val_stream, self.step, cfg.seed + 7))
        out = training_step(self.operator, self.model, self.params, self.buffers, self.state, batch.x, batch.y, t_logits, step=self.step,
                            total_steps=self.total_steps, kd_form=cfg.kd_form, fixed_kd=(cfg.beta, cfg.temperature), amp=cfg.amp,
                            bn_updates=cfg.bn_updates, reduce=dist.average if dist else None, batches=batches, raise_on_nan=True)
        if self.step % cfg.log_every == 0 or self.step % cfg.hist_every == 0:
            _log_step(self.log, self.step, cfg, self.params, out.params, out.grads, out.ctx, out.beta, out.temperature, out.info)
        self.params, self.state = out.params, out.state
        self.step += 1
        self.trajectory.add(self.step, self.params)
        return out

    def run(self) -> dict[str, Any]:
        """Steps to the end of the run, evaluating every ``eval_every`` steps; the last metrics row."""
        cfg, eval_every = self.cfg, self.cfg.eval_every or self.steps_per_epoch
        bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.name, disable=not (cfg.progress and self.main), dynamic_ncols=True,
                   leave=False)
        sums, last_row, t0 = _Sums(), {}, time.perf_counter()
        try:
            while self.step < self.total_steps:
                epoch, offset = divmod(self.step, self.steps_per_epoch)  # a run resumed mid-epoch skips the batches it already took
                for batch in itertools.islice(self.train_loader.epoch(epoch, cfg.seed), offset, None):
                    out = self.take_step(self.dist.shard(batch) if self.dist else batch)
                    sums.add(out.ctx, float(out.stats[3]), float(out.beta), float(out.temperature), out.info)
                    bar.update(1)
                    if self.step % eval_every == 0 or self.step == self.total_steps:
                        if not all(torch.isfinite(p).all() for p in self.params.values()):
                            raise Diverged(self.step, "parameters")
                        self.wall_s += time.perf_counter() - t0
                        last_row, sums = self.evaluation(sums), _Sums()
                        bar.set_postfix(val_acc=f"{last_row['val_acc']:.3f}", loss=f"{last_row['train_loss']:.3f}")
                        t0 = time.perf_counter()
                    if self.step == self.total_steps:
                        break
        finally:
            bar.close()
        self.log.close()
        return last_row or read_metrics(self.run_dir)[-1]  # (resumed a finished run: its last row)


class Trajectory:
    """The flattened student parameters every ``every`` steps (step 0 included), in ``trajectory.pt``
    of the run folder: ``{"steps": LongTensor[n], "params": Tensor[n, P]}`` (float32, on CPU).
    Written atomically with each checkpoint; a resumed run keeps only the points up to its checkpoint."""

    FILE = "trajectory.pt"

    def __init__(self, run_dir: Path, every: int, keep_upto: int):
        self.path, self.every = run_dir / self.FILE, every
        self.steps: list[int] = []
        self.points: list[torch.Tensor] = []
        if every > 0 and keep_upto > 0 and self.path.exists():
            saved = torch.load(self.path, weights_only=True)
            keep = saved["steps"] <= keep_upto
            self.steps, self.points = saved["steps"][keep].tolist(), list(saved["params"][keep])

    def add(self, step: int, params: dict[str, torch.Tensor]) -> None:
        if self.every > 0 and step % self.every == 0:
            self.steps.append(step)
            self.points.append(torch.cat([p.detach().float().flatten() for p in params.values()]).cpu())

    def save(self) -> None:
        if self.every > 0 and self.points:
            ckpt_io.save_atomic({"steps": torch.tensor(self.steps), "params": torch.stack(self.points)}, self.path)


class _Sums:
    """Running means of the per-step numbers between two evaluations."""

    def __init__(self):
        self.n, self.vals = 0, {}

    def add(self, ctx: StepContext, acc: float, beta: float, temperature: float, info: dict) -> None:
        row = {"train_loss": ctx.loss, "train_ce": ctx.ce_loss, "train_kd": ctx.kd_loss, "train_acc": acc,
               "beta": beta, "temperature": temperature, **{k: float(v) for k, v in info.items()}}
        for k, v in row.items():
            self.vals[k] = self.vals.get(k, 0.0) + v
        self.n += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.n for k, v in self.vals.items()} if self.n else {}


def _log_step(log, step, cfg, params, new_params, grads, ctx, beta, temperature, info) -> None:
    if not log.write:
        return
    update = {k: new_params[k] - params[k].detach() for k in params}
    log.scalars(step, {"loss": ctx.loss, "ce": ctx.ce_loss, "kd": ctx.kd_loss, "beta": float(beta),
                       "temperature": float(temperature), "update_norm": global_norm(update).item(),
                       "grad_norm": global_norm(grads).item(), **{k: float(v) for k, v in info.items()}}, "train/")
    if step % cfg.hist_every == 0:
        log.scalars(step, {k: v.norm().item() for k, v in update.items()}, "update_norm/")
        log.histogram(step, "update", torch.cat([u.flatten() for u in update.values()]))


def _share(xy: tuple[torch.Tensor, torch.Tensor], dist: Dist | None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of an evaluation split (every ``world``-th image)."""
    return xy if dist is None else (xy[0][dist.rank :: dist.world], xy[1][dist.rank :: dist.world])


def _xy(loader: BatchLoader, index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    b = loader.batch_at(index, seed)
    return b.x, b.y


def _to_device(tree, device):
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_device(v, device) for v in tree]
    return tree.to(device) if isinstance(tree, torch.Tensor) else tree
