"""Greedy's step on one student, piece by piece (a measurement, not part of the package).

The pieces of ``HyperKD.greedy_hypergradient`` with ``jvp="difference"`` (l2o_kd/hypergrad.py), written out with a
timer between them: the training step, the look-ahead SGD step with its graph, the validation forward and backward,
the difference's extra forward, dh from J a. Random data of batch 128, as scripts/bench_operators.py; medians of 30
steps after 10. Run from the repository root: ``python docs/step-cost/intel-run2/greedy_parts.py tiny 1`` (student, threads).
"""

import statistics
import sys
import time

import torch

from l2o_kd.distill import batch_ce, kd_logit_gradient
from l2o_kd.hypergrad import DIFFERENCE_STEP
from l2o_kd.models import apply, build_model, frozen, split_state
from l2o_kd.operators.base import StepContext, global_norm
from l2o_kd.operators.classic import SGD
from l2o_kd.step import gradient


def main(student: str, threads: int) -> None:
    torch.set_num_threads(threads)
    model = build_model(student, seed=0)
    g0 = torch.Generator().manual_seed(0)
    x, xv = (torch.randn(128, 3, 32, 32, generator=g0) for _ in range(2))
    y, yv = (torch.randint(10, (128,), generator=g0) for _ in range(2))
    teacher = torch.randn(128, 10, generator=g0)
    params, buffers = split_state(model)
    names = list(params)
    op = SGD(lr=1e-3, momentum=0.9)
    state = op.init(params)
    times: dict[str, list[float]] = {k: [] for k in ("train", "look-ahead", "val forward", "val backward", "difference", "dh")}
    for i in range(40):
        t = [time.perf_counter()]
        with torch.no_grad():
            grads, _, logits, _ = gradient(model, params, buffers, x, y, teacher, 0.5, 4.0, "hinton")
        t.append(time.perf_counter())
        ctx = StepContext(i, 10_000, 1.0, float("nan"), float("nan"), logits=logits)
        with torch.enable_grad():
            g = {k: v.detach().requires_grad_(True) for k, v in grads.items()}
            new_params, new_state, _ = op.step(params, g, state, ctx)
            t.append(time.perf_counter())
            val = batch_ce(model, new_params, buffers, xv, yv)
            t.append(time.perf_counter())
            a = torch.autograd.grad(val, list(g.values()))
            t.append(time.perf_counter())
            with torch.no_grad():
                w = [params[k].detach() for k in names]
                eps = float(DIFFERENCE_STEP * global_norm(w) / (global_norm(a) + 1e-30))
                moved = dict(zip(names, torch._foreach_add(w, a, alpha=eps)))
                ja = (apply(model, moved, frozen(buffers), x, train=True) - logits) / eps
            t.append(time.perf_counter())
            h = torch.tensor([0.5, 4.0]).requires_grad_(True)
            delta = kd_logit_gradient(logits.detach(), teacher, y, h[0], h[1], "hinton")
            torch.autograd.grad(delta, h, grad_outputs=ja)
            t.append(time.perf_counter())
        params = {k: v.detach() for k, v in new_params.items()}
        state = {"momentum": {k: v.detach() for k, v in new_state["momentum"].items()}, "t": new_state["t"]}
        if i >= 10:
            for key, start, end in zip(times, t, t[1:]):
                times[key].append((end - start) * 1e3)
    medians = {k: statistics.median(v) for k, v in times.items()}
    for k, m in medians.items():
        print(f"{k:13s} {m:7.2f} ms")
    print(f"{'sum':13s} {sum(medians.values()):7.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny", int(sys.argv[2]) if len(sys.argv) > 2 else 1)
