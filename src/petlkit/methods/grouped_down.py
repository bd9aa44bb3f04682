"""Everything UniPELT reads from one block's attention input x, as one autograd node: the LoRA
down-projections x·Aᵀ of q and v (or of a fused q|k|v's parts), each part's gate and the prefix
gate, whose logits are more output columns of the same GEMM.

Outputs: per LoRA member its gated hidden (x·Aᵀ) ⊙ G, (tokens, parts·r), which the member's
up-projection reads (`lora_update.LoRAUp`), then each other gate's value (gate.py's contract:
(batch, outputs), or (batch, tokens, outputs) when causal). Backward: the gates' gradients
through one sigmoid backward, and x's gradient and all the weights' from one GEMM each, where
each member alone forms its own GEMMs, and autograd adds their gradients of x one by one
(issue #47: BERT-base waits on the host, so each ATen call counts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from petlkit.methods.trained_casts import side_by_side


class GroupedDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan: tuple, causal: bool, *tensors):  # noqa: D102 (torch's interface)
        """plan: (parts of each LoRA member, their rank r, other gates' outputs); tensors: the
        members' A, their gates' weights, the other gates' weights, then every gate's bias in
        the same order."""
        loras, r, others = plan
        count = 2 * len(loras) + len(others)
        weights, biases = tensors[:count], tensors[count:]
        parts, batch, width = sum(loras), x.shape[0], x.shape[-1]
        rows = parts * r
        flat = x.reshape(-1, width)
        weight = side_by_side(list(weights))
        both = torch.addmm(F.pad(side_by_side(list(biases)), (rows, 0)), flat, weight.t())
        n_gates = weight.shape[0] - rows
        low, logits = both.split([rows, n_gates], dim=1)
        # (batch, tokens, gates, 1): the members' gates broadcast over rank as they are
        s = torch.sigmoid(logits).view(batch, -1, n_gates, 1)
        gates = s if causal else s.mean(1, keepdim=True)  # (batch, tokens or 1, gates, 1)
        outputs: list[torch.Tensor] = []
        h = g = None
        if others:  # (batch, tokens, its outputs); one gate per example: (batch, outputs)
            g, *rest = gates.split([parts, *others], dim=-2)
            shape = (batch, -1) if not causal else (batch, s.shape[1], -1)
            outputs_rest = [o.view(shape) for o in rest]
        else:
            g, outputs_rest = gates, []
        if loras:  # every member's parts at once: (batch, tokens, parts, r) ⊙ (…, parts, 1)
            h = low.view(batch, -1, parts, r)
            outputs += (h * g).view(-1, rows).split([n * r for n in loras], dim=1)
        outputs += outputs_rest
        ctx.save_for_backward(flat, s, gates, weight, h, g)  # h, g: views of both, gates
        ctx.plan, ctx.causal, ctx.x_shape = plan, causal, x.shape
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):  # noqa: D102
        flat, s, gates, weight, h, g = ctx.saved_tensors
        loras, r, others = ctx.plan
        batch, positions, n_gates, _ = s.shape
        parts, spans = sum(loras), gates.shape[1]  # spans: positions, or 1
        gate_grads, firsts = [], []
        if loras:
            rows = parts * r
            given = [flat.new_zeros(flat.shape[0], n * r) if grad is None else grad
                     for n, grad in zip(loras, grads, strict=False)]  # fmt: skip
            grad = (torch.cat(given, dim=1) if len(given) > 1 else given[0]).view(
                batch, -1, parts, r)  # fmt: skip
            firsts.append((grad * g).view(-1, rows))
            keep = (3,) if ctx.causal else (1, 3)  # over rank, and positions a gate spans
            gate_grads.append((grad * h).sum(keep, keepdim=True))  # (batch, spans, parts, 1)
        for width_out, grad in zip(others, grads[len(loras) :], strict=True):
            shape = (batch, spans, width_out, 1)
            gate_grads.append(gates.new_zeros(shape) if grad is None else grad.view(shape))
        grad_gates = torch.cat(gate_grads, dim=-2) if len(gate_grads) > 1 else gate_grads[0]
        if not ctx.causal:  # the mean over positions
            grad_gates = grad_gates / positions
        grad_logits = torch.ops.aten.sigmoid_backward(grad_gates, s).view(-1, n_gates)
        grad_both = torch.cat([*firsts, grad_logits], dim=1) if firsts else grad_logits
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_both, weight).view(ctx.x_shape)
        grad_weight = torch.mm(grad_both.t(), flat)
        sizes = [n * r for n in loras] + list(loras) + list(others)
        grad_weights = grad_weight.split(sizes)
        grad_biases = grad_logits.sum(0).split(sizes[len(loras) :])
        return (grad_x, None, None, *grad_weights, *grad_biases)
