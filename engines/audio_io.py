"""Audio in and out of the server: decode, resample, tempo, encode. numpy + PyAV + soxr, no torch.

Why PyAV: one maintained FFmpeg binding covers every format the API speaks in both directions
(wav, raw pcm, flac, mp3, opus in Ogg, AAC in ADTS, plus whatever clients upload as reference
clips), its wheels ship the encoders (libmp3lame, libopus, FFmpeg's aac and flac), and its filter
graph gives FFmpeg's `atempo` for a pitch-preserving `speed`. soundfile has no AAC and only recent
libsndfile writes mp3; pydub shells out to an ffmpeg binary the wheels don't have.
Why soxr: the maintained high-quality resampler (what upstream reaches through librosa).

All waveforms are float32 mono in [-1, 1]. `AudioError` (a ValueError) means "the client sent
audio we cannot use"; the server turns it into a 400.
"""

from __future__ import annotations

import fractions
import io
import itertools
import logging
import struct
import time

import av
import numpy as np
import soxr

log = logging.getLogger(__name__)

FORMATS = ("wav", "pcm", "flac", "mp3", "opus", "aac")
MEDIA_TYPES = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
}
# format -> (muxer, encoder, bit rate): speech at 24 kHz mono needs far less than music defaults.
_CODECS = {
    "flac": ("flac", "flac", None),
    "mp3": ("mp3", "libmp3lame", 64_000),
    "opus": ("ogg", "libopus", 32_000),
    "aac": ("adts", "aac", 64_000),
}
# client format names -> FFmpeg demuxer; unknown hints fall back to probing.
_DEMUXERS = {
    "wav": "wav", "mp3": "mp3", "flac": "flac", "ogg": "ogg", "opus": "ogg", "oga": "ogg",
    "aac": "aac", "m4a": "mp4", "mp4": "mp4", "webm": "matroska", "mka": "matroska",
}
PCM_INPUT_RATE = 24000  # raw `pcm` input is s16le mono at this rate (OpenAI's pcm convention)


class AudioError(ValueError):
    """The bytes are not usable audio (undecodable, empty, too long)."""


# Client clips are decoded behind a closed door (FFmpeg 8 as bundled with PyAV 18.1):
# * only these demuxers, by name. FFmpeg's probe still picks among them, but
#   avformat_open_input refuses any other result ("Format not on whitelist", libavformat/demux.c),
#   so concat/ffconcat, hls, sdp/rtp, image sequences and the like never run;
# * no protocols at all: the input is our own AVIOContext (PyAV's Python IO), so an empty
#   protocol_whitelist only stops what a demuxer would open by itself (a file, a socket);
# * only these decoders (checked on the stream before decoding; codec_whitelist also bounds what
#   avformat_find_stream_info opens);
# * a time limit (PyAV's interrupt callback while opening, a deadline while decoding).
_CONTAINERS = ("wav", "flac", "mp3", "ogg", "aac", "mov", "matroska")  # mov = mp4/m4a; matroska = webm/mka
_DECODERS = ("pcm_u8", "pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_f32le", "pcm_f64le", "pcm_alaw", "pcm_mulaw",
             "flac", "mp3float", "mp3", "vorbis", "opus", "libopus", "aac", "alac")
_OPEN_OPTIONS = {"format_whitelist": ",".join(_CONTAINERS), "protocol_whitelist": "",
                 "codec_whitelist": ",".join(_DECODERS)}
_UNSUPPORTED = "not a supported audio file (wav, flac, mp3, ogg vorbis/opus, aac, m4a or webm)"
# Downmix in FFmpeg's resampler with the matrix normalised to a peak gain of 1 (swr option
# rematrix_maxval, https://ffmpeg.org/ffmpeg-resampler.html): stereo becomes the mean of its
# channels (what upstream's librosa load does), more channels FFmpeg's standard downmix scaled
# so that it cannot clip. Never index planes: PyAV 18.1 crashes on frames of 8+ channels there.
_MONO = {"format": "flt", "layout": "mono", "options": {"rematrix_maxval": "1.0"}}
DECODE_TIME_LIMIT_S = 10.0  # far beyond what max_seconds of any listed format takes to decode


