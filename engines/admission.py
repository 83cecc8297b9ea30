"""What the decode loop checks when a request is submitted, so that a bad request fails in the caller.

`prepare` validates the sampling values and stop strings, renders the prompt and fits the
generation into the KV cache. The max_tokens policy lives here, in one place: no max_tokens means
what fits; a max the server defaulted (`SpeechRequest.max_tokens_defaulted`) is lowered to the room
the prompt leaves; a max the client chose that does not fit is refused (a 400 in the server).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .api import SpeechRequest
from .manifest import ModelSpec
from .prompt import ExpandedPrompt, PromptRenderer, StopMatcher, expand_prompt
from .sampling import check_params


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request ready for a decode slot."""

    prompt: ExpandedPrompt
    max_tokens: int  # generation steps it may take; they fit beside the prompt
    stop: StopMatcher


def prepare(request: SpeechRequest, spec: ModelSpec, renderer: PromptRenderer | None, capacity: int) -> Prepared:
    """Everything that can fail because of the request itself. `capacity`: positions one sequence may hold."""
    check_params(request.sampling)
    stop_strings = dict.fromkeys((*request.stop_strings, "<|end_of_text|>"))  # EOS always stops (spec §5.7)
    stop = StopMatcher(renderer.tokenizer if renderer else None, stop_strings, spec.stop_token_ids)
    prompt = render(request, spec, renderer)
    return Prepared(prompt, fit_max_tokens(request, len(prompt.input_ids), capacity), stop)


def render(request: SpeechRequest, spec: ModelSpec, renderer: PromptRenderer | None) -> ExpandedPrompt:
    """The prompt as the backbone prefills it: rendered messages, or the request's own ids."""
    if request.prompt_ids is not None:
        ids, segments = np.asarray(request.prompt_ids, np.int64), list(request.prompt_audio)
    else:
        if renderer is None:
            raise ValueError("these artifacts have no tokenizer.json, so text prompts cannot be rendered")
        rendered = renderer.render(request.messages, force_audio=request.force_audio)
        ids, segments = rendered.ids, rendered.audio_segments
    if len(ids) == 0:
        raise ValueError("empty prompt")
    if ids[-1] == spec.audio_out_token_id:
        raise ValueError("prompts that end inside an audio segment (continuations) are not supported")
    return expand_prompt(ids, segments, spec.audio_out_token_id, spec.num_codebooks)


def fit_max_tokens(request: SpeechRequest, prompt_length: int, capacity: int) -> int:
    """The generation steps a request gets beside a prompt of `prompt_length` positions."""
    room = capacity - prompt_length
    wanted = request.max_tokens
    if room < 1:  # whatever the max, nothing fits: the message must not blame a max the client never sent
        raise ValueError(f"prompt ({prompt_length} positions) leaves no room in the KV cache of {capacity} "
                         "positions; shorten the input")
    if wanted is not None and wanted > room and not request.max_tokens_defaulted:
        raise ValueError(
            f"prompt ({prompt_length} positions) + max_tokens ({wanted}) exceeds the "
            f"KV cache of {capacity} positions; shorten the input or lower max_tokens"
        )
    if wanted is not None and wanted < 1:
        raise ValueError("max_tokens must be at least 1")
    return room if wanted is None else min(wanted, room)
