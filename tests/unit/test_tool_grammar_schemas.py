"""JSON Schema -> Gemma 4 call-syntax grammar (``gateway.tools.grammar``), rule by rule: each test
builds the grammar a forced call gets and asks llguidance (with the tiny checkpoint's tokenizer)
which call texts it allows — and what ``tool_calls.parse_call`` makes of them validates.  Plus the
structured-output side (``decoder_service.constraints``): unknown formats, exact oneOf, compact JSON.
No model, no services."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from gateway.errors import HTTPError
from gateway.tools.grammar import Markers, tool_call_grammar
from gateway.tools.parser import parse_call
from mmserve_core.wire.types import Constraint, Tool

Q = '<|"|>'
MK = Markers(call_open=48, call_close=49, quote=52, channel_open=100, channel_close=101)


@pytest.fixture(scope="module")
def walker(tmp_path_factory):
    from tests.tooling.schema_walk import Walker

    return Walker(tmp_path_factory.mktemp("tok") / "tok")


def grammar(schema, **kw) -> str:
    from llguidance import LLMatcher

    kw.setdefault("choice", "required")
    kw.setdefault("parallel", False)
    return LLMatcher.grammar_from_lark(tool_call_grammar([Tool("f", "", schema)], MK, **kw))


def allows(walker, g: str, text: str) -> bool:
    """The grammar lets a model write exactly ``text`` (and then stop)."""
    from llguidance import LLMatcher

    m = LLMatcher(walker.tok, g, log_level=0)
    ids = walker.hf.encode(text, add_special_tokens=False)
    if m.validate_tokens(ids) < len(ids):
        return False
    m.consume_tokens(ids)
    return m.is_accepting()


def call(args: str) -> str:
    return f"<|tool_call>call:f{args}<tool_call|>"


def refused(schema, **kw) -> HTTPError:
    with pytest.raises(HTTPError) as e:
        tool_call_grammar([Tool("f", "", schema)], MK, choice="required", **kw)
    assert e.value.status == 400
    return e.value


def walks_validate(walker, schema, n: int = 40, seed: int = 0) -> int:
    """``n`` random walks through the grammar's mask; every finished one parses and validates."""
    g, rng, done = grammar(schema), np.random.default_rng(seed), 0
    for _ in range(n):
        ids, how = walker.walk(g, rng, 400)
        assert how != "error", walker.error
        if how == "end":
            text = walker.text(ids)
            args = json.loads(parse_call(text[len("<|tool_call>"):-len("<tool_call|>")]).arguments)
            jsonschema.validate(args, schema)
            done += 1
    return done


# ----------------------------------------------------------------------------- $ref / definitions
def test_local_refs_and_definitions_are_inlined(walker):
    schema = {"type": "object", "definitions": {"unit": {"enum": ["c", "f"]}},
              "$defs": {"day": {"type": "integer", "minimum": 1, "maximum": 7}},
              "properties": {"unit": {"$ref": "#/definitions/unit"}, "day": {"$ref": "#/$defs/day"},
                             "copy": {"$ref": "#/properties/day"}},
              "required": ["unit", "day"]}
    g = grammar(schema)
    assert allows(walker, g, call(f"{{day:3,unit:{Q}c{Q}}}"))
    assert allows(walker, g, call(f"{{copy:7,day:3,unit:{Q}f{Q}}}"))
    assert not allows(walker, g, call(f"{{day:8,unit:{Q}c{Q}}}"))
    assert not allows(walker, g, call(f"{{day:3,unit:{Q}k{Q}}}"))
    assert walks_validate(walker, schema) > 20


