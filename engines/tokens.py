"""Higgs Audio v2's token ids (spec llm.md §4): the one place their values are written down.

A checkpoint's config.json is the source of truth: `export/config.py` reads the ids from it and
falls back to these values where a layout leaves one out; `make export` writes them into the
manifest, and `engines.manifest.ModelSpec` carries them to the runtimes and the decode loop. The
prompt renderer checks that a tokenizer.json gives its structural tokens these ids.
"""

# Llama 3 text vocabulary: the chat structure
BEGIN_OF_TEXT = 128000  # <|begin_of_text|>, also the BOS the passengers of a text step feed
END_OF_TEXT = 128001  # <|end_of_text|>, always a stop (spec §5.7)
START_HEADER = 128006
END_HEADER = 128007
EOM = 128008  # <|eom_id|>, ends an assistant turn another assistant turn follows
EOT = 128009  # <|eot_id|>, ends a turn

# Higgs Audio's audio tokens in the text vocabulary
AUDIO_BOS = 128011  # <|audio_bos|>, before an input <|AUDIO|>
AUDIO_EOS = 128012  # <|audio_eos|>, closes an audio segment; emitted when the EOS ramp-out ends
AUDIO_OUT_BOS = 128013  # <|audio_out_bos|>, starts an audio-out segment (AUDIO_INIT)
AUDIO_IN = 128015  # <|AUDIO|>
AUDIO_OUT = 128016  # <|AUDIO_OUT|>, placeholder / text token of every audio step

TOKEN_NAMES = {
    "<|begin_of_text|>": BEGIN_OF_TEXT,
    "<|end_of_text|>": END_OF_TEXT,
    "<|start_header_id|>": START_HEADER,
    "<|end_header_id|>": END_HEADER,
    "<|eom_id|>": EOM,
    "<|eot_id|>": EOT,
    "<|audio_bos|>": AUDIO_BOS,
    "<|audio_eos|>": AUDIO_EOS,
    "<|audio_out_bos|>": AUDIO_OUT_BOS,
    "<|AUDIO|>": AUDIO_IN,
    "<|AUDIO_OUT|>": AUDIO_OUT,
}

# Audio codebooks: real codes are 0 .. CODEBOOK_SIZE - 1, then two stream ids per codebook
CODEBOOK_SIZE = 1024
STREAM_BOS = CODEBOOK_SIZE  # audio_stream_bos_id: opens every codebook row of a segment
STREAM_EOS = CODEBOOK_SIZE + 1  # audio_stream_eos_id: closes it
