"""Where the parts of a transformer are, per model family: data, not code.

A `ModelLayout` names, relative to one block, the modules every method needs: the self-attention,
its q/k/v (or one fused projection and how it splits) and output projection, the MLP's input and
output linears, and, for post-norm encoders, the LayerNorm after the MLP. `layers` names the
ModuleList(s) of blocks, relative to the model's base (`model.base_model` in transformers).
Attention facts (causal, rotary positions) go with it; widths and head counts are read from the
model's config (`hidden_size`, `num_attention_heads`, `num_key_value_heads`, `head_dim`) unless
given. A path may list alternatives ("a|b": the first that exists in the block); a name ending in
"?" may be absent.

`FAMILIES` holds one entry per supported transformers `model_type`. Any other model is declared in
the same ten lines, with `declare_layout(ModelClass, ModelLayout(...))` or
`petlkit.attach(model, method, layout=ModelLayout(...))` (docs/models.md has a worked example).
"""

from __future__ import annotations

from dataclasses import dataclass

QKV_SPLITS = ("chunks", "heads")


@dataclass(frozen=True)
class ModelLayout:
    """What petlkit needs to know of a transformer, in names relative to one block.

    layers: the ModuleList(s) of blocks, relative to the base model (several for an
    encoder-decoder: encoder stack first). attention: the self-attention module (its input is
    what q/k/v read). query/key/value, or qkv: a fused projection, split as q|k|v ('chunks') or per
    head ('heads', GPT-NeoX). attn_out: the attention output projection. mlp: the module whose
    input the MLP reads (may be its first linear); mlp_in: the linears reading that input;
    mlp_out: the last MLP linear. post_norm: the LayerNorm over MLP output + residual (post-norm
    encoders such as BERT; None for pre-norm). inputs: the module that embeds the input sequence,
    relative to the base ("" = the base; "encoder" for encoder-decoders). causal, rotary: attention
    facts. norm_offset: an RMSNorm computes (offset + weight)·x̂ (Gemma: 1). width, num_heads,
    kv_heads, head_dim: None reads them from the model's config. attn_site: the module whose
    input only q/k/v read, when `attention` also takes the residual (ALBERT's does): "" for none,
    then a site transform (SaS) runs at each projection's input. heads: the task-head modules
    (relative to the model) trained beside a method; None finds them (transformers: the modules
    outside the base model, language-model heads excepted; other models: `head`)."""

    layers: str | tuple[str, ...]
    attention: str
    attn_out: str
    mlp: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    query: str | None = None
    key: str | None = None
    value: str | None = None
    qkv: str | None = None
    qkv_split: str = "chunks"
    post_norm: str | None = None
    inputs: str = ""
    causal: bool = False
    rotary: bool = False
    norm_offset: float = 0.0
    width: int | None = None
    num_heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    shared_layers: str | None = None  # why one block stands for several (ALBERT)
    attn_site: str | None = None  # module whose input only q/k/v read, if not `attention`
    heads: tuple[str, ...] | None = None  # task heads; None: found from the model

    def __post_init__(self) -> None:
        separate = (self.query, self.key, self.value)
        if self.qkv is None and None in separate:
            raise ValueError("ModelLayout needs query, key and value, or one fused qkv")
        if self.qkv is not None and any(separate):
            raise ValueError("ModelLayout takes query/key/value or qkv, not both")
        if self.qkv_split not in QKV_SPLITS:
            raise ValueError(f"qkv_split must be one of {list(QKV_SPLITS)}, got {self.qkv_split!r}")
        if not self.mlp_in:
            raise ValueError("ModelLayout.mlp_in must name at least one linear")

    @property
    def stacks(self) -> tuple[str, ...]:
        return (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)


def _bert_like(
    q: str = "query",
    k: str = "key",
    v: str = "value",
    attn: str = "attention.self",
    out: str = "attention.output.dense",
) -> ModelLayout:
    return ModelLayout(
        layers="encoder.layer",
        attention=attn,
        query=f"{attn}.{q}",
        key=f"{attn}.{k}",
        value=f"{attn}.{v}",
        attn_out=out,
        mlp="intermediate",
        mlp_in=("intermediate.dense",),
        mlp_out="output.dense",
        post_norm="output.LayerNorm",
    )


def _clip_like(causal: bool = False) -> ModelLayout:
    return ModelLayout(
        layers="encoder.layers",
        attention="self_attn",
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        attn_out="self_attn.out_proj",
        mlp="mlp",
        mlp_in=("mlp.fc1",),
        mlp_out="mlp.fc2",
        causal=causal,
    )


def _hf_vit(layers: str) -> ModelLayout:
    return ModelLayout(
        layers=layers,
        attention="attention",
        query="attention.q_proj",
        key="attention.k_proj",
        value="attention.v_proj",
        attn_out="attention.o_proj",
        mlp="mlp",
        mlp_in=("mlp.fc1|mlp.weights_in",),
        mlp_out="mlp.fc2|mlp.weights_out",
    )


def _llama_like(norm_offset: float = 0.0) -> ModelLayout:
    return ModelLayout(
        layers="layers",
        attention="self_attn",
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        attn_out="self_attn.o_proj",
        mlp="mlp",
        mlp_in=("mlp.gate_proj", "mlp.up_proj"),
        mlp_out="mlp.down_proj",
        causal=True,
        rotary=True,
        norm_offset=norm_offset,
    )


def _t5_mlp(name: str) -> str:
    """T5's FFN is layer 1 of an encoder block and layer 2 of a decoder block."""
    return f"layer.2.DenseReluDense.{name}|layer.1.DenseReluDense.{name}"


