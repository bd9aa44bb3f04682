"""What methods add to a counted training step (issue #47's forms): casts made once for all
blocks, BitFit as its folded form, no zero-filled copies of the sequence, SaS's hypernetworks on
the forward's casts. The counter itself is tested in test_cost.py."""

from __future__ import annotations

import pytest
import torch

from petlkit.cost.cases import FLOOR, count


def _vit_case(depth: int, batch: int = 2):
    from petlkit.backbones.vit import vit
    from petlkit.cost.cases import Case

    torch.manual_seed(0)
    model = vit("vit_tiny", img_size=32, patch_size=4, depth=depth, num_classes=10)
    pixels, labels = torch.randn(batch, 3, 32, 32), torch.arange(batch) % 10
    return Case(model, {"pixels": pixels}, labels, "vision")


def _added(method: str, depth: int, op: str) -> int:
    case = _vit_case(depth)
    ours = count(case, method).by_op().get(op, {}).get("calls", 0)
    return ours - count(case, FLOOR).by_op().get(op, {}).get("calls", 0)


@pytest.mark.parametrize("method", ["sas", "lora", "prefix", "adapter", "unipelt"])
def test_a_method_under_bf16_autocast_adds_no_cast_per_block_beyond_its_own_tensors(method):
    """Trained parameters are cast for all blocks at once (one foreach copy each way, not a cast
    per parameter); SaS casts its generated scales and shifts once per forward for all blocks;
    prefix tuning casts all blocks' keys and values at once; an input read by several parts
    (LoRA's layer, A and gate) is cast once, as the floor casts it. Only an adapter on a pre-norm
    ViT's float32 residual stream casts its input and the gradient it returns (nothing in the
    floor reads the stream in bf16; the fused adapter, gated or not, adds the gradient in float32
    without a cast back). SaS's site node makes the cast its linears would (of the float32
    layer-norm output, and of the gradient back) with the scale in it: both sites' casts each
    way leave the stream (4 a block), as products."""
    per_block = (_added(method, 4, "aten._to_copy") - _added(method, 2, "aten._to_copy")) // 2
    assert per_block == {"adapter": 2, "unipelt": 2, "sas": -4}.get(method, 0)
    assert _added(method, 2, "aten._foreach_copy_") == 2  # one copy each way


def test_bitfit_runs_each_layer_once_with_its_bias_offset():
    """BitFit unfolded is its folded form: its adds are bias-sized (b + δ per layer), the same at
    batch 2 and 8, never a pass over a layer's output (the bias gradients read the output's
    gradient once, as any trained bias does)."""
    added = {}
    for batch in (2, 8):
        case = _vit_case(2, batch)
        ours = count(case, "bitfit")
        assert ours.stream() == count(case, "bitfit", fold=True).stream()
        floor = count(case, FLOOR).by_op()["aten.add"]["bytes"]
        added[batch] = ours.by_op()["aten.add"]["bytes"] - floor
    assert added[2] == added[8]


def test_bitfit_on_a_wrapped_layer_adds_its_offset_to_the_output():
    """Stacked under another method's wrapper the layer cannot take the offset in its bias."""
    from petlkit import attach
    from petlkit.backbones.vit import vit

    torch.manual_seed(0)
    model = vit("vit_tiny", img_size=32, patch_size=4, depth=1, num_classes=10)
    petl = attach(model, "lora", "inner", targets=["qkv"])
    petl = attach(petl, "bitfit", "outer", targets=["qkv"])
    qkv = petl.model.blocks[0].attn.qkv
    assert type(qkv).__name__ == "BiasTuner" and type(qkv.base_layer).__name__ != "Linear"
    with torch.no_grad():
        qkv.bias_delta.fill_(0.5)
    x = torch.randn(2, 5, qkv.weight.shape[1])
    torch.testing.assert_close(qkv(x), qkv.base_layer(x) + 0.5)


@pytest.mark.parametrize("method", ["vpt", "prompt"])
def test_prompt_tokens_add_no_zero_filled_copy_of_the_sequence_in_backward(method):
    """Tokens go in and out through a split (its backward: one concatenation), and deep VPT's
    per-block prompts come from one unbind (its backward: one stack)."""
    for op in ("aten.slice_backward", "aten.select_backward"):
        assert _added(method, 4, op) == 0, op


def test_sas_hypernetworks_read_the_forwards_casts_of_their_parameters():
    """SaS runs its hypernetworks once per forward in a pre-hook on the model. The casts open
    before any method's pre-hook, and the hypernetworks compute in autocast's dtype from the
    layer embeddings' cast, so their parameters come from the one foreach copy (and return
    through one): no cast of their own each way, neither by autocast nor by `cast_to`."""
    step = count(_vit_case(2), "sas", sources=True)
    own = [op.source for op in step.ops if op.name == "aten._to_copy"
           and op.source.startswith(("methods/placement.py:forward", "methods/placement.py:cast_to",
                                     "methods/sas.py:generate"))]  # fmt: skip
    assert own == []
    assert sum(op.name == "aten._foreach_copy_" for op in step.ops) == 2  # one each way