def test_a_recursive_ref_is_a_recursive_rule(walker):
    schema = {"type": "object", "properties": {"root": {"$ref": "#/definitions/node"}}, "required": ["root"],
              "definitions": {"node": {"type": "object", "required": ["name"], "properties": {
                  "name": {"type": "string", "maxLength": 3},
                  "kids": {"type": "array", "items": {"$ref": "#/definitions/node"}}}}}}
    g = grammar(schema)
    deep = f"{{root:{{kids:[{{kids:[{{kids:[{{name:{Q}d{Q}}}],name:{Q}c{Q}}}],name:{Q}b{Q}}}],name:{Q}a{Q}}}}}"
    assert allows(walker, g, call(deep))
    assert not allows(walker, g, call(f"{{root:{{kids:[{{kids:[]}}],name:{Q}a{Q}}}}}"))  # a kid without name
    assert walks_validate(walker, schema) > 20


def test_a_required_self_reference_has_no_finite_value_and_is_refused():
    schema = {"type": "object", "required": ["me"], "properties": {"me": {"$ref": "#"}}}
    e = refused(schema)
    assert e.param == "tools[0].function.parameters" and "finite" in e.message


def test_an_optional_self_reference_is_dropped_not_endless(walker):
    schema = {"type": "object", "properties": {"a": {"type": "integer"},
                                                "loop": {"$ref": "#/definitions/l"}},
              "definitions": {"l": {"type": "object", "required": ["next"], "properties": {"next": {"$ref": "#/definitions/l"}}}}}
    g = grammar(schema)
    assert allows(walker, g, call("{a:1}")) and allows(walker, g, call("{}"))
    assert not allows(walker, g, call("{a:1,loop:{}}"))


def test_anchor_refs_resolve(walker):
    schema = {"type": "object", "required": ["a", "b"], "properties": {"a": {"$ref": "#digit"}, "b": {"$ref": "#word"}},
              "definitions": {"d": {"id": "#digit", "type": "integer", "minimum": 0, "maximum": 9},
                              "w": {"$anchor": "word", "enum": ["x"]}}}
    g = grammar(schema)
    assert allows(walker, g, call(f"{{a:3,b:{Q}x{Q}}}")) and not allows(walker, g, call(f"{{a:10,b:{Q}x{Q}}}"))


def test_remote_and_unresolvable_refs_are_refused_by_path():
    e = refused({"type": "object", "properties": {"x": {"$ref": "http://example.com/s.json"}}})
    assert e.param == "tools[0].function.parameters.properties.x.$ref"
    e = refused({"type": "object", "properties": {"x": {"$ref": "#/definitions/nope"}}})
    assert e.param == "tools[0].function.parameters.properties.x.$ref"


# ----------------------------------------------------------------------------- annotations, types
def test_unknown_keywords_and_format_are_annotations(walker):
    schema = {"type": "object", "id": "thing", "self": {"href": "x"}, "$version": 2, "properties": {
        "mail": {"type": "string", "format": "email", "example": "a@b", "readOnly": True, "readonly": True},
        "when": {"type": "string", "format": "not-a-known-format"}}, "required": ["mail"]}
    g = grammar(schema)
    assert allows(walker, g, call(f"{{mail:{Q}not an email{Q},when:{Q}later{Q}}}"))


def test_per_type_keywords_apply_to_their_own_type(walker):
    schema = {"type": "object", "required": ["s"], "properties": {
        "s": {"type": ["string", "null"], "maxLength": 3, "minimum": 5, "required": ["x"]},
        "n": {"type": ["integer", "string"], "minimum": 5, "maxLength": 1}}}
    g = grammar(schema)
    assert allows(walker, g, call(f"{{s:{Q}abc{Q}}}")) and allows(walker, g, call("{s:null}"))
    assert not allows(walker, g, call(f"{{s:{Q}abcd{Q}}}"))
    assert allows(walker, g, call("{n:7,s:null}")) and allows(walker, g, call(f"{{n:{Q}x{Q},s:null}}"))
    assert not allows(walker, g, call("{n:4,s:null}")) and not allows(walker, g, call(f"{{n:{Q}xy{Q},s:null}}"))