def decode_audio(data: bytes, fmt_hint: str | None = None, max_seconds: float | None = None
                 ) -> tuple[np.ndarray, int]:
    """Decode a client clip to (float32 mono, sample rate).

    The hint picks the demuxer first (raw `pcm` has no header to probe); a wrong hint falls back
    to probing among the allowed containers, since clients often label mp3 bytes "wav".
    `max_seconds` stops decoding early so a small compressed upload cannot expand into an
    unbounded waveform. Errors say what is accepted and never echo FFmpeg's text, which can
    name paths on this machine.
    """
    if not data:
        raise AudioError("audio is empty")
    hint = (fmt_hint or "").lower()
    if hint in ("pcm", "pcm16", "s16le"):
        if len(data) % 2:
            raise AudioError("raw pcm audio must be 16-bit samples (even byte count)")
        wave = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        _check_duration(len(wave), PCM_INPUT_RATE, max_seconds)
        return wave, PCM_INPUT_RATE
    deadline = time.monotonic() + DECODE_TIME_LIMIT_S
    demuxer = _DEMUXERS.get(hint)
    for attempt in ((demuxer, None) if demuxer else (None,)):
        try:
            return _decode_with(data, attempt, max_seconds, deadline)
        except AudioError:
            raise
        except (av.FFmpegError, ValueError, IndexError, OSError) as exc:
            log.debug("decoding a clip as %s failed: %s", attempt or "any allowed container", exc)
    raise AudioError(f"could not decode audio: {_UNSUPPORTED}")


def _decode_with(data: bytes, demuxer: str | None, max_seconds: float | None, deadline: float
                 ) -> tuple[np.ndarray, int]:
    remaining = max(deadline - time.monotonic(), 0.001)
    with av.open(io.BytesIO(data), mode="r", format=demuxer, options=_OPEN_OPTIONS, timeout=remaining) as container:
        if not container.streams.audio:
            raise AudioError("the file has no audio stream")
        stream = container.streams.audio[0]
        if stream.codec_context.name not in _DECODERS:
            raise AudioError(f"audio codec {stream.codec_context.name!r} is not supported; use pcm, flac, mp3, "
                             "vorbis, opus, aac or alac")
        to_mono = av.AudioResampler(**_MONO)  # keeps the rate: soxr resamples later
        parts: list[np.ndarray] = []
        total, rate = 0, 0
        for frame in itertools.chain(container.decode(stream), [None]):  # None flushes the resampler
            for converted in to_mono.resample(frame):
                rate = converted.sample_rate
                parts.append(converted.to_ndarray().reshape(-1))
                total += converted.samples
            _check_duration(total, rate, max_seconds)
            if time.monotonic() > deadline:
                raise AudioError("audio took too long to decode")
    if not parts:
        raise AudioError("the audio stream decoded to no samples")
    return np.concatenate(parts).astype(np.float32, copy=False), rate


def _check_duration(samples: int, rate: int, max_seconds: float | None) -> None:
    if max_seconds is not None and samples > max_seconds * rate:
        raise AudioError(f"audio is longer than the {max_seconds:g} s limit")


def resample(wave: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """High-quality (soxr HQ) resampling of a mono float32 waveform."""
    wave = np.asarray(wave, dtype=np.float32)
    if sr_in == sr_out:
        return wave
    return soxr.resample(wave, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def to_pcm16(wave: np.ndarray) -> bytes:
    """Little-endian signed 16-bit PCM: clipped to [-1, 1], scaled by 32767, rounded."""
    scaled = np.rint(np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0) * 32767.0)
    return scaled.astype("<i2").tobytes()


def wav_header(sample_rate: int, num_samples: int | None) -> bytes:
    """44-byte PCM16 mono RIFF header. `None` = length unknown (streaming): both size fields are
    0xFFFFFFFF, the convention FFmpeg and libsndfile read as "until end of stream"."""
    data_size = 0xFFFFFFFF if num_samples is None else 2 * num_samples
    riff_size = 0xFFFFFFFF if num_samples is None else 36 + data_size
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
            + b"data" + struct.pack("<I", data_size))


