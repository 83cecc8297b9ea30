"""One module per `make bench` section, each a `section_NAME(ws, cfg, log) -> Section` (bench/__main__.py lists them)."""
