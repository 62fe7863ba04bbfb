"""Trust region of the exact 200-step cheap-task meta-gradient at prior.pt: on the SAME 8 training students
(same keys, same data order) does phi - alpha*g/rms(g) lower the objective, and how does the measured change
compare with the first-order prediction -alpha*|g|^2/rms?"""
import copy, json, sys, time, torch
from pathlib import Path
sys.argv = [sys.argv[0], "cnn16,cnn16_wide", "200", "8", "shape", "0", "results/chaos-probe"]
exec(open(Path(__file__).with_name("linesearch.py")).read().split("def smooth_error")[0])
flat = torch.cat([v.flatten() for v in mean.values()])
sq = float(flat.pow(2).sum())
def train_objective(operator, key):
    ep = task.new_particle(900_000 + key, length)
    advance(operator, ep, length)
    with torch.no_grad():
        lg, y = _val_logits(ep, cfg.es_eval)
        return float(1 - torch.softmax(lg / SMOOTH_ERROR_TEMPERATURE, 1).gather(1, y[:, None]).mean())
for alpha in [0.0, 1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3]:
    net = copy.deepcopy(op.net)
    with torch.no_grad():
        for k, p in net.named_parameters():
            if k in mean:
                p -= alpha * mean[k] / rms
    o = LSTMOperator(net)
    t = time.perf_counter()
    vals = [train_objective(o, key) for key in range(n)]
    print(json.dumps({"alpha": alpha, "train_objective": vals, "mean": sum(vals) / n,
                      "first_order_change": -alpha * sq / float(rms), "s": time.perf_counter() - t}), flush=True)