def encode_audio(wave: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Whole-clip encoding to one of FORMATS (wav is PCM16, pcm is raw s16le)."""
    if fmt == "wav":
        return wav_header(sample_rate, len(wave)) + to_pcm16(wave)
    if fmt == "pcm":
        return to_pcm16(wave)
    buffer = io.BytesIO()  # seekable: muxers finalise their headers (flac STREAMINFO, mp3 Xing)
    muxer = _Muxer(fmt, sample_rate, buffer)
    muxer.write(wave)
    muxer.close()
    return buffer.getvalue()


class StreamingEncoder:
    """Encodes audio chunk by chunk and hands back the bytes each chunk completes.

    For `stream_format: audio`: every byte returned can be sent at once and the concatenation is
    a valid file. wav starts with a header of unknown length (see `wav_header`); mp3 lacks the
    Xing header a seekable file gets (players don't need it). flac is the exception: it is
    encoded into a seekable buffer and returned whole by `finish()`, because common readers
    (libsndfile, hence soundfile) refuse a STREAMINFO without the total sample count. Clients
    that want low latency ask for pcm, wav, mp3, opus or aac.

    `speed` != 1 runs the audio through `Tempo` first (OpenAI's `speed`, pitch preserved).
    """

    _WHOLE_FILE = ("flac",)

    def __init__(self, fmt: str, sample_rate: int, speed: float = 1.0):
        if fmt not in FORMATS:
            raise ValueError(f"unknown audio format {fmt!r}")
        self.fmt = fmt
        self.sample_rate = sample_rate
        self._tempo = Tempo(sample_rate, speed) if speed != 1.0 else None
        self._header_sent = False
        self._file = io.BytesIO() if fmt in self._WHOLE_FILE else _Sink()
        self._muxer = _Muxer(fmt, sample_rate, self._file) if fmt in _CODECS else None

    def feed(self, wave: np.ndarray) -> bytes:
        return self._encode(self._tempo.process(wave) if self._tempo else wave)

    def finish(self) -> bytes:
        tail = self._encode(self._tempo.finish()) if self._tempo else b""
        if self._muxer is None:
            return tail + self._raw_header()
        self._muxer.close()
        return tail + (self._file.getvalue() if isinstance(self._file, io.BytesIO) else self._drain())

    def _encode(self, wave: np.ndarray) -> bytes:
        if self._muxer is None:
            return self._raw_header() + to_pcm16(wave)
        self._muxer.write(wave)
        return self._drain()

    def _drain(self) -> bytes:
        return b"" if isinstance(self._file, io.BytesIO) else self._file.drain()

    def _raw_header(self) -> bytes:
        if self.fmt != "wav" or self._header_sent:
            return b""
        self._header_sent = True
        return wav_header(self.sample_rate, None)


class _Sink:
    """Write-only, unseekable file object for PyAV: the muxer streams instead of patching headers."""

    def __init__(self):
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


class _Muxer:
    """One PyAV output container + audio stream; float32 mono in, encoded packets out."""

    def __init__(self, fmt: str, sample_rate: int, file):
        muxer, codec, bit_rate = _CODECS[fmt]
        # flush_packets: write each packet through at once; page_duration: short Ogg pages (20 ms)
        # so opus streams without the default 1 s page buffering.
        options = {"flush_packets": "1", "page_duration": "20000"} if fmt == "opus" else {"flush_packets": "1"}
        self._container = av.open(file, mode="w", format=muxer, options=options)
        self._stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")
        if bit_rate:
            self._stream.bit_rate = bit_rate
        self._rate = sample_rate
        self._pts = 0

    def write(self, wave: np.ndarray) -> None:
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        if not len(wave):
            return
        frame = av.AudioFrame.from_ndarray(wave[None, :], format="flt", layout="mono")
        frame.sample_rate = self._rate
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, self._rate)
        self._pts += len(wave)
        self._container.mux(self._stream.encode(frame))

    def close(self) -> None:
        self._container.mux(self._stream.encode(None))
        self._container.close()


class Tempo:
    """Pitch-preserving speed change with FFmpeg's `atempo`, fed chunk by chunk.

    atempo takes factors in [0.5, 100] per instance, so 0.25 is two chained 0.5 stages.
    """

    def __init__(self, sample_rate: int, speed: float):
        self._rate = sample_rate
        self._pts = 0
        self._graph = av.filter.Graph()
        node = self._graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono",
                                       time_base=fractions.Fraction(1, sample_rate))
        for factor in _atempo_factors(speed):
            stage = self._graph.add("atempo", f"{factor:.6f}")
            node.link_to(stage)
            node = stage
        sink = self._graph.add("abuffersink")
        node.link_to(sink)
        self._graph.configure()

    def process(self, wave: np.ndarray) -> np.ndarray:
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        if not len(wave):
            return wave
        frame = av.AudioFrame.from_ndarray(wave[None, :], format="flt", layout="mono")
        frame.sample_rate = self._rate
        frame.pts = self._pts
        self._pts += len(wave)
        self._graph.push(frame)
        return self._pull()

    def finish(self) -> np.ndarray:
        self._graph.push(None)
        return self._pull()

    def _pull(self) -> np.ndarray:
        parts = []
        while True:
            try:
                frame = self._graph.pull()
            except (av.BlockingIOError, av.EOFError):
                break
            parts.append(frame.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _atempo_factors(speed: float) -> list[float]:
    factors = []
    while speed < 0.5:
        factors.append(0.5)
        speed /= 0.5
    return factors + [speed]