def test_required_on_a_non_object_is_ignored_and_draft4_exclusive_flags_work(walker):
    schema = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object", "required": ["t"],
              "properties": {"t": {"type": "string", "required": ["nothing"]},
                             "p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1,
                                   "exclusiveMaximum": True}}}
    g = grammar(schema)
    assert allows(walker, g, call(f"{{p:0.5,t:{Q}x{Q}}}"))
    assert not allows(walker, g, call(f"{{p:0,t:{Q}x{Q}}}")) and not allows(walker, g, call(f"{{p:1,t:{Q}x{Q}}}"))
    # without "$schema" a draft 7 / 2020-12 validator reads true as 1: above 1 and below 1, no number
    del schema["$schema"]
    g = grammar(schema)
    assert allows(walker, g, call(f"{{t:{Q}x{Q}}}")) and not allows(walker, g, call(f"{{p:0.5,t:{Q}x{Q}}}"))


def test_what_an_older_draft_ignores_is_never_relied_on_for_one_of():
    """draft 4 has no const: both branches take any string, so 'exactly one' cannot be promised."""
    one_of = {"type": "object", "properties": {"v": {"oneOf": [{"type": "string", "const": "a"},
                                                                {"type": "string", "const": "b"}]}}}
    tool_call_grammar([Tool("f", "", one_of)], MK, choice="required")  # exclusive from draft 6 on
    e = refused({"$schema": "http://json-schema.org/draft-04/schema#", **one_of})
    assert e.param == "tools[0].function.parameters.properties.v.oneOf"
    # draft 7 ignores a $ref's siblings: these two branches are both just "#/definitions/s"
    by_ref = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "definitions": {
        "s": {"type": "object"}}, "properties": {"v": {"oneOf": [
            {"$ref": "#/definitions/s", "required": ["a"], "properties": {"a": {"const": 1}}},
            {"$ref": "#/definitions/s", "required": ["a"], "properties": {"a": {"const": 2}}}]}}}
    refused(by_ref)
    by_ref["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    tool_call_grammar([Tool("f", "", by_ref)], MK, choice="required")


def test_nullable_is_an_annotation_so_null_never_breaks_the_type(walker):
    g = grammar({"type": "object", "properties": {"s": {"type": "string", "nullable": True}}})
    assert allows(walker, g, call(f"{{s:{Q}x{Q}}}")) and not allows(walker, g, call("{s:null}"))


def test_keys_follow_the_templates_dictsort_which_ignores_case(walker):
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "A": {"type": "integer"},
                                                "c": {"type": "integer"}, "B2": {"type": "integer"}},
              "required": ["A", "b", "c", "B2"]}
    g = grammar(schema)
    assert allows(walker, g, call("{A:1,b:2,B2:4,c:3}"))  # Jinja's dictsort: case-insensitive by default
    assert not allows(walker, g, call("{A:1,B2:4,b:2,c:3}"))  # code-point order
    assert not allows(walker, g, call("{b:2,A:1,B2:4,c:3}"))


