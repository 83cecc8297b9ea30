"""The user-facing commands: make export / verify / check-onnx pass on good inputs, fail loudly on bad ones."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from goldens import GOLDEN_ROOT, requires_golden


def command(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


@requires_golden
def test_verify_passes_on_the_golden_checkpoint_with_graphs_and_loop(golden_artifacts):
    result = command("export.verify", "--checkpoint", str(GOLDEN_ROOT / "llm_tiny_eos3"),
                     "--golden", str(GOLDEN_ROOT / "llm_tiny_eos3" / "cases.npz"), "--artifacts", str(golden_artifacts("llm_tiny_eos3")))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("overall max abs error:") and float(lines[-1].split()[-1]) <= 1e-4
    assert sum(line.startswith(("torch ", "onnx ", "loop ")) for line in lines) == 16


@requires_golden
def test_verify_fails_on_the_wrong_checkpoint():
    result = command("export.verify", "--checkpoint", str(GOLDEN_ROOT / "llm_tiny"),
                     "--golden", str(GOLDEN_ROOT / "llm_tiny_eos3" / "cases.npz"))
    assert result.returncode == 1 and "FAIL" in result.stdout


@requires_golden
def test_verify_codec_golden():
    result = command("export.verify", "--checkpoint", str(GOLDEN_ROOT / "codec_tiny"), "--golden", str(GOLDEN_ROOT / "codec_tiny"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch enc_N24300_codes" in result.stdout


def test_check_onnx_passes_and_bites(tiny_artifacts, tiny_checkpoint, tmp_path):
    good = command("export.check_onnx", "--artifacts", str(tiny_artifacts), "--checkpoint", str(tiny_checkpoint / "llm"),
                   "--codec", str(tiny_checkpoint / "codec"))
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count("$ polygraphy run") == 4
    perturbed = tmp_path / "llm"
    shutil.copytree(tiny_checkpoint / "llm", perturbed)
    tensors = load_file(perturbed / "model.safetensors")
    tensors["layers.0.audio_mlp.down_proj.weight"] *= 1.01
    save_file(tensors, perturbed / "model.safetensors")
    bad = command("export.check_onnx", "--artifacts", str(tiny_artifacts), "--checkpoint", str(perturbed))
    assert bad.returncode == 1 and "MISMATCH" in bad.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "/nonexistent", "--out", "x"], "not a directory"),
        (["--checkpoint", ".", "--out", "x"], "config.json"),
    ],
)
def test_export_explains_bad_paths(args, message, tmp_path):
    result = command("export", *args)
    assert result.returncode == 2 and message in result.stderr
