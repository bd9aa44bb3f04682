"""A model petlkit does not know, declared in about ten lines (docs/models.md), takes SaS and
UniPELT; a wrong declaration or none at all is refused with what is missing."""

from __future__ import annotations

import pytest
import torch

import petlkit
from petlkit.families import _DECLARED
from tests.docs_snippets import ROOT, run_page


@pytest.fixture(scope="module")
def page() -> dict:
    return run_page("docs/models.md")


def test_the_worked_example_runs_and_its_layout_is_short(page):
    import inspect
    import re

    text = (ROOT / "docs/models.md").read_text()
    declaration = re.search(r"layout = petlkit\.ModelLayout\((.*?)\n\)", text, re.S).group(1)
    assert len(declaration.strip().splitlines()) <= 10
    assert isinstance(page["layout"], petlkit.ModelLayout)
    assert inspect.isclass(page["TinyClassifier"])


def _fresh(page, method: str, **kwargs) -> petlkit.PetlModel:
    torch.manual_seed(0)
    return petlkit.attach(page["TinyClassifier"](), method, layout=page["layout"], **kwargs)


@pytest.mark.parametrize("method", ["sas", "unipelt", "lora", "adapter", "prefix", "bitfit"])
def test_a_declared_model_trains_saves_and_loads(page, method, tmp_path):
    petl = _fresh(page, method)
    ids = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in petl.named_parameters()}
    trainable = {n for n, p in petl.named_parameters() if p.requires_grad}
    assert {"model.head.weight", "model.head.bias"} <= trainable
    opt = torch.optim.AdamW([p for p in petl.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(petl(ids), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
    changed = {n for n, p in petl.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    petlkit.save_adapter(petl, tmp_path)
    torch.manual_seed(0)
    loaded = petlkit.load_adapter(page["TinyClassifier"](), tmp_path, layout=page["layout"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), petl(ids), rtol=0, atol=0)


def test_sas_merges_into_the_declared_model(page):
    petl = _fresh(page, "sas")
    with torch.no_grad():
        for p in petl.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
        ids = torch.randint(0, 100, (2, 5))
        expected = petl(ids)
        petl.merge()
        torch.testing.assert_close(petl(ids), expected, rtol=0, atol=1e-5)


def test_declare_layout_covers_every_instance_of_the_class(page):
    cls = page["TinyClassifier"]
    petlkit.declare_layout(cls, page["layout"])
    try:
        petl = petlkit.attach(cls(), "sas")
        assert petl.trainable_parameters().trainable > 0
    finally:
        _DECLARED.pop(cls)


def test_a_model_without_a_layout_is_told_how_to_declare_one(page):
    with pytest.raises(petlkit.PetlError, match="knows no layout for TinyClassifier.*ModelLayout"):
        petlkit.attach(page["TinyClassifier"](), "sas")


def test_a_wrong_layout_lists_every_missing_module(page):
    wrong = petlkit.ModelLayout(
        layers="blocks", attention="attention", query="attn.query", key="attn.k", value="attn.v",
        attn_out="attn.o", mlp="mlp", mlp_in=("mlp.0",), mlp_out="mlp.2", width=32, num_heads=4,
    )  # fmt: skip
    with pytest.raises(petlkit.PetlError) as err:
        petlkit.attach(page["TinyClassifier"](), "sas", layout=wrong)
    message = str(err.value)
    assert "blocks.0.attention" in message and "blocks.0.attn.query" in message
    assert "\n" not in message


def test_a_model_without_widths_or_config_must_give_them(page):
    layout = petlkit.ModelLayout(
        layers="blocks", attention="attn", query="attn.q", key="attn.k", value="attn.v",
        attn_out="attn.o", mlp="mlp", mlp_in=("mlp.0",), mlp_out="mlp.2",
    )  # fmt: skip
    with pytest.raises(petlkit.PetlError, match="width=.*num_heads="):
        petlkit.attach(page["TinyClassifier"](), "sas", layout=layout)


def test_target_methods_need_no_layout(page):
    petl = petlkit.attach(page["TinyClassifier"](), "lora", targets=["q", "v"], r=2)
    assert len(petl.methods["default"].tuners(petl.model)) == 4


def test_prompt_tuning_is_refused_without_an_input_hook_point(page):
    with pytest.raises(petlkit.PetlError, match="token_hooks"):
        _fresh(page, "prompt")
