"""ONNX export of the backbone: three graphs over one shared weights file.

* `backbone_prefill`: mixed text/audio positions with the routing mask as input (the prompt);
* `backbone_text`: text positions only (text steps; also text runs of a prompt);
* `backbone_audio`: audio positions only (audio steps, the hot loop; also audio runs of a prompt).

All three take and return the per-layer static KV cache (see docs/design.md) and write the new
K/V with `TensorScatter`; attention is ONNX `Attention` with GQA. The exporter folds transposes
into new initializers with generated names; `consolidate_weights` renames every initializer after
the checkpoint tensor it came from (by content) and stores each distinct tensor once in
`weights.bin`, which all graphs reference as external data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxscript
import torch
from torch import nn

from engines.manifest import BACKBONE_GRAPHS, MANIFEST_FILE, WEIGHTS_FILE

from .llm import KV, HiggsAudioBackbone, Mode

OPSET = 24
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # make export DTYPE=
ALIGN = 4096  # page-aligned tensors let runtimes memory-map the weights

_op = onnxscript.values.Opset("", OPSET)



def _translations() -> dict:
    def kv_write(cache, update, write_index):
        return _op.TensorScatter(cache, update, write_index, axis=2)

    def attention(q, k, v, mask, kv_length):
        # softmax in float32 whatever the compute dtype (TensorRT is strongly typed); Q arrives
        # pre-scaled (export/llm.py `attention`), so scale=1 keeps TensorRT from scaling the cache
        return _op.Attention(q, k, v, mask, None, None, kv_length, scale=1.0, softmax_precision=1)[0]

    return {torch.ops.higgs.kv_write.default: kv_write, torch.ops.higgs.attention.default: attention}


class _Graph(nn.Module):
    """Flat tensor signature around one backbone mode (ONNX wants positional tensors)."""

    def __init__(self, model: HiggsAudioBackbone, mode: Mode):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, *args):
        *inputs, past = args
        pairs: list[KV] = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        if self.mode is Mode.MIXED:
            input_ids, audio_codes, audio_mask, cache_lengths, last_index = inputs
        elif self.mode is Mode.TEXT:
            (input_ids, cache_lengths, last_index), audio_codes, audio_mask = inputs, None, None
        else:
            (audio_codes, cache_lengths, last_index), input_ids, audio_mask = inputs, None, None
        text, audio, present = self.model(self.mode, input_ids, audio_codes, audio_mask, cache_lengths, last_index, pairs)
        logits = tuple(x for x in (text, audio) if x is not None)
        return (*logits, *[t for kv in present for t in kv])


def _graph_io(mode: Mode, num_layers: int) -> tuple[list[str], list[str]]:
    inputs = {
        Mode.MIXED: ["input_ids", "audio_codes", "audio_mask"],
        Mode.TEXT: ["input_ids"],
        Mode.AUDIO: ["audio_codes"],
    }[mode] + ["cache_lengths", "last_index"]
    outputs = {Mode.MIXED: ["text_logits", "audio_logits"], Mode.TEXT: ["text_logits"], Mode.AUDIO: ["audio_logits"]}[mode]
    cache = [f"{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    return inputs + [f"past_{c}" for c in cache], outputs + [f"present_{c}" for c in cache]


def export_backbone_graph(model: HiggsAudioBackbone, mode: Mode, path: Path) -> None:
    """torch.onnx (dynamo) export of one mode to `path` (+ `path.data` external weights)."""
    trace_backbone_graph(model, mode).save(str(path), external_data=True)


def trace_backbone_graph(model: HiggsAudioBackbone, mode: Mode, optimize: bool = True):
    """The torch.onnx (dynamo) ONNXProgram of one mode (export/streamed.py traces it on fake weights)."""
    cfg = model.config
    dtype = model.embed_tokens.weight.dtype
    batch, length, max_len = 3, 5, 32  # distinct sizes so no dimension gets specialised
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    seq_dim = torch.export.Dim("seq", min=1, max=1 << 20)
    len_dim = torch.export.Dim("max_len", min=2, max=1 << 22)
    example = {
        "input_ids": (torch.zeros(batch, length, dtype=torch.int64), {0: batch_dim, 1: seq_dim}),
        "audio_codes": (torch.zeros(batch, length, cfg.num_codebooks, dtype=torch.int64), {0: batch_dim, 1: seq_dim}),
        "audio_mask": (torch.zeros(batch, length, dtype=torch.bool), {0: batch_dim, 1: seq_dim}),
        "cache_lengths": (torch.tensor([0, 3, 7]), {0: batch_dim}),
        "last_index": (torch.full((batch,), length - 1), {0: batch_dim}),
    }
    input_names, output_names = _graph_io(mode, cfg.num_layers)
    plain = [n for n in input_names if not n.startswith("past_")]
    cache_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    past = [torch.zeros(cache_shape, dtype=dtype) for _ in range(2 * cfg.num_layers)]
    args = tuple(example[n][0] for n in plain) + (past,)
    dynamic = tuple(example[n][1] for n in plain) + ([{0: batch_dim, 2: len_dim}] * len(past),)
    model.functional_cache = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")  # shared on purpose
            program = torch.onnx.export(
                _Graph(model, mode).eval(),
                args,
                dynamo=True,
                opset_version=OPSET,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes={"args": dynamic},
                custom_translation_table=_translations(),
                optimize=optimize,
                verbose=False,
            )
    finally:
        model.functional_cache = False
    return program


# --- weights: one file, canonical names ------------------------------------------------------------


def _param_hashes(model: HiggsAudioBackbone) -> dict[str, str]:
    """sha256 of every parameter (and of its transpose, for 2-D ones) -> parameter name."""
    names: dict[str, str] = {}
    for name, param in model.named_parameters():
        data = param.detach()
        for suffix, view in (("", data), (".T", data.t() if data.dim() == 2 else None)):
            if view is None:
                continue
            digest = hashlib.sha256(_tensor_bytes(view)).hexdigest()
            names.setdefault(digest, name + suffix)
    return names


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    t = tensor.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def external_location(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    """Where an external tensor's bytes are: (file, offset, length)."""
    info = {e.key: e.value for e in tensor.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def point_to_weights(tensor: onnx.TensorProto, offset: int, length: int) -> None:
    """Make `tensor` read its bytes from the shared weights file at `offset` (ONNX external data)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _read_initializer(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        location, offset, length = external_location(tensor)
        with open(base_dir / location, "rb") as f:
            f.seek(offset)
            return f.read(length)
    return onnx.numpy_helper.to_array(tensor).tobytes()


class WeightStore:
    """Appends distinct tensors to weights.bin (page aligned) and remembers where they went."""

    def __init__(self, out_dir: Path, param_names: dict[str, str]):
        self.path = out_dir / WEIGHTS_FILE
        self.param_names = param_names
        self.entries: dict[str, tuple[str, int, int]] = {}  # sha -> (name, offset, length)
        self._file = open(self.path, "wb")

    def name_of(self, data: bytes) -> str | None:
        """The checkpoint tensor these bytes are (or are the transpose of), if any."""
        return self.param_names.get(hashlib.sha256(data).hexdigest())

    def add(self, data: bytes, fallback_name: str) -> tuple[str, int, int]:
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self.entries:
            offset = self._file.tell()
            pad = (-offset) % ALIGN
            self._file.write(b"\0" * pad)
            name = self.param_names.get(digest, fallback_name)
            self.entries[digest] = (name, offset + pad, len(data))
            self._file.write(data)
        return self.entries[digest]

    def close(self) -> None:
        self._file.close()


def consolidate_weights(raw_path: Path, final_path: Path, store: WeightStore) -> list[str]:
    """Rewrite one exported graph so its large initializers live in the shared weights file."""
    model = onnx.load(str(raw_path), load_external_data=False)
    renames: dict[str, str] = {}
    used: set[str] = set()
    for tensor in model.graph.initializer:
        data = _read_initializer(tensor, raw_path.parent)
        if store.name_of(data) is None and len(data) < ALIGN:  # graph constants stay inline
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                array = np.frombuffer(data, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tensor.dims)
                tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
            continue
        fallback = re.sub(r"^model\.", "", tensor.name)
        name, offset, length = store.add(data, fallback)
        if name in used:  # two different tensors of this graph share bytes: keep names unique
            name = f"{name}#{offset}"
        used.add(name)
        renames[tensor.name] = name
        tensor.name = name
        point_to_weights(tensor, offset, length)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    onnx.save(model, str(final_path))
    return sorted(renames.values())


# --- manifest helpers ------------------------------------------------------------------------------

_WEIGHT_GROUPS = (
    ("text_embedding", r"^embed_tokens\."),
    ("audio_embedding", r"^audio_codebook_embeddings\."),
    ("attention", r"\.self_attn\."),
    ("text_norms", r"\.(input_layernorm|post_attention_layernorm)\."),
    ("audio_norms", r"\.audio_(input_layernorm|post_attention_layernorm)\."),
    ("text_ffn", r"\.mlp\."),
    ("audio_ffn", r"\.audio_mlp\."),
    ("final_norm", r"^norm\."),
    ("text_head", r"text_lm_head"),
    ("audio_head", r"audio_lm_head"),
)


def weight_group(name: str) -> str:
    for group, pattern in _WEIGHT_GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def describe_values(values) -> list[dict]:
    out = []
    for value in values:
        tensor_type = value.type.tensor_type
        out.append(
            {
                "name": value.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in tensor_type.shape.dim],
            }
        )
    return out


def graph_entry(path: Path, weights: list[str], sizes: dict[str, int]) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    reads: dict[str, int] = defaultdict(int)
    for name in weights:
        reads[weight_group(name)] += sizes[name]
    return {
        "file": path.name,
        "inputs": describe_values(model.graph.input),
        "outputs": describe_values(model.graph.output),
        "reads": dict(sorted(reads.items())),
        "weight_bytes": int(sum(reads.values())),
    }


def export_backbone(
    model: HiggsAudioBackbone,
    out_dir: Path,
    log: Callable[[str], None] = print,
) -> dict:
    """Export the three backbone graphs into out_dir; returns their manifest entries."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log("hashing checkpoint tensors to name the exported weights")
    store = WeightStore(out_dir, _param_hashes(model))
    entries = {}
    weights_by_graph = {}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        for key, mode in (("prefill", Mode.MIXED), ("text", Mode.TEXT), ("audio", Mode.AUDIO)):
            started = time.time()
            log(f"exporting {BACKBONE_GRAPHS[key]} ({mode.value} positions)")
            raw = Path(tmp) / BACKBONE_GRAPHS[key]
            export_backbone_graph(model, mode, raw)
            weights_by_graph[key] = consolidate_weights(raw, out_dir / BACKBONE_GRAPHS[key], store)
            for leftover in Path(tmp).iterdir():
                leftover.unlink()
            log(f"  done in {time.time() - started:.1f}s")
    store.close()
    sizes = {name: length for name, _, length in store.entries.values()}
    for key, weights in weights_by_graph.items():
        # a '#offset' suffix marks a byte-identical twin of another tensor of the same graph
        entries[key] = graph_entry(out_dir / BACKBONE_GRAPHS[key], weights, {w: sizes[w.split("#")[0]] for w in weights})
    log(f"weights.bin: {os.path.getsize(store.path) / 2**20:.1f} MiB shared by {len(entries)} graphs")
    return entries


def copy_if_present(src: Path, dst: Path) -> bool:
    if src.is_file():
        shutil.copyfile(src, dst)
        return True
    return False


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = out_dir / MANIFEST_FILE
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
    return path
