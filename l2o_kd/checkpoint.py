"""One checkpoint format for everything the project saves: trained models (teachers, students, with
the state to resume their run) and learned operators.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: a file carrying pickled code is refused. A SHA-256 digest of the
content is saved with it and checked on load, so damaged bytes are refused too. Every checkpoint holds
``format``, ``version``, ``kind``, ``config`` (the dataclass that made it, as a dict) and its payload.
Files are written atomically (temporary file, fsync, rename): a crash or a full disk while saving
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
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
    buf = io.BytesIO()
    torch.save(obj, buf)
    _write_atomic(buf.getbuffer(), path)


def save_atomic_text(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path`` atomically (as :func:`save_atomic`)."""
    _write_atomic(text.encode(), path)


def _write_atomic(data, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, kind: str, config: dict, **payload: Any) -> None:
    assert kind in KINDS, kind
    ckpt = {"format": FORMAT, "version": VERSION, "kind": kind, "config": config, **payload}
    save_atomic({**ckpt, "digest": digest(ckpt)}, path)


def digest(tree: Any) -> str:
    """SHA-256 of a checkpoint's content (every key, number, string and tensor byte, in a fixed order):
    torch's zip reader does not check its CRCs, so bytes damaged inside a tensor would load silently."""
    h = hashlib.sha256()

    def visit(x: Any) -> None:
        if isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                visit(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                visit(v)
            h.update(b"]")
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(x).encode())

    visit(tree)
    return h.hexdigest()


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
    saved_digest = ckpt.pop("digest", None)  # checkpoints written before digests existed have none
    if saved_digest is not None and digest(ckpt) != saved_digest:
        raise UserError(f"{path} is corrupted: its content does not match the digest saved with it")
    if kind is not None and ckpt.get("kind") != kind:
        raise UserError(f"{path} holds a {ckpt.get('kind')!r} checkpoint, but a {kind!r} checkpoint is needed here")
    return ckpt
