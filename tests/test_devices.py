"""Every method on any device and dtype (the placement rule of methods/placement.py).

The matrix: every registered method × {tiny ViT, tiny BERT, real MiniLM} × {attach then move,
move then attach} × dtypes, through a train step, eval, save → load onto a model on that device,
merge → unmerge and disable(). On the CPU: float32 and bfloat16, plus the `meta` device for
placement. On CUDA (marked `gpu`, skipped without one) the same matrix with float16 too. The CPU
part runs in the default suite, so a method that builds a tensor on the wrong device or computes
in the wrong dtype fails here without a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import petlkit
from petlkit.methods.base import Tuner, backbone_parameters
from petlkit.model import PetlModel
from tests.conftest import CASES, Case
from tests.test_methods_generic import CONFIGS, VISION_ONLY

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
SETTINGS = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=gpu),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=gpu),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=gpu),
]
ORDERS = ("attach-then-move", "move-then-attach")
PAIRS = [
    (case, method)
    for case in CASES
    for method in sorted(CONFIGS)
    if method not in VISION_ONLY or case == "tiny-vit"
]
LOW = (torch.float16, torch.bfloat16)


def _on(inputs: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def _build(case: Case, method: str, device: str, dtype: torch.dtype, order: str) -> PetlModel:
    model = case.make()
    if order == "move-then-attach":
        return petlkit.attach(model.to(device=device, dtype=dtype), method, **CONFIGS[method])
    return petlkit.attach(model, method, **CONFIGS[method]).to(device=device, dtype=dtype)


def method_tensors(petl: PetlModel) -> dict[str, torch.Tensor]:
    """Every tensor a method owns: its parameters and buffers, its wrappers' own, the head."""
    out: dict[str, torch.Tensor] = {}
    for name, method in petl.methods.items():
        out.update({f"{name}.{n}": t for n, t in method.named_parameters()})
        out.update({f"{name}.{n}": t for n, t in method.named_buffers()})
    for name, module in petl.model.named_modules():
        if isinstance(module, Tuner):
            out.update({f"{name}.{n}": t for n, t in module.own_parameters()})
    out.update(petl.head_parameters())
    return out


def _expected_trained_dtype(
    method: str, dtype: torch.dtype, order: str, is_head: bool
) -> torch.dtype:
    """move-then-attach applies the default policy (float32 next to a low-precision backbone;
    full fine-tuning trains the backbone's own weights in their dtype); attach-then-move casts
    everything, as nn.Module.to does."""
    if order == "attach-then-move" or (method == "full" and not is_head) or dtype not in LOW:
        return dtype
    return torch.float32


