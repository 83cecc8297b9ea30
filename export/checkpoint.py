"""Strict, streaming loading of Higgs Audio LLM checkpoints (single or sharded safetensors).

Tensor names are those of the bosonai checkpoint (spec llm.md §2, no `model.` prefix); the
transformers layout (§2.4) is renamed to them. Loading is strict: a missing, unexpected or
mis-shaped tensor is an error that names it. Tensors are read one at a time from the memory-mapped
files and converted straight to the compute dtype, so a bf16 checkpoint loaded as bf16 never exists
as a float32 copy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from .config import HiggsConfig

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint's tensors do not match its config."""


def expected_shapes(config: HiggsConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the bosonai layout with its shape (spec §2): 14 per layer + 5."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.kv_dim
    audio_rows = config.num_codebooks * config.codebook_stride
    shapes = {
        "embed_tokens.weight": (v, h),
        "norm.weight": (h,),
        "audio_codebook_embeddings.weight": (audio_rows, h),
        "audio_decoder_proj.text_lm_head.weight": (v, h),
        "audio_decoder_proj.audio_lm_head.weight": (audio_rows, h),
    }
    for layer in range(config.num_layers):
        p = f"layers.{layer}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
            }
        )
        for mlp in ("mlp", "audio_mlp"):
            shapes.update(
                {
                    p + f"{mlp}.gate_proj.weight": (i, h),
                    p + f"{mlp}.up_proj.weight": (i, h),
                    p + f"{mlp}.down_proj.weight": (h, i),
                }
            )
        for norm in ("input_layernorm", "post_attention_layernorm", "audio_input_layernorm", "audio_post_attention_layernorm"):
            shapes[p + norm + ".weight"] = (h,)
    return shapes


# transformers layout -> bosonai layout (inverse of HF's convert_higgs_audio_v2_to_hf.py)
_TRANSFORMERS_RENAMES = (
    (re.compile(r"^model\.embed_audio_tokens\.embed_audio_tokens\."), "audio_codebook_embeddings."),
    (re.compile(r"^model\.(embed_tokens|layers|norm)\b"), r"\1"),
    (re.compile(r"^(audio_lm_head|text_lm_head)\."), r"audio_decoder_proj.\1."),
)
# Present in some saves, carry no weights we need; validated where they could be wrong.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$|^audio_codebook_weights$")
_OFFSETS = "model.embed_audio_tokens.audio_tokens_offsets"
# Training-time split tensors (spec §2.3): concatenated on dim 0, frozen part first.
_SPLIT = re.compile(r"^(?P<base>.+)\.(embedding|linear)_(?P<part>frozen|trainable)\.weight$")


def canonical_name(name: str, layout: str) -> str:
    if layout == "higgs_audio_v2":
        for pattern, replacement in _TRANSFORMERS_RENAMES:
            name = pattern.sub(replacement, name)
    return name


def checkpoint_files(checkpoint_dir: str | Path) -> list[Path]:
    root = Path(checkpoint_dir)
    index = root / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted({root / name for name in weight_map.values()})
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not there: {missing}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors in {root}: CHECKPOINT must point at the model directory")
    return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]]:
    """(name, loader, shape) for every tensor, without reading any data yet."""
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                yield name, (lambda path=path, name=name: _read(path, name)), shape


def _read(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def tensor_loaders(checkpoint_dir: str | Path, config: HiggsConfig) -> dict[str, Callable[[], torch.Tensor]]:
    """Check every tensor's name and shape; returns bosonai names (in `expected_shapes` order) -> a loader
    that reads that one tensor in the checkpoint's dtype (export/streamed.py reads them one at a time)."""
    files = checkpoint_files(checkpoint_dir)
    expected = expected_shapes(config)
    found: dict[str, tuple[Callable[[], torch.Tensor], tuple[int, ...]]] = {}
    split_parts: dict[str, dict[str, tuple[Callable[[], torch.Tensor], tuple[int, ...]]]] = {}
    unexpected: list[str] = []
    for raw_name, loader, shape in _iter_tensors(files):
        if _IGNORED.search(raw_name):
            continue
        if raw_name == _OFFSETS:
            offsets = loader()
            want = torch.arange(config.num_codebooks) * config.codebook_stride
            if not torch.equal(offsets.to(torch.int64), want):
                raise CheckpointError(f"{raw_name} = {offsets.tolist()}, expected stride {config.codebook_stride}: {want.tolist()}")
            continue
        name = canonical_name(raw_name, config.layout)
        split = _SPLIT.match(name)
        if split:
            split_parts.setdefault(split["base"] + ".weight", {})[split["part"]] = (loader, shape)
            continue
        if name not in expected:
            unexpected.append(raw_name)
            continue
        if name in found:
            raise CheckpointError(f"tensor {name} appears twice in {checkpoint_dir} (as {raw_name})")
        found[name] = (loader, shape)
    for name, parts in split_parts.items():
        if set(parts) != {"frozen", "trainable"} or name in found:
            raise CheckpointError(f"{name}: expected exactly one frozen + one trainable part, got {sorted(parts)}")
        frozen, trainable = parts["frozen"], parts["trainable"]
        shape = (frozen[1][0] + trainable[1][0],) + tuple(frozen[1][1:])
        found[name] = ((lambda f=frozen[0], t=trainable[0]: torch.cat([f(), t()], dim=0)), shape)

    missing = sorted(set(expected) - set(found))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {sorted(unexpected)[:8]}{' ...' if len(unexpected) > 8 else ''}")
    wrong = [f"{n}: {found[n][1]} != expected {expected[n]}" for n in sorted(found) if n in expected and found[n][1] != expected[n]]
    if wrong:
        problems.append(f"mis-shaped tensors ({len(wrong)}): {wrong[:8]}")
    if problems:
        raise CheckpointError(f"checkpoint {checkpoint_dir} does not match its config.json: " + "; ".join(problems))
    return {name: found[name][0] for name in expected}


def load_state_dict(
    checkpoint_dir: str | Path,
    config: HiggsConfig,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Read and check every tensor; returns bosonai names -> tensors in `dtype`."""
    loaders = tensor_loaders(checkpoint_dir, config)
    state: dict[str, torch.Tensor] = {}
    for count, (name, load) in enumerate(loaders.items(), 1):
        state[name] = load().to(dtype)
        if progress:
            progress(count, len(loaders))
    return state
