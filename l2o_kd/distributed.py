"""Data parallelism under ``torchrun``: one student trained by N processes (``gloo`` on CPU, ``nccl``
on CUDA), and meta-training whose meta-gradients are averaged across processes.

Why not the ``DistributedDataParallel`` wrapper: the training loop is functional (parameters live in
a dict passed through ``torch.func.functional_call``), so DDP's autograd hooks on module parameters
would never fire. We do what DDP does, explicitly: every rank takes its shard of each global batch,
computes its gradients, and one flat ``all_reduce`` averages gradients and the step's loss statistics;
every rank then applies the same operator step to the same averaged gradients, so parameters stay
identical without being broadcast. BatchNorm in train mode normalizes with the statistics of the
*global* batch (:class:`CrossRankBatchNorm2d`, a CPU-capable SyncBatchNorm), so N processes give the
result of one process on the same global batch, up to float rounding.
"""

from __future__ import annotations

import atexit
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` job."""

    rank: int
    world: int
    device: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch):
        """This rank's contiguous slice of a global batch (any object with ``x``, ``y``, ``idx``)."""
        n = len(batch.y)
        if n % self.world:
            raise UserError(f"the batch size {n} must be divisible by the {self.world} processes")
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return type(batch)(batch.x[lo:hi], batch.y[lo:hi], batch.idx[lo:hi])

    def average(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The mean over ranks of each tensor, with one collective call."""
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        out, i = [], 0
        for t in tensors:
            out.append(flat[i : i + t.numel()].view_as(t).to(t.dtype))
            i += t.numel()
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (e.g. "stop" or "skip this step")."""
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def check_identical(self, tensors: list[torch.Tensor], what: str) -> None:
        """Raise if ``tensors`` differ between ranks (a desynchronized job)."""
        flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
        lo, hi = flat.clone(), flat.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"{what} differ between ranks (max difference {(hi - lo).abs().max().item():.3g})")


def from_env(device: str) -> Dist | None:
    """Join the ``torchrun`` job described by the environment, or None for a plain single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        atexit.register(_shutdown)
    return Dist(rank=rank, world=world, device=device)


def _shutdown() -> None:
    """Destroy the process group before the interpreter exits: left to implicit teardown, gloo's
    threads can abort the process ("terminate called without an active exception", seen in CI). The
    ranks first wait for each other (gloo: a barrier that gives up after 10 s, when a peer is gone),
    so none tears gloo down while a peer still talks to it (the abort was seen again once with the
    destroy alone)."""
    if dist.is_initialized():
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=10))
        except Exception:  # noqa: BLE001, S110 - a peer already gone: destroy anyway
            pass
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001, S110 - a peer already gone; the process is exiting anyway
            pass


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose train-mode statistics are those of the batch of all ranks together
    (differentiable across ranks, on CPU too); identical to BatchNorm2d in eval mode or alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = x.numel() // x.shape[1] * dist.get_world_size()  # every rank holds an equal shard
        mean = _differentiable_sum(x.sum((0, 2, 3))) / count
        centred = x - mean[None, :, None, None]
        var = _differentiable_sum((centred**2).sum((0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * var * count / max(count - 1, 1))
                self.num_batches_tracked.add_(1)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


def _differentiable_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks whose backward sums the incoming gradients over ranks too."""
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # "deprecated" for a private replacement; this is the public differentiable one
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t)


def cross_rank_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d of ``model`` (in place) by a :class:`CrossRankBatchNorm2d` with the
    same parameters and buffers, so state-dict names are unchanged."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CrossRankBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new.to(next(child.buffers()).device))
        else:
            cross_rank_batchnorm(child)
    return model
