"""The decode loop: prompt -> backbone steps -> sampled audio columns -> streamed 24 kHz PCM.

It reproduces upstream's generation state machine (spec llm.md §5.3-5.7, reference algorithm §5.9)
for many requests at once (continuous batching). Each request owns a slot of the runtime's KV
cache. One engine iteration:

1. admits waiting requests into free slots and prefills their prompts (checked at submit,
   engines/admission.py);
2. for every active sequence, turns its latest logits into a token: AUDIO_INIT (forced all-BOS
   column), an audio column (sampling, RAS, delay ramp rules) or a text token; plans the codec
   windows of the audio frames that became final; applies the stop rules. The per-step state is
   arrays indexed by slot, so the audio columns of all sequences inside a segment are a few array
   operations whatever the batch (the host's share of a GPU step; `make bench` section 5);
3. hands the step's events to the codec thread (engines/delivery.py), which decodes the windows in
   batched calls while the engine goes on, and pushes every request's events in order;
4. feeds every sequence its new column / token: all audio feeds in one graph call, text feeds in
   one call per contiguous run of slots.

`python -m engines.generate` is the command-line front end (text in, WAV out).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np

from .admission import Prepared, prepare, render
from .api import SAMPLE_RATE, AudioCodes, Finished, Generation, QueueFull, SpeechRequest, TextDelta
from .codec import CodecDecoder, CodecEncoder, DecodeWindow, StreamingDecoder, decode_windows
from .delay import ColumnLog, DelayRamps
from .delivery import Delivery, FinishListener
from .manifest import CODEC_DECODER, CODEC_ENCODER, SAMPLER, Manifest, ModelSpec
from .prompt import PromptRenderer
from .runtime import BackboneRuntime
from .sampling import RAS_PAD, GraphSampler, HostSampler, ras_redo, sample
from .slots import Feed, SlotSequence, SlotState

log = logging.getLogger("higgs.engine")

DEFAULT_STREAM_FRAMES = 8  # the fewest audio frames (40 ms each) a streamed codec chunk holds after the first


@dataclasses.dataclass
class EngineStats:
    """Totals since the engine started (bench, Ray's health check)."""

    steps: int = 0
    requests: int = 0  # admitted into a slot
    graph_seconds: float = 0.0  # backbone step calls
    loop_seconds: float = 0.0  # whole steps
    audio_seconds: float = 0.0  # generated


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
        stream_frames: int = DEFAULT_STREAM_FRAMES,
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
        self._pending: queue.Queue[tuple[Generation, Prepared]] = queue.Queue(maxsize=max_queue)
        self._active: dict[int, SlotSequence] = {}
        self._free_slots = list(range(runtime.max_batch))
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._drain = True
        self._closed = False
        self._close_lock = threading.Lock()
        self._wake = threading.Event()  # set by submit: the idle worker has something to admit
        self._delivery = Delivery(self._decode_windows if codec is not None else None)
        self._thread: threading.Thread | None = None
        self.sampler = sampler or HostSampler()
        slots, n = runtime.max_batch, self.spec.num_codebooks
        self._state = SlotState(slots, n)
        self._ramps = DelayRamps(slots, n, self.spec.stream_bos_id, self.spec.stream_eos_id)
        # generated columns <= capacity, plus a RAS history prefix of at most as many prompt columns
        self._log = ColumnLog(slots, n, 2 * runtime.capacity)
        self._audio_logits = np.zeros((0, n, self.spec.codebook_stride), np.float32)  # of the last audio step
        self._audio_row = np.zeros(slots, np.int64)  # slot -> its row in _audio_logits
        self.stats = EngineStats()

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_artifacts(cls, artifacts_dir: str | Path, runtime: str = "ort-cpu", max_batch: int = 8, max_len: int = 2048,
                       threads: int | None = None, **kwargs) -> "Engine":
        """An engine over a `make export` directory on `runtime` (ort-cpu, ort-cuda or tensorrt); kwargs go to __init__."""
        manifest = Manifest.load(artifacts_dir)
        if runtime in ("ort-cpu", "ort-cuda"):
            from .ort_runtime import OrtBackbone, providers_for

            device = runtime.split("-")[1]
            # no prefill session, prompts prefill run by run through the step graphs: ONNX Runtime prepacks
            # every weight into each session's heap (a third copy of the weights, on a GPU and on the CPU),
            # and on the CPU split prefill is also faster, as it runs one FFN per position (docs/cpu.md)
            backbone = OrtBackbone(manifest, max_batch=max_batch, max_len=max_len, device=device, threads=threads,
                                   prefill_graph=False)
            providers = providers_for(device)
        elif runtime == "tensorrt":
            from .trt.runtime import TrtBackbone

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
        prepared = prepare(request, self.spec, self.renderer, self.runtime.capacity)
        handle = Generation(request, loop)
        try:
            self._pending.put_nowait((handle, prepared))
        except queue.Full:
            raise QueueFull(retry_after=1.0) from None
        self._wake.set()
        return handle

    def prompt_length(self, request: SpeechRequest) -> int:
        """Positions the request's rendered prompt takes in the KV cache."""
        return len(render(request, self.spec, self.renderer).input_ids)

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
                self._delivery.close()
                self.runtime.close()

    def add_finish_listener(self, callback: FinishListener) -> None:
        """callback(request, finished) runs as each request's Finished is delivered (metrics, tests): on the
        codec thread when the engine has a codec, else on the engine thread."""
        self._delivery.add_listener(callback)

    def active_requests(self) -> int:
        """Requests holding a decode slot now."""
        return len(self._active)

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
        self.runtime.release(slot)
        if self.codec is not None:
            context = self.codec.context_frames  # a streamed window's shape: one frame between its two contexts
            self.codec.decode(np.zeros((self.codec.num_quantizers, 2 * context + 1), np.int64), (context, context))
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
                self._delivery.flush(decode=False)
        for seq in list(self._active.values()):
            self._finish(seq, "cancelled", None)
        self._delivery.flush()
        self._delivery.wait()
        while not self._pending.empty():
            handle, _ = self._pending.get_nowait()
            self._delivery.end(handle, Finished(finish_reason="cancelled", error="server shutting down"))

    def step(self) -> bool:
        """One iteration (admit, sample, feed). Returns False, once every event is delivered, when there is
        nothing to do."""
        started = time.perf_counter()
        error = self._delivery.take_error()
        if error is not None:
            raise RuntimeError(f"codec decode failed: {error}") from error
        self._admit()
        if not self._active:
            self._delivery.wait()
            return False
        for seq in list(self._active.values()):
            if seq.handle.cancelled:
                log.info("request %s cancelled by the client after %d steps", seq.request.request_id, self._state.steps[seq.slot])
                self._finish(seq, "cancelled", None)
        self._decide()
        self._delivery.flush()
        self.stats.graph_seconds += self._feed()
        self.stats.steps += 1
        self.stats.loop_seconds += time.perf_counter() - started
        return True

    # -- admission ----------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self._free_slots and not self._pending.empty():
            handle, prepared = self._pending.get_nowait()
            if handle.cancelled:
                self._delivery.end(handle, Finished(finish_reason="cancelled"))
                continue
            try:
                self._start(handle, prepared)
            except Exception as error:  # this request fails; the others go on
                log.exception("request %s: prefill failed", handle.request.request_id)
                self._delivery.end(handle, Finished(finish_reason="error", prompt_tokens=len(prepared.prompt.input_ids),
                                                    error=str(error)))

    def _start(self, handle: Generation, prepared: Prepared) -> None:
        """Prefill into the first free slot; the slot is taken only once the sequence exists."""
        slot = self._free_slots[0]
        request, prompt = handle.request, prepared.prompt
        logits = self.runtime.prefill(slot, prompt.input_ids, prompt.audio_codes, prompt.audio_mask)
        self._state.admit(slot, prompt.input_ids, prepared.max_tokens, request.sampling)
        window, history = self._state.ras_window[slot], prompt.audio_history
        self._log.reset(slot, history[:, history.shape[1] - min(window, history.shape[1], self.runtime.capacity):])
        seq = SlotSequence(
            request=request,
            handle=handle,
            slot=slot,
            prompt_tokens=len(prompt.input_ids),
            rng=np.random.default_rng(request.sampling.seed),
            stop=prepared.stop,
            streamer=StreamingDecoder(self.codec, min_frames=self.stream_frames) if self.codec else None,
            text_logits=logits.text,
        )
        self._free_slots.remove(slot)
        self._active[slot] = seq
        self.stats.requests += 1
        log.info("request %s: slot %d, %d prompt positions", request.request_id, slot, seq.prompt_tokens)

    # -- deciding the next token of every sequence ----------------------------------------------------
    def _decide(self) -> None:
        """Every active sequence's next item, in arrays over the slots: audio columns of all
        sequences inside a segment at once; segment starts and ends and text tokens one by one."""
        spec = self.spec
        slots = np.fromiter(self._active, np.int64, len(self._active))
        last = self._state.last_token[slots]
        starting = slots[last == spec.audio_out_bos_token_id]
        audio = slots[last == spec.audio_out_token_id]
        text = slots[(last != spec.audio_out_token_id) & (last != spec.audio_out_bos_token_id)]
        if starting.size:  # AUDIO_INIT: forced all-BOS column, no sampling, no RNG
            self._log.start_segment(starting)
            for slot in starting:
                seq = self._active[slot]
                seq.segment_start = int(self._log.length[slot])
                seq.audio_ended = False
            self._audio_columns(starting, self._ramps.start(starting), np.zeros(starting.size, bool))
        if audio.size:
            self._audio_columns(audio, *self._ramps.step(audio, self._sample_audio(audio)))
        if text.size:
            tokens = self._sample_text(text)
            self._state.steps[text] += 1
            for slot, token in zip(text, tokens):
                self._record(self._active[slot], int(token))

    def _audio_columns(self, slots: np.ndarray, columns: np.ndarray, ended: np.ndarray) -> None:
        """Store one column per slot, stream the frames it made final, apply the stop rules and plan
        the next feed. Columns inside a segment take the array path; a segment's first column
        (a text id in upstream's list) and its last (<|audio_eos|>) go through `_record`."""
        spec = self.spec
        self._log.append(slots, columns)
        self._state.steps[slots] += 1
        if self.codec is not None:
            ready, frames = self._log.released_frames(slots, spec.codebook_size)
            for i in np.flatnonzero(ready):
                seq = self._active[slots[i]]
                self._plan(seq, seq.streamer.plan_push(frames[i][:, None]))
        inner = ~ended & (self._state.last_token[slots] == spec.audio_out_token_id)
        plain = slots[inner]
        done = self._state.steps[plain] >= self._state.max_tokens[plain]
        for slot in plain[done]:
            self._finish(self._active[slot], "length", None)
        self._state.feed_kind[plain[~done]] = Feed.AUDIO
        self._state.feed_audio[plain[~done]] = columns[inner][~done]
        for i in np.flatnonzero(~inner):
            seq = self._active[slots[i]]
            if ended[i]:
                self._close_segment(seq)
                seq.audio_ended = True
            self._record(seq, spec.audio_eos_token_id if ended[i] else spec.audio_out_token_id, columns[i])

    def _record(self, seq: SlotSequence, token: int, column: np.ndarray | None = None) -> None:
        """Apply the stop rules to a step's token (already counted) and decide what the next forward pass is fed."""
        spec = self.spec
        slot = seq.slot
        new_segment = token == spec.audio_out_token_id and self._state.last_token[slot] != spec.audio_out_token_id
        if token != spec.audio_out_token_id or new_segment:  # upstream's compressed text id list
            seq.text_ids.append(token)
            if token not in (spec.audio_out_token_id, spec.audio_eos_token_id):
                self._delivery.post(seq.handle, TextDelta((token,)))
            matched = seq.stop.push(token)
            if matched is not None:
                self._finish(seq, "stop", spec.stream_eos_id if seq.audio_ended else matched)
                return
        if self._state.steps[slot] >= self._state.max_tokens[slot]:
            self._finish(seq, "length", None)
            return
        self._state.last_token[slot] = token
        if token == spec.audio_out_token_id:
            self._state.feed_kind[slot], self._state.feed_audio[slot] = Feed.AUDIO, column
        else:
            self._state.feed_kind[slot], self._state.feed_token[slot] = Feed.TEXT, token

    # -- sampling -----------------------------------------------------------------------------------
    def _sample_audio(self, slots: np.ndarray) -> np.ndarray:
        """One column (N,) per slot from the last audio step's logits: the sampler draws all S*N
        codebook rows at once, then RAS redraws the codes that repeat too often in their window."""
        rows = self._audio_row[slots]
        logits = self._audio_logits if np.array_equal(rows, np.arange(len(self._audio_logits))) else self._audio_logits[rows]
        n = self.spec.num_codebooks
        uniforms = np.stack([self._active[slot].rng.random((2, n)) for slot in slots])  # draw, RAS redraw
        codes, redraw = self.sampler(logits, self._state.temperature[slots], self._state.top_k[slots], self._state.top_p[slots], uniforms)
        windows = self._log.windows(slots, self._state.ras_window[slots], RAS_PAD)
        if windows.shape[1]:
            redo = ras_redo(codes, windows, self._state.ras_max_repeat[slots])
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
        return sample(raw, self._state.temperature[slots], self._state.top_k[slots], self._state.top_p[slots], uniforms)

    # -- feeding the backbone ---------------------------------------------------------------------------
    def _feed(self) -> float:
        started = time.perf_counter()
        kinds = self._state.feed_kind
        audio = np.flatnonzero(kinds == Feed.AUDIO)
        text = np.flatnonzero(kinds == Feed.TEXT)
        if audio.size:
            self._audio_logits = self.runtime.audio_step(audio, self._state.feed_audio[audio], self._state.cache_length[audio])
            self._audio_row[audio] = np.arange(audio.size)
        for run in np.split(text, np.flatnonzero(np.diff(text) != 1) + 1) if text.size else ():  # contiguous slots
            logits = self.runtime.text_step(run, self._state.feed_token[run], self._state.cache_length[run])
            for slot, row in zip(run, logits):
                self._active[slot].text_logits = row
        self._state.cache_length[kinds != Feed.NONE] += 1
        kinds[:] = Feed.NONE
        return time.perf_counter() - started

    # -- audio out ------------------------------------------------------------------------------------
    def _decode_windows(self, windows: list[DecodeWindow]) -> list[np.ndarray]:
        return decode_windows(self.codec, windows)

    def _plan(self, seq: SlotSequence, window: DecodeWindow | None) -> None:
        if window is not None:
            seq.audio_samples += window.samples
            self._delivery.post(seq.handle, window)

    def _close_segment(self, seq: SlotSequence) -> None:
        if seq.segment_start is None:
            return
        seq.segments.append((seq.segment_start, int(self._log.length[seq.slot])))
        seq.segment_start = None
        if seq.streamer is not None:  # every final frame has been released already
            self._plan(seq, seq.streamer.plan_flush())

    def _finish(self, seq: SlotSequence, reason: str, stop_reason, error: str | None = None) -> None:
        self._close_segment(seq)
        del self._active[seq.slot]  # free the slot before anyone hears the request ended
        self.runtime.release(seq.slot)
        self._free_slots.append(seq.slot)
        self._free_slots.sort()
        self._state.feed_kind[seq.slot] = Feed.NONE
        seconds = seq.audio_samples / SAMPLE_RATE
        self.stats.audio_seconds += seconds
        log.info("request %s: %s after %d steps, %.2fs audio, %.2fs wall", seq.request.request_id, reason,
                 self._state.steps[seq.slot], seconds, time.monotonic() - seq.submitted_at)
        segments = tuple(self._log.segment(seq.slot, start, stop) for start, stop in seq.segments if stop > start)
        finished = Finished(finish_reason=reason, stop_reason=stop_reason, prompt_tokens=seq.prompt_tokens,
                            completion_tokens=int(self._state.steps[seq.slot]), audio_seconds=seconds, error=error,
                            segments=segments, text_ids=tuple(seq.text_ids))
        self._delivery.post(seq.handle, finished)


def _sampler_for(manifest: Manifest, runtime: str):
    """Host sampling on the CPU (faster there, see GraphSampler); on a GPU the sampler graph runs on the device."""
    if runtime == "ort-cpu":
        return HostSampler()
    if not manifest.has(SAMPLER):
        raise ValueError(f"{manifest.root} has no audio_sampler graph: re-run make export")
    return GraphSampler.load(manifest.graph_path(SAMPLER), device="cuda")
