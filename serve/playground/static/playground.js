// The playground talks to this server's public API only, with relative URLs so that it also
// works behind a reverse proxy's path prefix. No dependencies and no build step, so it runs on
// an offline machine.
"use strict";

// /v1/audio/speech "pcm" is 16-bit little-endian mono at 24 kHz (OpenAI's pcm format, which the
// server keeps: docs/serving.md). The live player and the wav download are built from it.
const RATE = 24000;
const HISTORY_LIMIT = 20;
const $ = (id) => document.getElementById(id);
const state = { apiKey: "", controller: null, live: null, recorder: null, recorded: null, last: null, count: 0 };

/** fetch with the API key; a non-2xx answer throws the server's OpenAI error message. */
async function api(path, options = {}) {
  const headers = { ...options.headers };
  if (state.apiKey) headers.Authorization = `Bearer ${state.apiKey}`;
  const res = await fetch(path, { ...options, headers });
  if (res.ok) return res;
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (body.error && body.error.message) message = body.error.message;
  } catch { /* not JSON: keep the status line */ }
  if (res.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
  }
  throw new Error(message);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function fail(error) {
  showError(error.message || String(error));
}

// ------------------------------------------------------------------------------------------
// models and voices, whatever this server has

async function loadLists() {
  try {
    const [models, voices] = await Promise.all([api("v1/models"), api("v1/audio/voices")]);
    fill($("model"), (await models.json()).data.map((m) => [m.id, m.id]));
    fillVoices((await voices.json()).data);
    showError("");
  } catch (error) {
    fail(error);
  }
  updateCode();
}

function fill(select, pairs, keep = select.value) {
  select.replaceChildren(...pairs.map(([value, label]) => new Option(label, value)));
  if (pairs.some(([value]) => value === keep)) select.value = keep;
}

/** One option per voice card, grouped by where it comes from; OpenAI names shown beside it. */
function fillVoices(cards, keep = $("voice").value) {
  const select = $("voice");
  select.replaceChildren();
  for (const source of [...new Set(cards.map((c) => c.source))]) {
    const group = document.createElement("optgroup");
    group.label = source;
    for (const card of cards.filter((c) => c.source === source)) {
      const label = card.aliases && card.aliases.length ? `${card.name} (${card.aliases.join(", ")})` : card.name;
      const option = new Option(label, card.id);
      if (card.transcript) option.title = card.transcript;
      group.append(option);
    }
    select.append(group);
  }
  if (cards.some((c) => c.id === keep)) select.value = keep;
}

// ------------------------------------------------------------------------------------------
// the request

function number(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

/** The /v1/audio/speech body for the current settings (null fields left out). */
function speechBody(format, seed = number("seed")) {
  const body = {
    model: $("model").value,
    input: $("text").value,
    voice: $("voice").value || "default",
    response_format: format,
    instructions: $("scene").value.trim() || null,
    temperature: number("temperature"),
    top_p: number("top-p"),
    top_k: number("top-k"),
    seed,
    max_completion_tokens: number("max-tokens"),
  };
  return Object.fromEntries(Object.entries(body).filter(([, v]) => v !== null));
}

function post(body, signal) {
  return api("v1/audio/speech", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  });
}

// ------------------------------------------------------------------------------------------
// generate: stream PCM, play it as it arrives, keep it for the player and the downloads

/** Schedules PCM chunks back to back on a Web Audio context as they arrive. The context is
 * closed once played (each holds an audio device); `onClose` runs then. */
class LivePlayer {
  constructor(onClose) {
    this.context = new AudioContext({ sampleRate: RATE });
    this.onClose = onClose;
    this.next = 0;
    this.last = null;
    this.closed = false;
  }

  play(samples) {
    const buffer = this.context.createBuffer(1, samples.length, RATE);
    buffer.copyToChannel(samples, 0);
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    this.next = Math.max(this.next, this.context.currentTime + 0.05);
    source.start(this.next);
    this.next += buffer.duration;
    this.last = source;
  }