def _seq2seq(layers: tuple[str, str], out: str, post_norm: str | None) -> ModelLayout:
    return ModelLayout(
        layers=layers,
        attention="self_attn",
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        attn_out=out,
        mlp="fc1",
        mlp_in=("fc1",),
        mlp_out="fc2",
        post_norm=post_norm,
        inputs="encoder",
    )


FAMILIES: dict[str, ModelLayout] = {
    # encoders
    "bert": _bert_like(),
    "roberta": _bert_like(),
    "xlm-roberta": _bert_like(),
    "camembert": _bert_like(),
    "electra": _bert_like(),
    "deberta-v2": _bert_like(q="query_proj", k="key_proj", v="value_proj"),
    "mpnet": _bert_like(q="q", k="k", v="v", attn="attention.attn", out="attention.attn.o"),
    "distilbert": ModelLayout(
        layers="transformer.layer",
        attention="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attn_out="attention.out_lin",
        mlp="ffn",
        mlp_in=("ffn.lin1",),
        mlp_out="ffn.lin2",
        post_norm="output_layer_norm",
    ),
    "albert": ModelLayout(
        layers="encoder.albert_layer_groups.0.albert_layers",
        attention="attention",
        query="attention.query",
        key="attention.key",
        value="attention.value",
        attn_out="attention.dense",
        mlp="ffn",
        mlp_in=("ffn",),
        mlp_out="ffn_output",
        post_norm="full_layer_layer_norm",
        attn_site="",  # AlbertAttention adds the residual and norms inside
        shared_layers="ALBERT runs one set of layer weights at every depth, so a per-layer "
        "method has one set of parameters, applied at each repetition",
    ),
    "modernbert": ModelLayout(
        layers="layers",
        attention="attn",
        qkv="attn.Wqkv",
        attn_out="attn.Wo",
        mlp="mlp",
        mlp_in=("mlp.Wi",),
        mlp_out="mlp.Wo",
        rotary=True,
    ),
    # vision (and CLIP's and SigLIP's towers)
    "vit": _hf_vit("layers"),
    "deit": _hf_vit("layers"),
    "dinov2": _hf_vit("encoder.layer"),
    "clip_vision_model": _clip_like(),
    "clip_text_model": _clip_like(causal=True),
    "siglip_vision_model": _clip_like(),
    "siglip_text_model": _clip_like(),
    # decoders
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(),
    "gemma": _llama_like(norm_offset=1.0),
    "gemma2": _llama_like(norm_offset=1.0),
    "gemma3_text": _llama_like(norm_offset=1.0),
    "phi3": ModelLayout(
        layers="layers",
        attention="self_attn",
        qkv="self_attn.qkv_proj",
        attn_out="self_attn.o_proj",
        mlp="mlp",
        mlp_in=("mlp.gate_up_proj",),
        mlp_out="mlp.down_proj",
        causal=True,
        rotary=True,
    ),
    "gpt2": ModelLayout(
        layers="h",
        attention="attn",
        qkv="attn.c_attn",
        attn_out="attn.c_proj",
        mlp="mlp",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        causal=True,
    ),
    "gpt_neox": ModelLayout(
        layers="layers",
        attention="attention",
        qkv="attention.query_key_value",
        qkv_split="heads",
        attn_out="attention.dense",
        mlp="mlp",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        causal=True,
        rotary=True,
    ),
    "opt": ModelLayout(
        layers="decoder.layers",
        attention="self_attn",
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        attn_out="self_attn.out_proj",
        mlp="fc1",
        mlp_in=("fc1",),
        mlp_out="fc2",
        causal=True,
        inputs="decoder",  # OPTForCausalLM calls its decoder, not OPTModel
    ),
    # encoder-decoders: both stacks' self-attention (cross-attention: by targets=, docs/models.md)
    "t5": ModelLayout(
        layers=("encoder.block", "decoder.block"),
        attention="layer.0.SelfAttention",
        query="layer.0.SelfAttention.q",
        key="layer.0.SelfAttention.k",
        value="layer.0.SelfAttention.v",
        attn_out="layer.0.SelfAttention.o",
        mlp="layer.2.DenseReluDense|layer.1.DenseReluDense",
        mlp_in=(f"{_t5_mlp('wi')}|{_t5_mlp('wi_0')}", f"{_t5_mlp('wi_1')}?"),
        mlp_out=_t5_mlp("wo"),
        inputs="encoder",
    ),
    "bart": _seq2seq(
        ("encoder.layers", "decoder.layers"), "self_attn.out_proj", "final_layer_norm"
    ),
}

_DECLARED: dict[type | str, ModelLayout] = {}


def declare_layout(model_type: type | str, layout: ModelLayout) -> None:
    """Make every model of this class (or transformers `model_type`) use `layout`."""
    if not isinstance(layout, ModelLayout):
        raise TypeError(f"declare_layout needs a petlkit.ModelLayout, got {type(layout).__name__}")
    _DECLARED[model_type] = layout


def declared_layout(model: object) -> ModelLayout | None:
    """The layout declared for this model's class (or a base class), or for its model_type,
    else the built-in family entry; None when petlkit knows none."""
    for cls in type(model).__mro__:
        if cls in _DECLARED:
            return _DECLARED[cls]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _DECLARED:
        return _DECLARED[model_type]
    return FAMILIES.get(model_type)


def family_names() -> list[str]:
    """The transformers `model_type`s petlkit knows the layout of, sorted."""
    return sorted(FAMILIES)
