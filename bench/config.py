"""The parameters of one `python -m bench` run: sizes, batches and rounds of each section."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Config:
    """What every section measures and how often (`Config.make(quick=True)` is the ~2 minute subset)."""

    quick: bool = False
    threads: int = 0  # 0: every core this process may use
    # section 1: decode steps
    step_sizes: tuple[str, ...] = ("tiny", "mid")
    step_batches: tuple[int, ...] = (1, 4)
    max_len: int = 1024
    context: int = 200
    step_rounds: int = 5
    step_threads: tuple[int, ...] = ()  # () = 1 and all cores
    block_seconds: float = 0.2  # one timed block of consecutive steps per round and engine
    # section 2: export / load
    export_size: str = "v2.5-1b"
    export_dtypes: tuple[str, ...] = ("bfloat16", "float16")
    # section 3: decode loop
    loop_sizes: tuple[str, ...] = ("tiny", "mid")
    loop_batches: tuple[int, ...] = (1, 4)
    max_tokens: int = 200
    loop_rounds: int = 3
    ttfa_codecs: tuple[str, ...] = ("tiny", "real")
    ttfa_rounds: int = 3
    # section 4: codec
    codec_sizes: tuple[str, ...] = ("tiny", "real")
    codec_audio_seconds: tuple[tuple[str, float], ...] = (("tiny", 10.0), ("real", 4.0))
    codec_rounds: int = 5
    # section 5: host overhead per step
    host_batches: tuple[int, ...] = (1, 8, 32, 64)
    host_rounds: int = 3

    @classmethod
    def make(cls, quick: bool, threads: int = 0) -> "Config":
        pinned = (threads,) if threads else ()
        if not quick:
            return cls(threads=threads, step_threads=pinned)
        return cls(
            quick=True,
            threads=threads,
            step_threads=pinned,
            step_sizes=("tiny",),
            step_rounds=5,
            block_seconds=0.15,
            export_size="tiny",
            export_dtypes=("bfloat16",),
            loop_sizes=("tiny",),
            max_tokens=100,
            loop_rounds=2,
            ttfa_codecs=("tiny",),
            ttfa_rounds=2,
            codec_sizes=("tiny",),
            codec_audio_seconds=(("tiny", 5.0),),
            codec_rounds=3,
            host_batches=(1, 64),
            host_rounds=2,
        )

    def cores(self) -> int:
        if self.threads:
            return self.threads
        from engines.codec import usable_cores

        return usable_cores()
