"""CUDA autocast's casting policy, imposed on a CPU-autocast run.

CPU and CUDA autocast cast different op lists: on CUDA, normalisations, softmax, reductions and
losses run in float32, `einsum` and `matmul` cast their operands to the low dtype before they
decompose, and ops that mix dtypes (`addcmul`, `cat`, ...) promote every operand to the widest.
Attention follows the fused CUDA kernels (dropout inside the kernel) and dropout the fused
`native_dropout` kernel. torch only (see counter.py). The op lists are CUDA autocast's, as
documented at https://pytorch.org/docs/stable/amp.html#cuda-op-specific-behavior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

TO_FLOAT32 = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "softplus", "layer_norm", "group_norm",
    "norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
    "logsumexp", "softmax", "log_softmax", "cumprod", "cumsum", "prod", "sum", "cross_entropy",
    "__pow__", "__rpow__",
}  # fmt: skip
TO_LOW = {"einsum", "matmul", "chain_matmul", "mv", "addmv", "addr", "linalg_multi_dot"}
TO_WIDEST = {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sample",
             "index_put", "scatter_add", "tensordot", "cat", "stack"}  # fmt: skip
LOW = (torch.float16, torch.bfloat16)


def _floats(tree) -> list[torch.Tensor]:
    found = []
    tree_map(lambda t: found.append(t) if isinstance(t, torch.Tensor) and t.is_floating_point()
             else None, tree)  # fmt: skip
    return found


def _cast(tree, dtype: torch.dtype, only=None):
    def one(t):
        wanted = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype
        return t.to(dtype) if wanted and (only is None or t.dtype in only) else t

    return tree_map(one, tree)


class CudaAutocastPolicy(TorchFunctionMode):
    """Active only while CPU autocast is on; outside it, every call passes through unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if func is F.dropout:
            return self._dropout(*args, **kwargs)
        if func is F.scaled_dot_product_attention and kwargs.get("dropout_p", 0.0):
            kwargs = dict(kwargs, dropout_p=0.0)  # CUDA's kernels drop inside; the stream is one op
        low = torch.get_autocast_dtype("cpu")
        if name in TO_FLOAT32 and any(t.dtype in LOW for t in _floats((args, kwargs))):
            args, kwargs = _cast((args, kwargs), torch.float32, only=LOW)
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs)
        if name in TO_LOW and _floats((args, kwargs)):
            args, kwargs = _cast((args, kwargs), low)
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs)
        if name in TO_WIDEST and len({t.dtype for t in _floats((args, kwargs))}) > 1:
            widest = max((t.dtype for t in _floats((args, kwargs))), key=lambda d: d.itemsize)
            args, kwargs = _cast((args, kwargs), widest)
        return func(*args, **kwargs)

    @staticmethod
    def _dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return input
        return torch.native_dropout(input, p, True)[0]
