"""The decode loop on ONNX Runtime: upstream's greedy generations, streaming, seeds, stop rules, batching."""

from __future__ import annotations

import subprocess
import sys
import time
import wave

import numpy as np
import pytest

from engines.admission import fit_max_tokens
from engines.api import AudioChunk, Finished, SamplingParams, SpeechRequest
from engines.codec import CodecDecoder
from engines.delay import delayed_to_codes
from engines.loop import Engine
from engines.manifest import Manifest
from engines.ort_runtime import OrtBackbone
from engines.prompt import tts_messages
from engines.sampling import GraphSampler, HostSampler
from goldens import load

GREEDY = SamplingParams(temperature=0.0, ras_window=0)


def run(engine: Engine, *requests: SpeechRequest) -> list[tuple[np.ndarray, Finished]]:
    """Submit together (one batch), run to the end; (pcm, Finished) per request."""
    handles = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    results = []
    for handle in handles:
        events = list(handle.iter_blocking())
        chunks = [e.pcm for e in events if isinstance(e, AudioChunk)]
        results.append((np.concatenate(chunks) if chunks else np.zeros(0, np.float32), events[-1]))
    return results


@pytest.fixture(scope="module")
def engine(tiny_artifacts):
    return Engine.from_artifacts(tiny_artifacts, max_batch=4, max_len=1024, stream_frames=2)


@pytest.fixture(scope="module")
def graph_engine(engine, tiny_artifacts):
    """The same runtime and codec, audio drawn by the exported sampler graph (as on a GPU)."""
    return Engine(engine.runtime, engine.codec, renderer=engine.renderer, stream_frames=2,
                  sampler=GraphSampler.load(tiny_artifacts / "audio_sampler.onnx"))


def say(text: str, **kwargs) -> SpeechRequest:
    return SpeechRequest(tts_messages(text), **kwargs)


@pytest.mark.parametrize("name", ["llm_tiny", "llm_tiny_eos3"])
@pytest.mark.parametrize("prefill_graph,sampler", [(True, "host"), (False, "host"), (True, "graph")],
                         ids=["prefill-graph", "split-prefill", "sampler-graph"])
def test_greedy_generation_reproduces_upstream(golden_artifacts, name, prefill_graph, sampler):
    golden = load(name)
    runtime = OrtBackbone(Manifest.load(golden_artifacts(name)), max_batch=2, max_len=128, prefill_graph=prefill_graph)
    draw = GraphSampler.load(golden_artifacts(name) / "audio_sampler.onnx") if sampler == "graph" else HostSampler()
    engine = Engine(runtime, codec=None, sampler=draw)
    requests = []
    for case in ("zero_shot", "voice_clone"):
        audio = (golden[f"{case}/prompt_audio_out_ids"],) if case == "voice_clone" else ()
        requests.append(SpeechRequest([], sampling=GREEDY, max_tokens=48, prompt_ids=golden[f"{case}/prompt_ids"], prompt_audio=audio))
    for case, (_, finished) in zip(("zero_shot", "voice_clone"), run(engine, *requests)):  # both in one batch
        assert finished.finish_reason == "length"
        segment = finished.segments[0]
        np.testing.assert_array_equal(segment, golden[f"{case}/segment0_delayed"])
        np.testing.assert_array_equal(delayed_to_codes(segment), golden[f"{case}/segment0_codes"])
        assert list(finished.text_ids) == golden[f"{case}/generated_text_ids"].tolist()


def test_tiny_default_ends_its_audio_by_itself(engine):
    (pcm, finished), = run(engine, say("The quick brown fox jumps over the lazy dog.", sampling=GREEDY))
    assert finished.finish_reason == "stop" and finished.stop_reason == 1025
    assert 0.2 < pcm.size / 24000 < 10 and finished.text_ids[:2] == (128016, 128012)


def test_streamed_chunks_equal_the_one_shot_decode(engine, tiny_artifacts):
    codec = CodecDecoder(Manifest.load(tiny_artifacts).graph_path("codec_decoder"))
    for seed in (1, 4):  # seed 4 gives a long utterance (many chunks), seed 1 a short one
        (pcm, finished), = run(engine, say("Hello there, how are you today? I am fine.", sampling=SamplingParams(seed=seed)))
        one_shot = np.concatenate([codec.decode(delayed_to_codes(s)) for s in finished.segments])
        assert pcm.size == one_shot.size > 0
        assert np.abs(pcm - one_shot).max() <= 1e-5


