"""OpenAI wire formats as pydantic v2 models; no logic beyond shape and range checks.

Requests validate strictly (a string where a number belongs is a 400, not a silent coercion)
and accept unknown fields, which the server logs and ignores: SDKs add new optional fields
faster than servers learn them. Common OpenAI fields that a TTS server has no use for are
declared anyway so that their types are still checked.

The non-streaming chat response mirrors the hosted Higgs Audio endpoint
(shared/api/chat_completion_example.json) key for key, vLLM extras included.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

AudioFormat = Literal["wav", "pcm", "flac", "mp3", "opus", "aac"]


class RequestModel(BaseModel):
    """Base of every request body: strict types, unknown fields kept in `model_extra` (ignored),
    every string UTF-16-clean (see `check_unicode`)."""

    model_config = ConfigDict(strict=True, extra="allow")

    @field_validator("*")
    @classmethod
    def _unicode_clean(cls, value: Any) -> Any:
        check_unicode(value)
        return value


def check_unicode(value: Any) -> None:
    """Strings (also inside lists and dicts) must be valid Unicode. JSON can spell a lone UTF-16
    surrogate ("\\ud800"), which Python keeps in a str that nothing downstream can encode: the
    tokenizer, the logs and the response would fail on it as a 500."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"text must be valid Unicode: a lone UTF-16 surrogate (U+{ord(value[exc.start]):04X}) "
                             f"at character {exc.start}; pair it or remove it") from None
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key)
            check_unicode(item)


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------
# shared request pieces


class SamplingFields(RequestModel):
    """Sampling knobs; None = the server default (ServeSettings.sampling).

    `ras_win_len` / `ras_win_max_num_repeat` are Higgs extensions named as in upstream's serve
    engine (repetition-aware sampling; window <= 0 disables it).
    """

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=100_000, description="-1 or 0 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ras_win_len: int | None = Field(None, ge=0, le=1024)
    ras_win_max_num_repeat: int | None = Field(None, ge=1, le=1024)


class ExtraBody(SamplingFields):
    """A literal `extra_body` object: curl users post the SDK example verbatim, so sampling
    fields may arrive nested here instead of merged into the top level."""


# ---------------------------------------------------------------------------------------------
# chat completions


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class InputAudio(RequestModel):
    data: str = Field(description="base64 audio bytes")
    format: str | None = Field(None, max_length=16, description="wav, mp3, flac, ogg, opus, aac, pcm, ...")


class InputAudioPart(RequestModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[Union[TextPart, InputAudioPart], Field(discriminator="type")]


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class AudioOutputParam(RequestModel):
    voice: str | None = Field(None, max_length=128)
    format: Literal["wav", "pcm", "pcm16", "flac", "mp3", "opus", "aac"] = "wav"


class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutputParam | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="legacy name of max_completion_tokens")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    normalize_text: bool = Field(False, description="normalise the text to speak as upstream's generation example")
    extra_body: ExtraBody | None = None
    # accepted and ignored (typed so that garbage is still a 400)
    user: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("n must be 1: the server generates one audio stream per request")
        return n

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else stop or []
        if len(items) > 16 or any(not s or len(s) > 64 for s in items):
            raise ValueError("stop takes at most 16 non-empty strings of at most 64 characters")
        return stop


class ChatCompletionAudio(ResponseModel):
    id: str
    data: str
    expires_at: int = 0
    transcript: str = ""


class ChatCompletionMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str = ""
    reasoning_content: None = None
    tool_calls: list[Any] = Field(default_factory=list)
    audio: ChatCompletionAudio | None = None
    allowed_token_ids: None = None
    bad_words: list[str] = Field(default_factory=list)
    mm_token_ids: None = None


class ChatCompletionChoice(ResponseModel):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: None = None
    finish_reason: str
    stop_reason: int | str | None = None
    token_ids: None = None


class UsageInfo(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    service_tier: None = None
    system_fingerprint: None = None
    prompt_logprobs: None = None
    prompt_token_ids: None = None
    kv_transfer_params: None = None


class DeltaAudio(ResponseModel):
    id: str
    data: str


class DeltaMessage(ResponseModel):
    """Carries only its present keys: role on the first chunk, audio on audio chunks, {} last."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    audio: DeltaAudio | None = None

    @model_serializer(mode="wrap")
    def _present_only(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionStreamChoice(ResponseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------------------------------
# /v1/audio/speech


class AudioSpeechRequest(SamplingFields):
    """OpenAI TTS request plus Higgs extensions: sampling fields (see SamplingFields),
    `max_completion_tokens`, and a one-off reference voice: `reference_audio` (base64 clip in
    any decodable format) with its `reference_transcript`, the same pair a stored voice holds
    (POST /v1/audio/voices fields `audio` + `transcript`). A reference goes with no voice or
    `voice: "default"` (the SDK requires one); a preset voice and a reference exclude each other."""

    model: str
    input: str = Field(min_length=1)
    voice: str | None = Field(None, max_length=128)
    response_format: AudioFormat = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    reference_audio: str | None = None
    reference_transcript: str | None = None
    normalize_text: bool | None = Field(None, description="normalise the input as upstream's generation example "
                                        "(Chinese punctuation, [laugh] tags, ...); None = the server's setting")


class SpeechAudioDelta(ResponseModel):
    type: Literal["speech.audio.delta"] = "speech.audio.delta"
    audio: str


class SpeechUsage(ResponseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class SpeechAudioDone(ResponseModel):
    type: Literal["speech.audio.done"] = "speech.audio.done"
    usage: SpeechUsage


# ---------------------------------------------------------------------------------------------
# models, voices, errors


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "higgs-onnx"
    root: str
    parent: str | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VoiceCard(ResponseModel):
    id: str
    object: Literal["voice"] = "voice"
    name: str
    transcript: str
    aliases: list[str] = Field(default_factory=list, description="OpenAI voice names mapped to it")
    source: Literal["builtin", "preset", "uploaded"]
    description: str | None = Field(None, description="what a built-in voice sounds like (its speaker description)")


class VoiceDeleted(ResponseModel):
    id: str
    object: Literal["voice.deleted"] = "voice.deleted"
    deleted: Literal[True] = True


class VoiceList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[VoiceCard]


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo
