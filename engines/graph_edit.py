"""Runtime-specific copies of the exported graphs, edited as protos without loading the weights.

The exported graphs are the one portable form; a runtime that needs something else gets an edited
copy written next to `weights.bin` (so the relative external-data references still resolve), used,
and removed. TensorRT's edits are in engines/trt/static_cache.py; ONNX Runtime CUDA's is here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

SINGLE_TOKEN = "higgs_single_token"  # the If condition: the call feeds one position
MASK_INPUT, NONPAD_INPUT = 3, 6  # ONNX Attention-24 inputs: Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen


@contextlib.contextmanager
def edited_graph(path: Path, edit: Callable, tag: str):
    """A hidden copy of the graph at `path` with `edit(model)` applied in place, beside the original
    (its external data references resolve as before); removed when the block ends."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    edit(model)
    copy = path.parent / f".{path.stem}.{tag}.{os.getpid()}.onnx"
    onnx.save(model, str(copy))
    try:
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def attention_nodes(model) -> list:
    nodes = [n for n in model.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    if not nodes:
        raise ValueError("the graph has no Attention node: not a backbone graph of this exporter")
    return nodes


def unmasked_single_token_attention(model) -> int:
    """Give every Attention a branch without the mask for calls of one position, in place; returns
    how many nodes.

    For one new position the mask (`key <= position`) says nothing `nonpad_kv_seqlen`
    (= position + 1) does not, but onnxruntime-gpu 1.31.1's CUDA Attention leaves Flash Attention
    whenever both are given ("Both nonpad_kv_seqlen and attn_mask provided. Flash Attention does not
    support this combination; falling back to Memory Efficient Attention or Unfused path", in
    libonnxruntime_providers_cuda.so). Prompt runs of several positions still need the causal mask,
    and the same text / audio graph serves both, so each Attention becomes
    `If(T == 1, Attention without the mask, Attention as exported)`, T read from the first graph
    input's dim 1 (input_ids (B, T) / audio_codes (B, T, N)).
    """
    import onnx
    from onnx import helper

    graph = model.graph
    nodes = attention_nodes(model)
    cache_type = next(v.type.tensor_type.elem_type for v in graph.input if v.name.startswith("past_key_"))
    length, one = f"{SINGLE_TOKEN}/length", f"{SINGLE_TOKEN}/one"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), one))
    condition = [
        helper.make_node("Shape", [graph.input[0].name], [length], start=1, end=2, name=length),
        helper.make_node("Equal", [length, one], [SINGLE_TOKEN], name=SINGLE_TOKEN),
    ]
    for index, node in enumerate(nodes):
        output, name = node.output[0], node.name or f"attention_{index}"
        branches = {}
        for branch, mask in (("single", ""), ("masked", node.input[MASK_INPUT])):
            inner = onnx.NodeProto()
            inner.CopyFrom(node)
            inner.input[MASK_INPUT] = mask
            inner.output[0] = f"{output}/{branch}"
            inner.name = f"{name}/{branch}"
            branches[branch] = helper.make_graph([inner], f"{name}_{branch}", [],
                                                 [helper.make_tensor_value_info(inner.output[0], cache_type, None)])
        wrapped = helper.make_node("If", [SINGLE_TOKEN], [output], name=f"{name}/if",
                                   then_branch=branches["single"], else_branch=branches["masked"])
        node.CopyFrom(wrapped)
    for position, node in enumerate(condition):  # first: the graph input is all it reads
        graph.node.insert(position, node)
    return len(nodes)
