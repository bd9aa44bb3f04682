"""Where things are inside a backbone's blocks, so methods never hard-code module names.

Names are relative to the task model (the module a PetlModel wraps). A "site" (see
docs/methods/sas.md) is the input of a module: `attn_in` feeds the q/k/v projections and
`mlp_in` feeds the first MLP linear.

A task model's layout comes from, in order: its own `petl_layout()` (petlkit's backbones), a
`ModelLayout` given to `attach(..., layout=)` or declared for its class (families.py), or the
built-in entry of its transformers family (`config.model_type`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from petlkit.errors import PetlError
from petlkit.families import FAMILIES, ModelLayout, declared_layout

_LAYOUT = "_petlkit_layout"  # the resolved BackboneLayout, kept on the task model
_DECLARED = "_petlkit_model_layout"  # a ModelLayout given to attach(layout=...)
_HEADS = "_petlkit_heads"  # the task heads a PetlModel trains


@dataclass(frozen=True)
class BlockLayout:
    attn_in: str  # module whose first input is the attention site (q/k/v read it); "": none
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
    encoder: str | None = None  # the transformers model inside a text task model ("" = root)
    kv_heads: int | None = None  # key/value heads (grouped-query attention); None: num_heads
    head_dim: int | None = None  # None: width // num_heads
    causal: bool = False
    rotary: bool = False
    qkv_split: str = "chunks"  # how a fused projection's output splits: q|k|v, or per head
    inputs: str | None = None  # transformers models: the module that embeds the input sequence
    heads: tuple[str, ...] = ("head",)  # task heads, trained beside the method
    frozen_heads: tuple[str, ...] = ()  # language-model heads: never adapted, frozen
    norm_offset: float = 0.0
    embed_dim: int | None = None  # width of the input embeddings (prompts), None: width
    shared_layers: str | None = None

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def key_value_heads(self) -> int:
        return self.kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.width // self.num_heads


def layout_of(model: nn.Module) -> BackboneLayout:
    """The task model's block layout, or an error saying how to declare one."""
    get = getattr(model, "petl_layout", None)
    if get is not None:
        return get()
    cached = model.__dict__.get(_LAYOUT)
    if cached is not None:
        return cached
    spec = model.__dict__.get(_DECLARED) or declared_layout(model)
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        kind = f"model_type {model_type!r}" if model_type else "no transformers config"
        raise PetlError(
            f"petlkit knows no layout for {type(model).__name__} ({kind}); declare one in about "
            "ten lines with petlkit.ModelLayout (layers, attention, query/key/value or qkv, "
            "attn_out, mlp, mlp_in, mlp_out) and pass it as attach(..., layout=...) or "
            "petlkit.declare_layout(...); methods that take targets= (lora, bitfit, ssf, full, "
            f"linear) need none. Built-in families: {sorted(FAMILIES)}"
        )
    layout = resolve(model, spec)
    model.__dict__[_LAYOUT] = layout
    return layout


def use_layout(model: nn.Module, spec: ModelLayout) -> None:
    """Make `model` use `spec` (attach(..., layout=spec)); checked at once."""
    if not isinstance(spec, ModelLayout):
        raise PetlError(f"layout= takes a petlkit.ModelLayout, got {type(spec).__name__}")
    if hasattr(model, "petl_layout"):
        raise PetlError(f"{type(model).__name__} declares its own layout; do not pass layout=")
    model.__dict__[_DECLARED] = spec
    model.__dict__.pop(_LAYOUT, None)
    try:
        layout_of(model)
    except PetlError:
        model.__dict__.pop(_DECLARED, None)
        raise


def layout_or_none(model: nn.Module) -> BackboneLayout | None:
    """The task model's layout, or None where it has none (methods that take targets=)."""
    try:
        return layout_of(model)
    except PetlError:
        return None


def rooted(layout: BackboneLayout, prefix: str, heads: tuple[str, ...]) -> BackboneLayout:
    """`layout` of a model that sits at `prefix` inside a task model (petlkit's TextClassifier
    holds a transformers encoder as `encoder`), with that task model's own `heads`."""

    def name(value: str | None) -> str | None:
        return value if not value else prefix + value  # "" (no such module) and None stay

    blocks = tuple(
        BlockLayout(**{
            k: tuple(name(n) for n in v) if isinstance(v, tuple) else name(v)
            for k, v in vars(block).items()
        })
        for block in layout.blocks
    )  # fmt: skip
    root = prefix.removesuffix(".")
    return replace(
        layout, blocks=blocks, fused_qkv=frozenset(prefix + n for n in layout.fused_qkv),
        encoder=None if layout.encoder is None else name(layout.encoder) or root,
        inputs=None if layout.inputs is None else name(layout.inputs) or root,
        heads=heads, frozen_heads=(),
    )  # fmt: skip


# -- heads ------------------------------------------------------------------------------------
def head_names(model: nn.Module) -> tuple[str, ...]:
    """The task-head modules trained beside a method: what a PetlModel chose, else the
    layout's, else `head` where the model has one."""
    chosen = model.__dict__.get(_HEADS)
    if chosen is not None:
        return chosen
    layout = layout_or_none(model)
    if layout is not None:
        return layout.heads
    return ("head",) if isinstance(getattr(model, "head", None), nn.Module) else ()


