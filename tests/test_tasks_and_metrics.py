"""Metrics against hand-computed values; here-scale tasks have the documented splits."""

from __future__ import annotations

import math
import re

import pytest
import torch

from petlkit.errors import PetlError
from petlkit.tasks import load_task
from petlkit.tasks.metrics import accuracy, correlation, f1_accuracy, macro_f1, mcc

T = torch.tensor


def test_mcc_by_hand():
    # tp=2, tn=1, fp=1, fn=1: (2·1 − 1·1) / sqrt(3·3·2·2) = 1/6
    assert mcc(T([1, 1, 1, 0, 0]), T([1, 1, 0, 1, 0]))["mcc"] == pytest.approx(1 / 6)


def test_f1_by_hand():
    # precision 2/3, recall 2/3 → F1 2/3; 3 of 5 right
    scores = f1_accuracy(T([1, 1, 1, 0, 0]), T([1, 1, 0, 1, 0]))
    assert list(scores) == ["f1", "accuracy"]
    assert scores["f1"] == pytest.approx(2 / 3) and scores["accuracy"] == pytest.approx(0.6)


def test_macro_f1_by_hand():
    # a model that always says 0 on 3 zeros and 1 one: F1 of class 0 is 2·0.75·1/1.75 = 6/7,
    # of class 1 is 0; macro-F1 is their mean, 3/7, far below the 0.75 accuracy
    scores = macro_f1(T([0, 0, 0, 0]), T([0, 0, 0, 1]))
    assert list(scores) == ["macro_f1", "accuracy"]
    assert scores["macro_f1"] == pytest.approx(3 / 7) and scores["accuracy"] == pytest.approx(0.75)


def test_spearman_and_pearson_by_hand():
    # ranks of pred (1,2,3,4) vs labels (1,3,2,4): 1 − 6·Σd²/(n(n²−1)) = 1 − 6·2/60 = 0.8
    scores = correlation(T([0.1, 0.2, 0.3, 0.4]), T([1.0, 3.0, 2.0, 4.0]))
    assert scores["spearman"] == pytest.approx(0.8)
    assert scores["pearson"] == pytest.approx(0.8)  # equally spaced values: Pearson = Spearman
    assert accuracy(T([0, 1, 2]), T([0, 1, 1]))["accuracy"] == pytest.approx(2 / 3)
    assert not math.isnan(scores["pearson"])


def test_digits_is_a_vtab_1k_style_task():
    task = load_task("digits")
    sizes = {name: len(split) for name, split in task.splits.items()}
    assert sizes == {"train": 800, "val": 200, "test": 797}
    assert task.splits["train"].inputs.shape[1:] == (1, 8, 8)
    assert task.num_labels == 10 and task.image_size == 8 and task.channels == 1


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("image-folder", "reads <dir>/{train,val,test}/<class>/: pass --data-dir"),
        ("text-files", "reads your train/val/test JSONL or CSV files: pass --data-dir"),
        ("vtab-cifar", "reads image files: pass --data-dir"),
        ("fewshot-food101", "reads image files: pass --data-dir"),
        ("glue-sst2", "reads the official GLUE TSV files: pass --data-dir"),
        ("squad", "windows depend on the tokenizer: use `petlkit train --task squad`"),
    ],
)
def test_file_tasks_without_their_folder_say_what_to_pass(name, needle):
    with pytest.raises(PetlError, match=re.escape(needle)):
        load_task(name)


def test_few_shot_files_need_the_shot_count(tmp_path):
    with pytest.raises(PetlError, match=re.escape("fewshot-food101 needs --shots")):
        load_task("fewshot-food101", str(tmp_path))


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(PetlError, match="valid tasks: .*'digits'.*'glue-sst2'.*'rotten-tomatoes'"):
        load_task("mnist-typo")


def test_rotten_tomatoes_task_reads_the_installed_corpus():
    task = load_task("rotten-tomatoes")
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 9752, "val": 1000, "test": 2000}
    assert task.modality == "text" and task.num_labels == 2
    assert set(task.splits["train"].labels.tolist()) == {0, 1}
