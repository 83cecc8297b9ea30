"""bench/sections/host.py ("host overhead per step") drives the real Engine: the zero-cost runtime and the
sampler stand-in keep every request in its audio segment through the timed steps. Nothing is timed here."""

import numpy as np
import pytest

from bench.sections.host import host_step_seconds, sampling_modes, zero_cost_sampler
from engines.manifest import Manifest
from engines.prompt import PromptRenderer
from engines.sampling import HostSampler


@pytest.mark.parametrize("mode", list(sampling_modes()))
def test_zero_cost_engine_runs_every_timed_step_in_audio(tiny_artifacts, mode):
    manifest = Manifest.load(tiny_artifacts)
    renderer = PromptRenderer(manifest.tokenizer, manifest.model.num_codebooks)
    params = sampling_modes()[mode]
    for sampler in (None, HostSampler()):  # raises if a request left its audio segment before the end
        wall, cpu = host_step_seconds(manifest, 2, params, renderer, sampler)
        assert wall > 0 and cpu > 0


def test_sampler_stand_in_goes_through_graph_sampler(tiny_artifacts):
    sampler = zero_cost_sampler(Manifest.load(tiny_artifacts))
    codes, redraw = sampler(np.zeros((3, 8, 1026), np.float32), np.ones(3), np.zeros(3, int), np.ones(3), np.zeros((3, 2, 8)))
    assert codes.shape == (3, 8) and codes.max() < 1024
    assert redraw(np.eye(3, 8, dtype=bool)).shape == (3,)
