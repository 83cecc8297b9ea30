"""The same API on Ray Serve: a local Ray cluster on this machine, 2 replicas of the tiny model, every
request through Ray's HTTP proxy (serve/ray_serve.py).

The cluster starts once for the module (15-25 s on 2 cores) with 2 logical CPUs, one per replica,
and is shut down at the end. Which replica served a response is its X-Replica-Id header; each
replica's own counters are its /metrics, attributed by the same header, and all replicas' metrics
are in Ray's Prometheus exporter.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile
from prometheus_client.parser import text_string_to_metric_families

from bench.common import free_port
from serve_support import MODEL, wait_for

INSTALL = ".venv/bin/pip install -e '.[ray]'"
ray = pytest.importorskip("ray", reason=f"Ray Serve is not installed: {INSTALL}")
ray_serve = pytest.importorskip("ray.serve", reason=f"Ray Serve is not installed: {INSTALL}")

from serve.ray_serve import APP_NAME, DEPLOYMENT_NAME, REPLICA_HEADER, build  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog."
# temperature 2 with this seed runs to max_completion_tokens on the tiny model (many seconds here)
LONG = {"seed": 2, "temperature": 2.0, "max_completion_tokens": 1800}


@pytest.fixture(scope="module")
def exporter_port() -> int:
    """The port of this node's Prometheus exporter of Ray's metrics."""
    return free_port()


@pytest.fixture(scope="module")
def ray_exporter(cluster, exporter_port) -> str:
    return f"http://127.0.0.1:{exporter_port}/metrics"


@pytest.fixture(scope="module")
def cluster(tiny_artifacts, exporter_port):
    """Ray's proxy URL. The app comes from `build`, KubeRay's entry point, with CLI flag names.
    Ray's metrics are reported every second (10 s by default)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False,
             _metrics_export_port=exporter_port, _system_config={"metrics_report_interval_ms": 1000})
    try:
        port = free_port()
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build({"artifacts": str(tiny_artifacts), "replicas": 2, "max_batch": 4, "queue_size": 8,
                     "health_check_period": 2, "shutdown_timeout": 5})
        ray_serve.run(app, name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        ray_serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=0, timeout=60)


def _replicas() -> dict[str, int]:
    """Replica states as Ray's controller reports them, e.g. {"RUNNING": 2}."""
    app = ray_serve.status().applications.get(APP_NAME)
    return dict(app.deployments[DEPLOYMENT_NAME].replica_states) if app else {}


def _metrics_of(url: str, replica: str, timeout: float = 30.0) -> dict[tuple, float]:
    """One replica's /metrics samples, {(name, sorted labels): value}: Ray routes each GET to some
    replica, so ask until the wanted one answers."""

    def ask():
        response = httpx.get(f"{url}/metrics", timeout=10)
        if response.headers[REPLICA_HEADER] != replica:
            return None
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(response.text) for s in family.samples}

    return wait_for(ask, timeout, f"/metrics from replica {replica}")


def _replica_ids(url: str, exclude: str | None = None) -> set[str]:
    """The ids of the two replicas answering now (other than `exclude`)."""
    seen = set()
    wait_for(lambda: seen.add(httpx.get(f"{url}/health", timeout=10).headers[REPLICA_HEADER])
             or len(seen - {exclude}) == 2, 60, "two replicas answering")
    return seen - {exclude}


