"""Real-world JSON Schemas (JSONSchemaBench's four categories, ``../shared/fixtures/jsonschemabench``)
through the two constrained paths, with no model: a random walk through llguidance's token mask is
what a random-weight model writes, so every walk that ends must read back and validate.

* as a tool's ``parameters``: the forced-call grammar (``gateway.tools.grammar``), each finished walk
  parsed by ``tool_calls.parse_call`` (and streamed through ``ToolCallParser``: the same JSON);
* as ``response_format``: the decoder's ``ConstraintCompiler``, each finished walk ``json.loads``-ed;

then ``jsonschema`` against the schema.  Walks that hit the step bound are counted, not failed;
walks llguidance itself abandons mid-way (an engine limit) are counted too and, on the tool path,
failed.  A fixed stride of each category keeps it under a minute."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.tooling.bench_schema_coverage import CATEGORIES, ROOT, is_object_schema, load_category

PER_CATEGORY = 150  # schemas taken from each category (a fixed stride through it)
WALKS = 3  # random walks per schema and path
STEPS = 300  # tokens (bytes, in the tiny tokenizer) a walk may take

pytestmark = pytest.mark.skipif(not ROOT.is_dir(), reason=f"{ROOT} (the JSONSchemaBench corpus) is absent")


@pytest.fixture(scope="module")
def walker(tmp_path_factory):
    from tests.tooling.schema_walk import Walker

    return Walker(tmp_path_factory.mktemp("tok") / "tok")


def _sample(cat: str) -> list:
    data = load_category(cat)
    return data[:: max(1, len(data) // PER_CATEGORY)][:PER_CATEGORY]


@pytest.mark.parametrize("cat", CATEGORIES)
def test_random_walks_through_the_corpus_read_back_and_validate(walker, cat):
    from decoder_service.constraints import ConstraintCompiler
    from gateway.errors import HTTPError
    from mmserve_core.wire.errors import InvalidArgument
    from mmserve_core.wire.types import Constraint
    from tests.tooling.schema_walk import Tally, check_json_walk, check_tool_walk, tool_grammar_of

    compiler = ConstraintCompiler(walker.hf, 512, [1, 106, 50])
    rng = np.random.default_rng(0)
    tools, answers = Tally(), Tally()
    refused = {"tool": 0, "json": 0}
    t0 = time.perf_counter()
    for sid, schema in _sample(cat):
        if is_object_schema(schema):
            try:
                g = tool_grammar_of(schema)
            except HTTPError:
                refused["tool"] += 1
            else:
                tools.add(check_tool_walk(walker, sid, schema, g, rng, WALKS, STEPS))
        try:
            g = compiler.compile(Constraint("json_schema", json.dumps(schema))).grammar
        except InvalidArgument:
            refused["json"] += 1
        else:
            answers.add(check_json_walk(walker, sid, schema, g, rng, WALKS, STEPS))
    took = time.perf_counter() - t0
    for what, t in (("tool call", tools), ("response_format", answers)):
        print(f"{cat} {what}: {t.walks} walks, {t.valid} valid, {len(t.invalid)} invalid, {t.bounded} hit the "
              f"{STEPS}-step bound, {len(t.gave_up)} abandoned by llguidance, {len(t.unjudged)} unjudged; "
              f"{refused['tool' if what == 'tool call' else 'json']} schemas refused; {took:.1f} s")
    assert not tools.invalid, tools.invalid[:3]
    assert not answers.invalid, answers.invalid[:3]
    assert not tools.gave_up, tools.gave_up[:3]
    assert tools.valid > WALKS * PER_CATEGORY // 4 and answers.valid > WALKS * PER_CATEGORY // 4
    assert tools.bounded < tools.walks // 4  # the walks mostly finish: the check has teeth
