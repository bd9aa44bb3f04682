"""LoRA on a fused q|k|v projection builds its parts' up-projections into one matrix (lora.py,
`_PartsUp`): the matrix and its gradients are the block layout, for equal parts, parts of
different sizes (grouped-query attention) and any choice of parts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from petlkit.methods.lora import LoRALinear

R = 2


def _tuner(rows: tuple[int, int, int], parts: list[int]) -> LoRALinear:
    segments = [(part, 0, n) for part, n in enumerate(rows)]
    torch.manual_seed(0)
    tuner = LoRALinear(nn.Linear(5, sum(rows)), "t", R, 1.0, 0.0, parts, segments)
    with torch.no_grad():
        tuner.lora_B.normal_()
    return tuner


def _by_pads(tuner: LoRALinear, rows: tuple[int, int, int]) -> torch.Tensor:
    """The block layout from first principles: per q|k|v part, its B padded to its columns."""
    n, blocks = len(tuner.parts), []
    offsets = [sum(rows[p] for p in tuner.parts[:i]) for i in range(n + 1)]
    for part in range(3):
        if part not in tuner.parts:
            blocks.append(torch.zeros(rows[part], n * R))
            continue
        i = tuner.parts.index(part)
        b = (
            tuner.lora_B[i]
            if tuner.lora_B.dim() == 3
            else tuner.lora_B[offsets[i] : offsets[i + 1]]
        )
        blocks.append(F.pad(b, (i * R, (n - 1 - i) * R)))
    return torch.cat(blocks)


@pytest.mark.parametrize("rows", [(4, 4, 4), (6, 2, 2)])
@pytest.mark.parametrize("parts", [[0, 2], [0, 1, 2], [1], [2, 0]])
def test_the_up_matrix_is_the_block_layout_with_its_gradients(rows, parts):
    tuner = _tuner(rows, parts)
    matrix = tuner.up_matrix()
    want = _by_pads(tuner, rows)
    assert torch.equal(matrix, want)
    weight = torch.randn_like(matrix)
    (grad,) = torch.autograd.grad((matrix * weight).sum(), tuner.lora_B)
    (want_grad,) = torch.autograd.grad((want * weight).sum(), tuner.lora_B)
    assert torch.equal(grad, want_grad)


def test_a_cast_up_projection_builds_in_its_dtype():
    tuner = _tuner((4, 4, 4), [0, 2])
    low = tuner.lora_B.to(torch.bfloat16)
    matrix = tuner.up_matrix(low)
    assert matrix.dtype == torch.bfloat16
    assert torch.equal(matrix.float(), _by_pads(tuner, (4, 4, 4)).to(torch.bfloat16).float())


def test_evenly_spaced_parts_of_one_size_are_written_by_one_copy():
    from petlkit.cost.counter import OpCounter, StepCount

    for parts, copies in (([0, 2], 1), ([0, 1, 2], 1), ([2, 0], 2)):
        tuner = _tuner((4, 4, 4), parts)
        count = StepCount()
        with OpCounter(count):
            matrix = tuner.up_matrix()
        assert sum(op.name == "aten.copy_" for op in count.ops) == copies, parts
        assert torch.equal(matrix, _by_pads(tuner, (4, 4, 4)))
