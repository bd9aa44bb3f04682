"""Weights from a downloaded file can never run code: only safetensors is read, and a pickle that
would execute something is refused without executing it."""

from __future__ import annotations

import pickle

import pytest

import petlkit
from petlkit.errors import CheckpointError, PetlError
from petlkit.train.state import load_training_state


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _evil(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Payload(marker)))


def test_a_pickle_posing_as_an_adapter_is_refused_unrun(bert_case, tmp_path):
    marker = tmp_path / "owned"
    model = petlkit.attach(bert_case.make(), "lora", r=2)
    petlkit.save_adapter(model, tmp_path / "adapter")
    _evil(tmp_path / "adapter" / "adapter_model.safetensors", marker)
    with pytest.raises(CheckpointError):
        petlkit.load_adapter(bert_case.make(), tmp_path / "adapter")
    assert not marker.exists()


def test_a_pickled_vit_checkpoint_is_refused_with_the_conversion_hint(tmp_path):
    marker = tmp_path / "owned"
    _evil(tmp_path / "vit.pth", marker)
    with pytest.raises(PetlError, match="never unpickles weights"):
        petlkit.build_model(str(tmp_path / "vit.pth"), 10)
    assert not marker.exists()


def test_a_pickle_posing_as_a_training_checkpoint_is_refused_unrun(tmp_path):
    marker = tmp_path / "owned"
    _evil(tmp_path / "checkpoint.safetensors", marker)
    with pytest.raises(CheckpointError):
        load_training_state(tmp_path / "checkpoint.safetensors", {}, None)
    assert not marker.exists()


def test_the_payload_is_live(tmp_path):
    """The control: unpickling the same bytes does run the command."""
    marker = tmp_path / "owned"
    _evil(tmp_path / "evil.pkl", marker)
    pickle.loads((tmp_path / "evil.pkl").read_bytes())  # noqa: S301 - deliberately, in a test
    assert marker.exists()
