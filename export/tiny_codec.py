"""Deterministic random codec checkpoints in the ORIGINAL layout (`config.json` + `model.pth`).

Tests and the tiny demo need a codec without the real weights (the hub is unreachable). The file
has the full upstream key set (encoder, decoder_2, HuBERT with `masked_spec_embed` and a
parametrized pos conv, encoder/decoder_semantic, RVQ with its EMA buffers, fc_prior/post1/post2),
old-API weight norm with `weight_g != ||weight_v||`, and the golden's init recipe
(golden/codec_tiny/README.md) so decoded audio has a sane amplitude and encode gives varied codes.

    python -m export.tiny_codec --out DIR [--seed 0] [--size tiny|real]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from export.codec import HiggsCodec, load_codec
from export.codec_checkpoint import POS_CONV, stored_weight_normed, weight_norm_dim
from export.codec_config import CodecConfig, HubertConfig

# Widths upstream hard-codes (encoder 64, decoder 1024, semantic 768) and the config values.
SIZES = {
    "tiny": dict(
        D=32, codebook_dim=8, encoder_channels=8, decoder_channels=128,
        hidden=32, layers=2, heads=4, intermediate=64, conv=16,
    ),
    "real": dict(
        D=256, codebook_dim=64, encoder_channels=64, decoder_channels=1024,
        hidden=768, layers=12, heads=12, intermediate=3072, conv=512,
    ),
}
RATIOS = (8, 5, 4, 2, 3)
HUBERT_KERNELS = (10, 3, 3, 3, 3, 2, 2)
HUBERT_STRIDES = (5, 2, 2, 2, 2, 2, 2)


def codec_config(size: str) -> CodecConfig:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    w = SIZES[size]
    hubert = HubertConfig(
        hidden_size=w["hidden"],
        num_layers=w["layers"],
        num_heads=w["heads"],
        intermediate_size=w["intermediate"],
        conv_dims=(w["conv"],) * 7,
        conv_kernels=HUBERT_KERNELS,
        conv_strides=HUBERT_STRIDES,
        conv_bias=False,
        pos_kernel=128,
        pos_groups=16,
        layer_norm_eps=1e-5,
    )
    return CodecConfig(
        ratios=RATIOS,
        sample_rate=24000,
        semantic_sample_rate=16000,
        latent_dim=w["D"],
        codebook_dim=w["codebook_dim"],
        codebook_size=1024,
        num_quantizers=8,
        encoder_channels=w["encoder_channels"],
        decoder_channels=w["decoder_channels"],
        semantic_dim=w["hidden"],
        semantic_blocks=2,
        semantic_dilations=(1, 1),
        semantic_kernel=3,
        semantic_unit_kernel=3,
        hubert=hubert,
    )


def _config_json(c: CodecConfig, size: str) -> dict:
    """The real file's keys and order; widths upstream hard-codes go to `_tiny_overrides` (as the golden)."""
    config = {
        "n_filters": 32,
        "D": c.latent_dim,
        "codebook_dim": c.codebook_dim,
        "target_bandwidths": [0.5, 1, 1.5, 2, 4],
        "ratios": list(c.ratios),
        "sample_rate": c.sample_rate,
        "bins": c.codebook_size,
        "n_q": c.num_quantizers,
        "semantic_techer": "hubert_base_general",
    }
    if size != "real":
        h = c.hubert
        config["_tiny_overrides"] = {
            "encoder_channels": c.encoder_channels,
            "decoder_channels": c.decoder_channels,
            "semantic_dim": c.semantic_dim,
            "semantic_model_config": {
                "model_type": "hubert",
                "hidden_size": h.hidden_size,
                "num_hidden_layers": h.num_layers,
                "num_attention_heads": h.num_heads,
                "intermediate_size": h.intermediate_size,
                "hidden_act": "gelu",
                "conv_dim": list(h.conv_dims),
                "conv_kernel": list(h.conv_kernels),
                "conv_stride": list(h.conv_strides),
                "conv_bias": h.conv_bias,
                "feat_extract_norm": "group",
                "feat_extract_activation": "gelu",
                "feat_proj_layer_norm": True,
                "do_stable_layer_norm": False,
                "num_conv_pos_embeddings": h.pos_kernel,
                "num_conv_pos_embedding_groups": h.pos_groups,
                "layer_norm_eps": h.layer_norm_eps,
                "mask_time_prob": 0.05,
            },
        }
    return config


