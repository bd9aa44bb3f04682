"""The project ViT covers timm's ViT family. For each of the eight layouts in
tests/fixtures/timm-vit-fixtures (a copy of the team's ../shared/fixtures: tiny timm models'
weights under timm's names, inputs and timm's own outputs) the weights load by name, the layout
is read from the state dict, the outputs equal timm's (also at twice the image size, position
embeddings resampled as timm does), and every method attaches and behaves (the generic tests,
over the layouts)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import petlkit
from petlkit.backbones.vit import VisionTransformer, ViTConfig
from petlkit.backbones.vit_weights import infer_config, load_timm_state_dict, load_vit, save_vit
from petlkit.methods.base import Tuner
from tests.test_methods_generic import CONFIGS, NOT_IDENTITY_AT_INIT

# the team's reference fixtures (../shared/fixtures), copied into the repo so a clean clone has them
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "timm-vit-fixtures"
INDEX = json.loads((FIXTURES / "index.json").read_text())
LAYOUTS = sorted(k for k in INDEX if not k.startswith("_"))
# the ViTConfig field each timm constructor argument sets, and how its value reads there
TIMM_TO_CONFIG = {"pre_norm": "pre_norm", "init_values": "init_values", "reg_tokens": "reg_tokens",
                  "no_embed_class": "no_embed_class", "class_token": "class_token",
                  "global_pool": "global_pool", "qk_norm": "qk_norm"}  # fmt: skip


@functools.cache
def fixture(layout: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{layout}.safetensors"))


def timm_state(layout: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix("weight."): v for k, v in fixture(layout).items() if k[:7] == "weight."}


def build(layout: str, img_size: int | None = None) -> VisionTransformer:
    kwargs = INDEX[layout]
    cfg = infer_config(timm_state(layout), img_size, kwargs["num_heads"],
                       kwargs.get("act_layer", "gelu"))  # fmt: skip
    model = VisionTransformer(cfg)
    load_timm_state_dict(model, timm_state(layout))
    return model.eval()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_layout_is_read_from_the_state_dict(layout):
    cfg = build(layout).cfg
    for timm_key, field in TIMM_TO_CONFIG.items():
        if timm_key in INDEX[layout]:
            want = INDEX[layout][timm_key]
            got = getattr(cfg, field)
            assert (got is not None) if timm_key == "init_values" else got == want, timm_key
    assert cfg.img_size == INDEX[layout]["img_size"]
    assert cfg.patch_size == INDEX[layout]["patch_size"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_outputs_equal_timms(layout):
    model, data = build(layout), fixture(layout)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(data["input"]), data["forward_features"], rtol=0, atol=1e-5
        )
        torch.testing.assert_close(model(data["input"]), data["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_at_twice_the_size_outputs_equal_timms_resampling(layout):
    model, data = build(layout, img_size=2 * INDEX[layout]["img_size"]), fixture(layout)
    with torch.no_grad():
        torch.testing.assert_close(model(data["input_big"]), data["logits_big"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_and_load_keep_the_layout_and_the_outputs(layout, tmp_path):
    model, data = build(layout), fixture(layout)
    save_vit(model, tmp_path / "vit.safetensors")
    again = load_vit(tmp_path / "vit.safetensors").eval()
    assert again.cfg == model.cfg
    with torch.no_grad():
        torch.testing.assert_close(again(data["input"]), data["logits"], rtol=0, atol=1e-5)


def test_a_layout_that_cannot_pool_is_refused():
    with pytest.raises(ValueError, match="global_pool 'token' needs the class token"):
        VisionTransformer(ViTConfig(img_size=16, patch_size=8, embed_dim=16, depth=1,
                                    num_heads=2, class_token=False))  # fmt: skip


# -- every method on every layout ---------------------------------------------------------------
PAIRS = [(layout, method) for layout in LAYOUTS for method in sorted(CONFIGS)]


@pytest.mark.parametrize(("layout", "method"), PAIRS, ids=["-".join(p) for p in PAIRS])
def test_every_method_behaves_on_every_layout(layout, method, tmp_path):
    data = fixture(layout)
    pixels, labels = data["input"], torch.tensor([0, 3])
    torch.manual_seed(0)
    petl = petlkit.attach(build(layout), method, **CONFIGS[method])
    reference = build(layout)
    with torch.no_grad():
        if method not in NOT_IDENTITY_AT_INIT:  # starts as the pretrained model
            torch.testing.assert_close(petl(pixels), data["logits"], rtol=0, atol=1e-5)
    petl.train()
    params = [p for p in petl.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(petl(pixels), labels).backward()
        optimizer.step()
    petl.eval()
    with torch.no_grad():
        trained = petl(pixels)
        petlkit.save_adapter(petl, tmp_path)
        loaded = petlkit.load_adapter(build(layout), tmp_path).eval()
        torch.testing.assert_close(loaded(pixels), trained, rtol=0, atol=0)
        reference.head.load_state_dict(petl.model.head.state_dict())
        with petl.disable():
            torch.testing.assert_close(petl(pixels), reference(pixels), rtol=0, atol=0)
        if petl.methods["default"].merge_refusal is None:
            petl.merge()
            assert not any(isinstance(m, Tuner) for m in petl.model.modules())
            torch.testing.assert_close(petl(pixels), trained, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_from_timm_converts_a_timm_model_with_identical_outputs(layout):
    """Needs timm (as on the GPU machines); the fixtures hold its weights and outputs."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    from petlkit.backbones import from_timm

    kwargs = {k: v for k, v in INDEX[layout].items()}
    model = timm_vit.VisionTransformer(**kwargs)
    model.load_state_dict(timm_state(layout))
    ours = from_timm(model.eval())
    data = fixture(layout)
    with torch.no_grad():
        torch.testing.assert_close(ours(data["input"]), model(data["input"]), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(data["input"]), data["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "sas", "vpt", "unipelt-prompt"])
def test_attach_converts_a_live_timm_model_with_from_timm(method):
    """Needs timm (as on the GPU machines): attach() converts a timm VisionTransformer and the
    returned model starts from timm's outputs (VPT, prompts and prefix need petlkit's hooks)."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    from tests.test_methods_generic import CONFIGS

    model = timm_vit.VisionTransformer(**INDEX["vit"])
    model.load_state_dict(timm_state("vit"))
    model.eval()
    petl = petlkit.attach(model, method, **CONFIGS[method])
    assert petl.model is not model and type(petl.model).__module__.startswith("petlkit.")
    data = fixture("vit")
    with torch.no_grad(), petl.disable():
        torch.testing.assert_close(petl(data["input"]), model(data["input"]), rtol=0, atol=1e-5)
