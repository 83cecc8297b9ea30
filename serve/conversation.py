"""Wire requests -> `engines.api.SpeechRequest`: message mapping, voices, sampling defaults, limits.

Chat messages map one to one (spec llm.md §5.1-5.2):
* system / developer text (and speech `instructions`) is the scene description, wrapped in upstream's
  convention "Generate audio following instruction.\\n\\n<|scene_desc_start|>\\n{text}\\n<|scene_desc_end|>".
  Text that already is an upstream system prompt (it starts with upstream's TTS or multi-speaker
  instruction, or holds a scene block) is used verbatim, as upstream renders system text unchanged.
  Either way the scene markers are emitted as special tokens here and all text stays plain text.
* user text is spoken (the last message must be a user message: the text to speak). Speech input
  is normalised as upstream's generation example does (serve/textnorm.py) unless the request or
  server turns that off; chat text only when the request asks (`normalize_text`).
* an assistant message with `input_audio` right after a user message is a voice reference: that
  user message is its transcript. The clip is decoded, resampled to the codec rate and
  codec-encoded (cached by content).
* `audio.voice` (chat) / `voice` (speech): a preset inserts its (transcript, clip) pair after the
  system messages, before the conversation; a built-in voice adds its "SPEAKER0: description" line to
  the scene block (upstream's convention for a voice without a clip).
* a text to speak longer than `ServeSettings.chunk_chars` becomes a `serve.longform.LongText`.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from engines.api import AudioCodes, Content, Message, SamplingParams, SpecialToken, SpeechRequest
from engines.prompt import (MULTISPEAKER_INSTRUCTION, SCENE_END, SCENE_MARKERS, SCENE_START, TTS_INSTRUCTION,
                            content_text, structured)
from serve.errors import APIError
from serve.longform import LongText, split_text
from serve.protocol import AudioSpeechRequest, ChatCompletionRequest, ChatMessage, SamplingFields, TextPart
from serve.settings import ServeSettings
from serve.textnorm import normalize
from serve.voices import DEFAULT_VOICE, Voice, VoiceLibrary, decode_base64, load_reference

log = logging.getLogger("serve")

_SCENE_BLOCK = re.compile(re.escape(SCENE_START) + ".*?" + re.escape(SCENE_END), re.DOTALL)


def system_content(text: str, speaker: str | None = None) -> tuple[Content, ...]:
    """A system message from client text: verbatim when it already is an upstream system prompt,
    else the text as the scene description in upstream's convention; with `speaker`, a
    "SPEAKER0: {speaker}" line in the scene block (upstream's profile convention, examples/generation.py
    `prepare_generation_context`) unless the scene already describes SPEAKER0. Scene markers become
    special tokens; everything else stays plain text."""
    if text.startswith((TTS_INSTRUCTION, MULTISPEAKER_INSTRUCTION)) or _SCENE_BLOCK.search(text):
        pieces = list(structured(text, SCENE_MARKERS))
    else:
        pieces = [f"{TTS_INSTRUCTION}\n\n", SpecialToken(SCENE_START), f"\n{text}\n", SpecialToken(SCENE_END)]
    if speaker:
        pieces = _with_speaker(pieces, f"SPEAKER0: {speaker}")
    return tuple(pieces)


def _with_speaker(pieces: list[Content], line: str) -> list[Content]:
    """`line` at the end of the first scene block, as upstream writes "{scene}\\n\\n{line}"; a new
    scene block after the text when there is none."""
    end = SpecialToken(SCENE_END)
    if end not in pieces:
        if pieces and isinstance(pieces[-1], str):
            pieces = [*pieces[:-1], pieces[-1] + "\n\n"]
        else:
            pieces = [*pieces, "\n\n"]
        return [*pieces, SpecialToken(SCENE_START), f"\n{line}\n", end]
    at = pieces.index(end)
    inner = pieces[at - 1] if at and isinstance(pieces[at - 1], str) else ""
    if "SPEAKER0" in inner:
        return pieces
    scene = inner.strip("\n")
    return [*pieces[:at - 1 if inner else at], "\n" + (f"{scene}\n\n" if scene else "") + f"{line}\n", *pieces[at:]]


class RequestBuilder:
    def __init__(self, settings: ServeSettings, voices: VoiceLibrary, sample_rate: int):
        self._settings = settings
        self._limits = settings.limits
        self._voices = voices
        self._rate = sample_rate

    def check_model(self, model: str) -> None:
        if model not in self._settings.model_names:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                           f"{', '.join(self._settings.model_names)} (see GET /v1/models)",
                           code="model_not_found", param="model")

    async def from_chat(self, req: ChatCompletionRequest, request_id: str) -> SpeechRequest | LongText:
        self.check_model(req.model)
        if req.modalities is not None and "audio" not in req.modalities:
            raise APIError(400, "this is a text-to-speech model: modalities must include \"audio\" "
                           "(e.g. [\"text\", \"audio\"])", param="modalities")
        if len(req.messages) > self._limits.max_messages:
            raise APIError(400, f"{len(req.messages)} messages; the limit is {self._limits.max_messages}",
                           param="messages")
        messages = [await self._chat_message(req.messages, i) for i in range(len(req.messages))]
        if messages[-1].role != "user":
            raise APIError(400, "the last message must be a user message with the text to speak", param="messages")
        self._check_text(messages, "messages")
        self._check_reference_count(messages)
        voice = self._voices.resolve(req.audio.voice, "audio.voice") if req.audio and req.audio.voice else None
        template = SpeechRequest(
            messages=[],
            sampling=self._sampling(req, req.extra_body),
            **self._max_tokens(req.max_completion_tokens or req.max_tokens),
            request_id=request_id,
        )
        if req.stop is not None:
            template.stop_strings = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
        return await self._plan(messages, voice, template, bool(req.normalize_text))

    async def from_speech(self, req: AudioSpeechRequest, request_id: str) -> SpeechRequest | LongText:
        self.check_model(req.model)
        if req.voice and req.voice != DEFAULT_VOICE and req.reference_audio:  # SDKs always send a voice
            raise APIError(400, f"give either a voice preset or reference_audio, not both (voice "
                           f"{DEFAULT_VOICE!r} goes with reference_audio)", param="reference_audio")
        messages = [Message("system", (req.instructions,))] if req.instructions else []
        voice = self._voices.resolve(req.voice, "voice") if req.voice else None
        if req.reference_audio is not None:
            if not (req.reference_transcript or "").strip():
                raise APIError(400, "reference_transcript (what the reference clip says) is required with "
                               "reference_audio", param="reference_transcript")
            codes = await self._reference_codes(req.reference_audio, None, "reference_audio")
            messages += [Message("user", (req.reference_transcript,)), Message("assistant", (codes,))]
        messages.append(Message("user", (req.input,)))
        self._check_text(messages, "input")
        template = SpeechRequest(messages=[], sampling=self._sampling(req, None),
                                 **self._max_tokens(req.max_completion_tokens), request_id=request_id)
        normalizing = self._settings.normalize_text if req.normalize_text is None else req.normalize_text
        return await self._plan(messages, voice, template, normalizing)

    async def _plan(self, messages: list[Message], voice: Voice | None, template: SpeechRequest,
                    normalizing: bool) -> SpeechRequest | LongText:
        """The request to run: one generation, or chunks (serve/longform.py) when the text to speak is
        longer than one chunk."""
        *context, target = await self._with_voice(messages, voice)
        text = content_text(target.content)
        limit = self._settings.chunk_chars
        chunks = split_text(text, limit) if len(text) > limit else [text]
        if len(chunks) == 1:
            content = (normalize(text),) if normalizing else target.content
            return dataclasses.replace(template, messages=[*context, Message("user", content)])
        pieces = [((normalize(chunk) if normalizing else chunk),) for chunk in chunks]
        log.info("req %s: %d characters to speak in %d chunks", template.request_id, len(text), len(chunks))
        return LongText(context, pieces, template, self._settings.chunk_context)

    # messages ------------------------------------------------------------------------------------
    async def _chat_message(self, wire: list[ChatMessage], index: int) -> Message:
        msg = wire[index]
        role = "system" if msg.role == "developer" else msg.role
        parts = [TextPart(type="text", text=msg.content)] if isinstance(msg.content, str) else msg.content or []
        pieces: list[Content] = []
        for j, part in enumerate(parts):
            if isinstance(part, TextPart):
                if part.text:
                    pieces.append(part.text)
                continue
            param = f"messages.{index}.content.{j}.input_audio"
            self._check_reference_position(wire, index, param)
            pieces.append(await self._reference_codes(part.input_audio.data, part.input_audio.format, param))
        if not pieces:
            raise APIError(400, f"messages.{index} has no content", param=f"messages.{index}.content")
        if role == "system":  # shaped into a system prompt by _with_voice
            pieces = ["".join(p for p in pieces if isinstance(p, str))]
        return Message(role, tuple(pieces))

    @staticmethod
    def _check_reference_position(wire: list[ChatMessage], index: int, param: str) -> None:
        if wire[index].role != "assistant":
            raise APIError(400, f"audio in a {wire[index].role} message is not supported: a voice reference is an "
                           "assistant message with input_audio after the user message holding its transcript",
                           param=param)
        if index == 0 or wire[index - 1].role != "user":
            raise APIError(400, "a reference clip (assistant input_audio) must follow the user message with its "
                           "transcript", param=param)

    async def _reference_codes(self, data: str, fmt: str | None, param: str) -> AudioCodes:
        wave = await load_reference(decode_base64(data, param), fmt, self._limits, self._rate, param)
        return await self._voices.encode(wave)

    async def _with_voice(self, messages: list[Message], voice: Voice | None) -> list[Message]:
        """System text shaped into system prompts (`system_content`), the first one carrying a built-in
        voice's speaker line; a preset's (transcript, clip) pair after the leading system messages. A
        preset's own system prompt applies when the request has none."""
        if messages[0].role != "system" and voice is not None and (voice.system_prompt or voice.description):
            messages = [Message("system", (voice.system_prompt or TTS_INSTRUCTION,)), *messages]
        speaker = voice.description if voice is not None else None
        messages = [Message("system", system_content(content_text(m.content), speaker if i == 0 else None))
                    if m.role == "system" else m for i, m in enumerate(messages)]
        if voice is None or voice.wave is None:
            return messages
        pair = [Message("user", (voice.transcript,)), Message("assistant", (await self._voices.encode(voice.wave),))]
        head = 0
        while head < len(messages) and messages[head].role == "system":
            head += 1
        return messages[:head] + pair + messages[head:]

    # limits and parameters ------------------------------------------------------------------------
    def _check_text(self, messages: list[Message], param: str) -> None:
        chars = sum(len(p) for m in messages for p in m.content if isinstance(p, str))
        if chars > self._limits.max_input_chars:
            raise APIError(400, f"the request holds {chars} characters of text; the limit is "
                           f"{self._limits.max_input_chars}: split the text into several requests", param=param)
        target = "".join(p for p in messages[-1].content if isinstance(p, str))
        if not target.strip():
            raise APIError(400, "the text to speak is empty", param=param)

    def _check_reference_count(self, messages: list[Message]) -> None:
        count = sum(isinstance(p, AudioCodes) for m in messages for p in m.content)
        if count > self._limits.max_references:
            raise APIError(400, f"{count} reference clips; the limit is {self._limits.max_references}",
                           param="messages")

    def _max_tokens(self, requested: int | None) -> dict:
        """The SpeechRequest fields of the client's max, or of the server default when it names none
        (which the engine lowers to what fits beside the prompt)."""
        limit = self._limits.max_completion_tokens
        if requested is not None and requested > limit:
            raise APIError(400, f"max_completion_tokens {requested} exceeds this server's limit of {limit} "
                           "(one token = one 40 ms audio frame)", param="max_completion_tokens")
        if requested is None:
            return {"max_tokens": self._limits.default_max_tokens, "max_tokens_defaulted": True}
        return {"max_tokens": requested}

    def _sampling(self, req: SamplingFields, extra: SamplingFields | None) -> SamplingParams:
        """Request field, else the same field in a literal extra_body, else the server default."""
        default = self._settings.sampling

        def pick(name: str, fallback):
            value = getattr(req, name)
            if value is None and extra is not None:
                value = getattr(extra, name)
            return fallback if value is None else value

        top_k = pick("top_k", default.top_k)
        return SamplingParams(
            temperature=pick("temperature", default.temperature),
            top_k=top_k if top_k and top_k > 0 else None,
            top_p=pick("top_p", default.top_p),
            ras_window=pick("ras_win_len", default.ras_window),
            ras_max_repeat=pick("ras_win_max_num_repeat", default.ras_max_repeat),
            seed=pick("seed", default.seed),
        )

