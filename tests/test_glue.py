"""GLUE readers on fixtures written in the official TSV layouts, one per task."""

from __future__ import annotations

import pytest
import torch

from petlkit.errors import PetlError
from petlkit.tasks.glue import FOLDERS, GLUE, glue_task

# (header or None, a row builder (i -> fields), the label the row carries as read)
LAYOUTS = {
    "cola": (None, lambda i, y: ["gj04", y, "", f"the cat sat {i}"]),
    "sst2": (["sentence", "label"], lambda i, y: [f"a fine film {i}", y]),
    "mrpc": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             lambda i, y: [y, "1", "2", f"he said {i}", f"she said {i}"]),
    "qqp": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            lambda i, y: [str(i), "1", "2", f"why {i}?", f"how {i}?", y]),
    "stsb": (["index", "genre", "filename", "year", "old_index", "source1", "source2",
              "sentence1", "sentence2", "score"],
             lambda i, y: [str(i), "main", "f", "2012", "0", "s", "s", f"a {i}", f"b {i}", y]),
    "mnli": (["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
              "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
              "sentence2", "label1", "gold_label"],
             lambda i, y: [str(i), "1", "1", "g", "(", "(", "(", "(", f"p {i}", f"h {i}", y, y]),
    "qnli": (["index", "question", "sentence", "label"],
             lambda i, y: [str(i), f"what {i}?", f"this {i}.", y]),
    "rte": (["index", "sentence1", "sentence2", "label"],
            lambda i, y: [str(i), f"it rains {i}", f"it is wet {i}", y]),
    "wnli": (["index", "sentence1", "sentence2", "label"],
             lambda i, y: [str(i), f"x {i}", f"y {i}", y]),
}  # fmt: skip


def _labels(name: str) -> list[str]:
    labels = GLUE[name].labels
    return ["0.5", "3.25", "4.0"] if labels is None else list(labels)


def write_task(root, name: str, n: int = 12) -> None:
    header, row = LAYOUTS[name]
    folder = root / FOLDERS[name]
    folder.mkdir(parents=True)
    labels = _labels(name)
    for file in ("train.tsv", *GLUE[name].dev):
        lines = [] if header is None else ["\t".join(header)]
        lines += ["\t".join(row(i, labels[i % len(labels)])) for i in range(n)]
        (folder / file).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name", sorted(GLUE))
def test_each_glue_task_reads_its_official_layout(tmp_path, name):
    write_task(tmp_path, name)
    task = glue_task(name, tmp_path, held_out=4)
    assert (len(task.splits["train"]), len(task.splits["val"]), len(task.splits["test"])) == (
        8,
        4,
        12,
    )
    test = task.splits["test"]
    spec = GLUE[name]
    if spec.labels is None:
        assert test.labels.dtype == torch.float32 and test.labels[:3].tolist() == [0.5, 3.25, 4.0]
    else:
        expected = [i % len(spec.labels) for i in range(12)]
        assert test.labels.tolist() == expected
    assert task.pair == (len(spec.text) > 1)
    first = test.inputs[0]
    assert isinstance(first, tuple) == task.pair and "0" in (first[0] if task.pair else first)
    assert ("test_mismatched" in task.splits) == (name == "mnli")


def test_metric_per_task_is_the_leaderboards():
    metrics = {n: glue_spec.metric for n, glue_spec in GLUE.items()}
    assert metrics["cola"] == "mcc" and metrics["stsb"] == "correlation"
    assert metrics["mrpc"] == metrics["qqp"] == "f1_accuracy"
    assert {metrics[n] for n in ("sst2", "mnli", "qnli", "rte", "wnli")} == {"accuracy"}


def test_low_resource_sampling_is_seeded_and_disjoint(tmp_path):
    write_task(tmp_path, "sst2", n=40)
    a = glue_task("sst2", tmp_path, shots=5, seed=1, held_out=10)
    b = glue_task("sst2", tmp_path, shots=5, seed=1, held_out=10)
    c = glue_task("sst2", tmp_path, shots=5, seed=2, held_out=10)
    assert a.splits["train"].inputs == b.splits["train"].inputs != c.splits["train"].inputs
    assert len(a.splits["train"]) == 5
    assert not set(a.splits["train"].inputs) & set(a.splits["val"].inputs)


def test_bad_glue_files_name_file_line_and_fix(tmp_path):
    write_task(tmp_path, "rte")
    path = tmp_path / "RTE" / "dev.tsv"
    path.write_text(path.read_text().replace("not_entailment", "maybe", 1))
    with pytest.raises(PetlError, match=r"dev.tsv:\d+: unknown label 'maybe'"):
        glue_task("rte", tmp_path, held_out=4)
    (tmp_path / "RTE" / "train.tsv").write_text("index\tpremise\tlabel\n")
    with pytest.raises(PetlError, match="no column 'sentence1'"):
        glue_task("rte", tmp_path, held_out=4)
    with pytest.raises(PetlError, match="no GLUE file"):
        glue_task("cola", tmp_path)


def test_train_and_eval_a_glue_task_from_the_cli(tmp_path, capsys):
    import json

    from transformers import AutoTokenizer, BertConfig, BertModel

    from petlkit.backbones.registry import minilm_path
    from petlkit.cli import main

    backbone = tmp_path / "tiny-bert"  # a transformers folder: the same path a user's model takes
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37)  # fmt: skip
    BertModel(config, add_pooling_layer=False).save_pretrained(backbone)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(backbone)
    write_task(tmp_path / "glue", "mrpc", n=1010)
    out = tmp_path / "run"
    args = ["train", "--backbone", str(backbone), "--method", "unipelt-prompt", "--task",
            "glue-mrpc", "--data-dir", str(tmp_path / "glue"), "--steps", "2", "--batch-size", "4",
            "--output", str(out), "--method-arg", "prefix_hidden=8"]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) == {"f1", "accuracy"}
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == results["test"]
