"""The playground page (serve/playground/) in a real headless Chromium against a live server on
the tiny model: a person's path through it, checked against what the server itself answers.

The browser is the OS package (Debian's `chromium`) driven by Playwright for Python; nothing is
downloaded at test time. Screenshots land in build/ (docs/playground.png is a copy of
build/playground.png).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile

from serve_support import LiveServer, make_engine, settings_for, tone_wav, wait_for, write_voices

INSTALL = "apt-get install -y chromium && .venv/bin/pip install -e '.[browser]'"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None
pytestmark = pytest.mark.skipif(CHROMIUM is None or sync_playwright is None,
                                reason=f"needs Chromium and Playwright: {INSTALL}")

ROOT = Path(__file__).resolve().parent.parent
# the network is closed and the browser is a throwaway: no sandbox user namespace, no GPU, no
# background traffic (Chromium command-line switches; run with Debian's chromium 156 and Playwright 1.65)
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--mute-audio",
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]  # a beeping microphone
TEXT = "Hello from the playground."
SCENE = "Audio is recorded from a quiet room."
EXPECTED_NETWORK_ERROR = "Failed to load resource: the server responded with a status of 400 (Bad Request)"


@pytest.fixture(scope="module")
def server(tiny_artifacts, tmp_path_factory):
    # endless: a generation lasts exactly max_tokens steps, so Stop always has something to stop
    engine = make_engine(tiny_artifacts, max_batch=2, endless=True)
    with LiveServer(engine, settings_for(write_voices(tmp_path_factory.mktemp("voices")))) as live:
        yield live


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"), executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS,
            viewport={"width": 1280, "height": 720}, accept_downloads=True)
        yield context
        context.close()


@pytest.fixture
def page(browser, server):
    """A fresh tab on the playground; console errors and uncaught exceptions are collected in
    `page.problems`."""
    page = browser.new_page()
    page.problems = []
    page.on("console", lambda message: message.type == "error" and page.problems.append(message.text))
    page.on("pageerror", lambda error: page.problems.append(f"uncaught: {error}"))
    page.goto(server.url + "/")
    expect(page.locator("#voice option[value=belinda]")).to_be_attached()
    yield page
    page.close()


def generate_and_wait(page, history_items: int, keyboard: bool = False) -> None:
    if keyboard:
        page.get_by_label("Text").press("Control+Enter")
    else:
        page.get_by_role("button", name="Generate").click()
    expect(page.locator("#history li")).to_have_count(history_items, timeout=60_000)
    page.wait_for_function("() => document.getElementById('player').duration > 0")


def speak(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=60)


def assert_same_audio(flac: Path, pcm16: np.ndarray) -> None:
    """Same samples up to one step of 16-bit rounding: the server's flac encoder converts float
    to int16 in FFmpeg (libswresample), its pcm stream with numpy; they round differently."""
    decoded, rate = soundfile.read(flac, dtype="int16")
    assert rate == 24000 and decoded.shape == pcm16.shape
    assert np.abs(decoded.astype(np.int32) - pcm16).max() <= 1


def test_generate_download_clone_and_errors(page, server, tmp_path):
    unlabelled = "() => [...document.querySelectorAll('input, select, textarea')].filter(e => !e.labels.length)"
    assert page.evaluate(unlabelled + ".map(e => e.id)") == []
    page.get_by_label("Text").fill(TEXT)
    expect(page.locator("#count")).to_have_text(f"{len(TEXT)} characters")
    page.get_by_label("Voice").select_option("belinda")
    page.get_by_label("Speaking style / scene").fill(SCENE)
    page.get_by_label("Seed").fill("7")
    page.get_by_label("Max tokens").fill("60")
    page.get_by_label("Output format").select_option("flac")
    generate_and_wait(page, 1)

    expect(page.locator("#ttfa")).to_have_text(re.compile(r"^\d+ ms$"))
    expect(page.locator("#seconds")).to_have_text(re.compile(r"^\d+\.\d\d s$"))
    expect(page.locator("#rtf")).to_have_text(re.compile(r"^\d+\.\d\d$"))
    sampling = server.recorder.submitted[-1].sampling  # the hosted page's defaults, as the page sent them
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (1.0, 0.95, 50, 7)
    page.screenshot(path=ROOT / "build" / "playground.png", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling on a phone
    page.screenshot(path=ROOT / "build" / "playground-phone.png", full_page=True)
    page.set_viewport_size({"width": 1280, "height": 720})

    # the wav the page built from the stream is what the server sends for this request
    with page.expect_download() as download:
        page.get_by_role("link", name="Download wav").click()
    heard, rate = soundfile.read(download.value.path(), dtype="int16")
    body = {"model": "higgs-audio-v2", "input": TEXT, "voice": "belinda", "instructions": SCENE, "seed": 7,
            "max_completion_tokens": 60, "temperature": 1.0, "top_p": 0.95, "top_k": 50, "response_format": "pcm"}
    expected = np.frombuffer(speak(server, body).content, "<i2")
    assert rate == 24000 and len(heard) > 0
    np.testing.assert_array_equal(heard, expected)
    assert page.evaluate("document.getElementById('player').duration") == pytest.approx(len(heard) / rate, abs=0.01)
    assert page.locator("#seconds").inner_text() == f"{len(heard) / rate:.2f} s"

    # the chosen format, encoded by the server: the same audio
    with page.expect_download() as download:
        page.get_by_role("button", name="Download flac").click()
    assert download.value.suggested_filename.endswith(".flac")
    assert_same_audio(download.value.path(), heard)

    # copy as code: both snippets run as shown and give the same audio
    page.get_by_text("Copy as code").click()
    curl = page.locator("#curl-code").inner_text()
    subprocess.run(["bash", "-c", curl], cwd=tmp_path, check=True, timeout=60)
    assert_same_audio(tmp_path / "speech.flac", heard)
    (tmp_path / "speech.flac").unlink()
    python = page.locator("#python-code").inner_text()
    subprocess.run([sys.executable, "-c", python], cwd=tmp_path, check=True, timeout=60)
    assert_same_audio(tmp_path / "speech.flac", heard)

    # upload a clip with its transcript and speak with it; not audio at all: the server's error
    page.get_by_text("Add a voice").click()
    page.get_by_label("Name").fill("mine")
    page.get_by_label("What the clip says").fill("This is my own voice.")
    junk = {"name": "mine.wav", "mimeType": "audio/wav", "buffer": b"this is not audio" * 40}
    page.get_by_label("Clip (0.5 to 30 s)").set_input_files(junk)
    page.get_by_role("button", name="Add voice").click()
    error = httpx.post(f"{server.url}/v1/audio/voices", data={"name": "mine", "transcript": "This is my own voice."},
                       files={"audio": (junk["name"], junk["buffer"], junk["mimeType"])}).json()["error"]["message"]
    expect(page.get_by_role("alert")).to_have_text(error)
    page.get_by_label("Clip (0.5 to 30 s)").set_input_files(
        {"name": "mine.wav", "mimeType": "audio/wav", "buffer": tone_wav(1.5, rate=22050, freq=300.0)})
    page.get_by_role("button", name="Add voice").click()
    expect(page.get_by_label("Voice")).to_have_value("mine")
    generate_and_wait(page, 2, keyboard=True)
    messages = server.recorder.submitted[-1].messages  # the clip's pair: its transcript, then its codes
    at = [m.content for m in messages].index(("This is my own voice.",))
    assert messages[at + 1].role == "assistant" and len(server.recorder.encoded[-1]) == 36000  # 1.5 s at 24 kHz

    # or record one from the microphone (Chromium's fake device beeps)
    encoded = server.recorder.encode_calls
    page.get_by_role("button", name="Record from microphone").click()
    page.wait_for_timeout(1500)  # the clip's length: a reference clip must last 0.5 to 30 s
    page.get_by_role("button", name="Stop recording").click()
    expect(page.locator("#recorded")).to_be_visible()
    page.get_by_label("Name").fill("recorded")
    page.get_by_label("What the clip says").fill("Beep beep.")
    page.get_by_role("button", name="Add voice").click()
    expect(page.get_by_label("Voice")).to_have_value("recorded")
    cards = httpx.get(f"{server.url}/v1/audio/voices").json()["data"]
    assert [c["transcript"] for c in cards if c["id"] == "recorded"] == ["Beep beep."]
    assert server.recorder.encode_calls == encoded + 1  # the recording, decoded and encoded

    # an empty text: the server's own error message, in the page
    page.get_by_label("Text").fill("")
    page.get_by_role("button", name="Generate").click()
    error = speak(server, {"model": "higgs-audio-v2", "input": "", "voice": "mine"}).json()["error"]["message"]
    expect(page.get_by_role("alert")).to_have_text(error)

    # Chromium logs every 4xx fetch; the two deliberate ones above are the only console errors allowed
    assert page.problems == [EXPECTED_NETWORK_ERROR] * 2


def test_stop_cancels_the_generation_and_frees_the_slot(page, server):
    cancelled = server.metric("higgs_generations_cancelled_total", cause="disconnect")
    page.get_by_label("Text").fill(TEXT)
    page.get_by_label("Max tokens").fill("1800")  # 72 s of audio: still running when Stop is pressed
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#ttfa")).to_have_text(re.compile(r"^\d+ ms$"), timeout=30_000)
    assert server.engine.active_requests() == 1  # still generating: the page shows audio as it streams
    assert page.evaluate("() => state.live.next") > 0  # and has scheduled it on Web Audio
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.locator("#status")).to_have_text("Stopped.")
    assert page.evaluate("() => state.live.closed")  # the sound stops too
    wait_for(lambda: server.metric("higgs_generations_cancelled_total", cause="disconnect") == cancelled + 1,
             what="the server cancelling the generation")
    request_id = server.recorder.submitted[-1].request_id
    finished = wait_for(lambda: server.recorder.finished.get(request_id), what="the engine's last event")
    wait_for(lambda: server.engine.active_requests() == 0, what="the decode slot freed")
    assert finished.finish_reason == "cancelled" and finished.completion_tokens < 1800
    # what was heard stays playable; the re-encoded download is not offered for a stopped take
    page.wait_for_function("() => document.getElementById('player').duration > 0")
    expect(page.locator("#download-format")).to_be_hidden()
    assert page.problems == []


def test_api_key_field_appears_when_the_server_requires_keys(browser, tiny_artifacts):
    engine = make_engine(tiny_artifacts, max_batch=1)
    with LiveServer(engine, settings_for(None, api_keys=("sesame",))) as server:
        page = browser.new_page()
        page.goto(server.url + "/playground")
        key = page.get_by_label("API key")
        expect(key).to_be_visible()
        expect(page.get_by_role("alert")).to_contain_text("missing API key")
        key.fill("sesame")
        key.press("Enter")
        expect(page.get_by_label("Model")).to_have_value(server.settings.model_names[0])
        expect(page.get_by_role("alert")).to_be_hidden()
        assert "Authorization: Bearer $HIGGS_API_KEY" in page.locator("#curl-code").text_content()
        page.close()
