"""A forward casts every trained parameter to the compute dtype at once (methods/trained_casts.py,
TrainedCasts): the same outputs and gradients as casting each where it is read, one foreach copy
each way, and never a stale or foreign copy."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import petlkit
from petlkit.methods.placement import follow
from petlkit.methods.trained_casts import _OPEN, TrainedCasts, empty_alike
from tests.helpers import attached_and_perturbed

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.copied: list[int] = []  # tensors per foreach copy

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        if self.ops[-1] == "_foreach_copy_":
            self.copied.append(len(args[0]))
        return func(*args, **(kwargs or {}))


def _each_alone(petl):
    for handle in petl._cast_hooks:
        handle.remove()
    petl._cast_hooks = ["removed"]  # keep _sync_casts from adding them back
    return petl


def _step(petl, case):
    petl.zero_grad(set_to_none=True)
    with torch.autocast(**BF16):
        out = petl(**case.inputs)
        out = getattr(out, "logits", out)
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad for n, p in petl.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["adapter", "lora", "unipelt", "ssf", "prompt"])
@pytest.mark.parametrize("kind", ["vit_case", "bert_case"])
def test_casting_all_at_once_gives_each_casts_outputs_and_gradients(kind, method, request):
    case = request.getfixturevalue(kind)
    out, grads = _step(attached_and_perturbed(case, method), case)
    want_out, want = _step(_each_alone(attached_and_perturbed(case, method)), case)
    assert torch.equal(out, want_out)
    assert grads.keys() == want.keys() and grads
    for name, grad in want.items():
        assert grads[name].dtype == torch.float32, name
        torch.testing.assert_close(grads[name], grad, msg=name, rtol=0, atol=0)


def test_one_copy_casts_every_parameter_each_way(vit_case):
    petl = attached_and_perturbed(vit_case, "adapter")
    trained = sum(p.requires_grad for p in petl.methods["default"].parameters())
    with _Ops() as seen:
        _step(petl, vit_case)
    assert seen.ops.count("_foreach_copy_") == 2  # forward and backward
    alone = _each_alone(attached_and_perturbed(vit_case, "adapter"))
    with _Ops() as each:
        _step(alone, vit_case)
    assert each.ops.count("_foreach_copy_") == 0
    assert each.ops.count("_to_copy") - seen.ops.count("_to_copy") == 2 * trained


def test_an_unused_parameter_gets_no_gradient_and_casts_close_after_a_failure(vit_case):
    petl = attached_and_perturbed(vit_case, "lora")
    first = next(p for n, p in petl.named_parameters() if "lora_A" in n)
    tuner = next(m for m in petl.modules() if getattr(m, "lora_A", None) is first)
    tuner.enabled = False  # its pair is cast with the others but never read
    _, grads = _step(petl, vit_case)
    assert first.grad is None and grads
    bad = dict(vit_case.inputs)
    bad[next(iter(bad))] = torch.randn(2, 5)  # the wrong shape: the forward raises
    with pytest.raises(RuntimeError), torch.autocast(**BF16):
        petl(**bad)
    assert _OPEN.casts == ()  # the failed forward closed its casts


def _param_casts(petl, case) -> int:
    """Casts of single parameters (not the foreach copy) in one training step."""
    with _Ops() as seen:
        _step(petl, case)
    return seen.ops.count("_to_copy")


def test_a_method_added_later_and_a_copy_cast_their_own_parameters(vit_case):
    petl = attached_and_perturbed(vit_case, "lora")
    _step(petl, vit_case)
    petl.add_method(petlkit.make_config("adapter"), name="second")
    petl.set_active("default", "second")
    trained = sum(len(m.trainable(petl.model)) for m in petl.methods.values())
    alone = _each_alone(copy.deepcopy(petl))
    assert _param_casts(alone, vit_case) - _param_casts(petl, vit_case) == 2 * trained
    _, grads = _step(petl, vit_case)
    _, want = _step(_each_alone(copy.deepcopy(petl)), vit_case)
    assert grads.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(grads[name], grad, msg=name, rtol=0, atol=0)
    twin = copy.deepcopy(petl)
    assert _param_casts(twin, vit_case) == _param_casts(petl, vit_case)  # its own list
    petl.zero_grad(set_to_none=True)
    _step(twin, vit_case)
    assert not petl._casts._tables and not twin._casts._tables  # nothing kept after a forward
    assert all(p.grad is None for p in petl.parameters())  # the copy trained its own tensors
    assert any(p.grad is not None for p in twin.parameters())


def test_hooks_only_while_an_unmerged_method_is_active(vit_case):
    model = vit_case.make()
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    petl = petlkit.attach(model, "lora")
    assert len(model._forward_pre_hooks) > hooks[0]
    petl.merge()
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    petl.unmerge()
    assert len(model._forward_pre_hooks) > hooks[0]
    petl.remove_method("default")
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks


def test_checkpointing_recasts_in_the_backward(vit_case):
    petl = attached_and_perturbed(vit_case, "adapter").train()
    alone = _each_alone(attached_and_perturbed(vit_case, "adapter")).train()
    want_out, want = _step(alone, vit_case)
    petl.model.set_activation_checkpointing(True)
    out, grads = _step(petl, vit_case)
    torch.testing.assert_close(out, want_out)
    for name, grad in want.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_a_replaced_parameter_is_listed_again_at_the_next_forward(vit_case):
    petl = attached_and_perturbed(vit_case, "lora")
    listed = _param_casts(petl, vit_case)
    tuner = next(m for m in petl.modules() if hasattr(m, "lora_A"))
    tuner.lora_A = torch.nn.Parameter(tuner.lora_A.detach().clone())  # as to_empty would
    assert _param_casts(petl, vit_case) == listed + 2  # read where it is, and noticed
    assert _param_casts(petl, vit_case) == listed
    assert tuner.lora_A.grad is not None


def test_casts_made_without_gradients_are_not_reused_with_them():
    weight = torch.nn.Parameter(torch.randn(3, 4))
    casts = TrainedCasts(lambda: [weight])
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    casts.begin(None, ())
    try:
        with torch.no_grad():
            untracked = follow(weight, x)
        tracked = follow(weight, x)
        assert follow(weight, x) is tracked and tracked.dtype == torch.bfloat16
    finally:
        casts.end(None, (), None)
    assert untracked.grad_fn is None and tracked.grad_fn is not None
    assert follow(weight, x) is not tracked  # closed: cast where it is read
    assert torch.equal(tracked, weight.detach().to(torch.bfloat16))


def test_a_parameter_a_forward_did_not_read_is_not_cast_by_the_next():
    read, unread = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4))
    casts = TrainedCasts(lambda: [read, unread])
    x = torch.randn(2, dtype=torch.bfloat16)
    with _Ops() as first:
        casts.begin(None, ())
        follow(read, x)
        casts.end(None, (), None)
    with _Ops() as second:
        casts.begin(None, ())
        follow(read, x)
        casts.end(None, (), None)
    assert first.copied == [2] and second.copied == [1]
    casts.begin(None, ())
    assert follow(unread, x) is not follow(unread, x)  # read anyway: cast where it is read
    casts.end(None, (), None)
    casts.begin(None, ())
    assert follow(unread, x) is follow(unread, x)  # and listed again
    casts.end(None, (), None)


def test_one_dimensional_casts_and_gradients_are_pieces_of_one_allocation(bert_case):
    petl = attached_and_perturbed(bert_case, "adapter")  # 1-D biases, two shapes of weights
    with _Ops() as seen:
        _, grads = _step(petl, bert_case)
    # one allocation per (shape past the first dim) group, each way: 1-D, (in,), (rank,)
    assert "empty_like" not in seen.ops and seen.ops.count("split_with_sizes") == 6
    scales = [g for n, g in grads.items() if g.dim() == 1 and ".adapter." in n]  # not the head
    assert len(scales) > 2
    # AccumulateGrad kept the pieces (a clone would give each its own storage)
    assert len({g.untyped_storage().data_ptr() for g in scales}) == 1
    once = {n: g.clone() for n, g in grads.items()}
    with torch.autocast(**BF16):  # a second step without zeroing: each piece adds its own
        out = petl(**bert_case.inputs)
    getattr(out, "logits", out).float().square().mean().backward()
    for name, param in petl.named_parameters():
        if name in once:
            torch.testing.assert_close(param.grad, 2 * once[name], msg=name, rtol=0, atol=0)


def test_empty_alike_keeps_shapes_strides_and_dtypes():
    wide = torch.randn(3, 5).t()  # not contiguous: its own allocation, its strides
    tensors = [torch.randn(4), wide, torch.randn(6), torch.randn(2, dtype=torch.float16),
               torch.randn(2, 5), torch.randn(1, 5), torch.randn(5, 2)]  # fmt: skip
    dtypes = [torch.bfloat16] * 3 + [torch.float32] + [torch.bfloat16] * 3
    made = empty_alike(tensors, dtypes)
    for t, m, dtype in zip(tensors, made, dtypes, strict=True):
        assert (m.shape, m.stride(), m.dtype) == (t.shape, t.stride(), dtype)
    storage = [m.untyped_storage().data_ptr() for m in made]
    assert storage[0] == storage[2]  # 1-D of one dtype: one allocation
    assert storage[4] == storage[5]  # (·, 5) of one dtype: one allocation, split along dim 0
    assert len({storage[0], storage[1], storage[3], storage[4], storage[6]}) == 5


def test_two_dimensional_casts_of_a_shape_share_one_allocation(bert_case):
    """LoRA's A of every site (r × d) is one allocation each way, its B (d × r) another."""
    petl = attached_and_perturbed(bert_case, "lora")
    with _Ops() as seen:
        _, grads = _step(petl, bert_case)
    lora = [g for n, g in grads.items() if "lora" in n]
    assert len(lora) >= 8 and "empty_like" not in seen.ops
    assert len({g.untyped_storage().data_ptr() for g in lora}) == 2


