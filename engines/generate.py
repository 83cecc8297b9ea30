"""`python -m engines.generate`: text in, WAV out, through the decode loop (engines/loop.py).

The command-line front end of `Engine`: one request, optionally cloning a reference clip, run
inline on this thread; the media libraries (PyAV, soxr) are loaded here, not by the loop.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .api import SAMPLE_RATE, AudioChunk, Finished, SamplingParams, SpeechRequest
from .audio_io import AudioError, decode_audio, encode_audio, resample
from .logs import setup_logging
from .loop import Engine
from .prompt import tts_messages


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
    setup_logging()
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
