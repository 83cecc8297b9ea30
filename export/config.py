"""LLM configuration: the two config.json layouts a Higgs Audio checkpoint comes in.

* upstream `HiggsAudioConfig` (`model_type: higgs_audio`, nested Llama `text_config`), the layout of
  `bosonai/higgs-audio-v2-generation-3B-base` and of V2.5-class models (spec llm.md §1);
* the transformers port `HiggsAudioV2Config` (`model_type: higgs_audio_v2`, flat Llama fields,
  `codebook_size` = per-codebook stride 1026, rewritten rope parameters; spec §2.4).

Both become one `HiggsConfig`. Architectural switches this implementation does not reproduce
(separate audio attention, fast-forward layers, ...) are rejected here, loudly, instead of being
silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from engines import tokens
from engines.manifest import ModelSpec


class ConfigError(ValueError):
    """config.json describes something we cannot load faithfully."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class HiggsConfig(ModelSpec):
    """Everything the backbone and the decode loop need; every size comes from config.json. The
    `ModelSpec` part (sizes, token and stream ids) is what the manifest carries to engines/."""

    intermediate_size: int
    rms_norm_eps: float
    rope: RopeConfig
    layout: str = "higgs_audio"  # which config.json layout it came from

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "HiggsConfig":
        data = dict(data)
        data["rope"] = RopeConfig(**data["rope"])
        return cls(**data)


def _rope_from(fields: dict, where: str) -> RopeConfig:
    """transformers <= 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters."""
    params = fields.get("rope_parameters") or {}
    scaling = fields.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", fields.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{where}: no rope_theta (neither rope_theta nor rope_parameters.rope_theta)")
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported (only default and llama3)")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    try:
        return RopeConfig(
            theta=float(theta),
            rope_type="llama3",
            factor=float(merged["factor"]),
            low_freq_factor=float(merged["low_freq_factor"]),
            high_freq_factor=float(merged["high_freq_factor"]),
            original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
        )
    except KeyError as missing:
        raise ConfigError(f"{where}: llama3 rope scaling lacks {missing}") from None


