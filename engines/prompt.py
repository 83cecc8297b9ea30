"""Prompt construction for Higgs Audio TTS (spec llm.md §5.1-5.2, §5.7 stop strings), no transformers.

`PromptRenderer.render` turns chat messages into token ids with one `<|AUDIO_OUT|>` placeholder per
assistant audio clip plus that clip's delayed codes; `expand_prompt` replaces every placeholder by
its code columns, giving the mixed text / audio sequence the backbone prefills.

Audio in a user or system message is rendered `<|audio_bos|><|AUDIO|><|audio_eos|>` and its codes
are not used: upstream's serve engine builds its collator without audio-in tokens, so the model
sees `<|AUDIO|>` as a plain text token there (spec §5.2). GEN's collator would expand it to codes,
but the serve engine is what this server reproduces. Voice cloning uses assistant audio (§5.2).

Content text is plain text (`PromptRenderer.encode_text`); structure inside a message, such as a
system prompt's scene block, comes as `SpecialToken` pieces (`structured` splits upstream's prompt
strings into them), each rendered as its one id.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer

from engines.api import AudioCodes, Content, Message, SpecialToken
from engines.delay import delay_pattern
from engines.tokens import AUDIO_OUT, CODEBOOK_SIZE, TOKEN_NAMES

ROLES = ("system", "user", "assistant")
AUDIO_IN_TEXT = "<|audio_bos|><|AUDIO|><|audio_eos|>"
AUDIO_OUT_TEXT = "<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>"
TTS_INSTRUCTION = "Generate audio following instruction."
SCENE_START = "<|scene_desc_start|>"
SCENE_END = "<|scene_desc_end|>"
SCENE_MARKERS = (SCENE_START, SCENE_END)
MULTISPEAKER_INSTRUCTION = (
    "You are an AI assistant designed to convert text into speech.\n"
    "If the user's message includes a [SPEAKER*] tag, do not read out the tag and generate speech for the "
    "following text, using the specified voice.\n"
    "If no speaker tag is present, select a suitable voice on your own."
)
_SPEAKER_TAG = re.compile(r"\[(SPEAKER\d+)\]")
SOUND_EVENT_TAGS = ("<SE>", "</SE>", "<SE_s>", "</SE_s>", "<SE_e>", "</SE_e>")  # spec §4, ids 128022-128027


@dataclasses.dataclass(frozen=True)
class RenderedPrompt:
    ids: np.ndarray  # int64 (L,): text ids, one AUDIO_OUT per assistant audio clip
    audio_segments: list[np.ndarray]  # int64 (N, T_j+N+1) delayed codes, one per AUDIO_OUT, in order


@dataclasses.dataclass(frozen=True)
class ExpandedPrompt:
    """The prompt as the backbone sees it: one position per text id or audio-out column."""

    input_ids: np.ndarray  # int64 (L,): text ids; AUDIO_OUT at audio positions (never embedded)
    audio_codes: np.ndarray  # int64 (L, N): the column at audio positions, 0 at text positions
    audio_mask: np.ndarray  # bool (L,): True at audio-out positions (routing + audio head)
    audio_history: np.ndarray  # int64 (N, C): every audio-out column in order (RAS window source)


class PromptRenderer:
    """ChatML rendering with upstream's per-piece tokenisation (spec §5.1)."""

    def __init__(self, tokenizer_json_path: str | Path, audio_num_codebooks: int = 8):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json_path))
        self.audio_num_codebooks = audio_num_codebooks
        for name, expected in TOKEN_NAMES.items():
            got = self.tokenizer.token_to_id(name)
            if got != expected:
                raise ValueError(f"{tokenizer_json_path}: {name} has id {got}, the model expects {expected}")
        self._special = {tok.content: i for i, tok in self.tokenizer.get_added_tokens_decoder().items() if tok.special}
        # A second tokenizer that reads special-token names as plain characters (tokenizers 0.23
        # `Tokenizer.encode_special_tokens`, tokenizer/mod.rs): the one for text from requests.
        self._plain = Tokenizer.from_str(self.tokenizer.to_str())
        self._plain.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        """One piece of the server's own structure (headers, placeholders, turn ends), without
        BOS: upstream encodes every piece with add_special_tokens=False."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """One piece of content text, without BOS. Deliberately unlike upstream, which parses
        special tokens everywhere: typing "<|eot_id|>" or "<|AUDIO_OUT|>" in a request gives those
        characters, never a turn end or an audio slot, so a caller cannot write prompt structure.
        Only the sound-event tags of spec §5.1 (<SE>, <SE_s>, <SE_e> and their closers) stay tokens,
        since text is meant to carry them; such text keeps upstream's ids (see `structured`)."""
        ids: list[int] = []
        for piece in structured(text, SOUND_EVENT_TAGS):
            if isinstance(piece, SpecialToken):
                ids.append(self._special[piece.name])
            else:
                ids += self._plain.encode(piece, add_special_tokens=False).ids
        return ids

    def render(self, messages: Sequence[Message], force_audio: bool = True) -> RenderedPrompt:
        """Token ids of the messages plus the assistant generation header (and <|audio_out_bos|>
        when force_audio, as the serve engine's force_audio_gen)."""
        if not messages:
            raise ValueError("a prompt needs at least one message")
        ids: list[int] = []
        segments: list[np.ndarray] = []
        for i, message in enumerate(messages):
            if message.role not in ROLES:
                raise ValueError(f"message {i}: role must be one of {ROLES}, got {message.role!r}")
            header = f"<|start_header_id|>{message.role}<|end_header_id|>\n\n"
            ids += self.encode(("<|begin_of_text|>" if i == 0 else "") + header)
            for piece in message.content:
                if isinstance(piece, str):
                    ids += self.encode_text(piece)
                elif isinstance(piece, AudioCodes):
                    codes = self._check_codes(piece.codes, i)
                    if message.role == "assistant":
                        ids += self.encode(AUDIO_OUT_TEXT)
                        segments.append(delay_pattern(codes))
                    else:
                        ids += self.encode(AUDIO_IN_TEXT)
                elif isinstance(piece, SpecialToken):
                    if piece.name not in self._special:
                        raise ValueError(f"message {i}: {piece.name!r} is not a special token of this tokenizer")
                    ids.append(self._special[piece.name])
                else:
                    raise TypeError(f"message {i}: content must be str, AudioCodes or SpecialToken, "
                                    f"got {type(piece).__name__}")
            next_is_assistant = i + 1 < len(messages) and messages[i + 1].role == "assistant"
            ids += self.encode("<|eom_id|>" if message.role == "assistant" and next_is_assistant else "<|eot_id|>")
        suffix = "<|start_header_id|>assistant<|end_header_id|>\n\n" + ("<|audio_out_bos|>" if force_audio else "")
        ids += self.encode(suffix)
        return RenderedPrompt(np.asarray(ids, dtype=np.int64), segments)

    def _check_codes(self, codes: np.ndarray, index: int) -> np.ndarray:
        c = np.asarray(codes)
        if c.ndim != 2 or c.shape[0] != self.audio_num_codebooks or not np.issubdtype(c.dtype, np.integer):
            want = f"({self.audio_num_codebooks}, frames)"
            raise ValueError(f"message {index}: audio codes must be integer {want}, got {c.dtype} {c.shape}")
        if c.size and (c.min() < 0 or c.max() >= CODEBOOK_SIZE):
            raise ValueError(f"message {index}: audio codes must lie in [0, {CODEBOOK_SIZE - 1}]")
        return c


