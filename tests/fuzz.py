"""`make fuzz`: schemathesis, with all of its checks, against a live server on the tiny model.

The server runs as `python -m serve` (the real CLI, real uvicorn) on a free localhost port with
an empty voices directory and max_completion_tokens capped at 8, so that every generation the
fuzzer starts ends in a fraction of a second. The run is bounded by --max-time. Exit status:
schemathesis's, or 1 when the server process died under the fuzzer.

    .venv/bin/python tests/fuzz.py --artifacts build/tiny-onnx --max-time 150
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench is not an installed package

from bench.common import free_port  # noqa: E402

CONFIG = Path(__file__).with_name("fuzz.toml").resolve()
WORK = Path("build/fuzz")  # schemathesis keeps its cache of found failures (replayed first) in its cwd


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: the server exited with status {server.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"error: {url}/health did not answer 200 within {timeout:g} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("build/tiny-onnx"))
    p.add_argument("--max-time", type=int, default=150, help="schemathesis time budget in seconds")
    args = p.parse_args(argv)
    if not (args.artifacts / "manifest.json").is_file():
        raise SystemExit(f"error: {args.artifacts}/manifest.json is missing: run `make tiny` and `make demo` first")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as voices:
        server = subprocess.Popen([sys.executable, "-m", "serve", "--artifacts", str(args.artifacts),
                                   "--port", str(port), "--voices", voices, "--max-completion-tokens", "8",
                                   "--log-level", "warning"])
        try:
            _wait_healthy(url, server, 180)
            WORK.mkdir(parents=True, exist_ok=True)
            status = subprocess.call([sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
                                      f"{url}/openapi.json", "--checks", "all", "--max-time", str(args.max_time)],
                                     cwd=WORK)
            if server.poll() is not None:
                print(f"error: the server died under the fuzzer (status {server.returncode})", file=sys.stderr)
                return 1
            return status
        finally:
            server.terminate()
            server.wait(60)


if __name__ == "__main__":
    sys.exit(main())
