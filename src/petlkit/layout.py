"""Where things are inside a backbone's blocks, so methods never hard-code module names.

Names are relative to the task model (the module a PetlModel wraps). A "site" (see
docs/methods/sas.md) is the input of a module: `attn_in` feeds the q/k/v projections and
`mlp_in` feeds the first MLP linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from petlkit.errors import PetlError


@dataclass(frozen=True)
class BlockLayout:
    attn_in: str  # module whose first input is the attention site (q/k/v read it)
    attn_linears: tuple[str, ...]  # linears that read the attention site
    query: str  # linear producing queries (may be a fused qkv)
    value: str  # linear producing values (may be a fused qkv)
    attn_out: str  # attention output projection
    mlp_in: str  # module whose first input is the MLP site
    mlp_linears: tuple[str, ...]  # linears that read the MLP site (fc1)
    mlp_out: str  # last MLP linear (fc2)
    attention: str  # the self-attention module (extra key/value tokens go here)
    block: str = ""  # the whole block (pre-norm: its output is the residual stream)
    mlp_norm: str | None = None  # post-norm encoders: the LayerNorm over FFN output + residual

    def site(self, kind: str) -> tuple[str, tuple[str, ...]]:
        """(module whose input is the site, linears reading it) for 'attn_in' or 'mlp_in'."""
        if kind == "attn_in":
            return self.attn_in, self.attn_linears
        if kind == "mlp_in":
            return self.mlp_in, self.mlp_linears
        raise PetlError(f"unknown site {kind!r}; valid sites: ['attn_in', 'mlp_in']")


@dataclass(frozen=True)
class BackboneLayout:
    width: int
    num_heads: int
    blocks: tuple[BlockLayout, ...]
    fused_qkv: frozenset[str] = field(default_factory=frozenset)  # names of fused q|k|v linears
    head: str = "head"
    encoder: str | None = None  # the transformers model inside a text task model ("" = root)

    @property
    def depth(self) -> int:
        return len(self.blocks)


def layout_of(model: nn.Module) -> BackboneLayout:
    """The layout a task model declares through `petl_layout()`, or a clear error."""
    get = getattr(model, "petl_layout", None)
    if get is None:
        raise PetlError(
            f"{type(model).__name__} declares no block layout; methods that act per block need "
            "one: use a petlkit backbone (petlkit.build_model) or give explicit target modules"
        )
    return get()
