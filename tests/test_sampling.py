"""engines/sampling.py against the upstream warper goldens and spec llm.md §5.6 / §7.9."""

import numpy as np
import pytest

from engines.api import SamplingParams
from engines.sampling import (
    RAS_PAD,
    categorical,
    params_to_arrays,
    process_logits,
    ras_redraw,
    ras_window,
    sample,
)
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
    requests = [SamplingParams(temperature=1.3, top_k=20), SamplingParams(temperature=0.7, top_p=0.95)]
    t, k, p = params_to_arrays(requests, 8)
    batched = sample(np.concatenate([logits_b, logits_a]), t, k, p, u_batch)
    np.testing.assert_array_equal(alone, again)
    np.testing.assert_array_equal(batched[8:], alone)
    assert not np.array_equal(sample(logits_a, 0.7, 0, 0.95, np.random.default_rng(43).random(8)), alone)


def test_greedy_with_ras_off_is_deterministic():
    logits = np.random.default_rng(5).standard_normal((8, 1026)).astype(np.float32)
    first = sample(logits, 0.0, 0, 1.0, np.random.default_rng(1).random(8))
    second = sample(logits, 0.0, 0, 1.0, np.random.default_rng(2).random(8))
    history = ras_window(np.tile(first[:, None], (1, 5)), win=0, width=7)  # RAS off: all padding
    np.testing.assert_array_equal(first, np.argmax(logits, axis=1))
    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(ras_redraw(first, logits, history, 2, np.full(8, 0.999)), first)


def test_ras_redraws_only_rows_over_the_repeat_limit():
    # raw distribution: code 5 with 0.75, code 7 with 0.25; greedy picks 5 everywhere
    raw = np.full((4, 1026), -np.inf, np.float32)
    raw[:, 5], raw[:, 7] = np.log(3.0), 0.0
    drawn = categorical(raw, np.zeros(4), greedy=np.ones(4, bool))
    history = np.array(
        [
            [1, 5, 9, 5, 2, 3, 4],  # 5 twice -> redraw
            [1, 5, 9, 8, 2, 3, 4],  # once -> keep
            [RAS_PAD] * 5 + [5, 5],  # short history, still twice -> redraw
            [RAS_PAD] * 7,  # RAS off for this request
        ]
    )
    out = ras_redraw(drawn, raw, history, np.array([2, 2, 2, 2]), uniforms=np.full(4, 0.9))
    np.testing.assert_array_equal(drawn, [5, 5, 5, 5])
    np.testing.assert_array_equal(out, [7, 5, 7, 5])
    np.testing.assert_array_equal(ras_redraw(drawn, raw, history, 3, np.full(4, 0.9)), drawn)
    # max_repeat 0 redraws every row whose RAS is on (as upstream), never an all-pad one
    np.testing.assert_array_equal(ras_redraw(drawn, raw, history, 0, np.full(4, 0.9)), [7, 7, 7, 5])


def test_ras_peaked_row_redraw_rate_with_seeded_generator():
    """Spec §7.9: a greedy column whose argmax already occurs twice in the window is redrawn
    from the raw softmax, so it moves away from the peak with probability 1 - p(peak)."""
    rows = 4000
    raw = np.zeros((rows, 1026), np.float32)
    raw[:, 3] = 7.0
    p_peak = np.exp(7.0) / (np.exp(7.0) + 1025)
    drawn = sample(raw, 0.0, 0, 1.0, np.zeros(rows))
    window = ras_window(np.array([[3, 1, 3, 9, 3, 5, 6, 8]]), win=7)  # 3 twice in the last 7, once more before
    out = ras_redraw(drawn, raw, np.repeat(window, rows, axis=0), 2, np.random.default_rng(11).random(rows))
    assert np.all(drawn == 3)
    assert abs(np.mean(out != 3) - (1 - p_peak)) < 0.03


def test_ras_window_padding_and_width():
    hist = np.arange(24).reshape(2, 12)
    np.testing.assert_array_equal(ras_window(hist, 3), hist[:, -3:])
    np.testing.assert_array_equal(ras_window(hist[:, :2], 4), [[RAS_PAD, RAS_PAD, 0, 1], [RAS_PAD, RAS_PAD, 12, 13]])
    np.testing.assert_array_equal(ras_window(hist, 2, width=4)[:, :2], np.full((2, 2), RAS_PAD))
    assert ras_window(hist, -1, width=3).tolist() == [[RAS_PAD] * 3] * 2
    with pytest.raises(ValueError):
        ras_window(hist, 5, width=3)


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
