"""Step cost of each operator, as ratios to Adam measured in the same process. Not a test: a measurement.

For each student and operator: the median wall time of a full training step (KD loss forward,
backward, operator step, including a hypergradient operator's extra passes) and of the operator
step alone, over ``--repeats`` rounds after 5 warm-up rounds, on random data of batch ``--batch-size``;
a round takes one step of every operator in turn, and "step / Adam step" is the median over rounds of
the ratio within the round (a machine whose speed drifts, as a shared one does, biases none of them);
the size of the operator's state; and peak memory of a fresh process that runs only that student and
operator for 10 steps: on CUDA its peak allocated memory, on CPU its peak resident set.

With a greedy operator among them, one more row, ``greedy floor``: the passes a greedy step cannot do
without, timed alone in the same rounds (the training step, the validation forward + backward at the new
weights, one more forward of the training batch: J a by forward difference), so "greedy / SGD" minus
"greedy floor / SGD" is what the hypergradient costs beyond them.

    python scripts/bench_operators.py [--operators sgd,adam,sgd+greedy,ckpt:checkpoints/operator.pt] \
        [--students tiny,small,resnet8] [--threads 2] [--device cpu] [--append docs/results/step-cost.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

from l2o_kd.compare import OperatorSpec
from l2o_kd.config import HYPER_JVPS, TrainConfig
from l2o_kd.distill import batch_ce
from l2o_kd.hypergrad import Batches
from l2o_kd.models import apply, build_model, frozen, split_state
from l2o_kd.operators import StepContext
from l2o_kd.step import gradient
from l2o_kd.train import build_operator

FLOOR = "greedy floor"  # the row of greedy's passes alone (module docstring)


def bench(student: str, specs: list[OperatorSpec], batch: int, repeats: int, device: str, memory: bool = True,
          hyper_jvp: str = TrainConfig.hyper_jvp) -> dict[str, dict]:
    """The operators' steps *interleaved*: round r takes one step of every operator in turn, so a drift
    of the machine's speed (other processes, clock) hits all of them alike; ``ratio`` is the median
    over rounds of each operator's step time / the first operator's step time in the same round
    (``ratio_sgd``: / SGD's, when an ``sgd`` cell is among them)."""
    model = build_model(student, seed=0).to(device)
    g = torch.Generator().manual_seed(0)
    x, xv = (torch.randn(batch, 3, 32, 32, generator=g).to(device) for _ in range(2))
    y, yv = (torch.randint(10, (batch,), generator=g).to(device) for _ in range(2))
    teacher = torch.randn(batch, 10, generator=g).to(device)
    cells = []
    if any(spec.tune_kd == "greedy" for spec in specs):
        specs = [*specs, OperatorSpec(label=FLOOR, base="sgd")]
    for spec in specs:
        op = build_operator(TrainConfig(operator=spec.base, lr=1e-3, tune_kd=spec.tune_kd, hyper_jvp=hyper_jvp), 350, 10_000, device)
        params, buffers = split_state(model)
        cells.append({"spec": spec, "op": op, "params": params, "buffers": buffers, "state": op.init(params), "full": [], "alone": []})
    for i in range(repeats + 5):
        for cell in cells:
            timed = _floor_step if cell["spec"].label == FLOOR else _timed_step
            full, alone = timed(cell, model, x, y, teacher, xv, yv, i, device)
            if i >= 5:  # warm-up rounds are not counted
                cell["full"].append(full)
                cell["alone"].append(alone)
    ref = cells[0]["full"]
    sgd = next((c["full"] for c in cells if c["spec"].label == "sgd"), None)
    return {
        cell["spec"].label: {
            "step_ms": statistics.median(cell["full"]) * 1e3,
            "op_ms": statistics.median(cell["alone"]) * 1e3,
            "ratio": statistics.median(a / b for a, b in zip(cell["full"], ref)),
            "ratio_sgd": statistics.median(a / b for a, b in zip(cell["full"], sgd)) if sgd else float("nan"),
            "state_mib": _bytes(cell["state"]) / 2**20,
            "peak_mib": _peak_mib(device, student, cell["spec"], batch, hyper_jvp) if memory and cell["spec"].label != FLOOR else float("nan"),
        }
        for cell in cells
    }


def _timed_step(cell: dict, model, x, y, teacher, xv, yv, i: int, device: str) -> tuple[float, float]:
    """One training step of the cell's operator: (full step seconds, operator step alone)."""
    op, state = cell["op"], cell["state"]
    _sync(device)
    t0 = time.perf_counter()
    kd = op.kd(state)
    beta, temp = (kd.beta, kd.temperature) if kd else (0.5, 4.0)
    grads, stats, logits = gradient(model, cell["params"], cell["buffers"], x, y, teacher, beta, temp, TrainConfig.kd_form)  # the training step's
    ctx = StepContext(i, 10_000, stats[0].item(), float("nan"), float("nan"))  # as the training step does
    if op.needs_batches:
        ctx = op.with_batches(ctx, Batches(model, cell["buffers"], x, y, teacher, lambda: (xv, yv)), logits)
    _sync(device)
    t1 = time.perf_counter()
    with torch.no_grad():
        cell["params"], cell["state"], _ = op.step(cell["params"], grads, state, ctx)
    _sync(device)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def _floor_step(cell: dict, model, x, y, teacher, xv, yv, i: int, device: str) -> tuple[float, float]:
    """The passes of a greedy step alone: an SGD training step, the validation forward + backward at its new
    weights, a train-mode forward of the training batch (no hypergradient): (seconds, seconds after the first)."""
    full, _ = _timed_step(cell, model, x, y, teacher, xv, yv, i, device)
    t1 = time.perf_counter()
    w = {k: v.detach().requires_grad_(True) for k, v in cell["params"].items()}
    with torch.enable_grad():
        torch.autograd.grad(batch_ce(model, w, cell["buffers"], xv, yv), list(w.values()))
    with torch.no_grad():
        apply(model, cell["params"], frozen(cell["buffers"]), x, train=True)
    _sync(device)
    extra = time.perf_counter() - t1
    return full + extra, extra


def _peak_mib(device: str, student: str, spec: OperatorSpec, batch: int, hyper_jvp: str) -> float:
    """Peak memory (MiB) of a fresh process running 10 steps of ``student`` with ``spec`` alone: the peak
    CUDA allocation on a GPU, the peak resident set on CPU."""
    import subprocess
    import sys

    arg = spec.base if spec.learned else spec.label
    res = subprocess.run(
        [sys.executable, __file__, "--peak-of", f"{student}:{arg}", "--batch-size", str(batch), "--threads", "1", "--hyper-jvp", hyper_jvp,
         "--device", device],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(res.stdout.strip().splitlines()[-1])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _bytes(tree) -> int:
    if isinstance(tree, dict):
        return sum(_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_bytes(v) for v in tree)
    return tree.numel() * tree.element_size() if isinstance(tree, torch.Tensor) else 0


def _times(ratio: float) -> str:
    """A ratio as the tables print it; "–" where there was nothing to divide by (no SGD cell)."""
    return "–" if ratio != ratio else f"{ratio:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--operators", default="sgd,adam,sgd+greedy,ckpt:checkpoints/operator.pt")
    ap.add_argument("--students", default="tiny,small,resnet8")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hyper-jvp", choices=HYPER_JVPS, default=TrainConfig.hyper_jvp, help="how greedy operators form J a")
    ap.add_argument("--append", default=None, help="also append the table to this markdown file (e.g. docs/results/step-cost.md)")
    ap.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)  # STUDENT:OPERATOR, internal: one cell in a fresh process
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_of:
        student, spec = args.peak_of.split(":", 1)
        bench(student, [OperatorSpec.parse(spec)], args.batch_size, repeats=5, device=args.device, memory=False, hyper_jvp=args.hyper_jvp)
        if args.device.startswith("cuda"):
            print(torch.cuda.max_memory_allocated(args.device) / 2**20)
        else:  # VmHWM, not getrusage: Linux carries the parent's peak into ru_maxrss across fork + exec
            hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
            print(int(hwm.split()[1]) / 1024)
        return
    specs = [OperatorSpec.parse(s) for s in args.operators.split(",") if s != "adam"]
    specs.insert(0, OperatorSpec.parse("adam"))  # the reference, first in every round
    lines = [
        f"Step cost, {datetime.date.today()}: `python scripts/bench_operators.py --threads {args.threads} --device {args.device} --hyper-jvp {args.hyper_jvp}`; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {args.batch_size}, median of {args.repeats} interleaved rounds after 5 warm-up rounds (ratio: median of the per-round ratios), "
        f"random data; peak MiB: "
        + (
            "CUDA peak allocation of a fresh process running only that cell."
            if args.device.startswith("cuda")
            else "peak RSS of a fresh process running only that cell (torch's own ~300 MiB included)."
        ),
        "",
        "| student | operator | step ms | operator ms | step / Adam step | step / SGD step | operator state MiB | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for student in args.students.split(","):
        res = bench(student, specs, args.batch_size, args.repeats, args.device, hyper_jvp=args.hyper_jvp)
        for label, r in res.items():
            line = (
                f"| {student} | {label} | {r['step_ms']:.2f} | {r['op_ms']:.2f} | {r['ratio']:.2f}x | {_times(r['ratio_sgd'])} | "
                f"{r['state_mib']:.2f} | {r['peak_mib']:.0f} |"
            )
            lines.append(line)
            print(line, flush=True)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
