"""petlkit installs as a library beside the torch a user already has: the wheel's requirements are
ranges (pyproject.toml), the exact pins apply only to the project's own environment
(constraints.txt). Each test builds the wheel and installs it into a fresh virtual environment."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

import petlkit

ROOT = Path(__file__).parents[1]
SMOKE = """
import torch, petlkit
model = petlkit.build_model("vit-tiny", num_classes=3, img_size=32, patch_size=8).model
petl = petlkit.attach(model, "sas")
assert petl(torch.randn(2, 3, 32, 32)).shape == (2, 3)
print(petlkit.__version__, torch.__version__)
"""


def _pip(python: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _fresh_env(folder: Path) -> Path:
    venv.EnvBuilder(with_pip=False).create(folder)
    return folder / "bin" / "python"


def _site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                    str(out), str(ROOT)], check=True, capture_output=True)  # fmt: skip
    (found,) = out.glob("petlkit-*.whl")
    return found


def test_one_version_string(wheel):
    assert wheel.name.startswith(f"petlkit-{petlkit.__version__}-")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert f"## {petlkit.__version__} " in (ROOT / "CHANGELOG.md").read_text()


def test_requirements_are_ranges_and_the_pins_live_in_constraints():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_req = next(r for r in project["dependencies"] if r.startswith("torch"))
    assert "==" not in torch_req and ">=" in torch_req
    pins = (ROOT / "constraints.txt").read_text()
    assert "torch==2.13.0" in pins.splitlines()


@pytest.mark.slow  # a real install of torch and every dependency: 90 s, the default suite's longest
def test_the_wheel_installs_beside_an_installed_torch_and_leaves_it(wheel, tmp_path):
    python = _fresh_env(tmp_path / "env")
    _pip(python, "install", "-q", "--no-deps", "-c", str(ROOT / "constraints.txt"), "torch")
    torch_record = next(_site_packages(python).glob("torch-*.dist-info")) / "RECORD"
    before = (torch_record.parent.name, torch_record.read_bytes())

    log = _pip(python, "install", str(wheel))
    installed = next(line for line in log.splitlines() if line.startswith("Successfully installed"))
    assert " torch-" not in installed and "petlkit-" in installed
    after = next(_site_packages(python).glob("torch-*.dist-info")) / "RECORD"
    assert (after.parent.name, after.read_bytes()) == before

    smoke = subprocess.run([str(python), "-c", SMOKE], capture_output=True, text=True,
                           cwd=tmp_path)  # fmt: skip
    assert smoke.returncode == 0, smoke.stderr
    assert smoke.stdout.split()[0] == petlkit.__version__


def _stub_torch(python: Path, version: str) -> None:
    """A distribution record of torch `version` (metadata only): what pip sees of a user's torch."""
    info = _site_packages(python) / f"torch-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def _would_install(python: Path, wheel: Path) -> set[str]:
    log = _pip(python, "install", "--dry-run", "--quiet", "--report", "-", str(wheel))
    report = json.loads(log)
    return {item["metadata"]["name"].lower() for item in report["install"]}


@pytest.mark.parametrize(("user_torch", "kept"), [("2.11.0", True), ("2.10.0", False)])
def test_pip_keeps_a_supported_torch_and_replaces_an_older_one(wheel, tmp_path, user_torch, kept):
    """A user's CUDA torch 2.11 stays (the old exact pin would have replaced it); one below the
    supported range is upgraded, so the range is enforced, not ignored."""
    python = _fresh_env(tmp_path / "env")
    _stub_torch(python, user_torch)
    assert ("torch" not in _would_install(python, wheel)) is kept


def test_an_sdist_builds_with_the_same_version(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)  # fmt: skip
    (sdist,) = tmp_path.glob("petlkit-*.tar.gz")
    assert sdist.name == f"petlkit-{petlkit.__version__}.tar.gz"
