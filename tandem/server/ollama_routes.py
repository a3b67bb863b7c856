"""Ollama's API: /api/chat and /api/generate (NDJSON streams); the model endpoints are in ollama_models.py.

Enough of it for the `ollama` Python client and Open WebUI. Errors are Ollama's
`{"error": "..."}` (errors.py answers in that form on /api paths).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tandem.engine.sampling import SamplingParams
from tandem.server.errors import bad_request
from tandem.server.openai_routes import collect_text, server_of, tokenize_prompt

router = APIRouter(prefix="/api")

# Ollama's documented option defaults where tandem has the knob (repeat_penalty: tandem's 1.0).
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0}


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")
    temperature: float = Field(default=DEFAULTS["temperature"], ge=0, le=2)
    top_k: int = Field(default=DEFAULTS["top_k"], ge=0)
    top_p: float = Field(default=DEFAULTS["top_p"], gt=0, le=1)
    min_p: float = Field(default=DEFAULTS["min_p"], ge=0, lt=1)
    repeat_penalty: float = Field(default=1.0, gt=0)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    num_predict: int = Field(default=-1, ge=-2)  # -1: until the context ends, -2: fill it
    stop: list[str] | str | None = None


class OllamaRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    stream: bool = True
    options: Options = Field(default_factory=Options)
    format: str | dict[str, Any] | None = None
    tools: list[Any] | None = None

    def check(self) -> None:
        if self.format:
            raise bad_request("format (structured output) is not supported", param="format")
        if self.tools:
            raise bad_request("tools are not supported", param="tools")

    # What Server.make_job asks of a request.
    def token_limit(self) -> int | None:
        return self.options.num_predict if self.options.num_predict > 0 else None

    def sampling(self) -> SamplingParams:
        o = self.options
        return SamplingParams(
            temperature=o.temperature,
            top_k=o.top_k,
            top_p=o.top_p,
            min_p=o.min_p,
            repetition_penalty=o.repeat_penalty,
            seed=o.seed,
            presence_penalty=o.presence_penalty,
            frequency_penalty=o.frequency_penalty,
        )

    def stop_strings(self) -> list[str]:
        stop = self.options.stop
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(s == "" for s in stops):
            raise bad_request("stop sequences must not be empty", param="stop")
        return stops


class ChatBody(OllamaRequest):
    messages: list[dict[str, Any]] = Field(default_factory=list)

    def conversation(self) -> list[dict[str, str]]:
        out = []
        for i, m in enumerate(self.messages):
            role, content = m.get("role"), m.get("content", "")
            if role not in ("system", "user", "assistant", "tool") or not isinstance(content, str):
                raise bad_request(f"messages[{i}] needs a role and text content", param="messages")
            if m.get("images"):
                raise bad_request("images are not supported", param="messages")
            out.append({"role": role, "content": content})
        return out


class GenerateBody(OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[Any] | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.images:
            raise bad_request("images are not supported", param="images")
        if self.suffix:
            raise bad_request("suffix is not supported", param="suffix")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


@router.post("/chat")
async def chat(body: ChatBody, request: Request):
    server = server_of(request)
    loaded = server.admit(body)
    if not body.messages:  # Ollama's way to load a model: nothing to say
        return {
            "model": body.model,
            "created_at": _now(),
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "load",
        }
    conversation = body.conversation()
    from tandem.cli.common import chat_prompt_ids

    ids = await tokenize_prompt(lambda: chat_prompt_ids(loaded, conversation))

    def piece(text: str) -> dict:
        return {"message": {"role": "assistant", "content": text}}

    return await _answer(server, body, ids, "ollama_chat", request, piece)


@router.post("/generate")
async def generate(body: GenerateBody, request: Request):
    server = server_of(request)
    loaded = server.admit(body)
    if not body.prompt:
        return {
            "model": body.model,
            "created_at": _now(),
            "response": "",
            "done": True,
            "done_reason": "load",
        }
    from tandem.cli.common import chat_prompt_ids, encode_prompt

    if body.raw:
        ids = await tokenize_prompt(lambda: encode_prompt(loaded.tokenizer, body.prompt))
    else:  # the model's template around the prompt, as Ollama does
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            {"role": "user", "content": body.prompt}
        ]
        ids = await tokenize_prompt(lambda: chat_prompt_ids(loaded, messages))
    return await _answer(server, body, ids, "ollama_generate", request, lambda text: {"response": text})


async def _answer(server, body: OllamaRequest, ids: list[int], endpoint: str, request: Request, piece):
    start = time.perf_counter()
    job = server.make_job(body, ids, endpoint, asyncio.get_running_loop())
    head = {"model": body.model}

    def final(result) -> dict:
        return {
            **head,
            "created_at": _now(),
            **piece(""),
            "done": True,
            "done_reason": "length" if result.finish_reason == "length" else "stop",
            "total_duration": int((time.perf_counter() - start) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": result.n_prompt - result.n_cached,
            "prompt_eval_duration": int(result.prefill_s * 1e9),
            "eval_count": result.n_generated,
            "eval_duration": int(result.decode_s * 1e9),
        }

    if not body.stream:
        text, result = await collect_text(job, request)
        return {**final(result), **piece(text)}

    async def lines():
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield json.dumps({**head, "created_at": _now(), **piece(value), "done": False}) + "\n"
                elif kind == "done":
                    yield json.dumps(final(value)) + "\n"
                    break
                else:
                    yield json.dumps({"error": value}) + "\n"
                    break
        finally:
            job.cancel.set()  # a client that left stops its generation

    return StreamingResponse(lines(), media_type="application/x-ndjson")
