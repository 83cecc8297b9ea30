"""Logits processing, sampling and repetition-aware sampling (spec llm.md §5.6), numpy only (but for
`GraphSampler`, which runs the exported sampler graph with ONNX Runtime).

Every function works on a batch of independent rows: one row per text step of a sequence, or one
row per codebook of an audio step (8 per sequence), so the decode loop makes one call per step for
all the sequences it runs together. Randomness comes in as uniform numbers that the caller draws
from one `np.random.Generator` per request, which keeps a request reproducible whatever other
requests share its batch.

Upstream (HF transformers 4.46 warpers): temperature (only when != 1), then top-k (keep values >=
the k-th largest, ties kept), then top-p (sort ascending, cumulative softmax, remove entries whose
cumulative probability is <= 1 - top_p, always keep the largest), removed entries = -inf.

Top-k and top-p need each row's order near their cut only. Entries that are removed whatever the
order (below a cheap per-row floor, `_candidate_floor`) are left out, the rest is sorted by value
(one `np.sort` for all rows) and the cut is read off the sorted values. Cumulative probabilities
are summed in float64 and compared in float32, as torch's CPU `cumsum` does, so the kept sets are
those of upstream's full sort (the goldens match exactly) unless an entry sits within float32
rounding of the cut.
"""

from __future__ import annotations

import numpy as np

from engines.api import SamplingParams
from engines.manifest import SAMPLER

RAS_PAD = -1  # filler of RAS windows shorter than the window length; never equal to a code


MIN_TEMPERATURE = 1e-3  # below this logits / T overflows float32 for large logits; use 0 (greedy)


def check_params(params: SamplingParams) -> None:
    """Reject what would fail (or silently misbehave) inside a batched step, before a request is queued."""
    t = params.temperature
    if not (np.isfinite(t) and (t == 0 or t >= MIN_TEMPERATURE)):
        raise ValueError(f"temperature {t}: use 0 for greedy or a value >= {MIN_TEMPERATURE}")
    if params.top_k is not None and params.top_k < 0:
        raise ValueError(f"top_k {params.top_k}: must be >= 0 (0 or None = off)")
    if not (np.isfinite(params.top_p) and 0 < params.top_p <= 1):
        raise ValueError(f"top_p {params.top_p}: must be in (0, 1] (1 = off)")
    if params.ras_max_repeat < 0:
        raise ValueError(f"ras_max_repeat {params.ras_max_repeat}: must be >= 0")


def process_logits(logits: np.ndarray, temperature, top_k, top_p) -> np.ndarray:
    """Temperature -> top-k -> top-p on each row of `logits` (R, V); returns float32 (R, V).

    temperature (R,): 0 marks a greedy row, which is returned unchanged (the caller argmaxes it:
    upstream applies no warper without do_sample). top_k (R,): 0 = off. top_p (R,): 1.0 = off.
    Scalars are broadcast to all rows. Removed entries are -inf.
    """
    scores = np.array(logits, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"logits must be (rows, vocab), got shape {scores.shape}")
    rows, vocab = scores.shape
    t = _per_row(temperature, rows, np.float64, "temperature")
    k = _per_row(top_k, rows, np.int64, "top_k")
    p = _per_row(top_p, rows, np.float64, "top_p")
    if (t < 0).any() or not np.isfinite(t).all():
        raise ValueError("temperature must be finite and >= 0 (0 = greedy)")
    if (k < 0).any():
        raise ValueError("top_k must be >= 0 (0 = off)")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("top_p must be in [0, 1] (1 = off)")

    sampled = t > 0
    scaled = sampled & (t != 1.0)
    scores[scaled] /= t[scaled, None].astype(np.float32)
    use_k = sampled & (k > 0) & (k < vocab)
    use_p = sampled & (p < 1.0)
    sel = use_k | use_p
    if sel.all():
        return _truncate(scores, np.where(use_k, k, 0), np.where(use_p, p, 1.0))
    if sel.any():
        scores[sel] = _truncate(scores[sel], np.where(use_k[sel], k[sel], 0), np.where(use_p[sel], p[sel], 1.0))
    return scores


