"""The README's results table, computed from the raw rows in docs/ (the final rows of ``l2o-kd compare`` folders'
``results.jsonl``): each row's operator and baseline on the seeds both ran, paired by seed. A test checks that the
README holds exactly these lines, so every number there is traceable to its rows.

    python scripts/results_table.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from l2o_kd.stats import paired  # noqa: E402

# (what the row measures, (raw rows, operator label), (raw rows, baseline label), baseline's name in the table)
ROWS: list[tuple[str, tuple[str, str], tuple[str, str], str]] = [
    ("`tiny`, 1,000 steps, 0–9", ("docs/es-family/t2-family/results.jsonl", "operator"), ("docs/t2-h1000/results.jsonl", "adam"), "tuned Adam"),
    ("`tiny`, 1,000 steps, 0–9", ("docs/es-family/t2-family/results.jsonl", "operator"), ("docs/t2-h1000/results.jsonl", "sgd"), "tuned SGD+momentum"),
    ("`tiny`, 1,000 steps, 0–9", ("docs/results/learned-operator/n2-shipped.jsonl", "operator"),
     ("docs/results/learned-operator/n2-init-networks.jsonl", "operator@init-networks"), "its networks at initialization"),
    ("`tiny`, 20 epochs (7,020 steps), 0–9", ("docs/t3-20ep-intel/t3i-mix/results.jsonl", "operator"), ("docs/t3-20ep-intel/t3i-adam/results.jsonl", "adam"),
     "tuned Adam"),
    ("`tiny`, 60 epochs (21,060 steps), 0–5", ("docs/results/learned-operator/n5-60ep.jsonl", "operator"),
     ("docs/results/learned-operator/n5-60ep.jsonl", "adam"), "Adam at its 20-epoch lr"),
    ("`tiny_wide`, 1,000 steps, 0–9", ("docs/t5-10seeds/t5w10-mix/results.jsonl", "operator"), ("docs/t5-10seeds/t5w10-adam/results.jsonl", "adam"),
     "tuned Adam"),
    ("`tiny_deep`, 1,000 steps, 0–9", ("docs/t5-10seeds/t5d10-mix/results.jsonl", "operator"), ("docs/t5-10seeds/t5d10-adam/results.jsonl", "adam"),
     "tuned Adam"),
    ("`small`, 1,000 steps, 0–9", ("docs/t5-10seeds/t5s10-mix/results.jsonl", "operator"), ("docs/t5-10seeds/t5s10-adam/results.jsonl", "adam"),
     "tuned Adam"),
    ("`resnet8`, 1,000 steps, 0–9", ("docs/t5-10seeds/t5r10-mix/results.jsonl", "operator"), ("docs/t5-10seeds/t5r10-adam/results.jsonl", "adam"),
     "tuned Adam"),
]


def finals(path: str, operator: str) -> dict[int, float]:
    """Final test accuracy per seed of ``operator`` in a compare folder's raw rows."""
    rows = [json.loads(line) for line in (REPO / path).read_text().splitlines() if line.strip()]
    return {r["seed"]: r["test_acc"] for r in rows if r["operator"] == operator and r["final"]}


def row(what: str, ours: tuple[str, str], base: tuple[str, str], base_name: str) -> str:
    a, b = finals(*ours), finals(*base)
    p = paired(a, b)
    accs = [100 * a[s] for s in sorted(set(a) & set(b))]
    diff = f"{p.mean:+.2f} ± {p.std:.2f}, {p.wins}/{p.n}"
    diff = f"**{diff}**" if p.verdict == "above" else f"{diff}, within noise" if p.verdict == "within noise" else f"{diff}, below"
    return f"| {what} | {statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}% | − {base_name} | {diff} |"


def table() -> str:
    head = "| student, horizon, seeds | operator | baseline | paired difference (points), wins |\n|---|---|---|---|"
    return "\n".join([head, *(row(*r) for r in ROWS)])


if __name__ == "__main__":
    print(table())
