"""Codec on ONNX Runtime: one-shot decode, exact chunked streaming decode, and encode.

No torch here (engines/ runs on numpy + onnxruntime). The encoder's data-dependent length logic
(spec codec.md §4.4: re-encode with a 320-sample pad when the acoustic and semantic frame counts
differ) is a pure function of the input length, `EncodeGeometry.plan`, shared with the torch
reference in export/codec.py so both make the same decision. The graphs carry their geometry in
ONNX metadata (key `METADATA_KEY`), so a session needs nothing but its .onnx file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

METADATA_KEY = "higgs_codec"
STREAM_MAX_FRAMES = 64  # StreamingDecoder's default cap on a chunk, in code frames (its docstring gives the cost per size)

# HuBERT-base feature extractor (kernel, stride) per conv: total stride 320, receptive field 400.
HUBERT_BASE_CONVS = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))


@dataclasses.dataclass(frozen=True)
class EncodePlan:
    """Host-side length decisions of upstream `_xcodec_encode` for one clip of `num_samples`."""

    num_samples: int
    semantic_frames: int  # Ts: HuBERT frames after the step-down
    acoustic_frames: int  # Ta of the un-padded acoustic pass
    reencode: bool  # upstream re-runs the acoustic encoder on a padded input (Ta != Ts)
    acoustic_pad: int  # zeros added on each side of the acoustic encoder input
    frames: int  # T: code frames returned


@dataclasses.dataclass(frozen=True)
class EncodeGeometry:
    """Everything the encode length logic depends on (defaults: the real checkpoint)."""

    ratios: tuple[int, ...] = (8, 5, 4, 2, 3)
    sample_rate: int = 24000
    semantic_sample_rate: int = 16000
    semantic_convs: tuple[tuple[int, int], ...] = HUBERT_BASE_CONVS
    semantic_pad: int = 160  # HAT:173, zeros each side of the 16 kHz HuBERT input
    semantic_downsample: int = 2  # step-down factor (HAT:107)

    @property
    def reencode_pad(self) -> int:
        """HAT:274: `pad_size = 160 * semantic_downsample_factor` (24 kHz samples each side)."""
        return 160 * self.semantic_downsample

    def acoustic_frames(self, num_samples: int) -> int:
        """Frames out of the DAC encoder (strided convs: kernel 2s, padding ceil(s/2)); 0 if too short."""
        length = num_samples
        for s in self.ratios:
            pad = math.ceil(s / 2)
            if length + 2 * pad < 2 * s:
                return 0  # the conv's input is shorter than its kernel: upstream raises here
            length = (length + 2 * pad - 2 * s) // s + 1
        return length

    def min_samples(self) -> int:
        """Shortest input the un-padded acoustic pass accepts (632 for the real ratios)."""
        frames = 1
        for s in reversed(self.ratios):
            frames = (frames - 1) * s + 2 * s - 2 * math.ceil(s / 2)
        return frames

    def semantic_frames(self, num_samples: int) -> int:
        """Frames out of resample -> pad -> HuBERT conv stack -> step-down (spec §4.2, §7.10)."""
        g = math.gcd(self.sample_rate, self.semantic_sample_rate)
        orig, new = self.sample_rate // g, self.semantic_sample_rate // g
        length = -(-num_samples * new // orig) + 2 * self.semantic_pad
        for kernel, stride in self.semantic_convs:
            length = (length - kernel) // stride + 1
        return -(-length // self.semantic_downsample)

    def plan(self, num_samples: int) -> EncodePlan:
        """The decisions upstream makes at run time (HAT:271-279), computed from the length alone."""
        minimum = self.min_samples()
        if num_samples < minimum:
            raise ValueError(
                f"codec encode needs at least {minimum} samples at {self.sample_rate} Hz "
                f"({1000 * minimum / self.sample_rate:.1f} ms), got {num_samples}: upstream's acoustic "
                "encoder fails on shorter input (spec codec.md §4.4); use a longer reference clip"
            )
        ts = self.semantic_frames(num_samples)
        ta = self.acoustic_frames(num_samples)
        if ta == ts:
            return EncodePlan(num_samples, ts, ta, False, 0, ts)
        padded = self.acoustic_frames(num_samples + 2 * self.reencode_pad)
        return EncodePlan(num_samples, ts, ta, True, self.reencode_pad, min(padded, ts))

    def to_dict(self) -> dict:
        """JSON-ready (lists, not tuples): stored in the graph metadata and the manifest."""
        return {
            "ratios": list(self.ratios),
            "sample_rate": self.sample_rate,
            "semantic_sample_rate": self.semantic_sample_rate,
            "semantic_convs": [list(c) for c in self.semantic_convs],
            "semantic_pad": self.semantic_pad,
            "semantic_downsample": self.semantic_downsample,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "EncodeGeometry":
        return cls(
            ratios=tuple(d["ratios"]),
            sample_rate=int(d["sample_rate"]),
            semantic_sample_rate=int(d["semantic_sample_rate"]),
            semantic_convs=tuple((int(k), int(s)) for k, s in d["semantic_convs"]),
            semantic_pad=int(d["semantic_pad"]),
            semantic_downsample=int(d["semantic_downsample"]),
        )


def decoder_reach(ratios: tuple[int, ...]) -> list[tuple[int, int]]:
    """Samples an output needs beyond its own span at each decoder stage input (spec §6.3).

    For the audio of frames [A, B), the input of a stage running at h samples per frame must hold
    samples [A h - left, B h - 1 + right]. Returns (left, right) at the latent (the first conv's
    input, one sample per frame), then at the input of each decoder block. Walks back from the
    output through the DAC decoder: final k7 conv (+-3); per block three k7 residual units with
    dilations 1, 3, 9 (+-39), then the transposed conv (kernel 2s, padding ceil(s/2)), whose output
    n reads inputs ceil((n + pad - 2s + 1) / s) .. floor((n + pad) / s); first k7 conv (+-3).
    Real codec: 10 latent frames each side; 7, 12, 18, 28, 15 samples at the blocks' inputs.
    """
    lo, hi = -3, 3
    reach = []
    for s in reversed(ratios):
        pad = math.ceil(s / 2)
        lo, hi = math.ceil((lo - 39 + pad - 2 * s + 1) / s), 1 + (hi + 39 + pad - 1) // s
        reach.append((-lo, hi))
    return [(3 - lo, hi + 3)] + reach[::-1]


def decoder_context_frames(ratios: tuple[int, ...]) -> int:
    """Code frames of context on each side that make a chunked decode exact: the latent's reach."""
    return max(decoder_reach(ratios)[0])


