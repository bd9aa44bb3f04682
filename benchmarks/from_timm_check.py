"""Run `from_timm`'s parity tests against timm's own model code on a CPU-only machine.

    python benchmarks/from_timm_check.py [--timm 1.0.31]

`tests/test_timm_layouts.py::test_from_timm_*` skips where timm does not import (CI, this
project's CPU machines). timm imports torchvision at start, and PyPI's Linux torchvision wheels
are CUDA builds that do not load next to the CPU torch pinned here. This script installs timm
(`--no-deps`) into a temporary folder, stands in an import-only `torchvision` (the names timm
imports; none of them is used by timm's VisionTransformer, and any call raises), and runs the
eight layout tests against the real `timm.models.vision_transformer.VisionTransformer`. On a
machine with timm and torchvision installed, plain `pytest -k from_timm` runs them instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

STUB = {
    "__init__.py": "",
    "ops/__init__.py": "",
    "ops/misc.py": "from torchvision._stub import Stub as FrozenBatchNorm2d\n",
    "datasets/__init__.py": (
        "from torchvision._stub import Stub\n"
        "CIFAR100 = CIFAR10 = MNIST = KMNIST = FashionMNIST = ImageFolder = QMNIST = Stub\n"
        "Places365 = ImageNet = INaturalist = Stub\n"
    ),
    "models/__init__.py": "",
    "transforms/__init__.py": (
        "from torchvision._stub import Stub\nfrom torchvision.transforms import functional\n\n\n"
        "def __getattr__(name):\n    return Stub\n"
    ),
    "transforms/functional.py": (
        "import enum\n\nfrom torchvision._stub import Stub\n\n\n"
        "class InterpolationMode(enum.Enum):\n"
        "    NEAREST, NEAREST_EXACT, BILINEAR, BICUBIC = 'nearest', 'nearest-exact', 'bilinear', "
        "'bicubic'\n    BOX, HAMMING, LANCZOS = 'box', 'hamming', 'lanczos'\n\n\n"
        "def __getattr__(name):\n"
        "    if name.startswith('__'):\n        raise AttributeError(name)\n    return Stub\n"
    ),
    "_stub.py": (
        "class Stub:\n    def __init__(self, *args, **kwargs):\n"
        "        raise NotImplementedError('torchvision is an import-only stub here')\n"
    ),
}

# transformers (imported by the test suite's conftest) must not see the stub: it would take
# torchvision as installed. So the stub joins sys.path only after transformers has loaded.
RUNNER = """
import sys
import pytest
import transformers  # noqa: F401
from transformers import BertConfig, BertModel  # noqa: F401
sys.path += [{packages!r}, {stub!r}]
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_timm_layouts.py",
                      "-k", "from_timm", "-rs"]))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm", default="1.0.31", help="the timm release to test against")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        packages, stub = Path(tmp) / "packages", Path(tmp) / "stub"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(packages), f"timm=={args.timm}"], check=True)  # fmt: skip
        for name, text in STUB.items():
            path = stub / "torchvision" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        code = RUNNER.format(packages=str(packages), stub=str(stub))
        return subprocess.run([sys.executable, "-c", code], cwd=root).returncode


if __name__ == "__main__":
    sys.exit(main())
