"""The decode loop: prompt -> backbone steps -> sampled audio columns -> streamed 24 kHz PCM.

It reproduces upstream's generation state machine (spec llm.md §5.3-5.7, reference algorithm §5.9)
for many requests at once (continuous batching). Each request owns a slot of the runtime's KV
cache. One engine iteration:

1. admits waiting requests into free slots and prefills their prompts;
2. for every active sequence, turns its latest logits into a token: AUDIO_INIT (forced all-BOS
   column), an audio column (sampling, RAS, delay ramp rules) or a text token; plans the codec
   windows of the audio frames that became final; applies the stop rules. The per-step state is
   arrays indexed by slot, so the audio columns of all sequences inside a segment are a few array
   operations whatever the batch (the host's share of a GPU step; `make bench` section 5);
3. hands the step's events to the codec thread, which decodes the windows in batched calls while
   the engine goes on, and pushes every request's events in order;
4. feeds every sequence its new column / token: all audio feeds in one graph call, text feeds in
   one call per contiguous run of slots.

`python -m engines.generate` is the command-line front end (text in, WAV out).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .api import (
    SAMPLE_RATE,
    AudioChunk,
    AudioCodes,
    Finished,
    Generation,
    QueueFull,
    SamplingParams,
    SpeechRequest,
    TextDelta,
)
from .audio_io import AudioError, decode_audio, encode_audio, resample
from .codec import CodecDecoder, CodecEncoder, DecodeWindow, StreamingDecoder, decode_windows
from .delay import ColumnLog, DelayRamps
from .manifest import CODEC_DECODER, CODEC_ENCODER, SAMPLER, Manifest, ModelSpec
from .prompt import PromptRenderer, StopMatcher, expand_prompt, tts_messages
from .runtime import BackboneRuntime
from .sampling import RAS_PAD, GraphSampler, HostSampler, check_params, ras_redo, sample

log = logging.getLogger("higgs.engine")


@dataclasses.dataclass
class _Sequence:
    """One request in flight: what is rare or per request. The per-step state (positions, step
    counts, sampling parameters, delay counters, audio-out columns) lives in the engine's arrays,
    indexed by slot, so a step handles every sequence's audio column at once."""

    request: SpeechRequest
    handle: Generation
    slot: int
    prompt_tokens: int
    rng: np.random.Generator
    stop: StopMatcher
    streamer: StreamingDecoder | None  # None: no codec (LLM-only artifacts), segments only
    text_logits: np.ndarray | None = None
    text_ids: list[int] = dataclasses.field(default_factory=list)
    # [start, stop) in the column log, stop None while the segment is open
    segments: list[list[int | None]] = dataclasses.field(default_factory=list)
    audio_samples: int = 0
    audio_ended: bool = False  # the latest audio segment ended by itself (stream EOS)
    outbox: list = dataclasses.field(default_factory=list)  # this step's events and codec windows, in order
    submitted_at: float = dataclasses.field(default_factory=time.monotonic)


_NO_FEED, _AUDIO_FEED, _TEXT_FEED = 0, 1, 2