def test_unbounded_numbers_stay_within_a_double(walker):
    g = grammar({"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]})
    assert allows(walker, g, call("{x:-12.5e10}")) and allows(walker, g, call("{x:" + "9" * 400 + "}"))
    assert not allows(walker, g, call("{x:1e999}")) and not allows(walker, g, call("{x:" + "9" * 400 + ".5}"))


# ----------------------------------------------------------------------------- pattern
def test_pattern_is_an_unanchored_search_inside_the_delimiters(walker):
    schema = {"type": "object", "required": ["id", "tag"], "properties": {
        "id": {"type": "string", "pattern": "^[a-z]+-\\d{2}$"}, "tag": {"type": "string", "pattern": "ab+"}}}
    g = grammar(schema)
    assert allows(walker, g, call(f"{{id:{Q}xy-12{Q},tag:{Q}--abbb--{Q}}}"))
    assert not allows(walker, g, call(f"{{id:{Q}xy-1{Q},tag:{Q}ab{Q}}}"))
    assert not allows(walker, g, call(f"{{id:{Q}xy-12{Q},tag:{Q}ba{Q}}}"))
    # (a random walk seldom types "ab" by chance: walk the anchored one alone)
    assert walks_validate(walker, {**schema, "required": ["id"], "properties": {"id": schema["properties"]["id"]}}) > 20


def test_pattern_character_classes_mean_the_same_to_ecma_and_python(walker):
    """Clients validate with ECMA regexes or Python's ``re``: a string the grammar allows matches both."""
    from llguidance import LLMatcher

    from gateway.tools.ecma_regex import search_regex

    def rx_allows(pattern: str, text: str) -> bool:
        return allows(walker, LLMatcher.grammar_from_lark(f"start: X\nX: /{search_regex(pattern)}/\n"), text)

    assert rx_allows("^[^\\s]+$", "ab") and not rx_allows("^[^\\s]+$", "a\x1cb")  # \x1c: space to Python
    assert rx_allows("^\\S+$", "ab") and not rx_allows("^\\S+$", "a\x1fb")
    assert not rx_allows("^[^\\d]$", "\u0663") and not rx_allows("^\\D$", "\u0663")  # a digit to Python
    assert rx_allows("^\\d$", "7") and not rx_allows("^\\d$", "\u0663")  # not a digit to ECMA
    assert rx_allows("^a.b$", "a-b") and not rx_allows("^a.b$", "a\rb")  # ECMA's dot: no line terminator
    assert rx_allows("x|^y$", "--x--") and rx_allows("x|^y$", "y") and not rx_allows("x|^y$", "yy")
    for bad_pattern in ("(?=a)b", "(a)\\1", "\\bword", "a^b", "[]"):
        with pytest.raises(ValueError):
            search_regex(bad_pattern)


def test_a_pattern_it_cannot_translate_is_refused_naming_it():
    e = refused({"type": "object", "properties": {"x": {"type": "string", "pattern": "(?=a)b"}}})
    assert e.param == "tools[0].function.parameters.properties.x.pattern" and "look-around" in e.message


def test_a_string_no_text_satisfies_is_never_entered(walker):
    """Two patterns that exclude each other: the string's regex is empty, so the property is left out
    (optional) or the tool refused (required) — never a string the model could not finish."""
    both = {"type": "string", "pattern": "^a", "allOf": [{"pattern": "^b"}]}
    g = grammar({"type": "object", "properties": {"s": both, "n": {"type": "integer"}}})
    assert allows(walker, g, call("{n:1}")) and not allows(walker, g, call(f"{{n:1,s:{Q}a{Q}}}"))
    e = refused({"type": "object", "properties": {"s": both}, "required": ["s"]})
    assert e.param == "tools[0].function.parameters"


# ----------------------------------------------------------------------------- additionalProperties
def test_an_additional_properties_schema_types_every_extra_key(walker):
    schema = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
    g = grammar(schema)
    assert allows(walker, g, call("{}")) and allows(walker, g, call("{a:1,b_2:3}"))
    assert not allows(walker, g, call(f"{{a:{Q}x{Q}}}")) and not allows(walker, g, call("{a:-1}"))
    assert not allows(walker, g, call("{a:null}"))
    assert walks_validate(walker, {**schema, "minProperties": 1}) > 20


def test_additional_properties_false_closes_the_object(walker):
    g = grammar({"type": "object", "additionalProperties": False})
    assert allows(walker, g, call("{}")) and not allows(walker, g, call("{a:1}"))


def test_properties_with_an_additional_properties_schema(walker):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
              "additionalProperties": {"type": "boolean"}}
    g = grammar(schema)
    assert allows(walker, g, call(f"{{name:{Q}n{Q},x:true,y:false}}"))
    assert not allows(walker, g, call(f"{{name:{Q}n{Q},x:1}}"))
    assert not allows(walker, g, call(f"{{name:{Q}n{Q},name:true}}"))  # a declared key is never an extra one
    assert walks_validate(walker, schema) > 20


def test_pattern_properties_give_extra_keys_and_min_properties_counts(walker):
    schema = {"type": "object", "minProperties": 1, "additionalProperties": False,
              "patternProperties": {"^x_": {"type": "integer"}, "^y_": {"type": "boolean"}}}
    g = grammar(schema)
    assert allows(walker, g, call("{x_a:1,y_b:true}"))
    assert not allows(walker, g, call("{}")) and not allows(walker, g, call("{x_a:true}"))
    assert not allows(walker, g, call("{z:1}"))
    assert walks_validate(walker, schema) > 20
    e = refused({**schema, "minProperties": 2})  # two extra keys could be one key written twice
    assert e.param == "tools[0].function.parameters.minProperties"


# ----------------------------------------------------------------------------- anyOf / oneOf / allOf
def test_any_of_keeps_its_sibling_keywords(walker):
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
              "anyOf": [{"required": ["b"]}, {"properties": {"a": {"minimum": 10}}}]}
    g = grammar(schema)
    assert allows(walker, g, call(f"{{a:1,b:{Q}x{Q}}}")) and allows(walker, g, call("{a:11}"))
    assert not allows(walker, g, call("{a:1}"))  # neither branch: b missing and a below 10
    assert not allows(walker, g, call(f"{{b:{Q}x{Q}}}"))  # the sibling required a
    assert walks_validate(walker, schema) > 20


