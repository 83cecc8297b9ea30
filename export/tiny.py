"""Deterministic random checkpoints in the real file layout: the embedded default model and bench sizes.

    python -m export.tiny --out DIR [--size tiny|mid|v2.5-1b|v2-3b] [--seed N] [--no-codec]

writes DIR/llm (upstream `config.json`, `model.safetensors` in bf16 with the bosonai tensor names,
sharded with `model.safetensors.index.json` above 1 GiB like the real checkpoint, `tokenizer.json`
with the Llama-3 special tokens at their real ids) and DIR/codec (`config.json` + `model.pth`).
Shards are generated and saved one at a time, so the 3B needs about one shard of memory, not 11.5 GB.

Random weights would never stop talking, so, as the goldens do, the stream-EOS row of codebook 0 in
the audio head is scaled up (greedy audio ends by itself within a few seconds) and so is the
`<|eot_id|>` row of the text head (after `<|audio_eos|>` the model ends its turn).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_FILE, expected_shapes
from .config import HiggsConfig, parse_config
from .tiny_codec import write_tiny_codec
from .tiny_tokenizer import write_tiny_tokenizer

# (layers, hidden, heads, kv heads, head dim, intermediate)
SIZES = {
    "tiny": (2, 64, 4, 2, 16, 128),
    "mid": (8, 512, 8, 2, 64, 1536),
    "v2.5-1b": (16, 2048, 32, 8, 64, 8192),  # Llama-3.2-1B shape (spec §1.2: V2.5 is ~1B, DualFFN)
    "v2-3b": (28, 3072, 24, 8, 128, 8192),  # the released 3B (spec §1.1)
}
EOS_ROW_SCALE = 1.5  # calibrated: greedy audio of typical prompts ends after 1-5 s
EOT_ROW_SCALE = 6.0
SHARD_BYTES = 1 << 30


def llm_config(size: str) -> dict:
    """config.json in the upstream HiggsAudioConfig layout (the keys the real 3B file has that matter)."""
    layers, hidden, heads, kv_heads, head_dim, intermediate = SIZES[size]
    return {
        "architectures": ["HiggsAudioModel"],
        "model_type": "higgs_audio",
        "audio_adapter_type": "dual_ffn_fast_forward",
        "audio_dual_ffn_layers": list(range(layers)),
        "use_audio_out_self_attention": False,
        "audio_num_codebooks": 8,
        "audio_codebook_size": 1024,
        "audio_stream_bos_id": 1024,
        "audio_stream_eos_id": 1025,
        "use_delay_pattern": True,
        "audio_embed_avg": False,
        "use_audio_out_embed_projector": False,
        "audio_decoder_proj_num_layers": 0,
        "use_rq_transformer": False,
        "skip_audio_tower": True,
        "encode_whisper_embed": False,
        "encode_audio_in_tokens": True,
        "audio_ffn_hidden_size": hidden,
        "audio_ffn_intermediate_size": intermediate,
        "audio_in_token_idx": 128015,
        "audio_out_token_idx": 128016,
        "audio_out_bos_token_id": 128013,
        "audio_eos_token_id": 128012,
        "pad_token_id": 128001,
        "hidden_size": hidden,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "llama",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "intermediate_size": intermediate,
            "hidden_act": "silu",
            "vocab_size": 128256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "max_position_embeddings": 131072,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": True,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
        },
    }


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """bf16 directly (no float32 copy of a 3B model); scales keep activations O(1) through the layers."""
    if name.endswith("layernorm.weight") or name == "norm.weight":
        return (torch.rand(shape, generator=generator) + 0.5).to(torch.bfloat16)
    tensor = torch.randn(shape, generator=generator, dtype=torch.bfloat16)
    if "embed" not in name:
        tensor /= shape[-1] ** 0.5  # fan-in scaling for projections and heads
    return tensor


def checkpoint_tensor(name: str, shape: tuple[int, ...], config: HiggsConfig, generator: torch.Generator) -> torch.Tensor:
    """One tensor as it is saved: random, with the EOS / EOT rows scaled so greedy decoding ends."""
    tensor = random_tensor(name, shape, generator)
    if name == "audio_decoder_proj.audio_lm_head.weight":
        tensor[config.stream_eos_id] *= EOS_ROW_SCALE  # codebook 0, stream EOS
    if name == "audio_decoder_proj.text_lm_head.weight":
        tensor[config.eot_token_id] *= EOT_ROW_SCALE
    return tensor


def shard_plan(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Consecutive tensor names filled greedily up to `shard_bytes` of bf16 (a larger tensor gets a shard
    of its own). Decided from the shapes alone, so every file name (`-of-N`) is known before the first
    tensor is generated and each shard can be saved as soon as it is made."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        if filled and filled + nbytes > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes
    return shards


def _write_shard(path: Path, names: list[str], shapes: dict[str, tuple[int, ...]], config: HiggsConfig,
                 generator: torch.Generator) -> int:
    """Generates and saves one shard; returns its bytes. The tensors live only in this call, so they are
    freed before the next shard is generated: peak memory is one shard, not the model (11.5 GB at 3B)."""
    tensors = {name: checkpoint_tensor(name, shapes[name], config, generator) for name in names}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def write_llm(out: Path, size: str = "tiny", seed: int = 0, log=print, shard_bytes: int = SHARD_BYTES) -> Path:
    """One `model.safetensors` when the model fits in `shard_bytes` (the tiny default), else HF-style
    `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, written shard by shard.
    Tensors come from one generator in `expected_shapes` order, so their values do not depend on
    `shard_bytes`."""
    out.mkdir(parents=True, exist_ok=True)
    raw = llm_config(size)
    config = parse_config(raw)
    shapes = expected_shapes(config)
    plan = shard_plan(shapes, shard_bytes)
    if len(plan) == 1:
        filenames = ["model.safetensors"]
    else:
        filenames = [f"model-{index:05d}-of-{len(plan):05d}.safetensors" for index in range(1, len(plan) + 1)]
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    total = 0
    for filename, names in zip(filenames, plan):
        nbytes = _write_shard(out / filename, names, shapes, config, generator)
        total += nbytes
        log(f"[tiny] {size}: {filename} {nbytes / 1e9:.2f} GB ({len(names)} tensors), {time.time() - started:.0f} s")
    if len(plan) > 1:
        weight_map = {name: filename for filename, names in zip(filenames, plan) for name in names}
        with open(out / INDEX_FILE, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(out / "config.json", "w") as f:
        json.dump(raw, f, indent=2)
    write_tiny_tokenizer(out / "tokenizer.json")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-codec", action="store_true", help="only the LLM (e.g. for backbone benchmarks)")
    args = parser.parse_args(argv)
    started = time.time()
    write_llm(args.out / "llm", args.size, args.seed)
    print(f"[tiny] wrote {args.out / 'llm'} ({args.size})")
    if not args.no_codec:
        write_tiny_codec(args.out / "codec", seed=args.seed)
        print(f"[tiny] wrote {args.out / 'codec'}")
    print(f"[tiny] done in {time.time() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
