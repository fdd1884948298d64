"""``kill -USR1`` on a running service writes every thread's stack to its log, and it keeps serving."""

from __future__ import annotations

import signal
import time

import openai
import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("name", ["decoder", "encoder", "gateway"])
def test_sigusr1_dumps_every_thread_and_the_service_keeps_serving(services_e2b, name):
    before = services_e2b.logs(name).count("Current thread") + services_e2b.logs(name).count("Thread 0x")
    services_e2b.procs[name].send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = services_e2b.logs(name)
        if text.count("Current thread") + text.count("Thread 0x") > before and "File " in text:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"no stack dump in the {name} log")
    assert "(most recent call first)" in text
    client = openai.OpenAI(base_url=services_e2b.base_url, api_key="x", max_retries=0)
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length") and services_e2b.procs[name].poll() is None
