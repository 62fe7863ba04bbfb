"""The (beta_t, T_t) trajectories of the hypergradient rows of ``scripts/reproduce_paper.py``: one
column per method (greedy, extrapolate), beta and T against the step, one line per draw (seed), its
start (the draw) marked. Reads every ``METHOD-sSEED`` run under ``--runs`` whose metrics hold beta and T
(an unfinished run shows as far as it got) and writes the
figure and the points behind it (``trajectories.jsonl``: run, step, beta, temperature, test_acc). That
file is the record: a run found under ``--runs`` replaces its own points there, the other runs' points
are kept (runs whose folders are gone still plot).

    python scripts/plot_paper_trajectories.py --runs results/paper-protocol --out docs/paper-protocol
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from l2o_kd.runlog import read_metrics

METHODS = ("greedy", "extrapolate")


def trajectories(runs: Path) -> dict[str, dict[int, list[dict]]]:
    """{method: {seed: metric rows with beta and temperature}} of the runs that hold any, each led by
    its draw at step 0 (the run's configured beta and T)."""
    found: dict[str, dict[int, list[dict]]] = {}
    for folder in sorted(runs.iterdir()):
        m = re.fullmatch(r"(\w+)-s(\d+)", folder.name)
        if not m or m.group(1) not in METHODS or not (folder / "metrics.jsonl").exists() or not (folder / "config.json").exists():
            continue
        rows = [r for r in read_metrics(folder) if r["step"] > 0 and "beta" in r and "temperature" in r]
        if rows:
            cfg = json.loads((folder / "config.json").read_text())
            start = {"step": 0, "beta": cfg["beta"], "temperature": cfg["temperature"]}
            found.setdefault(m.group(1), {})[int(m.group(2))] = [start, *rows]
    return found


def recorded(points: Path) -> dict[str, dict[int, list[dict]]]:
    """The trajectories already in a ``trajectories.jsonl`` ({} when there is none), as :func:`trajectories` gives them."""
    found: dict[str, dict[int, list[dict]]] = {}
    if points.exists():
        for line in points.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                method, seed = r.pop("run").rsplit("-s", 1)
                found.setdefault(method, {}).setdefault(int(seed), []).append(r)
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="results/paper-protocol")
    ap.add_argument("--out", default="docs/paper-protocol")
    args = ap.parse_args()
    out = Path(args.out)
    found = recorded(out / "trajectories.jsonl")
    for method, runs in trajectories(Path(args.runs)).items():
        found.setdefault(method, {}).update(runs)
    if not found:
        raise SystemExit(f"no greedy or extrapolate runs with beta and T under {args.runs} or in {out / 'trajectories.jsonl'}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m in found]
    fig, axes = plt.subplots(2, len(methods), figsize=(6.4 * len(methods), 7), squeeze=False, sharex=True)
    points = []
    for col, method in enumerate(methods):
        for seed, rows in sorted(found[method].items()):
            steps = [r["step"] for r in rows]
            for ax, key in zip(axes[:, col], ("beta", "temperature")):
                line = ax.plot(steps, [r[key] for r in rows], lw=1, label=f"draw {seed}")[0]
                ax.plot(steps[0], rows[0][key], "o", ms=3, color=line.get_color())
            points += [{"run": f"{method}-s{seed}", "step": r["step"], "beta": r["beta"], "temperature": r["temperature"],
                        "test_acc": r.get("test_acc")} for r in rows]
        axes[0, col].set_title(f"{method} ({len(found[method])} draws)")
        axes[0, col].set_ylabel("β")
        axes[1, col].set_ylabel("T")
        axes[1, col].set_xlabel("step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, ncol=2)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "trajectories.png", dpi=110)
    (out / "trajectories.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    print(f"wrote {out / 'trajectories.png'} and {out / 'trajectories.jsonl'} ({len(points)} points)")


if __name__ == "__main__":
    main()
