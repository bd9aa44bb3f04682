"""The bench on language-model tasks: perplexity is lower-better everywhere a grid chooses or
ranks, the zero-shot base is scored once without training, and runs keep their validation-loss
curves (a tiny LLaMA folder with MiniLM's tokenizer, your text-generation files)."""

from __future__ import annotations

import json
import math

import pytest

from petlkit.bench.grid import SELECTION, read_records, run_grid
from petlkit.bench.presets import PRESETS, MethodEntry, Preset, get_presets, narrowed
from petlkit.bench.report import ranking_rows, write_report
from petlkit.bench.summary import Summary
from petlkit.errors import PetlError
from tests.helpers import save_tiny_llama


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-bench"))


@pytest.fixture(scope="module")
def grid(llama_folder, tmp_path_factory):
    data = tmp_path_factory.mktemp("sums")
    rows = [{"prompt": f"{a} plus {a} is", "completion": f" {2 * a}"} for a in range(12)]
    for split in ("train", "val", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preset = Preset(
        "tiny-lm", str(llama_folder), {"text-generation": "sums"},
        {"zero-shot": MethodEntry("zero-shot"), "lora": MethodEntry("lora", lrs=(1e-3, 3e-2)),
         "sas": MethodEntry("sas", lrs=(1e-3, 3e-2))},
        seeds=(0, 1), train=dict(steps=3, batch_size=4, max_length=24, eval_every=1,
                                 eval_batch_size=8), widen=0,
    )  # fmt: skip
    output = tmp_path_factory.mktemp("bench")
    records = run_grid(preset, output, str(data), log=lambda *_: None)
    return preset, output, records


def test_the_zero_shot_base_is_one_untrained_cell(grid):
    preset, output, records = grid
    base = [r for r in records if r["method"] == "zero-shot"]
    assert len(base) == 1 and base[0]["seed"] == 0 and base[0]["steps"] == 0
    assert base[0]["metric"] == "perplexity" and base[0]["grid"] == []
    assert base[0]["trainable"] == 0 and base[0]["percent"] == 0  # it trains nothing
    trials = read_records(output, SELECTION)
    assert {t["method"] for t in trials} == {"lora", "sas"}  # no rate is chosen for it
    assert len(records) == 1 + 2 * 2  # zero-shot once; lora and sas at seeds 0 and 1


def test_a_finished_folder_resumes_for_a_subset_of_its_methods(grid):
    """`bench --methods lora` on a folder that holds the zero-shot base (0 steps) is no other
    schedule: nothing is refused and nothing runs again."""
    preset, output, records = grid
    again = run_grid(narrowed(preset, methods=["lora"]), output, log=lambda *_: None)
    assert [(r["cell"], r["score"]) for r in again] == [(r["cell"], r["score"]) for r in records]


def test_rates_are_chosen_by_the_lowest_validation_perplexity(grid):
    _, output, records = grid
    trials = read_records(output, SELECTION)
    for method in ("lora", "sas"):
        mine = [t for t in trials if t["method"] == method]
        best = max(mine, key=lambda t: t["val"])  # the selection value: minus the log perplexity
        chosen = next(r for r in records if r["method"] == method and r["seed"] == 0)
        assert chosen["lr"] == best["lr"]
        loss = dict(map(tuple, best["loss_curve"]))[best["best_step"]]
        assert best["val"] == pytest.approx(-loss, abs=1e-5)
        assert all(point[1] > 0 for point in best["loss_curve"])  # losses, not scores


def test_a_rerun_skips_everything(grid, llama_folder):
    preset, output, records = grid
    again = run_grid(preset, output, str(output), log=lambda *_: None)  # data no longer read
    assert again == records


def test_tables_rank_the_lowest_perplexity_first(grid):
    _, output, records = grid
    summary = Summary(records)
    assert summary.sign == -1
    _, rows = ranking_rows(summary)
    means = [float(row[1].split(" ")[0]) for row in rows]
    assert means == sorted(means) and rows[0][2] == "best"
    text = write_report(records, output, "tiny")
    assert "| zero-shot |" in text
    assert (output / "validation_loss.png").is_file()


def test_one_table_never_mixes_directions():
    def record(metric, score):
        return {"task": metric, "group": "g", "method": "lora", "seed": 0, "metric": metric,
                "score": score, "trainable": 1, "percent": 0.1}  # fmt: skip

    with pytest.raises(PetlError, match="cannot mix scores where lower is better"):
        Summary([record("perplexity", 3.0), record("accuracy", 0.5)])
    assert Summary([record("accuracy", 0.5)]).sign == 1


def test_the_lm_here_preset():
    parts = get_presets("lm-here")
    assert [p.name for p in parts] == ["lm-here-sentiment", "lm-here-products"]
    for part in parts:
        assert part.backbone == "smollm2-135m"
        assert list(part.methods)[:8] == ["zero-shot", "full", "lora", "prefix", "prompt",
                                          "unipelt", "unipelt-prompt", "sas"]  # fmt: skip
        assert part.seeds == (0, 1, 2) and part.val_limit and part.eval_limit
    assert PRESETS["lm-here-sentiment"].tasks == {"sentiment-gen": "sentiment"}
    # sentiment's extra columns: prompts and a prefix started from a question
    text = {k: (e.method, e.args) for k, e in PRESETS["lm-here-sentiment"].methods.items()
            if k.endswith("-text")}  # fmt: skip
    question = "Is this movie review positive or negative?"
    assert text == {
        "prompt-text": ("prompt", {"length": 10, "init_text": question}),
        "prefix-text": ("prefix", {"length": 10, "reparameterize": False, "init_text": question}),
        "unipelt-prompt-text": ("unipelt-prompt", {"prompt_init_text": question}),
    }
    assert "prompt-text" not in PRESETS["lm-here-products"].methods
    assert math.isclose(PRESETS["lm-here-products"].train["steps"], 100)