  /** Close after what is scheduled has played. */
  end() {
    if (this.last) this.last.onended = () => this.stop();
    else this.stop();
  }

  stop() {
    if (this.closed) return;
    this.closed = true;
    this.context.close();
    this.onClose();
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  if (state.live) state.live.stop();
  const seed = number("seed") ?? crypto.getRandomValues(new Uint32Array(1))[0] % 2 ** 31;
  const body = speechBody("pcm", seed);
  const format = $("format").value;
  const controller = new AbortController();
  state.controller = controller;
  $("generate").disabled = true;
  $("stop").disabled = false;
  // Stop stays available while the generated audio still plays
  const live = new LivePlayer(() => { if (!state.controller) $("stop").disabled = true; });
  state.live = live;
  const started = performance.now();
  const chunks = [];
  let bytes = 0;
  let firstAudio = null;
  let odd = null; // a chunk boundary may split a 16-bit sample
  let outcome = "done";
  setStatus("Generating…");
  let reader = null;
  try {
    reader = (await post(body, controller.signal)).body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      let data = value;
      if (odd) data = concat([odd, data]);
      odd = data.length % 2 ? data.slice(-1) : null;
      data = odd ? data.slice(0, -1) : data;
      if (!data.length) continue;
      firstAudio ??= (performance.now() - started) / 1000;
      chunks.push(data);
      bytes += data.length;
      live.play(toFloat(data));
      readouts(firstAudio, bytes / 2 / RATE, (performance.now() - started) / 1000);
    }
    setStatus("Done.");
  } catch (error) {
    outcome = error.name === "AbortError" ? "stopped" : "failed";
    if (outcome === "stopped") setStatus("Stopped.");
    else {
      // fetch reports network failures as TypeError: before the response the server is out of
      // reach; during the stream the server broke it off because the generation failed
      const broken = reader ? "the audio stream broke off: the generation failed on the server (its log says why)"
        : `cannot reach the server: ${error.message}`;
      fail(error instanceof TypeError ? new Error(broken) : error);
      setStatus("");
    }
  }
  state.controller = null;
  $("generate").disabled = false;
  if (outcome === "done") live.end();
  else live.stop();
  $("stop").disabled = live.closed;
  if (bytes) finish(concat(chunks), body, format, outcome === "done");
}

/** Stop the request (the server frees its decode slot when the connection drops) and the sound. */
function stop() {
  if (state.controller) state.controller.abort();
  if (state.live) state.live.stop();
}

function setStatus(text) { $("status").textContent = text; }

function readouts(firstAudio, audioSeconds, elapsed) {
  $("ttfa").textContent = firstAudio === null ? "–" : `${(firstAudio * 1000).toFixed(0)} ms`;
  $("seconds").textContent = `${audioSeconds.toFixed(2)} s`;
  $("rtf").textContent = audioSeconds ? (elapsed / audioSeconds).toFixed(2) : "–";
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) { out.set(part, at); at += part.length; }
  return out;
}

