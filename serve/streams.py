"""The bodies of streamed responses, built from a job's events as they arrive.

Three shapes, each the one its OpenAI endpoint defines: chat.completion.chunk events over SSE
(`chat_chunks`), encoded audio bytes over chunked transfer (`encoded_audio`), and the speech
endpoint's speech.audio.delta / speech.audio.done events over SSE (`speech_events`). `sse` is
the one place an event is framed. Once a stream has begun its 200 status is sent, so a failure
mid-stream is told in the stream itself: an SSE error event, or a broken transfer for raw bytes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import AsyncIterator

from pydantic import BaseModel

from engines.api import AudioChunk
from engines.audio_io import StreamingEncoder, to_pcm16
from serve.errors import APIError
from serve.jobs import FINISH_REASONS, Job, usage
from serve.protocol import (ChatCompletionStreamChoice, ChatCompletionStreamResponse, DeltaAudio, DeltaMessage,
                            SpeechAudioDelta, SpeechAudioDone, SpeechUsage)


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def chat_chunks(job: Job, model: str, include_usage: bool) -> AsyncIterator[str]:
    """chat.completion.chunk events: role, PCM16 audio deltas as they arrive, the finish chunk,
    the usage chunk if asked for, [DONE]. An engine failure is an SSE error event (the SDKs
    raise it), since the 200 status is already sent."""
    created, audio_id = int(time.time()), f"audio-{uuid.uuid4().hex}"

    def chunk(delta: DeltaMessage, **choice) -> str:
        return sse(ChatCompletionStreamResponse(id=f"chatcmpl-{job.request_id}", created=created, model=model,
                                                choices=[ChatCompletionStreamChoice(delta=delta, **choice)]))

    yield chunk(DeltaMessage(role="assistant", content=""))
    async for event in job.events():
        if isinstance(event, AudioChunk):
            data = base64.b64encode(to_pcm16(event.pcm)).decode("ascii")
            yield chunk(DeltaMessage(audio=DeltaAudio(id=audio_id, data=data)))
        elif event.finish_reason == "error":
            yield sse(APIError(500, f"generation failed: {event.error}", code="generation_failed").body())
        else:
            yield chunk(DeltaMessage(), finish_reason=FINISH_REASONS[event.finish_reason],
                        stop_reason=event.stop_reason)
            if include_usage:
                yield sse(ChatCompletionStreamResponse(id=f"chatcmpl-{job.request_id}", created=created,
                                                       model=model, choices=[], usage=usage(event)))
    yield "data: [DONE]\n\n"


async def encoded_audio(job: Job, encoder: StreamingEncoder) -> AsyncIterator[bytes]:
    """Encoded bytes as the audio arrives. A failed generation aborts the connection (raising
    here), so the client sees a broken transfer rather than a silently truncated file."""
    async for event in job.events():
        if isinstance(event, AudioChunk):
            data = await asyncio.to_thread(encoder.feed, event.pcm)
        elif event.finish_reason in ("error", "cancelled"):
            raise RuntimeError(f"req {job.request_id}: generation {event.finish_reason}: {event.error}")
        else:
            data = await asyncio.to_thread(encoder.finish)
        if data:
            yield data


async def speech_events(job: Job, encoder: StreamingEncoder) -> AsyncIterator[str]:
    """OpenAI's speech SSE: speech.audio.delta events (base64 of the encoded bytes), then
    speech.audio.done with usage, or an error event."""
    try:
        async for data in encoded_audio(job, encoder):
            yield sse(SpeechAudioDelta(audio=base64.b64encode(data).decode("ascii")))
    except RuntimeError as exc:
        yield sse(APIError(500, str(exc), code="generation_failed").body())
        return
    finished = job.finished
    yield sse(SpeechAudioDone(usage=SpeechUsage(input_tokens=finished.prompt_tokens,
                                                output_tokens=finished.completion_tokens,
                                                total_tokens=finished.prompt_tokens + finished.completion_tokens)))
