"""The benchmark's build folder: fresh random checkpoints, their exports and codecs, each built once.

Every build is a child process (`python -m export ...`, `python -m bench._child ...`), so its wall
time and peak RSS are its own (`Workspace.builds`), and a crash in one leaves the run going: the
sections that need it report the reason. Builds are cached per run, and across runs in a `--keep`
folder (a `.done-NAME` marker per finished build).
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from .profiling import ChildResult, run_measured

Log = Callable[[str], None]
REPO = Path(__file__).resolve().parent.parent


class BuildError(RuntimeError):
    pass


class Workspace:
    """Builds what the sections need under `root`, each thing once (thread-safe, so independent
    builds can run side by side before any timing starts)."""

    def __init__(self, root: Path, log: Log, reuse: bool = False):
        self.root = root
        self.reuse = reuse
        self.log = log
        self.python = sys.executable
        self.builds: dict[str, dict] = {}  # key -> {"seconds", "peak_rss"}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._done: dict[str, Path | Exception] = {}

    def _once(self, key: str, build: Callable[[], Path]) -> Path:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            marker = self.root / f".done-{key}"
            if key not in self._done and self.reuse and marker.is_file():  # --keep DIR from an earlier run
                self._done[key] = Path(marker.read_text())
                self.log(f"reusing {self._done[key]}")
            if key not in self._done:
                try:
                    self._done[key] = build()
                    marker.write_text(str(self._done[key]))
                except Exception as error:  # remembered: the sections that need it report it, once each
                    self._done[key] = error
            if isinstance(self._done[key], Exception):
                raise self._done[key]
            return self._done[key]

    def child(self, key: str, args: list[str], echo: bool = True) -> ChildResult:
        """Run `python args...` in the repository root, echoing its progress lines."""

        def on_line(line: str) -> None:
            if echo and line.startswith("[") and not line.startswith("[W"):
                self.log(f"  {key}: {line}")

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args[0] == "-m" and args[1] != "bench._child":
            args = ["-m", "bench._peak", *args[1:]]  # reports the module's own peak RSS at exit
        result = run_measured([self.python, *args], cwd=REPO, env=env, on_line=on_line)
        if not result.ok:
            raise BuildError(f"{key}: `python {' '.join(args)}` exited {result.returncode}:\n{result.tail()}")
        self.builds[key] = {"seconds": result.seconds, "peak_rss": result.peak_rss}
        return result

    def made_by_child(self, name: str, message: str, command: Callable[[Path], list[str]], inside: str = "") -> Path:
        """ROOT/name/inside, built once by the child process `python command(ROOT/name)...` (logged as
        `message`); `command` builds what it reads first."""

        def build():
            out = self.root / name
            args = command(out)
            self.log(message)
            self.child(name, args)
            return out / inside

        return self._once(name, build)

    def checkpoint(self, size: str) -> Path:
        """Random LLM checkpoint (export.tiny, bf16 safetensors) -> DIR/llm."""
        return self.made_by_child(f"ckpt-{size}", f"building random {size} checkpoint",
                                  lambda out: ["-m", "export.tiny", "--out", str(out), "--size", size, "--no-codec"], "llm")

    def artifacts(self, size: str) -> Path:
        """float32 backbone export of the random `size` checkpoint (no codec graphs)."""
        return self.made_by_child(f"onnx-{size}-float32", f"exporting {size} (float32)",
                                  lambda out: ["-m", "export", "--checkpoint", str(self.checkpoint(size)), "--out", str(out),
                                               "--dtype", "float32"])

    def quantized(self, size: str, scheme: str) -> Path:
        """The float32 export of `size`, or its `scheme` (int8 | int4) quantization (python -m export.quantize)."""
        if scheme == "float32":
            return self.artifacts(size)
        bits = {"int8": "8", "int4": "4"}[scheme]
        return self.made_by_child(f"onnx-{size}-{scheme}", f"quantizing {size} to {scheme}",
                                  lambda out: ["-m", "export.quantize", "--artifacts", str(self.artifacts(size)), "--out", str(out),
                                               "--bits", bits])

    def streamed(self, size: str, scheme: str) -> Path:
        """`scheme` (int8 | int4) exported straight from the random `size` checkpoint (export/streamed.py,
        one weight tensor in RAM at a time) without the float32 reference in OUT/float32: a 3B's is 23 GB,
        and `quantized` would first export all of it in float32."""
        return self.made_by_child(f"onnx-{size}-{scheme}-streamed", f"exporting {size} ({scheme}, streamed)",
                                  lambda out: ["-m", "export", "--checkpoint", str(self.checkpoint(size)), "--out", str(out),
                                               "--dtype", scheme, "--no-float32-reference"])

    def codec(self, size: str) -> Path:
        """Random codec checkpoint of export.tiny_codec's `size`."""
        return self.made_by_child(f"codec-{size}", f"writing random {size} codec",
                                  lambda out: ["-m", "bench._child", "write-codec", str(out), size])

    def codec_graphs(self, size: str) -> Path:
        """DIR with codec_decoder.onnx (+ codec_encoder.onnx) and the listing bench._child writes."""
        return self.made_by_child(f"codec-{size}-onnx", f"exporting {size} codec graphs",
                                  lambda out: ["-m", "bench._child", "export-codec", str(self.codec(size)), str(out)])

    def prebuild(self, chains: list[list[Callable[[], Path]]]) -> None:
        """Run independent build chains side by side (before anything is timed)."""
        chains = [c for c in chains if c]
        if not chains:
            return
        with ThreadPoolExecutor(max_workers=len(chains)) as pool:
            futures = [pool.submit(self._chain, c) for c in chains]
            for future in futures:
                future.result()

    def _chain(self, steps: list[Callable[[], Path]]) -> None:
        for step in steps:
            try:
                step()
            except Exception as error:  # the sections that need it fail with this reason later
                self.log(f"build failed: {str(error).splitlines()[0]}")
