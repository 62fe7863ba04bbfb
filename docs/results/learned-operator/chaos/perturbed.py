"""Is the exact 200-step meta-gradient at prior.pt stable under small moves of phi? Cosine between g(phi) and
g(phi + delta*u) (u random, unit rms) on the same student (key 900000), per delta."""
from pathlib import Path
import copy, json, os, sys, torch
sys.argv = [sys.argv[0], "cnn16,cnn16_wide", "200", "8", "shape", "0", "results/chaos-probe"]
exec(open(Path(__file__).with_name("linesearch.py")).read().split("def smooth_error")[0])
flat = lambda g: torch.cat([g[k].flatten() for k in names])
g0 = flat(grads[0])
gen = torch.Generator().manual_seed(11)
for delta in [float(d) for d in os.environ.get("DELTAS", "1e-5,1e-4,1e-3,1e-2").split(",")]:
    for rep in range(2):
        net = copy.deepcopy(op.net)
        with torch.no_grad():
            for k, p in net.named_parameters():
                if k in names:
                    p += delta * torch.randn(p.shape, generator=gen)
        ep = task.new_particle(900_000, length)
        loss = task.unroll(net, ep, length)
        params = dict(net.named_parameters())
        g = torch.cat([x.flatten() for x in torch.autograd.grad(loss, [params[k] for k in names])])
        print(json.dumps({"delta": delta, "loss": loss.item(), "cos_with_g0": float(g @ g0 / (g.norm() * g0.norm())),
                          "norm": float(g.norm()), "norm0": float(g0.norm())}), flush=True)
