"""Token-level methods (VPT, prompt tuning) and SSF: where tokens go, and what merging keeps."""

from __future__ import annotations

import pytest
import torch

import petlkit
from petlkit.methods.base import Tuner
from tests.helpers import train_steps


def _capture_inputs(model, names):
    seen = {}

    def hook(name):
        return lambda module, args: seen.__setitem__(name, args[0].detach().clone())

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    return seen, handles


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_prompts_per_block_and_token_count_at_the_head(vit_case, deep):
    length = 3
    model = petlkit.attach(vit_case.make(), "vpt", length=length, deep=deep)
    train_steps(model, vit_case.inputs, vit_case.labels)  # prompts move apart while training
    vit = model.model
    seen, handles = _capture_inputs(vit, ["blocks.0", "blocks.1", "norm", "head"])
    with torch.no_grad():
        model(**vit_case.inputs)
        for h in handles:
            h.remove()
        plain, handles = _capture_inputs(vit, ["norm"])
        with model.disable():
            model(**vit_case.inputs)
        handles[0].remove()
    patches = (16 // 4) ** 2
    assert seen["blocks.0"].shape[1] == seen["blocks.1"].shape[1] == 1 + length + patches
    assert seen["norm"].shape == plain["norm"].shape == (4, 1 + patches, 32)  # prompts dropped
    prompts = model.methods["default"].prompts
    assert prompts.shape == (2 if deep else 1, length, 32)
    batch = vit_case.inputs["pixels"].shape[0]
    torch.testing.assert_close(
        seen["blocks.0"][:, 1 : 1 + length], prompts[0].expand(batch, -1, -1)
    )
    at_block1 = seen["blocks.1"][:, 1 : 1 + length]
    if deep:  # block 1 sees its own prompts, which differ from block 0's
        torch.testing.assert_close(at_block1, prompts[1].expand(batch, -1, -1))
        assert not torch.allclose(prompts[0], prompts[1])
    else:  # shallow: block 1 sees what block 0 made of the prompts
        assert not torch.allclose(at_block1, prompts[0].expand(batch, -1, -1))


def test_text_prompt_keeps_padding_masked_and_pooling_on_real_tokens(bert_case):
    model = petlkit.attach(bert_case.make(), "prompt", length=4).eval()
    model.model.pooling = "mean"
    inputs = bert_case.inputs
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][1, 8:] = 7  # only padded positions of row 1 change
    with torch.no_grad():
        out, out_changed = model(**inputs), model(**changed)
        hidden = model.model.encoder(**inputs).last_hidden_state
    torch.testing.assert_close(out, out_changed, rtol=0, atol=1e-6)
    assert hidden.shape[1] == inputs["input_ids"].shape[1]  # prompt positions dropped


def test_text_prompt_extends_token_type_ids(bert_case):
    model = petlkit.attach(bert_case.make(), "prompt", length=2).eval()
    inputs = dict(bert_case.inputs, token_type_ids=torch.zeros_like(bert_case.inputs["input_ids"]))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), model(**bert_case.inputs))


def test_two_prompt_methods_are_refused(vit_case):
    model = petlkit.attach(vit_case.make(), "vpt", length=2)
    with pytest.raises(petlkit.PetlError, match="used by another method"):
        model.add_method(petlkit.make_config("prompt"), name="second")


def test_ssf_scales_every_linear_norm_and_the_patch_embedding_and_merges_exactly(vit_case):
    """As the SSF reference: the patch embedding's output is scaled too (205,824 parameters on
    ViT-B/16, not 204,288)."""
    model = petlkit.attach(vit_case.make(), "ssf")
    vit = vit_case.make()
    kinds = torch.nn.Linear | torch.nn.LayerNorm | torch.nn.Conv2d
    targets = [n for n, m in vit.named_modules() if isinstance(m, kinds)]
    targets = [n for n in targets if not n.startswith("head")]
    assert "patch_embed.proj" in targets
    assert type(model.model.patch_embed.proj).__name__ == "SSFTuner"
    channels = sum(vit.get_submodule(n).weight.shape[0] for n in targets)
    assert model.trainable_parameters().trainable == 2 * channels
    train_steps(model, vit_case.inputs, vit_case.labels)
    expected = model(**vit_case.inputs)
    model.merge()
    assert not any(isinstance(m, Tuner) for m in model.modules())
    torch.testing.assert_close(model(**vit_case.inputs), expected, rtol=0, atol=1e-5)


