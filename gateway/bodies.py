"""Reading a request body as JSON, with the 400 every front gives for one that is not.

Why here: every HTTP front reads its body the same way (the size cap is the guard middleware's);
a front imports no other front.  Event loop.
"""

from __future__ import annotations

import json

from fastapi import Request

from gateway.errors import HTTPError


async def read_json(request: Request):
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"request body is not valid JSON: {e}", type_="invalid_request_error",
                        code="invalid_json") from None
    except RecursionError:
        raise HTTPError(400, "request body nests JSON too deeply", type_="invalid_request_error",
                        code="invalid_json") from None


def credential(request: Request) -> str:
    """The credential a request presented (bearer token or ``x-api-key``): stored responses and
    completions are namespaced by it, so one key never reads another's."""
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
