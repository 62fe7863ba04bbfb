"""``l2o-kd search``: black-box search of the KD hyperparameters (β, T), the baseline the paper
compares hypergradients against.

Each of ``trials`` trials is a full training run scored by its final **validation** accuracy; trials
are tuning runs, so their student is the tuning seed ``seeds.tuning_seed(seed)``, never a reported
one, and trials differ only in β and T. β is drawn from U(0, 1) and log10 T from U(-1, 1), by plain
random sampling or by Optuna's TPE. The best (β, T) is then retrained on ``retrain_seeds`` (within
``seeds.EVAL``, in ``best/trial-<i>-s<seed>``) and those runs' test accuracies are the result.
Trials and retrains are run folders resumed on rerun; ``trials.jsonl`` lists the finished trials and
TPE is re-told them, so an interrupted search goes on where it stopped. A rerun may raise ``trials``
or add retrain seeds, but the configuration that decides the results (:func:`decisive_config`) is
fingerprinted in the output folder and a rerun that changes it is refused before anything runs.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import seeds as seed_ranges
from .config import SearchConfig, TrainConfig
from .errors import UserError
from .fingerprint import check_fingerprint, file_digest
from .teacher import teacher_path
from .train import train

BETA, LOG10_T = (0.0, 1.0), (-1.0, 1.0)


def search(cfg: SearchConfig, base: TrainConfig) -> dict[str, Any]:
    """Run (or finish) the search in ``cfg.out``; ``base`` is the training run every trial varies."""
    seeds = cfg.validate()
    base.validate()
    if base.tune_kd:
        raise UserError("search picks fixed (beta, T): drop --tune-kd")
    if base.learned:
        raise UserError(f"search picks fixed (beta, T), but the learned operator {base.operator} chooses its own: search with sgd, adam or adamw")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    check_fingerprint(out, decisive_config(cfg, base), "search folder", has_results=(out / "trials.jsonl").exists())
    (out / "config.json").write_text(json.dumps({"search": asdict(cfg), "train": asdict(base)}, indent=2) + "\n")
    from .data import load_splits

    splits = load_splits(base.dataset, base.data_root, base.download)
    done = _read(out / "trials.jsonl")
    sampler = _sampler(cfg.method, base.seed, done)
    trial_seed = seed_ranges.tuning_seed(base.seed)
    for i in tqdm(range(cfg.trials), desc=f"{cfg.method} search", disable=not base.progress, dynamic_ncols=True):
        if i < len(done):
            continue
        beta, temperature = sampler.ask()
        run = replace(base, beta=beta, temperature=temperature, seed=trial_seed, runs_dir=str(out / "trials"), run_name=f"trial-{i}",
                      progress=False)
        row = train(run, resume=True, splits=splits)
        trial = {"trial": i, "beta": beta, "temperature": temperature, "val_acc": row["val_acc"], "test_acc": row["test_acc"]}
        sampler.tell(trial)
        done.append(trial)
        with open(out / "trials.jsonl", "a") as f:
            f.write(json.dumps(trial) + "\n")

    best = max(done[: cfg.trials], key=lambda t: t["val_acc"])
    finals = []
    for seed in seeds:
        run = replace(
            base, beta=best["beta"], temperature=best["temperature"], seed=seed, runs_dir=str(out / "best"),
            run_name=f"trial-{best['trial']}-s{seed}",  # more trials may find another best: its own retrains
        )
        finals.append(train(run, resume=True, splits=splits))
    tests = [r["test_acc"] for r in finals]
    summary = {
        "method": cfg.method,
        "trials": cfg.trials,
        "best": best,
        "retrain_seeds": seeds,
        "test_accs": tests,
        "test_mean": statistics.mean(tests),
        "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def decisive_config(cfg: SearchConfig, base: TrainConfig) -> dict[str, Any]:
    """What decides a search's results: the method and the decisive fields of ``base`` but the
    (beta, T) that every trial replaces, with the teacher and ``--init`` by content. ``trials`` and
    ``retrain_seeds`` are left out (a rerun may add some)."""
    decisive = {k: v for k, v in base.decisive().items() if k not in ("beta", "temperature")}
    if base.init:
        decisive["init"] = file_digest(base.init)  # (base.validate() has checked the file exists)
    return {**decisive, "teacher": file_digest(teacher_path(base.teacher)), "method": cfg.method}


class _RandomSampler:
    """β ~ U(0, 1), log10 T ~ U(-1, 1); trial i's draw depends only on (seed, i)."""

    def __init__(self, seed: int, n_done: int):
        self.seed, self.i = seed, n_done

    def ask(self) -> tuple[float, float]:
        rng = random.Random(self.seed * 1_000_003 + self.i)
        self.i += 1
        return rng.uniform(*BETA), 10 ** rng.uniform(*LOG10_T)

    def tell(self, trial: dict) -> None:
        pass


class _TPESampler:
    """Optuna's TPE over the same space, maximizing validation accuracy; finished trials are re-told."""

    def __init__(self, seed: int, done: list[dict]):
        try:
            import optuna
        except ImportError:
            raise UserError("--method tpe needs Optuna: pip install optuna (or pip install 'l2o-kd[search]')") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.dist = {"beta": optuna.distributions.FloatDistribution(*BETA), "log10_t": optuna.distributions.FloatDistribution(*LOG10_T)}
        self.study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3))
        for t in done:
            params = {"beta": t["beta"], "log10_t": math.log10(t["temperature"])}
            self.study.add_trial(optuna.trial.create_trial(params=params, distributions=self.dist, value=t["val_acc"]))
        self.pending = None

    def ask(self) -> tuple[float, float]:
        self.pending = self.study.ask(self.dist)
        return self.pending.params["beta"], 10 ** self.pending.params["log10_t"]

    def tell(self, trial: dict) -> None:
        self.study.tell(self.pending, trial["val_acc"])


def _sampler(method: str, seed: int, done: list[dict]):
    return _RandomSampler(seed, len(done)) if method == "random" else _TPESampler(seed, done)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
