"""torch.compile sees every method as one graph: no graph break on petlkit's ViT, a BERT text
classifier or a transformers LLaMA decoder, and the traced graph computes the eager outputs
(backend aot_eager: dynamo's capture and AOT autograd's, without inductor's slow C++ build), and
the compiled training step gives the eager gradients. With inductor (CPU, C++ build) the same
holds: a slow test."""

from __future__ import annotations

import pytest
import torch

import petlkit
from tests.conftest import tiny_bert_case, tiny_vit_case
from tests.families import BY_NAME
from tests.test_families import expected_refusal
from tests.test_methods_generic import CONFIGS, VISION_ONLY

CASES = {"tiny-vit": tiny_vit_case, "tiny-bert": tiny_bert_case}
CELLS = [(c, m) for c in (*CASES, "llama") for m in sorted(CONFIGS)
         if (m not in VISION_ONLY or c == "tiny-vit")
         and not (c == "llama" and expected_refusal("llama", m))]  # fmt: skip


def _model_and_inputs(case: str, method: str):
    if case == "llama":
        return petlkit.attach(BY_NAME["llama"].make(), method, **CONFIGS[method]), BY_NAME[
            "llama"
        ].inputs()
    built = CASES[case]()
    return petlkit.attach(built.make(), method, **CONFIGS[method]), built.inputs


def _tensor(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _grads(petl, inputs, forward) -> dict[str, torch.Tensor]:
    petl.zero_grad(set_to_none=True)
    _tensor(forward(**inputs)).float().square().mean().backward()
    return {n: p.grad.clone() for n, p in petl.named_parameters() if p.grad is not None}


def _same_step(petl, inputs, backend: str, tol: float) -> None:
    with torch.no_grad():
        eager = _tensor(petl(**inputs))
        compiled = torch.compile(petl, backend=backend, fullgraph=True)
        torch.testing.assert_close(_tensor(compiled(**inputs)), eager, rtol=tol, atol=tol)
    want, got = _grads(petl, inputs, petl), _grads(petl, inputs, compiled)
    assert want and got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=tol, atol=tol, msg=name)


LLAMA_DEFAULT = ("lora", "unipelt")  # the decoder's own paths: LoRA's, the joint q, k, v node


def _marked(cell: tuple[str, str]):
    """A LLaMA cell beyond LLAMA_DEFAULT is slow (about 6 s each on 2 cores; the acceptance asks
    for every method on the ViT and the encoder, which run by default)."""
    slow = cell[0] == "llama" and cell[1] not in LLAMA_DEFAULT
    return pytest.param(*cell, id="-".join(cell), marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize(("case", "method"), [_marked(c) for c in CELLS])
def test_every_method_compiles_to_one_graph(case, method):
    petl, inputs = _model_and_inputs(case, method)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(petl)(**inputs)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    _same_step(petl, inputs, "aot_eager", 1e-5)


INDUCTOR_CELLS = [(c, m) for c, m in CELLS if c != "llama"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "method"), INDUCTOR_CELLS, ids=["-".join(c) for c in INDUCTOR_CELLS]
)
def test_every_method_trains_the_same_compiled_by_inductor(case, method):
    petl, inputs = _model_and_inputs(case, method)
    torch._dynamo.reset()
    _same_step(petl, inputs, "inductor", 1e-4)