def categorical(logits: np.ndarray, uniforms: np.ndarray, greedy: np.ndarray | None = None) -> np.ndarray:
    """One index per row of `logits` (R, V) (processed, -inf = removed); returns int64 (R,).

    Sampled rows draw from softmax(logits) by inverse CDF at `uniforms` (R,) in [0, 1); rows
    marked in `greedy` (R,) bool take the first maximum, like torch.argmax.
    """
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"logits must be (rows, vocab), got shape {x.shape}")
    rows = x.shape[0]
    u = _per_row(uniforms, rows, np.float64, "uniforms")
    g = np.zeros(rows, bool) if greedy is None else _per_row(greedy, rows, bool, "greedy")
    out = np.empty(rows, np.int64)
    if g.any():
        out[g] = np.argmax(_take_rows(x, g), axis=1)
    if not g.all():
        if ((u < 0) | (u >= 1)).any():
            raise ValueError("uniforms must lie in [0, 1)")
        out[~g] = _inverse_cdf(_take_rows(x, ~g), u[~g])
    return out


def sample(logits: np.ndarray, temperature, top_k, top_p, uniforms: np.ndarray) -> np.ndarray:
    """process_logits + categorical: one draw per row, greedy where temperature == 0."""
    t = _per_row(temperature, np.shape(logits)[0], np.float64, "temperature")
    return categorical(process_logits(logits, t, top_k, top_p), uniforms, greedy=t == 0)


def ras_redo(drawn: np.ndarray, windows: np.ndarray, max_repeat: np.ndarray) -> np.ndarray:
    """Repetition-aware sampling: which drawn codes repeat too often in their window (redraw them).

    drawn (S, N): the codes just drawn (sampled or greedy). windows (S, W, N): each sequence's
    last W audio-out columns before this one (`ColumnLog.windows`, RAS_PAD fill). max_repeat (S,).
    A code is redrawn iff its codebook's window holds a real value and the code occurs >=
    max_repeat times in it; an all-pad window (RAS off) never redraws. Upstream's redraw samples
    softmax(raw logits), also in greedy mode: the samplers' `redraw`.
    """
    hist = np.asarray(windows)
    repeats = np.count_nonzero(hist == drawn[:, None, :], axis=1)
    return (hist != RAS_PAD).any(axis=1) & (repeats >= np.asarray(max_repeat)[:, None])


class HostSampler:
    """Audio sampling on the host with numpy (the warpers above): the faster choice where the logits
    are host memory anyway (ONNX Runtime CPU; see `GraphSampler` for the measurement)."""

    def __call__(self, logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, uniforms: np.ndarray):
        """Audio logits (S, N, C+2), per-sequence parameters (S,) and uniforms (S, 2, N) ([:, 0] the
        draw, [:, 1] the RAS redraw) -> (codes (S, N), redraw), redraw(mask (S, N)) giving the
        RAS redraws of the masked rows (draws from the unwarped softmax)."""
        s, n, width = logits.shape
        raw = logits.reshape(s * n, width)
        codes = sample(raw, *(np.repeat(a, n) for a in (temperature, top_k, top_p)), uniforms[:, 0].reshape(-1))

        def redraw(mask: np.ndarray) -> np.ndarray:
            rows = mask.reshape(-1)
            return categorical(raw[rows], uniforms[:, 1].reshape(-1)[rows])

        return codes.reshape(s, n), redraw


