"""`petlkit bench`: the grid runs every cell once, resumes, and reports tables, plots and goals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import petlkit
from petlkit.bench import MethodEntry, cells, read_records, run_grid, write_report
from petlkit.bench import grid as grid_module
from petlkit.bench.grid import ZERO_SHOT, GridRunner, units
from petlkit.bench.presets import PRESETS, get_presets, narrowed
from petlkit.bench.tasks import TaskCache
from petlkit.cli import main
from petlkit.errors import ConfigError, PetlError
from petlkit.methods.prompt import text_init_args
from petlkit.tasks import load_task
from petlkit.tasks.base import Split
from petlkit.train.trainer import Trainer
from tests.helpers import tiny_preset


def test_grid_runs_every_cell_once_then_skips_them(tiny_vit_file, tmp_path, monkeypatch):
    preset = tiny_preset(tiny_vit_file)
    records = run_grid(preset, tmp_path, log=lambda _: None)
    assert len(cells(preset)) == 2 * 3 * 2 + 2 * 1 * 2 == len(records)
    assert {r["cell"] for r in records} == {c.key for c in cells(preset)}
    by_cell = {r["cell"]: r for r in records}
    sas = by_cell["digits--sas--seed0"]
    assert 0.0 <= sas["score"] <= 1.0 and sas["trainable"] > 0 and sas["steps"] == 3
    assert set(sas["dg"]) == {"shapes-count"}  # trained on digits, scored on the other task
    assert by_cell["digits-2shot--sas--seed1"]["shots"] == 2
    assert by_cell["digits--linear--seed0"]["trainable"] == 0
    assert not list(tmp_path.glob("cells/*/*.safetensors"))  # large files removed
    trials = read_records(tmp_path, "selection.jsonl")
    assert len(trials) == len(units(preset)) * 3  # no edge widening asked for: widen=0

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell or selection run ran again")

    monkeypatch.setattr(GridRunner, "run_cell", refuse)
    monkeypatch.setattr(GridRunner, "trial", refuse)
    assert len(run_grid(preset, tmp_path, log=lambda _: None)) == len(records)


def test_every_record_says_how_its_rate_was_chosen(tiny_vit_file, tmp_path):
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), shots=(), dg={},
                                 tasks={"digits": "natural-like"})  # fmt: skip
    records = run_grid(preset, tmp_path, log=lambda _: None)
    trials = {(r["method"], r["lr"]): r for r in read_records(tmp_path, "selection.jsonl")}
    for r in records:
        assert r["grid"] == sorted(lr for m, lr in trials if m == r["method"])
        assert r["lr"] in r["grid"] and r["steps"] == 3 and r["selection_seed"] == 0
        # the choice is the best validation score of the grid (the lower rate on a tie)
        vals = {lr: trials[(r["method"], lr)]["val"] for lr in r["grid"]}
        assert r["val_at_choice"] == max(vals.values())
        assert r["lr"] == min(lr for lr, v in vals.items() if v == r["val_at_choice"])
        assert r["curve"] and r["curve"][-1][0] == 3  # the validation curve of the run
    seed0 = {r["method"]: r for r in records if r["seed"] == 0}
    for method, r in seed0.items():  # the seed-0 cell is the chosen selection run itself
        assert r["val"] == trials[(method, r["lr"])]["val"]


def test_cells_train_at_the_chosen_rate_on_their_own_sample(tiny_vit_file, tmp_path, monkeypatch):
    """What each cell's trainer really got: the rate chosen on validation (the method's default
    `lr` is outside the grid here, so a fallback to it shows), and for a few-shot cell the K
    examples drawn with its own seed (seed 0's are the ones its rate was chosen on)."""
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), tasks={"digits": "natural-like"},
                                 methods={"sas": MethodEntry("sas", lr=1e-2, lrs=(1e-3, 3e-2))},
                                 dg={})  # fmt: skip
    seen = {}
    original_init = Trainer.__init__

    def spy(self, model, task, config, output_dir=None, *args, **kwargs):
        if output_dir is not None:
            sample = task.splits["train"].inputs.sum().item()
            seen[Path(output_dir).name] = (config.lr, config.seed, sample)
        original_init(self, model, task, config, output_dir, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", spy)
    records = run_grid(preset, tmp_path, log=lambda _: None)
    trained = [r for r in records if r["cell"] in seen]  # seeds 1: seed 0 is the chosen trial
    assert trained and all(seen[r["cell"]][:2] == (r["lr"], r["seed"]) for r in trained)
    assert {r["lr"] for r in records} <= {1e-3, 3e-2}
    for shots in (1, 2):
        seed1 = seen[f"digits-{shots}shot--sas--seed1"][2]
        select = {v[2] for k, v in seen.items() if k.startswith(f"select--digits-{shots}shot")}
        assert len(select) == 1 and seed1 not in select  # seed 1 drew other examples


def test_dg_targets_are_scored_on_their_own_test_split(tiny_vit_file, tmp_path):
    """Scored on the source task itself, a target gives the cell's own test score; the shifted
    copy gives another."""
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0,), shots=(),
                                 tasks={"digits": "natural-like"},
                                 methods={"lora": MethodEntry("lora", {"r": 2}, 1e-2)},
                                 dg={"digits": ("digits", "digits:invert")})  # fmt: skip
    [record] = run_grid(preset, tmp_path, log=lambda _: None)
    assert record["dg"]["digits"] == record["score"]
    assert record["dg"]["digits:invert"] != record["score"]


