"""Trained tensors one node reads side by side (trained_casts.py: `join`, `side_by_side`): the
forward's casts lay them out next to each other, so the node reads them as one tensor without
the copy a `torch.cat` makes (UniPELT's gated adapter and grouped node, issue #47)."""

from __future__ import annotations

import pytest
import torch

import petlkit
from petlkit.cost.counter import OpCounter, StepCount
from petlkit.methods.trained_casts import _in_join_order, side_by_side


def test_adjacent_pieces_are_one_view_and_anything_else_is_concatenated():
    whole = torch.arange(24.0).view(8, 3)
    a, b, c = whole.split([2, 5, 1])
    joined = side_by_side([a, b, c])
    assert torch.equal(joined, torch.cat([a, b, c]))
    assert joined.data_ptr() == whole.data_ptr() and joined.is_contiguous()  # a view: no copy
    assert side_by_side([b, c]).data_ptr() == b.data_ptr()
    for apart in ([a, c], [b, a], [a, b.clone()], [a, b.to(torch.float64)]):
        got = side_by_side(apart)
        assert torch.equal(got, torch.cat(apart))
        assert got.data_ptr() not in (whole.data_ptr(), b.data_ptr())  # a copy
    assert side_by_side([b]) is b
    flat = torch.arange(6.0)
    x, y = flat.split([4, 2])
    assert side_by_side([x, y]).data_ptr() == flat.data_ptr()  # 1-D (biases) too


def test_each_join_is_laid_out_together_where_its_first_member_stood():
    p = [torch.zeros(1) for _ in range(6)]
    at = {id(t): i for i, t in enumerate(p)}
    order = _in_join_order(p, [(p[1], p[4]), (p[5], p[2])])
    assert [at[id(t)] for t in order] == [0, 1, 4, 5, 2, 3]
    # a join with a member that is not trained is left as it is
    assert [at[id(t)] for t in _in_join_order(p[:3], [(p[1], p[4])])] == [0, 1, 2]
    assert _in_join_order(p, []) is p


@pytest.mark.parametrize("name", ["vit_case", "bert_case"])
def test_unipelt_reads_its_joined_weights_without_a_copy_from_its_second_step(name, request):
    case = request.getfixturevalue(name)
    torch.manual_seed(0)
    petl = petlkit.attach(case.make(), "unipelt")
    steps = []
    for _ in range(2):
        count = StepCount()
        with torch.autocast("cpu", dtype=torch.bfloat16), OpCounter(count, sources=True):
            out = petl(**case.inputs)
        loss = getattr(out, "logits", out).float().square().mean()
        petl.zero_grad()
        loss.backward()
        grads = [p.grad.clone() for p in petl.parameters() if p.grad is not None]
        cats = [op for op in count.ops if op.name == "aten.cat" and "side_by_side" in op.source]
        steps.append((loss.detach(), grads, len(cats)))
    (loss_1, grads_1, cats_1), (loss_2, grads_2, cats_2) = steps
    assert cats_1 > 0 and cats_2 == 0  # the first step declares the joins, the next reads them
    torch.testing.assert_close(loss_2, loss_1, rtol=0, atol=0)
    torch.testing.assert_close(grads_2, grads_1, rtol=0, atol=0)