def _session(onnx_path: str | Path, providers: list | None, cpu_threads: int | None = None):
    """ORT session; by default CUDA when this onnxruntime has it, else CPU (the codec graphs are fp32).
    Providers, options and session come from ort_runtime either way, so a CUDA codec session gets the
    same explicit provider list and the same placement check as the backbone. A CPU session gets
    `cpu_threads` intra-op threads (None: ONNX Runtime's default, one per core)."""
    import onnxruntime as ort

    from .ort_runtime import CUDA_EP, open_session, provider_name, providers_for, session_options

    if providers is None:
        providers = providers_for("cuda" if CUDA_EP in ort.get_available_providers() else "cpu")
    device = "cuda" if provider_name(providers[0]) == CUDA_EP else "cpu"
    return open_session(onnx_path, session_options(device, cpu_threads if device == "cpu" else None), providers)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _metadata(session, onnx_path) -> dict:
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise ValueError(f"{onnx_path} has no '{METADATA_KEY}' metadata: re-export it with export/onnx_codec.py")
    return json.loads(meta[METADATA_KEY])


class CodecDecoder:
    """codes -> 24 kHz audio with the exported decoder graph (codes clipped to the codebook inside).

    On the CPU every graph call runs on one thread, and a decode is cut in time into up to `workers`
    pieces (default: the cores this process may use) decoded side by side, each with `context_frames`
    of context where it meets another: the graph trims context to what the kept frames reach, so a
    cut costs little. Measured on 2 cores with the real-size codec, two single-threaded halves take
    ~0.7x the wall time and ~0.9x the CPU time of one call on ONNX Runtime's two intra-op threads,
    whose parallel kernels leave a core idle during the serial ones (Sin is single-threaded).
    """

    def __init__(self, onnx_path: str | Path, providers: list | None = None, workers: int | None = None):
        self.session = _session(onnx_path, providers, cpu_threads=1)
        meta = _metadata(self.session, onnx_path)
        self.trims = "context" in {i.name for i in self.session.get_overridable_initializers()}
        if not self.trims:
            log.warning("%s decodes whole windows (exported before the graph trimmed their context): re-export it with "
                        "make export for a faster streaming decode", onnx_path)
        self.num_quantizers: int = meta["num_quantizers"]
        self.hop_length: int = meta["hop_length"]
        self.sample_rate: int = meta["sample_rate"]
        self.context_frames: int = meta["context_frames"]
        on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
        self.workers = (workers or usable_cores()) if on_cpu else 1
        self._pool = ThreadPoolExecutor(self.workers - 1, thread_name_prefix="codec") if self.workers > 1 else None

    def decode(self, codes: np.ndarray, context: tuple[int, int] = (0, 0)) -> np.ndarray:
        """(n_q, T) -> (960 T',) float32, or (B, n_q, T) -> (B, 960 T') float32 (mono, channel dropped):
        the audio of the T' = T - left - right frames between the `context` = (left, right) frames at
        either end, which only give them their context (not decoded beyond what the middle needs)."""
        codes = np.asarray(codes)
        if codes.ndim not in (2, 3) or codes.shape[-2] != self.num_quantizers or codes.shape[-1] < 1:
            raise ValueError(
                f"codes must be (n_q={self.num_quantizers}, T>=1) or (B, {self.num_quantizers}, T>=1), "
                f"got shape {codes.shape}; the graph takes all {self.num_quantizers} codebooks (the torch "
                "reference export.codec.HiggsCodec.decode handles fewer)"
            )
        if min(context) < 0 or sum(context) >= codes.shape[-1]:
            raise ValueError(f"context {context} must be >= 0 and leave at least one of the {codes.shape[-1]} frames")
        batch = np.ascontiguousarray(codes if codes.ndim == 3 else codes[None], dtype=np.int64)
        first, *others = [(batch[..., lo:hi], piece_context) for lo, hi, piece_context in self.pieces(batch.shape[-1], context)]
        futures = [self._pool.submit(self._run, *piece) for piece in others]
        audio = np.concatenate([self._run(*first)] + [f.result() for f in futures], axis=-1)
        return audio[0] if codes.ndim == 2 else audio

    def pieces(self, frames: int, context: tuple[int, int]) -> list[tuple[int, int, tuple[int, int]]]:
        """(start, end, context) of each piece of a `frames` long window with `context`: its kept
        frames cut into up to `workers` runs, each piece reaching `context_frames` beyond its run (or
        to the window's end), so its audio is the window's."""
        left, right = context
        kept = frames - left - right
        count = min(self.workers, kept)
        cuts = [left + kept * i // count for i in range(count + 1)]
        out = []
        for a, b in zip(cuts, cuts[1:]):
            lo, hi = max(0, a - self.context_frames), min(frames, b + self.context_frames)
            out.append((lo, hi, (a - lo, hi - b)))
        return out

    def _run(self, codes: np.ndarray, context: tuple[int, int]) -> np.ndarray:
        if self.trims:
            return self.session.run(["audio"], {"codes": codes, "context": np.asarray(context, np.int64)})[0][:, 0]
        audio = self.session.run(["audio"], {"codes": codes})[0][:, 0]
        return audio[:, context[0] * self.hop_length : audio.shape[-1] - context[1] * self.hop_length]


@dataclasses.dataclass(frozen=True)
class DecodeWindow:
    """Code frames to decode; the `context` frames at each end only make the others final."""

    codes: np.ndarray  # (n_q, W) int64
    context: tuple[int, int]  # frames at the start and at the end whose audio is not wanted
    hop_length: int

    @property
    def samples(self) -> int:
        return (self.codes.shape[1] - sum(self.context)) * self.hop_length


def decode_windows(decoder: CodecDecoder, windows: list[DecodeWindow]) -> list[np.ndarray]:
    """Final PCM of each window. Windows of equal length and context share one batched graph call:
    many streams cost one decode per step instead of one each, and no padding ever changes a sample."""
    out: list[np.ndarray | None] = [None] * len(windows)
    by_shape: dict[tuple, list[int]] = {}
    for index, window in enumerate(windows):
        by_shape.setdefault((window.codes.shape[1], window.context), []).append(index)
    for (_, context), indices in by_shape.items():
        audio = decoder.decode(np.stack([windows[i].codes for i in indices]), context)
        for row, i in enumerate(indices):
            out[i] = audio[row]
    return out


class StreamingDecoder:
    """Chunked decode whose concatenated output equals the one-shot decode (spec §6.3).

    Output frame t depends on code frames t-context .. t+context, so a frame is final once
    `context` later frames have arrived. Each decode covers only the new final frames plus
    `context` frames on each side, so the cost per chunk does not grow with the history.

    Schedule: the first chunk is emitted as soon as one frame is final (latency); after that a
    chunk waits for as many new final frames as were already emitted, capped at `max_frames`,
    and at least `min_frames`. Every decode holds up to `context` frames on each side, but the graph
    decodes that context only through its first conv and block and a few samples further
    (export.onnx_codec.FoldedDecoder), so a chunk costs its one-shot share plus a fixed ~20-30 ms of
    one core (real-size codec): per audio second ~1.7x a one-shot decode at 8 frames, ~1.05x at 64
    (decoding whole windows, 3.5x and 1.3x). Doubling reaches the large chunks after a few decodes,
    and the listener never waits on a gap: each chunk is no longer than the audio it already has.
    `plan_push` / `plan_flush` return the window to decode instead of decoding it, so a caller
    running many streams can decode their windows together (`decode_windows`); `push` / `flush`
    decode one stream's window right away.
    """

    def __init__(self, decoder: CodecDecoder, context: int | None = None, min_frames: int = 1, max_frames: int = STREAM_MAX_FRAMES):
        if min_frames < 1 or max_frames < 1:
            raise ValueError(f"streaming chunks need min_frames >= 1 and max_frames >= 1, got {min_frames} and {max_frames}")
        self.decoder = decoder
        self.context = decoder.context_frames if context is None else context
        self.min_frames = min_frames
        self.max_frames = max_frames
        self._reset()

    def _reset(self) -> None:
        self._codes = np.zeros((self.decoder.num_quantizers, 0), dtype=np.int64)
        self._start = 0  # absolute index of self._codes[:, 0]
        self._received = 0
        self._emitted = 0

    def plan_push(self, frames: np.ndarray) -> DecodeWindow | None:
        """Add code frames (n_q, k); the window whose decode yields the PCM that became final, if any."""
        frames = np.asarray(frames, dtype=np.int64)
        if frames.ndim != 2 or frames.shape[0] != self.decoder.num_quantizers:
            raise ValueError(f"push expects (n_q={self.decoder.num_quantizers}, k) codes, got {frames.shape}")
        self._codes = np.concatenate([self._codes, frames], axis=1)
        self._received += frames.shape[1]
        final = self._received - self.context
        needed = 1 if self._emitted == 0 else max(self.min_frames, min(self.max_frames, self._emitted))
        return self._window(final) if final - self._emitted >= needed else None

    def plan_flush(self) -> DecodeWindow | None:
        """The window of the remaining frames (the last `context` decode with the sequence edge); resets."""
        window = self._window(self._received) if self._received > self._emitted else None
        self._reset()
        return window

    def push(self, frames: np.ndarray) -> np.ndarray:
        """Add code frames (n_q, k); return the PCM (float32) that became final, possibly empty."""
        return self._decode(self.plan_push(frames))

    def flush(self) -> np.ndarray:
        """Return the remaining PCM and reset."""
        return self._decode(self.plan_flush())

    def _decode(self, window: DecodeWindow | None) -> np.ndarray:
        return decode_windows(self.decoder, [window])[0] if window else np.zeros(0, np.float32)

    def _window(self, end: int) -> DecodeWindow:
        lo = max(0, self._emitted - self.context)
        hi = min(self._received, end + self.context)
        codes = self._codes[:, lo - self._start : hi - self._start]
        window = DecodeWindow(codes, (self._emitted - lo, hi - end), self.decoder.hop_length)
        self._emitted = end
        keep_from = max(0, end - self.context)  # left context of the next chunk
        self._codes = self._codes[:, keep_from - self._start :]
        self._start = keep_from
        return window


class CodecEncoder:
    """24 kHz mono waveform -> codes (n_q, T) int64 with the exported encoder graph."""

    def __init__(self, onnx_path: str | Path, providers: list | None = None):
        self.session = _session(onnx_path, providers)
        meta = _metadata(self.session, onnx_path)
        self.num_quantizers: int = meta["num_quantizers"]
        self.sample_rate: int = meta["sample_rate"]
        self.geometry = EncodeGeometry.from_dict(meta["encode_geometry"])

    def encode(self, wave: np.ndarray) -> np.ndarray:
        """Upstream `encode(wave, sr=24000)`: the 320-sample re-encode pad is decided here (§4.4)."""
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"encode expects a mono 1-D waveform at {self.sample_rate} Hz, got shape {wave.shape}")
        plan = self.geometry.plan(wave.shape[0])
        acoustic = np.pad(wave, plan.acoustic_pad) if plan.acoustic_pad else wave
        codes = self.session.run(["codes"], {"waveform": wave[None], "acoustic_waveform": acoustic[None]})[0]
        if codes.shape != (1, self.num_quantizers, plan.frames):
            expected = (1, self.num_quantizers, plan.frames)
            raise RuntimeError(f"encoder graph returned {codes.shape}, expected {expected}: re-export it")
        return codes[0]