class _GatedDecoder:
    """Codec decoder whose decode waits (up to 3 s) for the engine to start another backbone audio step."""

    def __init__(self, inner, audio_steps: list):
        self.inner, self.audio_steps, self.overlapped = inner, audio_steps, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, codes, context=(0, 0)):
        seen, deadline = len(self.audio_steps), time.monotonic() + 3
        while len(self.audio_steps) == seen and time.monotonic() < deadline:
            time.sleep(0.001)
        self.overlapped.append(len(self.audio_steps) > seen)
        return self.inner.decode(codes, context)


def test_codec_decodes_while_the_next_backbone_step_runs(tiny_artifacts):
    """Codec windows are off the critical path: a window planned in one step is decoded while the
    engine already runs its next audio step (on the engine's own thread the decode would time out)."""
    engine = Engine.from_artifacts(tiny_artifacts, max_batch=1, max_len=512, stream_frames=2)
    audio_steps, audio_step = [], engine.runtime.audio_step
    engine.runtime.audio_step = lambda *args: (audio_steps.append(1), audio_step(*args))[1]
    engine.codec = gated = _GatedDecoder(engine.codec, audio_steps)
    (pcm, finished), = run(engine, say("Off the critical path.", sampling=SamplingParams(seed=3), max_tokens=60))
    assert pcm.size and len(gated.overlapped) > 1 and gated.overlapped[0]


@pytest.mark.parametrize("sampler", ["host", "graph"])
def test_seed_makes_a_request_reproducible_whatever_the_batch(request, sampler):
    engine = request.getfixturevalue("engine" if sampler == "host" else "graph_engine")
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=11)
    (alone, a), = run(engine, say("Reproducible speech.", sampling=params))
    batch = run(engine, say("Other one.", sampling=SamplingParams(seed=1)), say("Reproducible speech.", sampling=params),
                say("Another.", sampling=SamplingParams(seed=2)))
    together, b = batch[1]
    assert a.text_ids == b.text_ids and all(np.array_equal(x, y) for x, y in zip(a.segments, b.segments))
    # codes are identical; the codec decodes windows of several requests in one batched call, whose
    # convolution arithmetic may move a sample by ~1e-8 (far below one PCM16 step, 3e-5)
    assert alone.shape == together.shape and np.abs(alone - together).max() <= 1e-6
    (_, c), = run(engine, say("Reproducible speech.", sampling=SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=12)))
    assert any(not np.array_equal(x, y) for x, y in zip(a.segments, c.segments)) or len(a.segments[0][0]) != len(c.segments[0][0])


def test_max_tokens_cancellation_and_slot_reuse(engine):
    handle = engine.submit(say("Cut short.", sampling=GREEDY, max_tokens=5))
    engine.run_until_idle()
    finished = list(handle.iter_blocking())[-1]
    assert finished.finish_reason == "length" and finished.completion_tokens == 5
    long = engine.submit(say("Cancelled.", sampling=SamplingParams(seed=4)))
    engine.step()
    engine.step()
    long.cancel()
    engine.run_until_idle()
    assert list(long.iter_blocking())[-1].finish_reason == "cancelled"
    assert engine.active_requests() == 0


def test_a_freed_slot_gives_the_same_result_as_a_fresh_engine(engine, tiny_artifacts):
    request = lambda: say("Same again.", sampling=SamplingParams(seed=5), max_tokens=40)  # noqa: E731
    long = engine.submit(say("Occupies a slot.", sampling=SamplingParams(seed=4)))
    engine.step()
    long.cancel()
    (pcm, finished), = run(engine, request())  # reuses slot 0, whose cache rows hold the cancelled request's K/V
    (fresh_pcm, fresh), = run(Engine.from_artifacts(tiny_artifacts, max_batch=4, max_len=1024, stream_frames=2), request())
    assert finished.text_ids == fresh.text_ids and all(np.array_equal(a, b) for a, b in zip(finished.segments, fresh.segments))
    assert np.abs(pcm - fresh_pcm).max() <= 1e-6


