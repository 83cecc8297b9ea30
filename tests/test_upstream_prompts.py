"""Upstream's prompts through the server's request path give upstream's ids (spec llm.md §5.1-5.2).

Each case is a wire request (chat or speech) and the ChatML messages upstream builds for the same
thing, with upstream's exact strings (boson-ai/higgs-audio examples/generation.py,
examples/serve_engine/input_samples.py, examples/vllm/run_chat_completion.py). The expected ids come
from the tokenizer's own special-token-parsing encode of those strings, piece by piece as upstream's
`prepare_chatml_sample` encodes them, plus the serve engine's forced-audio suffix; the server's ids come
from `RequestBuilder` -> `PromptRenderer.render`. Real Llama-3 tokenizer (../shared/tokenizer/llama3)
and the tiny one.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from engines.prompt import MULTISPEAKER_INSTRUCTION, PromptRenderer
from export.tiny_tokenizer import write_tiny_tokenizer
from serve.builtin_voices import BUILTIN_VOICES
from serve.conversation import RequestBuilder
from serve.protocol import AudioSpeechRequest, ChatCompletionRequest
from serve.settings import ServeSettings
from serve.voices import ReferenceEncoder, VoiceLibrary
from serve_support import MODEL, make_engine, tone_wav

LLAMA3 = Path(__file__).resolve().parents[2] / "shared" / "tokenizer" / "llama3" / "tokenizer.json"
AUDIO = object()  # an assistant audio turn in an upstream message list
SCENE = "Audio is recorded from a quiet room."
GEN_SCENE_PROMPT = f"Generate audio following instruction.\n\n<|scene_desc_start|>\n{SCENE}\n<|scene_desc_end|>"
SE_ZERO_SHOT = "Generate audio following instruction.\n\n<|scene_desc_start|>\nSPEAKER0: british accent\n<|scene_desc_end|>"
SE_TEXT = ("Hey, everyone! Welcome back to Tech Talk Tuesdays.\n"
           "It's your host, Alex, and today, we're diving into a topic that's become absolutely crucial in the tech "
           "world — deep learning.\n")
MULTI = (f"{MULTISPEAKER_INSTRUCTION}\n\n<|scene_desc_start|>\n{SCENE}\n\nSPEAKER0: feminine\nSPEAKER1: masculine\n"
         "<|scene_desc_end|>")
TARGET = "The sun rises in the east and sets in the west."
REFERENCE = "I would imagine so. A wand with a dragon heartstring core is capable of dazzling magic."
CLIP = base64.b64encode(tone_wav(1.0)).decode()


def _chat(*messages, voice=None, **fields):
    body = {"model": MODEL, "messages": [{"role": r, "content": c} for r, c in messages], **fields}
    if voice:
        body["audio"] = {"voice": voice, "format": "wav"}
    return ChatCompletionRequest.model_validate(body)


def _speech(**fields):
    return AudioSpeechRequest.model_validate({"model": MODEL, "input": TARGET, **fields})


CASES = {
    # the bare zero-shot prompt: a system text that already is upstream's, not a scene description
    "zero_shot": (_chat(("system", "Generate audio following instruction."), ("user", TARGET)),
                  [("system", "Generate audio following instruction."), ("user", TARGET)]),
    "vllm_scene_prompt": (_chat(("system", GEN_SCENE_PROMPT), ("user", TARGET)),
                          [("system", GEN_SCENE_PROMPT), ("user", TARGET)]),
    "scene_description": (_chat(("system", SCENE), ("user", TARGET)), [("system", GEN_SCENE_PROMPT), ("user", TARGET)]),
    "speech_instructions": (_speech(instructions=SCENE), [("system", GEN_SCENE_PROMPT), ("user", TARGET)]),
    "serve_engine_zero_shot": (_chat(("system", SE_ZERO_SHOT), ("user", SE_TEXT)),
                               [("system", SE_ZERO_SHOT), ("user", SE_TEXT)]),
    "multi_speaker": (_chat(("system", MULTI), ("user", "[SPEAKER0] Hi. [SPEAKER1] Hello!")),
                      [("system", MULTI), ("user", "[SPEAKER0] Hi. [SPEAKER1] Hello!")]),
    "voice_clone": (_chat(("system", SCENE), ("user", REFERENCE),
                          ("assistant", [{"type": "input_audio", "input_audio": {"data": CLIP, "format": "wav"}}]),
                          ("user", TARGET)),
                    [("system", GEN_SCENE_PROMPT), ("user", REFERENCE), ("assistant", AUDIO), ("user", TARGET)]),
    "serve_engine_voice_clone": (
        _chat(("user", REFERENCE), ("assistant", [{"type": "input_audio", "input_audio": {"data": CLIP}}]),
              ("user", SE_TEXT)),
        [("user", REFERENCE), ("assistant", AUDIO), ("user", SE_TEXT)]),
    # a built-in voice is upstream's profile speaker (generation.py --ref_audio profile:NAME)
    "builtin_voice": (_speech(voice="onyx"), [("system", "Generate audio following instruction.\n\n<|scene_desc_start|>\n"
                                                         f"SPEAKER0: {BUILTIN_VOICES['onyx']}\n<|scene_desc_end|>"),
                                              ("user", TARGET)]),
    "builtin_voice_with_scene": (
        _chat(("system", SCENE), ("user", TARGET), voice="nova"),
        [("system", f"Generate audio following instruction.\n\n<|scene_desc_start|>\n{SCENE}\n\n"
                    f"SPEAKER0: {BUILTIN_VOICES['nova']}\n<|scene_desc_end|>"), ("user", TARGET)]),
    # speech input is normalised as generation.py does (expected string written from its rules)
    "normalised_speech": (_speech(input="Funny（really）, 20°C [laugh]"),
                          [("user", "Funny really , 20 degrees Celsius <SE>[Laughter]</SE>")]),
    "speech_as_sent": (_speech(input="Funny (really) [laugh]", normalize_text=False),
                       [("user", "Funny (really) [laugh]")]),
    "chat_normalised_on_request": (_chat(("user", "Ha [laugh] ha"), normalize_text=True),
                                   [("user", "Ha <SE>[Laughter]</SE> ha.")]),
}


def upstream_ids(tokenizer: Tokenizer, messages: list[tuple[str, object]]) -> list[int]:
    """prepare_chatml_sample's per-piece encoding (special tokens parsed) + the forced-audio suffix."""
    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    ids: list[int] = []
    for i, (role, content) in enumerate(messages):
        ids += enc(("<|begin_of_text|>" if i == 0 else "") + f"<|start_header_id|>{role}<|end_header_id|>\n\n")
        ids += enc("<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>" if content is AUDIO else content)
        following = messages[i + 1][0] if i + 1 < len(messages) else None
        ids += enc("<|eom_id|>" if role == "assistant" and following == "assistant" else "<|eot_id|>")
    return ids + enc("<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>")


@pytest.fixture(scope="module")
def builder(tiny_artifacts):
    engine = make_engine(tiny_artifacts, start=False)  # its codec encoder, for the voice-clone cases
    settings = ServeSettings(model_name=MODEL)
    voices = VoiceLibrary(None, {}, ReferenceEncoder(engine), settings.limits, engine.sample_rate)
    return RequestBuilder(settings, voices, engine.sample_rate)


@pytest.fixture(scope="module", params=["llama3", "tiny"])
def renderer(request, tmp_path_factory):
    if request.param == "tiny":
        return PromptRenderer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    if not LLAMA3.is_file():
        pytest.skip(f"{LLAMA3} is missing (the shared/ folder beside the repository)")
    return PromptRenderer(LLAMA3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_upstream_prompt_renders_to_upstream_ids(builder, renderer, case):
    wire, upstream = CASES[case]
    make = builder.from_chat if isinstance(wire, ChatCompletionRequest) else builder.from_speech
    request = asyncio.run(make(wire, "req"))
    got = renderer.render(request.messages).ids.tolist()
    assert got == upstream_ids(renderer.tokenizer, upstream)
