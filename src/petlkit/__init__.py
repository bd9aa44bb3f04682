"""petlkit: parameter-efficient transfer learning for vision and text transformers."""

__version__ = "0.1.0"

from petlkit import methods  # noqa: E402,F401  (registers the built-in methods)
from petlkit.backbones import build_model  # noqa: E402
from petlkit.checkpoint import load_adapter, save_adapter  # noqa: E402
from petlkit.config import MethodConfig  # noqa: E402
from petlkit.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    NotMergeableError,
    PetlError,
    TargetError,
)
from petlkit.families import ModelLayout, declare_layout, family_names  # noqa: E402
from petlkit.model import ParameterCount, PetlModel, attach  # noqa: E402
from petlkit.registry import config_from_dict, make_config, method_names  # noqa: E402

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MethodConfig",
    "ModelLayout",
    "NotMergeableError",
    "ParameterCount",
    "PetlError",
    "PetlModel",
    "TargetError",
    "attach",
    "build_model",
    "config_from_dict",
    "declare_layout",
    "family_names",
    "load_adapter",
    "make_config",
    "method_names",
    "save_adapter",
]
