"""Deterministic random checkpoints in the real file layout: the embedded default model and bench sizes.

    python -m export.tiny --out DIR [--size tiny|mid|v2.5-1b|v2-3b] [--seed N] [--no-codec]

writes DIR/llm (upstream `config.json`, `model.safetensors` in bf16 with the bosonai tensor names,
sharded with `model.safetensors.index.json` above 1 GB like the real checkpoint, `tokenizer.json`
with the Llama-3 special tokens at their real ids) and DIR/codec (`config.json` + `model.pth`).

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
from .config import parse_config
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


def write_llm(out: Path, size: str = "tiny", seed: int = 0, log=print) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    raw = llm_config(size)
    config = parse_config(raw)
    generator = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(config)
    total = sum(torch.Size(s).numel() for s in shapes.values()) * 2
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for count, (name, shape) in enumerate(shapes.items(), 1):
        tensor = random_tensor(name, shape, generator)
        if name == "audio_decoder_proj.audio_lm_head.weight":
            tensor[config.stream_eos_id] *= EOS_ROW_SCALE  # codebook 0, stream EOS
        if name == "audio_decoder_proj.text_lm_head.weight":
            tensor[config.eot_token_id] *= EOT_ROW_SCALE
        nbytes = tensor.numel() * 2
        if shard_bytes and shard_bytes + nbytes > SHARD_BYTES:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += nbytes
        if count % max(1, len(shapes) // 10) == 0:
            log(f"[tiny] {size}: generated {count}/{len(shapes)} tensors")
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for index, shard in enumerate(shards, 1):
            filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / filename), metadata=metadata)
            weight_map.update({name: filename for name in shard})
            shard.clear()
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