def expand_prompt(
    ids: np.ndarray, audio_segments: Sequence[np.ndarray], audio_out_id: int = AUDIO_OUT, num_codebooks: int = 8
) -> ExpandedPrompt:
    """Replace the j-th `audio_out_id` in ids by the columns of audio_segments[j] (spec §3.1)."""
    ids = np.asarray(ids, dtype=np.int64)
    placeholder = ids == audio_out_id
    if int(placeholder.sum()) != len(audio_segments):
        raise ValueError(f"{int(placeholder.sum())} audio-out placeholders but {len(audio_segments)} audio segments")
    segments = [np.asarray(s, dtype=np.int64) for s in audio_segments]
    if any(s.ndim != 2 or s.shape[0] != num_codebooks for s in segments):
        raise ValueError(f"audio segments must be ({num_codebooks}, columns), got {[s.shape for s in segments]}")
    counts = np.ones(ids.size, np.int64)
    counts[placeholder] = [s.shape[1] for s in segments]
    mask = np.repeat(placeholder, counts)
    history = np.concatenate(segments, axis=1) if segments else np.zeros((num_codebooks, 0), np.int64)
    codes = np.zeros((mask.size, num_codebooks), np.int64)
    codes[mask] = history.T
    return ExpandedPrompt(np.repeat(ids, counts), codes, mask, history)


