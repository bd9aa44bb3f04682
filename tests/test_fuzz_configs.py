"""Fuzzing method configs on tiny backbones: every config either works (finite forward and
backward, exact save/load round trip) or is refused when the config is built, with a clear
error; never a crash deeper inside."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import petlkit
from petlkit.errors import PetlError
from tests.conftest import tiny_bert_case, tiny_vit_case

ANY = st.one_of(
    st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.none(), st.lists(st.integers(-2, 40_000), max_size=3),  # token ids, targets
    st.sampled_from(["q", "v", "relu", "pfeiffer", "houlsby", "attn_in", "mlp_in", "vocab",
                     "tokens", "bogus", ""]),
)  # fmt: skip
FIELDS = {
    "lora": ["r", "alpha", "dropout", "gated"],
    "adapter": ["reduction_factor", "placement", "non_linearity", "gated", "dropout"],
    "prefix": ["length", "hidden", "reparameterize", "gated"],
    "prompt": ["length", "init", "init_range", "init_tokens", "gated"],
    "vpt": ["length", "deep", "dropout"],
    "ssf": ["init_std"],
    "sas": ["rank", "embed_dim", "hidden", "scale", "dropout", "shared", "specific"],
    "unipelt": ["gated", "prompt", "prompt_length", "lora_r", "prefix_length", "prefix_hidden",
                "adapter_reduction", "prompt_init"],
}  # fmt: skip
CASES = {"tiny-bert": tiny_bert_case(), "tiny-vit": tiny_vit_case()}


@st.composite
def configs(draw):
    method = draw(st.sampled_from(sorted(FIELDS)))
    names = draw(st.lists(st.sampled_from(FIELDS[method]), unique=True, max_size=3))
    value = st.one_of(st.integers(1, 8), st.floats(0.0, 0.9), st.booleans(), ANY)  # 3/4 plausible
    return method, {name: draw(value) for name in names}, draw(st.sampled_from(sorted(CASES)))


# The refusals a valid config may still meet on a given backbone, each a one-line reason.
BACKBONE_REFUSALS = (
    r"^VPT needs the project ViT",
    r"^on a ViT prompts go after the class token",
    r"^prompt init='(vocab|tokens)' copies word embeddings, and \w+ has no word-embedding table",
    r"^prompt init_tokens \[.*\] reach past the model's \d+ word embeddings",
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(configs())
def test_every_config_works_or_is_refused_up_front(tmp_path, drawn):
    method, fields, case_name = drawn
    case = CASES[case_name]
    try:
        config = petlkit.make_config(method, **fields)
    except PetlError as err:  # refused at construction: the message names the config's field
        owner = petlkit.registry.method_class(method).config_cls.__name__
        named = [
            name
            for name in fields
            if f"{owner}.{name}" in str(err)
            or (f"{owner}:" in str(err) and re.search(rf"\b{name}\b", str(err)))
        ]
        assert named or f"{owner}: nothing to train" in str(err), f"{fields}: {err}"
        event("refused: config")
        return
    except TypeError as err:  # a Python-level type error is not a clear refusal
        pytest.fail(f"{method} {fields}: {err}")
    try:
        model = petlkit.attach(case.make(), config)
    except PetlError as err:  # refused for this backbone (e.g. VPT on text), clearly
        assert any(re.search(known, str(err)) for known in BACKBONE_REFUSALS), err
        event("refused: backbone")
        return
    model.train()
    loss = F.cross_entropy(model(**case.inputs), case.labels)
    assert math.isfinite(loss.item())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    folder = tmp_path / f"{method}-{abs(hash(str(fields)))}"
    petlkit.save_adapter(model, folder)
    loaded = petlkit.load_adapter(case.make(), folder)
    torch.testing.assert_close(loaded.eval()(**case.inputs), model(**case.inputs))
    event("trained and round-tripped")
