"""The command line and the here-scale text data."""

from __future__ import annotations

from petlkit.cli import main
from petlkit.data.rotten_tomatoes import load_rotten_tomatoes


def test_params_prints_a_row_per_method(capsys):
    assert main(["params", "--backbone", "vit-tiny", "--methods", "lora", "sas"]) == 0
    out = capsys.readouterr().out
    assert "| lora | 73,728 | 1.3346 % |" in out  # 12 blocks · (q, v) · r 8 · (192 in + 192 out)
    assert "| sas | 10,224 | 0.1851 % |" in out


def test_method_args_reach_the_config(capsys):
    argv = ["params", "--backbone", "vit-tiny", "--methods", "sas", "--method-arg", "shared=false"]
    assert main(argv) == 0
    assert "| sas | 7,152 |" in capsys.readouterr().out


def test_bad_input_is_one_clear_line(capsys):
    assert main(["params", "--backbone", "vit-huge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("petlkit: error: unknown backbone 'vit-huge'") and err.count("\n") == 1
    assert main(["params", "--backbone", "vit-tiny", "--methods", "lora", "--method-arg", "r"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err


def test_rotten_tomatoes_splits_are_fixed_and_disjoint():
    data = load_rotten_tomatoes()
    assert {k: len(v) for k, v in data.items()} == {"train": 9752, "val": 1000, "test": 2000}
    assert set(data["test"].texts).isdisjoint(data["train"].texts)
    assert load_rotten_tomatoes()["test"].texts == data["test"].texts
    assert sum(data["train"].labels) / len(data["train"]) > 0.5  # fresh is the majority