def tts_messages(
    text: str,
    scene: str | None = None,
    references: Iterable[tuple[str, np.ndarray | AudioCodes]] = (),
    system: str | None = None,
    speakers: Sequence[str] | None = None,
) -> list[Message]:
    """Messages for one TTS request, following upstream examples/generation.py.

    references: (transcript, codes (N, T)) pairs, rendered as user(transcript) / assistant(audio)
    turns before the target (voice cloning, spec §5.2); with several, transcripts get a
    "[SPEAKER{i}] " prefix. System message: `system` verbatim if given; else with references the
    scene block alone (none without a scene); else for a multi-speaker text (several [SPEAKERi]
    tags, or `speakers` descriptions) the multi-speaker instruction with "SPEAKERi: description"
    lines in the scene block (default descriptions alternate feminine / masculine, as upstream);
    else the TTS instruction, plus the scene block when a scene is given.
    """
    refs = [(t, c if isinstance(c, AudioCodes) else AudioCodes(np.asarray(c))) for t, c in references]
    if speakers and refs:
        raise ValueError("speaker descriptions are for prompts without reference audio")
    if system is None:
        system = _system_prompt(text, scene, bool(refs), speakers)
    messages = [] if system is None else [Message("system", structured(system, SCENE_MARKERS))]
    for i, (transcript, codes) in enumerate(refs):
        messages.append(Message("user", (f"[SPEAKER{i}] {transcript}" if len(refs) > 1 else transcript,)))
        messages.append(Message("assistant", (codes,)))
    messages.append(Message("user", (text,)))
    return messages


def structured(text: str, names: Sequence[str]) -> tuple[Content, ...]:
    """`text` as pieces: every occurrence of one of the special tokens `names` becomes a
    `SpecialToken`, the text around it stays plain text. Upstream tokenizes such a string in one call
    that parses special tokens; the tokenizer splits at special tokens before the pre-tokenizer runs
    (tokenizers 0.23 `AddedVocabulary::extract_and_normalize`, added_vocabulary.rs), so rendering
    these pieces one by one gives upstream's ids while nothing outside `names` can become structure."""
    parts = re.split("(" + "|".join(re.escape(n) for n in names) + ")", text)
    return tuple(SpecialToken(p) if p in names else p for p in parts if p)


def content_text(pieces: Iterable[Content]) -> str:
    """The text of pieces as upstream writes it (the inverse of `structured`); audio is left out."""
    return "".join(p if isinstance(p, str) else p.name for p in pieces if not isinstance(p, AudioCodes))


def scene_block(scene: str) -> str:
    return f"{SCENE_START}\n{scene}\n{SCENE_END}"


def _system_prompt(text: str, scene: str | None, has_refs: bool, speakers: Sequence[str] | None) -> str | None:
    block = scene_block(scene) if scene else None
    if has_refs:
        return f"{TTS_INSTRUCTION}\n\n{block}" if block else None
    tags = sorted(set(_SPEAKER_TAG.findall(text)))
    if speakers:
        lines = [f"SPEAKER{i}: {desc}" for i, desc in enumerate(speakers)]
    elif len(tags) > 1:
        lines = [f"{tag}: {'feminine' if i % 2 == 0 else 'masculine'}" for i, tag in enumerate(tags)]
    else:
        return "\n\n".join([TTS_INSTRUCTION] + ([block] if block else []))
    desc = "\n\n".join(([scene] if scene else []) + ["\n".join(lines)])
    return f"{MULTISPEAKER_INSTRUCTION}\n\n{scene_block(desc)}"


class StopMatcher:
    """Stop-string check after each generated text-side id (compressed list: one AUDIO_OUT per
    audio segment), spec §5.7. One matcher per request.

    A stop string that is exactly one special token matches that id. Any other stop string
    matches as soon as it occurs in the decoded text of the ids pushed so far (special tokens left
    out of the text, so e.g. "|" does not match inside "<|AUDIO_OUT|>"). Without a tokenizer
    (prompts given as ids) only the special tokens named in `special_ids` can be stop strings.
    """

    def __init__(
        self, tokenizer: Tokenizer | None, stop_strings: Iterable[str], special_ids: Mapping[str, int] | None = None
    ):
        self._tokenizer = tokenizer
        self._by_id: dict[int, str] = {}
        self._texts: list[str] = []
        if tokenizer is not None:
            special = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
        for s in stop_strings:
            if not s:
                raise ValueError("stop strings must not be empty")
            if tokenizer is None:
                if s not in (special_ids or {}):
                    raise ValueError(f"stop string {s!r} needs a tokenizer (only special tokens can stop without one)")
                self._by_id[special_ids[s]] = s
                continue
            ids = tokenizer.encode(s, add_special_tokens=False).ids
            if len(ids) == 1 and ids[0] in special:
                self._by_id[ids[0]] = s
            else:
                self._texts.append(s)
        self._ids: list[int] = []

    def push(self, token_id: int) -> str | None:
        """Record one generated text-side id; returns the stop string that now matches, if any."""
        if token_id in self._by_id:
            return self._by_id[token_id]
        self._ids.append(int(token_id))
        if self._texts:  # re-decode the whole list: decoding is not prefix-stable across UTF-8 splits
            text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
            for s in self._texts:
                if s in text:
                    return s
        return None
