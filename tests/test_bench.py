"""`petlkit bench`: the grid runs every cell once, resumes, and reports tables, plots and goals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import petlkit
from petlkit.backbones.vit import VisionTransformer, ViTConfig
from petlkit.backbones.vit_weights import save_vit
from petlkit.bench import MethodEntry, Preset, cells, read_records, run_grid, write_report
from petlkit.bench import grid as grid_module
from petlkit.bench.presets import PRESETS, get_presets, narrowed
from petlkit.bench.report import Summary, goals, main_rows
from petlkit.cli import main
from petlkit.errors import ConfigError, PetlError


@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory):
    """A small 28-px grey ViT file standing in for the shipped one."""
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32,
                    depth=2, num_heads=2)  # fmt: skip
    path = tmp_path_factory.mktemp("vit") / "tiny.safetensors"
    save_vit(VisionTransformer(cfg), path)
    return str(path)


def tiny_preset(backbone: str) -> Preset:
    return Preset(
        "tiny", backbone, {"digits": "natural-like", "shapes-count": "structured"},
        {"linear": MethodEntry("linear", lr=1e-2), "sas": MethodEntry("sas", lr=1e-2),
         "lora": MethodEntry("lora", {"r": 2}, 1e-2)},
        seeds=(0, 1), train=dict(steps=3, batch_size=8, eval_every=0, checkpoint_every=1),
        eval_limit=50, val_limit=50, shots=(1, 2), fewshot_tasks=("digits",),
        fewshot_methods=("sas",),
        dg={"digits": ("shapes-count",)},
    )  # fmt: skip


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
    assert not list(tmp_path.glob("cells/*/checkpoint.safetensors"))  # large files removed

    def refuse(*args):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(grid_module, "run_cell", refuse)
    assert len(run_grid(preset, tmp_path, log=lambda _: None)) == len(records)


def test_a_cell_cut_off_mid_write_runs_again(tiny_vit_file, tmp_path):
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0,), shots=(), dg={},
                                 tasks={"digits": "natural-like"})  # fmt: skip
    records = run_grid(preset, tmp_path, log=lambda _: None)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    with pytest.warns(UserWarning, match="not a whole JSON line"):
        again = run_grid(preset, tmp_path, log=lambda _: None)
    assert sorted(r["cell"] for r in again) == sorted(r["cell"] for r in records)
    assert again[-1]["score"] == records[-1]["score"]  # same seed, same result


def _record(task, method, seed, score, trainable, group="g"):
    return {"cell": f"{task}-{method}-{seed}", "task": task, "group": group, "method": method,
            "seed": seed, "shots": None, "metric": "accuracy", "score": score,
            "trainable": trainable, "percent": trainable / 1e4}  # fmt: skip


def test_report_tables_means_and_goal_checks(tmp_path):
    records = [
        _record("a", "lora", 0, 0.80, 1000), _record("a", "lora", 1, 0.82, 1000),
        _record("b", "lora", 0, 0.60, 1000), _record("b", "lora", 1, 0.60, 1000),
        _record("a", "sas", 0, 0.81, 150), _record("a", "sas", 1, 0.81, 150),
        _record("b", "sas", 0, 0.59, 150), _record("b", "sas", 1, 0.59, 150),
        _record("a", "sas-shared", 0, 0.70, 50), _record("b", "sas-shared", 0, 0.50, 50),
        _record("a", "sas-specific", 0, 0.75, 100), _record("b", "sas-specific", 0, 0.55, 100),
        _record("a", "prompt", 0, 0.90, 10), _record("b", "prompt", 0, 0.60, 10),
        _record("a", "unipelt-prompt", 0, 0.85, 5000), _record("b", "unipelt-prompt", 0, 0.6, 5000),
    ]  # fmt: skip
    summary = Summary(records)
    assert summary.mean("lora") == pytest.approx(70.5)
    header, rows = main_rows(summary)
    assert rows[0][:4] == ["lora", "1,000", "0.100", "81.0 ± 1.4"]
    lines = goals(summary)
    assert lines[0].startswith("SaS within 0.5 points of LoRA") and "met" in lines[0]
    assert "-0.50" in lines[0] or "−0.50" in lines[0] or "-0.5" in lines[0]
    assert "beats each alone: met" in lines[1]
    assert "best single submodule (prompt, 75.00): missed" in lines[2] and "-2.50" in lines[2]
    text = write_report(records, tmp_path, "tiny")
    assert "| lora | 1,000 | 0.100 | 81.0 ± 1.4 |" in text
    assert (tmp_path / "main.csv").read_text().splitlines()[0].startswith("method,trainable")
    assert (tmp_path / "score_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_goal_missed_says_by_how_much():
    records = [_record("a", "lora", 0, 0.80, 1000), _record("a", "sas", 0, 0.78, 100)]
    line = goals(Summary(records))[0]
    assert "missed" in line and "-2.00 points" in line


def test_fewshot_and_dg_sections_and_plots(tiny_vit_file, tmp_path):
    preset = dataclasses.replace(tiny_preset(tiny_vit_file), seeds=(0,))
    text = write_report(run_grid(preset, tmp_path, log=lambda _: None), tmp_path, "tiny")
    assert "## Few-shot" in text and "| sas |" in text.split("## Few-shot")[1]
    assert "## Domain generalisation" in text and "shapes-count" in text
    assert (tmp_path / "fewshot.png").read_bytes()[:4] == b"\x89PNG"


def test_presets_name_their_problems():
    with pytest.raises(ConfigError, match="valid presets: .*text-here"):
        get_presets("txt-here")
    assert [p.name for p in get_presets("quick")] == ["quick-text", "quick-vision"]
    with pytest.raises(ConfigError, match="unknown methods \\['lorra'\\]"):
        narrowed(PRESETS["text-here"], methods=["lorra"])
    with pytest.raises(PetlError, match="--data-dir"):
        run_grid(PRESETS["vtab1k"], "unused")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_entry_builds_and_attaches(name, bert_case, vit_case):
    """Each column of every preset is a registered method with valid arguments that attaches to
    a backbone of the preset's modality (a typo in a preset fails here, not hours into a grid);
    few-shot columns and domain-generalisation tasks name things the preset has."""
    preset = PRESETS[name]
    vision = preset.image_size != 224 or preset.backbone.startswith("vit")
    case = vit_case if vision else bert_case
    for label, entry in preset.methods.items():
        config = petlkit.make_config(entry.method, **entry.args)
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
