"""engines/delay.py: spec llm.md §5.5, §7.1, §7.2 and the upstream greedy segments of the goldens."""

import numpy as np
import pytest

from engines.delay import (
    ColumnLog,
    DelayRamps,
    delay_pattern,
    delayed_to_codes,
    revert_delay,
)
from engines.tokens import STREAM_BOS, STREAM_EOS
from goldens import load as _golden

RUNS = [(d, c) for d in ("llm_tiny", "llm_tiny_eos3") for c in ("zero_shot", "voice_clone")]
N = 8


@pytest.mark.parametrize("frames", [0, 1, 5, 40])
def test_delay_round_trip(frames):
    """Spec §7.1."""
    x = np.random.default_rng(frames).integers(0, 1024, (N, frames))
    d = delay_pattern(x)
    assert d.shape == (N, frames + N + 1)
    assert np.all(d[:, 0] == STREAM_BOS) and np.all(d[:, -1] == STREAM_EOS)
    for k in range(N):
        assert np.all(d[k, : k + 1] == STREAM_BOS) and d[k, k + 1 : k + 1 + frames].tolist() == x[k].tolist()
        assert np.all(d[k, k + 1 + frames :] == STREAM_EOS) and d.shape[1] - (k + 1 + frames) == N - k
    np.testing.assert_array_equal(delayed_to_codes(d), x)
    assert revert_delay(d).shape == (N, frames + 2)


@pytest.mark.parametrize("name", ["llm_tiny", "llm_tiny_eos3"])
def test_golden_reference_segment_layout(name):
    z = _golden(name)
    np.testing.assert_array_equal(delay_pattern(z["voice_clone/ref_codes"]), z["voice_clone/prompt_audio_out_ids"])


@pytest.mark.parametrize("name,case", RUNS)
def test_golden_segment_to_codes(name, case):
    z = _golden(name)
    np.testing.assert_array_equal(delayed_to_codes(z[f"{case}/segment0_delayed"]), z[f"{case}/segment0_codes"])


class _Single:
    """One sequence in slot 1 of a 3-slot DelayRamps (the neighbours must not matter)."""

    def __init__(self):
        self.ramps = DelayRamps(3, N)
        self.slot = np.array([1])

    def first_column(self):
        return self.ramps.start(self.slot)[0]

    def step(self, drawn):
        col, end = self.ramps.step(self.slot, np.asarray(drawn)[None])
        return col[0], bool(end[0])


@pytest.mark.parametrize("name", ["llm_tiny", "llm_tiny_eos3"])
def test_ramps_reproduce_upstream_greedy_segments_side_by_side(name):
    """Greedy draws from the teacher-forced audio logits, passed through the ramp rules, give
    upstream's generated segment column by column, and the segment ends exactly at its last column
    (llm_tiny_eos3: the EOS comes first from codebook 3). Both cases run in one DelayRamps, in
    slots 2 and 0, with slot 0's segment starting 3 steps later."""
    z = _golden(name)
    ramps = DelayRamps(3, N)
    slots = {"zero_shot": 2, "voice_clone": 0}
    lag = {"zero_shot": 0, "voice_clone": 3}
    columns = {case: [] for case in slots}
    ended = {case: [] for case in slots}
    total = max(z[f"{case}/segment0_delayed"].shape[1] + lag[case] for case in slots)
    for t in range(total):
        active = []
        for case, slot in slots.items():
            i = t - lag[case]
            segment = z[f"{case}/segment0_delayed"]
            if i == 0:
                columns[case].append(ramps.start(np.array([slot]))[0])
            elif 0 < i < segment.shape[1]:
                logits = z[f"{case}/teacher_forced_audio_logits"]
                offset = logits.shape[0] - segment.shape[1]  # voice_clone: the reference columns come first
                active.append((case, slot, np.argmax(logits[offset + i - 1], axis=1)))  # logits at column i-1 predict column i
        if active:
            cols, ends = ramps.step(np.array([a[1] for a in active]), np.stack([a[2] for a in active]))
            for (case, _, _), col, end in zip(active, cols, ends):
                columns[case].append(col)
                ended[case].append(bool(end))
    for case in slots:
        np.testing.assert_array_equal(np.stack(columns[case], axis=1), z[f"{case}/segment0_delayed"])
        assert ended[case] == [False] * (len(ended[case]) - 1) + [True]


def _run_stub(eos_step, eos_rows, extra_steps=12, seed=0):
    """Drive the rules with random non-EOS draws; rows `eos_rows` draw EOS at step `eos_step`."""
    rng = np.random.default_rng(seed)
    state = _Single()
    draws, columns, ended = [], [state.first_column()], []
    for step in range(1, eos_step + extra_steps):
        drawn = rng.integers(0, 1024, N)
        if step == eos_step:
            drawn[list(eos_rows)] = STREAM_EOS
        draws.append(drawn)
        col, end = state.step(drawn)
        columns.append(col)
        ended.append(end)
        if end:
            break
    return np.stack(draws, axis=1), np.stack(columns, axis=1), ended


