"""One checkpoint format for everything the project saves: trained models (teachers, students, with
the state to resume their run) and learned operators.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: a file carrying pickled code is refused. Every checkpoint holds
``format``, ``version``, ``kind``, ``config`` (the dataclass that made it, as a dict) and its payload.
Files are written atomically (temporary file, fsync, rename): a crash or a full disk while saving
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

FORMAT = "l2o-kd"
VERSION = 1
KINDS = ("model", "operator")


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, kind: str, config: dict, **payload: Any) -> None:
    assert kind in KINDS, kind
    save_atomic({"format": FORMAT, "version": VERSION, "kind": kind, "config": config, **payload}, path)


def load_checkpoint(path: str | Path, kind: str | None = None, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a checkpoint; every failure is one ``UserError`` line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable l2o-kd checkpoint (truncated, corrupted or unsafe): {first}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an l2o-kd checkpoint")
    if ckpt.get("version", 0) > VERSION:
        raise UserError(f"{path} has format version {ckpt['version']}; this l2o-kd reads up to {VERSION}: upgrade it")
    if kind is not None and ckpt.get("kind") != kind:
        raise UserError(f"{path} holds a {ckpt.get('kind')!r} checkpoint, but a {kind!r} checkpoint is needed here")
    return ckpt