function toFloat(pcm) {
  const view = new DataView(pcm.buffer, pcm.byteOffset, pcm.length);
  const out = new Float32Array(pcm.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
  return out;
}

/** A RIFF/WAVE file around PCM16 mono. */
function wav(pcm) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (at, s) => [...s].forEach((c, i) => header.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF"); header.setUint32(4, 36 + pcm.length, true); text(8, "WAVE");
  text(12, "fmt "); header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
  header.setUint32(24, RATE, true); header.setUint32(28, RATE * 2, true); header.setUint16(32, 2, true);
  header.setUint16(34, 16, true); text(36, "data"); header.setUint32(40, pcm.length, true);
  return new Blob([header, pcm], { type: "audio/wav" });
}

/** `complete`: not stopped. A stopped generation offers no re-encoded download, since the
 * repeated request would run to the end and not match what was heard. */
function finish(pcm, body, format, complete) {
  const url = URL.createObjectURL(wav(pcm));
  state.count += 1;
  const name = `higgs-${state.count}`;
  state.last = { body, name, format, pcm };
  $("player").src = url;
  $("player").hidden = false;
  $("download-wav").href = url;
  $("download-wav").download = `${name}.wav`;
  $("download-format").hidden = format === "wav" || (format !== "pcm" && !complete);
  $("download-format").textContent = `Download ${format}`;
  $("downloads").hidden = false;
  $("wave").hidden = false;
  drawWave(toFloat(pcm));
  addHistory(url, name, body, pcm.length / 2 / RATE);
}

function drawWave(samples) {
  const canvas = $("wave");
  canvas.width = canvas.clientWidth * devicePixelRatio;
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.clearRect(0, 0, width, height);
  g.fillStyle = getComputedStyle(canvas).color;
  const peak = samples.reduce((m, v) => Math.max(m, Math.abs(v)), 1e-4); // drawn at full height
  const per = Math.max(1, Math.floor(samples.length / width));
  for (let x = 0; x < width && x * per < samples.length; x++) {
    let lo = 0, hi = 0;
    for (let i = x * per; i < Math.min((x + 1) * per, samples.length); i++) {
      lo = Math.min(lo, samples[i]);
      hi = Math.max(hi, samples[i]);
    }
    g.fillRect(x, (1 - hi / peak) * height / 2, 1, Math.max(1, (hi - lo) / peak * height / 2));
  }
}

function addHistory(url, name, body, seconds) {
  const item = document.createElement("li");
  const text = body.input.length > 60 ? `${body.input.slice(0, 57)}…` : body.input;
  item.append(`${text} · ${body.voice} · seed ${body.seed} · ${seconds.toFixed(2)} s`);
  const audio = document.createElement("audio");
  audio.controls = true;
  audio.src = url;
  audio.setAttribute("aria-label", `${name}: ${text}`);
  const link = document.createElement("a");
  link.href = url;
  link.download = `${name}.wav`;
  link.textContent = "wav";
  item.append(audio, link);
  const list = $("history");
  list.prepend(item);
  while (list.children.length > HISTORY_LIMIT) {
    URL.revokeObjectURL(list.lastElementChild.querySelector("a").href);
    list.lastElementChild.remove();
  }
}

/** pcm is what was streamed. Other formats come from the server's own encoder: the same request
 * again with the same seed, which gives the same audio (the engine draws from one seeded
 * generator per request, whatever shares its batch: docs/design.md, decode loop). */
async function downloadFormat() {
  const { body, name, format, pcm } = state.last;
  const button = $("download-format");
  button.disabled = true;
  if (format !== "pcm") setStatus(`Encoding ${format} (same request, same seed)…`);
  try {
    const blob = format === "pcm" ? new Blob([pcm], { type: "audio/pcm" })
      : await (await post({ ...body, response_format: format })).blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `${name}.${format}`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
    setStatus(`Saved ${link.download}.`);
  } catch (error) {
    fail(error);
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------------------------------
// voices: upload a clip or record one

async function uploadVoice() {
  showError("");
  const form = new FormData();
  form.append("name", $("voice-name").value.trim());
  form.append("transcript", $("voice-transcript").value);
  const file = state.recorded || $("voice-file").files[0];
  if (file) form.append("audio", file, file.name);
  try {
    const card = await (await api("v1/audio/voices", { method: "POST", body: form })).json();
    const voices = await (await api("v1/audio/voices")).json();
    fillVoices(voices.data, card.id);
    setStatus(`Voice ${card.name} added.`);
    updateCode();
  } catch (error) {
    fail(error);
  }
}

async function toggleRecording() {
  const button = $("record");
  if (state.recorder) {
    state.recorder.stop();
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    showError(`microphone unavailable: ${error.message}`);
    return;
  }
  const parts = [];
  const recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => parts.push(e.data);
  recorder.onstop = () => {
    stream.getTracks().forEach((t) => t.stop());
    const type = recorder.mimeType || "audio/webm";
    state.recorded = new File(parts, `recording.${type.includes("ogg") ? "ogg" : "webm"}`, { type });
    $("recorded").src = URL.createObjectURL(state.recorded);
    $("recorded").hidden = false;
    $("voice-file").value = "";
    state.recorder = null;
    button.textContent = "Record again";
  };
  recorder.start();
  state.recorder = recorder;
  button.textContent = "Stop recording";
}

// ------------------------------------------------------------------------------------------
// copy as code

function shellQuote(s) { return `'${s.replaceAll("'", `'\\''`)}'`; }

function updateCode() {
  const format = $("format").value;
  const body = speechBody(format);
  const base = new URL("v1", location.href).href;
  const auth = state.apiKey ? ` \\\n  -H "Authorization: Bearer $HIGGS_API_KEY"` : "";
  $("curl-code").textContent = `curl -sS ${base}/audio/speech${auth} \\\n  -H 'Content-Type: application/json' \\\n`
    + `  -d ${shellQuote(JSON.stringify(body))} \\\n  -o speech.${format}`;
  const { model, input, voice, instructions, ...rest } = body;
  const extra = Object.entries(rest).filter(([k]) => k !== "response_format");
  const args = [`model=${JSON.stringify(model)}`, `voice=${JSON.stringify(voice)}`, `input=${JSON.stringify(input)}`,
    `response_format=${JSON.stringify(format)}`];
  if (instructions) args.push(`instructions=${JSON.stringify(instructions)}`);
  if (extra.length) args.push(`extra_body={${extra.map(([k, v]) => `"${k}": ${v}`).join(", ")}}`);
  const key = state.apiKey ? `os.environ["HIGGS_API_KEY"]` : `"unused"`;
  $("python-code").textContent = `${state.apiKey ? "import os\n" : ""}from openai import OpenAI\n\n`
    + `client = OpenAI(base_url=${JSON.stringify(base)}, api_key=${key})\n`
    + `with client.audio.speech.with_streaming_response.create(\n    ${args.join(",\n    ")},\n) as response:\n`
    + `    response.stream_to_file("speech.${format}")\n`;
}

async function copy(event) {
  const code = $(event.target.dataset.copy).textContent;
  try {
    await navigator.clipboard.writeText(code);
    event.target.textContent = "Copied";
  } catch {
    getSelection().selectAllChildren($(event.target.dataset.copy));
    event.target.textContent = "Press Ctrl+C";
  }
  setTimeout(() => { event.target.textContent = "Copy"; }, 2000);
}

// ------------------------------------------------------------------------------------------

function init() {
  $("form").addEventListener("submit", generate);
  $("form").addEventListener("input", updateCode);
  $("stop").addEventListener("click", stop);
  $("download-format").addEventListener("click", downloadFormat);
  $("upload").addEventListener("click", uploadVoice);
  $("voice-file").addEventListener("change", () => {  // a chosen file replaces a recording
    state.recorded = null;
    $("recorded").hidden = true;
  });
  $("text").addEventListener("input", updateCount);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.apiKey = $("api-key").value.trim();
    loadLists();
  });
  $("text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
  document.querySelectorAll("[data-copy]").forEach((b) => b.addEventListener("click", copy));
  if (navigator.mediaDevices && window.MediaRecorder) {
    $("record-row").hidden = false;
    $("record").addEventListener("click", toggleRecording);
  }
  updateCount(); // the browser may restore the text of a reloaded page
  loadLists();
}

function updateCount() {
  const n = $("text").value.length;
  $("count").textContent = `${n} character${n === 1 ? "" : "s"}`;
}

init();