class _Init:
    """Seeded draws following the golden recipe; one generator, tensors drawn in a fixed order."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def uniform(self, shape, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(shape, generator=self.g) * (hi - lo) + lo

    def normal(self, shape, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=self.g) * std

    def default(self, shape, fan_in: int | None = None) -> torch.Tensor:
        """PyTorch's default Linear/Conv init: U(+-1/sqrt(fan_in)), fan_in = prod(shape[1:])."""
        bound = 1 / math.sqrt(fan_in or math.prod(shape[1:]))
        return self.uniform(shape, -bound, bound)

    def tensor(self, name: str, shapes: dict[str, tuple[int, ...]]) -> torch.Tensor:
        shape, leaf = shapes[name], name.rsplit(".", 1)[-1]
        if leaf == "alpha":
            return torch.exp(self.normal(shape, 0.5)).clamp(0.25, 4.0)
        if leaf == "embed":
            return self.normal(shape, 3.0)
        if "norm" in name:  # LayerNorm / GroupNorm affine
            return (1.0 if leaf == "weight" else 0.0) + self.normal(shape, 0.1)
        if leaf == "bias":
            if name.startswith(("encoder.", "decoder_2.", "encoder_semantic.", POS_CONV)):
                return self.normal(shape, 0.01)  # conv biases
            return self.default(shape, fan_in=math.prod(shapes[name[: -len("bias")] + "weight"][1:]))  # Linear
        w = self.default(shape)
        if name == "fc_prior.weight":
            return w * 8  # RVQ input on the codebook scale: varied codes, no near-ties
        if name.endswith("project_in.weight"):
            return w * 5
        return w

    def weight_norm(self, weight: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, v) with g = ||weight|| x U(0.5, 1.5) and v = weight rescaled, so g != ||v||."""
        norm = torch.norm_except_dim(weight, 2, dim)
        g = norm * self.uniform(norm.shape, 0.5, 1.5)
        return g, weight * self.uniform(norm.shape, 0.5, 2.0)


def _decoder_semantic(c: CodecConfig, init: _Init) -> dict[str, torch.Tensor]:
    """SEM.Decoder weights: saved upstream, used only by the training loss (§5)."""
    dim = c.semantic_dim
    state = {"decoder_semantic.conv1.conv.weight": init.default((dim, dim, 3))}
    for b in range(c.semantic_blocks):
        p = f"decoder_semantic.conv_blocks.{b}."
        state[p + "conv.conv.weight"] = init.default((dim, dim, 3))
        state[p + "conv.conv.bias"] = init.normal((dim,), 0.01)
        for r in range(len(c.semantic_dilations)):
            state[p + f"res_units.{r}.conv1.conv.weight"] = init.default((dim, dim, 3))
            state[p + f"res_units.{r}.conv2.weight"] = init.default((dim, dim, 1))
    state["decoder_semantic.conv2.conv.weight"] = init.default((c.hubert.hidden_size, dim, 3))
    return state


def _stored(name: str, shapes: dict[str, tuple[int, ...]], init: _Init) -> dict[str, torch.Tensor]:
    """One model tensor as upstream saves it (weight norm split, RVQ EMA buffers alongside)."""
    shape, value = shapes[name], init.tensor(name, shapes)
    if name.endswith("_codebook.embed"):
        base = name[: -len("embed")]
        return {
            base + "inited": torch.ones(1),
            base + "cluster_size": init.uniform((shape[0],), 0.0, 10.0),
            name: value,
            base + "embed_avg": value.clone(),
        }
    if not stored_weight_normed(name, len(shape)):
        return {name: value}
    module = name[: -len(".weight")]
    g, v = init.weight_norm(value, weight_norm_dim(module))
    if module == POS_CONV:  # transformers saves it through parametrizations.weight_norm
        return {module + ".parametrizations.weight.original0": g, module + ".parametrizations.weight.original1": v}
    return {module + ".weight_g": g, module + ".weight_v": v}  # old-API weight_norm (LAY:6-14)


# Top-level modules in HiggsAudioTokenizer registration order (= upstream state-dict order).
UPSTREAM_ORDER = (
    "encoder", "decoder_2", "semantic_model", "encoder_semantic", "decoder_semantic",
    "quantizer", "fc_prior", "fc_post1", "fc_post2",
)


def make_state_dict(config: CodecConfig, seed: int) -> dict[str, torch.Tensor]:
    """The upstream `model.pth` state dict for `config`, deterministic in `seed`."""
    init = _Init(seed)
    shapes = {name: tuple(t.shape) for name, t in HiggsCodec(config).state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for top in UPSTREAM_ORDER:
        if top == "decoder_semantic":
            state.update(_decoder_semantic(config, init))
        elif top == "fc_post1":  # semantic reconstruction head, training only
            state["fc_post1.weight"] = init.default((config.semantic_dim, config.quantizer_dim))
            state["fc_post1.bias"] = init.default((config.semantic_dim,), fan_in=config.quantizer_dim)
        if top == "semantic_model":  # training-time mask embedding, unused in eval
            state["semantic_model.masked_spec_embed"] = init.uniform((config.hubert.hidden_size,), 0.0, 1.0)
        for name in shapes:
            if name.split(".", 1)[0] == top:
                state.update(_stored(name, shapes, init))
    return _bias_first(state)


def _bias_first(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight norm re-registers the weight as (g, v) after the bias; reproduce that key order."""
    order = list(state)
    for key in state:
        module, leaf = key.rsplit(".", 1)
        if leaf == "bias" and stored_weight_normed(module + ".weight", 3):
            order.remove(key)
            stored = (module + ".weight_", module + ".parametrizations.")
            first = min(i for i, k in enumerate(order) if k.startswith(stored))
            order.insert(first, key)
    return {k: state[k] for k in order}


def write_tiny_codec(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Write `config.json` + `model.pth` (original layout) to `out_dir`; `load_codec` reads it back."""
    config = codec_config(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_config_json(config, size), indent=2) + "\n")
    torch.save(make_state_dict(config, seed), out / "model.pth")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write config.json + model.pth into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="tiny widths, or the real ones (~800 MB)")
    args = parser.parse_args(argv)
    out = write_tiny_codec(args.out, seed=args.seed, size=args.size)
    n = sum(p.numel() for p in load_codec(out).parameters())
    print(f"wrote {args.size} codec (seed {args.seed}, {n:,} inference parameters) to {out}")


if __name__ == "__main__":
    main()
