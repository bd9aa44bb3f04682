"""Benchmark reports from hand-made records: tables, ranking with ties, the papers' claims,
the convergence line, and one table per low-resource size."""

from __future__ import annotations

import json

import pytest

from petlkit.bench import write_report
from petlkit.bench.claims import claims, task_best_rows
from petlkit.bench.report import (
    collapse_line,
    convergence_line,
    fewshot_edges,
    fewshot_rows,
    main_rows,
    ranking_rows,
    rate_rows,
    variance_note,
)
from petlkit.bench.summary import Summary
from tests.helpers import bench_record as _record


def test_report_tables_ranking_ties_and_claims(tmp_path):
    records = [
        _record("a", "lora", 0, 0.80, 1000), _record("a", "lora", 1, 0.82, 1000),
        _record("b", "lora", 0, 0.60, 1000), _record("b", "lora", 1, 0.60, 1000),
        _record("a", "sas", 0, 0.81, 150), _record("a", "sas", 1, 0.80, 150),
        _record("b", "sas", 0, 0.59, 150), _record("b", "sas", 1, 0.61, 150),
        _record("a", "prompt", 0, 0.60, 10), _record("a", "prompt", 1, 0.62, 10),
        _record("b", "prompt", 0, 0.50, 10, edge="high", lr=3e-3),
        _record("b", "prompt", 1, 0.50, 10, edge="high", lr=3e-3),
        _record("a", "unipelt-prompt", 0, 0.85, 500), _record("a", "unipelt-prompt", 1, 0.87, 500),
        _record("b", "unipelt-prompt", 0, 0.66, 500), _record("b", "unipelt-prompt", 1, 0.66, 500),
    ]  # fmt: skip
    summary = Summary(records)
    assert summary.mean("lora") == pytest.approx(70.5)
    assert summary.overall("lora") == pytest.approx((70.5, 0.7071), abs=1e-3)
    header, rows = main_rows(summary)
    assert rows[0][:4] == ["lora", "1,000", "0.100", "81.0 ± 1.4"]
    _, ranked = ranking_rows(summary)
    assert [row[0] for row in ranked] == ["unipelt-prompt", "lora", "sas", "prompt"]
    assert ranked[0][2] == "best" and ranked[1][2] == "-5.5" and ranked[3][2] == "-20.5"
    lines = claims(summary)
    assert lines[0].startswith("SaS vs LoRA (0.15× LoRA's parameters)") and "tie (-0.2" in lines[0]
    assert "unipelt-prompt vs its best single submodule" in lines[1] and "ahead by 5.5" in lines[1]
    text = write_report(records, tmp_path, "tiny")
    assert "| lora | 1,000 | 0.100 | 81.0 ± 1.4 |" in text
    assert "| prompt | 0.001 | 0.003 (highest tried) | 0.0003, 0.001, 0.003 |" in text
    assert "## Goals" not in text and "## The papers' claims" in text
    assert (tmp_path / "main.csv").read_text().splitlines()[0].startswith("method,trainable")
    assert (tmp_path / "score_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    brief = write_report(records, tmp_path, "tiny", brief=True)  # the demo's: tables only
    assert "## Ranking" in brief and "claims" not in brief and "Convergence" not in brief


def test_claims_are_also_checked_task_by_task_against_the_best_rival_there(tmp_path):
    """A claim that holds on the mean over tasks can hide a task where it fails: each task's
    verdict uses that task's best submodule and the one-std tie rule."""
    scores = {
        "lora": {"a": (0.80, 0.80), "b": (0.70, 0.70), "c": (0.60, 0.62)},
        "adapter": {"a": (0.78, 0.78), "b": (0.74, 0.74), "c": (0.60, 0.60)},
        "unipelt": {"a": (0.81, 0.81), "b": (0.74, 0.76), "c": (0.55, 0.55)},
        "unipelt-prompt": {"a": (0.81, 0.81), "b": (0.75, 0.75), "c": (0.56, 0.56)},
    }
    records = [_record(task, method, seed, score, 100)
               for method, tasks in scores.items() for task, pair in tasks.items()
               for seed, score in enumerate(pair)]  # fmt: skip
    summary = Summary(records)
    unipelt = next(line for line in claims(summary) if line.startswith("unipelt vs"))
    # a: +1.0 over LoRA (both stds 0, ahead); b: +1.0 over the adapter (unipelt's std 1.4,
    # tie); c: -6.0 under LoRA (behind)
    assert ("per task: ahead 1, tie 1, behind 1 of 3, higher mean on 2, mean difference -1.3 "
            "(a +1.0 (lora); b +1.0 (adapter); c -6.0 (lora))") in unipelt  # fmt: skip
    prompt = next(line for line in claims(summary) if line.startswith("the prompt layer"))
    assert "per task: ahead 1, tie 2, behind 0 of 3, higher mean on 1" in prompt
    assert "(a +0.0; b +0.0; c +1.0)" in prompt  # one rival: no name per task
    header, rows = task_best_rows(summary)
    assert header[1:] == ["best mean on", "best or tied (within one std) on"]
    # best: a unipelt (81; unipelt-prompt's equal 81 ties), b unipelt (75 ± 1.4, so the
    # adapter's 74 ties), c lora (61 ± 1.4, so the adapter's 60 ties)
    assert rows == [
        ["unipelt", "2 of 3", "2 of 3"],
        ["adapter", "0 of 3", "2 of 3"],
        ["unipelt-prompt", "0 of 3", "2 of 3"],
        ["lora", "1 of 3", "1 of 3"],
    ]
    text = write_report(records, tmp_path, "tiny")
    assert "## Best per task" in text and "| unipelt | 2 of 3 | 2 of 3 |" in text
    one_task = Summary([r for r in records if r["task"] == "a"])
    assert all("per task" not in line for line in claims(one_task))


def test_each_unipelt_variant_is_held_against_its_own_submodules():
    """UniPELT-AP against adapter and prefix; UniPELT adds LoRA; UniPELT+prompt adds the prompt
    layer too: here prompt tuning is the best single method, so only UniPELT+prompt meets it."""
    means = {"adapter": 0.70, "prefix": 0.72, "lora": 0.74, "prompt": 0.80,
             "unipelt-ap": 0.75, "unipelt": 0.76, "unipelt-prompt": 0.77}  # fmt: skip
    records = [_record(task, method, seed, mean, 100) for method, mean in means.items()
               for task in ("a", "b") for seed in (0, 1)]  # fmt: skip
    lines = claims(Summary(records))

    def line(variant: str) -> str:
        return next(x for x in lines if x.startswith(f"{variant} vs its best single submodule"))

    assert "vs prefix 72.0" in line("unipelt-ap")
    assert "vs lora 74.0" in line("unipelt")
    assert "vs prompt 80.0" in line("unipelt-prompt") and "behind by 3.0" in line("unipelt-prompt")


def test_a_table_says_which_seeds_it_averages_and_which_methods_have_fewer(tmp_path):
    """A grid cut off part-way (seeds run one after another) must not pass for a finished one."""
    records = [_record("a", "lora", s, 0.8, 10) for s in (0, 1, 2)]
    records += [_record("a", "sas", s, 0.8, 10) for s in (0, 1)]
    text = write_report(records, tmp_path, "tiny")
    assert "mean ± std over seeds 0, 1, 2; so far only: sas 0, 1, each method" in text
    text = write_report(records[:3], tmp_path, "tiny")
    assert "mean ± std over seeds 0, 1, 2, each method" in text


def test_a_zero_shot_baseline_scored_once_is_not_a_short_method(tmp_path):
    """The base model as it is (0 steps) is scored at one seed by design: the table says so and
    does not list it among the methods a cut-off grid left short; a trained method still is."""
    records = [_record("a", "lora", s, 0.8, 10, steps=100) for s in (0, 1, 2)]
    records += [_record("a", "zero-shot", 0, 0.7, 10, steps=0)]
    text = write_report(records, tmp_path, "tiny")
    assert "seeds 0, 1, 2; zero-shot scored once, as it trains nothing, each method" in text
    records += [_record("a", "sas", 0, 0.8, 10, steps=100)]
    text = write_report(records, tmp_path, "tiny")
    assert "zero-shot scored once, as it trains nothing; so far only: sas 0, each" in text


def test_a_task_begun_after_the_others_is_named_with_its_seeds(tmp_path):
    """A method complete on one task and part-way on the next (the grid runs task by task) must
    not pass for complete on both: the short task is named with the seeds it has."""
    records = [_record("a", m, s, 0.8, 10) for m in ("lora", "sas") for s in (0, 1, 2)]
    records += [_record("b", "lora", s, 0.6, 10) for s in (0, 1)]
    records += [_record("b", "sas", 0, 0.6, 10)]
    text = write_report(records, tmp_path, "tiny")
    assert "seeds 0, 1, 2; so far only: lora on b 0, 1; sas on b 0, each method" in text


def test_rate_table_names_each_tasks_grid_where_a_methods_grids_differ():
    records = [_record("a", "lora", 0, 0.8, 10), _record("b", "lora", 0, 0.6, 10, grid=[1e-3]),
               _record("a", "sas", 0, 0.8, 10), _record("b", "sas", 0, 0.6, 10)]  # fmt: skip
    header, rows = rate_rows(records, Summary(records))
    assert header == ["method", "a", "b", "grid tried"]
    assert rows[0][-1] == "a: 0.0003, 0.001, 0.003; b: 0.001"
    assert rows[1][-1] == "0.0003, 0.001, 0.003"


def test_convergence_is_plotted_and_runs_still_rising_are_named(tmp_path):
    flat = [[10, 0.70], [20, 0.80], [30, 0.80], [40, 0.81]]
    rising = [[10, 0.50], [20, 0.60], [30, 0.70], [40, 0.80]]
    # rose for two thirds of the schedule, then flat: plateaued (a halves test would flag +6)
    levelled = [[10, 0.50], [20, 0.60], [30, 0.70], [40, 0.75], [50, 0.76], [60, 0.76]]
    records = [_record("a", "lora", 0, 0.8, 10, curve=flat),
               _record("a", "prompt", 0, 0.7, 10, curve=rising),
               _record("a", "sas", 0, 0.76, 10, curve=levelled)]  # fmt: skip
    text = write_report(records, tmp_path, "tiny")
    assert "2 of 3 seed-0 runs had plateaued" in text and "prompt on a (+20.0)" in text
    assert "sas on a" not in text.split("still rising")[1]
    assert (tmp_path / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_low_resource_report_has_a_table_per_size(tmp_path):
    records = [_record("a", m, s, 0.5 + 0.1 * (m == "lora") + k / 1e4, 10, size=k)
               for k in (100, 500) for m in ("lora", "adapter") for s in (0, 1)]  # fmt: skip
    text = write_report(records, tmp_path, "lowres")
    assert "## Test scores, K = 100" in text and "## Test scores, K = 500" in text
    assert (tmp_path / "main-K100.csv").is_file() and (tmp_path / "main-K500.csv").is_file()


def test_fewshot_table_has_per_task_rows_a_mean_row_and_seed_spread():
    """Few-shot cells give mean ± std per task and K; the mean row's std is over the per-seed
    means across tasks; rates chosen at a grid edge are listed."""
    records = [
        _record("a", "sas", 0, 0.20, 150, shots=1), _record("a", "sas", 1, 0.40, 150, shots=1),
        _record("b", "sas", 0, 0.60, 150, shots=1), _record("b", "sas", 1, 0.60, 150, shots=1),
        _record("a", "sas", 0, 0.50, 150, shots=4, edge="low", lr=1e-3, selection_seed=0),
        _record("a", "sas", 1, 0.50, 150, shots=4, edge="low", lr=1e-3, selection_seed=0),
    ]  # fmt: skip
    header, rows = fewshot_rows(Summary(records))
    assert header == ["method", "task", "1-shot", "4-shot"]
    assert rows == [["sas", "a", "30.0 ± 14.1", "50.0 ± 0.0"], ["sas", "b", "60.0 ± 0.0", "–"],
                    ["sas", "mean", "45.0 ± 7.1", "–"]]  # fmt: skip
    assert fewshot_edges(records) == ("Rates chosen at the edge of their grid: sas on a, 4-shot: "
                                      "0.001 (lowest of 3 tried).")  # fmt: skip
    assert fewshot_edges(records[:4]) is None
    records[0]["curve"] = [[10, 0.1], [20, 0.1], [30, 0.1], [45, 0.2]]  # rising in its last third
    line = convergence_line(records)
    assert line.startswith("0 of 1 seed-0 runs") and "sas on a, 1-shot (+10.0)" in line
    assert "nat" not in line  # accuracy: a point is a percentage point


def test_a_language_model_convergence_line_says_what_a_point_of_loss_is():
    """Perplexity tasks are validated on minus the mean token loss: the 2-point plateau rule is
    in hundredths of a nat there, and the line must say so, not pass it off as accuracy points."""
    curve = [[25, -3.9], [50, -3.8], [75, -3.7], [100, -3.6]]
    records = [_record("a", "lora", 0, 40.0, 10, metric="perplexity", curve=curve)]
    line = convergence_line(records)
    assert "0 of 1" in line and "lora on a (+20.0)" in line
    assert "0.01 nat of validation loss" in line


def test_a_long_figure_title_sits_above_every_panel_title():
    """A preset description wraps to three lines; the plots' title must not cover the panels'
    own titles (it did on vision-b16-cpu's convergence plot)."""
    from petlkit.bench.plots import _figure, suptitle

    plt = _figure()
    fig, axes = plt.subplots(1, 3, figsize=(13.8, 3.6))
    for ax in axes:
        ax.set_title("mnist-5k, 2-shot", fontsize=9)
    suptitle(fig, "a preset description that goes on and on, " * 8)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    top_of_panels = max(ax.title.get_window_extent(renderer).y1 for ax in axes)
    assert fig._suptitle.get_text().count("\n") >= 2
    assert fig._suptitle.get_window_extent(renderer).y0 >= top_of_panels
    plt.close(fig)


def test_a_report_after_a_narrowed_run_keeps_the_presets_method_order(tmp_path):
    """`bench --methods` on a folder holding other methods' cells must not reorder the tables."""
    from petlkit.bench.command import run_bench
    from petlkit.bench.presets import PRESETS

    order = list(PRESETS["text-here"].methods)
    assert order.index("full") < order.index("lora")
    records = [_record("rotten-tomatoes", m, s, 0.7, 10) for m in ("lora", "full") for s in (0, 1)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = run_bench("text-here", tmp_path, report_only=True, methods=["lora"])
    table = text.split("## Test scores")[1].split("## Ranking")[0]
    assert table.index("| full |") < table.index("| lora |")


def test_a_run_whose_validation_falls_far_below_its_best_is_named_with_its_seed():
    """A seed that collapses (here to one class, 52.5 %) hides inside a mean ± std; the report
    names it, any seed, with its best and its last validation score; a run that only wobbles
    by less than COLLAPSE_POINTS is not named."""
    steady = _record("a", "lora", 1, 0.80, 10, curve=[[30, 0.70], [60, 0.78], [90, 0.72]])
    fell = _record("a", "unipelt-prompt", 1, 0.678, 10, size=100,
                   curve=[[30, 0.665], [60, 0.57], [90, 0.525]])  # fmt: skip
    assert collapse_line([steady]) is None
    line = collapse_line([steady, fell])
    assert line.startswith("1 of 2 runs fell away")
    assert "unipelt-prompt on a, K = 100, seed 1 (66.5 at step 30, 52.5 at 90)" in line


def test_the_report_names_a_fallen_run_under_convergence(tmp_path):
    records = [_record("a", "lora", s, 0.80, 10, curve=[[30, 0.7], [60, 0.8]]) for s in (0, 1)]
    records[1]["curve"] = [[30, 0.8], [60, 0.5]]
    text = write_report(records, tmp_path, "t")
    section = text.split("## Convergence")[1].split("##")[0]
    assert "1 of 2 runs fell away" in section and "lora on a, seed 1 (80.0 at step 30" in section


def test_the_demo_says_how_much_its_figures_move_from_its_own_seeds():
    """The demo's closing line: the std over seeds of each cell, averaged (and its largest), as
    the yardstick for a run on another machine; with one seed it cannot measure and says so."""
    records = [
        _record("a", "lora", 0, 0.80, 1000), _record("a", "lora", 1, 0.82, 1000),  # std 1.41
        _record("a", "sas", 0, 0.70, 150), _record("a", "sas", 1, 0.70, 150),  # std 0
        _record("b", "sas", 0, 0.50, 150),  # one seed: no spread to measure
    ]  # fmt: skip
    note = variance_note(records)
    assert "a second seed changes a cell by 0.7 points on average" in note
    assert "up to 1.4)" in note and "we have seen up to 1.8 points" in note
    single = variance_note([_record("a", "lora", 0, 0.80, 1000)])
    assert single.startswith("These figures come from one seed") and "1.8 points" in single
