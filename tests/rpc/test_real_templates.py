"""The real Gemma 4 chat templates (both generations) written into tiny checkpoints: the gateway's
prompt layout renders exactly what the template renders, media blocks inside the user turn."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from gateway.openai_schema import parse_chat_request
from mmserve_core.prompt import PromptBuilder
from mmserve_core.wire.types import MediaTokens
from tests.helpers import image_part, text_part
from tests.tooling.tiny_checkpoint import IDS, write_tiny_checkpoint

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "gemma4"
TEMPLATES = ["chat_template.e-series.jinja", "chat_template.31b.jinja"]
IMG = MediaTokens(IDS["<|image|>"], IDS["<|image>"], IDS["<image|>"])

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"{FIXTURES} (the real templates) is absent")


@pytest.fixture(scope="module", params=TEMPLATES)
def real(request, tmp_path_factory):
    text = (FIXTURES / request.param).read_text()
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("real") / request.param.split(".")[1], chat_template=text)
    return request.param, AutoTokenizer.from_pretrained(ckpt)


def test_the_checkpoint_ships_the_template(real):
    name, tok = real
    assert tok.chat_template == (FIXTURES / name).read_text()


def test_prompt_ids_equal_the_templates_own_rendering(real, media_dir):
    """Text-only and with an image: our ids == the template's text tokenized (placeholders expanded)."""
    _, tok = real
    builder = PromptBuilder(tok, {"image": IMG})
    for content in (["Hello there"], [text_part("Look:"), image_part(media_dir / "red_circle.png")]):
        msgs = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": content if isinstance(content[0], dict) else content[0]}]
        req = parse_chat_request({"messages": msgs})
        rendered = builder.render(req.messages)
        rows = [5] * len(req.media)
        built = builder.build(rendered, [("image", p.param, (r,), "h") for p, r in zip(req.media, rows)])
        tmpl = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else [
            {"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": "image"}
            for p in m["content"]]} for m in msgs]
        text = tok.apply_chat_template(tmpl, tokenize=False, add_generation_prompt=True)
        want = tok.encode(text, add_special_tokens=False)
        expanded = []
        for t in want:  # the template's single placeholder becomes begin + rows x placeholder + end
            expanded += [IMG.begin, *[IMG.placeholder] * 5, IMG.end] if t == IMG.placeholder else [t]
        assert built.ids == expanded
        for s in built.spans:  # inside the user turn: after its <|turn>user, before its <turn|>
            turn = max(i for i, t in enumerate(built.ids[: s.offset]) if t == IDS["<|turn>"])
            assert built.ids[turn + 1: turn + 2] == tok.encode("user", add_special_tokens=False)[:1]
            assert IDS["<turn|>"] not in built.ids[turn: s.offset]
