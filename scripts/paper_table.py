"""The paper's reduced-set table from the raw rows of ``scripts/reproduce_paper.py --protocol paper``:
every method over the draws it has, mean ± std of test accuracy, the paper's number, and each method
paired with no KD on the same seeds (mean difference ± std, wins, 95% t-interval).

    python scripts/paper_table.py --collect results/paper-protocol   # append finished runs' final rows
    python scripts/paper_table.py                                     # print the table (markdown)

``--collect`` appends the final metrics row of every finished run under the folder (``METHOD-sSEED``
and the TPE search's ``tpe/best/trial-*-sSEED`` as ``tpe-sSEED``) that ``--rows`` does not hold yet.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from l2o_kd.config import TrainConfig
from l2o_kd.runlog import read_metrics
from l2o_kd.stats import paired
from l2o_kd.train import run_length

PAPER = {"nokd": 0.55, "naive": 0.55, "random": 0.54, "greedy": 0.57, "tpe": 0.55, "extrapolate": 0.57}  # its reduced-set table
ORDER = ("nokd", "naive", "random", "greedy", "extrapolate", "tpe", "nokd-bn3")
CONFIG_KEYS = ("seed", "beta", "temperature", "kd_form", "tune_kd", "hyper_clip_mode", "hyper_lookahead", "lr", "schedule", "train_subset",
               "epochs", "bn_updates", "teacher")
TRAIN_SPLIT = 45_000  # the train split's size (a run without --train-subset)


def finished_runs(folder: Path):
    """(run name, run folder) of the finished runs under ``folder``."""
    for run in sorted(folder.glob("*-s*")) + sorted(folder.glob("tpe/best/trial-*-s*")):
        name = "tpe-s" + run.name.rsplit("-s", 1)[1] if run.parent.name == "best" else run.name
        if re.fullmatch(r"[\w-]+-s\d+", name) and (run / "checkpoint.pt").exists() and (run / "config.json").exists():
            yield name, run


def collect(folder: Path, rows_file: Path) -> int:
    have = {json.loads(line)["run"] for line in rows_file.read_text().splitlines() if line.strip()} if rows_file.exists() else set()
    added = 0
    with open(rows_file, "a") as f:
        for name, run in finished_runs(folder):
            cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
            metrics = read_metrics(run)
            n_train = cfg.train_subset or TRAIN_SPLIT
            if name in have or not metrics or "test_acc" not in metrics[-1] or metrics[-1]["step"] < run_length(cfg.steps, cfg.epochs, n_train, cfg.batch_size)[1]:
                continue
            last = metrics[-1]
            row = {"run": name, "config": {k: getattr(cfg, k) for k in CONFIG_KEYS}, **{k: last.get(k) for k in
                   ("step", "test_acc", "val_acc", "beta", "temperature", "wall_s")}}
            f.write(json.dumps(row) + "\n")
            have.add(name)  # (a second retrain of the same seed, from a rerun search's other best, is not appended)
            added += 1
    return added


def table(rows_file: Path) -> str:
    by: dict[str, dict[int, float]] = {}
    for line in rows_file.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            method, seed = r["run"].rsplit("-s", 1)
            by.setdefault(method, {})[int(seed)] = r["test_acc"]
    lines = ["| row | draws | test accuracy | paper | within 1.5 pts | − no KD (paired: mean ± std, wins, 95% CI) |", "|---|---|---|---|---|---|"]
    for method in [m for m in ORDER if m in by] + sorted(set(by) - set(ORDER)):
        acc = by[method]
        vals = [100 * v for v in acc.values()]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        paper = PAPER.get(method)
        close = "–" if paper is None else ("yes" if abs(statistics.mean(vals) - 100 * paper) <= 1.5 else "no")
        lines.append(f"| {method} | {len(acc)} ({','.join(map(str, sorted(acc)))}) | {statistics.mean(vals):.2f} ± {sd:.2f}% | "
                     f"{'–' if paper is None else f'{paper:.2f}'} | {close} | {paired(acc, by.get('nokd', {})) or '–' if method != 'nokd' else '–'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="docs/paper-protocol/rows.jsonl")
    ap.add_argument("--collect", default=None, help="append the final rows of finished runs under this folder first")
    args = ap.parse_args()
    if args.collect:
        print(f"appended {collect(Path(args.collect), Path(args.rows))} rows to {args.rows}")
    print(table(Path(args.rows)))


if __name__ == "__main__":
    main()