def test_one_of_with_exclusive_branches_is_exact(walker):
    by_type = {"type": "object", "properties": {"v": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}}
    assert walks_validate(walker, by_type) > 20
    tagged = {"type": "object", "required": ["shape"], "oneOf": [
        {"properties": {"kind": {"const": "circle"}, "r": {"type": "number"}}, "required": ["kind", "r"]},
        {"properties": {"kind": {"enum": ["square", "rect"]}, "side": {"type": "number"}}, "required": ["kind"]}],
        "properties": {"shape": {"type": "string"}}}
    g = grammar(tagged)
    assert allows(walker, g, call(f"{{kind:{Q}circle{Q},r:1,shape:{Q}s{Q}}}"))
    assert allows(walker, g, call(f"{{kind:{Q}rect{Q},shape:{Q}s{Q}}}"))
    assert not allows(walker, g, call(f"{{kind:{Q}circle{Q},shape:{Q}s{Q}}}"))  # circle needs r
    assert not allows(walker, g, call(f"{{kind:{Q}rect{Q},r:1}}"))  # the sibling required shape
    assert walks_validate(walker, tagged) > 20


def test_a_tagged_one_of_inside_a_recursive_definition(walker):
    node = {"type": "object", "required": ["kind"], "oneOf": [
        {"properties": {"kind": {"const": "leaf"}, "v": {"type": "integer"}}, "required": ["v"]},
        {"properties": {"kind": {"const": "pair"}, "l": {"$ref": "#/definitions/node", "description": "left"},
                        "r": {"$ref": "#/definitions/node"}}}]}
    schema = {"type": "object", "properties": {"root": {"$ref": "#/definitions/node"}}, "required": ["root"],
              "definitions": {"node": node}}
    g = grammar(schema)
    assert allows(walker, g, call(f"{{root:{{kind:{Q}pair{Q},l:{{kind:{Q}leaf{Q},v:1}}}}}}"))
    assert not allows(walker, g, call(f"{{root:{{kind:{Q}leaf{Q}}}}}"))
    assert walks_validate(walker, schema) > 20


