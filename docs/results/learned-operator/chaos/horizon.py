"""At which horizon does the cheap task become chaotic? For episode lengths 25-200: the change of the final smooth
validation error when a cnn16/cnn16_wide student's initial weights move by 1e-8 (the prior operator), and the cosine
between the exact meta-gradient (es-params shape) at prior.pt and at prior.pt + 1e-8 noise, on the same student.
Run from the repository root: python docs/results/learned-operator/chaos/horizon.py"""
from pathlib import Path
import copy, json, sys, torch
sys.argv = [sys.argv[0], "cnn16,cnn16_wide", "200", "8", "shape", "0", "results/chaos-probe"]
exec(open(Path(__file__).with_name("chaos.py")).read().split("ops = {")[0])
shape = [k for k in names]
def gradient(net, key, steps):
    ep = task.new_particle(900_000 + key, steps)
    loss = task.unroll(net, ep, steps)
    params = dict(net.named_parameters())
    return torch.cat([x.flatten() for x in torch.autograd.grad(loss, [params[k] for k in shape])])
gen = torch.Generator().manual_seed(5)
for steps in [25, 50, 100, 200]:
    length = steps
    changes = [run(op, key, 1e-8, False) - run(op, key, 0.0, False) for key in range(4)]
    g0 = gradient(op.net, 0, steps)
    net = copy.deepcopy(op.net)
    with torch.no_grad():
        for k, p in net.named_parameters():
            if k in shape:
                p += 1e-8 * torch.randn(p.shape, generator=gen)
    g1 = gradient(net, 0, steps)
    print(json.dumps({"steps": steps, "final_error_change_init_1e-8": changes, "grad_cos_phi_1e-8": float(g0 @ g1 / (g0.norm() * g1.norm() + 1e-30)),
                      "grad_norms": [float(g0.norm()), float(g1.norm())]}), flush=True)
