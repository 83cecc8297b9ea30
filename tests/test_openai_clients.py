"""What an OpenAI TTS client gets from a server started with no options: OpenAI's voice names,
`instructions`, long text in one stream, cancellation (issue 14). The official `openai` SDK against a
live server on the tiny model (tests/serve_support.py); assertions on what the engine was given."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import threading
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile

from engines.api import AudioCodes, Message
from engines.prompt import SCENE_END, SCENE_START, content_text
from serve.longform import CROSSFADE_SECONDS
from serve.settings import Limits, ServeSettings
from serve_support import (MODEL, LiveServer, delta_audio, make_engine, settings_for, tone_wav, wait_for,
                           write_voices)

SERVING_DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
# OpenAI's TTS voice names (platform.openai.com/docs/guides/text-to-speech), not read from our module
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")
def long_text(chars: int) -> str:
    """Sentences of varying length in paragraphs of eight, `chars` characters or a little more."""
    words = "the quick brown fox jumps over a lazy dog while my cat watches".split()
    sentences, total = [], 0
    while total < chars:
        i = len(sentences)
        sentence = f"Line {i} says {' '.join(words[i % 5:i % 5 + 4 + i % 7])}."
        sentences.append(sentence)
        total += len(sentence) + 1
    return "\n\n".join(" ".join(sentences[i:i + 8]) for i in range(0, len(sentences), 8))


class FinishLog:
    """Every Finished the engine emits, in order, per request id (chunks of a long text share one)."""

    def __init__(self, engine):
        self._lock = threading.Lock()
        self.events: list[tuple[str, object]] = []
        engine.add_finish_listener(self._add)

    def _add(self, request, finished) -> None:
        with self._lock:
            self.events.append((request.request_id, finished))

    def of(self, prefix: str) -> list:
        with self._lock:
            return [f for request_id, f in self.events if request_id.startswith(prefix)]


@pytest.fixture(scope="module")
def live(tiny_artifacts):
    """A server as `python -m serve --artifacts DIR` starts it: default settings. Its engine never
    ends audio by itself, so every generation (chunk) is exactly max_completion_tokens long."""
    engine = make_engine(tiny_artifacts, max_batch=2, endless=True)
    engine.finish_log = FinishLog(engine)
    with LiveServer(engine, ServeSettings()) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _system_text(request) -> str:
    system = [m for m in request.messages if m.role == "system"]
    assert len(system) == 1
    return content_text(system[0].content)


def test_every_openai_voice_works_in_chat_and_speech(live, client):
    described = {}
    for voice in OPENAI_VOICES:
        audio = client.audio.speech.create(model=MODEL, voice=voice, input="Hello there.", response_format="wav",
                                           extra_body={"seed": 1, "max_completion_tokens": 12}).content
        assert soundfile.info(io.BytesIO(audio)).samplerate == 24000
        speech_prompt = _system_text(live.recorder.submitted[-1])
        completion = client.chat.completions.create(
            model=MODEL, modalities=["text", "audio"], audio={"voice": voice, "format": "wav"}, seed=1,
            max_completion_tokens=12, messages=[{"role": "user", "content": "Hello there."}])
        assert base64.b64decode(completion.choices[0].message.audio.data)[:4] == b"RIFF"
        assert _system_text(live.recorder.submitted[-1]) == speech_prompt
        assert speech_prompt.startswith(f"Generate audio following instruction.\n\n{SCENE_START}\nSPEAKER0: ")
        described[voice] = speech_prompt
    assert len(set(described.values())) == len(OPENAI_VOICES)  # each name its own description

    cards = {c["id"]: c for c in client.get("/audio/voices", cast_to=object)["data"]}
    for voice in OPENAI_VOICES:
        assert cards[voice]["source"] == "builtin" and cards[voice]["description"] in described[voice]


def test_seeded_builtin_voice_is_reproducible(client):
    def speak():
        return client.audio.speech.create(model=MODEL, voice="coral", input="Same words twice.", response_format="wav",
                                          extra_body={"seed": 5, "max_completion_tokens": 20}).content

    first = speak()
    assert len(first) > 44 and speak() == first


def test_instructions_become_the_scene_description(live, client):
    def rendered(**extra):
        client.audio.speech.create(model=MODEL, voice="default", input="Read this calmly.", response_format="pcm",
                                   extra_body={"seed": 2, "max_completion_tokens": 4}, **extra)
        return live.engine.renderer.render(live.recorder.submitted[-1].messages).ids.tolist()

    renderer = live.engine.renderer
    start, end = (renderer.tokenizer.token_to_id(t) for t in (SCENE_START, SCENE_END))
    plain = rendered()
    assert start not in plain
    styled = rendered(instructions="Whispering in a quiet library.")
    scene = [start, *renderer.encode_text("\nWhispering in a quiet library.\n"), end]
    at = styled.index(start)
    assert styled[at:at + len(scene)] == scene
    header = renderer.encode("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert styled[:at] == header + renderer.encode_text("Generate audio following instruction.\n\n")
    assert styled[at + len(scene):] == renderer.encode("<|eot_id|>") + plain[1:]  # then the same conversation


def _delayed_to_frames(delayed: np.ndarray) -> np.ndarray:
    """Upstream's long-form carry of one generated segment, written out: row k of a delayed (N, W)
    segment starts k columns late; drop the stream BOS and the last column, clip to the codebook."""
    n, w = delayed.shape
    return np.clip(np.stack([delayed[k, k + 1:w - n + k] for k in range(n)]), 0, 1023)


def test_long_text_is_one_stream_generated_chunk_by_chunk_with_carried_context(live, client):
    text = long_text(5000)
    assert len(text) >= 5000
    with client.audio.speech.with_streaming_response.create(
            model=MODEL, voice="alloy", input=text, response_format="pcm",
            extra_body={"seed": 3, "max_completion_tokens": 12}, extra_headers={"X-Request-Id": "longstream"}) as r:
        pcm = np.frombuffer(b"".join(r.iter_bytes()), dtype="<i2")
    chunks = [r for r in live.recorder.submitted if r.request_id.startswith("longstream")]
    finished = live.engine.finish_log.of("longstream")
    settings = ServeSettings()
    assert len(chunks) == len(finished) >= 5000 // settings.chunk_chars
    assert all(f.finish_reason == "length" and f.completion_tokens == 12 for f in finished)

    targets = []
    for index, request in enumerate(chunks):
        *context, target = request.messages
        assert target.role == "user" and len(target.content) == 1 and len(target.content[0]) <= settings.chunk_chars
        targets.append(target.content[0])
        assert [m.role for m in context] == ["system"] + ["user", "assistant"] * min(index, settings.chunk_context)
        assert context[0] == chunks[0].messages[0]  # the voice's scene prompt in every chunk
        carried = context[1:]
        for back in range(1, min(index, settings.chunk_context) + 1):  # chunk index-back, oldest first
            user, assistant = carried[2 * (len(carried) // 2 - back):][:2]
            assert user == Message("user", (targets[index - back],))
            codes = assistant.content[0]
            assert isinstance(codes, AudioCodes)
            want = np.concatenate([_delayed_to_frames(s) for s in finished[index - back].segments], axis=1)
            np.testing.assert_array_equal(codes.codes, want)
    assert " ".join(targets).split() == text.split()  # every word spoken once, none cut

    samples = [round(f.audio_seconds * 24000) for f in finished]
    overlap = round(CROSSFADE_SECONDS * 24000)
    assert min(samples) > overlap
    assert len(pcm) == sum(samples) - overlap * (len(samples) - 1)  # one stream, chunks crossfaded


def test_long_text_in_chat_streamed_or_not_counts_usage_of_every_chunk(live, client):
    params = dict(model=MODEL, modalities=["text", "audio"], audio={"voice": "sage", "format": "wav"}, seed=4,
                  max_completion_tokens=16, messages=[{"role": "user", "content": long_text(700)}])
    completion = client.chat.completions.create(**params, extra_headers={"X-Request-Id": "longchat"})
    finished = live.engine.finish_log.of("longchat")
    assert len(finished) >= 3
    usage = completion.usage
    assert usage.prompt_tokens == sum(f.prompt_tokens for f in finished)
    assert usage.completion_tokens == sum(f.completion_tokens for f in finished) == 16 * len(finished)
    wav = base64.b64decode(completion.choices[0].message.audio.data)
    pcm, _ = soundfile.read(io.BytesIO(wav), dtype="int16")
    overlap = round(CROSSFADE_SECONDS * 24000)
    assert len(pcm) == sum(round(f.audio_seconds * 24000) for f in finished) - overlap * (len(finished) - 1)

    stream = list(client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in stream if c.choices]
    streamed = b"".join(base64.b64decode(a["data"]) for a in map(delta_audio, deltas) if a)
    np.testing.assert_array_equal(np.frombuffer(streamed, "<i2"), pcm)  # the same seeded audio, as one stream
    assert stream[-1].usage.completion_tokens == usage.completion_tokens


def test_cancelling_a_long_text_stream_stops_every_chunk(live, client):
    def submitted():
        return [r for r in live.recorder.submitted if r.request_id.startswith("longcancel")]

    with client.audio.speech.with_streaming_response.create(
            model=MODEL, voice="echo", input=long_text(3000), response_format="pcm",
            extra_body={"seed": 6, "max_completion_tokens": 300}, extra_headers={"X-Request-Id": "longcancel"}) as r:
        for _ in r.iter_bytes():
            if len(submitted()) == 2:
                break  # audio of the second chunk is flowing: leave
    finished = wait_for(lambda: live.engine.finish_log.of("longcancel")[1:] and live.engine.finish_log.of("longcancel"),
                        30, "the second chunk's end")
    assert [f.finish_reason for f in finished] == ["length", "cancelled"]
    wait_for(lambda: live.engine.active_requests() == 0 and live.engine.queue_depth() == 0, 30, "engine idle")
    assert len(submitted()) == 2  # of more than ten chunks


def test_carried_chunks_yield_to_a_small_kv_cache(live, client, tiny_artifacts):
    """The oldest carried chunk is dropped when a prompt with all of them leaves no room for
    max_completion_tokens: an engine whose cache holds one carried chunk but not two."""
    body = dict(model=MODEL, voice="ash", input=long_text(1000), response_format="pcm",
                extra_body={"seed": 8, "max_completion_tokens": 24})
    client.audio.speech.create(**body, extra_headers={"X-Request-Id": "kvroomy"})
    prompts = [f.prompt_tokens for f in live.engine.finish_log.of("kvroomy")]
    assert len(prompts) >= 4 and prompts[1] < prompts[2]  # one carried chunk, then two
    engine = make_engine(tiny_artifacts, max_batch=1, max_len=min(prompts[2:]) + 24, endless=True)
    engine.finish_log = FinishLog(engine)
    with LiveServer(engine, ServeSettings()) as server:
        small = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        pcm = small.audio.speech.create(**body, extra_headers={"X-Request-Id": "kvsmall"}).content
        chunks = server.recorder.submitted
    assert len(pcm) > 0 and len(chunks) == len(prompts)
    assert [len(r.messages) for r in chunks] == [2] + [4] * (len(prompts) - 1)  # system, (user, audio), user
    assert [f.finish_reason for f in engine.finish_log.of("kvsmall")] == ["length"] * len(prompts)


def test_presets_and_aliases_override_builtin_names(tmp_path, tiny_artifacts):
    voices = write_voices(tmp_path / "voices")
    (voices / "nova").mkdir()
    (voices / "nova" / "clip.wav").write_bytes(tone_wav(1.0, freq=260.0))
    (voices / "nova" / "transcript.txt").write_text("A preset called nova.\n")
    settings = settings_for(voices)  # alloy -> belinda, echo -> en_man
    settings = dataclasses.replace(settings, voice_aliases={**settings.voice_aliases, "narrator": "onyx"})
    with LiveServer(make_engine(tiny_artifacts, max_batch=1), settings) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        cards = {c["id"]: c for c in client.get("/audio/voices", cast_to=object)["data"]}
        assert "alloy" not in cards and cards["belinda"]["aliases"] == ["alloy"]
        assert cards["nova"]["source"] == "preset" and cards["onyx"]["source"] == "builtin"
        assert cards["onyx"]["aliases"] == ["narrator"]
        client.audio.speech.create(model=MODEL, voice="narrator", input="Hi.", extra_body={"max_completion_tokens": 2})
        assert f"SPEAKER0: {cards['onyx']['description']}" in _system_text(server.recorder.submitted[-1])
        for voice, transcript in (("alloy", "Twas the night before Christmas."), ("nova", "A preset called nova.")):
            client.audio.speech.create(model=MODEL, voice=voice, input="Hi.", extra_body={"max_completion_tokens": 2})
            request = server.recorder.submitted[-1]
            assert [m.role for m in request.messages] == ["user", "assistant", "user"]  # a clone, no description
            assert request.messages[0].content == (transcript,)


def test_serving_doc_sdk_example_runs_as_written(tiny_artifacts):
    """docs/serving.md's Python block against a default server (only the default max_completion_tokens
    shortened: the tiny model's audio ends at random, often late)."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", SERVING_DOC.read_text(), re.DOTALL) if "OpenAI(" in b]
    assert len(blocks) == 1 and 'voice="onyx"' in blocks[0]
    with LiveServer(make_engine(tiny_artifacts, max_batch=2), ServeSettings(limits=Limits(default_max_tokens=40))) \
            as server:
        namespace: dict = {}
        exec(blocks[0].replace("http://127.0.0.1:8000", server.url), namespace)  # noqa: S102 - our own docs
        requests = server.recorder.submitted
    assert base64.b64decode(namespace["completion"].choices[0].message.audio.data)[:4] == b"RIFF"
    assert namespace["speech"].content and len(namespace["pcm"]) % 2 == 0
    assert "Speak slowly, like a late-night radio host." in _system_text(requests[1])
    assert len(requests) > 3  # the long text went in chunks


def test_cli_flags_for_text_handling():
    from serve.__main__ import parse_args, settings_from_args

    base = ["--artifacts", "x"]
    defaults = settings_from_args(parse_args(base), environ={})
    assert (defaults.normalize_text, defaults.limits.max_input_chars) == (True, 20_000)
    settings = settings_from_args(parse_args(base + ["--no-normalize-text", "--chunk-chars", "500",
                                                     "--chunk-context", "0"]), environ={})
    assert (settings.normalize_text, settings.chunk_chars, settings.chunk_context) == (False, 500, 0)
    with pytest.raises(SystemExit, match="--chunk-chars must be at least 1"):
        settings_from_args(parse_args(base + ["--chunk-chars", "0"]), environ={})
