"""Session fixtures: the tiny default model and the goldens' checkpoints, exported once per test run.

Everything is built from scratch (export.tiny + make export's code path) into a temporary folder,
so a fresh clone tests exactly what it ships. HIGGS_TEST_ARTIFACTS=DIR reuses an existing tiny
export (for quick local iterations; CI never sets it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (goldens, serve_support, ...)

from goldens import LLM_GOLDEN_DIRS  # noqa: E402


def _export(checkpoint: Path, codec: Path | None, out: Path) -> Path:
    from export.__main__ import run

    run(checkpoint, codec, out, "float32")
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """DIR with llm/ and codec/ as `make tiny` writes them."""
    from export.tiny import write_llm
    from export.tiny_codec import write_tiny_codec

    root = tmp_path_factory.mktemp("tiny")
    write_llm(root / "llm", "tiny", seed=0, log=lambda *_: None)
    write_tiny_codec(root / "codec", seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_checkpoint) -> Path:
    if os.environ.get("HIGGS_TEST_ARTIFACTS"):
        return Path(os.environ["HIGGS_TEST_ARTIFACTS"])
    return _export(tiny_checkpoint / "llm", tiny_checkpoint / "codec", tmp_path_factory.mktemp("tiny-onnx"))


@pytest.fixture(scope="session")
def golden_artifacts(tmp_path_factory):
    """name -> artifacts exported from that golden's checkpoint (backbone only), built on first use."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            source = LLM_GOLDEN_DIRS.get(name)
            if source is None:
                pytest.skip(f"golden {name} not found (set HIGGS_GOLDEN to the shared/golden folder)")
            built[name] = _export(source, None, tmp_path_factory.mktemp(f"{name}-onnx"))
        return built[name]

    return get
