"""The placement rule on transformers families: a method's tensors follow the model's device and
dtype. Every applicable method × family on the `meta` device (no memory, as a model about to be
sharded is), and in bfloat16 through a training step (trained tensors float32, activations bf16),
so a GPU bug class (a tensor built on the wrong device, a float32 pass in a bf16 model) fails on
the CPU."""

from __future__ import annotations

import pytest
import torch

import petlkit
from tests.families import BY_NAME, FAMILIES
from tests.test_devices import method_tensors
from tests.test_families import CELLS, expected_refusal, loss, method_config, output
from tests.test_methods_generic import CONFIGS

APPLICABLE = [(f, m) for f, m in CELLS if expected_refusal(f, m) is None]


@pytest.mark.filterwarnings("ignore:.*ALBERT runs one set")  # asserted elsewhere
@pytest.mark.parametrize(("family", "method"), APPLICABLE, ids=["-".join(c) for c in APPLICABLE])
def test_meta_device_placement(family, method):
    model = BY_NAME[family].make().to("meta")
    method, config = method_config(method)
    petl = petlkit.attach(model, method, **config)
    misplaced = [n for n, t in method_tensors(petl).items() if t.device.type != "meta"]
    assert not misplaced, misplaced[:5]


BF16_METHODS = ("lora", "sas", "prefix", "prompt", "unipelt", "unipelt-prompt", "ssf", "adapter")
BF16 = [(f.name, m) for f in FAMILIES for m in BF16_METHODS if expected_refusal(f.name, m) is None]


@pytest.mark.filterwarnings("ignore:.*ALBERT runs one set")  # asserted elsewhere
@pytest.mark.parametrize(("family", "method"), BF16, ids=["-".join(c) for c in BF16])
def test_bfloat16_model_trains_with_float32_method_tensors(family, method):
    model = BY_NAME[family].make().to(torch.bfloat16)
    petl = petlkit.attach(model, method, **CONFIGS[method])
    trained = [t for n, t in method_tensors(petl).items() if t.is_floating_point()]
    assert trained and all(t.dtype == torch.float32 for t in trained)
    inputs = BY_NAME[family].inputs()
    out = petl(**inputs)
    assert output(out).dtype == torch.bfloat16  # the model computes in its own dtype
    loss(out).backward()
    grads = [p.grad for p in petl.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
