"""Run a module as `python -m MODULE ARGS...` would, then print this process's peak RSS.

    python -m bench._peak MODULE [ARGS...]

The last line is `BENCH_PEAK_RSS <bytes>`: VmHWM from /proc/self/status, the high-water mark of
this process's own address space. (The parent's `wait4` / RUSAGE_CHILDREN `ru_maxrss` is not used:
Linux carries the forking parent's high-water mark across fork/vfork + exec into the child's
ru_maxrss, so a large parent inflates every child's number.)
"""

from __future__ import annotations

import atexit
import runpy
import sys

PEAK_PREFIX = "BENCH_PEAK_RSS "


def own_peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def report_at_exit() -> None:
    atexit.register(lambda: print(f"{PEAK_PREFIX}{own_peak_rss()}", flush=True))


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: python -m bench._peak MODULE [ARGS...]", file=sys.stderr)
        sys.exit(2)
    module = sys.argv[1]
    sys.argv = [module] + sys.argv[2:]
    report_at_exit()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
