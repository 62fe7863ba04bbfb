"""PNG figures of a comparison (matplotlib, no display needed): accuracy and training loss against
steps (mean over seeds, band = min..max), the β_t / T_t / step-size schedules, and the parameter
trajectories of one seed projected on their first two principal components."""

from __future__ import annotations

from pathlib import Path

import torch

SCHEDULES = (("beta", "β"), ("temperature", "T"), ("lr", "step size (lr; learned: base_scale·scale)"))


def plot_comparison(out: Path, rows: list[dict], labels: list[str], trajectories: dict[str, torch.Tensor], seed: int | None) -> list[Path]:
    """Write the figures of ``compare`` into ``out`` and return their paths; ``trajectories`` are the
    flattened parameters (``[n, P]`` per operator) of seed ``seed``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = finished_runs(rows, labels)
    if not curves:
        return []
    written = []
    for key, ylabel, fname in (
        ("test_acc", "test accuracy", "accuracy.png"),
        ("train_loss", "training loss (KD objective)", "train_loss.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label, per_seed in curves.items():
            _band(ax, per_seed, key, label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, out / fname))

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (key, title) in zip(axes, SCHEDULES):
        for label, per_seed in curves.items():
            _band(ax, per_seed, key, label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend()
    written.append(_save(fig, out / "schedules.png"))

    if trajectories:
        fig, ax = plt.subplots(figsize=(6.4, 5.2))
        projected, explained = project_pca(trajectories)
        for label, xy in projected.items():
            line = ax.plot(xy[:, 0], xy[:, 1], marker=".", markersize=3, label=label)[0]
            ax.plot(xy[-1, 0], xy[-1, 1], marker="*", markersize=12, color=line.get_color())
        start = next(iter(projected.values()))[0]
        ax.plot(start[0], start[1], marker="o", color="black", markersize=7, label="initialization")
        ax.set_xlabel(f"PC 1 ({100 * explained[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC 2 ({100 * explained[1]:.0f}% of variance)")
        ax.set_title(f"parameter trajectories, seed {seed}")
        ax.legend()
        written.append(_save(fig, out / "trajectories.png"))
    return written


def project_pca(trajectories: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Project each ``[n_i, P]`` trajectory on the first two principal components of all their points
    together; also return the fraction of variance those two components explain."""
    points = torch.cat(list(trajectories.values())).double()
    mean = points.mean(0)
    _, s, vh = torch.linalg.svd(points - mean, full_matrices=False)
    basis = vh[:2].T
    explained = (s**2 / (s**2).sum())[:2]
    if len(explained) < 2:  # a single point: nothing to explain
        explained = torch.cat([explained, torch.zeros(2 - len(explained), dtype=explained.dtype)])
        basis = torch.cat([basis, torch.zeros(basis.shape[0], 2 - basis.shape[1], dtype=basis.dtype)], 1)
    return {k: (v.double() - mean) @ basis for k, v in trajectories.items()}, explained


def finished_runs(rows: list[dict], labels: list[str] | None = None) -> dict[str, dict[int, list[dict]]]:
    """``{operator: {seed: rows}}`` of the cells that finished (their last row is marked final)."""
    finished = {(r["operator"], r["seed"]) for r in rows if r.get("final")}
    curves: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        if (r["operator"], r["seed"]) in finished:
            curves.setdefault(r["operator"], {}).setdefault(r["seed"], []).append(r)
    return {lab: curves[lab] for lab in (labels or list(curves)) if lab in curves}


def _band(ax, per_seed: dict[int, list[dict]], key: str, label: str) -> None:
    """Mean over seeds at each evaluation step, shaded between the seeds' min and max."""
    by_step: dict[int, list[float]] = {}
    for seed_rows in per_seed.values():
        for r in seed_rows:
            if r.get(key) is not None:
                by_step.setdefault(r["step"], []).append(r[key])
    steps = sorted(s for s, v in by_step.items() if len(v) == len(per_seed))
    if not steps:
        return
    mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    line = ax.plot(steps, mean, label=label)[0]
    if len(per_seed) > 1:
        ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], color=line.get_color(), alpha=0.2)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