class Engine:
    """Continuous-batching generation over a `BackboneRuntime` plus the codec decoder."""

    def __init__(
        self,
        runtime: BackboneRuntime,
        codec: CodecDecoder | None,
        renderer: PromptRenderer | None = None,
        encoder: CodecEncoder | None = None,
        model_name: str = "higgs-audio-v2",
        max_queue: int = 64,
        stream_frames: int = 8,
        sampler=None,
    ):
        """sampler: draws the audio codes of a step (`HostSampler`, the default, or `GraphSampler`)."""
        self.runtime = runtime
        self.spec: ModelSpec = runtime.spec
        self.codec = codec
        self.renderer = renderer
        self.encoder = encoder
        self.model_name = model_name
        self.sample_rate = SAMPLE_RATE
        self.stream_frames = stream_frames
        self._pending: queue.Queue = queue.Queue(maxsize=max_queue)
        self._active: dict[int, _Sequence] = {}
        self._free_slots = list(range(runtime.max_batch))
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._drain = True
        self._closed = False
        self._close_lock = threading.Lock()
        self._wake = threading.Event()  # set by submit: the idle worker has something to admit
        self._finish_listeners: list = []
        self._outboxes: list[_Sequence] = []  # sequences with something to deliver at the end of the step
        # codec windows are decoded (and events delivered) on this thread while the next backbone step runs
        self._codec_thread = ThreadPoolExecutor(1, thread_name_prefix="higgs-codec") if codec is not None else None
        self._delivery: Future | None = None  # the latest step's delivery
        self._codec_error: Exception | None = None
        self._thread: threading.Thread | None = None
        self.sampler = sampler or HostSampler()
        slots, n = runtime.max_batch, self.spec.num_codebooks
        self._last_token = np.zeros(slots, np.int64)
        self._cache_length = np.zeros(slots, np.int64)
        self._steps = np.zeros(slots, np.int64)
        self._max_tokens = np.zeros(slots, np.int64)
        self._temperature = np.zeros(slots)
        self._top_k = np.zeros(slots, np.int64)
        self._top_p = np.ones(slots)
        self._ras_window = np.zeros(slots, np.int64)
        self._ras_max_repeat = np.zeros(slots, np.int64)
        self._ramps = DelayRamps(slots, n, self.spec.stream_bos_id, self.spec.stream_eos_id)
        # generated columns <= capacity, plus a RAS history prefix of at most as many prompt columns
        self._log = ColumnLog(slots, n, 2 * runtime.capacity)
        self._feed_kind = np.zeros(slots, np.int8)
        self._feed_audio = np.zeros((slots, n), np.int64)
        self._feed_token = np.zeros(slots, np.int64)
        self._audio_logits = np.zeros((0, n, self.spec.codebook_stride), np.float32)  # of the last audio step
        self._audio_row = np.zeros(slots, np.int64)  # slot -> its row in _audio_logits
        self.stats = {"steps": 0, "graph_seconds": 0.0, "loop_seconds": 0.0, "audio_seconds": 0.0, "requests": 0}

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_artifacts(
        cls,
        artifacts_dir: str | Path,
        runtime: str = "ort-cpu",
        max_batch: int = 8,
        max_len: int = 2048,
        threads: int | None = None,
        **kwargs,
    ) -> "Engine":
        manifest = Manifest.load(artifacts_dir)
        if runtime in ("ort-cpu", "ort-cuda"):
            from .ort_runtime import OrtBackbone, providers_for

            device = runtime.split("-")[1]
            # on a GPU the prefill session would hold a third copy of the weights: prefill run by run instead
            backbone = OrtBackbone(manifest, max_batch=max_batch, max_len=max_len, device=device, threads=threads,
                                   prefill_graph=device == "cpu")
            providers = providers_for(device)
        elif runtime == "tensorrt":
            from .trt_runtime import TrtBackbone

            backbone = TrtBackbone(manifest, max_batch=max_batch, max_len=max_len)
            providers = None
        else:
            raise ValueError(f"unknown runtime {runtime!r}: ort-cpu, ort-cuda or tensorrt")
        if not manifest.has(CODEC_DECODER):
            raise ValueError(f"{artifacts_dir} has no codec_decoder graph: re-run make export with CODEC=DIR")
        codec = CodecDecoder(manifest.graph_path(CODEC_DECODER), providers)
        if codec.num_quantizers != manifest.model.num_codebooks:
            raise ValueError(
                f"{artifacts_dir}: codec decoder has {codec.num_quantizers} codebooks, the LLM {manifest.model.num_codebooks}; "
                "re-export with the codec this model was trained with"
            )
        encoder = CodecEncoder(manifest.graph_path(CODEC_ENCODER), providers) if manifest.has(CODEC_ENCODER) else None
        renderer = PromptRenderer(manifest.tokenizer, manifest.model.num_codebooks) if manifest.tokenizer else None
        if "sampler" not in kwargs:  # (setdefault would load a sampler session even when one is passed)
            kwargs["sampler"] = _sampler_for(manifest, runtime)
        return cls(backbone, codec, renderer=renderer, encoder=encoder, **kwargs)

    # -- SpeechEngine protocol ----------------------------------------------------------------------
    def ready(self) -> bool:
        return self._ready.is_set()

    def queue_depth(self) -> int:
        return self._pending.qsize()

    def encode_reference(self, wave_24k: np.ndarray) -> AudioCodes:
        if self.encoder is None:
            raise NotImplementedError("these artifacts have no codec_encoder graph: re-run make export with CODEC=DIR")
        return AudioCodes(self.encoder.encode(wave_24k))

    def submit(self, request: SpeechRequest, loop=None) -> Generation:
        """Validate and render now (so bad prompts fail in the caller), queue for a slot."""
        prepared = self._prepare(request)
        handle = Generation(request, loop)
        try:
            self._pending.put_nowait((handle, prepared))
        except queue.Full:
            raise QueueFull(retry_after=1.0) from None
        self._wake.set()
        return handle

    def start(self) -> "Engine":
        """Warm up, then run the loop on a background thread."""
        self.warmup()
        self._thread = threading.Thread(target=self._worker, name="higgs-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop after finishing (drain) or cancelling the requests in flight. Safe to call again,
        e.g. drain=False after a drain that timed out."""
        self._drain = drain and self._drain
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still draining; a later call may cancel
        with self._close_lock:
            if not self._closed:
                self._closed = True
                if self._codec_thread is not None:
                    self._codec_thread.shutdown(wait=True)
                self.runtime.close()

    def add_finish_listener(self, callback) -> None:
        """callback(request, finished) runs as each request's Finished is delivered (metrics, tests): on the
        codec thread when the engine has a codec, else on the engine thread."""
        self._finish_listeners.append(callback)

    def active_requests(self) -> int:
        """Requests holding a decode slot now."""
        return len(self._active)

    def _end(self, handle: Generation, finished: Finished) -> None:
        for callback in self._finish_listeners:
            callback(handle.request, finished)
        handle.push(finished)

    # -- synchronous use (CLI, tests) ----------------------------------------------------------------
    def run_until_idle(self) -> None:
        while self.step():
            pass

    def generate(self, request: SpeechRequest):
        """Blocking convenience: submit one request, run it to the end, return its events."""
        handle = self.submit(request)
        self.run_until_idle()
        return list(handle.iter_blocking())

    def warmup(self) -> None:
        """One prefill, text and audio step and a codec decode, so the first request pays no setup."""
        spec = self.spec
        slot = 0
        self.runtime.prefill(slot, np.array([spec.bos_token_id] * 2), np.zeros((2, spec.num_codebooks)), np.zeros(2, bool))
        self.runtime.text_step(np.array([slot]), np.array([spec.bos_token_id]), np.array([2]))
        logits = self.runtime.audio_step(np.array([slot]), np.full((1, spec.num_codebooks), spec.stream_bos_id), np.array([3]))
        self.sampler(logits, np.ones(1), np.zeros(1, np.int64), np.ones(1), np.zeros((1, 2, spec.num_codebooks)))
        if self.codec is not None:
            self.codec.decode(np.zeros((self.codec.num_quantizers, 2 * self.codec.context_frames + 1), np.int64))
        self._ready.set()

    # -- the loop -----------------------------------------------------------------------------------
    def _worker(self) -> None:
        while not self._stop.is_set() or (self._drain and (self._active or not self._pending.empty())):
            if not self._active and self._pending.empty():
                self._wake.wait(0.05)  # returns at once on submit; the timeout notices shutdown
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as error:  # a runtime failure must not leave clients hanging
                log.exception("engine step failed")
                for seq in list(self._active.values()):
                    self._finish(seq, "error", None, error=str(error))
                self._deliver(decode=False)
        for seq in list(self._active.values()):
            self._finish(seq, "cancelled", None)
        self._deliver()
        self._wait_for_delivery()
        while not self._pending.empty():
            handle, _ = self._pending.get_nowait()
            self._end(handle, Finished("cancelled", None, 0, 0, 0.0, error="server shutting down"))

    def step(self) -> bool:
        """One iteration (admit, sample, feed). Returns False, once every event is delivered, when there is
        nothing to do."""
        started = time.perf_counter()
        if self._codec_error is not None:
            error, self._codec_error = self._codec_error, None
            raise RuntimeError(f"codec decode failed: {error}") from error
        self._admit()
        if not self._active:
            self._wait_for_delivery()
            return False
        for seq in list(self._active.values()):
            if seq.handle.cancelled:
                log.info("request %s cancelled by the client after %d steps", seq.request.request_id, self._steps[seq.slot])
                self._finish(seq, "cancelled", None)
        self._decide()
        self._deliver()
        self.stats["graph_seconds"] += self._feed()
        self.stats["steps"] += 1
        self.stats["loop_seconds"] += time.perf_counter() - started
        return True

    # -- admission ----------------------------------------------------------------------------------
    def _prepare(self, request: SpeechRequest):
        """Everything that can fail because of the request itself, so it fails in the caller."""
        check_params(request.sampling)
        stop_strings = dict.fromkeys((*request.stop_strings, "<|end_of_text|>"))  # EOS always stops (spec §5.7)
        stop = StopMatcher(self.renderer.tokenizer if self.renderer else None, stop_strings, self._special_ids())
        if request.prompt_ids is not None:
            ids, segments = np.asarray(request.prompt_ids, np.int64), list(request.prompt_audio)
        else:
            if self.renderer is None:
                raise ValueError("these artifacts have no tokenizer.json, so text prompts cannot be rendered")
            rendered = self.renderer.render(request.messages, force_audio=request.force_audio)
            ids, segments = rendered.ids, rendered.audio_segments
        if len(ids) == 0:
            raise ValueError("empty prompt")
        if ids[-1] == self.spec.audio_out_token_id:
            raise ValueError("prompts that end inside an audio segment (continuations) are not supported")
        prompt = expand_prompt(ids, segments, self.spec.audio_out_token_id, self.spec.num_codebooks)
        room = self.runtime.capacity - len(prompt.input_ids)
        if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
            raise ValueError(
                f"prompt ({len(prompt.input_ids)} positions) + max_tokens ({request.max_tokens}) exceeds the "
                f"KV cache of {self.runtime.capacity} positions; shorten the input or lower max_tokens"
            )
        if request.max_tokens is not None and request.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        return prompt, request.max_tokens or room, stop

    def _admit(self) -> None:
        while self._free_slots and not self._pending.empty():
            handle, (prompt, max_tokens, stop) = self._pending.get_nowait()
            if handle.cancelled:
                self._end(handle, Finished("cancelled", None, 0, 0, 0.0))
                continue
            try:
                self._start(handle, prompt, max_tokens, stop)
            except Exception as error:  # this request fails; the others go on
                log.exception("request %s: prefill failed", handle.request.request_id)
                self._end(handle, Finished("error", None, len(prompt.input_ids), 0, 0.0, error=str(error)))

    def _start(self, handle: Generation, prompt, max_tokens: int, stop: StopMatcher) -> None:
        """Prefill into the first free slot; the slot is taken only once the sequence exists."""
        slot = self._free_slots[0]
        request = handle.request
        logits = self.runtime.prefill(slot, prompt.input_ids, prompt.audio_codes, prompt.audio_mask)
        params = request.sampling
        window = max(params.ras_window, 0)
        history = prompt.audio_history
        self._log.reset(slot, history[:, history.shape[1] - min(window, history.shape[1], self.runtime.capacity):])
        seq = _Sequence(
            request=request,
            handle=handle,
            slot=slot,
            prompt_tokens=len(prompt.input_ids),
            rng=np.random.default_rng(params.seed),
            stop=stop,
            streamer=StreamingDecoder(self.codec, min_frames=self.stream_frames) if self.codec else None,
            text_logits=logits.text,
        )
        self._last_token[slot] = prompt.input_ids[-1]
        self._cache_length[slot] = len(prompt.input_ids)
        self._steps[slot] = 0
        self._max_tokens[slot] = max_tokens
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = params.temperature, params.top_k or 0, params.top_p
        self._ras_window[slot], self._ras_max_repeat[slot] = window, params.ras_max_repeat
        self._feed_kind[slot] = _NO_FEED
        self._free_slots.remove(slot)
        self._active[slot] = seq
        self.stats["requests"] += 1
        log.info("request %s: slot %d, %d prompt positions", request.request_id, slot, seq.prompt_tokens)

    def _special_ids(self) -> dict[str, int]:
        spec = self.spec
        return {
            "<|end_of_text|>": spec.eos_token_id,
            "<|eot_id|>": spec.eot_token_id,
            "<|audio_eos|>": spec.audio_eos_token_id,
        }

    # -- deciding the next token of every sequence ----------------------------------------------------
    def _decide(self) -> None:
        """Every active sequence's next item, in arrays over the slots: audio columns of all
        sequences inside a segment at once; segment starts and ends and text tokens one by one."""
        spec = self.spec
        slots = np.fromiter(self._active, np.int64, len(self._active))
        last = self._last_token[slots]
        starting = slots[last == spec.audio_out_bos_token_id]
        audio = slots[last == spec.audio_out_token_id]
        text = slots[(last != spec.audio_out_token_id) & (last != spec.audio_out_bos_token_id)]
        if starting.size:  # AUDIO_INIT: forced all-BOS column, no sampling, no RNG
            self._log.start_segment(starting)
            for slot in starting:
                seq = self._active[slot]
                seq.segments.append([int(self._log.length[slot]), None])
                seq.audio_ended = False
            self._audio_columns(starting, self._ramps.start(starting), np.zeros(starting.size, bool))
        if audio.size:
            self._audio_columns(audio, *self._ramps.step(audio, self._sample_audio(audio)))
        if text.size:
            tokens = self._sample_text(text)
            self._steps[text] += 1
            for slot, token in zip(text, tokens):
                self._record(self._active[slot], int(token))

    def _audio_columns(self, slots: np.ndarray, columns: np.ndarray, ended: np.ndarray) -> None:
        """Store one column per slot, stream the frames it made final, apply the stop rules and plan
        the next feed. Columns inside a segment take the array path; a segment's first column
        (a text id in upstream's list) and its last (<|audio_eos|>) go through `_record`."""
        spec = self.spec
        self._log.append(slots, columns)
        self._steps[slots] += 1
        if self.codec is not None:
            ready, frames = self._log.released_frames(slots, spec.codebook_size)
            for i in np.flatnonzero(ready):
                seq = self._active[slots[i]]
                self._plan(seq, seq.streamer.plan_push(frames[i][:, None]))
        inner = ~ended & (self._last_token[slots] == spec.audio_out_token_id)
        plain = slots[inner]
        done = self._steps[plain] >= self._max_tokens[plain]
        for slot in plain[done]:
            self._finish(self._active[slot], "length", None)
        self._feed_kind[plain[~done]] = _AUDIO_FEED
        self._feed_audio[plain[~done]] = columns[inner][~done]
        for i in np.flatnonzero(~inner):
            seq = self._active[slots[i]]
            if ended[i]:
                self._close_segment(seq)
                seq.audio_ended = True
            self._record(seq, spec.audio_eos_token_id if ended[i] else spec.audio_out_token_id, columns[i])

    def _record(self, seq: _Sequence, token: int, column: np.ndarray | None = None) -> None:
        """Apply the stop rules to a step's token (already counted) and decide what the next forward pass is fed."""
        spec = self.spec
        slot = seq.slot
        new_segment = token == spec.audio_out_token_id and self._last_token[slot] != spec.audio_out_token_id
        if token != spec.audio_out_token_id or new_segment:  # upstream's compressed text id list
            seq.text_ids.append(token)
            if token not in (spec.audio_out_token_id, spec.audio_eos_token_id):
                self._post(seq, TextDelta((token,)))
            matched = seq.stop.push(token)
            if matched is not None:
                self._finish(seq, "stop", spec.stream_eos_id if seq.audio_ended else matched)
                return
        if self._steps[slot] >= self._max_tokens[slot]:
            self._finish(seq, "length", None)
            return
        self._last_token[slot] = token
        if token == spec.audio_out_token_id:
            self._feed_kind[slot], self._feed_audio[slot] = _AUDIO_FEED, column
        else:
            self._feed_kind[slot], self._feed_token[slot] = _TEXT_FEED, token

    # -- sampling -----------------------------------------------------------------------------------
    def _sample_audio(self, slots: np.ndarray) -> np.ndarray:
        """One column (N,) per slot from the last audio step's logits: the sampler draws all S*N
        codebook rows at once, then RAS redraws the codes that repeat too often in their window."""
        rows = self._audio_row[slots]
        logits = self._audio_logits if np.array_equal(rows, np.arange(len(self._audio_logits))) else self._audio_logits[rows]
        n = self.spec.num_codebooks
        uniforms = np.stack([self._active[slot].rng.random((2, n)) for slot in slots])  # draw, RAS redraw
        codes, redraw = self.sampler(logits, self._temperature[slots], self._top_k[slots], self._top_p[slots], uniforms)
        windows = self._log.windows(slots, self._ras_window[slots], RAS_PAD)
        if windows.shape[1]:
            redo = ras_redo(codes, windows, self._ras_max_repeat[slots])
            if redo.any():
                codes[redo] = redraw(redo)
        return codes

    def _sample_text(self, slots: np.ndarray) -> np.ndarray:
        """A text step may start audio only through <|audio_out_bos|>: upstream has no state for a bare
        <|AUDIO_OUT|> drawn as text (no segment, no audio logits), so that id is never drawn."""
        seqs = [self._active[slot] for slot in slots]
        raw = np.stack([s.text_logits for s in seqs])
        raw[:, self.spec.audio_out_token_id] = -np.inf
        uniforms = np.array([s.rng.random() for s in seqs])
        return sample(raw, self._temperature[slots], self._top_k[slots], self._top_p[slots], uniforms)

    # -- feeding the backbone ---------------------------------------------------------------------------
    def _feed(self) -> float:
        started = time.perf_counter()
        kinds = self._feed_kind
        audio = np.flatnonzero(kinds == _AUDIO_FEED)
        text = np.flatnonzero(kinds == _TEXT_FEED)
        if audio.size:
            self._audio_logits = self.runtime.audio_step(audio, self._feed_audio[audio], self._cache_length[audio])
            self._audio_row[audio] = np.arange(audio.size)
        for run in np.split(text, np.flatnonzero(np.diff(text) != 1) + 1) if text.size else ():  # contiguous slots
            logits = self.runtime.text_step(run, self._feed_token[run], self._cache_length[run])
            for slot, row in zip(run, logits):
                self._active[slot].text_logits = row
        self._cache_length[kinds != _NO_FEED] += 1
        kinds[:] = _NO_FEED
        return time.perf_counter() - started

    # -- audio out and event delivery -------------------------------------------------------------------
    def _post(self, seq: _Sequence, item) -> None:
        """Queue an event or a codec window for the end of this step (keeps each request's order)."""
        if not seq.outbox:
            self._outboxes.append(seq)
        seq.outbox.append(item)

    def _plan(self, seq: _Sequence, window: DecodeWindow | None) -> None:
        if window is not None:
            seq.audio_samples += window.samples
            self._post(seq, window)

    def _close_segment(self, seq: _Sequence) -> None:
        if not seq.segments or seq.segments[-1][1] is not None:
            return
        seq.segments[-1][1] = int(self._log.length[seq.slot])
        if seq.streamer is not None:  # every final frame has been released already
            self._plan(seq, seq.streamer.plan_flush())

    def _deliver(self, decode: bool = True) -> None:
        """Hand this step's events to the codec thread, which decodes every window of the step in batched
        codec calls while the engine runs the next backbone step, then pushes each request's events in
        order (one worker: steps are delivered in order too). Without a codec there are no windows and
        the events are pushed now."""
        batch = [(seq.handle, seq.outbox) for seq in self._outboxes]
        for seq in self._outboxes:
            seq.outbox = []
        self._outboxes = []
        if not batch:
            return
        if self._codec_thread is None:
            self._push(batch, decode=False)
        else:
            self._delivery = self._codec_thread.submit(self._push, batch, decode)

    def _push(self, batch: list[tuple[Generation, list]], decode: bool) -> None:
        windows = [item for _, items in batch for item in items if isinstance(item, DecodeWindow)]
        pcm, error = [None] * len(windows), None
        if decode and windows:
            try:
                pcm = decode_windows(self.codec, windows)
            except Exception as failure:  # the requests of this batch end as errors; the engine step raises it next
                log.exception("codec decode failed")
                error = self._codec_error = failure
        chunks = iter(pcm)
        for handle, items in batch:
            for item in items:
                if isinstance(item, DecodeWindow):
                    chunk = next(chunks)
                    if chunk is not None and chunk.size:
                        handle.push(AudioChunk(chunk))
                elif isinstance(item, Finished):
                    self._end(handle, item if error is None else dataclasses.replace(item, finish_reason="error", error=f"codec: {error}"))
                else:
                    handle.push(item)

    def _wait_for_delivery(self) -> None:
        if self._delivery is not None:
            self._delivery.result()
            self._delivery = None

    def _finish(self, seq: _Sequence, reason: str, stop_reason, error: str | None = None) -> None:
        self._close_segment(seq)
        del self._active[seq.slot]  # free the slot before anyone hears the request ended
        self._free_slots.append(seq.slot)
        self._free_slots.sort()
        self._feed_kind[seq.slot] = _NO_FEED
        seconds = seq.audio_samples / SAMPLE_RATE
        self.stats["audio_seconds"] += seconds
        log.info(
            "request %s: %s after %d steps, %.2fs audio, %.2fs wall",
            seq.request.request_id, reason, self._steps[seq.slot], seconds, time.monotonic() - seq.submitted_at,
        )
        segments = tuple(self._log.segment(seq.slot, start, stop) for start, stop in seq.segments if stop > start)
        finished = Finished(reason, stop_reason, seq.prompt_tokens, int(self._steps[seq.slot]), seconds, error=error,
                            segments=segments, text_ids=tuple(seq.text_ids))
        self._post(seq, finished)


def _sampler_for(manifest: Manifest, runtime: str):
    """Host sampling on the CPU (faster there, see GraphSampler); on a GPU the sampler graph runs on the device."""
    if runtime == "ort-cpu":
        return HostSampler()
    if not manifest.has(SAMPLER):
        raise ValueError(f"{manifest.root} has no audio_sampler graph: re-run make export")
    return GraphSampler.load(manifest.graph_path(SAMPLER), device="cuda")


# --- command line ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.generate", description="Text to speech with exported Higgs Audio graphs.")
    parser.add_argument("--artifacts", type=Path, required=True, help="directory written by make export")
    parser.add_argument("--text", required=True, help="what to say")
    parser.add_argument("--out", type=Path, default=Path("out.wav"), help="WAV file to write (24 kHz mono PCM16)")
    parser.add_argument("--scene", help="scene description for the system prompt")
    parser.add_argument("--ref-audio", type=Path, help="reference clip to clone (wav/mp3/flac/ogg)")
    parser.add_argument("--ref-text", help="transcript of --ref-audio")
    defaults = SamplingParams()  # upstream serve engine's defaults
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--ras-window", type=int, default=defaults.ras_window, help="repetition-aware sampling window (<= 0 disables)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="generation steps, one audio frame = 40 ms (default: what fits)")
    parser.add_argument("--max-len", type=int, default=2048, help="KV cache positions: prompt + reference audio + generated steps")
    parser.add_argument("--runtime", default="ort-cpu", choices=["ort-cpu", "ort-cuda", "tensorrt"])
    parser.add_argument("--stream", action="store_true", help="print each audio chunk as it is decoded")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if (args.ref_audio is None) != (args.ref_text is None):
        parser.error("--ref-audio and --ref-text go together (the clip and its transcript)")
    try:
        engine = Engine.from_artifacts(args.artifacts, runtime=args.runtime, max_batch=1, max_len=args.max_len)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    references = ()
    if args.ref_audio is not None:
        try:
            wave_in, rate = decode_audio(args.ref_audio.read_bytes(), args.ref_audio.suffix.lstrip("."))
            codes = engine.encode_reference(resample(wave_in, rate, SAMPLE_RATE))
        except (AudioError, NotImplementedError, ValueError) as error:
            print(f"error: --ref-audio {args.ref_audio}: {error}", file=sys.stderr)
            return 2
        references = ((args.ref_text, codes),)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, ras_window=args.ras_window, seed=args.seed)
    request = SpeechRequest(tts_messages(args.text, scene=args.scene, references=references), sampling=sampling, max_tokens=args.max_tokens)
    engine.warmup()
    started = time.perf_counter()
    try:
        handle = engine.submit(request)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    chunks, finished, first_audio = [], None, None
    while True:
        busy = engine.step()
        for event in handle.poll():
            if isinstance(event, AudioChunk):
                first_audio = first_audio or time.perf_counter() - started
                chunks.append(event.pcm)
                if args.stream:
                    print(f"chunk {len(chunks)}: {event.pcm.size / SAMPLE_RATE:.2f}s of audio at {time.perf_counter() - started:.2f}s", flush=True)
            elif isinstance(event, Finished):
                finished = event
        if not busy:
            break
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    args.out.write_bytes(encode_audio(pcm, SAMPLE_RATE, "wav"))
    elapsed = time.perf_counter() - started
    print(
        f"wrote {args.out}: {pcm.size / SAMPLE_RATE:.2f}s of audio in {elapsed:.2f}s "
        f"({finished.finish_reason}, {finished.completion_tokens} steps"
        f"{f', first audio after {first_audio:.2f}s' if first_audio else ''})"
    )
    return 0 if finished.finish_reason in ("stop", "length") else 1


if __name__ == "__main__":
    sys.exit(main())
