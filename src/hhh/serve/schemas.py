"""The request bodies of `hhh serve`, in OpenAI's shapes, validated at the edge: a wrong type, a value out of range
or an oversized field is a 400 in OpenAI's error shape naming the field, before the request reaches the engine.
Fields that clients send and this server does not use (`tools`, `tool_choice`, `user`, `response_format`...) are
accepted; unknown fields are ignored, as OpenAI-compatible servers do."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_MESSAGES = 256
MAX_TEXT = 64 * 1024        # characters of one message or prompt
MAX_N = 16
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
ID_MAX = 2**31 - 1


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_In):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_TEXT)]


class Message(_In):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_TEXT)] | Annotated[list[TextPart], Field(max_length=64)] | None = None
    name: Annotated[str, Field(max_length=200)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_In):
    include_usage: bool = False


class _Sampling(_In):
    model: Annotated[str, Field(min_length=1, max_length=300)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: Annotated[str, Field(min_length=1, max_length=64)] | \
        Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=200)] | None = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        # JSON has one number type: 1 and 1.0 are the same temperature (strict mode would refuse the int)
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None      # accepted, not called
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: Annotated[str, Field(max_length=MAX_TEXT)] | \
        Annotated[list[Annotated[str, Field(max_length=MAX_TEXT)]], Field(min_length=1, max_length=MAX_N)]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None   # the legacy API: how many alternatives per token
    echo: Literal[False] = False


class EmbeddingRequest(_In):
    model: Annotated[str, Field(min_length=1, max_length=300)]
    input: Annotated[str, Field(max_length=MAX_TEXT)] | \
        Annotated[list[Annotated[str, Field(max_length=MAX_TEXT)]], Field(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 (the openai client's)


class FeedbackRequest(_In):
    """One judgement of a served completion: thumbs (+1 / -1), a 1-5 rating, the preferred choice among the
    response's n, or an edited better answer."""
    id: Annotated[str, Field(min_length=1, max_length=64)]                 # the response id (chatcmpl-..., cmpl-...)
    choice: Annotated[int, Field(ge=0, le=MAX_N * MAX_N)] = 0
    thumbs: Literal[1, -1] | None = None
    rating: Annotated[int, Field(ge=1, le=5)] | None = None
    preferred: Annotated[int, Field(ge=0, le=MAX_N * MAX_N)] | None = None
    edit: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)] | None = None
    feedback_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")] | None = None

    def kind(self) -> tuple[str, Any]:
        given = [(k, v) for k, v in (("thumbs", self.thumbs), ("rating", self.rating),
                                     ("preferred", self.preferred), ("edit", self.edit)) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of thumbs, rating, preferred, edit")
        return given[0]
