"""Is the cheap task's training itself chaotic? Change of the 200-step smooth validation error of cnn16/cnn16_wide
students when their initial weights move by 1e-8 (rms), under the prior operator, Adam and SGD+momentum."""
from pathlib import Path
import json, sys, torch
sys.argv = [sys.argv[0], "cnn16,cnn16_wide", "200", "8", "shape", "0", "results/chaos-probe"]
exec(open(Path(__file__).with_name("trust.py")).read().split("def train_objective")[0])
from l2o_kd.operators import classic_operator
from l2o_kd.operators.schedules import Schedule
from l2o_kd.meta import train_step
def run(operator, key, delta, classic):
    ep = task.new_particle(900_000 + key, length)
    gen = torch.Generator().manual_seed(key)
    with torch.no_grad():
        for p in ep.params.values():
            p += delta * torch.randn(p.shape, generator=gen)
    if classic:
        ep.state = operator.init(ep.params)
    with torch.no_grad():
        while not ep.done:
            train_step(operator, ep)
        lg, y = _val_logits(ep, cfg.es_eval)
        return float(1 - torch.softmax(lg / SMOOTH_ERROR_TEMPERATURE, 1).gather(1, y[:, None]).mean())
ops = {"prior": (op, False), "adam": (classic_operator("adam", 0.00949, Schedule()), True),
       "sgd": (classic_operator("sgd", 0.03, Schedule()), True)}
for name, (o, classic) in ops.items():
    for key in range(4):
        a, b, c = run(o, key, 0.0, classic), run(o, key, 1e-8, classic), run(o, key, 0.0, classic)
        print(json.dumps({"operator": name, "key": key, "unperturbed": a, "perturbed_1e-8": b, "rerun": c, "change": b - a}), flush=True)
