"""Delay pattern of audio-out codes, its generation-time ramp rules and streaming revert (spec llm.md §5.5).

Codebook k lags codebook 0 by k steps, so one generated column holds frame t of codebook 0,
frame t-1 of codebook 1, ... A segment is wrapped in a stream-BOS column and a stream-EOS column
before the delay, which makes a segment of T frames N + T + 1 columns long.
"""

from __future__ import annotations

import numpy as np

STREAM_BOS = 1024  # audio_stream_bos_id: per-codebook value
STREAM_EOS = 1025  # audio_stream_eos_id
CODEBOOK_SIZE = 1024  # real codes are 0..1023


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


class AudioSegmentState:
    """Ramp-in / ramp-out counters of the audio-out segment being generated (upstream's num_delay /
    num_remaining_delays), one per sequence.

    The segment's column 0 is the forced all-BOS column (`first_column`, at AUDIO_INIT, no
    sampling); every later column is drawn (and RAS-redrawn) by the loop and passed to `step`.
    """

    def __init__(self, num_codebooks: int = 8, bos: int = STREAM_BOS, eos: int = STREAM_EOS):
        self.num_codebooks = num_codebooks
        self.bos = bos
        self.eos = eos
        self.num_delay = 0
        self.num_remaining: int | None = None

    def first_column(self) -> np.ndarray:
        return np.full(self.num_codebooks, self.bos, np.int64)

    def step(self, column: np.ndarray) -> tuple[np.ndarray, bool]:
        """Apply the delay rules to a drawn column (N,); returns (column to store and feed, ended).

        Upstream order: ramp-in override, then ramp-out (continuing, or started by the lowest
        row that drew EOS), then the audio-end check. `ended` means this column closes the
        segment: the step's text token is <|audio_eos|> (128012) instead of <|AUDIO_OUT|>, the
        column is stored but never fed, and the counters are reset for a later segment.
        """
        col = np.array(column, dtype=np.int64)
        n = self.num_codebooks
        if col.shape != (n,):
            raise ValueError(f"column must have shape ({n},), got {col.shape}")
        if self.num_delay + 1 < n:  # ramp-in: codebooks not started yet stay at BOS
            col[self.num_delay + 1 :] = self.bos
            self.num_delay += 1
        if self.num_remaining is not None:  # ramp-out under way: one more codebook ends per step
            col[: n - self.num_remaining] = self.eos
            self.num_remaining -= 1
        else:
            eos_rows = np.flatnonzero(col == self.eos)
            if eos_rows.size:  # first EOS: every lower codebook ends with it
                first = int(eos_rows[0])
                col[:first] = self.eos
                self.num_remaining = n - first - 1
        ended = self.num_remaining is not None and self.num_remaining <= 0
        if ended:
            self.num_delay = 0
            self.num_remaining = None
        return col, ended


class FrameAssembler:
    """Turns the delayed columns of one segment, pushed as they are generated, into code frames.

    A frame is complete N-1 columns after its codebook-0 code, but `delayed_to_codes` drops the
    segment's last reverted column, so a frame is released one column later still, when the
    next column proves it is not that last one. The frames released over a segment are exactly
    `delayed_to_codes(all columns pushed)`, also when generation stops mid-segment; nothing is
    left to flush at the end. Keeps only the last N columns.
    """

    def __init__(self, num_codebooks: int = 8, codebook_size: int = CODEBOOK_SIZE):
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self._recent = np.zeros((num_codebooks, num_codebooks), np.int64)  # ring of the last N columns
        self._count = 0

    def push(self, column: np.ndarray) -> np.ndarray:
        """Add the next delayed column (N,) (column 0 is the all-BOS one); returns the newly final
        frames as int64 (N, k), k in {0, 1}, values clipped to [0, codebook_size - 1]."""
        col = np.asarray(column, dtype=np.int64)
        n = self.num_codebooks
        if col.shape != (n,):
            raise ValueError(f"column must have shape ({n},), got {col.shape}")
        frame = np.empty((n, 0), np.int64)
        reverted = self._count - n  # reverted column that this column proves is not the last
        if reverted >= 1:  # reverted column 0 is the stream BOS
            rows = np.arange(n)
            frame = np.clip(self._recent[rows, (reverted + rows) % n], 0, self.codebook_size - 1)[:, None]
        self._recent[:, self._count % n] = col
        self._count += 1
        return frame


def _matrix(a: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(a)
    if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"{name} must be an integer (codebooks, columns) matrix, got {m.dtype} {m.shape}")
    return m.astype(np.int64, copy=False)