def test_selection_never_reads_test_data(tiny_vit_file, tmp_path, monkeypatch):
    """Selection runs see a task without its test split, every test evaluation of a (task,
    method) comes after its choice is recorded, and poisoned test labels change no choice."""
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0, 1), shots=(1,), dg={})
    order = []
    original_init, original_evaluate = Trainer.__init__, Trainer.evaluate

    def spy_init(self, model, task, config, output_dir=None, *args, **kwargs):
        if output_dir is not None and "select--" in str(output_dir):
            assert "test" not in task.splits, "a selection run was given the test split"
        original_init(self, model, task, config, output_dir, *args, **kwargs)

    def spy_evaluate(self, split_name="val"):
        if split_name == "test":
            chosen = {r["unit"] for r in read_records(tmp_path / "clean", "selection.jsonl")}
            order.append((self.task.name, len(chosen)))
        return original_evaluate(self, split_name)

    monkeypatch.setattr(Trainer, "__init__", spy_init)
    monkeypatch.setattr(Trainer, "evaluate", spy_evaluate)
    clean = run_grid(preset, tmp_path / "clean", log=lambda _: None)
    assert order and order[0][1] == 1  # the first test score waits for the first unit's choice

    original_get = grid_module.TaskCache.get

    def poisoned(self, *args, **kwargs):
        task = original_get(self, *args, **kwargs)
        test = task.splits["test"]
        flipped = Split(test.inputs, (test.labels + 1) % task.num_labels)
        return dataclasses.replace(task, splits={**task.splits, "test": flipped})

    monkeypatch.setattr(grid_module.TaskCache, "get", poisoned)
    dirty = run_grid(preset, tmp_path / "dirty", log=lambda _: None)
    assert [(r["cell"], r["lr"], r["val"]) for r in dirty] == [
        (r["cell"], r["lr"], r["val"]) for r in clean
    ]
    assert [r["score"] for r in dirty] != [r["score"] for r in clean]  # the poison was read


def test_widening_and_divergence_in_a_real_grid(tiny_vit_file, tmp_path, monkeypatch):
    """A grid whose validation score keeps rising with the rate tries more rates, records the
    edge, and a run that diverges is kept as diverged rather than stopping the grid."""
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0,), shots=(), dg={},
                                 tasks={"digits": "natural-like"}, widen=1,
                                 methods={"sas": MethodEntry("sas", lr=1e-2)})  # fmt: skip
    original = GridRunner.trial

    def rigged(self, unit, lr):
        record = original(self, unit, lr)
        if lr > 2e-2:
            record["val"] = None  # as if the loss had become NaN
        else:
            record["val"] = lr  # higher is better, up to the divergence
        return record

    monkeypatch.setattr(GridRunner, "trial", rigged)
    [record] = run_grid(preset, tmp_path, log=lambda _: None)
    assert record["grid"] == [3e-3, 1e-2, 3e-2] and record["lr"] == 1e-2
    assert record["edge"] is None  # the rate above it was tried (and diverged)
    trials = read_records(tmp_path, "selection.jsonl")
    assert [t["val"] for t in trials if t["lr"] == 3e-2] == [None]


