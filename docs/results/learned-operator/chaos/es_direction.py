"""Does a smoothed (ES) meta-gradient give a descent direction where the exact one does not? At prior.pt, for a
low-dimensional group of the operator's read-outs: an antithetic ES estimate of the gradient of the cheap 200-step
objective (sigma, pairs; each pair its own training student), then phi - alpha*g/rms(g) scored on 6 held-out
students, and meta-validated on tiny (1,000 steps, seeds 1000-1002) at the best alpha.
Run from the repository root: python docs/results/learned-operator/chaos/es_direction.py GROUP SIGMA PAIRS"""
from pathlib import Path
import copy, json, sys, time, torch
group, sigma, pairs = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
sys.argv = [sys.argv[0], "cnn16,cnn16_wide", "200", "8", "shape", "0", "results/chaos-probe"]
exec(open(Path(__file__).with_name("trust.py")).read().split("flat = torch.cat")[0])  # the setup (and the exact gradients' cache)
prefixes = {"coord_out": ("coord_out.",), "readout": ("coord_out.", "head.2.weight")}[group]
names = [k for k, _ in op.net.named_parameters() if k.startswith(prefixes)]
def objective(net, key, base):
    ep = task.new_particle(base + key, length)
    advance(LSTMOperator(net), ep, length)
    with torch.no_grad():
        lg, y = _val_logits(ep, cfg.es_eval)
        return float(1 - torch.softmax(lg / SMOOTH_ERROR_TEMPERATURE, 1).gather(1, y[:, None]).mean())
def moved(direction, scale):
    net = copy.deepcopy(op.net)
    with torch.no_grad():
        for k, p in net.named_parameters():
            if k in direction:
                p += scale * direction[k]
    return net
gen = torch.Generator().manual_seed(3)
est = {k: torch.zeros_like(v) for k, v in op.net.named_parameters() if k in names}
t = time.perf_counter()
for i in range(pairs):
    eps = {k: torch.randn(v.shape, generator=gen) for k, v in est.items()}
    plus, minus = objective(moved(eps, sigma), i, 900_000), objective(moved(eps, -sigma), i, 900_000)
    for k in est:
        est[k] += (plus - minus) / (2 * sigma * pairs) * eps[k]
    print(json.dumps({"pair": i, "plus": plus, "minus": minus}), flush=True)
rms = torch.cat([v.flatten() for v in est.values()]).pow(2).mean().sqrt()
step = {k: -v / rms for k, v in est.items()}
print(json.dumps({"group": group, "weights": sum(v.numel() for v in est.values()), "sigma": sigma, "pairs": pairs,
                  "estimate_rms": float(rms), "s": time.perf_counter() - t}), flush=True)
rows = []
for alpha in [0.0, 0.01, 0.03, 0.1, 0.3]:
    held = [objective(moved(step, alpha), key, 950_000) for key in range(6)]
    rows.append({"alpha": alpha, "heldout_smooth_error": held, "mean": sum(held) / 6})
    print(json.dumps(rows[-1]), flush=True)
best = min(rows[1:], key=lambda r: r["mean"])
if best["mean"] < rows[0]["mean"]:
    print(json.dumps({"alpha": best["alpha"], **meta_validate(LSTMOperator(moved(step, best["alpha"])), cfg, splits,
                                                              Path("results/chaos-probe") / f"metaval-es-{group}-{best['alpha']}")}), flush=True)
