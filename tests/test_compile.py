"""torch.compile sees every method as one graph: no graph break on petlkit's ViT, a BERT text
classifier or a transformers LLaMA decoder, and the traced graph computes the eager outputs
(backend aot_eager: dynamo's capture and AOT autograd's, without inductor's slow C++ build)."""

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


@pytest.mark.parametrize(("case", "method"), CELLS, ids=["-".join(c) for c in CELLS])
def test_every_method_compiles_to_one_graph(case, method):
    petl, inputs = _model_and_inputs(case, method)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(petl)(**inputs)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    with torch.no_grad():
        eager = _tensor(petl(**inputs))
        compiled = _tensor(torch.compile(petl, backend="aot_eager", fullgraph=True)(**inputs))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
