"""The runtime interface the decode loop drives, and the slot bookkeeping shared by all runtimes.

A runtime owns the KV cache: per layer a K and a V buffer of shape
(max_batch, num_kv_heads, max_len, head_dim) on its device. Sequences live in slots; a graph call
covers the contiguous slot range [start, start + batch) (contiguous so the cache buffers can be
bound as they are, without gathering). Only token ids / codes, positions and logits cross to the
host.

Batched decode steps always run from slot 0 over a bucket of rows (1, 2, 4, ... max_batch: the
smallest that holds the highest requested slot). Every slot in the bucket that was not asked for
rides along as a passenger: it feeds a stream-BOS column / BOS token and writes its K/V into the
last cache row (`scratch_position`), which no real sequence ever uses, and its logits are dropped.
That keeps every step a single graph call without compacting caches, and it keeps the number of
distinct step shapes at log2(max_batch) + 1 per graph: TensorRT holds an execution context (with
its activation memory and captured CUDA graph) per (graph, first slot, rows), so keying them by
arbitrary slot ranges would make up to max_batch^2 / 2 of them.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np

from .manifest import Manifest, ModelSpec


def mask_runs(audio_mask: np.ndarray) -> list[tuple[int, int, bool]]:
    """Maximal runs of text or audio positions as (start, stop, is_audio), in order."""
    mask = np.asarray(audio_mask, bool)
    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), mask.size]
    return [(a, b, bool(mask[a])) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclasses.dataclass(frozen=True)
class PromptLogits:
    text: np.ndarray | None  # (V,) float32
    audio: np.ndarray | None  # (N, C+2) float32


class BackboneRuntime(abc.ABC):
    """Runs the backbone graphs (`prefill`, `text`, `audio`) against a runtime-owned KV cache."""

    name = "abstract"
    has_prefill_graph = True  # False when the deployment skipped it: prompts then run through prefill_split

    def __init__(self, manifest: Manifest, max_batch: int, max_len: int):
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"max_batch {max_batch} / max_len {max_len}: need at least 1 slot and 2 cache rows")
        self.manifest = manifest
        self.spec: ModelSpec = manifest.model
        self.max_batch = max_batch
        self.max_len = max_len

    @property
    def scratch_position(self) -> int:
        return self.max_len - 1

    @property
    def capacity(self) -> int:
        """Tokens one sequence may hold (the last cache row is the passengers' scratch row)."""
        return self.max_len - 1

    @abc.abstractmethod
    def run(self, graph: str, slot: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `graph` for slots [slot, slot + batch); returns its logits outputs as host arrays.

        `inputs` holds every non-cache graph input with the batch as leading dimension. The new
        K/V land in the cache at `cache_lengths`; the returned arrays stay valid until the next call.
        """

    # -- conveniences the loop uses ----------------------------------------------------------------
    def _check_room(self, cache_lengths: np.ndarray, length: int) -> None:
        end = int(np.max(cache_lengths)) + length
        if end > self.capacity:
            raise ValueError(f"sequence would exceed the KV cache ({self.capacity} positions); raise max_len")
        self.reserve(end)

    def reserve(self, positions: int) -> None:
        """The next call writes rows below `positions` of some slot: make the cache hold them below the
        scratch row. Called before `scratch_position` is read for that call. A cache of max_len rows
        (the default) always does."""

    def release(self, slot: int) -> None:
        """The sequence in `slot` has ended; its cache rows need not be kept."""

    def prefill(self, slot: int, input_ids: np.ndarray, audio_codes: np.ndarray, audio_mask: np.ndarray) -> PromptLogits:
        """One prompt (T,) / (T, N) / (T,) into an empty `slot` with the mixed graph; logits of its last position."""
        if not self.has_prefill_graph:
            return self.prefill_split(slot, input_ids, audio_codes, audio_mask)
        length = len(input_ids)
        self._check_room(np.array([0]), length)
        out = self.run(
            "prefill",
            slot,
            {
                "input_ids": np.asarray(input_ids, np.int64)[None],
                "audio_codes": np.asarray(audio_codes, np.int64)[None],
                "audio_mask": np.asarray(audio_mask, bool)[None],
                "cache_lengths": np.zeros(1, np.int64),
                "last_index": np.array([length - 1], np.int64),
            },
        )
        return PromptLogits(out["text_logits"][0].copy(), out["audio_logits"][0].copy())

    def prefill_split(self, slot: int, input_ids: np.ndarray, audio_codes: np.ndarray, audio_mask: np.ndarray) -> PromptLogits:
        """Same result as `prefill`, but each maximal run of text or audio positions goes through
        the text or audio graph. Lets a deployment skip the prefill graph (and its full copy of
        the weights on the GPU). Returns the logits of whichever graph ran last."""
        self._check_room(np.array([0]), len(audio_mask))
        logits = {}
        for start, stop, is_audio in mask_runs(audio_mask):
            feed = (
                {"audio_codes": np.asarray(audio_codes, np.int64)[None, start:stop]}
                if is_audio
                else {"input_ids": np.asarray(input_ids, np.int64)[None, start:stop]}
            )
            feed.update(cache_lengths=np.array([start], np.int64), last_index=np.array([stop - start - 1], np.int64))
            out = self.run("audio" if is_audio else "text", slot, feed)
            logits = {name: array[0].copy() for name, array in out.items()}
        return PromptLogits(logits.get("text_logits"), logits.get("audio_logits"))

    def step_rows(self, stop: int) -> int:
        """Rows of a decode step that must cover slots [0, stop): the next power of two, capped at max_batch."""
        if not 1 <= stop <= self.max_batch:
            raise ValueError(f"slots up to {stop - 1} outside the {self.max_batch} cache slots")
        return min(1 << (stop - 1).bit_length(), self.max_batch)

    def _step(self, graph: str, slots: np.ndarray, feed_name: str, feed: np.ndarray, filler, cache_lengths) -> np.ndarray:
        rows = np.asarray(slots, np.int64)
        if rows.min() < 0:  # a negative index would wrap around the step arrays below
            raise ValueError(f"slot {int(rows.min())} outside the {self.max_batch} cache slots")
        width = self.step_rows(int(rows.max()) + 1)
        self._check_room(np.asarray(cache_lengths), 1)
        full_feed = np.empty((width, 1) + feed.shape[1:], np.int64)
        full_feed[...] = filler
        full_feed[rows, 0] = feed
        lengths = np.full(width, self.scratch_position, np.int64)
        lengths[rows] = cache_lengths
        out = self.run(graph, 0, {feed_name: full_feed, "cache_lengths": lengths, "last_index": np.zeros(width, np.int64)})
        return out["audio_logits" if graph == "audio" else "text_logits"][rows]

    def audio_step(self, slots: np.ndarray, codes: np.ndarray, cache_lengths: np.ndarray) -> np.ndarray:
        """Feed one audio column (b, N) per slot; returns audio logits (b, N, C+2)."""
        return self._step("audio", slots, "audio_codes", np.asarray(codes, np.int64), self.spec.stream_bos_id, cache_lengths)

    def text_step(self, slots: np.ndarray, token_ids: np.ndarray, cache_lengths: np.ndarray) -> np.ndarray:
        """Feed one text token per slot; returns text logits (b, V)."""
        return self._step("text", slots, "input_ids", np.asarray(token_ids, np.int64), self.spec.bos_token_id, cache_lengths)

    def close(self) -> None:
        """Release device memory (a no-op where garbage collection does it)."""
