"""engines/sampling.py and the sampler graph (export/onnx_sampler.py) against the upstream warper
goldens and spec llm.md §5.6 / §7.9."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engines.sampling import (
    RAS_PAD,
    GraphSampler,
    HostSampler,
    categorical,
    process_logits,
    ras_redo,
    sample,
)
from export.onnx_sampler import build_audio_sampler
from goldens import load

CASES = [f"c{i}_{kind}" for i in range(6) for kind in ("audio", "text")]


@pytest.fixture(scope="module")
def golden():
    return load("sampling")


@pytest.mark.parametrize("case", CASES)
def test_golden_warpers(golden, case):
    logits, expected = golden[f"{case}/logits"], golden[f"{case}/processed"]
    temperature, top_k, top_p = golden[f"{case}/params"]
    rows = logits.shape[0]
    out = process_logits(logits, np.full(rows, temperature), np.full(rows, int(top_k)), np.full(rows, top_p))
    kept = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(out), kept)
    assert np.all(out[~kept] == -np.inf)
    np.testing.assert_allclose(out[kept], expected[kept], rtol=0, atol=1e-6)


def test_golden_rows_batched_with_mixed_params(golden):
    """One call for rows of different requests gives each row its own golden result."""
    cases = [c for c in CASES if c.endswith("audio")]
    logits = np.concatenate([golden[f"{c}/logits"][:2] for c in cases])
    expected = np.concatenate([golden[f"{c}/processed"][:2] for c in cases])
    params = np.repeat(np.stack([golden[f"{c}/params"] for c in cases]), 2, axis=0)
    out = process_logits(logits, params[:, 0], params[:, 1].astype(int), params[:, 2])
    kept = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(out), kept)
    np.testing.assert_allclose(out[kept], expected[kept], rtol=0, atol=1e-6)


def _reference(logits, temperature, top_k, top_p):
    """Row-by-row transcription of the HF 4.46 warpers with a full stable sort."""
    out = logits.astype(np.float32).copy()
    for r in range(out.shape[0]):
        if temperature[r] == 0:
            continue
        s = out[r] / np.float32(temperature[r]) if temperature[r] != 1 else out[r]
        if 0 < top_k[r] < s.size:
            s = np.where(s < np.sort(s)[-top_k[r]], np.float32(-np.inf), s)
        if top_p[r] < 1:
            order = np.argsort(s, kind="stable")
            e = np.exp(s[order] - s.max())
            cum = np.cumsum(e / e.sum(), dtype=np.float64).astype(np.float32)
            drop = cum <= np.float32(1 - top_p[r])
            drop[-1] = False
            s = s.copy()
            s[order[drop]] = -np.inf
        out[r] = s
    return out


@pytest.mark.parametrize("shape_kind", ["flat", "ties", "underflow", "peaked"])
def test_matches_full_sort_reference(shape_kind):
    """The candidate-pruned sort gives the kept sets of a full sort, incl. ties and underflow."""
    rng = np.random.default_rng(["flat", "ties", "underflow", "peaked"].index(shape_kind))
    for vocab in (3, 1026, 20000):
        rows = 24
        logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
        if shape_kind == "ties":
            logits = np.round(logits)
        elif shape_kind == "underflow":
            logits[:, : vocab // 2] -= 300
        elif shape_kind == "peaked":
            logits[:, rng.integers(0, vocab, 3)] += 25
        temperature = rng.choice([0.0, 0.3, 1.0, 1.7], rows)
        top_k = rng.choice([0, 1, 2, 50, vocab - 1, vocab + 5], rows)
        top_p = rng.choice([0.0, 0.1, 0.5, 0.95, 1.0], rows)
        got = process_logits(logits, temperature, top_k, top_p)
        want = _reference(logits, temperature, top_k, top_p)
        np.testing.assert_array_equal(got, want)


def test_top_p_tie_at_the_maximum_keeps_one_entry():
    # two equal maxima hold 0.5 each before the last; top_p 0.1 keeps one of them: the later
    # index (a stable ascending sort puts it last; torch's unstable sort may pick either)
    out = process_logits(np.array([[0.0, 5.0, 1.0, 5.0]], np.float32), 1.0, 0, 0.1)
    np.testing.assert_array_equal(np.isfinite(out[0]), [False, False, False, True])


def test_greedy_rows_pass_through_and_argmax_first_maximum():
    logits = np.array([[1.0, 4.0, 4.0, 0.0], [1.0, 4.0, 4.0, 0.0]], np.float32)
    out = process_logits(logits, np.array([0.0, 0.5]), np.array([1, 1]), np.array([0.5, 1.0]))
    np.testing.assert_array_equal(out[0], logits[0])  # greedy row untouched
    np.testing.assert_array_equal(np.isfinite(out[1]), [False, True, True, False])
    np.testing.assert_array_equal(categorical(logits, np.array([0.99, 0.99]), greedy=np.array([True, True])), [1, 1])


def test_categorical_inverse_cdf_points():
    probs = np.array([0.1, 0.0, 0.6, 0.3])
    with np.errstate(divide="ignore"):
        logits = np.tile(np.log(probs).astype(np.float32), (5, 1))
    u = np.array([0.05, 0.11, 0.69, 0.71, 0.999])
    np.testing.assert_array_equal(categorical(logits, u), [0, 2, 2, 3, 3])


def test_categorical_wide_rows_two_level_search():
    vocab = 128256
    logits = np.full((4, vocab), -np.inf, np.float32)
    logits[:, [5, 70000, vocab - 1]] = np.log([0.2, 0.3, 0.5]).astype(np.float32)
    draws = categorical(logits, np.array([0.1, 0.45, 0.55, 0.999999]))
    np.testing.assert_array_equal(draws, [5, 70000, vocab - 1, vocab - 1])


def test_categorical_frequencies_follow_softmax():
    rng = np.random.default_rng(7)
    row = np.array([2.0, 0.0, 1.0, -1.0, 0.5, -np.inf], np.float32)
    n = 40000
    draws = categorical(np.tile(row, (n, 1)), rng.random(n))
    want = np.exp(row - row.max())
    want /= want.sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=row.size) / n, want, atol=0.01)
    assert not np.any(draws == 5)


def test_seeded_draws_reproducible_whatever_the_batch():
    """A request's draws depend only on its own generator, not on who shares the batch."""
    rng = np.random.default_rng(3)
    logits_a = rng.standard_normal((8, 1026)).astype(np.float32)
    logits_b = rng.standard_normal((8, 1026)).astype(np.float32)
    alone = sample(logits_a, 0.7, 0, 0.95, np.random.default_rng(42).random(8))
    again = sample(logits_a, 0.7, 0, 0.95, np.random.default_rng(42).random(8))
    u_batch = np.concatenate([np.random.default_rng(99).random(8), np.random.default_rng(42).random(8)])
    t, k, p = (np.repeat(v, 8) for v in ([1.3, 0.7], [20, 0], [1.0, 0.95]))
    batched = sample(np.concatenate([logits_b, logits_a]), t, k, p, u_batch)
    np.testing.assert_array_equal(alone, again)
    np.testing.assert_array_equal(batched[8:], alone)
    assert not np.array_equal(sample(logits_a, 0.7, 0, 0.95, np.random.default_rng(43).random(8)), alone)