def _backward(petl, case, direct: bool) -> None:
    with torch.autocast(**BF16):
        out = petl(**case.inputs)
    loss = getattr(out, "logits", out).float().square().mean()
    with petl.accumulating_backward() if direct else contextlib.nullcontext():
        loss.backward()


def _grads(petl) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in petl.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "sas", "ssf", "unipelt"])
def test_an_accumulating_backward_fills_the_same_gradients_without_autograds_accumulations(
    bert_case, method
):
    """Inside accumulating_backward the cast node writes .grad itself, and so do nodes that
    compute their parameters' gradients themselves (SSF's, which reads no cast): the same
    gradients, and autograd accumulates (one detach each) only what they do not carry."""
    plain, direct = (attached_and_perturbed(bert_case, method) for _ in range(2))
    with _Ops() as before:
        _backward(plain, bert_case, direct=False)
    with _Ops() as after:
        _backward(direct, bert_case, direct=True)
    cast = len(direct._casts._params or ())  # the trained tensors the forward cast
    if method == "ssf":  # every linear's scale and shift, from the node's reductions
        from petlkit.methods.ssf import SSFTuner

        cast = 2 * sum(isinstance(m, SSFTuner) and type(m.base_layer) is torch.nn.Linear
                       for m in direct.modules())  # fmt: skip
    want, got = _grads(plain), _grads(direct)
    assert got.keys() == want.keys() and len(want) > cast > 2
    for name, grad in want.items():
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name], grad, msg=name, rtol=0, atol=0)
    assert before.ops.count("detach") - after.ops.count("detach") >= cast
    # a second backward without zeroing adds onto the gradients it filled, as autograd would
    _backward(plain, bert_case, direct=False)
    _backward(direct, bert_case, direct=True)
    for name, grad in _grads(plain).items():
        torch.testing.assert_close(direct.get_parameter(name).grad, grad, msg=name, rtol=0, atol=0)
    assert not direct._casts.direct  # the context ends with the backward


