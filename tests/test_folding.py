"""Folded training (methods/folding.py): the update formed into the weights each forward computes
the same function, with the same gradients, as the unfolded form, on every dtype and device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import petlkit
from petlkit.errors import NotFoldableError
from petlkit.methods.base import Tuner
from tests.conftest import CASES
from tests.helpers import train_steps

FOLDABLE = {
    "lora": {"r": 2, "alpha": 4},
    "lora-qkv": {"r": 2, "alpha": 4, "qkv_parts": ("q", "k", "v")},
    "bitfit": {},
    "ssf": {},
    "sas": {"rank": 2},
    "sas-shared": {"rank": 2, "specific": False},
    "sas-specific": {"rank": 2, "shared": False},
}
PAIRS = [(case, label) for case in ("tiny-vit", "tiny-bert") for label in FOLDABLE]


def _attached(case_name: str, label: str, dtype=torch.float32):
    case = CASES[case_name]()
    model = case.make().to(dtype)
    petl = petlkit.attach(model, label.split("-")[0], **FOLDABLE[label])
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.inputs.items()}
    return case, petl, inputs


def _moved_away_from_init(petl, inputs, labels) -> None:
    """A few unfolded steps so LoRA's B, SaS's up and the hypernetworks are not zero."""
    train_steps(petl, inputs, labels, steps=2, lr=5e-2)


def _output_and_grads(petl, inputs, labels):
    petl.zero_grad(set_to_none=True)
    out = petl(**inputs)
    F.cross_entropy(out.float(), labels).backward()
    grads = {n: p.grad.clone() for n, p in petl.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.mark.parametrize(("case_name", "label"), PAIRS, ids=["-".join(p) for p in PAIRS])
def test_folded_matches_unfolded_outputs_and_gradients(case_name, label):
    case, petl, inputs = _attached(case_name, label, torch.float64)
    _moved_away_from_init(petl, inputs, case.labels)
    out, grads = _output_and_grads(petl, inputs, case.labels)
    petl.set_folded(True)
    assert petl.folded
    folded_out, folded_grads = _output_and_grads(petl, inputs, case.labels)
    torch.testing.assert_close(folded_out, out, rtol=1e-10, atol=1e-10)
    assert folded_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(folded_grads[name], grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("label", ["lora", "ssf", "sas"])
def test_folded_training_follows_the_same_trajectory(label):
    """SGD, not Adam: Adam turns a gradient that is zero in exact arithmetic (a key bias under
    softmax) into ±lr steps whose sign is rounding noise, in either form."""
    runs = []
    for folded in (False, True):
        case, petl, inputs = _attached("tiny-vit", label)
        petl.set_folded(folded)
        params = [p for p in petl.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(petl(**inputs), case.labels).backward()
            opt.step()
        petl.set_folded(False)
        runs.append({n: p.detach().clone() for n, p in petl.named_parameters()})
    for name, value in runs[0].items():
        torch.testing.assert_close(runs[1][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("label", ["lora", "bitfit", "ssf", "sas"])
def test_folded_follows_a_bfloat16_backbone(label):
    """The folded weight is formed in float32 and rounded once to the backbone's dtype; the
    output keeps that dtype and the float32 parameters get their gradients."""
    case, petl, inputs = _attached("tiny-vit", label, torch.bfloat16)
    _moved_away_from_init(petl, inputs, case.labels)
    out, grads = _output_and_grads(petl, inputs, case.labels)
    petl.set_folded(True)
    folded_out, folded_grads = _output_and_grads(petl, inputs, case.labels)
    assert folded_out.dtype == torch.bfloat16
    torch.testing.assert_close(folded_out.float(), out.float(), rtol=0.05, atol=0.05)
    params = dict(petl.named_parameters())
    for name, grad in grads.items():
        assert folded_grads[name].dtype == params[name].dtype == torch.float32, name
        if grad.norm() > 0:  # same direction, to bfloat16's precision
            cosine = F.cosine_similarity(folded_grads[name].flatten(), grad.flatten(), dim=0)
            assert cosine > 0.98, (name, cosine)


@pytest.mark.parametrize("label", ["lora", "sas", "ssf"])
def test_folded_runs_on_the_meta_device(label):
    """Nothing in the folded path is made on the default device: a model on `meta` runs."""
    case = CASES["tiny-vit"]()
    with torch.device("meta"):
        model = case.make()
    petl = petlkit.attach(model, label.split("-")[0], **FOLDABLE[label])
    petl.set_folded(True)
    out = petl(pixels=torch.empty(2, 3, 16, 16, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3)


def test_unfolding_restores_the_module_tree_and_adapter_file(tmp_path):
    case, petl, inputs = _attached("tiny-vit", "sas")
    before = list(petl.state_dict())
    petl.set_folded(True)
    assert any(type(m).__name__ == "SaSFolded" for m in petl.modules())
    petlkit.save_adapter(petl, tmp_path / "folded")
    petl.set_folded(False)
    assert list(petl.state_dict()) == before
    assert not any(type(m).__name__ == "SaSFolded" for m in petl.modules())
    petlkit.save_adapter(petl, tmp_path / "plain")
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        folded_file = (tmp_path / "folded" / file).read_bytes()
        assert folded_file == (tmp_path / "plain" / file).read_bytes(), file


@pytest.mark.parametrize("label", ["lora", "sas"])
def test_merge_and_disable_while_folded(label):
    case, petl, inputs = _attached("tiny-vit", label, torch.float64)
    _moved_away_from_init(petl, inputs, case.labels)
    petl.eval()
    with torch.no_grad():
        plain = petl(**inputs)
        with petl.disable():
            backbone = petl(**inputs)
        petl.set_folded(True)
        with petl.disable():
            torch.testing.assert_close(petl(**inputs), backbone)
        petl.merge()
        assert not any(isinstance(m, Tuner) for m in petl.model.modules())
        torch.testing.assert_close(petl(**inputs), plain, rtol=1e-10, atol=1e-10)
        petl.unmerge()
        torch.testing.assert_close(petl(**inputs), plain, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("method", "kwargs", "why"),
    [
        ("adapter", {"placement": "pfeiffer"}, "non-linearity"),
        ("prompt", {"length": 2}, "'default' (prompt)"),
        ("unipelt", {"prefix_length": 2, "prefix_hidden": 8, "lora_r": 2}, "'default' (unipelt)"),
        ("lora", {"r": 2, "dropout": 0.1}, "dropout"),
        ("sas", {"rank": 2, "dropout": 0.1}, "dropout"),
        ("full", {}, "wraps no layer"),
    ],
)
def test_methods_that_cannot_fold_say_why(method, kwargs, why):
    case = CASES["tiny-bert"]()
    petl = petlkit.attach(case.make(), method, **kwargs)
    assert why in (petl.fold_refusal() or "")
    with pytest.raises(NotFoldableError, match="fold: off"):
        petl.set_folded(True)
    assert not petl.folded


def test_stacked_methods_refuse_to_fold_the_inner_layer():
    case = CASES["tiny-vit"]()
    petl = petlkit.attach(case.make(), "bitfit")
    petl.add_method(petlkit.make_config("lora", r=2), "outer")
    petl.set_active("default", "outer")
    with pytest.raises(NotFoldableError, match="wraps the layer"):
        petl.set_folded(True)
    assert not petl.folded  # checked before anything changed


def test_a_merged_method_does_not_fold_twice():
    case, petl, inputs = _attached("tiny-vit", "sas")
    petl.merge()
    with pytest.raises(NotFoldableError, match="merged"):
        petl.set_folded(True)


# -- the trainer's switch (train/folding.py) ---------------------------------------------------
def _fit(method: str, fold: str, out=None, steps: int = 12):
    from petlkit.tasks import load_task
    from petlkit.train.config import TrainConfig
    from petlkit.train.trainer import Trainer
    from tests.train_job import build

    model = build(method)
    cfg = TrainConfig(steps=steps, batch_size=16, eval_every=0, checkpoint_every=0, seed=3,
                      lr=3e-3, fold=fold)  # fmt: skip
    results = Trainer(model, load_task("digits"), cfg, out, progress=False).fit()
    return model, results


@pytest.mark.parametrize("method", ["lora", "sas"])
def test_training_folded_ends_where_unfolded_training_ends(method):
    (plain, plain_results), (folded, folded_results) = (_fit(method, f) for f in ("off", "on"))
    assert (plain_results["fold"], folded_results["fold"]) == ("off", "on")
    assert not folded.folded  # the trainer hands back the plain module tree
    trained = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in folded.named_parameters():
        if name in trained:
            torch.testing.assert_close(p, trained[name], rtol=1e-3, atol=1e-4, msg=name)
    assert folded_results["val"]["accuracy"] == pytest.approx(plain_results["val"]["accuracy"],
                                                              abs=0.02)  # fmt: skip


def test_auto_times_both_forms_and_logs_its_choice(tmp_path):
    import json

    _, results = _fit("sas", "auto", tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    decided = [line for line in lines if "fold" in line]
    assert len(decided) == 1  # decided once, after 2 warm-up and 3 timed steps of each form
    assert decided[0]["step"] == 8
    assert decided[0]["fold"] == results["fold"]
    assert decided[0]["folded_ms"] > 0 and decided[0]["unfolded_ms"] > 0
    folded, unfolded = decided[0]["folded_ms"], decided[0]["unfolded_ms"]
    if folded != unfolded:  # the log rounds to 0.01 ms; the choice was made on exact times
        assert results["fold"] == ("on" if folded < unfolded else "off")


def test_auto_stays_unfolded_for_a_method_that_cannot_fold():
    _, results = _fit("adapter", "auto", steps=3)
    assert results["fold"] == "off"


def test_fold_on_with_a_method_that_cannot_fold_is_refused_before_training():
    with pytest.raises(NotFoldableError, match="adapter"):
        _fit("adapter", "on", steps=3)


def test_a_bad_fold_mode_names_the_choices():
    from petlkit.errors import ConfigError
    from petlkit.train.config import TrainConfig

    with pytest.raises(ConfigError, match="auto"):
        TrainConfig(fold="yes")