def test_one_of_that_one_value_could_match_twice_is_refused():
    # {} matches both branches: "exactly one" cannot be promised
    e = refused({"type": "object", "oneOf": [{"properties": {"a": {"type": "string"}}},
                                             {"properties": {"b": {"type": "string"}}}]})
    assert e.param == "tools[0].function.parameters.oneOf" and "exclusive" in e.message
    e = refused({"type": "object", "properties": {"n": {"oneOf": [{"type": "number"}, {"type": "integer"}]}}})
    assert e.param == "tools[0].function.parameters.properties.n.oneOf"


def test_one_of_made_exclusive_by_not_required(walker):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "oneOf": [{"required": ["a"], "not": {"required": ["b"]}}, {"required": ["b"], "not": {"required": ["a"]}}]}
    g = grammar(schema)
    assert allows(walker, g, call("{a:1}")) and allows(walker, g, call("{b:1}"))
    assert not allows(walker, g, call("{a:1,b:2}")) and not allows(walker, g, call("{}"))
    assert walks_validate(walker, schema) > 20


def test_all_of_merges_exactly_or_is_refused(walker):
    schema = {"type": "object", "allOf": [
        {"properties": {"n": {"type": "integer", "minimum": 0, "multipleOf": 4}}, "required": ["n"]},
        {"properties": {"n": {"maximum": 20, "multipleOf": 6}, "s": {"type": "string", "maxLength": 2}}},
        {"properties": {"s": {"pattern": "^a"}}}]}
    g = grammar(schema)
    assert allows(walker, g, call("{n:12}")) and allows(walker, g, call(f"{{n:0,s:{Q}ab{Q}}}"))
    assert not allows(walker, g, call("{n:8}")) and not allows(walker, g, call("{n:24}"))
    assert not allows(walker, g, call(f"{{n:12,s:{Q}ba{Q}}}")) and not allows(walker, g, call(f"{{n:12,s:{Q}abc{Q}}}"))
    assert walks_validate(walker, schema) > 20
    e = refused({"type": "object", "allOf": [{"not": {"pattern": "x"}}]})
    assert e.param == "tools[0].function.parameters.allOf[0].not"


def test_dependencies_are_two_exact_branches(walker):
    schema = {"type": "object", "properties": {"card": {"type": "string"}, "cvv": {"type": "string"}},
              "dependencies": {"card": ["cvv"]}}
    g = grammar(schema)
    assert allows(walker, g, call(f"{{card:{Q}1{Q},cvv:{Q}2{Q}}}")) and allows(walker, g, call(f"{{cvv:{Q}2{Q}}}"))
    assert not allows(walker, g, call(f"{{card:{Q}1{Q}}}"))
    assert walks_validate(walker, schema) > 20


# ----------------------------------------------------------------------------- property names
def test_property_names_the_call_syntax_cannot_carry_are_refused_by_name():
    from gateway.tools.schema_grammar import key_problem as _key_problem

    e = refused({"type": "object", "properties": {"prov:wasGeneratedBy": {"type": "string"}}})
    assert e.param == "tools[0].function.parameters.properties.prov:wasGeneratedBy" and "':'" in e.message
    assert _key_problem(" padded") and _key_problem('"quoted"') and _key_problem("") and _key_problem("}x")
    assert _key_problem("a<|\"|>b")
    assert not _key_problem("a-b.c d/e@f$") and not _key_problem("ünïcode")


def test_keys_it_accepts_are_read_back_as_themselves(walker):
    keys = ["a-b", "x.y", "with space", "ünï", "$ref", "@id", "a,b", "1"]
    schema = {"type": "object", "properties": {k: {"const": i} for i, k in enumerate(keys)}, "required": keys}
    g = grammar(schema)
    body = ",".join(f"{k}:{keys.index(k)}" for k in sorted(keys, key=lambda k: (k.lower(), k)))
    assert allows(walker, g, call(f"{{{body}}}"))
    assert json.loads(parse_call(f"call:f{{{body}}}").arguments) == {k: i for i, k in enumerate(keys)}


