"""Delay pattern of audio-out codes, its generation-time ramp rules and streaming revert (spec llm.md §5.5).

Codebook k lags codebook 0 by k steps, so one generated column holds frame t of codebook 0,
frame t-1 of codebook 1, ... A segment is wrapped in a stream-BOS column and a stream-EOS column
before the delay, which makes a segment of T frames N + T + 1 columns long.
"""

from __future__ import annotations

import numpy as np

from .tokens import CODEBOOK_SIZE, STREAM_BOS, STREAM_EOS


def delay_pattern(codes: np.ndarray, bos: int = STREAM_BOS, eos: int = STREAM_EOS) -> np.ndarray:
    """Wrap codes (N, T) in a BOS and an EOS column, then delay row k by k -> int64 (N, T+N+1).

    Row k = [bos]*k ++ [bos] ++ codes[k] ++ [eos] ++ [eos]*(N-1-k), as upstream's collator builds
    the audio-out ids of a reference clip.
    """
    x = _matrix(codes, "codes")
    n, t = x.shape
    wrapped = np.concatenate([np.full((n, 1), bos, np.int64), x, np.full((n, 1), eos, np.int64)], axis=1)
    src = np.arange(t + n + 1)[None, :] - np.arange(n)[:, None]  # column of `wrapped` shown at (k, j)
    out = np.take_along_axis(wrapped, np.clip(src, 0, t + 1), axis=1)
    out[src < 0] = bos
    out[src > t + 1] = eos
    return out


def revert_delay(delayed: np.ndarray) -> np.ndarray:
    """Undo the delay: row k of the result is delayed[k, k : W-N+1+k] -> (N, max(W-N+1, 0))."""
    d = _matrix(delayed, "delayed")
    n, w = d.shape
    idx = np.arange(n)[:, None] + np.arange(max(w - n + 1, 0))[None, :]
    return np.take_along_axis(d, idx, axis=1)


def delayed_to_codes(delayed: np.ndarray, codebook_size: int = CODEBOOK_SIZE) -> np.ndarray:
    """What the codec decodes: revert, drop the BOS and the EOS column, clip -> (N, max(W-N-1, 0)).

    For a segment cut short (no EOS ramp-out) the dropped last column is a real frame; upstream
    drops it all the same.
    """
    return np.clip(revert_delay(delayed)[:, 1:-1], 0, codebook_size - 1)


