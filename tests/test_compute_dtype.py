"""The dtype a method computes in (methods/placement.py): autocast's where it is on, and an input
several method parts read is cast once, never reused where it would be wrong."""

from __future__ import annotations

import torch

from petlkit.methods.placement import compute_dtype, compute_input


def test_compute_dtype_is_autocasts_where_it_is_on_else_the_inputs():
    x = torch.randn(3, 4)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        assert compute_dtype(torch.arange(3)) == torch.int64  # token ids stay ids
    assert compute_dtype(torch.randn(3, device="meta", dtype=torch.float16)) == torch.float16


def test_readers_of_one_input_share_its_cast_and_its_gradient_is_exact():
    x = torch.randn(5, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first, second = compute_input(x), compute_input(x)
        assert first is second and first.dtype == torch.bfloat16
        (first.float().sum() * 2 + (second.float() ** 2).sum()).backward()
    low = x.detach().to(torch.bfloat16)
    expected = (2 + (2 * low.float()).to(torch.bfloat16)).float()  # both grads meet in bf16
    torch.testing.assert_close(x.grad, expected)
    assert compute_input(x) is x  # autocast off: no cast


def test_a_cast_is_not_reused_after_the_input_changes_or_the_grad_mode_does():
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = compute_input(x)
        x.add_(1.0)  # in place: a new version
        after = compute_input(x)
        assert after is not before
        torch.testing.assert_close(after.float(), x.to(torch.bfloat16).float())
        leaf = torch.randn(2, 3, requires_grad=True)
        with torch.no_grad():
            untracked = compute_input(leaf)
        tracked = compute_input(leaf)
        assert untracked.grad_fn is None and tracked.grad_fn is not None
        assert compute_input(torch.randn(2, 3)) is not tracked  # another tensor