class GraphSampler:
    """Audio sampling with the exported `audio_sampler` graph (export/onnx_sampler.py) on an ONNX
    Runtime device: 2 uniforms go in and 2 codes come back per row. (The runtimes return the logits
    to the host, so the session copies them back to the device; docs/design.md.)

    Measured on ONNX Runtime 1.32's CPU provider at batch 64 (8 x 1026 rows each), the graph takes
    about 2.4x the time of `HostSampler` (its full-row TopK alone is ~17 ms there), so the CPU
    engine samples on the host; on a GPU the sort is cheap and this keeps the host's share of a
    step to choosing between two codes per row.
    """

    def __init__(self, session):
        """session: anything with ONNX Runtime's `run(output_names, feed)` over the sampler graph."""
        self.session = session

    @classmethod
    def load(cls, onnx_path, device: str = "cpu") -> "GraphSampler":
        from .ort_runtime import open_session, providers_for, session_options

        # on CUDA, open_session refuses onnxruntime's silent fallback to a CPU-only session
        return cls(open_session(onnx_path, session_options(device), providers_for(device), SAMPLER))

    @staticmethod
    def inputs(logits, temperature, top_k, top_p, uniforms) -> dict[str, np.ndarray]:
        """The sampler graph's inputs for `HostSampler.__call__`'s arguments."""
        top_p = np.asarray(top_p, np.float64)
        # torch compares the float32 cumulative sum with float32(1 - top_p); -1 never removes (top-p off)
        tail = np.where(top_p < 1, (1.0 - top_p).astype(np.float32), np.float32(-1))
        return {
            "audio_logits": np.ascontiguousarray(logits, np.float32),
            "temperature": np.asarray(temperature, np.float32),
            "top_k": np.asarray(top_k, np.int64),
            "tail_mass": tail.astype(np.float32),
            "uniforms": np.asarray(uniforms, np.float32),
        }

    def __call__(self, logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, uniforms: np.ndarray):
        """Same contract as `HostSampler.__call__`."""
        codes, ras = self.session.run(None, self.inputs(logits, temperature, top_k, top_p, uniforms))
        return codes, lambda mask: ras[mask]