def _exported(url: str, name: str, **labels) -> float:
    """Sum of one metric's samples with these labels in Ray's exporter (all replicas of this node)."""
    families = text_string_to_metric_families(httpx.get(url, timeout=10).text)
    return sum(s.value for family in families for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def _total(samples: dict[tuple, float], name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_openai_sdk_chat_streaming_and_speech_through_ray(client):
    params = dict(model=MODEL, messages=[{"role": "user", "content": TEXT}], modalities=["text", "audio"], seed=4,
                  max_completion_tokens=60)
    raw = client.chat.completions.with_raw_response.create(**params, audio={"voice": "default", "format": "wav"})
    assert raw.headers[REPLICA_HEADER]
    assert len(raw.headers.get_list("x-request-id")) == 1  # Ray's, not a second one from the app
    choice = raw.parse().choices[0]
    whole, rate = soundfile.read(io.BytesIO(base64.b64decode(choice.message.audio.data)), dtype="int16")
    assert rate == 24000 and len(whole) > 0 and choice.finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.model_dump().get("audio") for c in chunks if c.choices]  # typed or extra field
    pcm = np.frombuffer(b"".join(base64.b64decode(a["data"]) for a in deltas if a), dtype="<i2")
    np.testing.assert_array_equal(pcm, whole)  # same seed: the stream carries exactly the non-streamed audio
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == raw.parse().usage.completion_tokens

    speech = client.audio.speech.create(model=MODEL, input=TEXT, voice="default", response_format="flac",
                                        extra_body={"seed": 3, "max_completion_tokens": 40})
    audio, rate = soundfile.read(io.BytesIO(speech.content))
    assert rate == 24000 and len(audio) > 0


def test_requests_are_served_by_both_replicas(cluster, ray_exporter):
    """Concurrent generations spread over the 2 replicas; each replica's own request counter, its
    copy in Ray's exporter and Ray's per-replica request counter agree with the responses it is
    named on."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": TEXT}], "modalities": ["audio"],
            "seed": 1, "max_completion_tokens": 30}
    before = {}
    answers: list[tuple[int, str]] = []  # (status, replica id or body)

    def chat():
        response = httpx.post(f"{cluster}/v1/chat/completions", json=body, timeout=60)
        answers.append((response.status_code, response.headers.get(REPLICA_HEADER) or response.text))

    replica_ids = _replica_ids(cluster)
    for replica in replica_ids:
        before[replica] = _total(_metrics_of(cluster, replica), "higgs_requests_total",
                                 endpoint="/v1/chat/completions", status="200")
    threads = [threading.Thread(target=chat) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in answers] == [200] * 12, answers
    counts = {replica: [who for _, who in answers].count(replica) for replica in replica_ids}
    assert all(counts.values()), counts
    for replica, count in counts.items():
        after = _total(_metrics_of(cluster, replica), "higgs_requests_total", endpoint="/v1/chat/completions",
                       status="200")
        assert after - before[replica] == count
        # Ray's exporter, which scrapes every replica: our counter (mirrored) and Ray's own agree
        chat = {"replica": replica, "route": "/v1/chat/completions"}
        wait_for(lambda: _exported(ray_exporter, "ray_higgs_requests_total", replica=replica,
                                   endpoint="/v1/chat/completions", status="200") == after
                 and _exported(ray_exporter, "ray_serve_deployment_request_counter_total", **chat) == after,
                 30, f"Ray's exporter to report {after:.0f} chat requests on replica {replica}")


def test_client_disconnect_cancels_generation_on_its_replica(cluster):
    # snapshots while idle: Ray's router sends a request to the less busy of two replicas, so a busy
    # replica's /metrics is out of reach until its generation ends
    before = {replica: _metrics_of(cluster, replica) for replica in _replica_ids(cluster)}
    body = {"model": MODEL, "input": TEXT, "voice": "default", "response_format": "pcm", **LONG}
    with httpx.stream("POST", f"{cluster}/v1/audio/speech", json=body, timeout=60) as response:
        replica = response.headers[REPLICA_HEADER]
        next(response.iter_bytes())  # audio is flowing: the generation runs on `replica`
    # the client is gone; Ray's proxy cancels the replica's request task, the app cancels the generation
    after = wait_for(lambda: (m := _metrics_of(cluster, replica))[("higgs_generations_in_flight", ())] == 0 and m,
                     30, "the generation to end on its replica")
    assert (_total(after, "higgs_generations_cancelled_total", cause="disconnect")
            == _total(before[replica], "higgs_generations_cancelled_total", cause="disconnect") + 1)
    for reason in ("stop", "length"):  # it never ran to its end
        assert (_total(after, "higgs_generations_finished_total", reason=reason)
                == _total(before[replica], "higgs_generations_finished_total", reason=reason))

    # non-streaming: the client gives up before the response; Ray may cancel the replica's handler
    # task before the disconnect message arrives, so the app counts either cause
    chat = {"model": MODEL, "messages": [{"role": "user", "content": TEXT}], "modalities": ["audio"], **LONG}
    before = {r: _metrics_of(cluster, r) for r in before}  # idle again
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{cluster}/v1/chat/completions", json=chat, timeout=httpx.Timeout(60, read=1.0))

    def cancelled_everywhere():
        now = {r: _metrics_of(cluster, r) for r in before}
        return all(m[("higgs_generations_in_flight", ())] == 0 for m in now.values()) and now

    after = wait_for(cancelled_everywhere, 30, "the generation to end")
    cancelled = {r: _total(after[r], "higgs_generations_cancelled_total")
                 - _total(before[r], "higgs_generations_cancelled_total") for r in before}
    assert sorted(cancelled.values()) == [0, 1], cancelled


def test_killed_replica_leaves_the_other_unharmed_and_comes_back(cluster):
    """Long SSE streams on both replicas; one replica's actor is killed mid-stream. Streams on the
    other end normally; streams on the killed one break (the connection closes before the final
    event); Ray starts a replacement."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": TEXT}], "modalities": ["audio"],
            "stream": True, **LONG, "max_completion_tokens": 700}
    started, outcomes = {}, {}
    lock = threading.Lock()

    def stream(i):
        try:
            with httpx.stream("POST", f"{cluster}/v1/chat/completions", json=body, timeout=120) as response:
                with lock:
                    started[i] = response.headers[REPLICA_HEADER]
                events = [line for line in response.iter_lines() if line.startswith("data: ")]
            finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
            outcomes[i] = ("complete", finish[-1]) if events[-1] == "data: [DONE]" else ("truncated", None)
        except httpx.HTTPError as error:
            outcomes[i] = ("broken", type(error).__name__)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(started) == 6, 60, "all streams started")
    assert len(set(started.values())) == 2, started  # load on both replicas
    victim = started[0]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{victim}", namespace="serve"),
             no_restart=True)
    for thread in threads:
        thread.join(120)
    for i, replica in started.items():
        if replica == victim:
            # Ray's proxy closes the chunked response without its terminating chunk: a broken transfer
            assert outcomes[i] == ("broken", "RemoteProtocolError"), outcomes[i]
        else:
            assert outcomes[i] == ("complete", "length"), outcomes[i]  # unharmed: every frame, the final event
    wait_for(lambda: _replicas() == {"RUNNING": 2}, 90, "Ray to replace the killed replica")
    _replica_ids(cluster, exclude=victim)  # the survivor and the replacement answer


