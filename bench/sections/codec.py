"""`make bench` section 4 `codec`: the codec's encoder and decoder, ONNX Runtime CPU against torch.

ms of compute per second of audio for the one-shot decode, the streaming decode (StreamingDecoder
fed one frame per push, the same chunking around the torch reference) and the encode of a test
signal, for the tiny and the real-size random codec. A row where ORT loses carries both per-op
profiles.
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np

from engines.codec import STREAM_MAX_FRAMES
from engines.manifest import CODEC_DECODER, CODEC_ENCODER, graph_file

from .._child import CODEC_LISTING
from ..common import AUDIO_FRAME_RATE, Section, fmt_ms, fmt_ratio, interleaved, median, ratio, spread
from ..config import Config
from ..harness import stream_decode
from ..profiling import CountingSession, profile_ort_ops, profile_torch_ops, time_block
from ..workspace import Log, Workspace


class _TorchDecoder:
    """The torch reference behind the CodecDecoder interface (so StreamingDecoder chunks it the same way)."""

    def __init__(self, codec, onnx_decoder):
        self.codec = codec
        self.num_quantizers = onnx_decoder.num_quantizers
        self.hop_length = onnx_decoder.hop_length
        self.sample_rate = onnx_decoder.sample_rate
        self.context_frames = onnx_decoder.context_frames

    def decode(self, codes, context=(0, 0)):
        """CodecDecoder.decode's contract: (n_q, T) -> (960 T',), (B, n_q, T) -> (B, 960 T'), T' = T minus
        the context frames. Decodes the whole window and drops the context's audio (the ONNX graph
        instead trims the context between its stages)."""
        import torch

        batch = np.ascontiguousarray(codes if codes.ndim == 3 else codes[None], dtype=np.int64)
        with torch.inference_mode():
            audio = self.codec.decode(torch.from_numpy(batch))[:, 0].numpy()
        audio = audio[:, context[0] * self.hop_length : (batch.shape[-1] - context[1]) * self.hop_length]
        return audio if codes.ndim == 3 else audio[0]


def _test_wave(seconds: float, sample_rate: int = 24000) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    rng = np.random.default_rng(0)
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 0.5 * t) + 0.05 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


def _explain_codec(size: str, name: str, torch_fn, ort_holder, path, run_ort, audio_s: float) -> str:
    """ORT lost to torch on a codec row: per-op profiles of both for one warm call, per audio second."""
    import onnxruntime as ort

    def run_steps(session):
        original = ort_holder.session
        counting = ort_holder.session = CountingSession(session)
        try:
            run_ort()  # warm-up call, not counted (the first runs of a session allocate)
            warm = counting.runs
            run_ort()
        finally:
            ort_holder.session = original
        counted = counting.runs - warm
        calls.append(counted)
        return warm

    calls: list[int] = []
    try:
        ort_ops = profile_ort_ops(path, ort.SessionOptions(), run_steps, top=3)
        torch_ops = profile_torch_ops(torch_fn)
    except Exception as error:  # a diagnosis, not a result
        return f"{size} codec {name}: ORT slower than torch; profiling failed: {error}"
    n = calls[0] if calls else 1

    def per_second(ms):  # ORT numbers are per session.run; one call made n of them
        return ms * n / audio_s

    ort_parts = ", ".join(f"{op} {per_second(ms):.0f}" + (f" [largest: {shapes}]" if shapes else "")
                          for op, ms, shapes in ort_ops[:-2])
    torch_parts = ", ".join(f"{op} {ms / audio_s:.0f}" for op, ms in torch_ops[:-1])
    return (f"{size} codec {name}: ORT is slower than torch. Per-op profile of one warm call, ms per audio second "
            f"({n} session.run): ORT {ort_parts}; kernels {per_second(ort_ops[-2][1]):.0f} of "
            f"{per_second(ort_ops[-1][1]):.0f} in session.run. torch self time: {torch_parts}; all aten ops "
            f"{torch_ops[-1][1] / audio_s:.0f}.")


def section_codec(ws: Workspace, cfg: Config, log: Log) -> Section:
    import torch

    from engines.codec import CodecDecoder, CodecEncoder
    from engines.loop import DEFAULT_STREAM_FRAMES
    from export.codec import load_codec

    section = Section("codec", "4. Codec: ONNX Runtime CPU vs torch (float32), ms per second of audio")
    torch.set_num_threads(cfg.cores())
    stream_frames = DEFAULT_STREAM_FRAMES
    cpu = ["CPUExecutionProvider"]
    seconds_of = dict(cfg.codec_audio_seconds)
    rows = []
    for size in cfg.codec_sizes:
        audio_s = seconds_of.get(size, 4.0)
        graphs = ws.codec_graphs(size)
        listing = json.loads((graphs / CODEC_LISTING).read_text())
        log(f"codec: {size}: loading torch reference and ORT sessions ({audio_s:.0f} s of audio)")
        codec = load_codec(ws.codec(size))
        decoder_path, encoder_path = graphs / graph_file(CODEC_DECODER), graphs / graph_file(CODEC_ENCODER)
        ort_dec = CodecDecoder(decoder_path, cpu, workers=cfg.cores())
        torch_dec = _TorchDecoder(codec, ort_dec)
        codes = np.random.default_rng(0).integers(0, 1024, (ort_dec.num_quantizers, int(audio_s * AUDIO_FRAME_RATE)))
        cases: dict[str, tuple[Callable, Callable, Callable[[object, object], str]]] = {}

        def close(a, b):
            return f"{float(np.max(np.abs(np.asarray(a) - np.asarray(b)))):.1e}"

        cases["decode one-shot"] = (lambda: torch_dec.decode(codes), lambda: ort_dec.decode(codes), close)
        streaming = f"decode streaming ({stream_frames}..{STREAM_MAX_FRAMES}-frame chunks)"
        explain = {"decode one-shot": (ort_dec, decoder_path, lambda: ort_dec.decode(codes)),
                   streaming: (ort_dec, decoder_path, lambda: stream_decode(ort_dec, codes, stream_frames))}
        cases[streaming] = (
            lambda: stream_decode(torch_dec, codes, stream_frames), lambda: stream_decode(ort_dec, codes, stream_frames), close)
        if encoder_path.is_file():
            ort_enc = CodecEncoder(encoder_path, cpu)
            wave = _test_wave(audio_s)
            t_wave = torch.from_numpy(wave)

            def torch_encode():
                with torch.inference_mode():
                    return codec.encode(t_wave).numpy()

            explain["encode"] = (ort_enc, encoder_path, lambda: ort_enc.encode(wave))
            cases["encode"] = (torch_encode, lambda: ort_enc.encode(wave), lambda a, b: f"{float(np.mean(np.asarray(a) == np.asarray(b))):.1%} codes equal")
        else:
            reason = listing.get("codec_encoder_error", f"{encoder_path.name} was not exported")
            section.skipped.append(f"{size} codec encode: {reason}")
        for name, (torch_fn, ort_fn, compare) in cases.items():
            agreement = compare(torch_fn(), ort_fn())  # also the warm-up
            times = interleaved({"torch": lambda: time_block(torch_fn, 1, warm=False), "ort": lambda: time_block(ort_fn, 1, warm=False)}, cfg.codec_rounds)
            t, o = median(times["torch"]) / audio_s, median(times["ort"]) / audio_s
            rows.append([size, name, f"{audio_s:.0f}", fmt_ms(t, 0), fmt_ms(o, 0), fmt_ratio(ratio(t, o)),
                         f"{spread(times['torch']):.0%} / {spread(times['ort']):.0%}", agreement])
            if ratio(t, o) is not None and ratio(t, o) < 1.0:
                holder, path, run_ort = explain[name]
                section.notes.append(_explain_codec(size, name, torch_fn, holder, path, run_ort, audio_s))
            log(f"codec: {size} {name}: torch {fmt_ms(t, 0)} ms/s, ORT {fmt_ms(o, 0)} ms/s, torch/ORT {fmt_ratio(ratio(t, o))}")
            section.summary.append((f"{size} codec {name}: torch/ORT (ORT ms per audio s)", f"{fmt_ratio(ratio(t, o))} ({fmt_ms(o, 0)})"))
        del codec
    section.table(
        f"ms of compute per second of audio (median of {cfg.codec_rounds} interleaved rounds)",
        ["codec", "what", "audio s", "torch ms/s", "ORT ms/s", "torch/ORT", "spread t / o", "agreement"],
        rows,
    )
    section.notes.append(
        "tiny = export.tiny_codec size 'tiny'; real = size 'real' (the real codec's widths, random weights). Streaming = "
        "engines.codec.StreamingDecoder fed one frame per call and flushed, the decode loop's chunking, with the same "
        "chunking around the torch reference (which decodes each window whole: the ONNX graph trims the context "
        "between its stages, export.onnx_codec.FoldedDecoder); encode = CodecEncoder.encode / HiggsCodec.encode of a 24 kHz test signal; "
        f"{cfg.cores()} threads for torch (intra-op) and the ONNX Runtime encoder (intra_op_num_threads); the ONNX Runtime "
        f"decoder runs each graph call on one thread and cuts a decode in time into up to {cfg.cores()} pieces decoded side "
        "by side (engines.codec.CodecDecoder); < 1000 ms/s is faster than real time"
    )
    return section