def test_ramp_schedule_eos_from_codebook_0():
    """Spec §7.2 with S = 12."""
    s = 12
    draws, seg, ended = _run_stub(s, eos_rows=[0])
    assert seg.shape[1] == s + 8 and ended.index(True) == s + 6  # <|audio_eos|> with column S+7
    for c in range(1, 8):
        assert np.all(seg[c:, c] == STREAM_BOS)
        np.testing.assert_array_equal(seg[:c, c], draws[:c, c - 1])
    for m in range(1, 8):
        assert np.all(seg[:m, s + m] == STREAM_EOS)
        np.testing.assert_array_equal(seg[m:, s + m], draws[m:, s + m - 1])
    codes = delayed_to_codes(seg)
    assert codes.shape == (N, s - 1)
    for k in range(N):  # frame f of codebook k was drawn at column f + 1 + k
        np.testing.assert_array_equal(codes[k], draws[k, k : k + s - 1])


@pytest.mark.parametrize("first", [3, 7])
def test_ramp_out_from_first_eos_row(first):
    """The lowest row drawing EOS starts the ramp-out: rows below it are forced at once and
    8 - e - 1 more columns follow (a later EOS row in the same column does not matter)."""
    s = 10
    eos_rows = [first] + ([first + 1] if first + 1 < N else [])
    draws, seg, ended = _run_stub(s, eos_rows=eos_rows)
    more = N - first - 1
    assert seg.shape[1] == s + 1 + more and ended[-1] and not any(ended[:-1])
    assert np.all(seg[: first + 1, s] == STREAM_EOS)
    np.testing.assert_array_equal(seg[first + 1 :, s], draws[first + 1 :, s - 1])  # incl. the later EOS row
    for m in range(1, more + 1):
        assert np.all(seg[: first + m, s + m] == STREAM_EOS)
        np.testing.assert_array_equal(seg[first + m :, s + m], draws[first + m :, s + m - 1])


def test_state_resets_after_the_segment_ends():
    state = _Single()
    for _ in range(8):
        state.step(np.zeros(N, np.int64))
    _, end = state.step(np.r_[0, 0, 0, 0, 0, 0, 0, STREAM_EOS])  # e = 7: ends at once
    col, again = state.step(np.full(N, 5))  # a new segment ramps in again
    assert end and not again
    np.testing.assert_array_equal(col, [5] + [STREAM_BOS] * 7)


def _released(segment: np.ndarray, history: int = 0) -> list[np.ndarray]:
    """Push a segment column by column into slot 1 of a ColumnLog (after `history` prompt columns);
    the frames released after each push."""
    log = ColumnLog(3, N, history + segment.shape[1])
    log.reset(1, np.full((N, history), 7))
    log.start_segment(np.array([1]))
    out = []
    for column in segment.T:
        log.append(np.array([1]), column[None])
        ready, frames = log.released_frames(np.array([1]))
        out.append(frames[0][:, None] if ready[0] else np.empty((N, 0), np.int64))
    return out


@pytest.mark.parametrize("name,case", RUNS)
def test_released_frames_equal_revert_for_every_prefix(name, case):
    """Streaming release == delayed_to_codes of the columns so far, for the whole segment and
    for every cut (max tokens reached mid-segment)."""
    segment = _golden(name)[f"{case}/segment0_delayed"]
    frames = _released(segment, history=5)
    for w in range(1, segment.shape[1] + 1):
        np.testing.assert_array_equal(np.concatenate(frames[:w], axis=1), delayed_to_codes(segment[:, :w]))
    np.testing.assert_array_equal(np.concatenate(frames, axis=1), _golden(name)[f"{case}/segment0_codes"])


def test_released_frames_long_random_segment():
    x = np.random.default_rng(1).integers(0, 1024, (N, 300))
    np.testing.assert_array_equal(np.concatenate(_released(delay_pattern(x)), axis=1), x)


def test_ras_windows_pad_short_histories_and_mixed_sizes():
    log = ColumnLog(2, 2, 10)
    log.reset(0, np.array([[1, 2, 3], [4, 5, 6]]))
    log.reset(1, np.zeros((2, 0), np.int64))
    log.append(np.array([0, 1]), np.array([[7, 8], [9, 10]]))
    w = log.windows(np.array([0, 1]), np.array([3, 7]), pad=-1)  # slot 1 holds one column only
    assert w.shape == (2, 3, 2)
    np.testing.assert_array_equal(w[0], [[2, 5], [3, 6], [7, 8]])
    np.testing.assert_array_equal(w[1], [[-1, -1], [-1, -1], [9, 10]])
    np.testing.assert_array_equal(log.windows(np.array([0, 1]), np.array([0, -1]), pad=-1).shape, (2, 0, 2))
    np.testing.assert_array_equal(log.windows(np.array([0]), np.array([2]), pad=-1)[0], [[3, 6], [7, 8]])


def test_shape_errors():
    with pytest.raises(ValueError):
        DelayRamps(2, N).step(np.array([0]), np.zeros((1, 7), np.int64))
    with pytest.raises(ValueError):
        ColumnLog(1, N, 4).reset(0, np.zeros((N, 5), np.int64))
    with pytest.raises(ValueError):
        delay_pattern(np.zeros(8))
