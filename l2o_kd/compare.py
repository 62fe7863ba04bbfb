"""``l2o-kd compare``: operators side by side on the same students, data and teacher.

1. Parse the operator specs (``sgd``, ``adam``, ``sgd+greedy``, ``ckpt:PATH`` ...) and check them all
   before anything runs.
2. ``--tune-lr N``: each classic base operator (``sgd``, ``adam``, ``adamw``) gets its learning rate
   from a log grid of N values around its default, scored by **validation** accuracy after
   ``tune_steps`` steps on the tuning seed ``seeds.tuning_seed(0)``, never a reported seed. A
   KD-tuning variant (``sgd+greedy``) uses the lr tuned for its base, so the comparison isolates what
   tuning (β, T) adds. ``--tune-kd-grid B:T,...``: the classic operators' fixed (β, T) is tuned too,
   jointly with the lr (every lr × every pair, same seed and score), so a baseline runs at its best
   fixed pair; the KD-tuning variants still start from ``--beta``/``--temperature``, with the lr their
   base was tuned with (at the base's best pair). ``--tune-step N``: each learned operator gets the same
   care, its one scalar, the step multiplier K of ``ckpt:PATH@step=K``, tuned over N values from 0.1 to 10
   (1, the operator as meta-trained, at the centre) by the same score on the same seed.
3. Run every cell (operator × seed, seeds 0..N-1 within ``seeds.EVAL``) through
   :func:`l2o_kd.train.train`: the same initialization and data order per seed, the same teacher and
   number of steps for every operator. A cell's evaluation rows go to ``results.jsonl`` when it
   finishes; rerunning skips finished cells and resumes an interrupted one from its checkpoint; a
   crashing cell is reported in ``failures.jsonl`` and the others go on.
4. ``summary.md`` (numbers recomputed from ``results.jsonl`` by :func:`summarize`) and the plots.

A rerun in the same folder may add operators or seeds, but nothing that changes a cell's result:
the decisive configuration (:func:`decisive_config`) is fingerprinted in ``fingerprint.json`` and the
weights of each learned operator in ``learned_operators.json``; a rerun that differs is refused before
anything runs, so one folder never mixes the results of two experiments.
"""

from __future__ import annotations

import json
import math
import statistics
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import seeds as seed_ranges
from .checkpoint import save_atomic_text
from .config import GREEDY_METHODS, TUNE_KD_METHODS, CompareConfig, TrainConfig
from .errors import Diverged, UserError
from .fingerprint import check_fingerprint, file_digest
from .operators import CLASSIC
from .plots import finished_runs, plot_comparison
from .runlog import read_metrics
from .stats import paired
from .teacher import teacher_path
from .train import Trajectory, run_length, train

DEFAULT_LR = {"sgd": 0.03, "adam": 3e-3, "adamw": 3e-3}  # tuned on validation for `tiny` with KD (docs/results/learned-vs-tuned.md)
RESULTS, FAILURES, SUMMARY, TUNING = "results.jsonl", "failures.jsonl", "summary.md", "tuning.json"
LEARNED = "learned_operators.json"  # {label: content digest} of the learned operators a folder ran
TUNE_SEED = seed_ranges.tuning_seed(0)  # the student of every lr-tuning run
# CompareConfig fields that decide a cell's result (with the resolved steps and the teacher's digest)
DECISIVE = ("student", "dataset", "beta", "temperature", "kd_form", "hyper_clip_mode", "hyper_lookahead", "hyper_jvp", "batch_size",
            "momentum", "schedule", "lrs", "tune_lr", "tune_steps", "tune_step", "kd_grid", "evals")