def test_the_retrain_rule_trains_every_seed_on_train_and_val(tiny_vit_file, tmp_path, monkeypatch):
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0,), shots=(), dg={},
                                 tasks={"digits": "natural-like"}, selection="retrain",
                                 methods={"sas": MethodEntry("sas", lr=1e-2)})  # fmt: skip
    sizes = []
    original_init = Trainer.__init__

    def spy(self, model, task, config, output_dir=None, *args, **kwargs):
        if output_dir is not None:
            sizes.append(("select" in str(output_dir), len(task.splits["train"])))
        original_init(self, model, task, config, output_dir, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", spy)
    [record] = run_grid(preset, tmp_path, log=lambda _: None)
    assert sizes == [(True, 800)] * 3 + [(False, 1000)]  # VTAB-1k: 800 + 200
    assert record["selection"] == "retrain"


def test_low_resource_samples_train_and_val_from_the_training_split():
    preset = dataclasses.replace(PRESETS["text-lowres"], backbone="vit-tiny")
    cache = TaskCache(preset, None)
    full = load_task("sentiment-products-binary")
    texts = set(full.splits["train"].inputs)
    a, b = cache.get("sentiment-products-binary", size=100, seed=0), cache.get(
        "sentiment-products-binary", size=100, seed=1)  # fmt: skip
    assert len(a.splits["train"]) == 100 and len(a.splits["val"]) == preset.size_val
    assert set(a.splits["train"].inputs) | set(a.splits["val"].inputs) <= texts
    assert not set(a.splits["train"].inputs) & set(a.splits["val"].inputs)
    assert set(a.splits["train"].inputs) != set(b.splits["train"].inputs)  # seed-dependent
    assert a.splits["test"].labels.tolist() == b.splits["test"].labels.tolist()
    with pytest.raises(PetlError, match="fewer than K = 5000"):
        cache.get("sentiment-products-binary", size=5000, seed=0)


def test_fewshot_and_dg_sections_and_plots(tiny_vit_file, tmp_path):
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0,),
                                 dg={"digits": ("shapes-count", "digits:rotate")})  # fmt: skip
    text = write_report(run_grid(preset, tmp_path, log=lambda _: None), tmp_path, "tiny")
    assert "## Few-shot" in text and "| sas |" in text.split("## Few-shot")[1]
    dg = text.split("## Domain generalisation")[1]
    assert "→ shapes-count" in dg and "→ digits:rotate" in dg and "digits → mean of 2" in dg
    assert (tmp_path / "fewshot.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_a_fewshot_only_preset_trains_no_full_data_cell(tiny_vit_file, tmp_path):
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0,), main=False)
    assert {(u.task, u.method, u.shots) for u in units(preset)} == {
        ("digits", "sas", 1), ("digits", "sas", 2)}  # fmt: skip
    records = run_grid(preset, tmp_path, log=lambda _: None)
    assert sorted(r["shots"] for r in records) == [1, 2]
    text = write_report(records, tmp_path, "tiny")
    assert "## Few-shot" in text and "## Test scores" not in text
    assert not (tmp_path / "main.csv").exists()
    assert PRESETS["vision-fewshot"].main is False and PRESETS["vision-fewshot"].shots


def test_few_shot_cells_are_scored_at_least_five_times_whatever_the_main_cadence(
        tiny_vit_file, tmp_path):  # fmt: skip
    """A preset whose full-data cells validate every 60 steps still gives its 10-step few-shot
    cells a curve of five points, so the report can tell a plateau from a rise."""
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0,), main=False, shots=(1,),
                                 train=dict(steps=60, batch_size=8, eval_every=60,
                                            checkpoint_every=0), fewshot_steps=10)  # fmt: skip
    (record,) = run_grid(preset, tmp_path, log=lambda _: None)
    assert record["steps"] == 10 and [step for step, _ in record["curve"]] == [2, 4, 6, 8, 10]


def test_few_shot_schedules_can_differ_per_k_and_a_folder_keeps_its_own(tiny_vit_file, tmp_path):
    """vision-fewshot trains 16-shot cells longer than 1-8-shot ones; each record says its own
    schedule, and a folder run with another schedule for a K is refused, not mixed."""
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0,), main=False, shots=(1, 2),
                                 fewshot_steps={1: 4, 2: 6})  # fmt: skip
    records = run_grid(preset, tmp_path, log=lambda _: None)
    assert {r["shots"]: r["steps"] for r in records} == {1: 4, 2: 6}
    longer = dataclasses.replace(preset, fewshot_steps={1: 4, 2: 8})
    with pytest.raises(PetlError, match="2shot--sas--seed0 ran 6 steps, this preset runs 8"):
        run_grid(longer, tmp_path, log=lambda _: None)
    with pytest.raises(ConfigError, match="no schedule for \\[2\\] shots"):
        dataclasses.replace(preset, fewshot_steps={1: 4})
    assert PRESETS["vision-fewshot"].steps_for(16) == 300
    assert PRESETS["vision-fewshot"].steps_for(8) == 100


def test_presets_name_their_problems():
    with pytest.raises(ConfigError, match="valid presets: .*text-here"):
        get_presets("txt-here")
    assert [p.name for p in get_presets("quick")] == ["quick-text", "quick-vision"]
    with pytest.raises(ConfigError, match="unknown methods \\['lorra'\\]"):
        narrowed(PRESETS["text-here"], methods=["lorra"])
    with pytest.raises(PetlError, match="--data-dir"):
        run_grid(PRESETS["vtab1k"], "unused")


