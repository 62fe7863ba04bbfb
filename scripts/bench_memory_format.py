"""Channels-first vs channels-last activations (``l2o_kd.models.MEMORY_FORMAT``): the students' and
teacher's forward and forward+backward time in one process, and how far their logits differ. Not a
test: a measurement (docs/results/step-cost.md).

    python scripts/bench_memory_format.py [--threads 2] [--models tiny,small,resnet8,resnet20] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import l2o_kd.models as models


def interleaved_ms(fns: dict, repeats: int) -> dict:
    """Median milliseconds of each function, called in turn round after round (a drifting machine speed
    hits all alike); 3 warm-up rounds are not counted."""
    times = {k: [] for k in fns}
    for i in range(repeats + 3):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def train_step(model, x, y, fmt) -> None:
    models.MEMORY_FORMAT = fmt
    torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))


def forward(model, x, fmt) -> torch.Tensor:
    models.MEMORY_FORMAT = fmt
    with torch.no_grad():
        return model(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,small,resnet8,resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"median of {args.repeats} interleaved rounds")
    print("| model | fwd+bwd channels-first ms | channels-last ms | speed-up | fwd (no grad) first ms | last ms | speed-up | max rel. logit diff |")
    print("|---|---|---|---|---|---|---|---|")
    shipped = models.MEMORY_FORMAT
    for name in args.models.split(","):
        model = models.build_model(name, seed=0)
        first, last = torch.contiguous_format, torch.channels_last
        ms = interleaved_ms({(kind, fmt): functools.partial(fn, model, *args_, fmt) for kind, fn, args_ in
                             (("fb", train_step, (x, y)), ("f", forward, (x,))) for fmt in (first, last)}, args.repeats)
        logits = {fmt: forward(model, x, fmt) for fmt in (first, last)}
        models.MEMORY_FORMAT = shipped
        (fb0, f0), (fb1, f1) = ((ms[("fb", fmt)], ms[("f", fmt)]) for fmt in (first, last))
        diff = float((logits[last] - logits[first]).abs().max() / logits[first].abs().max())
        print(f"| {name} | {fb0:.1f} | {fb1:.1f} | {fb0 / fb1:.2f}x | {f0:.1f} | {f1:.1f} | {f0 / f1:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
