"""Meta-validation (tiny, 1,000 steps, seeds 1000-1003, val) of the shipped operator and of prior.pt, the same
protocol as meta-train's validation in repro-es-mix.jsonl. Run from the repository root."""
import json, torch
from l2o_kd.config import MetaConfig
from l2o_kd.data import load_splits
from l2o_kd.meta import meta_validate
from l2o_kd.operators.learned import load_operator
torch.set_num_threads(1)
cfg = MetaConfig(data_root="../shared/data/cifar10-jpeg.tar.gz", val_horizon=1000, val_seeds="1000,1001,1002,1003", val_students="tiny", adam_lr=0.00949, progress=False)
splits = load_splits(cfg.dataset, cfg.data_root)
for path in ("checkpoints/operator.pt", "checkpoints/prior.pt"):
    print(json.dumps({"operator": path, **meta_validate(load_operator(path), cfg, splits, __import__("pathlib").Path("results/metaval-shipped") / path.split("/")[-1])}), flush=True)
