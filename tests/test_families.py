"""Every method on every supported transformers family (tiny random configs, tests/families.py).

Per cell: the method attaches, or refuses in one line that says why (the refusals are listed
here, so a new one fails); at initialisation the output is the base model's where the method
starts at identity; three training steps change only the method's tensors and the task head;
disable() gives the untouched model exactly; save → load into a fresh model of the family is
bit-identical; mergeable methods merge to the same output and unmerge to the exact weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import petlkit
from petlkit.layout import head_names
from petlkit.methods.base import Tuner
from tests.families import BY_NAME, FAMILIES
from tests.test_methods_generic import CONFIGS, NOT_IDENTITY_AT_INIT

NO_ATTENTION_INTERFACE = ("deberta-v2", "mpnet")  # attention computed inside the forward
BIAS_FREE = ("modernbert", "llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "t5")
NO_TASK_HEAD = (
    *("clip-vision", "clip-text", "siglip-vision", "siglip-text", "llama", "mistral", "qwen2"),
    *("qwen3",),
    *("gemma", "gemma2", "gemma3", "phi3", "gpt2", "gpt-neox", "opt", "t5", "bart"),
)
PREFIX_METHODS = ("prefix", "unipelt", "unipelt-ap", "unipelt-prompt")


def expected_refusal(family: str, method: str) -> str | None:
    """The words a refusal must contain, or None where the method must attach."""
    if method == "vpt":
        return "VPT needs the project ViT"
    if method in PREFIX_METHODS and family in NO_ATTENTION_INTERFACE:
        return "AttentionInterface"
    if method == "bitfit" and family in BIAS_FREE:
        return "has a bias"
    if method == "linear" and family in NO_TASK_HEAD:
        return "linear probing trains only a task head"
    return None


# Besides each method's generic config: the Pfeiffer adapter (UniPELT's placement: after the
# FFN, on the block output of pre-norm models, on the post-FFN LayerNorm of post-norm ones).
VARIANTS = {"adapter-pfeiffer": ("adapter", {"placement": "pfeiffer", "reduction_factor": 4})}
CELLS = [(f.name, m) for f in FAMILIES for m in [*sorted(CONFIGS), *VARIANTS]]


def method_config(name: str) -> tuple[str, dict]:
    return VARIANTS.get(name, (name, CONFIGS.get(name, {})))


def output(out) -> torch.Tensor:
    """The tensor a training loop reads: logits, else the last hidden state."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out


def run(model, inputs) -> torch.Tensor:
    return output(model(**inputs))


def reference_with_heads(family, petl) -> torch.nn.Module:
    """A fresh model of the family with the trained heads copied in."""
    reference = family.make()
    for name in head_names(petl.model):
        reference.get_submodule(name).load_state_dict(petl.model.get_submodule(name).state_dict())
    return reference


def loss(out) -> torch.Tensor:
    """A loss over every floating output (a pooled output reads modules the last hidden state
    does not: CLIP's post-norm, SigLIP's attention-pool head)."""
    values = out.to_tuple() if hasattr(out, "to_tuple") else (out,)
    tensors = [v for v in values if torch.is_tensor(v) and v.is_floating_point()]
    return sum(t.float().pow(2).mean() for t in tensors)


