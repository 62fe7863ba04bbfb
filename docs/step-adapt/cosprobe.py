"""Diagnostic of the step-adaptation probe (not part of the package): the per-tensor cosine -cos(g_t, last update) that step adaptation sees, by
student and step factor K. The rate is 1e-6 per step (no effect on the run); log_size / (rate * steps) over a
window of steps is the mean cosine there. The operator made as in probe.py;
run as `python cosprobe.py OUT.jsonl student:seed:K ...`."""

import json
import sys

import torch

from l2o_kd.config import TrainConfig
from l2o_kd.data import load_splits
from l2o_kd.models import build_model
from l2o_kd.operators.learned import load_operator, with_variant
from l2o_kd.train import train

RATE = 1e-6  # adapt = (1e-4, 0) in units of ADAPT_UNITS = (0.01, 0.1)
WINDOWS = ((2, 100), (100, 300), (300, 600), (600, 1000))


def traced(op, trace):
    inner = op.step

    def step(params, grads, state, ctx):
        out = inner(params, grads, state, ctx)
        trace.append(out[1]["log_size"].detach().clone())
        return out

    op.step = step
    return op


def main() -> None:
    torch.set_num_threads(1)
    out = sys.argv[1]
    splits = load_splits("cifar10", "../shared/data/cifar10-jpeg.tar.gz", False)
    for job in sys.argv[2:]:
        student, seed, k = job.split(":")
        op = with_variant(load_operator("/tmp/p15/adapt-init.pt"), f"step={k}")
        with torch.no_grad():
            op.net.adapt.copy_(torch.tensor([RATE / 0.01, 0.0]))
        trace: list = []
        tc = TrainConfig(model=student, data_root="../shared/data/cifar10-jpeg.tar.gz", operator="lstm", steps=1000, seed=int(seed),
                         runs_dir="/tmp/p15/runs", run_name=f"cos-{student}-{seed}-{k}", progress=False, log_every=100)
        r = train(tc, splits=splits, operator=traced(op, trace))
        sizes = [p.numel() for p in build_model(student).parameters()]
        w = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
        row = {"student": student, "seed": int(seed), "K": float(k), "val_acc": r["val_acc"], "sizes": sizes}
        for a, b in WINDOWS:
            cos = (trace[b - 1] - trace[a - 1]).double() / (RATE * (b - a))
            row[f"cos_{a}_{b}"] = cos.tolist()
            row[f"wmean_{a}_{b}"] = float((cos * w).sum())
        print(json.dumps({key: v for key, v in row.items() if not key.startswith("cos")}), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
