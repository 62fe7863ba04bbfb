"""Rows of the paper's table (Gorpinich, Bakhteev, Strijov) on the CIFAR-10 copy, with its protocol:
`tiny` student, SGD lr 1.0 (no momentum) halved every 10 epochs, batch 128, no augmentation, 9:1
train/val; hyper-SGD lr 0.25 with gradient clipping 0.01; beta init U(0,1) and log10 T init U(-1,1)
for the random and hypergradient rows (drawn per seed, printed). Extra rows: ``tpe`` (``l2o-kd search``:
5 trials on seed 0 scored on validation, the best (β, T) retrained on every seed) and ``lstm`` (a
learned operator in place of SGD, which then chooses its own steps and β_t, T_t).

    python scripts/reproduce_paper.py --data-root ../shared/data/cifar10-jpeg.tar.gz \
        --methods nokd,naive,random,greedy,extrapolate,tpe,lstm --seeds 0,1,2 --epochs 50 --train-subset 12800
Finished runs are read back, so an interrupted reproduction redoes only what is missing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from l2o_kd.config import TrainConfig
from l2o_kd.data import load_splits
from l2o_kd.runlog import read_metrics
from l2o_kd.search import SearchConfig, search
from l2o_kd.train import train


def method_config(method: str, seed: int, extrapolate_after: float, operator: str) -> dict:
    rng = random.Random(seed)
    beta0, t0 = rng.uniform(0, 1), 10 ** rng.uniform(-1, 1)
    return {
        "nokd": dict(beta=0.0),
        "naive": dict(beta=0.5, temperature=1.0),
        "random": dict(beta=beta0, temperature=t0),
        "greedy": dict(beta=beta0, temperature=t0, tune_kd="greedy"),
        "extrapolate": dict(beta=beta0, temperature=t0, tune_kd="extrapolate", extrapolate_after=extrapolate_after),
        "tpe": {},
        "lstm": dict(operator=operator),
    }[method]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--methods", default="nokd,naive,random,greedy,extrapolate,tpe,lstm")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=float, default=50)
    ap.add_argument("--train-subset", type=int, default=12800)
    ap.add_argument("--extrapolate-after", type=float, default=0.5)
    ap.add_argument("--trials", type=int, default=5, help="tpe: full training runs of the search")
    ap.add_argument("--operator", default="checkpoints/operator-lstm.pt", help="lstm: the learned operator")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/paper")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_splits("cifar10", args.data_root)
    results: dict[str, list[dict]] = {}
    seeds = [int(s) for s in args.seeds.split(",")]
    for method in args.methods.split(","):
        base = dict(model="tiny", data_root=args.data_root, operator="sgd", lr=1.0, momentum=0.0, schedule="step", lr_step_epochs=10, lr_gamma=0.5, epochs=args.epochs,
                    train_subset=args.train_subset or None, hyper_lr=0.25, hyper_clip=0.01, progress=False)
        if method == "tpe":
            out = search(SearchConfig("tpe", args.trials, args.seeds, f"{args.out}/tpe"), TrainConfig(**base, seed=seeds[0]))
            rows = [{**read_metrics(f"{args.out}/tpe/best/trial-{out['best']['trial']}-s{s}")[-1], "seed": s, "init": out["best"]} for s in seeds]
        else:
            rows = []
            for seed in seeds:
                kw = method_config(method, seed, args.extrapolate_after, args.operator)
                row = train(TrainConfig(**{**base, **kw}, seed=seed, runs_dir=args.out, run_name=f"{method}-s{seed}"), resume=True, splits=splits)
                rows.append({**row, "seed": seed, "init": kw})
        for row in rows:
            row["method"] = method
            print(json.dumps({k: row.get(k) for k in ("method", "seed", "init", "test_acc", "val_acc", "beta", "temperature", "wall_s")}), flush=True)
        results[method] = rows
    summary = {m: {"test_mean": statistics.mean(r["test_acc"] for r in rows),
                   "test_std": statistics.stdev([r["test_acc"] for r in rows]) if len(rows) > 1 else 0.0,
                   "wall_s_mean": statistics.mean(r["wall_s"] for r in rows), "n": len(rows)} for m, rows in results.items()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"summary-{args.methods.replace(',', '_')}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