def set_heads(model: nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            children = [n for n, _ in model.named_children()]
            raise PetlError(
                f"{type(model).__name__} has no module {name!r} to train as a head; its "
                f"top-level modules: {children}"
            ) from None
    model.__dict__[_HEADS] = tuple(names)


def untargetable(model: nn.Module) -> tuple[str, ...]:
    """Module names that methods never adapt: the task heads and language-model heads."""
    layout = layout_or_none(model)
    frozen = layout.frozen_heads if layout is not None else ()
    return tuple(dict.fromkeys((*head_names(model), *frozen)))


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if get is not None else None
    except (AttributeError, NotImplementedError):
        return None


def _split_heads(model: nn.Module, base_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(task heads, language-model heads) of a transformers model: the top-level modules with
    weights outside its base model; all of them are a language-model head when the model has
    output embeddings (its own or tied to the input embeddings)."""
    lm = _output_embeddings(model)
    lm_name = next((n for n, m in model.named_modules() if lm is not None and m is lm), None)
    outside = tuple(
        n
        for n, m in model.named_children()
        if n != base_name and base_name != "" and any(True for _ in m.parameters())
    )
    if lm is None:
        return outside, ()
    frozen = outside if outside else ()
    if lm_name is not None and lm_name not in frozen:
        frozen = (*frozen, lm_name)
    return (), frozen


# -- resolving a ModelLayout ------------------------------------------------------------------
def _exists(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def resolve(model: nn.Module, spec: ModelLayout) -> BackboneLayout:
    """The BackboneLayout of `model` from the names in `spec`; one error lists all missing."""
    base = getattr(model, "base_model", model)
    base_name = next((n for n, m in model.named_modules() if m is base), "")
    prefix = f"{base_name}." if base_name else ""
    missing: list[str] = []

    def pick(block: str, rel: str | None) -> str | None:
        if rel is None:
            return None
        optional = rel.endswith("?")
        for alternative in rel.rstrip("?").split("|"):
            if _exists(model, f"{block}.{alternative}"):
                return f"{block}.{alternative}"
        if not optional:
            missing.append(f"{block}.{rel}")
        return None

    blocks: list[BlockLayout] = []
    for stack in spec.stacks:
        path = prefix + stack
        if not _exists(model, path):
            missing.append(path)
            continue
        for i in range(len(model.get_submodule(path))):
            b = f"{path}.{i}"
            attn_linears = tuple(pick(b, n) for n in (spec.query, spec.key, spec.value, spec.qkv))
            attn_linears = tuple(n for n in attn_linears if n is not None)
            mlp_linears = tuple(n for n in (pick(b, n) for n in spec.mlp_in) if n is not None)
            query = pick(b, spec.query) or pick(b, spec.qkv)
            value = pick(b, spec.value) or pick(b, spec.qkv)
            names = dict(
                attention=pick(b, spec.attention), attn_out=pick(b, spec.attn_out),
                mlp_in=pick(b, spec.mlp), mlp_out=pick(b, spec.mlp_out),
            )  # fmt: skip
            site = names["attention"]
            if spec.attn_site is not None:  # "": no module reads only the projections' input
                site = pick(b, spec.attn_site) if spec.attn_site else ""
            if missing:
                continue
            blocks.append(
                BlockLayout(
                    attn_in=site, attn_linears=attn_linears, query=query,
                    value=value, attn_out=names["attn_out"], mlp_in=names["mlp_in"],
                    mlp_linears=mlp_linears, mlp_out=names["mlp_out"],
                    attention=names["attention"], block=b, mlp_norm=pick(b, spec.post_norm),
                )
            )  # fmt: skip
    if missing:
        raise PetlError(
            f"{type(model).__name__} does not have the modules its layout names: "
            f"{sorted(set(missing))[:8]}; fix the ModelLayout (names are relative to each block, "
            f"layers relative to {base_name or 'the model'!r})"
        )
    if not blocks:
        raise PetlError(f"{type(model).__name__}'s layers {spec.stacks} hold no blocks")
    config = getattr(model, "config", None)
    width = spec.width or getattr(config, "hidden_size", None)
    num_heads = spec.num_heads or getattr(config, "num_attention_heads", None)
    if not width or not num_heads:
        raise PetlError(
            f"{type(model).__name__} has no transformers config to read its width and heads "
            "from; give ModelLayout(width=..., num_heads=...)"
        )
    kv_heads = spec.kv_heads or getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = spec.head_dim or getattr(config, "head_dim", None) or width // num_heads
    heads, frozen = _split_heads(model, base_name)
    if config is None:  # not a transformers model: its `head`, if it has one
        heads = ("head",) if isinstance(getattr(model, "head", None), nn.Module) else ()
    if spec.heads is not None:
        heads = tuple(spec.heads)
    inputs = prefix + spec.inputs if spec.inputs else base_name
    embed_dim = getattr(word_embeddings(model, inputs), "embedding_dim", None)
    fused = frozenset(b.query for b in blocks if spec.qkv is not None)
    return BackboneLayout(
        width=width, num_heads=num_heads, blocks=tuple(blocks), fused_qkv=fused,
        encoder="" if config is not None else None, kv_heads=kv_heads, head_dim=head_dim,
        causal=spec.causal, rotary=spec.rotary, qkv_split=spec.qkv_split,
        inputs=inputs, heads=heads, frozen_heads=frozen, norm_offset=spec.norm_offset,
        embed_dim=embed_dim,
        shared_layers=spec.shared_layers,
    )  # fmt: skip


def word_embeddings(model: nn.Module, inputs: str | None) -> nn.Module | None:
    """The word-embedding layer of the module at `inputs` (a transformers model's
    get_input_embeddings()), or None where there is none."""
    get_embeddings = None if inputs is None else getattr(
        model.get_submodule(inputs), "get_input_embeddings", None)  # fmt: skip
    return get_embeddings() if get_embeddings is not None else None