def _windows(history: list[list[int]]) -> np.ndarray:
    """RAS windows (1, W, R) from one history row per codebook row."""
    return np.array(history).T[None]


def test_greedy_with_ras_off_is_deterministic():
    logits = np.random.default_rng(5).standard_normal((1, 8, 1026)).astype(np.float32)
    first, _ = HostSampler()(logits, np.zeros(1), np.zeros(1, int), np.ones(1), np.random.default_rng(1).random((1, 2, 8)))
    second, _ = HostSampler()(logits, np.zeros(1), np.zeros(1, int), np.ones(1), np.random.default_rng(2).random((1, 2, 8)))
    np.testing.assert_array_equal(first[0], np.argmax(logits[0], axis=1))
    np.testing.assert_array_equal(second, first)
    off = np.full((1, 7, 8), RAS_PAD)  # RAS off: all padding
    assert not ras_redo(first, off, np.array([0])).any()


def test_ras_redraws_only_rows_over_the_repeat_limit():
    # raw distribution: code 5 with 0.75, code 7 with 0.25; greedy picks 5 everywhere
    raw = np.full((1, 4, 1026), -np.inf, np.float32)
    raw[..., 5], raw[..., 7] = np.log(3.0), 0.0
    drawn, redraw = HostSampler()(raw, np.zeros(1), np.zeros(1, int), np.ones(1), np.full((1, 2, 4), 0.9))
    windows = _windows([
        [1, 5, 9, 5, 2, 3, 4],  # 5 twice -> redraw
        [1, 5, 9, 8, 2, 3, 4],  # once -> keep
        [RAS_PAD] * 5 + [5, 5],  # short history, still twice -> redraw
        [RAS_PAD] * 7,  # RAS off for this request
    ])
    np.testing.assert_array_equal(drawn, [[5, 5, 5, 5]])
    redo = ras_redo(drawn, windows, np.array([2]))
    np.testing.assert_array_equal(redo, [[True, False, True, False]])
    np.testing.assert_array_equal(redraw(redo), [7, 7])
    assert not ras_redo(drawn, windows, np.array([3])).any()
    # max_repeat 0 redraws every row whose RAS is on (as upstream), never an all-pad one
    np.testing.assert_array_equal(ras_redo(drawn, windows, np.array([0])), [[True, True, True, False]])