# ----------------------------------------------------------------------------- the JSON answer beside tools
def test_the_answer_beside_tools_is_compact_json(walker):
    from llguidance import LLMatcher

    answer = Constraint("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                                   "required": ["a"]}))
    g = LLMatcher.grammar_from_lark(tool_call_grammar(
        [Tool("f", "", {"type": "object"})], MK, choice="auto", answer=answer))
    assert allows(walker, g, '{"a":1}') and allows(walker, g, call("{}"))
    for loose in ('{ "a":1}', '{"a": 1}', '{"a":1 }', '{"a":1}\n', '{\n"a":1}', '{\t"a":1}'):
        assert not allows(walker, g, loose), loose
    # a random walk (a random-weight model) ends instead of growing blanks
    rng = np.random.default_rng(0)
    ends = sum(walker.walk(g, rng, 200)[1] == "end" for _ in range(20))
    assert ends >= 15


def test_the_whole_grammar_still_has_the_call_markers_and_thought_channel(walker):
    g = grammar({"type": "object", "properties": {"q": {"type": "string", "maxLength": 2}}}, thinking=True)
    assert allows(walker, g, f"<|channel>thinking<channel|>{call('{q:' + Q + 'ab' + Q + '}')}")
    assert not allows(walker, g, call(f"{{q:{Q}abc{Q}}}"))


# ----------------------------------------------------------------------------- structured outputs
@pytest.fixture(scope="module")
def compiler(walker):
    from decoder_service.constraints import ConstraintCompiler

    return ConstraintCompiler(walker.hf, 512, [1, 106, 50])


def test_structured_outputs_treat_unknown_formats_as_annotations(compiler):
    schema = {"type": "object", "properties": {"u": {"type": "string", "format": "url"},
                                               "d": {"type": "string", "format": "date"},
                                               "format": {"type": "string"}}}
    compiled = compiler.compile(Constraint("json_schema", json.dumps(schema)))
    assert '"url"' not in compiled.grammar or "format" in compiled.grammar  # compiled, not refused


def test_structured_outputs_never_coerce_one_of_even_if_the_schema_asks(compiler, walker):
    from mmserve_core.wire.errors import InvalidArgument

    overlapping = {"x-guidance": {"coerce_one_of": True, "lenient": True},
                   "oneOf": [{"type": "object"}, {"type": "object", "required": ["a"]}]}
    with pytest.raises(InvalidArgument):
        compiler.compile(Constraint("json_schema", json.dumps(overlapping)))
    # exclusive branches behind $refs: compiled (llguidance sees them once inlined) and exact
    tagged = {"definitions": {"a": {"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
                              "b": {"type": "object", "properties": {"k": {"const": "b"}, "n": {"type": "integer"}},
                                    "required": ["k", "n"]}},
              "oneOf": [{"$ref": "#/definitions/a"}, {"$ref": "#/definitions/b"}]}
    g = compiler.compile(Constraint("json_schema", json.dumps(tagged))).grammar
    rng, done = np.random.default_rng(0), 0
    for _ in range(30):
        ids, how = walker.walk(g, rng, 200)
        if how == "end":
            jsonschema.validate(json.loads(walker.text(ids)), tagged)
            done += 1
    assert done > 15


def test_structured_outputs_refuse_a_min_properties_only_repeatable_keys_could_reach(compiler):
    """llguidance's JSON grammar does not keep extra keys apart: {"minProperties": 6} could come back
    as five keys, one written twice (measured on the live corpus run).  Refused, as on the tool path."""
    from mmserve_core.wire.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="distinct"):
        compiler.compile(Constraint("json_schema", json.dumps({"type": "object", "minProperties": 6})))
    compiler.compile(Constraint("json_schema", json.dumps({"type": "object", "minProperties": 1})))
    e = refused({"type": "object", "minProperties": 6})
    assert e.param == "tools[0].function.parameters.minProperties"
