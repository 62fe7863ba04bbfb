"""Probe (not part of the package): the shipped operator with online step adaptation at hand-set (rate, target)
(units of ADAPT_UNITS), val accuracy after 1,000 steps. The operator:
`python scripts/new_operator.py --from checkpoints/operator.pt --adapt-step --out /tmp/p15/adapt-init.pt` at commit
96c9da7 (adapt_step, removed in the next commit); run as `python probe.py OUT.jsonl student:seed:rate:target ...`."""

import json
import sys

import torch

from l2o_kd.config import TrainConfig
from l2o_kd.data import load_splits
from l2o_kd.operators.learned import load_operator
from l2o_kd.train import train


def main() -> None:
    torch.set_num_threads(1)
    out = sys.argv[1]
    splits = load_splits("cifar10", "../shared/data/cifar10-jpeg.tar.gz", False)
    for job in sys.argv[2:]:
        student, seed, rate, target = job.split(":")
        op = load_operator("/tmp/p15/adapt-init.pt")
        with torch.no_grad():
            op.net.adapt.copy_(torch.tensor([float(rate), float(target)]))
        tc = TrainConfig(model=student, data_root="../shared/data/cifar10-jpeg.tar.gz", operator="lstm", steps=1000, seed=int(seed),
                         runs_dir="/tmp/p15/runs", run_name=f"{student}-{seed}-{rate}-{target}", progress=False, log_every=100)
        row = {"student": student, "seed": int(seed), "rate": float(rate), "target": float(target),
               "val_acc": train(tc, splits=splits, operator=op)["val_acc"]}
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
