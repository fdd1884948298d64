"""``POST /v1/audio/transcriptions`` through the official ``openai`` SDK: the demo model transcribes
held-out spoken digits from WAV and MP3; every field it cannot honour is a 400 naming it; a clip
longer than one audio block is served as consecutive blocks."""

from __future__ import annotations

import io

import httpx
import openai
import pytest
import soundfile as sf

from deploy.demo.checkpoint_path import demo_checkpoint
from deploy.demo.media import tone_wav
from deploy.processes import start_services

pytestmark = pytest.mark.e2e
SAMPLES = demo_checkpoint().parents[0] / "samples"
DEMO_INSTRUCTION = "Transcribe the clip."  # one of the phrasings the demo model was trained on


def _mp3(wav: bytes) -> bytes:
    data, rate = sf.read(io.BytesIO(wav))
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="MP3")
    return buf.getvalue()


@pytest.fixture(scope="module")
def demo_asr():
    with start_services(demo_checkpoint(), gateway_args=["--transcription-instruction", DEMO_INSTRUCTION]) as svc:
        yield svc


def test_the_demo_model_transcribes_spoken_digits_from_wav_and_mp3(demo_asr):
    client = openai.OpenAI(base_url=demo_asr.base_url, api_key="x", max_retries=0)
    samples = sorted(SAMPLES.glob("*.wav"))
    assert len(samples) >= 4
    for path in samples:
        digit = path.name.split("-")[0]
        wav = path.read_bytes()
        r = client.audio.transcriptions.create(model="tiny-gemma4-demo", file=(path.name, wav))
        assert r.text == digit, (path.name, r.text)
        text = client.audio.transcriptions.create(model="tiny-gemma4-demo", response_format="text",
                                                  file=(path.name.replace(".wav", ".mp3"), _mp3(wav)))
        assert text.strip() == digit, (path.name, text)


def _post(svc, files=None, data=None) -> httpx.Response:
    return httpx.post(svc.base_url + "/audio/transcriptions", timeout=120,
                      files=files or {"file": ("a.wav", tone_wav(1.0))}, data={"model": "m", **(data or {})})


@pytest.mark.parametrize("files, data, param", [
    (None, {"response_format": "verbose_json"}, "response_format"),
    (None, {"response_format": "srt"}, "response_format"),
    (None, {"response_format": "yaml"}, "response_format"),
    (None, {"timestamp_granularities[]": "word"}, "timestamp_granularities[]"),
    (None, {"stream": "maybe"}, "stream"),
    (None, {"include[]": "segments"}, "include[]"),
    (None, {"chunking_strategy": '{"type": "server_vad", "threshold": 0.5}'}, "chunking_strategy"),
    (None, {"language": "klingon"}, "language"),
    (None, {"temperature": "hot"}, "temperature"),
    ({"file": ("a.wav", b"RIFF....WAVEjunk")}, None, "file"),
    ({"file": ("a.wav", b"")}, None, "file"),
    ({"file": ("a.txt", b"hello world, not audio")}, None, "file"),
    ({"file": ("a.mp3", tone_wav(0.5))}, None, "file"),
    ({"file": ("a.wav", tone_wav(80.0))}, None, "file"),  # over the encoder's --max-audio-seconds (75 here)
    (None, {"model": "whisper-1"}, "model"),
])
def test_fields_it_cannot_honour_are_400_naming_them(services_e2b, files, data, param):
    r = _post(services_e2b, files, data)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_not_multipart_is_a_400(services_e2b):
    r = httpx.post(services_e2b.base_url + "/audio/transcriptions", timeout=30, content=b"{}",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text


def test_json_text_language_prompt_and_a_long_clip(services_e2b):
    client = openai.OpenAI(base_url=services_e2b.base_url, api_key="x", max_retries=0)
    r = client.audio.transcriptions.create(model="m", file=("a.wav", tone_wav(1.0)), language="en",
                                           prompt="Earlier: names were Ada and Bo.", temperature=0)
    assert isinstance(r.text, str)
    text = client.audio.transcriptions.create(model="m", file=("a.flac", tone_wav(1.0, fmt="FLAC")),
                                              response_format="text")
    assert isinstance(text, str)
    # 40 s: more than one 30 s audio block; served as consecutive blocks (40 ms a row -> 1000 rows)
    raw = _post(services_e2b, {"file": ("long.wav", tone_wav(40.0))}).json()
    assert raw["usage"]["input_tokens"] > 1000
