"""The counter's syncs: ops after which the host waits for the device (a read of a value, an
op whose result's size depends on the data), counted as a CUDA step would make them."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from petlkit.cost.counter import OpCounter, StepCount
from petlkit.cost.step import count_step


def test_a_host_read_inside_the_step_is_a_sync_and_the_optimizers_step_count_is_not():
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            out = self.linear(x)
            return out * 2 if out.abs().max().item() > 0 else out

    labels = torch.zeros(3, dtype=torch.long)
    c = count_step(Reads(), {"x": torch.randn(3, 4)}, labels, lambda m, b: m(b["x"]))
    assert c.syncs == 1
    plain = count_step(nn.Linear(4, 2), {"x": torch.randn(3, 4)}, labels, lambda m, b: m(b["x"]))
    assert plain.syncs == 0


def test_ops_whose_result_size_depends_on_the_data_are_syncs():
    """The device must tell the host how many positions a mask selects before the result can
    be allocated: boolean-mask indexing waits as nonzero and masked_select do; integer
    indexing and masked_fill do not."""
    x = torch.randn(6, 4)
    mask = x[:, 0] > 0
    waits = [lambda: x.nonzero(), lambda: x.masked_select(x > 0), lambda: x[mask],
             lambda: torch.ops.aten.index_put(x, [mask], torch.tensor(0.0)),
             lambda: x[mask.to(torch.uint8)],  # the older byte mask
             lambda: torch.unique(x), lambda: torch.equal(x, x)]  # fmt: skip
    free = [lambda: x[torch.tensor([0, 2])], lambda: x.masked_fill(x > 0, 0.0),
            lambda: torch.where(x > 0, x, 0.0)]  # fmt: skip
    for ops, syncs in ((waits, 1), (free, 0)):
        for op in ops:
            count = StepCount()
            with OpCounter(count), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a byte mask is deprecated
                op()
            assert count.syncs == syncs, [o.name for o in count.ops]


class _Selects(nn.Module):
    """A forward that selects rows by a mask, three ways."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        out = self.linear(x)
        keep = out.sum(-1) > -1e9  # every row, whatever the data
        by_select = out.masked_select(keep[:, None].expand_as(out)).view(-1, 2)
        everywhere = out[out > -1e9].view(-1, 2)  # a two-dimensional mask: every element
        return out[keep] + by_select + out[keep.nonzero()[:, 0]] + everywhere


def test_fake_tensors_count_mask_selections_as_a_real_run_of_all_true_masks():
    labels = torch.zeros(3, dtype=torch.long)
    counts = [count_step(_Selects(), {"x": torch.randn(3, 4)}, labels, lambda m, b: m(b["x"]),
                         fake=fake) for fake in (True, False)]  # fmt: skip
    fake, real = counts
    assert fake.stream() == real.stream() and fake.totals() == real.totals()
    assert fake.syncs == 6  # four forward, and the mask indexes' gradients (index_put) backward


def test_an_op_of_data_dependent_size_fake_tensors_cannot_run_is_named_with_the_way_out():
    labels = torch.zeros(3, dtype=torch.long)
    forward = lambda m, b: m(b["x"]) + torch.unique(b["x"]).sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match=r"aten\._unique2.*fake=False"):
        count_step(nn.Linear(4, 2), {"x": torch.randn(3, 4)}, labels, forward)
    assert count_step(nn.Linear(4, 2), {"x": torch.randn(3, 4)}, labels, forward,
                      fake=False).syncs == 1  # fmt: skip
