"""Which real-world JSON Schemas the server enforces: as ``response_format`` and as a tool's
``parameters`` (``python -m tests.tooling.bench_schema_coverage``).

Prints a table, not a timed test.  Over the four JSONSchemaBench categories in
``../shared/fixtures/jsonschemabench/`` it counts, per category:

* ``llg`` — llguidance alone compiles the schema (``grammar_from_json_schema`` with the decoder's
  ``_JSON_OPTIONS``, then ``validate_grammar`` against the tiny checkpoint's tokenizer);
* ``so`` — structured outputs accept it (the decoder's own ``ConstraintCompiler.compile`` of a
  ``json_schema`` constraint: whatever it does to the schema first, then llguidance);
* ``tool`` — the tool-call grammar accepts it as a tool's ``parameters`` (``tool_call_grammar``,
  ``tool_choice: required``) *and* llguidance compiles the resulting Lark.

Denominators: ``llg`` / ``so`` over all schemas of the category, and again over its *object
schemas* (``llg·obj``), the only ones a tool can take (``is_object_schema``: the top level, or the
target of a top-level local ``$ref``, declares type ``object`` — alone or in a list — or declares no
type but object keywords).  ``tool`` is over the object schemas, so ``tool`` vs ``llg·obj`` is the
like-for-like comparison.  Then the ten most frequent tool-grammar refusals (path stripped).

``--tool-grammar FILE`` / ``--constraints FILE`` load another version of ``gateway/tools/grammar.py``
/ ``decoder_service/constraints.py`` (e.g. ``git show HEAD:gateway/tools/grammar.py > /tmp/tg.py``)
to compare before and after.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "jsonschemabench"
CATEGORIES = ("Github_trivial", "Github_easy", "Github_medium", "Glaiveai2K")
EOS = [1, 106, 50]  # the tiny checkpoint's stop ids (config.json's union)


def load_category(name: str, root: Path = ROOT) -> list[tuple[str, object]]:
    with gzip.open(root / f"{name}.jsonl.gz", "rt") as f:
        return [(r["id"], r["schema"]) for r in map(json.loads, f)]


def tiny_tokenizer(out: Path):
    """The tiny checkpoint's tokenizer (only its tokenizer files: no weights), as the services load it."""
    from transformers import AutoTokenizer

    from tests.tooling.tiny_checkpoint import _write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out, "e2b")
    return AutoTokenizer.from_pretrained(out)


def is_object_schema(s) -> bool:
    """The schema can only be an object at the top (what a tool's ``parameters`` must be)."""
    if not isinstance(s, dict):
        return False
    ref = s.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and "type" not in s:
        target = s
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict) and target is not s:
            return is_object_schema(target)
    t = s.get("type")
    if t is None:
        return any(k in s for k in ("properties", "additionalProperties", "required", "patternProperties"))
    return t == "object" or (isinstance(t, list) and "object" in t)


