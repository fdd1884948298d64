"""MTP drafting through the services: the same replies as without a drafter, on both real Gemma 4
template generations, for text, image, audio, image + audio and a tool call, alone and together.

Each template gets two stacks on one float32 tiny checkpoint shipping that template — the decoder
of one started with ``--draft-model`` (a random drafter from ``tiny_checkpoint --drafter-for``) — and
every request goes to both through the ``openai`` client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from deploy.processes import start_services
from tests.helpers import audio_part, image_part, text_part
from tests.tooling.tiny_checkpoint import write_tiny_checkpoint, write_tiny_drafter

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "gemma4"
TEMPLATES = ["chat_template.e-series.jinja", "chat_template.31b.jinja"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"{FIXTURES} (the real templates) is absent")


@pytest.fixture(scope="module", params=TEMPLATES)
def stacks(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("draft-e2e")
    ckpt = write_tiny_checkpoint(root / "ckpt", dtype="float32", chat_template=(FIXTURES / request.param).read_text())
    drafter = write_tiny_drafter(root / "drafter", ckpt, seed=3)
    with start_services(ckpt) as plain, start_services(ckpt, decoder_args=["--draft-model", str(drafter)]) as drafting:
        yield plain, drafting


def _requests(media_dir: Path) -> list[dict]:
    user = [
        "Tell me something.",
        [text_part("What is this?"), image_part(media_dir / "red_circle.png")],
        [audio_part(media_dir / "tone_2s.wav"), text_part("What do you hear?")],
        [image_part(media_dir / "blue_square.jpg"), audio_part(media_dir / "tone_0p7s.wav")],
    ]
    out = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": u}]} for u in user]
    out.append({"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS,
                "tool_choice": "required"})
    return out


async def _ask(base_url: str, reqs: list[dict], together: bool) -> list[tuple]:
    client = AsyncOpenAI(base_url=base_url, api_key="x")

    async def one(r):
        c = await client.chat.completions.create(model="m", temperature=0, max_tokens=40, **r)
        m = c.choices[0].message
        calls = [(t.function.name, t.function.arguments) for t in m.tool_calls or []]
        return m.content, calls, c.usage.completion_tokens, (c.model_extra or {}).get("timings", {})

    try:
        if together:
            return list(await asyncio.gather(*(one(r) for r in reqs)))
        return [await one(r) for r in reqs]
    finally:
        await client.close()


@pytest.mark.parametrize("together", [False, True])
def test_replies_are_the_same_with_the_drafter(stacks, media_dir, together):
    plain, drafting = stacks
    reqs = _requests(media_dir)
    want = asyncio.run(_ask(plain.base_url, reqs, together))
    got = asyncio.run(_ask(drafting.base_url, reqs, together))
    for w, g in zip(want, got):
        assert g[:3] == w[:3]
        assert w[3]["draft_tokens"] == 0 and g[3]["draft_tokens"] >= g[3]["draft_accepted_tokens"]
    assert sum(g[3]["draft_tokens"] for g in got) > 0  # the drafter really drafted
    assert want[4][1] and want[4][1][0][0] == "get_weather"
