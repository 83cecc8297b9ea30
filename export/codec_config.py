"""Codec configuration: the widths and rates of a Higgs Audio V2 tokenizer, from its config.json and
tensor shapes (spec codec.md §1).

The two layouts state different things: the original `config.json` (`HiggsAudioTokenizer(**config)`)
says ratios, D, bins and n_q but not the encoder, decoder or HuBERT widths, which upstream
hard-codes; the transformers `higgs_audio_v2_tokenizer` config states most of them. So every width
is read from tensor shapes (never from class defaults, §1.3 Trap) and cross-checked against
whatever the config states; variants this implementation does not reproduce (ResidualFSQ,
stable-layer-norm HuBERT, strided semantic encoder, ...) are rejected here, loudly, as
export/config.py does for the LLM. The tensor names are the original layout's; the checkpoint
module (export/codec_checkpoint.py) maps the file's names to them.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

from engines.codec import HUBERT_BASE_CONVS, EncodeGeometry

HF_MODEL_TYPE = "higgs_audio_v2_tokenizer"  # config.json `model_type` of the transformers layout
HUBERT_TEACHERS = ("hubert_base", "hubert_base_general")


class CodecCheckpointError(ValueError):
    """A codec checkpoint that does not match the architecture it declares."""


@dataclasses.dataclass(frozen=True)
class HubertConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    conv_dims: tuple[int, ...]
    conv_kernels: tuple[int, ...]
    conv_strides: tuple[int, ...]
    conv_bias: bool
    pos_kernel: int
    pos_groups: int
    layer_norm_eps: float


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    ratios: tuple[int, ...]
    sample_rate: int
    semantic_sample_rate: int
    latent_dim: int  # D: acoustic latent channels
    codebook_dim: int
    codebook_size: int
    num_quantizers: int
    encoder_channels: int  # DAC encoder base width (real 64)
    decoder_channels: int  # DAC decoder base width (real 1024)
    semantic_dim: int  # encoder_semantic width (real 768)
    semantic_blocks: int
    semantic_dilations: tuple[int, ...]
    semantic_kernel: int
    semantic_unit_kernel: int
    hubert: HubertConfig

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    @property
    def quantizer_dim(self) -> int:
        return self.latent_dim + self.semantic_dim

    @property
    def semantic_downsample(self) -> int:
        """HAT:107: int(hop / (sr / semantic_sr) / 320), 320 being HuBERT's total stride."""
        hubert_stride = math.prod(self.hubert.conv_strides)
        return int(self.hop_length / (self.sample_rate / self.semantic_sample_rate) / hubert_stride)

    @property
    def geometry(self) -> EncodeGeometry:
        return EncodeGeometry(
            ratios=self.ratios,
            sample_rate=self.sample_rate,
            semantic_sample_rate=self.semantic_sample_rate,
            semantic_convs=tuple(zip(self.hubert.conv_kernels, self.hubert.conv_strides)),
            semantic_downsample=self.semantic_downsample,
        )


@dataclasses.dataclass(frozen=True)
class TensorShapes:
    """Original-layout name -> shape of the (folded) tensor, for width inference with named errors."""

    file: Path
    shapes: dict[str, tuple[int, ...]]
    file_name: Callable[[str], str]  # original-layout name -> the key the file stores it under

    def __call__(self, name: str, dim: int) -> int:
        if name not in self.shapes:
            raise CodecCheckpointError(
                f"{self.file}: missing tensor {self.file_name(name)!r} (needed to infer the codec widths)"
            )
        return self.shapes[name][dim]

    def count(self, prefix: str) -> int:
        """Number of consecutive indices i with some tensor under `prefix{i}.`."""
        n = 0
        while any(k.startswith(f"{prefix}{n}.") for k in self.shapes):
            n += 1
        return n