def train(petl, inputs, steps: int = 3) -> None:
    params = [p for p in petl.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss(petl(**inputs)).backward()
        opt.step()


@pytest.mark.filterwarnings("ignore:.*ALBERT runs one set")  # asserted elsewhere
@pytest.mark.parametrize(("family_name", "method"), CELLS, ids=["-".join(c) for c in CELLS])
def test_every_method_on_every_family(family_name, method, tmp_path):
    family = BY_NAME[family_name]
    inputs = family.inputs()
    model = family.make()
    refusal = expected_refusal(family_name, method)
    method, config = method_config(method)
    if refusal is not None:
        with pytest.raises(petlkit.PetlError) as err:
            petlkit.attach(model, method, **config)
        assert refusal in str(err.value) and "\n" not in str(err.value)
        return
    with torch.no_grad():
        base = run(model, inputs)
    petl = petlkit.attach(model, method, **config)
    with torch.no_grad():
        start = run(petl, inputs)
    if method not in NOT_IDENTITY_AT_INIT:
        torch.testing.assert_close(start, base, rtol=0, atol=1e-5)

    before = {n: p.detach().clone() for n, p in petl.named_parameters()}
    trainable = {n for n, p in petl.named_parameters() if p.requires_grad}
    heads = {n for n in trainable for h in head_names(petl.model) if n.startswith(f"model.{h}.")}
    train(petl, inputs)
    changed = {n for n, p in petl.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert heads <= changed
    if method == "full":
        assert len(changed - heads) > 0.5 * len(trainable - heads)
    else:
        assert trainable - heads == changed - heads, sorted((trainable - heads) - changed)[:5]

    petl.eval()
    with torch.no_grad():
        trained = run(petl, inputs)
        reference = reference_with_heads(family, petl)
        with petl.disable():
            torch.testing.assert_close(run(petl, inputs), run(reference, inputs), rtol=0, atol=0)

    petlkit.save_adapter(petl, tmp_path)
    loaded = petlkit.load_adapter(family.make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, inputs), trained, rtol=0, atol=0)

    if petl.methods["default"].merge_refusal is not None:
        with pytest.raises(petlkit.NotMergeableError):
            petl.merge()
        return
    weights = {k: v.clone() for k, v in petl.model.state_dict().items()}
    with torch.no_grad():
        petl.merge()
        assert not any(isinstance(m, Tuner) for m in petl.model.modules()), "merge left wrappers"
        torch.testing.assert_close(run(petl, inputs), trained, rtol=0, atol=1e-4)
        petl.unmerge()
        for key, value in petl.model.state_dict().items():
            assert torch.equal(value, weights[key]), key
        torch.testing.assert_close(run(petl, inputs), trained, rtol=0, atol=0)


# -- the family × method table of the README and docs/models.md, generated from this matrix --
REASONS = {  # refusal text → (mark, footnote)
    "VPT needs the project ViT": ("v", "VPT needs the hook points of petlkit's own ViT"),
    "AttentionInterface": ("a", "attention computed inside the model's forward: no prefix tokens"),
    "has a bias": ("b", "bias-free layers: BitFit refuses; `add_missing=True` adds bias offsets"),
    "linear probing trains only a task head": ("h", "no task head to probe (`heads=[...]`)"),
}
MARKERS = ("<!-- family-method-table: generated by `python -m tests.test_families` -->",
           "<!-- end of family-method-table -->")  # fmt: skip


def family_table() -> str:
    methods = sorted(CONFIGS)  # the generic configs (the README's columns)
    lines = [
        "| family | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for family in FAMILIES:
        marks = []
        for method in methods:
            refusal = expected_refusal(family.name, method)
            marks.append("✓" if refusal is None else REASONS[refusal][0])
        lines.append(f"| {family.name} | " + " | ".join(marks) + " |")
    notes = "; ".join(f"{mark}: {text}" for mark, text in REASONS.values())
    legend = (
        "✓: attaches; three training steps change only its tensors and the task head; "
        "`disable()` gives the model exactly; save → load is bit-identical; merge → unmerge "
        "where mergeable (tests/test_families.py); meta and bf16 placement "
        "(tests/test_family_devices.py); `generate()` with the KV cache on and off on seven "
        f"decoder families (tests/test_generate.py). Refused, in one line: {notes}."
    )
    return "\n".join([MARKERS[0], "", *lines, "", legend, MARKERS[1]])  # blank: a table starts


TABLE_PAGES = ("README.md", "docs/models.md")  # each holds the table between MARKERS


def _with_table(text: str) -> str:
    start, end = text.index(MARKERS[0]), text.index(MARKERS[1]) + len(MARKERS[1])
    return text[:start] + family_table() + text[end:]


@pytest.mark.parametrize("page", TABLE_PAGES)
def test_the_published_table_is_this_matrix(page):
    text = (Path(__file__).parents[1] / page).read_text()
    assert _with_table(text) == text, "run `python -m tests.test_families` to rewrite it"


if __name__ == "__main__":  # rewrite the table in every page that shows it
    for page in TABLE_PAGES:
        path = Path(__file__).parents[1] / page
        path.write_text(_with_table(path.read_text()))
        print("wrote", path)
