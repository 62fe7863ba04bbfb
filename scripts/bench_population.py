"""Student-steps per second of a population advanced one by one (the loop) and together (``--vmap``:
:func:`l2o_kd.step.population_step`), with the shipped learned operator, on random data. Not a test: a
measurement. Each round advances N fresh students k steps both ways in turn (interleaved, so a drift of the
machine's speed hits both); reports the median over rounds.

    python scripts/bench_population.py [--student tiny] [--sizes 1,4,16] [--steps 20] [--rounds 3] \
        [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from l2o_kd import meta
from l2o_kd.config import MetaConfig
from l2o_kd.data import load_splits
from l2o_kd.meta import Episode
from l2o_kd.operators.learned import SHIPPED_OPERATOR, LSTMOperator, load_operator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="tiny")
    ap.add_argument("--sizes", default="1,4,16", help="population sizes N")
    ap.add_argument("--steps", type=int, default=20, help="steps k per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=MetaConfig.batch_size)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_splits("synthetic")  # random-template images, CIFAR's size: the cost of a step does not depend on the data
    logits = torch.randn(len(splits.train_y), 10, device=args.device)
    cfg = MetaConfig(dataset="synthetic", batch_size=args.batch_size, device=args.device)
    loaders = meta.episode_loaders(splits, cfg)
    net = load_operator(SHIPPED_OPERATOR, args.device).net
    print(f"student {args.student}, batch {args.batch_size}, {args.steps} steps per round, {torch.get_num_threads()} threads, {args.device}")
    print("| N | loop (student-steps/s) | vmap (student-steps/s) | vmap / loop |\n|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        nets = [copy.deepcopy(net) for _ in range(n)]
        times = {"loop": [], "vmap": []}
        for r in range(args.rounds + 1):  # the first round warms up
            for mode in times:
                eps = [Episode(splits, logits, LSTMOperator(net), args.student, seed=i, length=args.steps, cfg=cfg, loaders=loaders) for i in range(n)]
                sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
                sync()
                t0 = time.perf_counter()
                if mode == "loop":
                    for w, ep in zip(nets, eps):
                        meta.advance(LSTMOperator(w), ep, args.steps)
                else:
                    meta.advance_together(nets, eps, args.steps)
                sync()
                if r:
                    times[mode].append(time.perf_counter() - t0)
        rate = {m: n * args.steps / statistics.median(t) for m, t in times.items()}
        print(f"| {n} | {rate['loop']:.1f} | {rate['vmap']:.1f} | {rate['vmap'] / rate['loop']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
