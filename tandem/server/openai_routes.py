"""OpenAI's API: /v1/models, /v1/chat/completions, /v1/completions (streamed or not)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tandem.errors import TandemError
from tandem.server.errors import APIError, bad_request
from tandem.server.host import Job
from tandem.server.openai_protocol import ChatRequest, CompletionRequest, finish_reason, usage

router = APIRouter(prefix="/v1")


def server_of(request: Request):
    """The Server behind a route (tandem.server.app)."""
    return request.app.state.server


@router.get("/models")
async def list_models(request: Request) -> dict:
    server = server_of(request)
    return {
        "object": "list",
        "data": [{"id": server.model_id, "object": "model", "created": server.created, "owned_by": "tandem"}],
    }


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    server = server_of(request)
    loaded = server.admit(body)
    conversation = body.conversation()
    from tandem.cli.common import chat_prompt_ids

    ids = await tokenize_prompt(lambda: chat_prompt_ids(loaded, conversation))
    job = server.make_job(body, ids, "chat", asyncio.get_running_loop())
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_id}
    if body.stream:

        def chunk(delta: dict, reason=None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {**base, "object": "chat.completion.chunk", "choices": [choice]}

        first = chunk({"role": "assistant", "content": ""})
        return _stream(
            job,
            body.include_usage,
            first,
            lambda text: chunk({"content": text}),
            lambda r: chunk({}, r),
            base,
            "chat.completion.chunk",
        )
    text, result = await collect_text(job, request)
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(result)}
    return {**base, "object": "chat.completion", "choices": [choice], "usage": usage(result)}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    server = server_of(request)
    loaded = server.admit(body)
    prompt = body.prompt_text_or_ids()
    from tandem.cli.common import encode_prompt

    if isinstance(prompt, str):
        ids = await tokenize_prompt(lambda: encode_prompt(loaded.tokenizer, prompt))
    else:
        vocab = loaded.config.vocab_size
        if not prompt or min(prompt) < 0 or max(prompt) >= vocab:
            raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
        ids = prompt
    job = server.make_job(body, ids, "completions", asyncio.get_running_loop())
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_id}
    if body.stream:

        def chunk(text: str, reason=None) -> dict:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            return {**base, "object": "text_completion", "choices": [choice]}

        return _stream(job, body.include_usage, None, chunk, lambda r: chunk("", r), base, "text_completion")
    text, result = await collect_text(job, request)
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(result)}
    return {**base, "object": "text_completion", "choices": [choice], "usage": usage(result)}


async def tokenize_prompt(make: Callable[[], list[int]]) -> list[int]:
    """Render and tokenize off the event loop; a template's refusal is the client's error."""
    try:
        return await run_in_threadpool(make)
    except TandemError as error:
        raise bad_request(str(error), param="messages") from None


async def collect_text(job: Job, request: Request) -> tuple[str, object]:
    """The whole text of a non-streamed request; a client that disconnects cancels its job."""
    pieces: list[str] = []
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    raise APIError(499, "client closed the request") from None
                continue
            if kind == "text":
                pieces.append(value)
            elif kind == "done":
                return "".join(pieces), value
            else:
                raise APIError(500, value)
    finally:
        job.cancel.set()  # finished: no effect; otherwise the worker stops before its next token


def _stream(job: Job, include_usage: bool, first, text_chunk, final_chunk, base: dict, kind: str):
    """Server-sent events: the chunks, an error event if generation fails, then [DONE]."""

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield _sse(first)
            while True:
                event, value = await job.events.get()
                if event == "text":
                    yield _sse(text_chunk(value))
                elif event == "done":
                    yield _sse(final_chunk(finish_reason(value)))
                    if include_usage:
                        yield _sse({**base, "object": kind, "choices": [], "usage": usage(value)})
                    break
                else:
                    yield _sse(APIError(500, value).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # the client went away mid-stream: stop generating for it

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