def test_redeploy_to_one_replica_drains_the_stopped_replicas_streams(cluster, tiny_artifacts):
    """Redeploying with 1 replica instead of 2 stops the old replicas (Ray 2.60 sees a new version of
    the deployment and starts a new one) while streams run on both; every stream still runs to its
    final event, within the drain budget (`--shutdown-timeout`), and one replica is left."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": TEXT}], "modalities": ["audio"],
            "stream": True, **LONG, "max_completion_tokens": 300}
    started, outcomes = {}, {}

    def stream(i):
        try:
            with httpx.stream("POST", f"{cluster}/v1/chat/completions", json=body, timeout=120) as response:
                started[i] = response.headers[REPLICA_HEADER]
                outcomes[i] = [line for line in response.iter_lines() if line.startswith("data: ")][-2:]
        except httpx.HTTPError as error:
            outcomes[i] = ["broken", repr(error)]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(started) == 4, 60, "all streams started")
    assert len(set(started.values())) == 2, started
    ray_serve.run(build({"artifacts": str(tiny_artifacts), "replicas": 1, "max_batch": 4, "queue_size": 8,
                         "health_check_period": 2, "shutdown_timeout": 5}), name=APP_NAME, route_prefix="/")
    for thread in threads:
        thread.join(120)
    for i in started:
        assert outcomes[i][-1] == "data: [DONE]" and '"finish_reason":"length"' in outcomes[i][0], outcomes[i]
    wait_for(lambda: _replicas() == {"RUNNING": 1}, 60, "one replica left")
    assert len({httpx.get(f"{cluster}/health", timeout=10).headers[REPLICA_HEADER] for _ in range(4)}) == 1


def test_kuberay_manifest_args_build_the_gpu_autoscaling_deployment():
    """deploy/kuberay/rayservice.yaml's application args go through `build` as KubeRay's controller
    would call it, and Ray's own validation accepts the resulting deployment options."""
    import yaml

    from serve.__main__ import settings_from_args
    from serve.ray_serve import args_from_config, deployment_options

    service = next(yaml.safe_load_all((Path(__file__).parents[1] / "deploy/kuberay/rayservice.yaml").read_text()))
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "serve.ray_serve:build"
    build(app["args"])  # ray.serve.deployment() raises on an invalid option or value
    args = args_from_config(app["args"])
    options = deployment_options(settings_from_args(args), args)
    assert options["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}  # tensorrt: one GPU per replica
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 64}
    assert options["max_ongoing_requests"] == 64 + 64 and "num_replicas" not in options
    assert options["max_queued_requests"] == 64 * 8  # the engines' queues together, at the most replicas


def test_health_check_fails_a_loading_or_stalled_engine(tiny_artifacts):
    """Ray's health check of a replica, on a real engine: not ready yet is unhealthy; a ready engine
    with a queued request and no decode step between two checks (its worker thread is not running:
    warmed up but never started) is unhealthy; a running engine with work is healthy."""
    from serve.ray_serve import HiggsReplica
    from serve_support import make_engine

    from engines.api import Message, SamplingParams, SpeechRequest

    replica = object.__new__(HiggsReplica)  # Ray's constructor needs a replica context; the check does not
    replica._last_check, replica.engine = None, make_engine(tiny_artifacts, start=False)
    engine = replica.engine
    try:
        with pytest.raises(RuntimeError, match="not ready"):
            replica.check_health()
        engine.warmup()
        engine.submit(SpeechRequest([Message("user", (TEXT,))], SamplingParams(seed=2, temperature=2.0),
                                    max_tokens=1800))
        replica.check_health()  # work waiting, no previous check: no verdict yet
        with pytest.raises(RuntimeError, match="no decode step since the last health check"):
            replica.check_health()
        engine.start()  # the worker picks the request up
        for _ in range(2):  # two checks with decode steps between them (Ray's are seconds apart)
            steps = engine.stats.steps
            wait_for(lambda: engine.stats.steps > steps, 30, "decode steps")
            replica.check_health()
    finally:
        engine.shutdown(drain=False)


def test_cli_names_the_fix_for_missing_artifacts(tmp_path, capsys):
    from serve.ray_serve import main

    with pytest.raises(SystemExit, match=f"{tmp_path}/manifest.json not found: run make export"):
        main(["--artifacts", str(tmp_path)])
