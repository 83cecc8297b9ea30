"""Built-in voices: OpenAI's voice names as speaker descriptions, so that every OpenAI TTS client works
against a server started with no options.

A built-in voice needs no reference clip. It steers the voice the way upstream does without one: a
`SPEAKER0: <description>` line in the system prompt's scene block (boson-ai/higgs-audio
examples/generation.py, `profile:` speakers from examples/voice_prompts/profile.yaml, and the serve
engine's zero-shot sample "SPEAKER0: british accent"). The descriptions are ours, written in the style of
upstream's profiles and chosen to differ in gender, age, timbre and pace. The model samples a voice that
fits the description, so a given voice sounds the same across requests only with a fixed `seed`.

A preset or a `--voice-alias` of the same name takes precedence (serve/voices.py).
"""

from __future__ import annotations

BUILTIN_VOICES = {
    "alloy": "Androgynous adult voice, American accent, moderate pitch, balanced and even tone, modern speaking "
             "rate, and very clear audio.",
    "ash": "Male, young adult, American accent, slightly low pitch, warm and slightly raspy timbre, relaxed "
           "conversational pace, and very clear audio.",
    "ballad": "Male, middle-aged, British accent, soft and melodic voice, moderate pitch, gentle and expressive "
              "tone, slow measured pace, and very clear audio.",
    "coral": "Female, young adult, American accent, bright and cheerful voice, moderately high pitch, lively "
             "pace, and very clear audio.",
    "echo": "Male, adult, American accent, calm and resonant voice, moderately low pitch, steady measured pace, "
            "and very clear audio.",
    "fable": "Male, young adult, British accent, animated storytelling voice, moderate pitch, expressive tone, "
             "modern speaking rate, and very clear audio.",
    "nova": "Female, young adult, American accent, energetic and friendly voice, high pitch, fast speaking rate, "
            "and very clear audio.",
    "onyx": "Male, mature adult, American accent, deep and authoritative voice, low pitch, slow deliberate pace, "
            "and very clear audio.",
    "sage": "Female, middle-aged, American accent, calm and thoughtful voice, moderate pitch, gentle and "
            "informative tone, measured pace, and very clear audio.",
    "shimmer": "Female, adult, American accent, soft and airy voice, moderately high pitch, warm and gentle tone, "
               "relaxed pace, and very clear audio.",
    "verse": "Male, adult, American accent, dynamic voice with varied intonation, moderate pitch, expressive "
             "tone, modern speaking rate, and very clear audio.",
    "marin": "Female, adult, American accent, clear professional voice, moderate pitch, confident and friendly "
             "tone, modern speaking rate, and very clear audio.",
    "cedar": "Male, adult, American accent, warm and grounded voice, moderately low pitch, natural "
             "conversational tone, modern speaking rate, and very clear audio.",
}
