"""`audio_sampler.onnx`: the audio step's sampling as a graph that runs next to the logits.

Per codebook row of the audio logits (B, N, C+2) it applies upstream's warpers (temperature, top-k,
top-p; HF transformers 4.46, spec llm.md §5.6), draws one code by inverse CDF at a uniform number
supplied by the host, and draws a second code from the unwarped softmax at a second uniform (the
repetition-aware-sampling redraw, spec §5.6); greedy rows (temperature 0) take the first maximum.
The host keeps its per-request random generators (so a seeded request draws the same codes
whatever shares its batch), sends 2 uniforms per row and copies back 2 codes per row instead of the
C+2 logits, and only decides per row which of the two codes RAS keeps.

Why a whole-row sort: top-k and top-p both keep a prefix of the row sorted by value (top-k every
entry >= the k-th largest, ties included; top-p removes the ascending-order entries whose cumulative
probability is <= 1 - top_p, which in descending order is a suffix), so one full `TopK` (K = C+2)
gives the kept set as a prefix and the draw walks the same sorted row. The draw order is the
sorted order (the host's `engines.sampling.categorical` walks index order), so for the same
uniform the two may pick different codes of the same distribution.

Only ops that ONNX Runtime and the TensorRT ONNX parser both support are used, within the parser's
limits (onnx-tensorrt docs/operators.md, the TensorRT 10 matrix that lists TensorScatter): TopK with
`sorted` 1 and K < 3840 (the audio row is 1026 wide), CumSum with a constant `axis`, ReduceSum /
Unsqueeze / Squeeze with constant axes, Softmax, GatherElements, ArgMax (select_last_index 0),
comparisons, Where. Everything stays float32 / int64 (TensorRT's float64 support is limited).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.manifest import SAMPLER

from .onnx_export import OPSET, describe_values

OUTPUTS = ("codes", "ras_codes")


def build_audio_sampler(num_codebooks: int, width: int) -> onnx.ModelProto:
    """The sampler graph for audio logits (batch, num_codebooks, width).

    Inputs: audio_logits float32 (B, N, W); temperature float32 (B,) (0 = greedy); top_k int64 (B,)
    (<= 0 or >= W = off); tail_mass float32 (B,): float32(1 - top_p), the cumulative probability at
    or below which top-p removes an entry (< 0 = top-p off); uniforms float32 (B, 2, N) in [0, 1):
    [:, 0] the draw, [:, 1] the RAS redraw. Outputs: codes, ras_codes int64 (B, N).
    """
    nodes: list[onnx.NodeProto] = []
    inits = [
        numpy_helper.from_array(np.array(v, dtype), name)
        for name, v, dtype in (
            ("zero_f", 0.0, np.float32), ("one_f", 1.0, np.float32), ("neg_inf", -np.inf, np.float32),
            ("zero_i", 0, np.int64), ("one_i", 1, np.int64), ("width_i", width, np.int64),
            ("k_sort", [width], np.int64), ("last_axis", -1, np.int64), ("axes_12", [1, 2], np.int64),
            ("axes_last", [-1], np.int64), ("axes_1", [1], np.int64),
            ("first_position", np.arange(width) == 0, bool),
            ("slice_0", [0], np.int64), ("slice_1", [1], np.int64), ("slice_2", [2], np.int64),
        )
    ]

    def op(kind: str, inputs: list[str], output: str | list[str], **attrs) -> str | list[str]:
        outputs = [output] if isinstance(output, str) else output
        nodes.append(helper.make_node(kind, inputs, outputs, name=outputs[0], **attrs))
        return output

    def per_batch(name: str) -> str:  # (B,) -> (B, 1, 1), broadcast over codebooks and entries
        return op("Unsqueeze", [name, "axes_12"], f"{name}_b11")

    def draw(probs: str, u: str, prefix: str) -> str:
        """Inverse CDF over a row of probabilities in sorted order -> position (B, N, 1) of a positive entry."""
        cdf = op("CumSum", [probs, "last_axis"], f"{prefix}_cdf")
        total = op("ReduceSum", [probs, "axes_last"], f"{prefix}_total", keepdims=1)
        target = op("Mul", [u, total], f"{prefix}_target")
        below = op("Cast", [op("LessOrEqual", [cdf, target], f"{prefix}_le")], f"{prefix}_le_i", to=TensorProto.INT64)
        count = op("ReduceSum", [below, "axes_last"], f"{prefix}_count", keepdims=1)
        positive = op("Cast", [op("Greater", [probs, "zero_f"], f"{prefix}_gt")], f"{prefix}_gt_i", to=TensorProto.INT64)
        last = op("Sub", [op("ReduceSum", [positive, "axes_last"], f"{prefix}_npos", keepdims=1), "one_i"], f"{prefix}_last")
        return op("Min", [count, last], f"{prefix}_pos")  # rounding of u * total up to the total: the last positive entry

    # temperature; greedy rows are divided by 1 (their sort order is that of the raw logits)
    t = per_batch("temperature")
    greedy = op("Equal", [t, "zero_f"], "greedy")
    scaled = op("Div", ["audio_logits", op("Where", [greedy, "one_f", t], "divisor")], "scaled")
    values, order = op("TopK", [scaled, "k_sort"], ["sorted_values", "sorted_order"], axis=-1, largest=1, sorted=1)

    # top-k: keep values >= the k-th largest (ties kept)
    k = per_batch("top_k")
    k_off = op("Or", [op("LessOrEqual", [k, "zero_i"], "k_le0"), op("GreaterOrEqual", [k, "width_i"], "k_geW")], "k_off")
    kth_position = op("Where", [k_off, op("Sub", ["width_i", "one_i"], "width_m1"), op("Sub", [k, "one_i"], "k_m1")], "kth_pos")
    rows_shape = op("Slice", [op("Shape", ["audio_logits"], "logits_shape"), "slice_0", "slice_2"], "rows_shape")
    index_shape = op("Concat", [rows_shape, "slice_1"], "index_shape", axis=0)
    kth = op("GatherElements", [values, op("Expand", [kth_position, index_shape], "kth_index")], "kth", axis=-1)
    keep_k = op("GreaterOrEqual", [values, kth], "keep_k")

    # top-p: in descending order the ascending cumulative probability is the reverse cumulative sum
    probs_k = op("Softmax", [op("Where", [keep_k, values, "neg_inf"], "after_k")], "probs_k", axis=-1)
    ascending_cum = op("CumSum", [probs_k, "last_axis"], "ascending_cum", reverse=1)
    drop_p = op("LessOrEqual", [ascending_cum, per_batch("tail_mass")], "drop_p")
    keep = op("And", [keep_k, op("Or", [op("Not", [drop_p], "not_drop_p"), "first_position"], "keep_p")], "keep")
    probs = op("Softmax", [op("Where", [keep, values, "neg_inf"], "processed")], "probs", axis=-1)

    # uniforms (B, 2, N) -> draw (B, N, 1), RAS (B, N, 1)
    u = op("Transpose", ["uniforms"], "uniforms_t", perm=[0, 2, 1])
    u_draw = op("Slice", [u, "slice_0", "slice_1", "last_axis"], "u_draw")
    u_ras = op("Slice", [u, "slice_1", "slice_2", "last_axis"], "u_ras")

    drawn = op("GatherElements", [order, draw(probs, u_draw, "draw")], "drawn", axis=-1)
    first_max = op("ArgMax", ["audio_logits"], "first_max", axis=-1, keepdims=1, select_last_index=0)
    op("Squeeze", [op("Where", [greedy, first_max, drawn], "codes_3d"), "axes_last"], "codes")

    # RAS: the unwarped softmax, walked in the same sorted order (temperature keeps the order)
    raw_probs = op("Softmax", [op("GatherElements", ["audio_logits", order], "raw_sorted", axis=-1)], "raw_probs", axis=-1)
    ras = op("GatherElements", [order, draw(raw_probs, u_ras, "ras")], "ras_3d", axis=-1)
    op("Squeeze", [ras, "axes_last"], "ras_codes")

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = helper.make_graph(
        nodes,
        SAMPLER,
        [
            helper.make_tensor_value_info("audio_logits", f32, ["batch", num_codebooks, width]),
            helper.make_tensor_value_info("temperature", f32, ["batch"]),
            helper.make_tensor_value_info("top_k", i64, ["batch"]),
            helper.make_tensor_value_info("tail_mass", f32, ["batch"]),
            helper.make_tensor_value_info("uniforms", f32, ["batch", 2, num_codebooks]),
        ],
        [helper.make_tensor_value_info(name, i64, ["batch", num_codebooks]) for name in OUTPUTS],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="higgs-onnx")
    onnx.checker.check_model(model, full_check=True)
    return model


def export_audio_sampler(num_codebooks: int, width: int, path: Path) -> dict:
    """Write the sampler graph; returns its manifest entry (reads no weights)."""
    model = build_audio_sampler(num_codebooks, width)
    onnx.save(model, str(path))
    return {"file": path.name, "inputs": describe_values(model.graph.input), "outputs": describe_values(model.graph.output),
            "reads": {}, "weight_bytes": 0}
