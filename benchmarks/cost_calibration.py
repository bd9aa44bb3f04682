"""Counts the code the GPU ground truth was measured on (commit e2fd44c) with today's counter,
and writes src/petlkit/cost/calibration.json, the counts the time fit (petlkit/cost/fit.py) is
fitted on. The old code runs in a temporary git worktree with today's `petlkit/cost` copied in.

    python benchmarks/cost_calibration.py        (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COST = ROOT / "src" / "petlkit" / "cost"
COUNT = ("import json, sys; from petlkit.cost.cases import count_rows; "
         "print(json.dumps(count_rows(json.load(sys.stdin))))")  # fmt: skip


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


def main() -> None:
    truth = json.loads((COST / "ground_truth.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        git("worktree", "add", "--detach", str(tree), truth["commit"])
        try:
            shutil.copytree(COST, tree / "src" / "petlkit" / "cost",
                            ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
            result = subprocess.run(
                [sys.executable, "-c", COUNT], input=json.dumps(truth["vit_b16"]), text=True,
                capture_output=True, env={"PYTHONPATH": str(tree / "src"), "PATH": "/usr/bin"},
                cwd=tmp,
            )  # fmt: skip
        finally:
            git("worktree", "remove", "--force", str(tree))
    if result.returncode:
        sys.exit(result.stderr)
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    out = {"measured_code": truth["commit"], "counter": git("describe", "--always", "--dirty"),
           "counts": counts}  # fmt: skip
    (COST / "calibration.json").write_text(json.dumps(out, indent=1) + "\n")
    for name, row in counts.items():
        print(f"{name:18s} {row}")


if __name__ == "__main__":
    main()
