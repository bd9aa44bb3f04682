"""SQuAD 1.1 reader on a fixture in the official JSON layout; official EM/F1 by hand."""

from __future__ import annotations

import json

import pytest

from petlkit.errors import PetlError
from petlkit.tasks.squad import f1, normalize_answer, read_squad, squad_scores

CONTEXT = "The Eiffel Tower was finished in 1889 in Paris."


def _write(path, answers):
    qas = [{"id": "q1", "question": "When was it finished?", "answers": answers}]
    data = {
        "version": "1.1",
        "data": [{"title": "T", "paragraphs": [{"context": CONTEXT, "qas": qas}]}],
    }
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "raw,normal",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an  apple,  a pear ", "apple pear"),
        ("Theatre", "theatre"),  # 'the' only as a word
        ("U.S.A.", "usa"),
    ],
)
def test_official_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


def test_f1_and_exact_match_by_hand(tmp_path):
    _write(tmp_path / "dev.json", [{"text": "1889", "answer_start": 33},
                                   {"text": "in 1889", "answer_start": 30}])  # fmt: skip
    examples = read_squad(tmp_path / "dev.json")
    assert examples[0].answers == ("1889", "in 1889") and examples[0].context == CONTEXT
    # "finished in 1889": vs "in 1889" precision 2/3, recall 1 → F1 0.8 (the best gold)
    assert f1("finished in 1889", "in 1889") == pytest.approx(0.8)
    scores = squad_scores({"q1": "finished in 1889"}, examples)
    assert scores == {"exact_match": 0.0, "f1": pytest.approx(80.0)}
    assert squad_scores({"q1": "The 1889."}, examples) == {"exact_match": 100.0, "f1": 100.0}
    assert squad_scores({}, examples) == {"exact_match": 0.0, "f1": 0.0}


def test_misplaced_answer_is_reported(tmp_path):
    _write(tmp_path / "dev.json", [{"text": "1889", "answer_start": 3}])
    with pytest.raises(PetlError, match="q1: answer '1889' is not at offset 3"):
        read_squad(tmp_path / "dev.json")