def test_ssf_leaves_other_methods_modules_alone(bert_case):
    model = petlkit.attach(bert_case.make(), "adapter", reduction_factor=4)
    model.add_method(petlkit.make_config("ssf"), name="ssf")
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "SSFTuner"]
    assert wrapped and not any(".adapter." in n for n in wrapped)


def _first_layer_input(petl, inputs) -> torch.Tensor:
    seen = []
    layer = petl.model.encoder.encoder.layer[0]
    handle = layer.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0]), with_kwargs=True)
    with torch.no_grad():
        petl(**inputs)
    handle.remove()
    return seen[0]


def test_prompts_go_after_the_embedding_layer_by_default(bert_case):
    """The spec's placement: the first block reads [prompts ; embeddings(real tokens)], the real
    tokens embedded exactly as without prompts (positions 0..n−1, no shift)."""
    petl = petlkit.attach(bert_case.make(), "prompt", length=3).eval()
    inputs = bert_case.inputs
    with petl.disable():
        plain = _first_layer_input(petl, inputs)
    got = _first_layer_input(petl, inputs)
    prompts = petl.methods["default"].prompt.expand(len(plain), -1, -1)
    torch.testing.assert_close(got, torch.cat([prompts, plain], dim=1), rtol=0, atol=0)


def test_prompts_before_the_embeddings_get_positions_and_shift_the_tokens(bert_case):
    petl = petlkit.attach(bert_case.make(), "prompt", length=3, placement="before_embeddings")
    petl.eval()
    with petl.disable():
        plain = _first_layer_input(petl, bert_case.inputs)
    got = _first_layer_input(petl, bert_case.inputs)
    assert got.shape[1] == plain.shape[1] + 3
    assert not torch.allclose(got[:, 3:], plain)  # real tokens moved to positions 3..n+2
    embeddings = petl.model.encoder.embeddings
    with torch.no_grad():  # the prompts went through the embedding layer (positions 0..2 added)
        expected = embeddings.LayerNorm(
            petl.methods["default"].prompt
            + embeddings.position_embeddings.weight[:3]
            + embeddings.token_type_embeddings.weight[0]
        )
    torch.testing.assert_close(got[0, :3], expected, rtol=0, atol=1e-6)


def test_vit_prompts_refuse_the_before_embeddings_placement(vit_case):
    with pytest.raises(petlkit.PetlError, match="after the class token"):
        petlkit.attach(vit_case.make(), "prompt", placement="before_embeddings")


def test_bitfit_tunes_only_existing_biases_unless_asked(vit_case):
    petl = petlkit.attach(vit_case.make(), "bitfit")
    with_bias = type(petl.model.blocks[0].attn.qkv).__name__
    model = vit_case.make()
    model.blocks[0].attn.qkv.bias = None
    plain = petlkit.attach(model, "bitfit")
    assert with_bias == "BiasTuner"
    assert type(plain.model.blocks[0].attn.qkv).__name__ == "Linear"  # no bias: not tuned
    model = vit_case.make()
    model.blocks[0].attn.qkv.bias = None
    added = petlkit.attach(model, "bitfit", add_missing=True)
    assert type(added.model.blocks[0].attn.qkv).__name__ == "BiasTuner"


def test_vpt_init_bound_uses_the_real_channel_count():
    from petlkit.backbones import vit

    torch.manual_seed(0)
    grey = vit("vit_tiny", img_size=16, patch_size=4, in_chans=1, depth=1, num_classes=2)
    prompts = petlkit.attach(grey, "vpt", length=50).methods["default"].prompts
    bound = (6.0 / (1 * 4 * 4 + 192)) ** 0.5  # one channel, patch 4, width 192
    assert prompts.abs().max() <= bound
    assert prompts.abs().max() > (6.0 / (3 * 4 * 4 + 192)) ** 0.5  # beyond the 3-channel bound
