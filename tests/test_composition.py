"""Two methods on one model, in every order: each wraps what it was given (inner to outer) and
merges and unmerges in order; pairs whose math cannot share a module are refused in one line
naming both, and the refusal leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import petlkit
from petlkit.methods.base import Tuner
from tests.conftest import CASES
from tests.test_methods_generic import CONFIGS, VISION_ONLY

# Extension points only one method can hold: extra key/value tokens per attention (prefix), and
# the token sequence (prompts). Two methods that both need one of them are refused.
EXCLUSIVE = (
    {"prefix", "unipelt", "unipelt-ap", "unipelt-prompt"},
    {"prompt", "vpt", "unipelt-prompt"},
)
PAIRS = [
    (case, first, second)
    for case in ("tiny-vit", "tiny-bert")
    for first in sorted(CONFIGS)
    for second in sorted(CONFIGS)
    if case == "tiny-vit" or not ({first, second} & VISION_ONLY)
]


def _refused(first: str, second: str) -> bool:
    return any(first in group and second in group for group in EXCLUSIVE)


def _backbone_output(case, petl) -> torch.Tensor:
    reference = case.make()
    reference.head.load_state_dict(petl.model.head.state_dict())
    with torch.no_grad():
        return reference(**case.inputs)


@pytest.mark.parametrize(("case_name", "first", "second"), PAIRS, ids=["-".join(p) for p in PAIRS])
def test_two_methods_on_one_model(case_name, first, second):
    case = CASES[case_name]()
    petl = petlkit.attach(case.make(), first, **CONFIGS[first])
    if _refused(first, second):
        with torch.no_grad():
            before = petl(**case.inputs)
        with pytest.raises(petlkit.PetlError) as refusal:
            petl.add_method(petlkit.make_config(second, **CONFIGS[second]), name="second")
        message = str(refusal.value)
        assert f"({first})" in message and f"({second})" in message and "\n" not in message
        assert list(petl.methods) == ["default"]
        with torch.no_grad():
            torch.testing.assert_close(petl(**case.inputs), before, rtol=0, atol=0)
        return
    petl.add_method(petlkit.make_config(second, **CONFIGS[second]), name="second")
    petl.set_active("default", "second")
    with torch.no_grad():  # non-zero updates in both methods, so each one shows in the output
        for p in petl.parameters():
            if p.requires_grad and first != "full" and second != "full":
                p.add_(0.05 * torch.randn_like(p))
    logits = petl(**case.inputs)
    F.cross_entropy(logits, case.labels).backward()
    assert all(p.grad is not None for p in petl.parameters() if p.requires_grad)
    petl.eval()
    with torch.no_grad():
        both = petl(**case.inputs)
        with petl.disable():
            torch.testing.assert_close(
                petl(**case.inputs), _backbone_output(case, petl), rtol=0, atol=0
            )
        if all(m.merge_refusal is None for m in petl.methods.values()):
            weights = {k: v.clone() for k, v in petl.model.state_dict().items()}
            petl.merge()
            assert not any(isinstance(m, Tuner) for m in petl.model.modules())
            torch.testing.assert_close(petl(**case.inputs), both, rtol=0, atol=1e-5)
            petl.unmerge()
            for key, value in petl.model.state_dict().items():
                assert torch.equal(value, weights[key]), key
            torch.testing.assert_close(petl(**case.inputs), both, rtol=0, atol=0)
        else:
            with pytest.raises(petlkit.NotMergeableError):
                petl.merge()
        petl.remove_method("second")
        petl.remove_method("default")
        assert not any(isinstance(m, Tuner) for m in petl.model.modules())
        torch.testing.assert_close(
            petl(**case.inputs), _backbone_output(case, petl), rtol=0, atol=0
        )