def test_ras_peaked_row_redraw_rate_with_seeded_generator():
    """Spec §7.9: a greedy column whose argmax already occurs twice in the window is redrawn
    from the raw softmax, so it moves away from the peak with probability 1 - p(peak)."""
    seqs = 500
    raw = np.zeros((seqs, 8, 1026), np.float32)
    raw[..., 3] = 7.0
    p_peak = np.exp(7.0) / (np.exp(7.0) + 1025)
    uniforms = np.random.default_rng(11).random((seqs, 2, 8))
    drawn, redraw = HostSampler()(raw, np.zeros(seqs), np.zeros(seqs, int), np.ones(seqs), uniforms)
    window = np.repeat(_windows([[1, 3, 9, 3, 5, 6, 8]] * 8), seqs, axis=0)  # 3 twice in the last 7
    redo = ras_redo(drawn, window, np.full(seqs, 2))
    assert np.all(drawn == 3) and redo.all()
    assert abs(np.mean(redraw(redo) != 3) - (1 - p_peak)) < 0.03


def test_invalid_parameters_are_rejected():
    logits = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="temperature"):
        process_logits(logits, -1.0, 0, 1.0)
    with pytest.raises(ValueError, match="top_p"):
        process_logits(logits, 1.0, 0, 1.5)
    with pytest.raises(ValueError, match="top_k"):
        process_logits(logits, 1.0, np.array([0, -3]), 1.0)
    with pytest.raises(ValueError, match="uniforms"):
        categorical(logits, np.array([0.5, 1.0]))


# --- the sampler graph: the same candidates as the host, drawn on the device -----------------------------


@pytest.fixture(scope="module")
def graph():
    """The exported sampler graph, with its sorted order and kept mask exposed as extra outputs."""
    model = build_audio_sampler(8, 1026)
    model.graph.output.extend([
        helper.make_tensor_value_info("sorted_order", TensorProto.INT64, None),
        helper.make_tensor_value_info("keep", TensorProto.BOOL, None),
    ])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _graph_run(graph, logits, temperature, top_k, top_p, uniforms):
    """(codes, ras_codes, kept mask in index order) of the graph for (S, 8, 1026) logits."""
    codes, ras, order, keep = graph.run(None, GraphSampler.inputs(logits, temperature, top_k, top_p, uniforms))
    kept = np.zeros(keep.shape, bool)
    np.put_along_axis(kept, order, keep, axis=-1)
    return codes, ras, kept


def _golden_batch(golden):
    cases = [c for c in CASES if c.endswith("audio")]
    logits = np.stack([golden[f"{c}/logits"] for c in cases])
    processed = np.stack([golden[f"{c}/processed"] for c in cases])
    params = np.stack([golden[f"{c}/params"] for c in cases])
    return logits, processed, params[:, 0], params[:, 1].astype(np.int64), params[:, 2]


def test_graph_and_host_keep_the_golden_sets(golden, graph):
    """All six golden cases in one batch, each with its own parameters: the graph keeps exactly the
    golden candidates, and so does the host."""
    logits, processed, t, k, p = _golden_batch(golden)
    _, _, kept = _graph_run(graph, logits, t, k, p, np.zeros((len(t), 2, 8)))
    np.testing.assert_array_equal(kept, np.isfinite(processed))
    host = process_logits(logits.reshape(-1, 1026), np.repeat(t, 8), np.repeat(k, 8), np.repeat(p, 8))
    np.testing.assert_array_equal(kept.reshape(-1, 1026), np.isfinite(host))


def _midpoints(processed_row: np.ndarray, min_width: float = 1e-4):
    """(candidate, u) pairs: the middle of each kept candidate's interval of the inverse CDF walked in
    descending value order (ties: lower index first), from the golden processed logits in float64."""
    kept = np.flatnonzero(np.isfinite(processed_row))
    order = kept[np.lexsort((kept, -processed_row[kept].astype(np.float64)))]
    probs = np.exp(processed_row[order].astype(np.float64) - processed_row[order].max())
    cdf = np.cumsum(probs / probs.sum())
    lo = np.r_[0.0, cdf[:-1]]
    wide = cdf - lo >= min_width  # narrower intervals are within float32 rounding of their neighbours
    return order[wide], ((lo + cdf) / 2)[wide]


