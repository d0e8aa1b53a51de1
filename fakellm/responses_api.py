"""OpenAI's Responses API: create (JSON and SSE) and the by-id routes over stored responses."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from fakellm.common import SSE, Body, Exchange, Failed, content_text, encode, sse, words

KEEP = 1000  # stored responses; the oldest are forgotten, as a real server's retention would


class ResponsesBody(Body):
    input: str | list[dict[str, Any]] = ""
    instructions: str | None = None
    stream: bool = False
    store: bool = True
    background: bool = False
    previous_response_id: str | None = None
    max_output_tokens: int | None = None


class Store:
    """Responses by id with their input items, bounded so a soak cannot grow it forever."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    def put(self, response: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        self._items[response["id"]] = (response, inputs)
        while len(self._items) > KEEP:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        try:
            return self._items[response_id]
        except KeyError:
            raise Failed(404, f"Response with id '{response_id}' not found.") from None

    def pop(self, response_id: str) -> None:
        self.get(response_id)
        del self._items[response_id]

    def ids(self) -> list[str]:
        return list(self._items)


def _input_items(x: Exchange, body: ResponsesBody) -> list[dict[str, Any]]:
    """The request's input as stored items: a plain string is one user message."""
    raw = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    items = []
    for i, item in enumerate(raw):
        content = item.get("content", "")
        parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else content
        kind = item.get("type", "message")
        items.append({"id": f"{x.new_id('msg')}_in{i}", "type": kind, "role": item.get("role"), "content": parts})
    return items


def _usage(prompt: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": [part]}


async def create(x: Exchange) -> None:
    body = x.decode(ResponsesBody)
    if body.previous_response_id is not None and body.previous_response_id not in x.llm.responses.ids():
        message = f"Previous response with id '{body.previous_response_id}' not found."
        raise Failed(404, message, "previous_response_not_found")
    if not await x.prelude(streaming=body.stream):
        return
    inputs = _input_items(x, body)
    pieces, cut = x.reply(body.max_output_tokens)
    prompt = words(body.instructions, *(content_text(i["content"]) for i in inputs))
    response: dict[str, Any] = {
        "id": x.new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "background": body.background,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": body.model or x.llm.models[0],
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": body.previous_response_id,
        "store": body.store,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None,
        "metadata": {},
    }
    item_id = x.new_id("msg")
    done = {
        **response,
        "status": "in_progress" if body.background else "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "output": [_message(item_id, "".join(pieces), "completed")],
        "usage": _usage(prompt, len(pieces)),
    }
    if body.store:
        x.llm.responses.put(done, inputs)
    if not body.stream:
        return await x.send_json(done)
    await x.stream(SSE, _events(response, done, item_id, pieces))


def _events(response: dict[str, Any], done: dict[str, Any], item_id: str, pieces: list[str]) -> Iterator[bytes]:
    """The event sequence OpenAI sends for one text message, each numbered in order."""
    text = "".join(pieces)
    at = {"item_id": item_id, "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response},
        {"type": "response.in_progress", "response": response},
        {"type": "response.output_item.added", "output_index": 0, "item": _message(item_id, "", "in_progress")},
        {"type": "response.content_part.added", **at, "part": part},
    ]
    events += [{"type": "response.output_text.delta", **at, "delta": p, "logprobs": []} for p in pieces]
    events += [
        {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **at, "part": {**part, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": done["output"][0]},
        {"type": f"response.{'incomplete' if done['status'] == 'incomplete' else 'completed'}", "response": done},
    ]
    for number, event in enumerate(events):
        yield sse(encode({**event, "sequence_number": number}), event["type"])


def _id(x: Exchange) -> str:
    return x.req.path.split("/")[3]


async def retrieve(x: Exchange) -> None:
    if await x.prelude():
        await x.send_json(x.llm.responses.get(_id(x))[0])


async def delete(x: Exchange) -> None:
    if await x.prelude():
        x.llm.responses.pop(_id(x))
        await x.send_json({"id": _id(x), "object": "response", "deleted": True})


async def cancel(x: Exchange) -> None:
    """Only background responses still in progress can be cancelled, as with OpenAI."""
    if not await x.prelude():
        return
    response, _ = x.llm.responses.get(_id(x))
    if response["status"] != "in_progress":
        raise Failed(400, f"Cannot cancel a response with status '{response['status']}'.")
    response["status"] = "cancelled"
    await x.send_json(response)


async def input_items(x: Exchange) -> None:
    if not await x.prelude():
        return
    items = list(x.llm.responses.get(_id(x))[1])
    if "order=asc" not in x.req.query.split("&"):
        items.reverse()  # OpenAI lists newest first unless asked otherwise
    first, last = (items[0]["id"], items[-1]["id"]) if items else (None, None)
    await x.send_json({"object": "list", "data": items, "first_id": first, "last_id": last, "has_more": False})
