"""Ollama's API: /api/chat, /api/generate (NDJSON streams), /api/tags, /api/show, /api/ps, /api/version.

Enough of it for the `ollama` Python client and Open WebUI. Errors are Ollama's
`{"error": "..."}` (errors.py answers in that form on /api paths).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

import tandem
from tandem.engine.sampling import SamplingParams
from tandem.server.errors import bad_request
from tandem.server.openai_routes import collect_text, tokenize_prompt

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


def _server(request: Request):
    return request.app.state.server


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


@router.post("/chat")
async def chat(body: ChatBody, request: Request):
    server = _server(request)
    body.check()
    server.check_model(body.model)
    loaded = server.require_ready()
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
    server = _server(request)
    body.check()
    server.check_model(body.model)
    loaded = server.require_ready()
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


@router.get("/tags")
async def tags(request: Request) -> dict:
    server = _server(request)
    entry = _model_entry(server)
    return {"models": [{"name": entry["model"], **entry}]}


@router.get("/ps")
async def ps(request: Request) -> dict:
    server = _server(request)
    if not server.host.ready:
        return {"models": []}
    entry = _model_entry(server)
    far = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3650)).isoformat().replace("+00:00", "Z")
    return {
        "models": [
            {"name": entry["model"], **entry, "expires_at": far, "size_vram": 0, "context_length": server.ctx}
        ]
    }


@router.post("/show")
async def show(request: Request) -> dict:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        raise bad_request("the request body is not valid JSON") from None
    name = body.get("model") or body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str):
        raise bad_request("model is required", param="model")
    server = _server(request)
    server.check_model(name)
    loaded = server.require_ready()
    entry = _model_entry(server)
    fallback = loaded.chat_template_is_fallback
    note = (
        "# no chat template in the GGUF: tandem's plain fallback template (docs/chat-templates.md)\n"
        if fallback
        else ""
    )
    params = "\n".join(f"{k} {v}" for k, v in DEFAULTS.items())
    return {
        "modelfile": f"# served by tandem {tandem.__version__}\n{note}FROM {server.model_path}\n",
        "parameters": params,
        "template": loaded.chat_template,
        "template_is_fallback": fallback,
        "details": entry["details"],
        "model_info": _model_info(loaded),
        "capabilities": ["completion"],
        "modified_at": entry["modified_at"],
    }


@router.get("/version")
async def version() -> dict:
    return {"version": tandem.__version__}


def _model_entry(server) -> dict:
    path = Path(server.model_path)
    files = sorted(path.parent.glob(path.name)) if path.is_file() else []
    size = sum(f.stat().st_size for f in files) or 0
    mtime = max((f.stat().st_mtime for f in files), default=time.time())
    # An identifier of the file (path, size, time), not a hash of its bytes.
    digest = hashlib.sha256(f"{path.resolve()}:{size}:{mtime}".encode()).hexdigest()
    details = {"format": "gguf", "family": "", "families": [], "parameter_size": "", "quantization_level": ""}
    loaded = server.host.loaded
    if loaded is not None and hasattr(loaded.gguf, "architecture"):
        gguf = loaded.gguf
        n_params = sum(_numel(info.shape) for info in gguf.tensors.values())
        file_type = gguf.metadata.get("general.file_type")
        details.update(
            family=gguf.architecture,
            families=[gguf.architecture],
            parameter_size=_size_name(n_params),
            quantization_level=_file_type_name(file_type),
        )
    return {
        "model": server.model_id,
        "modified_at": dt.datetime.fromtimestamp(mtime, dt.UTC).isoformat().replace("+00:00", "Z"),
        "size": size,
        "digest": digest,
        "details": details,
    }


def _model_info(loaded) -> dict:
    """The GGUF's metadata without its long arrays (the tokenizer's vocabulary and merges)."""
    meta = getattr(loaded.gguf, "metadata", {}) or {}
    return {k: v for k, v in meta.items() if not (isinstance(v, (list, tuple)) and len(v) > 64)}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _size_name(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0", "")
    return str(n)


def _file_type_name(value) -> str:
    if not isinstance(value, int):
        return ""
    try:
        from gguf import LlamaFileType

        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(value)
