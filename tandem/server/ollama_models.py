"""Ollama's model endpoints: /api/tags, /api/ps, /api/show, /api/version (what is served, and how)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from pathlib import Path

from fastapi import APIRouter, Request

import tandem
from tandem.server.errors import bad_request
from tandem.server.ollama_routes import DEFAULTS
from tandem.server.openai_routes import server_of

router = APIRouter(prefix="/api")


@router.get("/tags")
async def tags(request: Request) -> dict:
    server = server_of(request)
    entry = _model_entry(server)
    return {"models": [{"name": entry["model"], **entry}]}


@router.get("/ps")
async def ps(request: Request) -> dict:
    server = server_of(request)
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
    server = server_of(request)
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
