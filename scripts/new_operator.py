"""A fresh learned operator of a given architecture, optionally with the global head (its beta, T and
step-scale outputs and their schedule in progress) taken over from a trained operator.

The per-coordinate part of a fresh operator is zero (its read-outs start at zero), so a fresh
operator is the designed prior, per-tensor normalized momentum; with ``--head-from`` it also follows the
trained operator's schedule of (beta_t, T_t, step scale). This is how the hierarchical operator (LSTM per
tensor, MLP per coordinate) started from the schedule ES found for the per-coordinate LSTM:

    python scripts/new_operator.py --per-coordinate mlp --normalize-update --rms-floor 1e-3 \\
        --head-from checkpoints/operator-lstm-es-schedule.pt --out checkpoints/operator.pt

The head reads the pooled LSTM output; pooled over tensors instead of coordinates it differs, but the
head's last layer is x0.01 at initialization and was not trained (``--es-params schedule``), so what
is taken over is, to a few hundredths in its logits, the same schedule.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from l2o_kd.errors import UserError
from l2o_kd.operators.learned import PER_COORDINATE, LSTMOperator, LSTMOperatorConfig, LSTMOperatorNet, load_operator

HEAD = ("head.", "schedule.", "beta_bias", "temperature_bias")  # the global head's weights and buffers


def main() -> None:
    d = LSTMOperatorConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-coordinate", choices=list(PER_COORDINATE), default=d.per_coordinate)
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--coord-hidden", type=int, default=d.coord_hidden)
    ap.add_argument("--base-scale", type=float, default=d.base_scale)
    ap.add_argument("--normalize-update", action="store_true")
    ap.add_argument("--rms-floor", type=float, default=d.rms_floor)
    ap.add_argument("--mix", action="store_true", help="the prior direction a learned mix of terms (LSTMOperatorConfig.mix)")
    ap.add_argument("--head-from", default=None, help="take the global head over from this operator checkpoint")
    ap.add_argument("--weights-from", default=None,
                    help="take every weight over from this operator checkpoint (its mix's terms first, a new term at 0)")
    ap.add_argument("--seed", type=int, default=0, help="initialization of the new weights")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = LSTMOperatorConfig(hidden=args.hidden, base_scale=args.base_scale, normalize_update=args.normalize_update,
                             per_coordinate=args.per_coordinate, coord_hidden=args.coord_hidden, rms_floor=args.rms_floor, mix=args.mix,
                             init_seed=args.seed)
    if args.head_from and args.weights_from:
        ap.error("--head-from and --weights-from: give one")
    try:
        net = LSTMOperatorNet(cfg)
    except UserError as exc:
        ap.error(str(exc))
    if args.weights_from:
        source = load_operator(args.weights_from).net
        if replace(source.cfg, mix=cfg.mix) != cfg:
            ap.error(f"--weights-from {args.weights_from}: its config {source.cfg} differs from this one in more than mix")
        if source.cfg.n_terms > cfg.n_terms or (source.cfg.mix and not cfg.mix):
            ap.error(f"--weights-from {args.weights_from}: it has terms this operator lacks (give --mix as it has it)")
        weights = source.state_dict()
        if "mix" in weights:  # the source's terms keep their weights, a term it does not have starts at 0
            weights["mix"] = torch.cat([weights["mix"], torch.zeros(cfg.n_terms - len(weights["mix"]))])
        net.load_state_dict({**net.state_dict(), **weights})
        print(f"every weight from {args.weights_from}")
    if args.head_from:
        source = load_operator(args.head_from).net
        if source.cfg.base_scale != cfg.base_scale or source.cfg.hidden != cfg.hidden:
            ap.error(f"--head-from {args.head_from}: its base scale and hidden size must match this operator's")
        head = {k: v for k, v in source.state_dict().items() if k.startswith(HEAD)}
        net.load_state_dict({**net.state_dict(), **head})
        print(f"global head from {args.head_from}: {', '.join(sorted(head))}")
    LSTMOperator(net).save(args.out, origin={"head_from": args.head_from, "weights_from": args.weights_from, "seed": args.seed})
    print(f"wrote {args.out}: {LSTMOperator(net).config()}")


if __name__ == "__main__":
    main()
