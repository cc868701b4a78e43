"""Pydantic models that document the API in the OpenAPI schema (`/openapi.json`): request bodies, responses, the
error envelope. Requests are validated by `protocol.py` (exact JSON-path errors); these models describe the same
shapes, and the tests check that real responses validate against them.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

Open = ConfigDict(extra="allow")  # unknown request fields are accepted and ignored (§3.3)


# ---------------------------------------------------------------------------------------------- requests
class ImageURL(BaseModel):
    model_config = Open
    url: str = Field(description="data:image/...;base64,..., https://..., or file://... (below the allowed path)")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="low = one tile; auto/high = the "
                                                          "checkpoint's tile limit")
    max_dynamic_patch: int | None = Field(None, ge=1, description="tile limit for this image (1..cap, default 24)")


class VideoURL(BaseModel):
    model_config = Open
    url: str
    num_frames: int | None = Field(None, ge=1, description="frames sampled from the video (default 8)")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


class VideoURLPart(BaseModel):
    type: Literal["video_url"]
    video_url: Union[VideoURL, str]


class VideoFramesPart(BaseModel):
    type: Literal["video"]
    video: list[str] = Field(min_length=1, description="the frames of a video, as image URLs")


ContentPart = Annotated[Union[TextPart, ImagePart, VideoURLPart, VideoFramesPart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = Open
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(BaseModel):
    model_config = Open
    include_usage: bool | None = None


class ResponseFormat(BaseModel):
    model_config = Open
    type: Literal["text", "json_object", "json_schema"] = Field(description="only 'text' is accepted for now")


class SamplingFields(BaseModel):
    model_config = Open
    model: str = Field(description="the served model id (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="extension; 0 or -1 disable (default: disabled)")
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, description="extension")
    n: int | None = Field(None, ge=1, le=8)
    stop: Union[str, list[str], None] = Field(None, description="up to 4 strings of at most 256 characters")
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    min_tokens: int | None = Field(None, ge=0, description="extension")
    ignore_eos: bool | None = Field(None, description="extension")
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="wins over max_tokens")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    max_image_tokens: int | None = Field(None, ge=1, description="extension: token budget for all images")


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)


# ---------------------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


FinishReason = Literal["stop", "length", "abort"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---------------------------------------------------------------------------------------------- OpenAPI pieces
def request_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that reads its body itself: the model's schema as the JSON request body."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def error_responses(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse, "description": "error envelope"} for s in statuses}


def stream_response(json_model: type[BaseModel], chunk_model: type[BaseModel]) -> dict:
    # A text/event-stream `schema` describes ONE event (OpenAPI < 3.2; schemathesis validates each event with it):
    # its `data` is a chunk, an error envelope after the first byte (SERVING.md §4.2), or the final `[DONE]`.
    data = {"type": "string", "if": {"const": "[DONE]"}, "else": {
        "contentMediaType": "application/json", "contentSchema": {"anyOf": [
            {"$ref": f"#/components/schemas/{chunk_model.__name__}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}}}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"model": json_model, "description": "the completion; with stream: true, server-sent events of "
                  f"{chunk_model.__name__} objects ending with `data: [DONE]`",
                  "content": {"text/event-stream": {"schema": event}}}}


DOCUMENTED_MODELS = (ChatCompletionRequest, CompletionRequest, ChatCompletionChunk)
