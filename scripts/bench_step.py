"""Wall time of one deploy step (forward + backward + operator) and of the operator alone, per
operator and student, as ratios to Adam measured in the same process. Not a test: a measurement.

    python scripts/bench_step.py [--students tiny,small,resnet8] [--operator checkpoints/operator-lstm.pt] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from l2o_kd.distill import kd_loss
from l2o_kd.models import apply, build_model, split_state
from l2o_kd.operators import SGD, Adam, StepContext
from l2o_kd.operators.learned import LSTMOperator, load_operator


def bench(model_name: str, operators: dict, batch: int, repeats: int, device: str) -> dict:
    model = build_model(model_name, seed=0).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(10, (batch,), device=device)
    t = torch.randn(batch, 10, device=device)
    out = {}
    for name, op in operators.items():
        params, buffers = split_state(model)
        state = op.init(params)
        full, alone = [], []
        for i in range(repeats + 5):
            t0 = time.perf_counter()
            ps = {k: v.requires_grad_(True) for k, v in params.items()}
            kd = op.kd(state)
            beta, temp = (kd.beta, kd.temperature) if kd else (0.5, 4.0)
            loss = kd_loss(apply(model, ps, buffers, x, True), t, y, beta, temp)
            grads = dict(zip(ps, torch.autograd.grad(loss, list(ps.values()))))
            t1 = time.perf_counter()
            with torch.no_grad():
                params, state, _ = op.step({k: v.detach() for k, v in ps.items()}, grads, state, StepContext(i, 1000, loss.item(), 1.0, 1.0))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i >= 5:  # warm-up steps are not counted
                full.append(t2 - t0)
                alone.append(t2 - t1)
        out[name] = (statistics.median(full) * 1e3, statistics.median(alone) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--students", default="tiny,small,resnet8")
    ap.add_argument("--operator", default=None, help="learned-operator checkpoint [default: a fresh one]")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lstm = load_operator(args.operator, args.device) if args.operator else LSTMOperator()
    ops = {"adam": Adam(lr=1e-3), "sgd": SGD(lr=0.1, momentum=0.9), "lstm": lstm}
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}, median of {args.repeats}")
    print("| student | operator | step ms | operator ms | step / Adam step |")
    print("|---|---|---|---|---|")
    for student in args.students.split(","):
        res = bench(student, ops, args.batch_size, args.repeats, args.device)
        for name, (full, alone) in res.items():
            print(f"| {student} | {name} | {full:.2f} | {alone:.2f} | {full / res['adam'][0]:.2f}x |")


if __name__ == "__main__":
    main()
