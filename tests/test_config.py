"""config.json parsing (both layouts), the 3B tensor inventory, RoPE, and rejection of unsupported variants."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from export.checkpoint import expected_shapes
from export.config import ConfigError, parse_config
from export.llm import rope_inv_freq
from export.tiny import llm_config


def real_3b_config() -> dict:
    """The values of bosonai/higgs-audio-v2-generation-3B-base config.json that matter (spec llm.md §1.1)."""
    raw = llm_config("v2-3b")
    assert raw["text_config"]["num_hidden_layers"] == 28 and raw["text_config"]["hidden_size"] == 3072
    return raw


def transformers_config() -> dict:
    """The HF `higgs_audio_v2` layout as the official converter writes it (spec §2.4)."""
    return {
        "model_type": "higgs_audio_v2",
        "vocab_size": 128256,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 0.125,
            "high_freq_factor": 0.5,
            "original_max_position_embeddings": 1024,
        },
        "num_codebooks": 8,
        "codebook_size": 1026,
        "audio_token_id": 128016,
        "audio_bos_token_id": 128013,
        "audio_stream_bos_id": 1024,
        "audio_stream_eos_id": 1025,
        "eos_token_id": 128009,
    }


def test_3b_inventory_matches_the_released_checkpoint():
    """Spec §7.6: 397 tensors, 5,771,283,456 parameters; text head independent of the embedding."""
    config = parse_config(real_3b_config())
    shapes = expected_shapes(config)
    assert len(shapes) == 397
    assert sum(math.prod(s) for s in shapes.values()) == 5_771_283_456
    assert shapes["audio_codebook_embeddings.weight"] == (8 * 1026, 3072)
    assert "audio_decoder_proj.text_lm_head.weight" in shapes and "embed_tokens.weight" in shapes


def test_both_layouts_describe_the_same_model():
    upstream, hf = parse_config(real_3b_config()), parse_config(transformers_config())
    for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size", "num_codebooks", "codebook_stride", "stream_bos_id", "stream_eos_id",
                  "audio_out_token_id", "audio_out_bos_token_id"):
        assert getattr(upstream, field) == getattr(hf, field), field
    assert expected_shapes(upstream) == expected_shapes(hf)


def test_llama3_rope_same_for_both_parameterisations():
    """Spec §7.8: the checkpoint's rope_scaling and HF's rescaled one give identical inv_freq; the lowest
    frequencies are the base values / 32, the highest unchanged."""
    upstream, hf = parse_config(real_3b_config()), parse_config(transformers_config())
    a, b = rope_inv_freq(upstream.rope, 128), rope_inv_freq(hf.rope, 128)
    assert torch.equal(a, b)
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    assert torch.equal(a[:4], base[:4])
    assert torch.allclose(a[-4:], base[-4:] / 32)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(use_audio_out_self_attention=True), "audio self-attention"),
        (lambda c: c.update(audio_dual_ffn_layers=[0, 1]), "fast-forward"),
        (lambda c: c.update(audio_adapter_type="stack"), "DualFFN"),
        (lambda c: c.update(audio_embed_avg=True), "averaged"),
        (lambda c: c.update(audio_decoder_proj_num_layers=2), "audio_decoder_proj_num_layers"),
        (lambda c: c.update(skip_audio_tower=False), "audio tower"),
        (lambda c: c["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
        (lambda c: c["text_config"].update(num_key_value_heads=5), "multiple"),
        (lambda c: c["text_config"].pop("hidden_size"), "hidden_size"),
        (lambda c: c.update(model_type="higgs_audio_v2_tokenizer"), "codec"),
    ],
)
def test_unsupported_variants_fail_loudly(edit, message):
    raw = copy.deepcopy(real_3b_config())
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_transformers_layout_needs_the_converted_stride():
    raw = transformers_config()
    raw["codebook_size"] = 1024
    with pytest.raises(ConfigError, match="stride"):
        parse_config(raw)
