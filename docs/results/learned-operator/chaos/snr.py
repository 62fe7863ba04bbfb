"""SNR of the exact full-horizon meta-gradient across students, at checkpoints/prior.pt."""
import json, sys, time, torch
from l2o_kd.config import MetaConfig, ES_PARAMS
from l2o_kd.data import load_splits
from l2o_kd.meta import OperatorTask, starting_operator
from l2o_kd.teacher import load_model_checkpoint, teacher_logits, teacher_path

students, length, n, params = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
batch = int(sys.argv[5]) if len(sys.argv) > 5 else 128
torch.set_num_threads(1)
cfg = MetaConfig(data_root="../shared/data/cifar10-jpeg.tar.gz", method="full", second_order=True, students=students,
                 curriculum=str(length), init="checkpoints/prior.pt", es_params=params, es_objective="error", es_eval=2000, progress=False, batch_size=batch)
splits = load_splits(cfg.dataset, cfg.data_root)
tf = teacher_path(None)
logits = teacher_logits(load_model_checkpoint(tf, "cpu")[0], tf, splits, "cpu", progress=False)["train"]
op = starting_operator(cfg)
task = OperatorTask(splits, logits, cfg, op)
named = [(k, p) for k, p in op.net.named_parameters() if k.startswith(ES_PARAMS[params])]
gs, losses = [], []
for key in range(n):
    t = time.perf_counter()
    ep = task.new_particle(900_000 + key, length)
    loss = task.unroll(op.net, ep, length)
    g = torch.autograd.grad(loss, [p for _, p in named])
    gs.append(torch.cat([x.flatten() for x in g])); losses.append(loss.item())
    print(json.dumps({"key": key, "student": ep.student, "loss": loss.item(), "gnorm": gs[-1].norm().item(), "s": time.perf_counter() - t}), flush=True)
G = torch.stack(gs)
mean = G.mean(0)
cos = torch.nn.functional.cosine_similarity(G[:, None], G[None], dim=-1)
off = cos[~torch.eye(n, dtype=bool)]
# per-coordinate SNR of the mean over n students: |mean| / (std/sqrt(n))
std = G.std(0)
snr = (mean.abs() / (std / n ** 0.5 + 1e-30))
print(json.dumps({"students": students, "length": length, "n": n, "params": params, "mean_loss": sum(losses) / n,
                  "pairwise_cos_mean": off.mean().item(), "pairwise_cos_std": off.std().item(),
                  "norm_of_mean_over_mean_norm": (mean.norm() / G.norm(dim=1).mean()).item(),
                  "coord_snr_median": snr.median().item(), "coord_snr_frac_above_2": (snr > 2).float().mean().item()}))
