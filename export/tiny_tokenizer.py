"""A small Llama-3-style `tokenizer.json` for the tiny checkpoints (no download, deterministic bytes).

Same structure as the real Llama-3 / Higgs tokenizer: byte-level BPE with the Llama-3 split
regex, `ignore_merges`, a ByteLevel decoder, and all 256 special tokens at 128000..128255 with
their Higgs names (spec llm.md §4). The regular vocabulary is small: the 256 byte tokens at
0..255 in GPT-2 byte order (as in Llama-3: "\\n" = 198, " " = 220), merges learned from a short
built-in English text, and the header words at their real ids (`system` 9125, `user` 882,
`assistant` 78191, "\\n\\n" 271), so prompts have the real structure (spec §7.10).

The special tokens are also entries of the BPE vocabulary: `tokenizers` numbers added tokens
that the model does not know from the model's vocabulary size, which here is far below 128000.

    python -m export.tiny_tokenizer --out build/tokenizer.json
"""

from __future__ import annotations

import argparse
import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path

from tokenizers import Regex, pre_tokenizers

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
FIRST_SPECIAL_ID = 128000
NUM_SPECIAL = 256
FIXED_IDS = {"system": 9125, "user": 882, "assistant": 78191, "ĊĊ": 271}  # byte-level strings
MAX_MERGES = 3000

_NAMED_SPECIALS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
    128010: "<|python_tag|>",
    128011: "<|audio_bos|>",
    128012: "<|audio_eos|>",
    128013: "<|audio_out_bos|>",
    128015: "<|AUDIO|>",
    128016: "<|AUDIO_OUT|>",
    128017: "<|recipient|>",
    128018: "<|scene_desc_start|>",
    128019: "<|scene_desc_end|>",
    128020: "<|generation_instruction_start|>",
    128021: "<|generation_instruction_end|>",
    128022: "<SE>",
    128023: "</SE>",
    128024: "<SE_s>",
    128025: "</SE_s>",
    128026: "<SE_e>",
    128027: "</SE_e>",
}

_CORPUS = """\
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
Generate audio following instruction. The user sends a message and the assistant answers
with speech; the system prompt describes the scene, the speakers and the recording.
Audio is recorded in a quiet room. A man speaks in a warm and calm voice; a woman answers
with a bright, clear and friendly voice. They talk about the weather, the news, music and
the plans for the weekend, and they laugh together at the end of the story.
Hello, how are you today? I'm fine, thank you. It's a beautiful morning, isn't it?
We'll meet at the station at half past seven, and then we're going to the museum.
Speech synthesis turns written text into spoken words. A text to speech model reads the
transcript, predicts audio tokens one step at a time, and a codec decodes them to a waveform
at twenty four thousand samples per second. Each second of audio has twenty five frames,
and every frame has eight codebooks. The model was trained on millions of hours of speech
in many languages, with different speakers, emotions, accents and speaking styles.
Please read the following sentence slowly and clearly: "Numbers like 1, 22, 333 and 2024
should be spoken as words, and dates like March 3rd or the 21st of June as well."
The weather today is sunny with a few clouds, and the temperature is around twenty degrees.
Tomorrow it will rain in the morning, but the afternoon should be dry and warm again.
Once upon a time there was a little girl who lived in a village near the forest.
Every day she walked to her grandmother's house, singing songs and picking flowers.
One day she met a wolf, who asked her where she was going. She told him the truth.
Thank you for calling. Your call is important to us. Please hold the line, and an agent
will be with you shortly. You can also visit our website for more information.
SPEAKER0: Good evening, everyone, and welcome to the show.
SPEAKER1: Thanks for having me. It is great to be here with you tonight.
People often say that the best way to learn something new is to practice a little every day.
Read the question, think about the answer, and then write it down in your own words.
The children played in the garden while their parents were cooking dinner in the kitchen.
After the meeting, the team went out for lunch and talked about the next project together.
Would you like some coffee or tea? There is also fresh water, juice and a piece of cake.
The train leaves from platform four at nine o'clock, so please don't be late this time.
Our company builds tools that help people communicate, create and share their ideas.
"""


def write_tiny_tokenizer(path: str | Path) -> Path:
    """Write the tiny tokenizer.json to `path` (a file path; parents are created). Returns it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(tiny_tokenizer_spec(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def tiny_tokenizer_spec() -> dict:
    """The tokenizer.json content as a dict (deterministic)."""
    alphabet = _byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = _learn_merges(_corpus_words(), MAX_MERGES)
    for word in FIXED_IDS:  # make the header words reachable by merges too, as in a real BPE
        merges += [m for m in _chain_merges(word) if m not in merges]
    free = (i for i in range(len(alphabet), FIRST_SPECIAL_ID) if i not in FIXED_IDS.values())
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = FIXED_IDS.get(a + b) or next(free)
    specials = special_tokens()
    vocab.update({name: i for i, name in specials.items()})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, name in specials.items()
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {
                    "type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                               {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                             {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                             {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [FIRST_SPECIAL_ID],
                                                             "tokens": ["<|begin_of_text|>"]}},
                },
            ],
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }


def special_tokens() -> dict[int, str]:
    """Id -> name of the 256 special tokens (Llama-3.1 names, Higgs names at 128011..128027)."""
    names = {}
    for i in range(FIRST_SPECIAL_ID, FIRST_SPECIAL_ID + NUM_SPECIAL):
        if i in _NAMED_SPECIALS:
            names[i] = _NAMED_SPECIALS[i]
        else:  # Llama-3.1 numbering: 128002, 128003, 128005 are 0, 1, 2; from 128011 on, id - 128008
            n = {128002: 0, 128003: 1, 128005: 2}.get(i, i - 128008)
            names[i] = f"<|reserved_special_token_{n}|>"
    return names


def _byte_alphabet() -> list[str]:
    """The 256 byte-level characters in GPT-2 order (printable bytes first, as Llama-3 ids 0..255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [mapping[b] for b in printable + others]


def _corpus_words() -> Counter:
    splitter = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return Counter(piece for piece, _ in splitter.pre_tokenize_str(_CORPUS))


def _learn_merges(words: Counter, limit: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair), count >= 2."""
    seqs = [list(w) for w in words]
    freqs = list(words.values())
    counts: Counter = Counter()
    where: defaultdict = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    merges = []
    while heap and len(merges) < limit:
        neg, pair = heapq.heappop(heap)
        if counts[pair] != -neg:
            continue  # stale entry
        if -neg < 2:
            break
        merges.append(pair)
        for i in sorted(where.pop(pair)):
            old = seqs[i]
            new, j = [], 0
            while j < len(old):
                if j + 1 < len(old) and (old[j], old[j + 1]) == pair:
                    new.append(old[j] + old[j + 1])
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            if len(new) == len(old):
                continue
            touched = set(zip(old, old[1:])) | set(zip(new, new[1:]))
            for p in zip(old, old[1:]):
                counts[p] -= freqs[i]
            for p in zip(new, new[1:]):
                counts[p] += freqs[i]
                where[p].add(i)
            for p in sorted(touched - {pair}):
                heapq.heappush(heap, (-counts[p], p))
            seqs[i] = new
        counts.pop(pair, None)
    return merges


def _chain_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build `word` from its characters."""
    return [(word[:i], word[i]) for i in range(1, len(word))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="tokenizer.json path to write")
    print(write_tiny_tokenizer(parser.parse_args().out))


if __name__ == "__main__":
    main()
