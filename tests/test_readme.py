"""The README is a user's guide: short, no work-log labels, and its Python block runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_the_readme_is_short_and_names_no_work_sessions():
    assert len(README.splitlines()) <= 150
    _own_loop_block()  # one python block of at most 25 lines
    docs = [p for ext in ("*.md", "*.py", "*.sh") for p in (REPO / "docs").rglob(ext)]
    for path in [REPO / "README.md", *(REPO / "l2o_kd").rglob("*.py"), *(REPO / "scripts").glob("*"), *(REPO / "examples").glob("*.py"), *docs]:
        assert not re.search(r"\bsessions? \d", path.read_text(), re.I), path


def test_every_relative_link_of_the_documents_resolves():
    pages = [REPO / "README.md", *(REPO / "docs").rglob("*.md")]
    broken = [f"{page.relative_to(REPO)} -> {target}" for page in pages
              for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
              if not target.startswith(("http://", "https://")) and not (page.parent / target).exists()]
    assert not broken, broken


def _own_loop_block() -> str:
    section = README.split("## Use it in your own loop")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1 and len(blocks[0].splitlines()) <= 25
    return blocks[0]


@pytest.mark.real_data
@pytest.mark.slow
def test_the_readme_python_block_runs_as_written_from_the_repository_root(real_cifar):
    env = {**os.environ, "L2O_KD_DATA": str(real_cifar)}
    out = subprocess.run([sys.executable, "-c", _own_loop_block()], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "student test accuracy" in out.stdout


def test_the_readme_results_table_is_computed_from_the_raw_rows():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "results_table.py")], capture_output=True, text=True, check=True).stdout
    for line in out.strip().splitlines():
        assert line in README, line
