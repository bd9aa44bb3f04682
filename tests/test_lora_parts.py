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


def test_spaced_parts_are_found_only_where_one_batched_gemm_can_write_them():
    """(start, step) of the parts' output rows where they are of one size and evenly spaced;
    None where the update needs the zero-padded matrix (sizes differ, parts out of order)."""
    assert _tuner((4, 4, 4), [0, 2]).spaced() == (0, 8)
    assert _tuner((4, 4, 4), [0, 1, 2]).spaced() == (0, 4)
    assert _tuner((4, 4, 4), [1]).spaced() == (4, 0)
    assert _tuner((4, 4, 4), [2, 0]).spaced() is None
    assert _tuner((6, 2, 2), [0, 2]).spaced() is None  # grouped-query: B is 2-D
    assert _tuner((6, 2, 2), [1, 2]).spaced() == (6, 2)
    assert LoRALinear(nn.Linear(5, 3), "t", R, 1.0, 0.0).spaced() is None  # not fused
    per_head = [(part, h * 2, 2) for h in range(2) for part in range(3)]  # GPT-NeoX's q|k|v
    torch.manual_seed(0)
    neox = LoRALinear(nn.Linear(5, 12), "t", R, 1.0, 0.0, [0, 2], per_head)
    assert neox.spaced() is None  # a part's rows are not one run of columns


def test_the_parts_columns_are_views_of_any_2d_layout():
    from petlkit.methods.lora_update import _columns

    out = torch.arange(60.0).view(12, 5).t()  # (5, 12), column stride 5
    parts = _columns(out, (1, 6), torch.Size((2, 3, R)))
    assert torch.equal(parts[0], out[:, 1:4]) and torch.equal(parts[1], out[:, 7:10])


@pytest.mark.parametrize("parts", [[0, 2], [0, 1, 2], [1]])
@pytest.mark.parametrize("strided", [False, True])
def test_a_linear_and_spaced_parts_update_is_the_padded_matrix_update(parts, strided):
    """LinearLoRAUp with `spaced` (one batched GEMM into the parts' columns) gives the outputs and
    gradients of the zero-padded matrix update, for a hidden that is a slice of a wider one and
    an output gradient that arrives transposed (as attention's does)."""
    from petlkit.methods.lora_update import LinearLoRAUp

    tuner = _tuner((4, 4, 4), parts)
    f64 = {"dtype": torch.float64}
    n, tokens = len(parts), 6
    x = torch.randn(2, 3, 5, **f64, requires_grad=True)
    weight, bias = torch.randn(12, 5, **f64), torch.randn(12, **f64)
    wide = torch.randn(tokens, n * R + 3, **f64)
    hidden = (wide[:, : n * R] if strided else wide[:, : n * R].contiguous()).requires_grad_()
    up = tuner.lora_B.detach().double().requires_grad_()
    spaced = tuner.spaced()
    got = LinearLoRAUp.apply(x, weight, bias, hidden, up, spaced)
    want = LinearLoRAUp.apply(x, weight, bias, hidden, tuner.up_matrix(up))
    torch.testing.assert_close(got, want)
    grad = torch.randn(2, 12, 3, **f64).transpose(1, 2) if strided else torch.randn_like(got)
    inputs = (x, hidden, up)
    torch.testing.assert_close(torch.autograd.grad(got, inputs, grad),
                               torch.autograd.grad(want, inputs, grad))  # fmt: skip
    assert torch.autograd.gradcheck(
        lambda *t: LinearLoRAUp.apply(t[0], weight, bias, t[1], t[2], spaced), inputs
    )


def test_a_bf16_spaced_update_on_the_cpu_keeps_onednn_on():
    """CPU's oneDNN cannot write one batched GEMM into q and v with k between (its batch stride
    below its row stride); it warns and turns itself off for the whole process when asked to, so
    every later bf16 matmul and convolution runs without it. The update writes part by part."""
    import warnings

    from petlkit.methods.lora_update import LinearLoRAUp

    torch.manual_seed(0)
    tuner = _tuner((64, 64, 64), [0, 2])
    low = {"dtype": torch.bfloat16}
    x = torch.randn(4, 32, 16, **low)
    weight, bias = torch.randn(192, 16, **low), torch.randn(192, **low)
    hidden = torch.randn(128, 2 * R, **low, requires_grad=True)
    up = tuner.lora_B.detach().to(torch.bfloat16).requires_grad_()
    before = torch.backends.mkldnn.enabled
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # oneDNN's "mkldnn_matmul failed" warning fails it
            out = LinearLoRAUp.apply(x, weight, bias, hidden, up, tuner.spaced())
            out.float().square().sum().backward()
        assert torch.backends.mkldnn.enabled == before
    finally:
        torch.backends.mkldnn.enabled = before  # as it was for the tests after this one
    want = LinearLoRAUp.apply(x, weight, bias, hidden, tuner.up_matrix(up))
    torch.testing.assert_close(out, want)