def _llama_sizes(fields: dict, where: str) -> dict:
    try:
        hidden = int(fields["hidden_size"])
        heads = int(fields["num_attention_heads"])
        sizes = dict(
            hidden_size=hidden,
            num_layers=int(fields["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(fields.get("num_key_value_heads") or heads),
            head_dim=int(fields.get("head_dim") or hidden // heads),
            intermediate_size=int(fields["intermediate_size"]),
            vocab_size=int(fields["vocab_size"]),
            rms_norm_eps=float(fields.get("rms_norm_eps", 1e-5)),
        )
    except KeyError as missing:
        raise ConfigError(f"{where}: missing Llama field {missing}") from None
    if sizes["num_heads"] % sizes["num_kv_heads"]:
        raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads")
    if fields.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {fields['hidden_act']!r} is not supported (Llama uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if fields.get(flag):
            raise ConfigError(f"{where}: {flag}=true is not supported (the Higgs checkpoints have no biases)")
    return sizes


def _reject(condition: bool, where: str, message: str) -> None:
    if condition:
        raise ConfigError(f"{where}: {message}")


def _from_upstream(raw: dict, where: str) -> HiggsConfig:
    text = raw.get("text_config")
    _reject(not isinstance(text, dict), where, "upstream layout needs a nested text_config (Llama)")
    _reject(text.get("model_type", "llama") != "llama", where, f"text_config.model_type {text.get('model_type')!r} is not llama")
    sizes = _llama_sizes(text, where + " text_config")
    adapter = raw.get("audio_adapter_type", "dual_ffn_fast_forward")
    _reject(
        adapter not in ("dual_ffn", "dual_ffn_fast_forward"),
        where,
        f"audio_adapter_type {adapter!r} is not supported (only the DualFFN adapter is implemented)",
    )
    dual = sorted(raw.get("audio_dual_ffn_layers") or [])
    _reject(
        dual != list(range(sizes["num_layers"])),
        where,
        f"audio_dual_ffn_layers must list every layer 0..{sizes['num_layers'] - 1} (got {dual}); "
        "fast-forward (text-only) layers are not implemented",
    )
    unsupported = {
        "use_audio_out_self_attention": "a separate audio self-attention",
        "use_audio_out_embed_projector": "an audio-out embedding projector",
        "use_rq_transformer": "an RQ-transformer audio head",
        "audio_embed_avg": "averaged (instead of summed) codebook embeddings",
    }
    for key, what in unsupported.items():
        _reject(bool(raw.get(key)), where, f"{key}=true ({what}) is not supported")
    _reject(int(raw.get("audio_decoder_proj_num_layers", 0)) != 0, where, "audio_decoder_proj_num_layers > 0 is not supported")
    _reject(raw.get("skip_audio_tower") is False, where, "skip_audio_tower=false (a Whisper audio tower) is not supported")
    _reject(raw.get("use_delay_pattern") is False, where, "use_delay_pattern=false is not supported")
    return HiggsConfig(
        **sizes,
        rope=_rope_from(text, where + " text_config"),
        num_codebooks=int(raw.get("audio_num_codebooks", 12)),
        codebook_size=int(raw.get("audio_codebook_size", tokens.CODEBOOK_SIZE)),
        stream_bos_id=int(raw.get("audio_stream_bos_id", tokens.STREAM_BOS)),
        stream_eos_id=int(raw.get("audio_stream_eos_id", tokens.STREAM_EOS)),
        audio_in_token_id=int(raw.get("audio_in_token_idx", tokens.AUDIO_IN)),
        audio_out_token_id=int(raw.get("audio_out_token_idx", tokens.AUDIO_OUT)),
        audio_out_bos_token_id=int(raw.get("audio_out_bos_token_id", tokens.AUDIO_OUT_BOS)),
        audio_eos_token_id=int(raw.get("audio_eos_token_id", tokens.AUDIO_EOS)),
        bos_token_id=int(text.get("bos_token_id") or tokens.BEGIN_OF_TEXT),
        eos_token_id=int(text.get("eos_token_id") or tokens.END_OF_TEXT),
        layout="higgs_audio",
    )


def _from_transformers(raw: dict, where: str) -> HiggsConfig:
    sizes = _llama_sizes(raw, where)
    stride = int(raw.get("codebook_size", 1026))
    # The converter writes codebook_size = 1026 (the stride); a config still saying 1024 would index
    # the embedding with the wrong stride, so we only accept the converted value.
    _reject(stride != 1026, where, f"codebook_size {stride}: the transformers layout stores the stride (1026)")
    eos = raw.get("eos_token_id")
    return HiggsConfig(
        **sizes,
        rope=_rope_from(raw, where),
        num_codebooks=int(raw.get("num_codebooks", 8)),
        codebook_size=stride - 2,
        stream_bos_id=int(raw.get("audio_stream_bos_id", tokens.STREAM_BOS)),
        stream_eos_id=int(raw.get("audio_stream_eos_id", tokens.STREAM_EOS)),
        audio_out_token_id=int(raw.get("audio_token_id", tokens.AUDIO_OUT)),
        audio_out_bos_token_id=int(raw.get("audio_bos_token_id", tokens.AUDIO_OUT_BOS)),
        layout="higgs_audio_v2",
        eot_token_id=int(eos[0] if isinstance(eos, list) else (eos or tokens.EOT)),
    )


def parse_config(raw: dict, where: str = "config.json") -> HiggsConfig:
    model_type = raw.get("model_type")
    if model_type == "higgs_audio":
        config = _from_upstream(raw, where)
    elif model_type == "higgs_audio_v2":
        config = _from_transformers(raw, where)
    else:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not a Higgs Audio generation model "
            "(expected 'higgs_audio' or 'higgs_audio_v2'); is this the codec's config?"
        )
    _reject(config.stream_bos_id != config.codebook_size or config.stream_eos_id != config.codebook_size + 1,
            where, "stream BOS/EOS ids must be codebook_size and codebook_size + 1")
    return config


def load_config(checkpoint_dir: str | Path) -> HiggsConfig:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: CHECKPOINT must be a model directory with config.json and *.safetensors")
    with open(path) as f:
        return parse_config(json.load(f), str(path))
