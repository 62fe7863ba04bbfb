"""Fingerprints of the configuration that decides an experiment's results.

A folder that collects results over several invocations (a run resumed with ``--resume``, a
``compare`` or ``search`` output folder) stores the decisive part of its configuration in
``fingerprint.json`` the first time; a later invocation whose decisive configuration differs is
refused with one line naming what differs, so results of two experiments never mix. Files that
decide results (a teacher, a learned operator) enter by their content digest, not their path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .checkpoint import save_atomic_text
from .errors import UserError

FILE = "fingerprint.json"


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a file's bytes (first 16 hex digits); None for no file."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def record_fingerprint(folder: str | Path, decisive: dict[str, Any]) -> None:
    """Write ``decisive`` as ``folder/fingerprint.json`` (replacing any recorded one)."""
    save_atomic_text(json.dumps(_canonical(decisive), indent=2, sort_keys=True) + "\n", Path(folder) / FILE)


def differences(now: dict[str, Any], then: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, now, then)`` for every key whose value differs between two fingerprints (a key that one
    of them lacks is None there)."""
    now, then = _canonical(now), _canonical(then)
    return [(k, now.get(k), then.get(k)) for k in sorted(now.keys() | then.keys()) if now.get(k) != then.get(k)]


def check_fingerprint(folder: str | Path, decisive: dict[str, Any], what: str, has_results: bool = False,
                      free: tuple[str, ...] = ()) -> None:
    """Record ``decisive`` in ``folder/fingerprint.json``, or check it against the recorded one.

    Raises UserError naming the first keys that differ (:func:`differences`); ``what``
    names the folder's kind in the message (e.g. "compare folder"). Keys in ``free`` decide none of the
    folder's results yet (a setting that only some operators read, none of which has a result there):
    they are not compared, and the record takes their new value. A folder that ``has_results`` but no
    fingerprint was made before fingerprints existed: what made it is unknown, so it is refused too."""
    path = Path(folder) / FILE
    if not path.exists():
        if has_results:
            raise UserError(f"{folder} holds a {what} made before configurations were fingerprinted: use another output folder")
        record_fingerprint(folder, decisive)
        return
    everything = differences(decisive, json.loads(path.read_text()))
    diff = [d for d in everything if d[0] not in free]
    if everything and not diff:
        record_fingerprint(folder, decisive)
    if diff:
        shown = ", ".join(f"{k} is {now!r} but was {then!r}" for k, now, then in diff[:3])
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise UserError(f"{folder} holds a {what} made with another configuration: {shown}{more}; use another output folder")