def test_bad_sampling_parameters_fail_at_submit(engine):
    for params in (SamplingParams(temperature=1e-40), SamplingParams(temperature=float("nan")),
                   SamplingParams(top_k=-1), SamplingParams(top_p=0.0)):
        with pytest.raises(ValueError):
            engine.submit(say("x", sampling=params))
    with pytest.raises(ValueError, match="stop string"):
        Engine(engine.runtime, engine.codec).submit(SpeechRequest([], prompt_ids=np.array([1, 2]), stop_strings=("done",)))


def test_a_text_step_never_draws_a_bare_audio_out(tiny_artifacts):
    """After the audio ends the model samples text; <|AUDIO_OUT|> there would have no segment to continue."""
    engine = Engine.from_artifacts(tiny_artifacts, max_batch=2, max_len=512)
    text_step = engine.runtime.text_step

    def audio_out_first(*args):
        logits = text_step(*args)
        logits[:, 128016] = 1e4
        return logits

    engine.runtime.text_step = audio_out_first
    (_, finished), = run(engine, say("Then text.", sampling=GREEDY, stop_strings=(), max_tokens=80))
    assert finished.finish_reason in ("stop", "length") and 128016 not in finished.text_ids[1:]


def test_a_failed_prefill_returns_its_slot(tiny_artifacts):
    engine = Engine.from_artifacts(tiny_artifacts, max_batch=1, max_len=512)
    prefill = engine.runtime.prefill
    engine.runtime.prefill = lambda *args: (_ for _ in ()).throw(RuntimeError("injected prefill fault"))
    (_, failed), = run(engine, say("Fails.", sampling=GREEDY, max_tokens=5))
    assert failed.finish_reason == "error" and "injected" in failed.error
    engine.runtime.prefill = prefill
    (_, ok), = run(engine, say("Works.", sampling=GREEDY, max_tokens=5))
    assert ok.finish_reason == "length" and engine.active_requests() == 0


def test_prompts_that_do_not_fit_fail_at_submit(engine):
    with pytest.raises(ValueError, match="KV cache"):
        engine.submit(say("word " * 2000))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(say("fine", max_tokens=5000))


def test_voice_clone_prompt_runs(engine):
    codes = np.random.default_rng(0).integers(0, 1024, (8, 30))
    request = SpeechRequest(tts_messages("Cloned voice.", references=[("Reference words.", codes)]), sampling=GREEDY, max_tokens=60)
    (_, finished), = run(engine, request)
    assert finished.prompt_tokens > 30 + 9 and finished.completion_tokens > 0


def test_cli_writes_a_wav(tiny_artifacts, tmp_path):
    out = tmp_path / "hello.wav"
    result = subprocess.run(
        [sys.executable, "-m", "engines.generate", "--artifacts", str(tiny_artifacts), "--text", "Hello world.",
         "--out", str(out), "--seed", "1", "--stream"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "chunk 1" in result.stdout
    with wave.open(str(out)) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (24000, 1, 2) and f.getnframes() > 0


def test_cli_explains_a_missing_export(tmp_path):
    result = subprocess.run([sys.executable, "-m", "engines.generate", "--artifacts", str(tmp_path), "--text", "x"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "make export" in result.stderr


def test_a_defaulted_max_tokens_yields_to_the_cache_an_explicit_one_is_refused(engine):
    """The max_tokens policy (engines/admission.py): a max the server defaulted is lowered to the room
    the prompt leaves in the KV cache; the same max chosen by the client is refused at submit."""
    request = say("Fits.", sampling=GREEDY, max_tokens=5000, max_tokens_defaulted=True)
    room = engine.runtime.capacity - engine.prompt_length(request)
    (_, finished), = run(engine, request)
    assert finished.finish_reason in ("stop", "length") and finished.completion_tokens <= room
    assert finished.prompt_tokens == engine.prompt_length(request)
    assert request.max_tokens == 5000  # nothing resubmitted with another max
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(say("Fits.", sampling=GREEDY, max_tokens=5000))


def test_a_prompt_that_fills_the_cache_is_refused_without_blaming_a_defaulted_max():
    """A prompt that leaves no room is refused whatever the max; the message names the prompt, not a
    max_tokens the client never sent (the server's default)."""
    defaulted = SpeechRequest([], max_tokens=1024, max_tokens_defaulted=True)
    with pytest.raises(ValueError, match="leaves no room") as refused:
        fit_max_tokens(defaulted, prompt_length=600, capacity=511)
    assert "max_tokens" not in str(refused.value)
    assert fit_max_tokens(defaulted, prompt_length=500, capacity=511) == 11
