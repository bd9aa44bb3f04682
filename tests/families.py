"""Tiny random models of every transformers family petlkit supports, with ready inputs.

Each entry builds a transformers model from its config (no download, a few thousand
parameters), seeded, in eval mode; `inputs(kind)` gives a batch with padding for text."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers as hf

TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)  # fmt: skip
DECODER = dict(TEXT, num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)  # fmt: skip
IMAGE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             image_size=16, patch_size=4)  # fmt: skip


@dataclass(frozen=True)
class Family:
    name: str
    config: str
    model: str
    kwargs: dict = field(default_factory=dict)
    kind: str = "text"  # 'text', 'decoder', 'image', 'seq2seq'

    def make(self) -> torch.nn.Module:
        torch.manual_seed(0)
        config = getattr(hf, self.config)(**self.kwargs)
        return getattr(hf, self.model)(config).eval()

    def inputs(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(2)
        if self.kind == "image":
            return {"pixel_values": torch.randn(3, 3, 16, 16, generator=gen)}
        ids = torch.randint(5, 99, (3, 10), generator=gen)
        mask = torch.ones_like(ids)
        if self.kind == "decoder":  # left padding, as generation batches are padded
            mask[1, :3] = 0
        else:
            mask[1, 7:] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "seq2seq":
            batch["decoder_input_ids"] = torch.randint(5, 99, (3, 6), generator=gen)
        return batch


FAMILIES = [
    Family("bert", "BertConfig", "BertForSequenceClassification", TEXT),
    Family(
        "roberta", "RobertaConfig", "RobertaForSequenceClassification", dict(TEXT, pad_token_id=1)
    ),
    Family(
        "xlm-roberta",
        "XLMRobertaConfig",
        "XLMRobertaForSequenceClassification",
        dict(TEXT, pad_token_id=1),
    ),
    Family(
        "electra",
        "ElectraConfig",
        "ElectraForSequenceClassification",
        dict(TEXT, embedding_size=16),
    ),
    Family(
        "distilbert",
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        dict(
            vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64
        ),
    ),
    Family(
        "albert", "AlbertConfig", "AlbertForSequenceClassification", dict(TEXT, embedding_size=16)
    ),
    Family("deberta-v2", "DebertaV2Config", "DebertaV2ForSequenceClassification", TEXT),
    Family("mpnet", "MPNetConfig", "MPNetForSequenceClassification", dict(TEXT, pad_token_id=1)),
    Family(
        "modernbert",
        "ModernBertConfig",
        "ModernBertForSequenceClassification",
        dict(
            TEXT,
            global_attn_every_n_layers=2,
            local_attention=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=3,
            sep_token_id=4,
        ),
    ),
    Family("vit", "ViTConfig", "ViTForImageClassification", IMAGE, "image"),
    Family("deit", "DeiTConfig", "DeiTForImageClassification", IMAGE, "image"),
    Family(
        "dinov2",
        "Dinov2Config",
        "Dinov2ForImageClassification",
        dict(IMAGE, intermediate_size=None, mlp_ratio=2),
        "image",
    ),
    Family("clip-vision", "CLIPVisionConfig", "CLIPVisionModel", IMAGE, "image"),
    Family(
        "clip-text", "CLIPTextConfig", "CLIPTextModel", dict(TEXT, bos_token_id=1, eos_token_id=2)
    ),
    Family("siglip-vision", "SiglipVisionConfig", "SiglipVisionModel", IMAGE, "image"),
    Family("siglip-text", "SiglipTextConfig", "SiglipTextModel", TEXT),
    Family("llama", "LlamaConfig", "LlamaForCausalLM", DECODER, "decoder"),
    Family("mistral", "MistralConfig", "MistralForCausalLM", DECODER, "decoder"),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", DECODER, "decoder"),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", DECODER, "decoder"),
    Family("gemma", "GemmaConfig", "GemmaForCausalLM", DECODER, "decoder"),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", DECODER, "decoder"),
    Family(
        "gemma3",
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(DECODER, sliding_window=8),
        "decoder",
    ),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", DECODER, "decoder"),
    Family(
        "gpt2",
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=99,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "decoder",
    ),
    Family(
        "gpt-neox",
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(TEXT, bos_token_id=1, eos_token_id=2),
        "decoder",
    ),
    Family(
        "opt",
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=37,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "decoder",
    ),
    Family(
        "t5",
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=99,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        ),
        "seq2seq",
    ),
    Family(
        "bart",
        "BartConfig",
        "BartForConditionalGeneration",
        dict(
            vocab_size=99,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            max_position_embeddings=64,
        ),
        "seq2seq",
    ),
]
BY_NAME = {f.name: f for f in FAMILIES}
