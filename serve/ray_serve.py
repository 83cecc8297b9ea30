"""`python -m serve.ray_serve --artifacts DIR --replicas N`: the same OpenAI-compatible app on Ray Serve.

One engine per replica, the unchanged app of `serve.app.create_app` as each replica's ingress, Ray's
HTTP proxy in front: Ray routes, load-balances, autoscales, health-checks and restarts replicas, and
places them on GPUs across a cluster (one GPU each). Every flag of `python -m serve` applies; the
ones below are Ray's. On Kubernetes, KubeRay runs the same application through `build` (see
deploy/kuberay/ and docs/ray.md).

Ray is an optional extra: `.venv/bin/pip install -e '.[ray]'`. Written against Ray 2.60.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys
import time

from starlette.datastructures import MutableHeaders

from engines.gpu_env import require_runtime
from engines.logs import setup_logging
from engines.manifest import MANIFEST_FILE
from serve.__main__ import build_engine, parser as serve_parser, settings_from_args
from serve.app import create_app
from serve.settings import ServeSettings

log = logging.getLogger("serve")

APP_NAME = "higgs"
DEPLOYMENT_NAME = "HiggsReplica"
REPLICA_HEADER = "x-replica-id"
INSTALL = "pip install -e '.[ray]'"
MIRROR_PERIOD_S = 5.0  # Ray's exporter itself reports every 10 s (metrics_report_interval_ms)


class HiggsReplica:
    """One Ray Serve replica: one engine and the single-process app around it.

    The app is built after the engine (Ray's late-bound ingress, `__serve_build_asgi_app__`), so
    the replica only reports ready once its graphs are loaded and warmed. Ray runs the app's
    lifespan: presets load on start, and the engine drains on shutdown (downscale, redeploy),
    after Ray has stopped routing to the replica and waited `graceful_shutdown_timeout_s` for the
    requests it has. A client disconnect reaches the app as a cancelled request task (Ray's proxy
    cancels the replica call), which cancels the generation like a disconnect does under uvicorn.
    """

    async def __init__(self, settings: ServeSettings, threads: int | None = None, log_level: str = "info"):
        from ray import serve as ray_serve

        # Ray sets up its own loggers in a replica, not ours: without this our INFO lines (requests,
        # first audio, finish) would not reach the replica's log file
        setup_logging(logging.WARNING)
        for name in ("serve", "engines", "higgs"):  # higgs.engine: the decode loop's request lines
            logging.getLogger(name).setLevel(log_level.upper())
        self.settings = settings
        self.replica_id = ray_serve.get_replica_context().replica_id.unique_id
        self.engine = await asyncio.to_thread(lambda: build_engine(settings, threads).start())
        self._last_check: tuple[int, bool] | None = None  # (decode steps, work waiting) at the last health check
        log.info("replica %s: engine ready", self.replica_id)

    async def __serve_build_asgi_app__(self):
        app = create_app(self.engine, self.settings)
        app.add_middleware(ReplicaHeader, replica_id=self.replica_id)
        self._mirror = asyncio.create_task(mirror_metrics(app.state.metrics.registry))  # lives as long as the replica
        return app

    def check_health(self) -> None:
        """Ray calls this every `health_check_period_s`; raising marks the replica unhealthy, and
        Ray replaces it. Unhealthy: the engine is not ready, or it had work (a request in a slot
        or queued) at the last check and has made no decode step since (a hung device or a dead
        engine thread; one step takes milliseconds)."""
        engine = self.engine
        if not engine.ready():
            raise RuntimeError("engine is not ready")
        steps, busy = engine.stats.steps, bool(engine.active_requests() or engine.queue_depth())
        stalled = busy and self._last_check == (steps, True)
        self._last_check = (steps, busy)
        if stalled:
            raise RuntimeError(f"engine made no decode step since the last health check with "
                               f"{engine.active_requests()} requests in slots and {engine.queue_depth()} queued")


async def mirror_metrics(registry, period_s: float = MIRROR_PERIOD_S) -> None:
    """Copy the app's Prometheus samples (`GET /metrics`, one replica's) into Ray's metrics every
    `period_s`, so that Ray's exporter on each node publishes them beside its own with the replica's
    `application`, `deployment` and `replica` tags: a scrape of /metrics through Ray's proxy reaches
    one random replica, Ray's exporter reaches them all. Each sample becomes a Ray gauge of the same
    name holding the current value (Ray prefixes `ray_`); counters stay monotonic per replica, so
    `rate()` works on them as before, and a restarted replica is a new `replica` tag.
    ray.serve.metrics adds the Serve tags inside a replica (ray/serve/metrics.py, Ray 2.60)."""
    from ray.serve.metrics import Gauge

    gauges: dict[str, Gauge] = {}
    while True:
        for family in registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # creation timestamps, not measurements
                    continue
                if sample.name not in gauges:
                    gauges[sample.name] = Gauge(sample.name, family.documentation, tag_keys=tuple(sorted(sample.labels)))
                gauges[sample.name].set(sample.value, tags=dict(sample.labels))
        await asyncio.sleep(period_s)


class ReplicaHeader:
    """Pure ASGI (streams pass through unbuffered): `X-Replica-Id` on every response, so clients and
    tests can tell which replica served them, and `/metrics` answers can be attributed.

    It also drops the app's `X-Request-Id`: Ray's proxy sends the client's id (or one it made) to
    the replica, which the app uses as the prefix of its own, and appends that id to the response
    itself (ray/serve/_private/http_util.py RequestIdMiddleware, Ray 2.60); two headers of one
    name would leave clients guessing. Logs carry the app's id, which starts with the client's.
    """

    def __init__(self, app, replica_id: str):
        self.app = app
        self.replica_id = replica_id

    async def __call__(self, scope, receive, send):
        async def send_with_replica(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                del headers["x-request-id"]
                headers.append(REPLICA_HEADER, self.replica_id)
            await send(message)

        await self.app(scope, receive, send_with_replica if scope["type"] == "http" else send)


def parser() -> argparse.ArgumentParser:
    p = serve_parser("python -m serve.ray_serve", __doc__)
    ray = p.add_argument_group("Ray Serve")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (the minimum when autoscaling)")
    ray.add_argument("--max-replicas", type=int, default=None,
                     help="autoscale between --replicas and this on in-flight requests per replica")
    ray.add_argument("--num-cpus", type=float, default=1.0,
                     help="CPUs reserved per replica (ort-cpu: also its ONNX Runtime threads)")
    ray.add_argument("--num-gpus", type=float, default=None,
                     help="GPUs per replica (default: 1 for ort-cuda and tensorrt, 0 for ort-cpu)")
    ray.add_argument("--health-check-period", type=float, default=10.0,
                     help="seconds between health checks; a busy engine without a decode step for this long is "
                          "restarted")
    ray.add_argument("--address", default=None,
                     help="Ray cluster to join (e.g. auto, on one of its nodes); default: start a local one")
    return p


def deployment_options(settings: ServeSettings, args: argparse.Namespace) -> dict:
    """Ray Serve deployment options derived from the engine's sizes.

    A replica takes at most what its engine holds (`max_batch` slots + `queue_size` queued) as
    `max_ongoing_requests`, so the engine's own queue never overflows under Ray; the excess waits
    at Ray's proxy, which hands it to the first replica with room, and beyond
    `max_queued_requests` answers 429 with Retry-After like the engine's queue does. That bound is
    the engines' queues together (`queue_size` per replica, at the most replicas): Ray counts a
    request as queued from its arrival until a replica is chosen, so a bound of one engine's queue
    refused bursts while the replicas had room (seen with 12 simultaneous requests, 2 replicas of
    4 + 8, on this loaded 2-core machine). The autoscaler aims at `max_batch` ongoing requests per
    replica: a replica whose slots are all busy is at target, and queued requests mean more
    replicas. Ray waits for a downscaled replica's requests up to the drain budget
    (`shutdown_timeout_s`) before stopping it.
    """
    gpus = args.num_gpus if args.num_gpus is not None else (0 if settings.runtime == "ort-cpu" else 1)
    most_replicas = max(args.replicas, args.max_replicas or 0)
    options = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": gpus},
        "max_ongoing_requests": settings.max_batch + settings.queue_size,
        "max_queued_requests": settings.queue_size * most_replicas,
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        "graceful_shutdown_timeout_s": settings.shutdown_timeout_s,
        "health_check_period_s": args.health_check_period,
    }
    if most_replicas > args.replicas:
        options["autoscaling_config"] = {"min_replicas": args.replicas, "max_replicas": args.max_replicas,
                                         "target_ongoing_requests": settings.max_batch}
    else:
        options["num_replicas"] = args.replicas
    return options


def application(args: argparse.Namespace):
    """The bound Ray Serve application for parsed flags."""
    from ray import serve as ray_serve

    settings = settings_from_args(args)
    threads = max(1, math.floor(args.num_cpus)) if settings.runtime == "ort-cpu" else None
    deployment = ray_serve.deployment(ray_serve.ingress()(HiggsReplica), **deployment_options(settings, args))
    return deployment.bind(settings, threads, args.log_level)


def args_from_config(config: dict) -> argparse.Namespace:
    """CLI flags by name, as a Serve config's `args` holds them: `max_batch: 64` is `--max-batch 64`,
    a list repeats the flag."""
    argv = []
    for name, value in config.items():
        for item in value if isinstance(value, list) else [value]:
            argv += [f"--{name.replace('_', '-')}", str(item)]
    return parser().parse_args(argv)


def build(config: dict):
    """Application builder for `serve run` and KubeRay's `import_path: serve.ray_serve:build`."""
    return application(args_from_config(config))


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        import ray
        from ray import serve as ray_serve
    except ImportError:
        raise SystemExit(f"error: Ray Serve is not installed: {INSTALL}") from None
    if args.address is None:  # replicas run here: fail now rather than in Ray's constructor retries
        if not (args.artifacts / MANIFEST_FILE).is_file():
            raise SystemExit(f"error: {args.artifacts}/manifest.json not found: run make export OUT={args.artifacts}")
        try:
            require_runtime(args.runtime)
        except (ValueError, RuntimeError) as error:
            raise SystemExit(f"error: {error}") from None
    started = time.perf_counter()
    ray.init(address=args.address, logging_level=logging.WARNING)
    try:
        ray_serve.start(http_options={"host": args.host, "port": args.port})
        ray_serve.run(application(args), name=APP_NAME, route_prefix="/")
    except RuntimeError as error:  # Ray gave up deploying: the replicas' logs say why
        ray_serve.shutdown()
        ray.shutdown()
        raise SystemExit(f"error: the application did not start: {error}") from None
    log.info("serving on http://%s:%d with %d replica(s), ready after %.1f s (Ctrl-C stops, draining replicas)",
             args.host, args.port, args.replicas, time.perf_counter() - started)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SIGTERM drains like Ctrl-C
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        ray_serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
