"""The cost counter (petlkit/cost): the fake op stream is the real one, the counts mean what
they say, CUDA autocast's policy is followed, and the fit is the one the docs quote."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from petlkit.cost.cases import FLOOR, build_case, count
from petlkit.cost.counter import OpCounter, StepCount
from petlkit.cost.cuda_policy import CudaAutocastPolicy
from petlkit.cost.fit import fit_ground_truth, load
from petlkit.cost.step import _step as one_step
from petlkit.cost.step import count_step

ROOT = Path(__file__).resolve().parents[1]
VISION = ["full", "linear", "bitfit", "lora", "adapter", "ssf", "vpt", "prefix", "prompt", "sas",
          "unipelt", "unipelt-ap", "unipelt-prompt"]  # fmt: skip
TEXT = ["lora", "prefix", "prompt", "sas", "ssf", "unipelt", "unipelt-prompt"]


@pytest.fixture(scope="module")
def tiny_vit():
    return build_case("vit-tiny", batch=2, size=32)


@pytest.fixture(scope="module")
def minilm():
    return build_case("minilm-l6", batch=2, size=12, num_classes=2)


# CPU's convolution_backward returns a weight gradient nobody asked for (output_mask false: a
# frozen patch embedding whose bias trains); CUDA's and the meta kernel return None. Only that
# op's bytes may differ between the two runs.
CPU_ONLY_BYTES = "aten.convolution_backward"


def _same_counts(case, method, fold=False):
    fake = count(case, method, fake=True, fold=fold)
    real = count(case, method, fake=False, fold=fold)
    assert fake.stream() == real.stream()
    for ours, cpu in zip(fake.ops, real.ops, strict=True):
        if ours.name == CPU_ONLY_BYTES:
            assert (ours.kernels, ours.flops) == (cpu.kernels, cpu.flops)
            assert ours.bytes <= cpu.bytes
        else:
            assert ours == cpu
    extra = sum(c.bytes - o.bytes for o, c in zip(fake.ops, real.ops, strict=True))
    assert fake.totals() == dict(real.totals(), other_bytes=real.totals()["other_bytes"] - extra)


@pytest.mark.parametrize("method", [FLOOR, *VISION])
def test_fake_tensors_count_what_a_real_cpu_run_runs_on_a_vit(tiny_vit, method):
    _same_counts(tiny_vit, method)


@pytest.mark.parametrize("method", [FLOOR, *TEXT])
def test_fake_tensors_count_what_a_real_cpu_run_runs_on_a_text_encoder(minilm, method):
    _same_counts(minilm, method)


@pytest.mark.parametrize("method", ["sas", "ssf"])
def test_a_folded_form_is_counted_as_it_runs(tiny_vit, method):
    _same_counts(tiny_vit, method, fold=True)
    assert count(tiny_vit, method, fold=True).stream() != count(tiny_vit, method).stream()


# -- what the counts mean -------------------------------------------------------------------
def test_gemm_flops_of_a_linear_step_are_forward_plus_both_gradients():
    model = nn.Linear(64, 32, bias=False)
    x = torch.randn(16, 64, requires_grad=True)
    c = count_step(model, {"x": x}, torch.zeros(16, dtype=torch.long), lambda m, b: m(b["x"]))
    assert c.gemm_flops == 3 * 2 * 16 * 64 * 32  # y = xW^T; dx = dy W; dW = dy^T x


def test_a_gemm_into_its_own_addend_is_a_gemm():
    """`y.addmm_(a, b)` (LoRA's update added into the layer's output) counts its FLOPs as addmm
    does, and no bytes as a memory-bound op."""
    count = StepCount()
    with OpCounter(count):
        y, a, b = torch.zeros(16, 32), torch.randn(16, 4), torch.randn(4, 32)
        y.addmm_(a, b)
        torch.addmm(y, a, b)
    inplace, plain = count.ops[-2:]
    assert inplace.name == "aten.addmm_" and inplace.flops == plain.flops == 2 * 16 * 4 * 32
    assert count.other_bytes == sum(op.bytes for op in count.ops[:3])  # the three fills
    count = StepCount()
    with OpCounter(count):
        y, a, b = torch.zeros(2, 16, 32), torch.randn(2, 16, 4), torch.randn(2, 4, 32)
        y.baddbmm_(a, b)
        torch.baddbmm(y, a, b)
    inplace, plain = count.ops[-2:]
    assert inplace.name == "aten.baddbmm_" and inplace.flops == plain.flops == 2 * 2 * 16 * 4 * 32


def test_an_out_argument_is_written_once_and_an_in_place_operand_read_and_written():
    """`torch.mul(x, s, out=y)` with float32 operands and a bf16 y (SaS's scaled cast) reads x
    and s and writes y: y is not also read. `x.add_(z)` reads x and z and writes x."""
    count = StepCount()
    with OpCounter(count):
        x, s = torch.randn(16, 32), torch.randn(32)
        y = torch.empty(16, 32, dtype=torch.bfloat16)
        torch.mul(x, s, out=y)
        x.add_(x)
    mul, add = count.ops[-2:]
    assert mul.name == "aten.mul" and mul.bytes == 16 * 32 * 4 + 32 * 4 + 16 * 32 * 2
    assert add.name == "aten.add_" and add.bytes == 3 * 16 * 32 * 4


def test_views_and_allocations_launch_no_kernel_and_foreach_ops_launch_one_per_48_tensors():
    count = StepCount()
    params = [torch.zeros(3) for _ in range(100)]
    with OpCounter(count):
        a = torch.randn(8, 8)
        a.view(64).t().unsqueeze(0)
        torch.empty(5)
        torch._foreach_add_(params, 1.0)
        torch.ops.aten.promote_types(torch.bfloat16, torch.float32)  # no tensor: no kernel
    assert {op.name: op.kernels for op in count.ops} == {
        "aten.randn": 1, "aten.view": 0, "aten.t": 0, "aten.unsqueeze": 0, "aten.empty": 0,
        "aten._foreach_add_": 3, "aten.promote_types": 0}  # fmt: skip


def test_the_peak_is_the_most_memory_alive_at_once_in_allocator_blocks():
    count = StepCount()
    with OpCounter(count):
        a = torch.empty(1000)  # 4,000 bytes: 4,096 in 512-byte blocks
        b = torch.empty(100)  # 512
        del a
        c = torch.empty(3000)  # 12,288
        c.view(-1).add_(1)  # a view and an in-place op allocate nothing
    assert count.peak_bytes == 512 + 12288
    assert b.numel() == 100


def _blocks(*nbytes: int) -> int:
    return sum(-(-n // 512) * 512 for n in nbytes)


def test_resident_memory_is_what_the_device_holds_before_the_step():
    """Parameters, buffers, the optimiser's state (AdamW: two moments and a step count per
    trained tensor) and the batch, each storage once in allocator blocks; the floor trains
    nothing, so it holds no optimiser state."""
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32))
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    x, labels = torch.randn(16, 64), torch.zeros(16, dtype=torch.long)
    linear = (64 * 32 * 4, 32 * 4)
    norm = (32 * 4, 32 * 4, 32 * 4, 32 * 4, 8)  # weight, bias, running mean and var, batches
    batch = (16 * 64 * 4, 16 * 8)
    adam = (*linear, *linear, 4, 4)  # exp_avg, exp_avg_sq and a float32 step per tensor
    forward = lambda m, b: m(b["x"])  # noqa: E731
    for fake in (True, False):
        inputs = {"x": x, "first_half": x[:8]}  # a view: its storage is held once
        trained = count_step(copy.deepcopy(model), inputs, labels, forward, fake=fake)
        assert trained.resident_bytes == _blocks(*linear, *norm, *batch, *adam)
        frozen = copy.deepcopy(model).requires_grad_(False)
        wanted = x.clone().requires_grad_(True)  # the floor's backward to the input
        floor = count_step(frozen, {"x": wanted}, labels, forward, fake=fake)
        assert floor.resident_bytes == _blocks(*linear, *norm, *batch)
    assert trained.totals()["resident_bytes"] == trained.resident_bytes


def test_saved_bytes_are_the_activations_kept_for_backward():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU())  # fp32: no autocast casts
    x = torch.randn(64, 256)
    c = count_step(model, {"x": x}, torch.zeros(64, dtype=torch.long), lambda m, b: m(b["x"]),
                   dtype=torch.float32)  # fmt: skip
    activation = 64 * 256 * 4
    # relu saves its output; cross-entropy its log-softmax (the same size) and a 4-byte total
    # weight; the linear saves x, which the step did not make
    assert c.saved_bytes == 2 * activation + 4


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * grad * x * x


def test_a_custom_functions_saved_tensors_are_counted_without_the_hooks_own_calls():
    """Hooks on saved tensors change the op stream (autograd then detaches what a custom
    Function unpacks, and not what a node saves of its own output): the counted stream is the
    one of a step run without them."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    model.weight.requires_grad_(False)
    x, labels = torch.randn(6, 8), torch.zeros(6, dtype=torch.long)

    def forward(m, b):
        return _Cube.apply(m(b["x"]))

    counted = count_step(copy.deepcopy(model), {"x": x}, labels, forward, torch.float32, fake=False)
    plain = StepCount()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.AdamW([twin.bias], lr=1e-6, fused=True)  # as count_step steps
    for counter in (OpCounter(StepCount()), OpCounter(plain)):  # a warm-up, then the step
        with counter:
            one_step(twin, {"x": x}, labels, forward, optimizer, torch.float32)
    assert counted.saved_bytes > 0 and "aten.detach" in plain.stream()
    assert counted.stream() == plain.stream()


