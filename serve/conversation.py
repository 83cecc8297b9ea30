"""Wire requests -> `engines.api.SpeechRequest`: message mapping, voices, sampling defaults, limits.

Chat messages map one to one (spec llm.md §5.1-5.2):
* system / developer text is the scene description. Text that already holds
  `<|scene_desc_start|>` is used verbatim; other text is wrapped in upstream's convention
  "Generate audio following instruction.\\n\\n<|scene_desc_start|>\\n{text}\\n<|scene_desc_end|>".
* user text is spoken (the last message must be a user message: the text to speak).
* an assistant message with `input_audio` right after a user message is a voice reference: that
  user message is its transcript. The clip is decoded, resampled to the codec rate and
  codec-encoded (cached by content).
* `audio.voice` (chat) / `voice` (speech) inserts the preset's (transcript, clip) pair after the
  system messages, before the conversation.
"""

from __future__ import annotations

from engines.api import AudioCodes, Content, Message, SamplingParams, SpeechRequest
from engines.prompt import scene_system_prompt
from serve.errors import APIError
from serve.protocol import AudioSpeechRequest, ChatCompletionRequest, ChatMessage, SamplingFields, TextPart
from serve.settings import ServeSettings
from serve.voices import DEFAULT_VOICE, Voice, VoiceLibrary, decode_base64, load_reference

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

    async def from_chat(self, req: ChatCompletionRequest, request_id: str) -> SpeechRequest:
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
        request = SpeechRequest(
            messages=await self._with_voice(messages, voice),
            sampling=self._sampling(req, req.extra_body),
            max_tokens=self._max_tokens(req.max_completion_tokens or req.max_tokens),
            request_id=request_id,
        )
        if req.stop is not None:
            request.stop_strings = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
        return request

    async def from_speech(self, req: AudioSpeechRequest, request_id: str) -> SpeechRequest:
        self.check_model(req.model)
        if req.voice and req.voice != DEFAULT_VOICE and req.reference_audio:  # SDKs always send a voice
            raise APIError(400, f"give either a voice preset or reference_audio, not both (voice "
                           f"{DEFAULT_VOICE!r} goes with reference_audio)", param="reference_audio")
        messages = [Message("system", (scene_system_prompt(req.instructions),))] if req.instructions else []
        voice = self._voices.resolve(req.voice, "voice") if req.voice else None
        if req.reference_audio is not None:
            if not (req.reference_transcript or "").strip():
                raise APIError(400, "reference_transcript (what the reference clip says) is required with "
                               "reference_audio", param="reference_transcript")
            codes = await self._reference_codes(req.reference_audio, None, "reference_audio")
            messages += [Message("user", (req.reference_transcript,)), Message("assistant", (codes,))]
        messages.append(Message("user", (req.input,)))
        self._check_text(messages, "input")
        return SpeechRequest(
            messages=await self._with_voice(messages, voice),
            sampling=self._sampling(req, None),
            max_tokens=self._max_tokens(req.max_completion_tokens),
            request_id=request_id,
        )

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
        if role == "system":
            pieces = [scene_system_prompt("".join(p for p in pieces if isinstance(p, str)))]
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
        if voice is None:
            return messages
        pair = [Message("user", (voice.transcript,)), Message("assistant", (await self._voices.encode(voice.wave),))]
        head = 0
        while head < len(messages) and messages[head].role == "system":
            head += 1
        system = [Message("system", (voice.system_prompt,))] if voice.system_prompt and head == 0 else []
        return system + messages[:head] + pair + messages[head:]

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

    def _max_tokens(self, requested: int | None) -> int:
        limit = self._limits.max_completion_tokens
        if requested is not None and requested > limit:
            raise APIError(400, f"max_completion_tokens {requested} exceeds this server's limit of {limit} "
                           "(one token = one 40 ms audio frame)", param="max_completion_tokens")
        return requested or self._limits.default_max_tokens

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

