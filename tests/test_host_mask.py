"""A batch without padding goes to the model without its attention mask, decided on the host
(train/inputs.py: `without_full_mask`): the model computes the same function, and the step no
longer waits on the device for transformers' "is the mask all ones?" (issue #47)."""

from __future__ import annotations

import pytest
import torch

import petlkit
from petlkit.cost.cases import FLOOR, build_case, count
from petlkit.tasks.base import Split, Task
from petlkit.train.config import TrainConfig
from petlkit.train.inputs import without_full_mask
from petlkit.train.trainer import Trainer
from tests.conftest import tiny_bert_case

TEXT_METHODS = ["lora", "prefix", "prompt", "sas", "ssf", "unipelt", "unipelt-prompt"]


def test_a_mask_that_masks_nothing_is_left_out_and_any_other_is_kept():
    ids = torch.arange(12).view(2, 6)
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert without_full_mask(full).keys() == {"input_ids"}
    assert full.keys() == {"input_ids", "attention_mask"}  # the caller's batch is not changed
    padded = dict(full, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([5]), 0))
    assert without_full_mask(padded) is padded
    assert without_full_mask({"input_ids": ids}).keys() == {"input_ids"}
    # on a device, asking would be the very wait this avoids: kept as it is
    on_device = dict(full, attention_mask=torch.ones(2, 6, device="meta"))
    assert without_full_mask(on_device) is on_device


@pytest.mark.parametrize("method", TEXT_METHODS)
def test_the_model_gives_the_same_outputs_without_a_mask_that_masks_nothing(method):
    case = tiny_bert_case()
    model = petlkit.attach(case.make(), method).eval()
    ids = case.inputs["input_ids"]
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        unmasked = model(input_ids=ids)
    torch.testing.assert_close(unmasked, masked, rtol=0, atol=1e-6)


def _words_task(lengths: list[int]) -> Task:
    texts = [" ".join(["good"] * n) for n in lengths]
    split = Split(texts, torch.tensor([i % 2 for i in range(len(texts))]))
    return Task("words", "text", 2, {"train": split, "val": split})


@pytest.mark.parametrize(("lengths", "masked"), [([4, 4, 4, 4], False), ([4, 2, 4, 3], True)])
def test_the_trainer_passes_a_mask_only_for_a_batch_with_padding(lengths, masked):
    from transformers import AutoTokenizer

    from petlkit.backbones.registry import minilm_path

    case = tiny_bert_case()
    task = _words_task(lengths)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = TrainConfig(steps=1, batch_size=4, max_length=16)
    trainer = Trainer(petlkit.attach(case.make(), "lora"), task, config, tokenizer=tokenizer,
                      progress=False)  # fmt: skip
    inputs, _ = trainer.encode(task.splits["train"], torch.arange(4), training=True)
    assert ("attention_mask" in inputs) is masked
    if masked:
        assert not bool(inputs["attention_mask"].all())


UNEVEN = [" yes", " no no no", " yes", " no"]


@pytest.mark.parametrize(("completions", "masked"), [([" yes"] * 4, False), (UNEVEN, True)])
def test_a_language_model_batch_has_a_mask_only_where_it_is_padded(completions, masked):
    """Decoders take the same rule: an LM batch goes without a mask that masks nothing."""
    from transformers import AutoTokenizer

    from petlkit.backbones.registry import minilm_path
    from petlkit.tasks.generation import Example, lm_task
    from tests.helpers import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    examples = [Example(completion=c, prompt="the answer is") for c in completions]
    task = lm_task("words", {"train": examples, "val": examples})
    config = TrainConfig(steps=1, batch_size=4, max_length=16)
    trainer = Trainer(petlkit.attach(tiny_llama(), "lora"), task, config, tokenizer=tokenizer,
                      progress=False)  # fmt: skip
    inputs, labels = trainer.encode(task.splits["train"], torch.arange(4), training=True)
    assert ("attention_mask" in inputs) is masked
    assert labels.shape == inputs["input_ids"].shape
    if masked:
        assert not bool(inputs["attention_mask"].all())


@pytest.fixture(scope="module")
def minilm():
    return build_case("minilm-l6", batch=2, size=12, num_classes=2)


@pytest.mark.parametrize("method", [FLOOR, *TEXT_METHODS])
def test_no_text_step_waits_on_the_device(minilm, method):
    assert count(minilm, method).syncs == 0


def test_a_mask_handed_to_the_device_costs_the_step_a_sync(minilm):
    """What the host-side rule removes: transformers reads a device mask back to the host."""
    ids = minilm.batch["input_ids"]
    padded = type(minilm)(minilm.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                          minilm.labels, minilm.family)  # fmt: skip
    assert count(padded, FLOOR).syncs == 1
