"""HuggingFace models built from config classes (nothing downloaded), with a batch to train on.

Used by the demo, the ``explain`` command, the tests and the model benchmark.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

FAMILIES = ("t5", "t5-gated", "bert", "gpt2", "distilbert", "roberta")

# (d_model, ffn, heads, layers) per size; "base" matches BERT-base / GPT-2 small (12 layers);
# T5 at "base" gets 6 encoder + 6 decoder layers (see build_model).
SIZES = {
    "tiny": (128, 256, 2, 2),  # head dim 64 (as "demo"), so the attention kernels cover its sites
    "demo": (128, 512, 2, 2),
    "base": (768, 3072, 12, 12),
}

# The published vocabularies at "base", so the embedding and LM-head cost matches the real models.
BASE_VOCAB = {"t5": 32128, "t5-gated": 32128, "bert": 30522, "roberta": 50265, "gpt2": 50257, "distilbert": 30522}


def build_model(family: str, size: str = "tiny", attn: str = "sdpa", dropout: float | None = None, vocab: int | None = None) -> torch.nn.Module:
    """A freshly initialised model of ``family`` at ``size``; ``dropout`` overrides every dropout p."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"model family {family!r}: expected one of {', '.join(FAMILIES)}, or a path to a HF model directory / config.json")
    if size not in SIZES:
        raise ValueError(f"model size {size!r}: expected one of {', '.join(SIZES)}")
    d, ff, heads, layers = SIZES[size]
    if size == "base" and family.startswith("t5"):
        layers = 6  # 6 + 6 layers, as the benchmark issue allows
    vocab = vocab or (BASE_VOCAB[family] if size == "base" else 256)
    p = 0.1 if dropout is None else dropout
    # Training models: no KV cache. (transformers 5.17's T5 builds its cache with copy.deepcopy of
    # the config, which Dynamo cannot trace: a graph break in every forward with use_cache=True.)
    common: dict[str, Any] = {"attn_implementation": attn, "use_cache": False}
    if family.startswith("t5"):
        cfg = tf.T5Config(
            vocab_size=vocab, d_model=d, d_kv=d // heads, d_ff=ff, num_layers=layers, num_decoder_layers=layers,
            num_heads=heads, dropout_rate=p, feed_forward_proj="gated-gelu" if family == "t5-gated" else "relu",
            decoder_start_token_id=0, pad_token_id=0, **common,
        )
        return tf.T5ForConditionalGeneration(cfg)
    if family in ("bert", "roberta"):
        cls_cfg, cls_model = (tf.BertConfig, tf.BertForMaskedLM) if family == "bert" else (tf.RobertaConfig, tf.RobertaForMaskedLM)
        cfg = cls_cfg(
            vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_attention_heads=heads, num_hidden_layers=layers,
            hidden_dropout_prob=p, attention_probs_dropout_prob=p, max_position_embeddings=1024, **common,
        )
        return cls_model(cfg)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=d, n_inner=ff, n_head=heads, n_layer=layers, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, n_positions=1024, **common)
        return tf.GPT2LMHeadModel(cfg)
    cfg = tf.DistilBertConfig(vocab_size=vocab, dim=d, hidden_dim=ff, n_heads=heads, n_layers=layers, dropout=p, attention_dropout=p, max_position_embeddings=1024, **common)
    return tf.DistilBertForMaskedLM(cfg)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer layers of a model built here, in order (encoder, then decoder): the units one
    ``fully_shard``s under FSDP2 before the root, so each layer's dropout -> matmul pairs stay in one unit."""
    if hasattr(model, "encoder") and hasattr(model, "decoder"):  # T5
        return [*model.encoder.block, *model.decoder.block]
    for path in ("transformer.h", "bert.encoder.layer", "roberta.encoder.layer", "distilbert.transformer.layer"):
        owner = model
        for name in path.split("."):
            owner = getattr(owner, name, None)
        if owner is not None:
            return list(owner)
    raise ValueError(f"transformer_blocks: no known layer list in {type(model).__name__} "
                     "(expected T5, GPT-2, BERT, RoBERTa or DistilBERT as build_model makes them)")


def load_model(path: str, attn: str = "sdpa") -> torch.nn.Module:
    """A randomly initialised model from a local HF model directory or config.json (no weights read)."""
    import transformers as tf

    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"model path {path!r}: expected a HF model directory holding config.json, or a config.json file")
    with open(cfg_path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e}); expected a HF config.json") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ValueError(f"{cfg_path} has no \"model_type\" string; expected a HF config.json (as save_pretrained writes it)")
    try:
        config = tf.AutoConfig.for_model(**data)
    except (ValueError, KeyError):
        raise ValueError(f"{cfg_path}: model_type {data['model_type']!r} is unknown to transformers {tf.__version__}") from None
    config._attn_implementation = attn
    config.use_cache = False  # a training model (see build_model)
    for auto in (tf.AutoModelForSeq2SeqLM, tf.AutoModelForCausalLM, tf.AutoModelForMaskedLM, tf.AutoModel):
        try:
            return auto.from_config(config)
        except ValueError:
            continue
    raise ValueError(f"no AutoModel class builds a model for config {cfg_path!r} (model_type={data.get('model_type')!r})")


def example_batch(model: torch.nn.Module, batch: int = 2, seq: int = 16, device: str | torch.device = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random batch with labels, shaped for the model's task (seq2seq, causal or masked LM)."""
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    vocab = config.vocab_size
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)
    out = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        out["labels"] = torch.randint(1, vocab, (batch, max(seq // 2, 1)), generator=gen)
    else:
        out["labels"] = ids.clone()
        out["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
        out["attention_mask"][0, seq - seq // 4 :] = 0  # some padding, so masks are exercised
    return {k: v.to(device) for k, v in out.items()}