@dataclass(frozen=True)
class OperatorSpec:
    """One compared operator: ``base`` (a classic name or a learned-operator checkpoint) and an
    optional hypergradient method moving (β, T)."""

    label: str
    base: str
    tune_kd: str | None = None
    variant: str | None = None  # a variant of a learned operator (operators.learned.VARIANTS)

    @property
    def learned(self) -> bool:
        return self.base not in CLASSIC

    @classmethod
    def parse(cls, spec: str) -> OperatorSpec:
        spec = spec.strip()
        if spec.startswith("ckpt:"):
            path, variant = spec.removeprefix("ckpt:"), None
            from .operators.learned import load_operator, step_factor

            if not Path(path).is_file() and "@" in path:
                path, _, variant = path.rpartition("@")
                try:
                    step_factor(variant)  # a bad variant fails here
                except UserError as exc:
                    raise UserError(f"{spec!r}: {exc}") from None
            load_operator(path)  # a missing file, or one that holds no operator (its kind), fails here, before any run
            return cls(label=Path(path).stem + (f"@{variant}" if variant else ""), base=path, variant=variant)
        base, _, method = spec.partition("+")
        if base not in CLASSIC:
            raise UserError(f"unknown operator {spec!r}: use {', '.join(CLASSIC)}, BASE+{'|'.join(TUNE_KD_METHODS)} or ckpt:PATH")
        if method and method not in TUNE_KD_METHODS:
            raise UserError(f"unknown KD tuning {method!r} in {spec!r}: use one of {', '.join(TUNE_KD_METHODS)}")
        return cls(label=spec, base=base, tune_kd=method or None)