def test_graph_draws_walk_the_golden_distribution(golden, graph):
    """u at the middle of a candidate's CDF interval draws that candidate, for every golden row."""
    logits, processed, t, k, p = _golden_batch(golden)
    for case in range(len(t)):
        for row in range(8):
            want, u = _midpoints(processed[case, row])
            rows = len(u)
            uniforms = np.zeros((rows, 2, 8))
            uniforms[:, 0, row] = u
            codes, _, _ = _graph_run(graph, np.repeat(logits[case : case + 1], rows, axis=0), np.full(rows, t[case]),
                                     np.full(rows, k[case]), np.full(rows, p[case]), uniforms)
            np.testing.assert_array_equal(codes[:, row], want)


def test_graph_greedy_takes_the_first_maximum_and_ras_draws_the_raw_softmax(graph):
    logits = np.zeros((3, 8, 1026), np.float32)
    logits[:, :, 9] = logits[:, :, 4] = 6.0  # tie: the first maximum is 4
    logits[:, :, 1025] = -np.inf
    raw = logits[0, 0].astype(np.float64)
    want, u = _midpoints(raw)  # the raw softmax, unwarped: temperature and top-k must not touch the redraw
    picks = np.linspace(0, len(u) - 1, 3).astype(int)
    uniforms = np.full((3, 2, 8), 0.999)
    uniforms[:, 1, :] = u[picks, None]
    codes, ras, _ = _graph_run(graph, logits, [0.0, 0.0, 0.0], [0, 1, 1], [1.0, 1.0, 1.0], uniforms)
    assert np.all(codes == 4)
    np.testing.assert_array_equal(ras, np.repeat(want[picks, None], 8, axis=1))
    assert not np.any(ras == 1025)


@pytest.mark.parametrize("shape_kind", ["flat", "underflow", "peaked"])
def test_graph_and_host_keep_the_same_candidates_on_random_rows(graph, shape_kind):
    """Beyond the golden: random rows and mixed parameters (exact ties at the top-p cut aside, where
    torch's own order is unspecified)."""
    rng = np.random.default_rng(["flat", "underflow", "peaked"].index(shape_kind) + 10)
    seqs = 24
    logits = (rng.standard_normal((seqs, 8, 1026)) * 3).astype(np.float32)
    if shape_kind == "underflow":
        logits[..., :513] -= 300
    elif shape_kind == "peaked":
        logits[..., rng.integers(0, 1026, 3)] += 25
    t = rng.choice([0.3, 0.7, 1.0, 1.7], seqs)
    k = rng.choice([0, 1, 2, 50, 1025, 1031], seqs)
    p = rng.choice([0.1, 0.5, 0.95, 1.0], seqs)
    codes, _, kept = _graph_run(graph, logits, t, k, p, rng.random((seqs, 2, 8)))
    host = process_logits(logits.reshape(-1, 1026), np.repeat(t, 8), np.repeat(k, 8), np.repeat(p, 8))
    host_kept = np.isfinite(host).reshape(kept.shape)
    if shape_kind == "underflow":  # entries with zero probability: top-p off keeps them, the draw never takes them
        host_kept &= np.exp(host.reshape(kept.shape) - host.reshape(kept.shape).max(axis=-1, keepdims=True)) > 0
        kept &= host_kept | ~np.isfinite(host.reshape(kept.shape))
    np.testing.assert_array_equal(kept, host_kept)
    assert np.take_along_axis(host_kept, codes[..., None], axis=-1).all()


def test_graph_sampler_rows_do_not_depend_on_their_batch(tiny_artifacts):
    """The exported graph through GraphSampler: a sequence's codes are the same alone and in a batch."""
    sampler = GraphSampler.load(tiny_artifacts / "audio_sampler.onnx")
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((3, 8, 1026)) * 2).astype(np.float32)
    uniforms = rng.random((3, 2, 8))
    t, k, p = np.array([1.0, 0.7, 0.0]), np.array([50, 0, 0]), np.array([0.95, 0.95, 1.0])
    codes, redraw = sampler(logits, t, k, p, uniforms)
    everything = np.ones((3, 8), bool)
    for i in range(3):
        alone, alone_redraw = sampler(logits[i : i + 1], t[i : i + 1], k[i : i + 1], p[i : i + 1], uniforms[i : i + 1])
        np.testing.assert_array_equal(alone[0], codes[i])
        np.testing.assert_array_equal(alone_redraw(everything[:1]), redraw(everything)[i * 8 : i * 8 + 8])
