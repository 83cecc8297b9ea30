"""`python -m bench.serve_ray [--artifacts DIR]`: the Ray Serve path on this machine's CPU, in one run.

Start-up time (local cluster + proxy + 2 replicas loaded and healthy, what `make serve-ray` waits
for) and throughput with 1 versus 2 replicas of the tiny model (one ONNX Runtime backbone thread
each), both deployed side by side behind one proxy and measured in interleaved rounds (1, 2, 2, 1,
...) so that other work on the machine weighs on both alike: CLIENTS concurrent clients sending
REQUESTS non-streaming chat requests that each generate exactly STEPS decode steps (a seed and
temperature for which the tiny model never stops by itself). Reported as median requests/s and
their ratio. The tiny model makes this a measure of the serving path (proxy, routing, HTTP, codec,
per-step overhead) more than of model math. Needs the `ray` extra; prints a table for docs/ray.md.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.common import format_table, free_port, interleaved, machine_description, median, spread

REQUEST = {"model": "higgs-audio-v2", "messages": [{"role": "user", "content": "The quick brown fox jumps."}],
           "modalities": ["audio"], "seed": 2, "temperature": 2.0}


def _load(url: str, clients: int, requests: int, steps: int) -> float:
    """Seconds for `requests` requests from `clients` concurrent clients; every one must generate `steps`."""

    def one(_):
        response = httpx.post(f"{url}/v1/chat/completions", json={**REQUEST, "max_completion_tokens": steps},
                              timeout=300)
        response.raise_for_status()
        assert response.json()["usage"]["completion_tokens"] == steps

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.serve_ray", description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, default=Path("build/tiny-onnx"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32, help="requests per round")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=4, help="rounds per deployment, interleaved 1-2-2-1-...")
    args = p.parse_args(argv)
    load_before = "%.1f %.1f %.1f" % os.getloadavg()  # other work on the machine (shared cores)

    import ray
    from ray import serve as ray_serve

    from serve.ray_serve import application, parser

    def deploy(name: str, replicas: int) -> float:
        # 0.5 logical CPUs each: both deployments stay up side by side on 2 cores (3 replicas), while
        # each replica still runs 1 ONNX Runtime thread; the idle one only waits on an event
        flags = ["--artifacts", str(args.artifacts), "--replicas", str(replicas), "--max-batch", "8",
                 "--num-cpus", "0.5"]
        started = time.perf_counter()
        ray_serve.run(application(parser().parse_args(flags)), name=name, route_prefix=f"/{name}")
        return time.perf_counter() - started

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        cluster_s = time.perf_counter() - started
        deploy_s = {2: deploy("two", 2), 1: deploy("one", 1)}  # "two" first: the cold start make serve-ray sees
        names = {1: "one", 2: "two"}
        for replicas in (1, 2):
            _load(f"{url}/{names[replicas]}", args.clients, args.clients, args.steps)  # warm the path
        rates = interleaved({r: lambda r=r: args.requests / _load(f"{url}/{names[r]}", args.clients, args.requests, args.steps)
                             for r in (1, 2)}, args.rounds)
    finally:
        ray_serve.shutdown()
        ray.shutdown()
    rate = {r: median(v) for r, v in rates.items()}
    rows = [[r, f"{deploy_s[r]:.1f} s", f"{rate[r]:.2f}", f"{rate[r] * args.steps:.0f}", f"{spread(rates[r]):.0%}"]
            for r in (1, 2)]
    print(f"machine: {machine_description()}; ray {ray.__version__}; load average before: {load_before}")
    print(f"load: {args.clients} concurrent clients, {args.rounds} rounds of {args.requests} requests of "
          f"{args.steps} decode steps each per deployment, interleaved")
    print(f"local cluster + proxy start: {cluster_s:.1f} s; cold start to 2 healthy replicas: "
          f"{cluster_s + deploy_s[2]:.1f} s")
    print(format_table(["replicas", "deploy (load + warm-up)", "requests/s (median)", "decode steps/s", "spread"],
                       rows, markdown=True))
    print(f"throughput 2 vs 1 replicas: {rate[2] / rate[1]:.2f}x")


if __name__ == "__main__":
    main()
