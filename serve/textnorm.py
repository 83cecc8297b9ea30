"""Text normalisation of the text to speak, as upstream's generation example does it before prompting
(boson-ai/higgs-audio examples/generation.py `main` and `normalize_chinese_punctuation`, spec llm.md
§5.1): Chinese punctuation to ASCII, parentheses dropped, °F / °C spelled out, `[laugh]`-style tags to
sound-event tags, whitespace collapsed per line (blank lines dropped), and a final full stop when the
text ends without closing punctuation.

The sound-event tags (`<SE>` ... `</SE_e>`, ids 128022-128027) are written into the text as upstream
does; the prompt renderer keeps exactly these tags as tokens in content text (engines/prompt.py
`PromptRenderer.encode_text`), so the normalised text tokenizes to upstream's ids.
"""

from __future__ import annotations

# upstream's table, in its order (the replacements run one after another)
_PUNCTUATION = {
    "，": ", ", "。": ".", "：": ":", "；": ";", "？": "?", "！": "!", "（": "(", "）": ")", "【": "[", "】": "]",
    "《": "<", "》": ">", "“": '"', "”": '"', "‘": "'", "’": "'", "、": ",", "—": "-", "…": "...", "·": ".",
    "「": '"', "」": '"', "『": '"', "』": '"',
}
_SPELLED = (("(", " "), (")", " "), ("°F", " degrees Fahrenheit"), ("°C", " degrees Celsius"))
_SOUND_EVENTS = (
    ("[laugh]", "<SE>[Laughter]</SE>"), ("[humming start]", "<SE_s>[Humming]</SE_s>"),
    ("[humming end]", "<SE_e>[Humming]</SE_e>"), ("[music start]", "<SE_s>[Music]</SE_s>"),
    ("[music end]", "<SE_e>[Music]</SE_e>"), ("[music]", "<SE>[Music]</SE>"), ("[sing start]", "<SE_s>[Singing]</SE_s>"),
    ("[sing end]", "<SE_e>[Singing]</SE_e>"), ("[applause]", "<SE>[Applause]</SE>"),
    ("[cheering]", "<SE>[Cheering]</SE>"), ("[cough]", "<SE>[Cough]</SE>"),
)
# upstream adds "." unless the text ends with one of these (not after "</SE_s>")
_CLOSING = (".", "!", "?", ",", ";", '"', "'", "</SE_e>", "</SE>")


def normalize(text: str) -> str:
    """The text to speak, normalised as upstream's generation example does, step for step."""
    for old, new in (*_PUNCTUATION.items(), *_SPELLED, *_SOUND_EVENTS):
        text = text.replace(old, new)
    text = "\n".join(" ".join(line.split()) for line in text.split("\n") if line.strip()).strip()
    return text if text.endswith(_CLOSING) else text + "."