def test_steps_set_the_schedule_of_few_shot_cells_too():
    """`bench --preset vision-fewshot --steps 300` trains its few-shot cells 300 steps (the
    preset's own few-shot schedule would otherwise win silently)."""
    longer = narrowed(PRESETS["vision-fewshot"], steps=300)
    assert longer.fewshot_steps == 300 and longer.train["steps"] == 300
    assert narrowed(PRESETS["vision-here"], steps=50).fewshot_steps is None


def test_sizes_narrow_a_low_resource_grid_to_some_k():
    """`bench --sizes 100` runs only the K = 100 cells of text-lowres; a K the preset lacks, or
    --sizes on a preset without sizes, is refused with the valid choices."""
    lowres = PRESETS["text-lowres"]
    small = narrowed(lowres, sizes=[100], tasks=["rotten-tomatoes"])
    assert {c.size for c in cells(small)} == {100}
    assert len(cells(small)) == len(lowres.methods) * len(lowres.seeds)
    with pytest.raises(ConfigError, match="sizes \\[50\\].*valid: \\[100, 500, 1000\\]"):
        narrowed(lowres, sizes=[50])
    with pytest.raises(ConfigError, match="it has none"):
        narrowed(PRESETS["text-here"], sizes=[100])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_entry_builds_and_attaches(name, bert_case, vit_case):
    """Each column of every preset is a registered method with valid arguments that attaches to
    a backbone of the preset's modality (a typo in a preset fails here, not hours into a grid);
    few-shot columns and domain-generalisation tasks name things the preset has."""
    preset = PRESETS[name]
    vision = preset.image_size != 224 or "vit" in preset.backbone
    case = vit_case if vision else bert_case
    for label, entry in preset.methods.items():
        if entry.method == ZERO_SHOT:  # the base model as it is: nothing to attach
            continue
        # a prompt's start given as text: placeholder ids here (the run's tokenizer gives them)
        config = petlkit.make_config(entry.method, **text_init_args(entry.args, None))
        petl = petlkit.attach(case.make(), config)
        assert petl.trainable_parameters().trainable >= 0, label
        assert entry.lr > 0
    assert set(preset.fewshot_methods) <= set(preset.methods)
    assert set(preset.fewshot_tasks) <= set(preset.tasks)
    assert set(preset.dg) <= set(preset.tasks)


def test_bench_command_prints_the_table(tiny_vit_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny", tiny_preset(tiny_vit_file))
    assert main(["bench", "--preset", "tiny", "--output", str(tmp_path), "--methods", "sas",
                 "--tasks", "digits", "--seeds", "0"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "| sas |" in out and len(read_records(tmp_path)) == 1 + 2  # main + few-shot cells
    assert main(["bench", "--preset", "tiny", "--output", str(tmp_path), "--report-only"]) == 0
    assert json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])["method"] == "sas"
    assert "these cells ran" not in (tmp_path / "report.md").read_text()
    preset = tiny_preset(tiny_vit_file)
    longer = dataclasses.replace(preset, train={**preset.train, "steps": 6})
    monkeypatch.setitem(PRESETS, "tiny", longer)  # the preset changed since the cells ran
    assert main(["bench", "--preset", "tiny", "--output", str(tmp_path), "--report-only"]) == 0
    assert (
        "these cells ran 3 steps; the preset now trains 6" in (tmp_path / "report.md").read_text()
    )


def test_an_untrained_baseline_is_not_another_schedule():
    """Zero-shot cells train 0 steps by design: a report whose trained cells all ran the preset's
    schedule carries no note that they ran another one."""
    from petlkit.bench.command import _other_schedule

    cells = [{"method": "zero-shot", "steps": 0, "shots": None},
             {"method": "lora", "steps": 100, "shots": None}]  # fmt: skip
    assert _other_schedule(cells, 100) == ""
    assert "ran 50 and 100 steps" in _other_schedule([*cells, {"steps": 50, "shots": None}], 100)


def test_a_preset_run_at_other_steps_says_so_in_its_reports_title(tmp_path):
    """`--steps` overrides the schedule the preset's description names: the report's title (and
    its plots') says what the cells ran (here the committed 200-step products grid)."""
    from petlkit.bench.command import run_bench

    source = Path(__file__).resolve().parents[1] / "results" / "lm-products-200steps"
    for name in ("results.jsonl", "selection.jsonl"):
        (tmp_path / name).write_text((source / name).read_text())
    text = run_bench("lm-here-products", tmp_path, report_only=True, steps=200)
    title = text.splitlines()[0]
    assert "100 steps of batch 8" in title  # the preset's description
    assert title.endswith("Run at 200 steps (--steps), not the 100 the description above names")
    assert (tmp_path / "report.md").read_text().splitlines()[0] == title
    plain = run_bench("lm-here-products", tmp_path, report_only=True)  # as described: no note
    assert "Run at" not in plain.splitlines()[0]
