"""Roughness of the cheap 200-step objective at prior.pt: on the same 8 training students, the change of the mean
smooth error along 2 random directions (rms-normalized like the gradient step), per step size
(the change along -g is trust.py)."""
from pathlib import Path
import copy, json, sys, time, torch
sys.argv = [sys.argv[0], "cnn16,cnn16_wide", "200", "8", "shape", "0", "results/chaos-probe"]
src = open(Path(__file__).with_name("trust.py")).read().split("for alpha in")[0]
exec(src)
base = 0.4944453313946724
gen = torch.Generator().manual_seed(7)
dirs = {}
for d in range(2):
    u = {k: torch.randn(v.shape, generator=gen) for k, v in mean.items()}
    r = torch.cat([x.flatten() for x in u.values()]).pow(2).mean().sqrt()
    dirs[f"random{d}"] = {k: x / r for k, x in u.items()}
for delta in [1e-6, 1e-5, 1e-4, 1e-3]:
    for name, u in dirs.items():
        net = copy.deepcopy(op.net)
        with torch.no_grad():
            for k, p in net.named_parameters():
                if k in u:
                    p += delta * u[k]
        vals = [train_objective(LSTMOperator(net), key) for key in range(n)]
        print(json.dumps({"delta": delta, "direction": name, "mean": sum(vals) / n, "change": sum(vals) / n - base,
                          "per_student": vals}), flush=True)