class DelayRamps:
    """Ramp-in / ramp-out counters of the audio-out segments of many slots (upstream's num_delay /
    num_remaining_delays), held as arrays so one call applies the rules to every sequence's column.

    A segment's column 0 is the forced all-BOS column (`start`, at AUDIO_INIT, no sampling); every
    later column is drawn (and RAS-redrawn) by the loop and passed to `step`.
    """

    def __init__(self, slots: int, num_codebooks: int = 8, bos: int = STREAM_BOS, eos: int = STREAM_EOS):
        self.num_codebooks = num_codebooks
        self.bos = bos
        self.eos = eos
        self.num_delay = np.zeros(slots, np.int64)
        self.num_remaining = np.full(slots, -1, np.int64)  # -1: no ramp-out under way
        self._rows = np.arange(num_codebooks)

    def start(self, slots: np.ndarray) -> np.ndarray:
        """Begin a segment in `slots`; returns their forced first columns (len(slots), N), all BOS."""
        self.num_delay[slots] = 0
        self.num_remaining[slots] = -1
        return np.full((len(slots), self.num_codebooks), self.bos, np.int64)

    def step(self, slots: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Apply the delay rules to the drawn columns (S, N) of `slots`; returns (columns to store
        and feed, ended (S,) bool).

        Upstream order: ramp-in override, then ramp-out (continuing, or started by the lowest
        row that drew EOS), then the audio-end check. `ended` means the column closes the segment:
        the step's text token is <|audio_eos|> (128012) instead of <|AUDIO_OUT|>, the column is
        stored but never fed, and the counters are reset for a later segment.
        """
        slots = np.asarray(slots, np.int64)
        n, k = self.num_codebooks, self._rows
        cols = np.array(columns, dtype=np.int64)
        if cols.shape != (len(slots), n):
            raise ValueError(f"columns must have shape ({len(slots)}, {n}), got {cols.shape}")
        delay = self.num_delay[slots]
        ramp_in = delay + 1 < n  # codebooks not started yet stay at BOS
        if ramp_in.any():  # (the guards skip the work in the steady state, mid-segment)
            cols[ramp_in[:, None] & (k > delay[:, None])] = self.bos
            self.num_delay[slots] = delay + ramp_in
        remaining = self.num_remaining[slots]
        going = remaining >= 0  # ramp-out under way: one more codebook ends per step
        is_eos = cols == self.eos
        starts = ~going & is_eos.any(axis=1)  # first EOS: every lower codebook ends with it
        if not (going.any() or starts.any()):
            return cols, np.zeros(len(slots), bool)
        cols[going[:, None] & (k < (n - remaining)[:, None])] = self.eos
        first = np.argmax(is_eos, axis=1)
        cols[starts[:, None] & (k < first[:, None])] = self.eos
        remaining = np.where(starts, n - first - 1, np.where(going, remaining - 1, remaining))
        ended = remaining == 0
        self.num_delay[slots[ended]] = 0
        self.num_remaining[slots] = np.where(ended, -1, remaining)
        return cols, ended


class ColumnLog:
    """Every audio-out column of every slot, in order: the tail of the prompt's audio-out history
    (the RAS window source), then each generated column. int16 (slots, N, length), one array for all
    sequences, so RAS windows and newly final frames are gathered for a whole step at once and a
    finished request's segments are slices of it.
    """

    def __init__(self, slots: int, num_codebooks: int, length: int):
        self.columns = np.zeros((slots, num_codebooks, length), np.int16)
        self.length = np.zeros(slots, np.int64)  # columns held per slot
        self.segment_start = np.zeros(slots, np.int64)  # where the slot's current segment begins
        self._rows = np.arange(num_codebooks)

    def reset(self, slot: int, history: np.ndarray) -> None:
        """A new sequence in `slot`, starting from its prompt's audio-out history (N, h)."""
        h = history.shape[1]
        if h > self.columns.shape[2]:
            raise ValueError(f"history of {h} columns exceeds the log's {self.columns.shape[2]}")
        self.columns[slot, :, :h] = history
        self.length[slot] = h

    def start_segment(self, slots: np.ndarray) -> None:
        self.segment_start[slots] = self.length[slots]

    def append(self, slots: np.ndarray, columns: np.ndarray) -> None:
        """Add one column (S, N) per slot."""
        if (self.length[slots] >= self.columns.shape[2]).any():
            raise ValueError("column log full: the sequence outgrew the KV cache")
        self.columns[slots, :, self.length[slots]] = columns
        self.length[slots] += 1

    def windows(self, slots: np.ndarray, sizes: np.ndarray, pad: int) -> np.ndarray:
        """The last sizes[i] columns of each slot as (S, W, N), W = the largest window in use,
        left-padded with `pad` where a window is shorter (or off, size <= 0)."""
        lengths = self.length[slots]
        sizes = np.minimum(np.maximum(sizes, 0), lengths)
        width = int(sizes.max(initial=0))
        index = lengths[:, None] - width + np.arange(width)  # (S, W)
        gathered = self.columns[slots[:, None], :, np.maximum(index, 0)]  # (S, W, N)
        valid = index >= (lengths - sizes)[:, None]
        return np.where(valid[:, :, None], gathered, pad)

    def released_frames(self, slots: np.ndarray, codebook_size: int = CODEBOOK_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """The code frame each slot's newest column made final: (ready (S,) bool, frames (S, N)).

        A frame is complete N-1 columns after its codebook-0 code, but `delayed_to_codes` drops a
        segment's last reverted column, so a frame is released one column later still, when the
        next column proves it is not that last one. Over a segment, the released frames are exactly
        `delayed_to_codes(all columns so far)`, also when generation stops mid-segment; nothing
        is left to flush at the end. Values are clipped to [0, codebook_size - 1].
        """
        n = len(self._rows)
        start = self.segment_start[slots]
        reverted = self.length[slots] - start - 1 - n  # reverted column the newest column proves is not the last
        ready = reverted >= 1  # reverted column 0 is the stream BOS
        index = np.minimum(start[:, None] + np.maximum(reverted, 0)[:, None] + self._rows, self.columns.shape[2] - 1)
        frames = self.columns[slots[:, None], self._rows, index]
        return ready, np.clip(frames, 0, codebook_size - 1).astype(np.int64)

    def segment(self, slot: int, start: int, stop: int) -> np.ndarray:
        """Columns [start, stop) of a slot as a delayed int64 (N, stop - start) segment."""
        return self.columns[slot, :, start:stop].astype(np.int64)


def _matrix(a: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(a)
    if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"{name} must be an integer (codebooks, columns) matrix, got {m.dtype} {m.shape}")
    return m.astype(np.int64, copy=False)