def test_a_fused_optimizer_step_launches_once_per_tensor_list_chunk(tiny_vit):
    """The counted step runs AdamW fused, as the trainer does on CUDA (train/optim.adamw): the
    update is one multi-tensor launch per 48 tensors, and the step counts, which fused AdamW
    keeps on the device, one more."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(100)]
    for p in params:
        p.grad = torch.randn(3)
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    optimizer.step()  # the state exists before the counted step, as in count_step's warm-up
    counted = StepCount()
    with OpCounter(counted):
        optimizer.step()
    launches = {op.name: op.kernels for op in counted.ops if op.kernels}
    assert launches == {"aten._fused_adamw_": 3, "aten._foreach_add_": 3}
    assert counted.syncs == 0
    step = count(tiny_vit, "lora").by_op()  # a counted training step: the same two launches
    assert step["aten._fused_adamw_"]["kernels"] == step["aten._foreach_add_"]["kernels"] == 1


# -- CUDA autocast's policy ------------------------------------------------------------------
def _stream(fn) -> list[str]:
    count = StepCount()
    with CudaAutocastPolicy(), torch.autocast("cpu", torch.bfloat16), OpCounter(count):
        out = fn()
    return [op.name for op in count.ops], out


def test_layer_norm_and_softmax_run_in_float32_as_under_cuda_autocast():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    _, out = _stream(lambda: F.layer_norm(x, (8,)))
    assert out.dtype == torch.float32
    _, out = _stream(lambda: x.softmax(-1))
    assert out.dtype == torch.float32
    with torch.autocast("cpu", torch.bfloat16):  # CPU autocast alone keeps bf16
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16


def test_einsum_casts_its_operands_before_it_decomposes():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    stream, out = _stream(lambda: torch.einsum("bij,bjk->bik", a, b))
    assert out.dtype == torch.bfloat16
    assert stream.index("aten._to_copy") < stream.index("aten.bmm")
    assert stream.count("aten._to_copy") == 2


def test_mixed_dtype_addcmul_promotes_every_operand():
    x = torch.randn(4, dtype=torch.bfloat16)
    s = torch.randn(4)
    stream, out = _stream(lambda: torch.addcmul(s, x, s))
    assert out.dtype == torch.float32 and stream == ["aten._to_copy", "aten.addcmul"]


def test_dropout_is_cudas_one_fused_kernel():
    x = torch.randn(4, 8)
    stream, _ = _stream(lambda: F.dropout(x, 0.1, training=True))
    assert stream == ["aten.native_dropout"]
    stream, out = _stream(lambda: F.dropout(x, 0.1, training=False))
    assert stream == [] and out is x


def test_the_policy_does_nothing_outside_autocast():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with CudaAutocastPolicy():
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16


# -- the calibration and the fit -------------------------------------------------------------
def test_the_calibration_counts_every_measured_configuration():
    truth, calibration = load("ground_truth.json"), load("calibration.json")
    assert calibration["measured_code"] == truth["commit"]
    assert set(calibration["counts"]) == {row["name"] for row in truth["vit_b16"]["rows"]}


@pytest.mark.parametrize("row", [FLOOR, "linear"])
def test_the_counter_still_counts_the_calibrated_rows_whose_code_is_unchanged(row):
    """The floor's and linear probing's code have not changed since the ground truth was
    measured, so today's counter counts them as calibration.json has them (linear probing with
    the multi-tensor AdamW the table was measured with, its step counts on the host): a counter
    change that moves these counts needs `python benchmarks/cost_calibration.py` again."""
    truth = load("ground_truth.json")["vit_b16"]
    case = build_case(truth["backbone"], truth["batch"], truth["size"])
    assert count(case, row, fused=False).totals() == load("calibration.json")["counts"][row]


def test_simulated_peaks_match_the_measured_ones_within_two_percent():
    counts = load("calibration.json")["counts"]
    for row in load("ground_truth.json")["vit_b16"]["rows"]:
        assert counts[row["name"]]["peak_bytes"] / 2**30 == pytest.approx(row["gib"], rel=0.02)


def test_the_fit_predicts_each_measured_time_from_the_others():
    fit = fit_ground_truth()
    assert (fit.coefficients > 0).all()  # each of FLOPs, bytes and kernels costs time
    assert fit.loo_errors.mean() < 0.07
    floor = next(r for r in fit.rows if r["name"] == "floor")
    assert floor["loo"] == pytest.approx(floor["ms"], rel=0.05)


def test_the_performance_page_quotes_the_fit_as_computed():
    page = (ROOT / "docs" / "performance.md").read_text()
    assert fit_ground_truth().describe() in re.sub(r"\s+", " ", page)


# -- the command ----------------------------------------------------------------------------
def _cost(capsys, *args: str) -> tuple[int, str, str]:
    from petlkit.cli import main

    code = main(["cost", "--backbone", "vit-tiny", "--batch", "2", "--size", "32", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _rows(out: str) -> dict[str, list[str]]:
    cells = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    return {c[0].strip(): [x.strip() for x in c[1:]] for c in cells if len(c) == 14}


def test_cost_prints_the_floor_each_method_its_folded_form_and_the_ops_it_adds(capsys):
    code, out, _ = _cost(capsys, "--methods", "lora", "prompt", "--ops", "lora")
    rows = _rows(out)
    assert code == 0 and set(rows) == {"method", "floor", "lora", "lora folded", "prompt"}
    assert rows["floor"][1] == rows["floor"][6] == rows["floor"][8] == "1.00"  # ÷ floor columns
    assert rows["method"][9:11] == ["resident GiB", "total GiB"]
    for name in ("floor", "lora", "prompt"):  # total: resident + peak, both printed rounded
        peak, resident, total = (float(v) for v in (rows[name][7], *rows[name][9:11]))
        assert resident > 0 and abs(total - resident - peak) <= 0.011
    assert fit_ground_truth().describe() in out
    assert "lora − floor, by op" in out and "| aten.mm |" in out
    by_calls = out.split("by ATen calls:")[1].split("\n\n")[0].splitlines()[3:]
    calls = [abs(int(line.split("|")[2].replace(",", ""))) for line in by_calls if line]
    assert len(calls) > 3 and calls == sorted(calls, reverse=True)  # ranked for ATen-call work
    by_source = out.split("by ATen calls, by source:")[1].splitlines()[3:]
    sources = {line.split("|")[1].strip(): int(line.split("|")[2].replace(",", ""))
               for line in by_source if line.startswith("|")}  # fmt: skip
    assert sources["backward LoRAUpdateBackward"] > 0 and sources["methods/lora.py:forward"] > 0


def test_sources_name_where_calls_come_from_and_change_nothing_counted(tiny_vit):
    plain = count(tiny_vit, "lora")
    traced = count(tiny_vit, "lora", sources=True)
    assert traced.stream() == plain.stream() and traced.totals() == plain.totals()
    assert {op.source for op in plain.ops} == {""}
    table = traced.by_source()
    assert sum(row["calls"] for row in table.values()) == traced.aten_calls
    assert sum(row["kernels"] for row in table.values()) == traced.kernels
    # the update's own node backward, its forward, the backbone's layers, the optimizer
    assert table["backward LoRAUpdateBackward"]["kernels"] >= 3 * len(tiny_vit.model.blocks)
    assert "methods/lora_update.py:forward" in table
    assert any(name.startswith("backbones/") for name in table)
    assert table["step: loss and optimizer"]["calls"] > 0


def test_cost_without_folded_forms_and_with_method_fields(capsys):
    _, plain, _ = _cost(capsys, "--methods", "lora", "--no-folded")
    _, wider, _ = _cost(capsys, "--methods", "lora", "--no-folded", "--method-arg",
                        'targets=["qkv", "proj", "fc1", "fc2"]')  # fmt: skip
    assert set(_rows(plain)) == {"method", "floor", "lora"}
    calls = [int(_rows(o)["lora"][0].replace(",", "")) for o in (plain, wider)]
    assert calls[1] > calls[0]  # the field reached the method: more layers adapted


def test_cost_says_which_methods_do_not_apply_and_refuses_unknown_names(capsys):
    from petlkit.cli import main

    code = main(["cost", "--backbone", "minilm-l6", "--batch", "2", "--size", "8", "--methods",
                 "vpt", "--no-folded"])  # fmt: skip
    out, _ = capsys.readouterr()
    assert code == 0 and "not applicable: vpt:" in out
    for args in (["--methods", "nope"], ["--methods", "lora", "--ops", "sas"]):
        code, out, err = _cost(capsys, *args)
        assert code == 2 and out == "" and err.startswith("petlkit: error: --")
