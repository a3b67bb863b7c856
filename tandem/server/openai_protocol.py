"""OpenAI request bodies, checked, and what tandem makes of them (sampling, stops, prompts)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tandem.engine.sampling import SamplingParams
from tandem.server.errors import bad_request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class CommonRequest(BaseModel):
    """The fields chat and text completions share. Unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # not in OpenAI's API; llama.cpp's and vLLM's servers take it
    min_p: float = Field(default=0.0, ge=0, lt=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request: other values are refused")
    logprobs: bool | None = Field(default=None, description="not supported: true is refused")

    def check_common(self) -> None:
        if self.logprobs:
            raise bad_request("logprobs are not supported", param="logprobs")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", param="stream_options")

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise bad_request("at most 4 stop sequences", param="stop")
        if any(s == "" for s in stops):
            raise bad_request("stop sequences must not be empty", param="stop")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        self.check_common()
        if self.tools or self.functions:
            raise bad_request("tool and function calling are not supported", param="tools")
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise bad_request(
                f"response_format {kind!r} is not supported (only 'text')", param="response_format"
            )

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """Messages for the chat template: text content only, `developer` as `system`."""
        out = []
        for i, m in enumerate(self.messages):
            out.append(
                {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, i)}
            )
        return out


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[int] = Field(max_length=1 << 20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for text completions

    def check(self) -> None:
        self.check_common()
        if self.echo:
            raise bad_request("echo is not supported", param="echo")
        if self.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise bad_request("best_of > 1 is not supported", param="best_of")

    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompt_text_or_ids(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str):
            return p
        if p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return list(p)
        if len(p) == 1 and isinstance(p[0], str):
            return p[0]
        raise bad_request("prompt must be one string or one list of token ids (no batches)", param="prompt")


def _text(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(
                f"messages[{index}].content: only text parts are supported, got {part.get('type')!r}",
                param="messages",
            )
        parts.append(part["text"])
    return "".join(parts)


FinishReason = Literal["stop", "length"]


def finish_reason(result) -> str:
    """OpenAI's reason: a stop token or string is "stop", the token limit "length"."""
    return "length" if result.finish_reason == "length" else "stop"


def usage(result) -> dict[str, int]:
    return {
        "prompt_tokens": result.n_prompt,
        "completion_tokens": result.n_generated,
        "total_tokens": result.n_prompt + result.n_generated,
    }
