"""The demo model's generated tasks: deterministic by seed, and rendered with media inside the user turn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from deploy.demo import tasks
from deploy.demo.checkpoint_path import demo_checkpoint
from tests.tooling.demo_training.sequences import Sequencer


def test_images_are_a_function_of_the_seed():
    a, la = tasks.shape_image(np.random.default_rng(3))
    b, lb = tasks.shape_image(np.random.default_rng(3))
    c, _ = tasks.shape_image(np.random.default_rng(4))
    assert la == lb and np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    colour, shape = la.split()
    assert colour in tasks.COLORS and shape in tasks.SHAPES


def test_text_answers():
    rng = np.random.default_rng(0)
    seen = {tasks.make_example("text", rng).answer for _ in range(200)}
    assert tasks.REFUSAL in seen and seen <= {tasks.REFUSAL, *tasks.CANNED.values()} and len(seen) >= 3


@pytest.mark.skipif(not tasks.have_espeak(), reason="espeak-ng is not installed")
def test_both_answers_follow_the_order_of_the_media():
    rng = np.random.default_rng(1)
    for _ in range(6):
        ex = tasks.make_example("both", rng)
        order = [k for k, _ in ex.parts if k != "text"]
        first = ex.answer.split(", ")[0]
        assert (first in tasks.DIGITS) == (order[0] == "audio"), (order, ex.answer)


def test_training_sequences_put_media_inside_the_user_turn():
    ckpt = demo_checkpoint()
    config = json.loads((ckpt / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    seq = Sequencer(tok, config, 16, 25)
    rng = np.random.default_rng(2)
    im, label = tasks.shape_image(rng)
    s = seq.sequence(tasks.Example("image", [("text", "What is this?"), ("image", im)], label))
    ids = s.prompt
    user = ids.index(tok.convert_tokens_to_ids("<|turn>"))
    end = ids.index(tok.convert_tokens_to_ids("<turn|>"))
    boi = ids.index(config["boi_token_id"])
    assert user < boi < end and ids.count(config["image_token_id"]) == 16
    assert tok.decode(s.answer) == label + "<turn|>"


def test_misplaced_training_negatives_move_the_block_out_of_the_user_turn():
    from mmserve_core.prompt import MediaTokens
    from tests.tooling.demo_training.sequences import misplace

    media = {"image": MediaTokens(9, 7, 8)}
    ids = [2, 105, 50, 7, 9, 9, 8, 51, 106, 105, 60]  # <bos> <|turn>user text [block] text <turn|> <|turn>model
    assert misplace(ids, "user", media) == ids
    assert misplace(ids, "after_bos", media) == [2, 7, 9, 9, 8, 105, 50, 51, 106, 105, 60]
    assert misplace(ids, "model_turn", media) == [2, 105, 50, 51, 106, 105, 60, 7, 9, 9, 8]
    if not tasks.have_espeak():  # half of the negatives are clips
        return
    ex = tasks.make_example("misplaced", np.random.default_rng(0))
    assert ex.answer == tasks.NO_MEDIA and ex.placement in ("after_bos", "model_turn") and ex.media_answer