# --------------------------------------------------------------------------------------------
def _per_row(value, rows: int, dtype, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        return np.full(rows, arr, dtype)
    if arr.shape != (rows,):
        raise ValueError(f"{name} must be a scalar or have shape ({rows},), got {arr.shape}")
    return arr


def _take_rows(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x[mask] without copying when every row is selected (a text batch is 32 MB)."""
    return x if mask.all() else x[mask]


def _truncate(s: np.ndarray, k: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Top-k (k > 0) then top-p (p < 1) on float32 rows; returns them with removed entries at -inf.

    Works on each row's candidates (entries >= `_candidate_floor`) sorted by value: the k-th
    largest value and the top-p cut value come from that sorted array, and an entry is removed
    iff it is below the cut value. Entries equal to the top-p cut value are removed in index order
    up to the cut position (torch's order among exact ties is that of its unstable sort).
    """
    rows, vocab = s.shape
    ridx = np.arange(rows)
    top = s.max(axis=1)
    only_p = (k == 0) & (p < 1)
    full_mass = np.zeros(rows)  # sum of exp(value - max) over the whole row, for top-p-only rows
    if only_p.any():
        shifted = _take_rows(s, only_p) - top[only_p, None]
        full_mass[only_p] = np.exp(shifted, out=shifted).sum(axis=1, dtype=np.float64)
    vals = _sorted_candidates(s, _candidate_floor(s, top, full_mass, k, p))
    width = vals.shape[1]

    kth = np.where(k > 0, vals[ridx, width - np.maximum(k, 1)], np.float32(-np.inf))
    e = np.exp(vals - top[:, None])  # 0 at the -inf fill
    if (k > 0).any():
        e[vals < kth[:, None]] = 0
    kept_mass = e.sum(axis=1, dtype=np.float64)
    total = np.where(only_p, full_mass, kept_mass)  # softmax denominator after top-k
    below = np.where(only_p, np.maximum(full_mass - kept_mass, 0.0), 0.0)  # mass left out below the floor
    probs = (e / total[:, None]).astype(np.float32)  # torch: float32 probabilities, float64 running sum
    running = (below / total)[:, None] + np.cumsum(probs.astype(np.float64), axis=1)
    threshold = (1.0 - p).astype(np.float32)  # torch compares with float32(1 - p)
    cut_pos = np.minimum(np.count_nonzero(running.astype(np.float32) <= threshold[:, None], axis=1), width - 1)
    cut = np.where(p < 1, vals[ridx, cut_pos], kth)

    out = np.where(s < cut[:, None], np.float32(-np.inf), s)
    tied_out = np.where(p < 1, cut_pos - np.count_nonzero(vals < cut[:, None], axis=1), 0)
    tied = np.flatnonzero(tied_out > 0)  # rows where exact ties straddle the top-p cut
    if tied.size:
        tie = s[tied] == cut[tied, None]
        out[tied] = np.where(tie & (np.cumsum(tie, axis=1) <= tied_out[tied, None]), np.float32(-np.inf), out[tied])
    return out


def _candidate_floor(s: np.ndarray, top: np.ndarray, full_mass: np.ndarray, k: np.ndarray, p: np.ndarray):
    """Per-row value below which top-k / top-p remove every entry, so only entries above it need sorting.

    Top-k: the minimum of k block maxima (k distinct entries are >= it, so it is <= the k-th
    largest). Top-p alone: an entry with probability P has cumulative probability <= V * P, so
    it is removed when V * P <= 1 - top_p, i.e. below max + log((1 - top_p) * full_mass / V)
    (less 0.01 of margin), full_mass being the row's sum of exp(value - max).
    """
    rows, vocab = s.shape
    floor = np.full(rows, -np.inf, np.float32)
    only_p = (k == 0) & (p < 1)
    with np.errstate(divide="ignore"):
        bound = np.log((1.0 - p[only_p]) * full_mass[only_p] / vocab) - 0.01
    floor[only_p] = top[only_p] + bound.astype(np.float32)
    for kk in np.unique(k[k > 0]):  # one pass per distinct k, not per row
        sel = np.flatnonzero(k == kk)
        size = vocab // kk
        floor[sel] = s[sel, : kk * size].reshape(sel.size, kk, size).max(axis=2).min(axis=1)
    return floor


def _sorted_candidates(s: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """Each row's entries >= floor, ascending and right-aligned in (rows, width), -inf filled."""
    rows, vocab = s.shape
    keep = s >= floor[:, None]
    num = np.count_nonzero(keep, axis=1)
    width = int(num.max())
    if width > vocab // 2:  # compaction would not pay: sort whole rows
        return np.sort(s, axis=1)
    r = np.repeat(np.arange(rows), num)
    slot = np.arange(r.size) + np.repeat(width - np.cumsum(num), num)  # right-aligned within the row
    vals = np.full((rows, width), -np.inf, np.float32)
    vals[r, slot] = s[keep]
    vals.sort(axis=1)
    return vals


def _inverse_cdf(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index i per row with cdf(i-1) <= u * total < cdf(i), never a zero-probability entry.

    Two levels (blocks of ~sqrt(V) entries, then inside the chosen block) so a 128256-wide row
    needs no full-length cumulative sum.
    """
    top = x.max(axis=1, keepdims=True)
    if not np.isfinite(top).all():
        raise ValueError("every sampled row needs a finite maximum logit")
    e = np.exp(x - top)
    rows, vocab = e.shape
    block = int(np.ceil(np.sqrt(vocab)))
    block_mass = np.add.reduceat(e, np.arange(0, vocab, block), axis=1, dtype=np.float64)
    cum = np.cumsum(block_mass, axis=1)
    target = u * cum[:, -1]
    last_block = block_mass.shape[1] - 1 - np.argmax(block_mass[:, ::-1] > 0, axis=1)
    blk = np.minimum(np.count_nonzero(cum <= target[:, None], axis=1), last_block)
    ridx = np.arange(rows)
    base = np.where(blk > 0, cum[ridx, np.maximum(blk - 1, 0)], 0.0)
    cols = blk[:, None] * block + np.arange(block)
    w = np.where(cols < vocab, e[ridx[:, None], np.minimum(cols, vocab - 1)], 0).astype(np.float64)
    within = base[:, None] + np.cumsum(w, axis=1)
    last_in_block = block - 1 - np.argmax(w[:, ::-1] > 0, axis=1)
    return blk * block + np.minimum(np.count_nonzero(within <= target[:, None], axis=1), last_in_block)
