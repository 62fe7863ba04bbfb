"""The ``l2o-kd`` command line: click commands only; the work happens in the modules they call."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .config import (
    CLASSIC_OPERATORS,
    CLIP_MODES,
    DATASETS,
    ES_OBJECTIVES,
    ES_PARAMS,
    HYPER_JVPS,
    KD_FORMS,
    LOOKAHEADS,
    META_METHODS,
    PER_COORDINATE,
    SCHEDULES,
    SEARCH_METHODS,
    TEACHER_RECIPE,
    TUNE_KD_METHODS,
    CompareConfig,
    MetaConfig,
    SearchConfig,
    TrainConfig,
)
from .errors import Diverged, UserError

T, M, C, S = TrainConfig, MetaConfig, CompareConfig, SearchConfig  # every default below is the config's own (declared once, in config.py)
DATASET_HELP = ("cifar10 (official format or the JPEG copy), cifar100 (official python format), imagefolder (--data-root: "
                "<class>/<image> folders, or train/ and test/ of them; resized to 32x32), synthetic (a small generated task).")
KD_FORM_HELP = ("KD loss: hinton = (1-beta) CE + beta T^2 KL(teacher || student); paper = no T^2 (Gorpinich et al.); "
                "reverse = (1-beta) CE + beta KL(student || teacher), no T^2 (the code released with that paper).")


def training_options(f):
    """Flags shared by every command that trains."""
    options = [
        click.option("--dataset", type=click.Choice(DATASETS), default=T.dataset, show_default=True, help=DATASET_HELP),
        click.option("--data-root", default=None, help="CIFAR-10 folder or .tar.gz [default: $L2O_KD_DATA or ~/.cache/l2o_kd/data]"),
        click.option("--download", is_flag=True, help="Download the official CIFAR-10 through torchvision (needs network)."),
        click.option("--epochs", type=float, default=None, help="Training length in epochs."),
        click.option("--steps", type=int, default=None, help="Training length in steps (wins over --epochs)."),
        click.option("--batch-size", type=int, default=T.batch_size, show_default=True),
        click.option("--seed", type=int, default=T.seed, show_default=True),
        click.option("--init", default=None, help="Start from the weights of this model checkpoint (same model; fine-tuning) instead of --seed's initialization."),
        click.option("--device", default=T.device, show_default=True, help="cpu | cuda"),
        click.option("--channels-last", is_flag=True, help="Keep the weights channels-last too (activations always are, l2o_kd/models.py)."),
        click.option("--amp", is_flag=True, help="bf16 autocast for the student's forward/backward (GPUs with bf16; works on CPU)."),
        click.option("--eval-every", type=int, default=None, help="Steps between evaluations and checkpoints [default: one epoch]."),
        click.option("--runs-dir", default=T.runs_dir, show_default=True),
        click.option("--run-name", default=None, help="Run folder name under --runs-dir [default: derived from the config]."),
        click.option("--resume", is_flag=True, help="Continue the run in --runs-dir/--run-name from its last checkpoint."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def optimizer_options(lr: float, schedule: str):
    def deco(f):
        options = [
            click.option("--lr", type=float, default=lr, show_default=True, help="Base learning rate."),
            click.option("--momentum", type=float, default=T.momentum, show_default=True, help="SGD momentum."),
            click.option("--nesterov", is_flag=True),
            click.option("--weight-decay", type=float, default=T.weight_decay, show_default=True),
            click.option("--schedule", type=click.Choice(SCHEDULES), default=schedule, show_default=True, help="The lr schedule."),
            click.option("--lr-step-epochs", type=float, default=T.lr_step_epochs, show_default=True, help="step schedule: period in epochs."),
            click.option("--lr-gamma", type=float, default=T.lr_gamma, show_default=True, help="step schedule: factor per period."),
            click.option("--augment", is_flag=True, help="Random crop (pad 4) and horizontal flip."),
            click.option("--train-subset", type=int, default=None, help="Train on this many images only (e.g. 12800)."),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return deco


def _train_config(kw: dict, **fixed):
    kw = {**kw, **fixed}
    ctx = click.get_current_context()
    given = lambda names: [k for k in names if k in kw and ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    learned = kw.pop("optimizer_ckpt", None)
    if learned and given(["operator"]):
        raise UserError(f"--optimizer {learned} replaces --operator: give one of them")
    kw["operator"] = learned or kw["operator"]
    decided = given(sorted(T.LEARNED_DECIDES))
    if kw["operator"] not in CLASSIC_OPERATORS and decided:
        flags = ", ".join("--" + k.replace("_", "-") for k in decided)
        raise UserError(f"the learned operator {kw['operator']} chooses its own steps and (beta, T): drop {flags}")
    resume = kw.pop("resume")
    kw["progress"] = not kw.pop("no_progress")
    if kw.get("epochs") is None:
        kw.pop("epochs", None)
    return TrainConfig(**kw), resume


def _print_row(row: dict) -> None:
    keys = ("step", "epoch", "train_loss", "val_acc", "test_acc", "wall_s")
    click.echo(json.dumps({k: round(row[k], 4) if isinstance(row[k], float) else row[k] for k in keys if k in row}))


@click.group()
@click.version_option(package_name="l2o-kd")
def cli():
    """l2o-kd: learn the optimizer of knowledge distillation."""


@cli.command("train-teacher")
@click.option("--model", default=TEACHER_RECIPE["model"], show_default=True, help="resnet20 | resnet56 (any registered model works)")
@optimizer_options(lr=TEACHER_RECIPE["lr"], schedule=TEACHER_RECIPE["schedule"])
@training_options
def train_teacher(**kw):
    """Train a teacher with cross-entropy (no KD); its checkpoint.pt is usable as --teacher."""
    cfg, resume = _train_config(kw, operator=TEACHER_RECIPE["operator"], beta=TEACHER_RECIPE["beta"])
    from .train import train

    _print_row(train(cfg, resume=resume))


def student_options(f):
    """What a distillation run is: student, operator, teacher, KD and its hypergradient tuning."""
    options = [
        click.option("--student", "model", default=T.model, show_default=True, help="tiny | tiny_wide | tiny_narrow | tiny_deep | small | resnet8"),
        click.option("--operator", default=T.operator, show_default=True, help="sgd | adam | adamw"),
        click.option("--optimizer", "optimizer_ckpt", default=None, help="A learned-operator checkpoint (replaces --operator)."),
        click.option("--teacher", default=None, help="Teacher checkpoint [default: checkpoints/teacher-resnet20.pt]."),
        click.option("--beta", type=float, default=T.beta, show_default=True, help="Weight of the KD term, in [0, 1]; 0 = no KD."),
        click.option("--temperature", type=float, default=T.temperature, show_default=True),
        click.option("--kd-form", type=click.Choice(KD_FORMS), default=T.kd_form, show_default=True, help=KD_FORM_HELP),
        click.option("--tune-kd", default=None,
                     help=f"{' | '.join(TUNE_KD_METHODS)}: move (beta, T) by validation hypergradients."),
        click.option("--hyper-lr", type=float, default=T.hyper_lr, show_default=True),
        click.option("--hyper-clip", type=float, default=T.hyper_clip, show_default=True, help="Hypergradient clip (0: none)."),
        click.option("--hyper-clip-mode", type=click.Choice(CLIP_MODES), default=T.hyper_clip_mode, show_default=True,
                     help="norm: scale the hypergradient to norm <= clip; value: clamp each component to [-clip, clip]."),
        click.option("--hyper-lookahead", type=click.Choice(LOOKAHEADS), default=T.hyper_lookahead, show_default=True,
                     help="Greedy look-ahead step at the current lr, or at the base lr with the hypergradient scaled by current/base lr (the paper's code)."),
        click.option("--hyper-jvp", type=click.Choice(HYPER_JVPS), default=T.hyper_jvp, show_default=True,
                     help="Greedy: the Jacobian-vector product J a as a forward difference reusing the training forward (one forward), or exactly "
                          "(forward mode, 1.4x the step)."),
        click.option("--hyper-every", type=int, default=T.hyper_every, show_default=True, help="Steps between hyper-steps."),
        click.option("--hyper-unroll", type=int, default=T.hyper_unroll, show_default=True, help="unrolled: steps differentiated through."),
        click.option("--extrapolate-after", type=float, default=T.extrapolate_after, show_default=True, help="extrapolate: fraction of the run in the greedy phase."),
        click.option("--periodic-greedy", type=int, default=T.periodic_greedy, show_default=True,
                     help="extrapolate-periodic: greedy steps per cycle, fitted by a line."),
        click.option("--periodic-follow", type=int, default=T.periodic_follow, show_default=True,
                     help="extrapolate-periodic: steps per cycle following the line."),
        click.option("--bn-updates", type=int, default=T.bn_updates, show_default=True,
                     help="Extra train-mode forwards of each training batch that only move BatchNorm statistics (the side effect "
                          "of the released greedy code's 3 extra forwards; for the confound experiment of docs/results/paper-reproduction.md)."),
    ]
    f = optimizer_options(lr=T.lr, schedule=T.schedule)(training_options(f))
    for option in reversed(options):
        f = option(f)
    return f


@cli.command()
@student_options
def deploy(**kw):
    """Train a student by distillation with a classic or learned operator."""
    cfg, resume = _train_config(kw)
    from .distributed import from_env
    from .train import train

    dist = from_env(cfg.device)  # under torchrun: data parallel over the job's processes
    row = train(cfg, resume=resume, dist=dist)
    if dist is None or dist.main:
        _print_row(row)


@cli.command()
@click.option("--method", type=click.Choice(SEARCH_METHODS), default=S.method, show_default=True, help="tpe (Optuna) | random: how (beta, T) are drawn.")
@click.option("--trials", type=int, default=S.trials, show_default=True, help="Full training runs, scored on validation accuracy.")
@click.option("--retrain-seeds", default=S.retrain_seeds, show_default=True, help="Seeds the best (beta, T) is retrained with.")
@click.option("--out", default=S.out, show_default=True, help="Output folder; rerunning resumes the search.")
@student_options
def search(method, trials, retrain_seeds, out, **kw):
    """Search fixed KD hyperparameters (beta, T) by TPE or at random; retrain the best."""
    from .search import search

    cfg, _ = _train_config(kw)
    summary = search(SearchConfig(method=method, trials=trials, retrain_seeds=retrain_seeds, out=out), cfg)
    click.echo(json.dumps(summary))


@cli.command("meta-train")
@click.option("--dataset", type=click.Choice(DATASETS), default=M.dataset, show_default=True, help=DATASET_HELP)
@click.option("--data-root", default=None)
@click.option("--teacher", default=None, help="Teacher checkpoint [default: checkpoints/teacher-resnet20.pt].")
@click.option("--kd-form", type=click.Choice(KD_FORMS), default=M.kd_form, show_default=True, help=KD_FORM_HELP)
@click.option("--students", default=M.students, show_default=True, help="Comma-separated student family of the episodes.")
@click.option("--method", type=click.Choice(META_METHODS), default=M.method, show_default=True,
              help="Meta-gradient: truncated backprop through unrolls, antithetic ES on end-of-episode val loss, or persistent ES "
                   "(unbiased for the whole episode, one truncation per meta-step).")
@click.option("--unroll", type=int, default=M.unroll, show_default=True, help="tbptt, pes: steps per truncation (K).")
@click.option("--curriculum", default=M.curriculum, show_default=True, help="Episode lengths, each for an equal share of the budget.")
@click.option("--meta-steps", type=int, default=M.meta_steps, show_default=True, help="Budget in meta-steps.")
@click.option("--minutes", type=float, default=None, help="Budget in wall-clock minutes (whichever ends first).")
@click.option("--meta-lr", type=float, default=M.meta_lr, show_default=True)
@click.option("--clip", type=float, default=M.clip, show_default=True, help="Meta-gradient norm clip.")
@click.option("--batch-size", type=int, default=M.batch_size, show_default=True)
@click.option("--second-order", is_flag=True, help="tbptt: differentiate through the student's gradients too (dearer).")
@click.option("--sigma", type=float, default=M.sigma, show_default=True, help="es, pes: std of the perturbations of the operator's weights.")
@click.option("--pairs", type=int, default=M.pairs, show_default=True, help="Population per meta-step and rank: es/pes antithetic pairs of episodes, tbptt episodes.")
@click.option("--es-eval", type=int, default=M.es_eval, show_default=True, help="es, pes: validation images of the objective (end of episode / of each truncation).")
@click.option("--es-objective", type=click.Choice(ES_OBJECTIVES), default=M.es_objective, show_default=True,
              help="es, pes: validation cross-entropy or error rate.")
@click.option("--vmap", is_flag=True, help="es, pes: advance a meta-step's particles of one student together, by one vmapped step "
              "(for a GPU; on a CPU a loop was faster).")
@click.option("--es-params", type=click.Choice(list(ES_PARAMS)), default=M.es_params, show_default=True,
              help="Meta-train (es, pes: perturb) all operator weights, only the output layers, the per-coordinate MLP with the head's output layer "
                   "and slopes (--per-coordinate mlp), that MLP alone (coord), the output biases, the global head's 3 biases, or those 3 and their slopes "
                   "in progress (fewer dimensions, less variance).")
@click.option("--hidden", type=int, default=M.hidden, show_default=True)
@click.option("--base-scale", type=float, default=M.base_scale, show_default=True)
@click.option("--normalize-update/--no-normalize-update", default=M.normalize_update, show_default=True,
              help="A fresh operator whose per-coordinate part decides only the shape of each tensor's update (unit RMS); "
                   "the global head decides its size.")
@click.option("--per-coordinate", type=click.Choice(list(PER_COORDINATE)), default=M.per_coordinate, show_default=True,
              help="A fresh operator's per-coordinate part: " + "; ".join(f"{k}: {v}" for k, v in PER_COORDINATE.items()) + ".")
@click.option("--rms-floor", type=float, default=M.rms_floor, show_default=True,
              help="A fresh operator's floor on each tensor's RMS, relative to the RMS over all coordinates (0: none).")
@click.option("--mix/--no-mix", default=M.mix, show_default=True,
              help="A fresh operator whose prior direction is a learned mix of momentum, Adam and sign terms (else momentum).")
@click.option("--init", default=None, help="Start from this operator checkpoint (its config wins over --hidden, --base-scale, "
              "--normalize-update, --per-coordinate, --rms-floor, --mix).")
@click.option("--validate-every", type=int, default=M.validate_every, show_default=True)
@click.option("--val-horizon", type=int, default=M.val_horizon, show_default=True, help="Steps of each meta-validation episode.")
@click.option("--val-seeds", default=M.val_seeds, show_default=True, help="Meta-validation seeds (shared among torchrun ranks).")
@click.option("--val-students", default=M.val_students, show_default=True,
              help="Comma-separated meta-validation students: every seed runs on each; the best operator has the best mean.")
@click.option("--adam-lr", type=float, default=M.adam_lr, show_default=True, help="Learning rate of the reference Adam.")
@click.option("--seed", type=int, default=M.seed, show_default=True)
@click.option("--device", default=M.device, show_default=True)
@click.option("--threads", type=int, default=None, help="torch intra-op threads [default: all cores].")
@click.option("--runs-dir", default=M.runs_dir, show_default=True)
@click.option("--run-name", default=M.run_name, show_default=True)
@click.option("--out", default=None, help="Where the best operator goes [default: <run dir>/operator-best.pt].")
@click.option("--resume", is_flag=True)
@click.option("--no-progress", is_flag=True)
def meta_train_cmd(threads, resume, no_progress, **kw):
    """Meta-train the learned LSTM operator across short distillation episodes."""
    from .distributed import from_env
    from .meta import meta_train

    _set_threads(threads)
    dist = from_env(kw["device"])  # under torchrun: episodes on every rank, meta-gradients averaged
    if dist:
        kw["device"] = dist.device
    result = meta_train(MetaConfig(**kw, progress=not no_progress), resume=resume, dist=dist)
    if dist is None or dist.main:
        click.echo(json.dumps(result))


@cli.command()
@click.option("--operators", default=C.operators, show_default=True,
              help=f"Comma-separated: sgd | adam | adamw | BASE+{'|'.join(TUNE_KD_METHODS)} | ckpt:PATH (a learned operator).")
@click.option("--seeds", type=int, default=C.seeds, show_default=True, help="Seeds 0..N-1 (student initialization and data order).")
@click.option("--student", default=C.student, show_default=True)
@click.option("--epochs", type=float, default=C.epochs, show_default=True)
@click.option("--steps", type=int, default=None, help="Length in steps (wins over --epochs).")
@click.option("--dataset", type=click.Choice(DATASETS), default=C.dataset, show_default=True, help=DATASET_HELP)
@click.option("--data-root", default=None)
@click.option("--download", is_flag=True)
@click.option("--teacher", default=None, help="Teacher checkpoint [default: checkpoints/teacher-resnet20.pt].")
@click.option("--beta", type=float, default=C.beta, show_default=True, help="Fixed KD weight of the classic operators.")
@click.option("--temperature", type=float, default=C.temperature, show_default=True)
@click.option("--kd-form", type=click.Choice(KD_FORMS), default=C.kd_form, show_default=True, help=KD_FORM_HELP)
@click.option("--hyper-clip-mode", type=click.Choice(CLIP_MODES), default=C.hyper_clip_mode, show_default=True,
              help="KD-tuning operators: clip the hypergradient's norm, or each component.")
@click.option("--hyper-lookahead", type=click.Choice(LOOKAHEADS), default=C.hyper_lookahead, show_default=True,
              help="KD-tuning operators (greedy): the look-ahead step at the current or the base lr.")
@click.option("--hyper-jvp", type=click.Choice(HYPER_JVPS), default=C.hyper_jvp, show_default=True,
              help="KD-tuning operators (greedy): J a as a forward difference (one forward) or exactly (forward mode, slower).")
@click.option("--batch-size", type=int, default=C.batch_size, show_default=True)
@click.option("--momentum", type=float, default=C.momentum, show_default=True, help="SGD momentum.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=C.schedule, show_default=True, help="lr schedule of the classic operators.")
@click.option("--lr", "lr_items", multiple=True, help="Fix a base operator's lr, e.g. --lr sgd=0.1 (not tuned then).")
@click.option("--tune-lr", type=int, default=C.tune_lr, show_default=True, help="Tune classic lrs over a log grid of N values on validation.")
@click.option("--tune-step", type=int, default=C.tune_step, show_default=True,
              help="Tune each learned operator's step multiplier K (as ckpt:PATH@step=K) over a log grid of N (odd) values from 0.1 "
              "to 10 on validation, as --tune-lr tunes the classic lrs (an operator given @step=K keeps its K).")
@click.option("--tune-steps", type=int, default=C.tune_steps, show_default=True, help="Length of each tuning run.")
@click.option("--tune-kd-grid", "kd_grid", default="", help="Tune the classic operators' fixed (beta, T) too, jointly with the lr, over "
              "these pairs, e.g. 0.5:4,0.9:4,0.9:8 (scored as --tune-lr).")
@click.option("--target", type=float, default=None, help="Test accuracy for 'steps to target' [default: best classic final mean].")
@click.option("--evals", type=int, default=C.evals, show_default=True, help="Evaluation points per run.")
@click.option("--device", default=C.device, show_default=True)
@click.option("--threads", type=int, default=None, help="torch intra-op threads [default: all cores].")
@click.option("--out", default=C.out, show_default=True, help="Output folder; rerunning skips finished cells.")
@click.option("--no-progress", is_flag=True)
def compare(lr_items, threads, no_progress, **kw):
    """Compare operators side by side: results.jsonl, summary.md, plots, one TensorBoard run per cell."""
    from .compare import compare

    _set_threads(threads)
    kw["lrs"] = _parse_lrs(lr_items)
    kw["kd_grid"] = _parse_kd_grid(kw["kd_grid"])
    summary = compare(CompareConfig(**kw, progress=not no_progress))
    click.echo((Path(kw["out"]) / "summary.md").read_text())
    click.echo(json.dumps({"target": summary["target"], **{k: round(v["test_mean"], 4) for k, v in summary["operators"].items()}}))


def _parse_lrs(items) -> dict[str, float]:
    lrs = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            lrs[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"--lr {item!r}: write NAME=VALUE, e.g. --lr sgd=0.1") from None
    return lrs


def _parse_kd_grid(text: str) -> list[list[float]]:
    pairs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        beta, sep, temperature = item.partition(":")
        try:
            pairs.append([float(beta), float(temperature if sep else "")])
        except ValueError:
            raise UserError(f"--tune-kd-grid {item!r}: write BETA:T pairs, e.g. --tune-kd-grid 0.5:4,0.9:8") from None
    return pairs


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@cli.command()
@click.argument("checkpoint")
@click.option("--split", default="test", show_default=True, help="train | val | test")
@click.option("--data-root", default=None)
@click.option("--device", default=T.device, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(checkpoint, split, data_root, device, as_json):
    """Accuracy, loss and median top-1 logit margin of a saved teacher or student on a split."""
    from .evaluate import evaluate_checkpoint

    res = evaluate_checkpoint(checkpoint, split, data_root, device)
    click.echo(json.dumps(res) if as_json else f"{res['model']} on {res['dataset']} {split}: accuracy {res['accuracy']:.4f}, loss {res['loss']:.4f}, "
               f"median top-1 margin {res['median_margin']:.2f} (n={res['n']})")


@cli.command()
@click.argument("checkpoint")
def inspect(checkpoint):
    """A learned operator's weights: per group its size, whether it is one of the designed prior's scalars,
    and its change from the recorded initialization (seed and config in the checkpoint)."""
    from .operators.learned import load_operator, weight_changes

    op = load_operator(checkpoint)
    click.echo(f"{checkpoint}: {sum(p.numel() for p in op.net.parameters())} weights, per-coordinate part {op.cfg.per_coordinate!r}, "
               f"init_seed {op.cfg.init_seed}")
    click.echo(f"{'group':<16} {'weights':>7}  {'kind':<8} {'|init|':>9} {'|change|':>9} {'relative':>9}")
    for r in weight_changes(op):
        click.echo(f"{r['group']:<16} {r['numel']:>7}  {'prior' if r['prior'] else 'network':<8} {r['init_norm']:>9.4g} {r['change_norm']:>9.4g} "
                   f"{r['relative_change']:>9.4g}")


def main(argv=None) -> None:
    """Entry point: every user error is one line on stderr and exit code 2."""
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="l2o-kd")
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # bad flag, unknown command, ...
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Diverged as exc:
        click.echo(f"error: training diverged: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # disk full, read-only folder, ...: the last checkpoint written is intact
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
