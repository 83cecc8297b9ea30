"""Long text: split at sentence boundaries, generate chunk by chunk with the voice carried along.

Upstream's long-form generation (boson-ai/higgs-audio examples/generation.py, `HiggsAudioModelClient.generate`
with `--chunk_method word --generation_chunk_buffer_size N`; spec llm.md §5.2 "Long-form") prompts each
chunk with the conversation so far: after a chunk is generated, its audio codes (delay reverted, stream
BOS / EOS columns dropped) become an assistant audio turn after that chunk's user turn, and only the
last N (user, assistant) pairs are kept. The model then continues in the voice it just used.

Here a `LongText` is what `serve.conversation.RequestBuilder` returns for a text longer than one chunk,
and `LongTextGeneration` runs it on the engine as one generation: the server sees a single stream of
events (audio of every chunk in order, one `Finished` whose usage counts every chunk), and `cancel()`
stops the running chunk and every chunk after it. Chunk audio is joined with a short raised-cosine
crossfade, since two separately decoded waveforms do not meet at the same sample value (a click).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from typing import AsyncIterator, Callable

import numpy as np

from engines.api import SAMPLE_RATE, AudioChunk, AudioCodes, Content, Event, Finished, Message, SpeechRequest
from engines.delay import delayed_to_codes
from serve.errors import APIError

log = logging.getLogger("serve")

CROSSFADE_SECONDS = 0.02
QUEUE_RETRY_S = 0.5  # a later chunk that finds the engine's queue full waits this long and tries again
# a sentence ends at . ! ? (and CJK 。！？) plus closing quotes / brackets, before whitespace; CJK
# sentence ends need no whitespace after them
_SENTENCE_END = re.compile(r"(?<=[.!?…][\"'”’)\]])\s+|(?<=[.!?…])\s+|(?<=[。！？])(?![」』”’])|(?<=[。！？][」』”’])")
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+|(?<=[，；：])")
_NO_SPACE_AFTER = tuple("。！？，；：")  # CJK punctuation: the next piece follows without a space


def split_text(text: str, max_chars: int) -> list[str]:
    """Chunks of at most `max_chars` characters: paragraphs (blank-line separated) first, then
    sentences, then clauses; a chunk breaks inside a sentence only at whitespace, and inside a
    word only when one word alone is longer than `max_chars` (text without spaces, e.g. Chinese
    without punctuation). Consecutive pieces are packed greedily; a paragraph starts a new chunk
    unless it fits into the current one."""
    chunks: list[str] = []
    for paragraph in filter(None, (p.strip() for p in re.split(r"\n\s*\n", text))):
        if chunks and len(chunks[-1]) + 2 + len(paragraph) <= max_chars:
            chunks[-1] += "\n\n" + paragraph
            continue
        current = ""
        for piece in _pieces(paragraph, max_chars):
            joined = current + ("" if not current or current.endswith(_NO_SPACE_AFTER) else " ") + piece
            if current and len(joined) > max_chars:
                chunks.append(current)
                joined = piece
            current = joined
        chunks.append(current)
    return chunks


def _pieces(paragraph: str, max_chars: int) -> list[str]:
    """Sentences of a paragraph, each cut further (clauses, words, characters) until it fits."""
    out: list[str] = []
    for sentence in filter(None, _SENTENCE_END.split(paragraph)):
        if len(sentence) <= max_chars:
            out.append(sentence)
            continue
        for clause in filter(None, _CLAUSE_END.split(sentence)):
            if len(clause) <= max_chars:
                out.append(clause)
                continue
            for word in clause.split():
                out += [word[i:i + max_chars] for i in range(0, len(word), max_chars)]
    return out


@dataclasses.dataclass
class LongText:
    """A request whose text is spoken in chunks. `context`: the messages before the text (system
    prompt, voice reference, earlier turns); `chunks`: each chunk's user-message content;
    `template`: sampling, max_tokens (per chunk), stop strings and request id of every chunk;
    `carry`: how many previous chunks (text + generated audio) each prompt keeps at most."""

    context: list[Message]
    chunks: list[tuple[Content, ...]]
    template: SpeechRequest
    carry: int

    def request(self, index: int, history: list[tuple[Message, Message]]) -> SpeechRequest:
        """Chunk `index` after the carried `history`. A defaulted max_tokens yields to the KV cache only
        without history: with some, dropping carried chunks (`LongTextGeneration`) makes room first."""
        turns = [m for pair in history for m in pair]
        return dataclasses.replace(self.template, messages=[*self.context, *turns, Message("user", self.chunks[index])],
                                   max_tokens_defaulted=self.template.max_tokens_defaulted and not history)


Submit = Callable[[SpeechRequest], object]  # request -> engines.api.Generation


class LongTextGeneration:
    """One `engines.api.Generation`-like handle over all chunks of a `LongText` (what serve/app.py's
    Job consumes: `request`, `events()`, `cancel()`).

    The first chunk is submitted in the constructor, so its errors reach the client as the same
    4xx as a short request's. Each later chunk is submitted when the one before has finished; when
    its prompt with all carried chunks leaves no room for max_tokens in the KV cache, the oldest
    carried chunk is dropped first, and only without any carried chunk does a default max_tokens
    shrink to what fits (as for a short request, `LongText.request`)."""

    def __init__(self, plan: LongText, submit: Submit):
        self.plan = plan
        self._submit = submit
        self._cancelled = False
        self._current = submit(plan.request(0, []))
        self.request = self._current.request

    def cancel(self) -> None:
        self._cancelled = True
        self._current.cancel()

    async def events(self) -> AsyncIterator[Event]:
        splice = Splice(round(CROSSFADE_SECONDS * SAMPLE_RATE))
        history: list[tuple[Message, Message]] = []
        done: list[Finished] = []
        samples = 0
        for index in range(len(self.plan.chunks)):
            if index:
                failure = await self._next(index, history)
                if failure is not None:
                    done.append(failure)
                    break
            async for event in self._current.events():
                if isinstance(event, AudioChunk):
                    pcm = splice.feed(event.pcm)
                    if len(pcm):
                        samples += len(pcm)
                        yield AudioChunk(pcm)
                elif isinstance(event, Finished):
                    done.append(event)
                else:
                    yield event
            finished = done[-1]
            log.info("req %s: long text chunk %d/%d %s after %d steps", self.request.request_id, index + 1,
                     len(self.plan.chunks), finished.finish_reason, finished.completion_tokens)
            if finished.finish_reason in ("cancelled", "error") or self._cancelled:
                break
            codes = [delayed_to_codes(s) for s in finished.segments]
            if codes and sum(c.shape[1] for c in codes):
                audio = Message("assistant", (AudioCodes(np.concatenate(codes, axis=1)),))
                history = [*history, (Message("user", self.plan.chunks[index]), audio)]
                history = history[max(len(history) - self.plan.carry, 0):]
            splice.boundary()
        tail = splice.flush()
        if len(tail):
            samples += len(tail)
            yield AudioChunk(tail)
        yield _total(done, self._cancelled, samples / SAMPLE_RATE)

    async def _next(self, index: int, history: list[tuple[Message, Message]]) -> Finished | None:
        """Submit chunk `index`; a Finished("error" / "cancelled") when that is impossible."""
        carried = list(history)
        while not self._cancelled:
            try:
                self._current = self._submit(self.plan.request(index, carried))
                return None
            except APIError as error:
                if error.status == 429:  # the queue is full: wait for room rather than fail mid-stream
                    await asyncio.sleep(QUEUE_RETRY_S)
                elif error.code == "invalid_prompt" and carried:
                    carried = carried[1:]
                else:
                    log.error("req %s: long text chunk %d: %s", self.request.request_id, index + 1, error.message)
                    return Finished(finish_reason="error", error=error.message)
        return Finished(finish_reason="cancelled")


def _total(parts: list[Finished], cancelled: bool, audio_seconds: float) -> Finished:
    """The chunks' Finished events as one: usage summed, the reason of the last chunk, except that
    a cancelled or failed chunk ends the whole text that way and a chunk cut at max_tokens makes it
    "length"; `audio_seconds` is what the client got (chunks joined, so less than their sum)."""
    last = parts[-1]
    reasons = {p.finish_reason for p in parts}
    reason = "cancelled" if cancelled else last.finish_reason
    if reason == "stop" and "length" in reasons:
        reason = "length"
    return Finished(finish_reason=reason, stop_reason=last.stop_reason if reason == last.finish_reason else None,
                    prompt_tokens=sum(p.prompt_tokens for p in parts),
                    completion_tokens=sum(p.completion_tokens for p in parts),
                    audio_seconds=audio_seconds, error=last.error,
                    segments=tuple(s for p in parts for s in p.segments),
                    text_ids=tuple(t for p in parts for t in p.text_ids))


class Splice:
    """Joins the audio of consecutive chunks into one stream: holds back the last `overlap`
    samples of each chunk and crossfades them (raised cosine) with the first samples of the next."""

    def __init__(self, overlap: int):
        self._overlap = overlap
        self._held = np.zeros(0, np.float32)  # the newest samples, not yet released
        self._tail: np.ndarray | None = None  # the previous chunk's end, waiting for the next chunk
        self._head = np.zeros(0, np.float32)  # the next chunk's first samples, while fewer than the tail

    def feed(self, pcm: np.ndarray) -> np.ndarray:
        """New samples of the current chunk -> samples ready to play."""
        pcm = np.asarray(pcm, np.float32)
        if self._tail is not None:
            self._head = np.concatenate([self._head, pcm])
            if len(self._head) < len(self._tail):
                return np.zeros(0, np.float32)
            pcm = self._join()
        buffered = np.concatenate([self._held, pcm])
        cut = max(len(buffered) - self._overlap, 0)
        self._held = buffered[cut:]
        return buffered[:cut]

    def boundary(self) -> None:
        """The current chunk has ended; what follows belongs to the next one."""
        if self._tail is not None:  # the chunk gave less audio than one overlap: join what there is
            self._held = self._join()
        self._tail, self._held = self._held, np.zeros(0, np.float32)

    def flush(self) -> np.ndarray:
        """Everything still held, at the end of the stream."""
        out = self._join() if self._tail is not None else self._held
        self._held = np.zeros(0, np.float32)
        return out

    def _join(self) -> np.ndarray:
        tail, head = self._tail, self._head
        n = min(len(tail), len(head))
        fade_in = (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32) if n else np.zeros(0)
        mixed = tail[len(tail) - n:] * (1 - fade_in) + head[:n] * fade_in
        self._tail, self._head = None, np.zeros(0, np.float32)
        return np.concatenate([tail[:len(tail) - n], mixed, head[n:]]).astype(np.float32)