def _declared(config: dict, file: Path) -> tuple[dict, dict]:
    """Architecture facts the config states: (codec fields, HuBERT config dict)."""
    if config.get("model_type") == HF_MODEL_TYPE:
        ac = config["acoustic_model_config"]
        if list(ac["downsampling_ratios"]) != list(ac["upsampling_ratios"]):
            raise CodecCheckpointError(f"{file}: different encoder/decoder ratios are not supported")
        if any(s != 1 for s in config.get("strides", [1, 1])):
            raise CodecCheckpointError(f"{file}: semantic encoder strides {config['strides']} unsupported")
        frame_rate = math.ceil(config["sample_rate"] / math.prod(ac["downsampling_ratios"]))
        n_q = int(1000 * config["target_bandwidths"][-1] // (frame_rate * math.log2(config["codebook_size"])))
        fields = {
            "ratios": tuple(ac["downsampling_ratios"]),
            "sample_rate": config["sample_rate"],
            "semantic_sample_rate": config.get("semantic_sample_rate", 16000),
            "latent_dim": ac["hidden_size"],
            "codebook_dim": config["codebook_dim"],
            "codebook_size": config["codebook_size"],
            "num_quantizers": n_q,
            "encoder_channels": ac["encoder_hidden_size"],
            "decoder_channels": ac["decoder_hidden_size"],
            "semantic_dilations": tuple(config.get("block_dilations", (1, 1))),
        }
        return fields, config.get("semantic_model_config", {})
    if config.get("semantic_techer") not in HUBERT_TEACHERS:
        raise CodecCheckpointError(
            f"{file}: semantic_techer {config.get('semantic_techer')!r} unsupported (need one of {HUBERT_TEACHERS})"
        )
    if not isinstance(config.get("bins"), int):
        raise CodecCheckpointError(f"{file}: bins {config.get('bins')!r} selects the unsupported ResidualFSQ branch")
    if config.get("downsample_mode", "step_down") != "step_down" or config.get("vq_scale", 1) != 1:
        raise CodecCheckpointError(f"{file}: only downsample_mode 'step_down' and vq_scale 1 are supported")
    overrides = config.get("_tiny_overrides", {})
    fields = {
        "ratios": tuple(config["ratios"]),
        "sample_rate": config["sample_rate"],
        "semantic_sample_rate": config.get("semantic_sample_rate") or 16000,
        "latent_dim": config["D"],
        "codebook_size": config["bins"],
        "num_quantizers": config["n_q"],
        "semantic_dilations": (1, 1),
    }
    if config.get("codebook_dim") is not None:
        fields["codebook_dim"] = config["codebook_dim"]
    for key in ("encoder_channels", "decoder_channels", "semantic_dim"):
        if key in overrides:
            fields[key] = overrides[key]
    return fields, overrides.get("semantic_model_config", {})


def _hubert_config(s: TensorShapes, declared: dict, file: Path) -> HubertConfig:
    p = "semantic_model."
    if declared.get("do_stable_layer_norm", False) or declared.get("feat_extract_norm", "group") != "group":
        raise CodecCheckpointError(f"{file}: only the post-LN HuBERT with group-norm feature extractor is supported")
    if declared.get("conv_pos_batch_norm", False) or not declared.get("feat_proj_layer_norm", True):
        raise CodecCheckpointError(
            f"{file}: HuBERT with conv_pos_batch_norm or without feat_proj_layer_norm is unsupported"
        )
    n_conv = s.count(f"{p}feature_extractor.conv_layers.")
    hidden = s(f"{p}feature_projection.projection.weight", 0)
    if "num_attention_heads" in declared:
        heads = declared["num_attention_heads"]
    elif hidden == 768:
        heads = 12  # HuBERT base
    else:
        raise CodecCheckpointError(
            f"{file}: cannot infer the HuBERT head count from tensor shapes (hidden {hidden}); state it as "
            "semantic_model_config.num_attention_heads (in `_tiny_overrides` for the original layout)"
        )
    strides = tuple(declared.get("conv_stride", [st for _, st in HUBERT_BASE_CONVS]))
    if len(strides) != n_conv:
        raise CodecCheckpointError(f"{file}: {n_conv} HuBERT feature convs but {len(strides)} conv strides declared")
    pos = f"{p}encoder.pos_conv_embed.conv.weight"
    config = HubertConfig(
        hidden_size=hidden,
        num_layers=s.count(f"{p}encoder.layers."),
        num_heads=heads,
        intermediate_size=s(f"{p}encoder.layers.0.feed_forward.intermediate_dense.weight", 0),
        conv_dims=tuple(s(f"{p}feature_extractor.conv_layers.{i}.conv.weight", 0) for i in range(n_conv)),
        conv_kernels=tuple(s(f"{p}feature_extractor.conv_layers.{i}.conv.weight", 2) for i in range(n_conv)),
        conv_strides=strides,
        conv_bias=bool(declared.get("conv_bias", False)),
        pos_kernel=s(pos, 2),
        pos_groups=hidden // s(pos, 1),
        layer_norm_eps=float(declared.get("layer_norm_eps", 1e-5)),
    )
    from_tensors = {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "intermediate_size": config.intermediate_size,
        "conv_dim": list(config.conv_dims),
        "conv_kernel": list(config.conv_kernels),
        "num_conv_pos_embeddings": config.pos_kernel,
        "num_conv_pos_embedding_groups": config.pos_groups,
    }
    for key, value in from_tensors.items():
        if key in declared and declared[key] != value:
            raise CodecCheckpointError(
                f"{file}: HuBERT {key} is {declared[key]} in the config but {value} in the tensors; "
                "the config and weights are from different codecs"
            )
    return config


def infer_config(config: dict, s: TensorShapes) -> CodecConfig:
    """Widths from tensor shapes, cross-checked against whatever `config` (config.json) states."""
    declared, hubert_declared = _declared(config, s.file)
    if declared["sample_rate"] == declared["semantic_sample_rate"]:
        raise CodecCheckpointError(f"{s.file}: sample_rate == semantic_sample_rate is unsupported")
    hubert = _hubert_config(s, hubert_declared, s.file)
    inferred = {
        "latent_dim": s("fc_post2.weight", 0),
        "codebook_dim": s("quantizer.vq.layers.0._codebook.embed", 1),
        "codebook_size": s("quantizer.vq.layers.0._codebook.embed", 0),
        "num_quantizers": s.count("quantizer.vq.layers."),
        "encoder_channels": s("encoder.block.0.weight", 0),
        "decoder_channels": s("decoder_2.model.0.weight", 0),
        "semantic_dim": s("encoder_semantic.conv.conv.weight", 0),
    }
    for field, value in inferred.items():
        if field in declared and declared[field] != value:
            raise CodecCheckpointError(
                f"{s.file}: config says {field} = {declared[field]} but the tensors give {value}; "
                "the config and weights are from different codecs"
            )
    if s("fc_post2.weight", 1) != inferred["latent_dim"] + inferred["semantic_dim"]:
        raise CodecCheckpointError(
            f"{s.file}: {s.file_name('fc_post2.weight')} has {s('fc_post2.weight', 1)} inputs, expected "
            f"D + semantic dim = {inferred['latent_dim'] + inferred['semantic_dim']}"
        )
    blocks = s.count("encoder_semantic.conv_blocks.")
    return CodecConfig(
        ratios=declared["ratios"],
        sample_rate=declared["sample_rate"],
        semantic_sample_rate=declared["semantic_sample_rate"],
        semantic_blocks=blocks,
        semantic_dilations=declared["semantic_dilations"],
        semantic_kernel=s("encoder_semantic.conv.conv.weight", 2),
        semantic_unit_kernel=s("encoder_semantic.conv_blocks.0.res_units.0.conv1.conv.weight", 2),
        hubert=hubert,
        **inferred,
    )


