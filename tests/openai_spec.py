"""OpenAI's own OpenAPI document as a validator for what the OpenAI fronts return.

Why: a reply that the ``openai`` SDK happens to parse can still break a stricter client (a
generated one, a typed agent framework); the reference is OpenAI's published document
(``../shared/fixtures/openai/openapi.yaml.gz``).  ``OpenAISpec.errors(name, value)`` validates
``value`` against ``components.schemas[name]`` with every ``$ref`` resolved (JSON Schema 2020-12;
the document's OpenAPI-3.0 ``nullable: true`` read as "or null").  ``sse_errors`` checks a stream's
events.  Test tooling only: imported by tests, never by a service.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

SPEC = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "openai" / "openapi.yaml.gz"


def _nullable(x: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` → JSON Schema's ``anyOf [schema, null]`` (recursively)."""
    if isinstance(x, list):
        return [_nullable(v) for v in x]
    if not isinstance(x, dict):
        return x
    out = {k: _nullable(v) for k, v in x.items() if k != "nullable"}
    if x.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


class OpenAISpec:
    def __init__(self, path: Path = SPEC) -> None:
        import yaml

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        doc = yaml.load(gzip.open(path, "rt"), Loader=loader)
        self.components = {"schemas": _nullable(doc["components"]["schemas"])}
        self.paths = doc["paths"]

    @functools.cache  # noqa: B019 - one spec object per session
    def validator(self, name: str):
        from jsonschema import Draft202012Validator

        if name not in self.components["schemas"]:
            raise KeyError(f"OpenAI's document has no schema {name!r}")
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "components": self.components,
                  "$ref": f"#/components/schemas/{name}"}
        return Draft202012Validator(schema)

    def member(self, union: str, type_: str) -> str | None:
        """The schema of ``union`` (a oneOf/anyOf of ``$ref``s, such as ``ResponseStreamEvent``) whose
        ``type`` is ``type_`` — validating against it names the real fault, not "none matched"."""
        s = self.components["schemas"][union]
        for alt in s.get("anyOf") or s.get("oneOf") or []:
            name = alt.get("$ref", "").rsplit("/", 1)[-1]
            t = self.components["schemas"].get(name, {}).get("properties", {}).get("type", {})
            if type_ in (t.get("enum") or []) or t.get("const") == type_:
                return name
        return None

    def errors(self, name: str, value: Any) -> list[str]:
        """Every violation of ``name``'s schema by ``value``, as ``path: message`` lines."""
        out = []
        for e in self.validator(name).iter_errors(value):
            # a failed anyOf/oneOf says only "not valid under any"; its best branch says why
            best = min(e.context, key=lambda c: len(list(c.relative_path)) * -1, default=None) if e.context else None
            where = "/".join(str(p) for p in e.absolute_path) or "(top)"
            out.append(f"{where}: {e.message[:300]}" + (f" [best branch: {best.message[:200]}]" if best else ""))
        return out


def sse_payloads(text: str) -> list[tuple[str | None, Any]]:
    """``(event name or None, parsed data)`` per SSE event; ``[DONE]`` kept as the string."""
    out = []
    for block in text.split("\n\n"):
        event, data = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            raw = "\n".join(data)
            out.append((event, raw if raw == "[DONE]" else json.loads(raw)))
    return out
