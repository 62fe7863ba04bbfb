"""The learned operator against SGD and Adam with tuned learning rates (issue 3's comparison).

1. tune: each classic operator's lr over a log grid, `--tune-steps` steps, seed 0, scored on the
   validation split (never on test);
2. run: each operator (tuned classics + the learned one) for `--steps` steps on `--seeds` seeds;
   Finished runs are read back (``--resume``), so an interrupted comparison redoes only what is missing;
3. print mean ± std of final val/test accuracy and, for the learned operator, the first evaluation
   step at which its test accuracy reaches tuned Adam's final mean.

Example (the numbers in docs/RESULTS.md):
    python scripts/horizon_comparison.py --data-root ../shared/data/cifar10-jpeg.tar.gz \
        --operator checkpoints/operator-lstm.pt --steps 1000 --out results/h1000
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from l2o_kd.data import load_splits
from l2o_kd.runlog import read_metrics
from l2o_kd.train import TrainConfig, train

GRIDS = {"sgd": [0.01, 0.03, 0.1, 0.3, 1.0], "adam": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--operator", default=None, help="learned-operator checkpoint (without it: tune only)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--tune-steps", type=int, default=None, help="[default: --steps]")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lrs", default=None, help='JSON {"sgd": lr, "adam": lr} to skip tuning')
    ap.add_argument("--operators", default="sgd,adam,lstm", help="which of sgd, adam, lstm to run (finished runs are read back)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/horizon")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    splits = load_splits("cifar10", args.data_root)
    common = dict(model="tiny", dataset="cifar10", beta=0.5, temperature=4.0, batch_size=128, progress=False, tensorboard=True)

    lrs = json.loads(args.lrs) if args.lrs else {}
    for op, grid in GRIDS.items():
        if op in lrs or op not in args.operators:
            continue
        scores = {}
        for lr in grid:
            cfg = TrainConfig(operator=op, lr=lr, momentum=0.9, steps=args.tune_steps or args.steps, seed=0,
                              runs_dir=str(out / "tune"), run_name=f"{op}-lr{lr:g}", **common)
            scores[lr] = _run(cfg, splits)["val_acc"]
            print(json.dumps({"tune": op, "lr": lr, "val_acc": scores[lr]}), flush=True)
        lrs[op] = max(scores, key=scores.get)
    print(json.dumps({"chosen_lrs": lrs}), flush=True)
    wanted = args.operators.split(",")
    if args.operator is None:
        wanted = [w for w in wanted if w != "lstm"]

    finals: dict[str, list[dict]] = {}
    for name, op, lr in (("sgd", "sgd", lrs.get("sgd")), ("adam", "adam", lrs.get("adam")), ("lstm", args.operator, 1.0)):
        if name not in wanted:
            continue
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = TrainConfig(operator=op, lr=lr, momentum=0.9, steps=args.steps, seed=seed, runs_dir=str(out / "final"),
                              run_name=f"{name}-s{seed}", **common)
            row = _run(cfg, splits)
            row["rows"] = read_metrics(out / "final" / f"{name}-s{seed}")
            finals.setdefault(name, []).append(row)
            print(json.dumps({"run": name, "seed": seed, "val_acc": row["val_acc"], "test_acc": row["test_acc"], "wall_s": row["wall_s"]}), flush=True)

    if "adam" not in finals:
        return
    target = statistics.mean(r["test_acc"] for r in finals["adam"])
    summary = {"steps": args.steps, "lrs": lrs, "adam_final_test_mean": target}
    for name, rows in finals.items():
        tests = [r["test_acc"] for r in rows]
        summary[name] = {"test_mean": statistics.mean(tests), "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                         "val_mean": statistics.mean(r["val_acc"] for r in rows),
                         "wall_s_mean": statistics.mean(r["wall_s"] for r in rows),
                         "steps_to_adam_final": [next((m["step"] for m in r["rows"] if m["test_acc"] >= target), None) for r in rows]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)


def _run(cfg: TrainConfig, splits) -> dict:
    """Run (or, when it already finished, read back) one training run."""
    return train(cfg, resume=True, splits=splits)


if __name__ == "__main__":
    main()
