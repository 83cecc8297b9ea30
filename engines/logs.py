"""How every command logs: `python -m engines.generate`, `engines.trt.build`, `engines.trt.check`,
`serve` and its Ray Serve replicas write the same line format to stderr."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int = logging.INFO) -> None:
    """Root logger at `level` (a name such as "info", or a logging constant) in LOG_FORMAT."""
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, format=LOG_FORMAT)
