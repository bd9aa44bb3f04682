"""Benchmark records name the code that ran: the commit, and whether the package had changes."""

import shutil
import subprocess

import pytest

from petlkit.bench import grid, revision
from petlkit.bench.revision import describe
from tests.helpers import tiny_preset

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(folder, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder,
                   check=True, capture_output=True)  # fmt: skip


def test_a_record_says_when_the_package_differs_from_its_commit(tmp_path):
    package, other = tmp_path / "pkg", tmp_path / "results"
    package.mkdir()
    other.mkdir()
    (package / "code.py").write_text("x = 1\n")
    (other / "notes.md").write_text("a\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "first")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    assert describe(package) == head
    (other / "notes.md").write_text("b\n")  # results written beside it: still the commit's code
    assert describe(package) == head
    (package / "code.py").write_text("x = 2\n")
    assert describe(package) == f"{head}+changes"
    _git(tmp_path, "commit", "-qam", "second")
    assert describe(package) != head and "+" not in describe(package)
    (package / "new.py").write_text("")  # a module not yet committed is code that may run
    assert describe(package).endswith("+changes")


def test_outside_git_the_commit_is_unknown(tmp_path):
    assert describe(tmp_path) == "unknown"


def test_a_grid_stamps_the_code_as_it_was_when_it_started(monkeypatch, tmp_path):
    """A file edited while a grid runs is not the code that runs: records keep the start's stamp."""
    tree = {"state": "abc1234"}
    monkeypatch.setattr(revision, "describe", lambda folder: tree["state"])
    revision.commit.cache_clear()

    def run(self):
        tree["state"] = "abc1234+changes"  # someone edits the package mid-grid
        return [{"commit": revision.commit()}]

    monkeypatch.setattr(grid.GridRunner, "run", run)
    try:
        records = grid.run_grid(tiny_preset("vit-tiny"), tmp_path)
    finally:
        revision.commit.cache_clear()
    assert records == [{"commit": "abc1234"}]