def parse_specs(operators: str) -> list[OperatorSpec]:
    """The operators of ``--operators``, each checked (a learned one loaded) before anything runs."""
    specs = [OperatorSpec.parse(s) for s in operators.split(",") if s.strip()]
    if not specs:
        raise UserError("--operators is empty")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"--operators names an operator twice: {operators}")
    return specs


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run (or finish) the comparison in ``cfg.out`` and return its summary."""
    cfg.validate()
    specs = parse_specs(cfg.operators)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    from .data import load_splits

    splits = load_splits(cfg.dataset, cfg.data_root, cfg.download)
    _, steps = run_length(cfg.steps, cfg.epochs, len(splits.train_y), cfg.batch_size)
    has_results = (out / RESULTS).exists() or (out / TUNING).exists()
    ran = read_results(out)
    greedy_ran = any(_takes_greedy_steps(r["operator"]) for r in ran)
    check_fingerprint(out, decisive_config(cfg, specs, steps), "compare folder", has_results,
                      free=() if greedy_ran else ("hyper_jvp",))
    check_learned_operators(out, specs)
    specs = [materialize_variant(s, out / "operators") for s in specs]
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    lrs, kds = tune_baselines(cfg, specs, splits, steps)
    specs, factors = tune_learned_steps(cfg, specs, splits, steps)

    done = {(r["operator"], r["seed"]) for r in ran if r.get("final")}  # (tuning does not write results)
    cells = [(spec, seed) for seed in range(cfg.seeds) for spec in specs]
    grid = tqdm(cells, desc="compare", disable=not cfg.progress, dynamic_ncols=True)
    for spec, seed in grid:
        if (spec.label, seed) in done:
            continue
        grid.set_postfix_str(f"{spec.label} seed {seed}")
        run_cfg = _run_config(cfg, spec, seed, steps, lrs, out / "runs", kd=kds.get(spec.base) if not (spec.tune_kd or spec.learned) else None)
        try:
            train(run_cfg, resume=True, splits=splits)
        except Exception as exc:  # noqa: BLE001 - one broken cell must not stop the others
            tqdm.write(f"compare: {spec.label} seed {seed} failed: {exc}")
            error = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=3)}
            _append(out / FAILURES, [{"operator": spec.label, "seed": seed, **error}])
            continue
        rows = read_metrics(Path(run_cfg.runs_dir) / run_cfg.name)
        lr = None if spec.learned else run_cfg.lr
        cell = {"operator": spec.label, "seed": seed, "base_lr": lr, **({"step_factor": factors[spec.label]} if spec.label in factors else {})}
        _append(out / RESULTS, [{**cell, **row, "final": i == len(rows) - 1} for i, row in enumerate(rows)])
        _log_hparams(Path(run_cfg.runs_dir) / run_cfg.name, spec, seed, lr, factors.get(spec.label), cfg, rows[-1])
    grid.close()

    # what this invocation names: its operators, seeds 0..seeds-1 (the folder may hold more of either)
    rows, labels = [r for r in read_results(out) if r["seed"] < cfg.seeds], [s.label for s in specs]
    summary = summarize(rows, cfg.target, labels=labels)
    summary["lrs"], summary["kds"], summary["step_factors"], summary["steps"] = lrs, kds, factors, steps
    (out / SUMMARY).write_text(render_summary(summary, cfg))
    plot_comparison(out, rows, labels, *load_trajectories(out / "runs", rows, labels))
    return summary


# ----------------------------------------------------------------------------------------------
# Integrity of a folder over reruns


def decisive_config(cfg: CompareConfig, specs: list[OperatorSpec], steps: int) -> dict[str, Any]:
    """What decides a cell's result besides its operator and seed: the :data:`DECISIVE` fields, the
    resolved run length ``steps`` and the teacher by content (resolved here, so a missing teacher
    fails before anything runs). Operators and seeds are left out (a rerun may add some), and so are
    the target, device, progress, output and trajectory points."""
    wants_kd = cfg.beta > 0 or any(beta > 0 for beta, _ in cfg.kd_grid) or any(s.tune_kd or s.learned for s in specs)
    teacher = file_digest(teacher_path(cfg.teacher)) if wants_kd else None
    return {**{k: getattr(cfg, k) for k in DECISIVE}, "steps": steps, "teacher": teacher}


def _takes_greedy_steps(label: str) -> bool:
    """Whether the cells of this operator label read ``hyper_jvp`` (``sgd+greedy``, ``adam+extrapolate`` ...)."""
    base, _, method = label.partition("+")
    return base in CLASSIC and method in GREEDY_METHODS


def check_learned_operators(out: Path, specs: list[OperatorSpec]) -> None:
    """Refuse a learned operator whose checkpoint has other bytes than the one under the same label
    that ``out`` already ran; record the digests of newly added ones in ``out/learned_operators.json``
    (apart from ``fingerprint.json``, because operators may be added between reruns)."""
    path = out / LEARNED
    then = json.loads(path.read_text()) if path.exists() else {}
    files = {s.label: s.base for s in specs if s.learned}
    now = {label: file_digest(f) for label, f in files.items()}
    for label in sorted(now.keys() & then.keys()):
        if now[label] != then[label]:
            raise UserError(f"{out} holds results of another learned operator {label!r}: {files[label]} has changed "
                            f"(digest {now[label]} but was {then[label]}); use another output folder")
    if now.keys() - then.keys():
        save_atomic_text(json.dumps({**then, **now}, indent=2, sort_keys=True) + "\n", path)


def materialize_variant(spec: OperatorSpec, folder: Path) -> OperatorSpec:
    """A variant of a learned operator as a checkpoint of its own, ``folder/<label>.pt`` (written once: its
    source, under the label it derives from, is guarded by :func:`check_learned_operators`), so its runs are
    ordinary learned-operator runs."""
    if spec.variant is None:
        return spec
    from .operators.learned import load_operator, with_variant

    path = folder / f"{spec.label}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with_variant(load_operator(spec.base), spec.variant).save(path, variant={"source": spec.base, "name": spec.variant})
    return replace(spec, base=str(path))


# ----------------------------------------------------------------------------------------------
# Learning-rate tuning


def log_grid(centre: float, n: int) -> list[float]:
    """``n`` values (3 significant digits), log-spaced over two decades centred on ``centre``."""
    if n == 1:
        return [centre]
    return [float(f"{centre * 10 ** (-1 + 2 * i / (n - 1)):.3g}") for i in range(n)]


def lr_grid(base: str, n: int) -> list[float]:
    """The lrs ``--tune-lr n`` tries for a classic operator: around its default."""
    return log_grid(DEFAULT_LR[base], n)


def step_grid(n: int) -> list[float]:
    """The step multipliers K ``--tune-step n`` tries for a learned operator: 0.1 to 10, 1 (as meta-trained) in the
    middle (``n`` odd: :meth:`CompareConfig.validate`)."""
    return log_grid(1.0, n)


def _tuning_score(cfg: CompareConfig, spec: OperatorSpec, lrs: dict[str, float], name: str, splits, steps: int,
                  kd: tuple[float, float] | None = None) -> float:
    """Validation accuracy of one tuning candidate after ``steps`` steps of the student of :data:`TUNE_SEED`
    (0 for one that diverges: simply a bad candidate)."""
    run_cfg = _run_config(cfg, spec, TUNE_SEED, steps, lrs, Path(cfg.out) / "tune", evals=1, name=name, kd=kd)
    try:
        return train(run_cfg, resume=True, splits=splits)["val_acc"]
    except Diverged:
        return 0.0


def tune_baselines(cfg: CompareConfig, specs: list[OperatorSpec], splits, steps: int) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """The lr of each classic base operator (fixed by ``cfg.lrs``, default, or tuned) and, with
    ``cfg.kd_grid``, its fixed (β, T): every candidate scored by validation accuracy after
    ``tune_steps`` steps of the student of :data:`TUNE_SEED`, a seed no cell reports."""
    bases = sorted({s.base for s in specs if not s.learned})
    lrs = {b: cfg.lrs.get(b, DEFAULT_LR[b]) for b in bases}
    tune_lr = [b for b in bases if b not in cfg.lrs] if cfg.tune_lr else []
    to_tune = bases if cfg.kd_grid else tune_lr
    if not to_tune:
        return lrs, {}
    path = Path(cfg.out) / TUNING
    scores = json.loads(path.read_text()) if path.exists() else {}
    tune_steps = min(cfg.tune_steps, steps)
    pairs = [tuple(p) for p in cfg.kd_grid] or [None]
    candidates = {b: [(lr, kd) for lr in (lr_grid(b, cfg.tune_lr) if b in tune_lr else [lrs[b]]) for kd in pairs] for b in to_tune}
    key = lambda base, lr, kd: f"{base}@{lr:g}" + ("" if kd is None else f"@{kd[0]:g},{kd[1]:g}")  # (older folders: lr only)
    grid = [(b, lr, kd) for b in to_tune for lr, kd in candidates[b]]
    for base, lr, kd in tqdm(grid, desc="tune baselines", disable=not cfg.progress, dynamic_ncols=True):
        k = key(base, lr, kd)
        if k not in scores:
            name = f"{base}-lr{lr:g}" + ("" if kd is None else f"-b{kd[0]:g}-T{kd[1]:g}")
            scores[k] = _tuning_score(cfg, OperatorSpec(label=base, base=base), {base: lr}, name, splits, tune_steps, kd)
            path.write_text(json.dumps(scores, indent=2) + "\n")
    kds = {}
    for base in to_tune:
        lrs[base], kd = max(candidates[base], key=lambda c: scores[key(base, *c)])
        if kd is not None:
            kds[base] = kd
    tqdm.write(f"compare: chosen on validation after {tune_steps} steps: lrs {json.dumps(lrs)}" + (f", (beta, T) {json.dumps(kds)}" if kds else ""))
    return lrs, kds


def tune_learned_steps(cfg: CompareConfig, specs: list[OperatorSpec], splits, steps: int) -> tuple[list[OperatorSpec], dict[str, float]]:
    """With ``cfg.tune_step``: each learned operator not given ``@step=K`` runs as its ``@step=K`` variant with
    the K of :func:`step_grid` best on validation (scored as the classic lrs are). Returns the specs to run (a
    tuned one keeps its label, its checkpoint the chosen variant's) and the chosen K per label."""
    from .operators.learned import step_factor

    to_tune = [s for s in specs if s.learned and (s.variant is None or step_factor(s.variant) is None)] if cfg.tune_step else []
    if not to_tune:
        return specs, {}
    path = Path(cfg.out) / TUNING
    scores = json.loads(path.read_text()) if path.exists() else {}
    tune_steps = min(cfg.tune_steps, steps)
    folder = Path(cfg.out) / "operators" / "tune"  # apart from the variants --operators names (the same label may be both)
    candidates = {s.label: {k: materialize_variant(OperatorSpec(f"{s.label}@step={k:g}", s.base, variant=f"step={k:g}"), folder)
                            for k in step_grid(cfg.tune_step)} for s in to_tune}
    grid = [c for by_k in candidates.values() for c in by_k.values()]
    for c in tqdm(grid, desc="tune learned steps", disable=not cfg.progress, dynamic_ncols=True):
        if c.label not in scores:
            scores[c.label] = _tuning_score(cfg, c, {}, _safe(c.label), splits, tune_steps)
            path.write_text(json.dumps(scores, indent=2) + "\n")
    factors = {label: max(by_k, key=lambda k: scores[by_k[k].label]) for label, by_k in candidates.items()}
    tqdm.write(f"compare: chosen on validation after {tune_steps} steps: learned operators' step x K {json.dumps(factors)}")
    return [replace(s, base=candidates[s.label][factors[s.label]].base) if s.label in factors else s for s in specs], factors


# ----------------------------------------------------------------------------------------------
# Summary


def summarize(rows: list[dict], target: float | None = None, labels: list[str] | None = None) -> dict[str, Any]:
    """Per operator: final test accuracy (mean ± std over seeds), best validation accuracy, steps to
    reach ``target`` test accuracy (default: the best classic operator's final mean), the paired
    difference of final test accuracy from the best classic operator (``reference``; points, on their
    common seeds: :func:`l2o_kd.stats.paired`), ms per step and peak memory. Only finished cells count."""
    runs = finished_runs(rows, labels)
    labels = list(runs)

    def by_seed(label: str) -> dict[int, float]:
        return {seed: seed_rows[-1]["test_acc"] for seed, seed_rows in runs[label].items()}

    finals = lambda label: list(by_seed(label).values())

    classic = [lab for lab in labels if lab in CLASSIC]
    reference = max(classic, key=lambda lab: statistics.mean(finals(lab))) if classic else None
    if target is None and reference:
        target = statistics.mean(finals(reference))
    summary: dict[str, Any] = {"target": target, "reference": reference, "operators": {}}
    for label in labels:
        per_seed = runs[label]
        tests = finals(label)
        best_vals = [max(r["val_acc"] for r in rs) for rs in per_seed.values()]
        last = [rs[-1] for rs in per_seed.values()]
        summary["operators"][label] = {
            "seeds": sorted(per_seed),
            "base_lr": last[0]["base_lr"],
            "step_factor": last[0].get("step_factor"),
            "steps": last[0]["step"],
            "test_mean": statistics.mean(tests),
            "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "best_val_mean": statistics.mean(best_vals),
            "steps_to_target": [_first_step(rs, target) for rs in per_seed.values()] if target is not None else [],
            "vs_reference": None if reference in (None, label) else paired(by_seed(label), by_seed(reference)),
            "ms_per_step": 1e3 * statistics.mean(r["wall_s"] / r["step"] for r in last),
            "peak_mem_mb": max(r.get("peak_mem_mb", float("nan")) for r in last),
        }
    return summary


def _first_step(rows: list[dict], target: float) -> int | None:
    return next((r["step"] for r in rows if r["test_acc"] >= target), None)


def render_summary(summary: dict[str, Any], cfg: CompareConfig) -> str:
    target = summary["target"]
    lines = [
        f"# compare: {cfg.student} on {cfg.dataset}, {summary['steps']} steps, batch {cfg.batch_size}, "
        f"KD β={cfg.beta:g} T={cfg.temperature:g}" + (" (the classic operators': tuned, below)" if cfg.kd_grid else ""),
        "",
        f"Seeds 0..{cfg.seeds - 1}; learning rates {json.dumps(summary['lrs'])}, schedule {cfg.schedule}"
        + (
            f" (tuned on validation over {cfg.tune_lr} values, {min(cfg.tune_steps, summary['steps'])} steps, seed {TUNE_SEED})"
            if cfg.tune_lr
            else ""
        )
        + (
            f"; the classic operators' fixed (β, T) {json.dumps(summary.get('kds', {}))}, chosen on validation from "
            f"{len(cfg.kd_grid)} pairs {'jointly with the lr' if cfg.tune_lr else 'at the lr above'} "
            f"({min(cfg.tune_steps, summary['steps'])} steps, seed {TUNE_SEED})"
            if cfg.kd_grid
            else ""
        )
        + (
            f"; the learned operators' steps × K {json.dumps(summary.get('step_factors', {}))}, K chosen on validation from "
            f"{cfg.tune_step} values in [0.1, 10] ({min(cfg.tune_steps, summary['steps'])} steps, seed {TUNE_SEED})"
            if summary.get("step_factors")
            else ""
        ),
        "Peak memory: CUDA peak allocation on a GPU; on CPU the peak RSS of the compare process (shared by all cells run so far).",
        "",
        f"| operator | lr | final test acc | − {summary.get('reference') or 'best classic'} (paired, points: mean ± std, wins, 95% CI) | "
        f"best val acc | steps to {_pct(target)} test (per seed) | ms / step | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, s in summary["operators"].items():
        reach = ", ".join("never" if v is None else str(v) for v in s["steps_to_target"]) or "-"
        lr = f"{s['base_lr']:g}" if s["base_lr"] is not None else "learned" + (f" ×{s['step_factor']:g}" if s.get("step_factor") else "")
        lines.append(
            f"| {label} | {lr} | {_pct(s['test_mean'])} ± {100 * s['test_std']:.2f} | {s['vs_reference'] or '–'} | {_pct(s['best_val_mean'])} | {reach} | "
            f"{s['ms_per_step']:.1f} | {s['peak_mem_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


# ----------------------------------------------------------------------------------------------
# Helpers


def _run_config(
    cfg: CompareConfig,
    spec: OperatorSpec,
    seed: int,
    steps: int,
    lrs: dict[str, float],
    runs_dir: Path,
    evals: int | None = None,
    name: str | None = None,
    kd: tuple[float, float] | None = None,
) -> TrainConfig:
    """The run of one cell (or tuning candidate); ``kd``: its fixed (β, T) instead of the folder's."""
    evals = evals or cfg.evals
    beta, temperature = (cfg.beta, cfg.temperature) if kd is None else kd
    return TrainConfig(
        **{name: getattr(cfg, name) for name in CompareConfig.RUN_FIELDS},
        model=cfg.student,
        beta=beta,
        temperature=temperature,
        operator=spec.base,
        lr=lrs.get(spec.base, 1.0),
        tune_kd=spec.tune_kd,
        steps=steps,
        seed=seed,
        runs_dir=str(runs_dir),
        run_name=name or f"{_safe(spec.label)}-s{seed}",
        eval_every=max(1, steps // evals),
        eval_at_start=evals > 1,
        trajectory_every=max(1, steps // cfg.trajectory_points) if evals > 1 else 0,
    )


def load_trajectories(runs_dir: Path, rows: list[dict], labels: list[str]) -> tuple[dict, int | None]:
    """The saved parameter trajectories of the lowest seed that every finished operator ran."""
    runs = finished_runs(rows, labels)
    seeds = set.intersection(*(set(per_seed) for per_seed in runs.values())) if runs else set()
    if not seeds:
        return {}, None
    seed = min(seeds)
    paths = {label: runs_dir / f"{_safe(label)}-s{seed}" / Trajectory.FILE for label in runs}
    return {label: torch.load(p, weights_only=True)["params"] for label, p in paths.items() if p.exists()}, seed


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in label)


def read_results(out: str | Path) -> list[dict]:
    path = Path(out) / RESULTS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _append(path: Path, rows: list[dict]) -> None:
    """Append rows in one write, so an interruption leaves either none or all of a cell's rows."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()


def _log_hparams(run_dir: Path, spec: OperatorSpec, seed: int, lr: float | None, step_factor: float | None, cfg: CompareConfig,
                 last: dict) -> None:
    """The cell's hyperparameters and final metrics for TensorBoard's HPARAMS tab, in ``<run>/hparams``
    (what ``SummaryWriter.add_hparams`` writes, without its extra empty events file in the run folder)."""
    from torch.utils.tensorboard.summary import hparams, scalar
    from torch.utils.tensorboard.writer import FileWriter

    params = {"operator": spec.label, "seed": seed, "lr": lr if lr is not None else -1.0, "step_factor": step_factor or -1.0, "student": cfg.student,
              "beta": cfg.beta, "temperature": cfg.temperature, "steps": last["step"]}
    metrics = {"hparam/test_acc": last["test_acc"], "hparam/val_acc": last["val_acc"]}
    writer = FileWriter(str(run_dir / "hparams"))
    for summary in (*hparams(params, metrics), *(scalar(k, v) for k, v in metrics.items())):
        writer.add_summary(summary)
    writer.close()
