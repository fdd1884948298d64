"""The agent frameworks people build on, on their defaults, against the gateway: openai-agents (its
default Responses model and its chat-completions model), pydantic-ai (chat and Responses),
langchain-openai, langchain-anthropic, instructor and litellm — text, streaming, an image, a forced tool round trip, structured output to a
pydantic model, and the options they send (``store``, ``metadata``, ``reasoning_effort``,
``service_tier``, ``prompt_cache_key``).

The checkpoint has random weights: what it *says* is noise, so the tests check what the server
guarantees — replies the frameworks parse, calls that validate, outputs that validate.  A random
model rarely ends a turn or a string by itself, and openai-agents treats a reply cut by
``max_tokens`` as a failure, so a logit bias (``BIAS``) favours the end-of-turn token and the string
delimiters, as a trained model's answers end.  After a forced call, a random model asked again
(``tool_choice`` back to ``auto``) may start another call where a trained one would answer; a bias
against the call-open token keeps it answering — a forced call is still made, since the grammar
leaves that token the only one allowed.  Tracing and telemetry are off: nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import base64
import os

import pytest
from pydantic import BaseModel, Field

from deploy.demo.media import shape_png
from tests.tooling.tiny_checkpoint import IDS

pytestmark = pytest.mark.e2e
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm reads its cost map from the package
QUOTE_CHAR = 290  # '"' in the tiny tokenizer (checked in ``bias``)


@pytest.fixture(scope="module")
def bias(services_e2b) -> dict[str, float]:
    """Ends turns and strings soon, and never opens an unforced call (see the module docstring)."""
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(services_e2b.checkpoint).convert_tokens_to_ids('"') == QUOTE_CHAR
    return {str(IDS["<turn|>"]): 4, str(IDS['<|"|>']): 4, str(QUOTE_CHAR): 4, str(IDS["<|tool_call>"]): -100}


class City(BaseModel):
    name: str = Field(max_length=12)
    rank: int = Field(ge=0, le=9)


def get_weather(city: str) -> str:
    """The weather in a city now."""
    return f"sunny in {city}"


def _png_url() -> str:
    return "data:image/png;base64," + base64.b64encode(shape_png("red", "circle", (48, 48))).decode()


def _async_client(svc):
    import openai

    return openai.AsyncOpenAI(base_url=svc.base_url, api_key="x", max_retries=0)


# ---------------------------------------------------------------------------------------- openai-agents
@pytest.mark.parametrize("api", ["responses", "chat"])
def test_openai_agents(services_e2b, api, bias):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from agents.items import ToolCallOutputItem
    from openai.types.shared import Reasoning

    set_tracing_disabled(True)
    client = _async_client(services_e2b)
    model = (OpenAIResponsesModel(model="m", openai_client=client) if api == "responses"
             else OpenAIChatCompletionsModel(model="m", openai_client=client))
    # the options a production agent sets: reasoning, a tier, metadata, store, a cache key
    settings = ModelSettings(max_tokens=60, reasoning=Reasoning(effort="low"), store=True, metadata={"app": "t"},
                             extra_args={"service_tier": "flex", "prompt_cache_key": "agents"},
                             extra_body={"logit_bias": bias})
    short = ModelSettings(max_tokens=60, extra_body={"logit_bias": bias})

    async def go():
        plain = await Runner.run(Agent(name="a", instructions="Be brief.", model=model, model_settings=settings),
                                 "Say hi.")
        assert isinstance(plain.final_output, str)
        streamed = Runner.run_streamed(Agent(name="s", model=model, model_settings=short), "Count.")
        kinds = {ev.type async for ev in streamed.stream_events()}
        assert "raw_response_event" in kinds and isinstance(streamed.final_output, str)
        seen = await Runner.run(Agent(name="v", model=model, model_settings=short), [
            {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                         {"type": "input_image", "image_url": _png_url(), "detail": "low"}]}])
        assert isinstance(seen.final_output, str)
        tool_agent = Agent(name="t", model=model, tools=[function_tool(get_weather)], output_type=City,
                           model_settings=ModelSettings(tool_choice="required", max_tokens=80,
                                                        extra_body={"logit_bias": bias}))
        r = await Runner.run(tool_agent, "Weather in Paris?", max_turns=4)
        outputs = [i for i in r.new_items if isinstance(i, ToolCallOutputItem)]
        assert outputs and outputs[0].output.startswith("sunny in ")
        assert isinstance(r.final_output, City)  # the answer after the results, under the format

    asyncio.run(go())


# ---------------------------------------------------------------------------------------- pydantic-ai
@pytest.mark.parametrize("api", ["chat", "responses"])
def test_pydantic_ai(services_e2b, api, bias):
    from pydantic_ai import Agent, BinaryContent
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(openai_client=_async_client(services_e2b))
    model = OpenAIChatModel("m", provider=provider) if api == "chat" else OpenAIResponsesModel("m", provider=provider)
    short = {"max_tokens": 60, "extra_body": {"logit_bias": bias}}
    settings = {**short, "openai_reasoning_effort": "low", "openai_service_tier": "flex",
                "openai_prompt_cache_key": "pai"}

    async def go():
        r = await Agent(model, instructions="Be brief.", retries=4).run("Say hi.", model_settings=settings)
        assert isinstance(r.output, str)
        async with Agent(model, retries=4).run_stream("Count.", model_settings=short) as s:  # retries: see below
            text = "".join([d async for d in s.stream_text(delta=True)])
        assert isinstance(text, str)
        img = BinaryContent(data=shape_png("blue", "square", (48, 48)), media_type="image/png")
        # a random model may end a sampled reply before any text: pydantic-ai then asks again (its retries)
        r = await Agent(model, retries=4).run(["What is this?", img], model_settings=short)
        assert isinstance(r.output, str)
        # structured output: pydantic-ai's default is a forced ``final_result`` tool call
        r = await Agent(model, output_type=City).run("A city, please.", model_settings={**short, "max_tokens": 80})
        assert isinstance(r.output, City)
        # a tool round trip, then the structured answer
        calls: list[str] = []

        def weather(city: str) -> str:
            """The weather in a city now."""
            calls.append(city)
            return get_weather(city)

        agent = Agent(model, tools=[weather], output_type=City)
        r = await agent.run("Weather in Paris?", model_settings={**short, "max_tokens": 80})
        assert isinstance(r.output, City)

    asyncio.run(go())


# ---------------------------------------------------------------------------------------- langchain-openai
def test_langchain_openai(services_e2b, bias):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="m", base_url=services_e2b.base_url, api_key="x", max_retries=0, max_tokens=60,
                     logit_bias=bias,
                     reasoning_effort="low", service_tier="flex", store=True, metadata={"app": "lc"},
                     model_kwargs={"prompt_cache_key": "lc"})
    assert isinstance(llm.invoke("Say hi.").content, str)
    assert all(isinstance(ch.content, str) for ch in llm.stream("Count."))
    seen = llm.invoke([HumanMessage(content=[{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": _png_url()}}])])
    assert isinstance(seen.content, str)
    city = ChatOpenAI(model="m", base_url=services_e2b.base_url, api_key="x", max_tokens=80, logit_bias=bias,
                      max_retries=0).with_structured_output(City).invoke("A city, please.")
    assert isinstance(city, City)

    @tool
    def weather(city: str) -> str:
        """The weather in a city now."""
        return get_weather(city)

    forced = ChatOpenAI(model="m", base_url=services_e2b.base_url, api_key="x", max_tokens=80, max_retries=0,
                        logit_bias=bias)
    ask = [HumanMessage("Weather in Paris?")]
    ai = forced.bind_tools([weather], tool_choice="weather").invoke(ask)
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "weather" and isinstance(ai.tool_calls[0]["args"], dict)
    results = [ToolMessage(weather.invoke(c["args"]) if "city" in c["args"] else "?", tool_call_id=c["id"])
               for c in ai.tool_calls]
    final = forced.bind_tools([weather]).invoke([*ask, ai, *results])
    assert isinstance(final.content, str) and not final.tool_calls
    streamed = list(forced.bind_tools([weather], tool_choice="required").stream(ask))
    merged = streamed[0]
    for ch in streamed[1:]:
        merged = merged + ch
    assert merged.tool_calls and merged.tool_calls[0]["name"] == "weather"


# ---------------------------------------------------------------------------------------- instructor
@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA", "RESPONSES_TOOLS"])
def test_instructor(services_e2b, mode, bias):
    """instructor's default (a forced tool call), its JSON-schema mode and its Responses mode; the
    streamed partial objects read ``tool_calls[0]`` chunk by chunk (one entry per index per chunk).
    instructor 1.17 cannot share a venv with pydantic-ai 2.68 (jiter pins): it runs where the
    ``compat-instructor`` extra is installed instead of ``test`` (README)."""
    instructor = pytest.importorskip("instructor")
    import openai

    client = instructor.from_openai(openai.OpenAI(base_url=services_e2b.base_url, api_key="x", max_retries=0),
                                    mode=getattr(instructor.Mode, mode))
    ask = [{"role": "user", "content": "A city, please."}]
    if mode == "RESPONSES_TOOLS":
        city = client.responses.create(model="m", input=ask, response_model=City, max_output_tokens=80,
                                       max_retries=0, extra_body={"logit_bias": bias})
        assert isinstance(city, City)
        return
    city = client.chat.completions.create(model="m", messages=ask, response_model=City, max_tokens=80,
                                          max_retries=0, logit_bias=bias)
    assert isinstance(city, City)
    partials = list(client.chat.completions.create_partial(model="m", messages=ask, response_model=City,
                                                           max_tokens=80, max_retries=0, logit_bias=bias))
    assert partials and all(not isinstance(p, str) for p in partials)
    assert City.model_validate(partials[-1].model_dump())


# ---------------------------------------------------------------------------------------- litellm
def test_litellm(services_e2b, bias):
    """litellm's OpenAI-compatible provider (chat, stream, tools) and its Anthropic provider
    (``/v1/messages``), with the options an app sets.  Its model-cost map is read from the package
    (``LITELLM_LOCAL_MODEL_COST_MAP``), telemetry off: nothing leaves loopback."""
    import litellm

    litellm.telemetry = False
    common = dict(api_base=services_e2b.base_url, api_key="x", max_tokens=60, logit_bias=bias)
    ask = [{"role": "user", "content": "Say hi."}]
    r = litellm.completion(model="openai/m", messages=ask, metadata={"app": "ll"}, **common)
    assert isinstance(r.choices[0].message.content, str)
    text = "".join(c.choices[0].delta.content or "" for c in
                   litellm.completion(model="openai/m", messages=ask, stream=True, **common))
    assert isinstance(text, str)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now.",
                                               "parameters": City.model_json_schema()}}]
    r = litellm.completion(model="openai/m", messages=[{"role": "user", "content": "Weather?"}], tools=tools,
                           tool_choice="required", **{**common, "max_tokens": 80})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and City.model_validate_json(call.function.arguments)
    r = litellm.completion(model="anthropic/m", messages=ask, api_base=services_e2b.base_url.removesuffix("/v1"),
                           api_key="x", max_tokens=20)
    assert isinstance(r.choices[0].message.content, str)


# ---------------------------------------------------------------------------------------- langchain-anthropic
def test_langchain_anthropic(services_e2b):
    from langchain_anthropic import ChatAnthropic
    from langchain_core.tools import tool

    llm = ChatAnthropic(model="m", base_url=services_e2b.base_url.removesuffix("/v1"), api_key="x",
                        max_tokens=60, max_retries=0)
    assert isinstance(llm.invoke("Say hi.").content, str)
    assert all(isinstance(ch.content, str | list) for ch in llm.stream("Count."))

    @tool
    def weather(city: str) -> str:
        """The weather in a city now."""
        return get_weather(city)

    ai = llm.bind_tools([weather], tool_choice="weather").invoke("Weather in Paris?")
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "weather" and isinstance(ai.tool_calls[0]["args"], dict)
    city = ChatAnthropic(model="m", base_url=services_e2b.base_url.removesuffix("/v1"), api_key="x",
                         max_tokens=80, max_retries=0).with_structured_output(City).invoke("A city, please.")
    assert isinstance(city, City)
