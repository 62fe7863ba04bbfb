"""Does a step along the mean exact cheap-task meta-gradient (at prior.pt) lower the cheap objective on held-out
students, and what does it do to tiny at 1,000 steps (meta-validation)?"""
import copy, json, sys, time, torch, torch.nn.functional as F
from pathlib import Path
from l2o_kd.config import MetaConfig, ES_PARAMS
from l2o_kd.data import load_splits
from l2o_kd.meta import OperatorTask, starting_operator, advance, _val_logits, SMOOTH_ERROR_TEMPERATURE, meta_validate
from l2o_kd.operators.learned import LSTMOperator
from l2o_kd.teacher import load_model_checkpoint, teacher_logits, teacher_path

students, length, n, params = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
alphas = [float(a) for a in sys.argv[5].split(",")]
out = Path(sys.argv[6]); out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)
cfg = MetaConfig(data_root="../shared/data/cifar10-jpeg.tar.gz", method="full", second_order=True, students=students,
                 curriculum=str(length), init="checkpoints/prior.pt", es_params=params, es_objective="error", es_eval=2000, progress=False,
                 val_horizon=1000, val_seeds="1000,1001,1002", val_students="tiny", adam_lr=0.00949)
splits = load_splits(cfg.dataset, cfg.data_root)
tf = teacher_path(None)
logits = teacher_logits(load_model_checkpoint(tf, "cpu")[0], tf, splits, "cpu", progress=False)["train"]
op = starting_operator(cfg)
task = OperatorTask(splits, logits, cfg, op)
names = [k for k, _ in op.net.named_parameters() if k.startswith(ES_PARAMS[params])]
gpath = out / "grads.pt"
if gpath.exists():
    grads = torch.load(gpath)
else:
    grads = []
    for key in range(n):
        ep = task.new_particle(900_000 + key, length)
        loss = task.unroll(op.net, ep, length)
        grads.append(dict(zip(names, torch.autograd.grad(loss, [dict(op.net.named_parameters())[k] for k in names]))))
        print(json.dumps({"key": key, "loss": loss.item()}), flush=True)
    torch.save(grads, gpath)
mean = {k: sum(g[k] for g in grads) / n for k in names}
rms = torch.cat([v.flatten() for v in mean.values()]).pow(2).mean().sqrt()

def smooth_error(operator, key):
    ep = task.new_particle(950_000 + key, length)
    advance(operator, ep, length)
    with torch.no_grad():
        lg, y = _val_logits(ep, cfg.es_eval)
        return float(1 - F.softmax(lg / SMOOTH_ERROR_TEMPERATURE, 1).gather(1, y[:, None]).mean())

for alpha in alphas:
    net = copy.deepcopy(op.net)
    with torch.no_grad():
        for k, p in net.named_parameters():
            if k in mean:
                p -= alpha * mean[k] / rms
    o = LSTMOperator(net)
    t = time.perf_counter()
    held = [smooth_error(o, key) for key in range(6)]
    row = {"alpha": alpha, "heldout_smooth_error": held, "mean": sum(held) / 6, "s": time.perf_counter() - t}
    if len(sys.argv) > 7 and alpha in [float(a) for a in sys.argv[7].split(",")]:
        row.update(meta_validate(o, cfg, splits, out / f"metaval-{alpha}"))
    print(json.dumps(row), flush=True)
