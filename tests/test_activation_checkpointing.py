"""Activation checkpointing (`TrainConfig.activation_checkpointing`, the task models'
`set_activation_checkpointing`): the same gradients as without, for methods that act through
wrappers, hooks and extra tokens, and through the trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import petlkit
from petlkit.tasks import load_task
from petlkit.train.config import TrainConfig
from petlkit.train.trainer import Trainer
from tests.conftest import CASES
from tests.test_methods_generic import CONFIGS

METHODS = ["lora", "sas", "prefix", "adapter", "unipelt-prompt", "vpt", "full"]
PAIRS = [
    (c, m) for c in ("tiny-vit", "tiny-bert") for m in METHODS if c == "tiny-vit" or m != "vpt"
]


def _grads(case, method: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    petl = petlkit.attach(case.make(), method, **CONFIGS[method]).train()
    for module in petl.modules():  # dropout off: the recomputed forward must be the same
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    petl.model.set_activation_checkpointing(checkpointing)
    F.cross_entropy(petl(**case.inputs), case.labels).backward()
    return {n: p.grad.clone() for n, p in petl.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("case_name", "method"), PAIRS, ids=["-".join(p) for p in PAIRS])
def test_checkpointing_gives_the_same_gradients(case_name, method):
    case = CASES[case_name]()
    plain, recomputed = _grads(case, method, False), _grads(case, method, True)
    assert plain.keys() == recomputed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_trainer_switch_trains_the_same_as_without():
    from petlkit.backbones import vit

    finals = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = vit("vit_tiny", img_size=8, patch_size=2, in_chans=1, depth=2, embed_dim=32,
                    num_heads=2, num_classes=10)  # fmt: skip
        petl = petlkit.attach(model, "sas")
        cfg = TrainConfig(steps=3, batch_size=16, eval_every=0, checkpoint_every=0, lr=1e-2,
                          activation_checkpointing=checkpointing)  # fmt: skip
        Trainer(petl, load_task("digits"), cfg, progress=False).fit()
        assert petl.model.grad_checkpointing is checkpointing
        finals.append(
            {n: p.detach().clone() for n, p in petl.named_parameters() if p.requires_grad}
        )
    for name, value in finals[0].items():
        torch.testing.assert_close(finals[1][name], value, rtol=1e-5, atol=1e-6, msg=name)
