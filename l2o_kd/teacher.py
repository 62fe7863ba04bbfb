"""The teacher: its checkpoint, its logits on the three splits (computed once, cached on disk), and
the logits of a training batch (from the cache, or a forward pass when batches are augmented)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt_io
from .data import Normalize, Splits, cache_dir
from .errors import UserError
from .fingerprint import file_digest
from .models import build_model

DEFAULT_TEACHER = Path(__file__).resolve().parent.parent / "checkpoints" / "teacher-resnet20.pt"


def teacher_path(path: str | Path | None) -> Path:
    """``path``, or the shipped teacher when None; a missing file is a UserError."""
    path = Path(path) if path else DEFAULT_TEACHER
    if not path.is_file():
        raise UserError(f"teacher checkpoint not found: {path}; train one with `l2o-kd train-teacher`, pass --teacher CKPT, or use --beta 0")
    return path


def load_model_checkpoint(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """A trained teacher or student (eval mode) and its checkpoint dict."""
    ck = ckpt_io.load_checkpoint(path, kind="model")
    model = build_model(ck["model"], num_classes=ck.get("num_classes", 10)).to(device)
    try:
        model.load_state_dict({**ck["params"], **ck["buffers"]})
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit model {ck['model']!r} ({str(exc).splitlines()[0]})") from exc
    return model.eval(), ck


@torch.no_grad()
def predict(model: torch.nn.Module, x_uint8: torch.Tensor, mean, std, device="cpu", batch_size: int = 1000,
            desc: str | None = None) -> torch.Tensor:
    """Eval-mode logits of ``model`` over uint8 images, in their order (a progress bar when ``desc``)."""
    model = model.to(device).eval()
    normalize = Normalize(mean, std, device)
    out = []
    for i in tqdm(range(0, len(x_uint8), batch_size), desc=desc, disable=desc is None, dynamic_ncols=True, leave=False):
        out.append(model(normalize(x_uint8[i : i + batch_size])).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 10)


def teacher_logits(teacher: torch.nn.Module, teacher_ckpt: str | Path, splits: Splits, device="cpu", progress: bool = False) -> dict[str, torch.Tensor]:
    """Logits of the teacher on the un-augmented train/val/test splits, computed once per
    (teacher checkpoint, dataset) and cached on disk."""
    digest = file_digest(teacher_ckpt)
    ds = splits.dataset
    path = cache_dir() / "teacher_logits" / f"{digest}-{ds.name}-{_fingerprint(splits)}.pt"
    if path.exists():
        logits = torch.load(path, weights_only=True)
    else:
        logits = {name: predict(teacher, splits.split(name)[0], ds.mean, ds.std, device, desc=f"teacher logits ({name}, cached once)" if progress else None)
                  for name in ("train", "val", "test")}
        ckpt_io.save_atomic(logits, path)
    if logits["train"].shape[1] != ds.num_classes:
        raise UserError(f"teacher {teacher_ckpt} has {logits['train'].shape[1]} classes, the dataset {ds.name} {ds.num_classes}: "
                        f"train one on it with `l2o-kd train-teacher --dataset {ds.name}` and pass --teacher CKPT")
    return logits


def _fingerprint(splits: Splits) -> str:
    """Identifies the images of the three splits and their order (labels + a strided sample of pixels)."""
    h = hashlib.sha1()
    for name in ("train", "val", "test"):
        x, y = splits.split(name)
        h.update(str(len(y)).encode())
        h.update(y.numpy().tobytes())
        h.update(x[:: max(1, len(x) // 256)].contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class Teacher:
    """Teacher logits for a training batch: from the cache when batches are not augmented,
    from a forward pass of the teacher otherwise."""

    def __init__(self, path: str | Path, splits: Splits, augment: bool, device: str, progress: bool = False):
        self.model, _ = load_model_checkpoint(path, device)
        self.augment = augment
        self.cached = None if augment else teacher_logits(self.model, path, splits, device, progress)["train"].to(device)

    @torch.no_grad()
    def logits(self, batch) -> torch.Tensor:
        return self.model(batch.x) if self.augment else self.cached[batch.idx]
