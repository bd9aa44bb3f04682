"""Prefix keys and values in the project ViT's attention: one buffer holds the queries and the
prefixed keys and values (backbones/vit_layers.py: `prefixed`), so attention keeps nothing of the
fused q|k|v output (issue #47: prefix tuning's and UniPELT's peak memory)."""

from __future__ import annotations

import pytest
import torch

from petlkit.backbones import vit_layers
from petlkit.backbones.vit_layers import Attention, prefixed
from petlkit.cost.cases import build_case, count
from tests.helpers import OpSizes


def _qkv(batch: int = 3, heads: int = 2, tokens: int = 5, dim: int = 4):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, heads, tokens, dim, generator=gen, dtype=torch.float64,
                        requires_grad=True) for _ in range(3)]  # fmt: skip


@pytest.mark.parametrize("prefix_batch", [3, 1])  # one prefix per example, or one for all
def test_the_joined_buffer_gives_the_two_cats_values_and_gradients(prefix_batch):
    q, k, v = _qkv()
    gen = torch.Generator().manual_seed(1)
    key_prefix, value_prefix = (
        torch.randn(prefix_batch, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(2)
    )
    inputs = (q, k, v, key_prefix, value_prefix)
    ours = prefixed(*inputs)
    batch = q.shape[0]
    theirs = (q, torch.cat([key_prefix.expand(batch, -1, -1, -1), k], dim=2),
              torch.cat([value_prefix.expand(batch, -1, -1, -1), v], dim=2))  # fmt: skip
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    weights = [torch.randn_like(t) for t in theirs]
    grads = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ours, weights, strict=True)),
                                inputs)  # fmt: skip
    expected = torch.autograd.grad(
        sum((a * w).sum() for a, w in zip(theirs, weights, strict=True)), inputs
    )
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: prefixed(*t), inputs)


def test_attention_with_a_prefix_keeps_nothing_of_the_fused_projections_output():
    attention = Attention(dim=8, num_heads=2, qkv_bias=True)
    gen = torch.Generator().manual_seed(2)
    prefix = [torch.randn(3, 2, 4, 4, generator=gen, requires_grad=True) for _ in range(2)]
    attention.extra_kv = lambda x: tuple(prefix)
    made = []
    attention.qkv.register_forward_hook(lambda m, a, out: made.append(out))
    kept = []
    x = torch.randn(3, 5, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = attention(x)
    fused = made[0].untyped_storage().data_ptr()
    assert kept and all(t.untyped_storage().data_ptr() != fused for t in kept)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in prefix)


def _attention_ops(prefix: list[torch.Tensor] | None) -> list[str]:
    attention = Attention(dim=8, num_heads=2, qkv_bias=True)
    if prefix is not None:
        attention.extra_kv = lambda x: tuple(prefix)
    x = torch.randn(3, 5, 8, requires_grad=True)
    with OpSizes() as forward:
        out = attention(x)
    with OpSizes() as backward:
        out.sum().backward()
    return [name for name, _ in forward.ops + backward.ops]


def test_with_a_prefix_attention_copies_nothing_more_than_without_but_the_one_cat():
    """The output comes back in token-major memory, so (batch, heads, tokens, dim) → (batch,
    tokens, width) stays a view; backward, the gradients pass as slices."""
    copies = ("clone", "_unsafe_view", "copy_", "cat", "stack")
    plain = [name for name in _attention_ops(None) if name in copies]
    prefixed = [name for name in _attention_ops([torch.randn(3, 2, 4, 4) for _ in range(2)])
                if name in copies]  # fmt: skip
    assert sorted(prefixed) == sorted([*plain, "cat"])


def _two_cats(q, k, v, key_prefix, value_prefix):
    return q, torch.cat([key_prefix, k], dim=2), torch.cat([value_prefix, v], dim=2)


@pytest.mark.parametrize("method", ["prefix", "unipelt"])
def test_a_prefixed_vit_keeps_one_copy_of_every_blocks_keys_and_values_less(method, monkeypatch):
    """On the counter (ViT, bf16): against two cats, whose keys and values attention keeps beside
    the fused output q holds, the step keeps exactly one bf16 copy of every block's keys and values
    less, the same for UniPELT, whose prefix is one of its parts."""
    case = build_case("vit-tiny", batch=64, size=32)  # 12 blocks of width 192, 8 × 8 patches
    tokens = 8 * 8 + 1  # and the class token
    keys_and_values = 12 * 2 * 64 * tokens * 192 * 2
    joined = count(case, method)
    monkeypatch.setattr(vit_layers, "prefixed", _two_cats)
    assert count(case, method).saved_bytes - joined.saved_bytes == keys_and_values