def _load(path: str | None, module: str):
    if path is None:
        return importlib.import_module(module)
    spec = importlib.util.spec_from_file_location(f"_bench_{module.replace('.', '_')}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


_PATH = re.compile(r"tools\[0\]\.function\.parameters[^\s:,;]*")


def normalise(message: str) -> str:
    """A refusal without its path (the keyword it names stays: the path's last segment)."""
    def last(m: re.Match) -> str:
        tail = m.group(0)[len("tools[0].function.parameters"):]
        seg = re.split(r"\.(?![^\[]*\])", tail)[-1] if tail else ""
        seg = re.sub(r"\[\d+\]", "[i]", seg)
        return f"…{('.' + seg) if seg else ''}"
    return _PATH.sub(last, message)[:140]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tool-grammar", help="another gateway/tools/grammar.py to load instead")
    ap.add_argument("--constraints", help="another decoder_service/constraints.py to load instead")
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--limit", type=int, default=0, help="the first N schemas of each category (0: all)")
    ap.add_argument("--dump", type=Path, help="write each schema's verdicts as JSON lines here")
    args = ap.parse_args(argv)
    if not args.root.is_dir():
        print(f"{args.root} is absent", file=sys.stderr)
        return 2

    from llguidance import LLMatcher

    from gateway.errors import HTTPError
    from mmserve_core.wire.errors import InvalidArgument
    from mmserve_core.wire.types import Constraint, Tool

    tg = _load(args.tool_grammar, "gateway.tools.grammar")
    cons = _load(args.constraints, "decoder_service.constraints")
    markers = tg.Markers(call_open=48, call_close=49, quote=52, channel_open=100, channel_close=101)
    with tempfile.TemporaryDirectory() as d:
        hf = tiny_tokenizer(Path(d) / "tok")
    compiler = cons.ConstraintCompiler(hf, 512, EOS)
    tok = compiler.tokenizer
    options = getattr(cons, "_JSON_OPTIONS", {"whitespace_flexible": False})

    def llg(schema) -> bool:
        try:
            g = LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except Exception:  # noqa: BLE001 - any refusal counts as not compiled
            return False
        return not LLMatcher.validate_grammar(g, tok)

    def so(schema) -> bool:
        try:
            compiler.compile(Constraint("json_schema", json.dumps(schema)))
        except InvalidArgument:
            return False
        return True

    def tool(schema) -> str | None:
        try:
            lark = tg.tool_call_grammar([Tool("f", "", schema)], markers, choice="required")
        except HTTPError as e:
            return normalise(str(e.message if hasattr(e, "message") else e))
        try:
            g = LLMatcher.grammar_from_lark(lark)
        except Exception as e:  # noqa: BLE001
            return f"llguidance: {str(e)[:100]}"
        err = LLMatcher.validate_grammar(g, tok)
        return f"llguidance: {err.strip()[:100]}" if err else None

    rows, refusals = [], collections.Counter()
    dump = args.dump.open("w") if args.dump else None
    t0 = time.perf_counter()
    for cat in CATEGORIES:
        data = load_category(cat, args.root)
        if args.limit:
            data = data[: args.limit]
        n = n_obj = c_llg = c_so = c_llg_obj = c_so_obj = c_tool = 0
        for sid, schema in data:
            a, b = llg(schema), so(schema)
            n += 1
            c_llg += a
            c_so += b
            verdict = None
            if is_object_schema(schema):
                n_obj += 1
                c_llg_obj += a
                c_so_obj += b
                verdict = tool(schema)
                if verdict is None:
                    c_tool += 1
                else:
                    refusals[verdict] += 1
            if dump:
                dump.write(json.dumps({"id": sid, "llg": a, "so": b, "object": is_object_schema(schema),
                                       "tool": verdict}) + "\n")
        rows.append((cat, n, c_llg, c_so, n_obj, c_llg_obj, c_so_obj, c_tool))

    def pct(a: int, b: int) -> str:
        return f"{a:5d} {100 * a / b:5.1f}%" if b else f"{a:5d}   -  "

    head = (f"{'category':15s} {'schemas':>7s} {'llg':>12s} {'so':>12s} | {'objects':>7s} {'llg·obj':>12s} "
            f"{'so·obj':>12s} {'tool':>12s} {'tool-llg':>8s}")
    print(head)
    print("-" * len(head))
    tot = [0] * 7
    for cat, *vals in rows:
        n, c_llg, c_so, n_obj, c_llg_obj, c_so_obj, c_tool = vals
        tot = [x + y for x, y in zip(tot, vals)]
        gap = 100 * (c_tool - c_llg_obj) / n_obj if n_obj else 0.0
        print(f"{cat:15s} {n:7d} {pct(c_llg, n)} {pct(c_so, n)} | {n_obj:7d} {pct(c_llg_obj, n_obj)} "
              f"{pct(c_so_obj, n_obj)} {pct(c_tool, n_obj)} {gap:+7.1f}")
    n, c_llg, c_so, n_obj, c_llg_obj, c_so_obj, c_tool = tot
    print("-" * len(head))
    print(f"{'all':15s} {n:7d} {pct(c_llg, n)} {pct(c_so, n)} | {n_obj:7d} {pct(c_llg_obj, n_obj)} "
          f"{pct(c_so_obj, n_obj)} {pct(c_tool, n_obj)} {100 * (c_tool - c_llg_obj) / n_obj:+7.1f}")
    print(f"\n(llg, so: of all schemas; llg·obj, so·obj, tool: of the object schemas; {time.perf_counter() - t0:.0f} s)")
    print("\nmost frequent tool-grammar refusals:")
    for msg, k in refusals.most_common(10):
        print(f"{k:6d}  {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