def _reference(case: Case, petl: PetlModel, device: str, dtype: torch.dtype, order: str):
    """The untouched backbone with the trained head, handled the same way (placement, dtype)."""
    ref = _build(case, "linear", device, dtype, order)
    ref.model.head.load_state_dict(petl.model.head.state_dict())
    return ref


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 0.0, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("device", "dtype"), SETTINGS)
@pytest.mark.parametrize(("case_name", "method"), PAIRS, ids=["-".join(p) for p in PAIRS])
def test_device_dtype_matrix(case_name, method, device, dtype, order, tmp_path):
    case = CASES[case_name]()
    inputs, labels = _on(case.inputs, device), case.labels.to(device)
    petl = _build(case, method, device, dtype, order)

    # placement: every method tensor on the model's device, in the policy's dtype
    for name, tensor in method_tensors(petl).items():
        assert tensor.device.type == device, f"{name} is on {tensor.device}, not {device}"
        want = _expected_trained_dtype(method, dtype, order, name.startswith("head."))
        if tensor.is_floating_point() and (tensor.requires_grad or name.startswith("head.")):
            assert tensor.dtype == want, f"{name} is {tensor.dtype}, policy says {want}"

    # a train step: finite loss, every trained tensor gets a gradient and moves, output dtype kept
    params = [p for p in petl.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    petl.train()
    for _ in range(2):
        optimizer.zero_grad()
        logits = petl(**inputs)
        assert logits.dtype == dtype and logits.device.type == device
        loss = F.cross_entropy(logits.float(), labels)
        assert torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    petl.eval()

    # eval: in the backbone's dtype, and close to the same weights computed in float32
    with torch.no_grad():
        trained = petl(**inputs)
    assert trained.dtype == dtype and torch.isfinite(trained).all()
    petlkit.save_adapter(petl, tmp_path / "adapter")  # from the device the model is on
    exact32 = petlkit.load_adapter(case.make().to(device), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(trained.float(), exact32(**inputs), **_tolerance(dtype))

    # save → load onto a fresh model on that device and dtype: the same outputs, bit for bit
    fresh = case.make()
    if order == "move-then-attach":
        loaded = petlkit.load_adapter(fresh.to(device=device, dtype=dtype), tmp_path / "adapter")
    else:
        loaded = petlkit.load_adapter(fresh, tmp_path / "adapter").to(device=device, dtype=dtype)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), trained, rtol=0, atol=0)

    # merge → unmerge: same outputs to the dtype's tolerance; weights back bit for bit
    if petl.methods["default"].merge_refusal is None:
        weights = {k: v.clone() for k, v in backbone_parameters(petl.model).items()}
        with torch.no_grad():
            petl.merge()
            merged = petl(**inputs)
            for key, value in backbone_parameters(petl.model).items():
                assert value.device.type == device, f"{key} left {device} in the merge"
                if key in weights:  # (a bias the merge created has the weight's dtype)
                    assert value.dtype == weights[key].dtype, f"{key} changed dtype in the merge"
            petl.unmerge()
            torch.testing.assert_close(merged.float(), trained.float(), **_tolerance(dtype))
            after = backbone_parameters(petl.model)
            assert after.keys() == weights.keys()
            for key, value in after.items():
                assert torch.equal(value, weights[key]), f"{key} changed after unmerge"
            torch.testing.assert_close(petl(**inputs), trained, rtol=0, atol=0)

    # disable(): exactly the backbone in that dtype, on that device
    reference = _reference(case, petl, device, dtype, order).eval()
    with torch.no_grad(), petl.disable():
        torch.testing.assert_close(petl(**inputs), reference(**inputs), rtol=0, atol=0)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("case_name", "method"), PAIRS, ids=["-".join(p) for p in PAIRS])
def test_meta_device_placement(case_name, method, order):
    """A model on the `meta` device (no memory): every method tensor follows it there."""
    case = CASES[case_name]()
    petl = _build(case, method, "meta", torch.float32, order)
    misplaced = [n for n, t in method_tensors(petl).items() if t.device.type != "meta"]
    assert not misplaced, f"not on meta: {misplaced[:5]}"


@pytest.mark.parametrize("method", ["lora", "sas", "ssf", "bitfit"])
def test_merge_keeps_a_bfloat16_backbone_in_bfloat16(vit_case, method):
    """Merging float32 updates into bfloat16 weights rounds once and keeps the weights' dtype;
    a bias the merge must create (here: qkv without bias) gets the weight's dtype too."""
    model = vit_case.make()
    model.blocks[0].attn.qkv.bias = None
    petl = petlkit.attach(model.to(torch.bfloat16), method, **CONFIGS[method])
    with torch.no_grad():
        for p in petl.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
        unmerged = petl(**vit_case.inputs)
        petl.merge()
        qkv = petl.model.blocks[0].attn.qkv
        assert qkv.weight.dtype == torch.bfloat16
        assert qkv.bias is None or qkv.bias.dtype == torch.bfloat16
        torch.testing.assert_close(
            petl(**vit_case.inputs).float(), unmerged.float(), rtol=0.05, atol=0.05
        )


def test_trained_dtype_backbone_keeps_the_backbone_dtype(vit_case):
    petl = petlkit.attach(vit_case.make().to(torch.bfloat16), "lora", trained_dtype="backbone")
    assert {p.dtype for p in petl.parameters() if p.requires_grad} == {torch.bfloat16}


def test_unknown_trained_dtype_is_refused(vit_case):
    with pytest.raises(petlkit.ConfigError, match="trained_dtype 'half-ish'"):
        petlkit.attach(vit_case.make(), "lora", trained_dtype="half-ish")


def test_full_finetune_disable_after_moving_the_model(vit_case):
    """The kept pretrained weights are buffers: after .to(), disable() swaps in tensors of the
    right dtype and device, not the stale ones left behind."""
    petl = petlkit.attach(vit_case.make(), "full")
    with torch.no_grad():
        for p in petl.model.blocks.parameters():
            p.add_(0.1)
    petl.to(torch.bfloat16)
    reference = _reference(vit_case, petl, "cpu", torch.bfloat16, "attach-then-move")
    with torch.no_grad(), petl.disable():
        assert petl.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
        torch.testing.assert_close(petl(**vit_case.inputs), reference(**vit_case.inputs))