def test_a_tensor_hook_gets_its_gradient_and_a_post_accumulation_hook_sees_it_filled(bert_case):
    petl = attached_and_perturbed(bert_case, "ssf")
    linears = [(n, p) for n, p in petl.named_parameters() if "query" in n]  # handed over
    name, hooked = next((n, p) for n, p in linears if n.endswith("ssf_scale"))
    seen, accumulated = [], []
    hooked.register_hook(lambda g: seen.append(g.clone()))
    other = next(p for n, p in linears if n.endswith("ssf_shift"))
    other.register_post_accumulate_grad_hook(lambda p: accumulated.append(p.grad.clone()))
    reference = attached_and_perturbed(bert_case, "ssf")
    _backward(reference, bert_case, direct=False)
    _backward(petl, bert_case, direct=True)
    assert len(seen) == 1 and len(accumulated) == 1
    torch.testing.assert_close(hooked.grad, reference.get_parameter(name).grad, rtol=0, atol=0)
    torch.testing.assert_close(seen[0], hooked.grad, rtol=0, atol=0)
    torch.testing.assert_close(accumulated[0], other.grad, rtol=0, atol=0)
    name = next(n for n, p in petl.named_parameters() if p is other)
    torch.testing.assert_close(other.grad, reference.get_parameter(name).grad, rtol=0, atol=0)


def test_outside_the_context_autograd_grad_still_receives_every_gradient(bert_case):
    petl = attached_and_perturbed(bert_case, "ssf")
    with petl.accumulating_backward():
        pass  # entered and left: nothing stays switched on
    trained = [p for p in petl.parameters() if p.requires_grad]
    with torch.autocast(**BF16):
        out = petl(**bert_case.inputs)
    grads = torch.autograd.grad(getattr(out, "logits", out).float().square().mean(), trained)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in trained)


def test_with_several_processes_autograd_accumulates_for_ddps_hooks(bert_case, monkeypatch):
    """DDP reduces each gradient from a hook on its accumulation (invisible from Python), so
    with more than one process the context leaves autograd's accumulations in place."""
    petl = attached_and_perturbed(bert_case, "ssf")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with petl.accumulating_backward():
        assert not petl._casts.direct
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)
    with petl.accumulating_backward():
        assert petl._casts.direct
