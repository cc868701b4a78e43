"""Schema fuzzing of the served OpenAPI document (SERVING.md §12, §13 #43) with schemathesis, against a real uvicorn
on 127.0.0.1 serving the shipped demo model.

Every operation of /openapi.json gets schema-valid (positive) cases; the two generation routes also get
schema-invalid (negative) ones. Each response must: not be a 5xx, use a status code, content type and headers the
schema documents, match the documented body schema, and (negative cases) be a 4xx. Examples are bounded per
operation (§12: <= 50) so the file runs in well under a minute.

What is bent, and why:
* `model` in generated bodies is set to the served id: a random string gets the 404 `model_not_found` before any
  other field is looked at, so without this nearly every case would test only that. (The 404 path has its own
  checklist tests.)
* Remote media never leaves the machine: the server only admits a domain that cannot resolve (`.invalid`), and its
  fetch function is replaced by one that refuses every URL (400) without any network access.
* The server's default completion length is 16 tokens and its context 512 tokens, so a case that asks for a long
  generation (`ignore_eos`, a large `max_tokens`) is bounded in time; larger requests get the documented 400.
* The check `positive_data_acceptance` is left out: schema-valid is not always acceptable here (the schema cannot
  say "the last message must be from the user", "stop holds at most 4 strings", or "this data: URL must decode to an
  image"); those refusals are 400s with the envelope, which the other checks verify.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from internvl.serve.media_policy import INVALID_IMAGE_URL, MediaError, MediaPolicy
from serve.app_fixtures import MODEL, chat_body, image_content, keeps_serving, live_server

EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]

@pytest.fixture(scope="module")
def server():
    from internvl.serve import media

    async def refuse(url, policy, kind="image"):
        raise MediaError(INVALID_IMAGE_URL, "remote media is disabled in this test", reason="domain")

    mp = pytest.MonkeyPatch()
    mp.setattr(media, "fetch_url", refuse)
    policy = MediaPolicy(allowed_media_domains=("media.invalid",))
    with live_server(media=policy, session_len=512, max_new_tokens_default=16) as s:
        yield s
    mp.undo()


@pytest.fixture(scope="module")
def served_schema(server):
    schema = schemathesis.openapi.from_url(server.base + "/openapi.json")
    schema.config.update(base_url=server.base)
    schema.config.max_stream_events = 100_000  # read whole streams (default: the first 20 events), [DONE] included
    return schema


OPERATIONS = [("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"), ("POST", "/v1/chat/completions"),
              ("POST", "/v1/completions"), ("GET", "/health"), ("GET", "/live"), ("GET", "/metrics")]
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# (method, path, generation mode, whether the prompt part of the body is replaced by a valid one)
FUZZ = [(m, p, POSITIVE, False) for m, p in OPERATIONS]
FUZZ += [(m, p, mode, valid) for m, p in OPERATIONS if m == "POST"
         for mode, valid in ((POSITIVE, True), (NEGATIVE, False))]

VALID_PROMPTS = {
    "/v1/chat/completions": ("messages", [[{"role": "user", "content": "What is 2+3?"}],
                                          [{"role": "user", "content": image_content("Which shape?")}],
                                          [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Name a color."},
                                           {"role": "assistant", "content": "Red."},
                                           {"role": "user", "content": [{"type": "text", "text": "Another?"}]}]]),
    "/v1/completions": ("prompt", ["The cat", ["One", "Two"], [5, 6, 7]]),
}


def test_every_served_operation_is_fuzzed(served_schema):
    served = {(op.ok().method.upper(), op.ok().path) for op in served_schema.get_all_operations()}
    assert served == set(OPERATIONS)


def with_served_model(case):
    """Bodies name the served model when the generated `model` is a string (see the module docstring)."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body = {**case.body, "model": MODEL}
    return case


def with_valid_prompt(path):
    """Keep every generated sampling field, but send a prompt the server accepts, so that the generated values reach
    the engine (random message lists almost never do: the schema cannot express the message grammar)."""
    field, prompts = VALID_PROMPTS[path]

    def build(case):
        return st.sampled_from(prompts).map(lambda prompt: set_field(case, field, prompt))

    return build


def set_field(case, field, value):
    case.body = {**case.body, field: value}
    return case


@pytest.mark.parametrize(("method", "path", "mode", "valid_prompt"), FUZZ,
                         ids=[f"{m} {p} {g.value}{' valid-prompt' if v else ''}" for m, p, g, v in FUZZ])
def test_served_schema_holds_and_nothing_is_a_5xx(served_schema, method, path, mode, valid_prompt):
    operation = served_schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode).map(with_served_model)
    if valid_prompt:
        strategy = strategy.flatmap(with_valid_prompt(path))
    statuses = []

    @given(case=strategy)
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def run(case):
        response = case.call_and_validate(checks=CHECKS, timeout=60)
        statuses.append(response.status_code)

    run()
    assert statuses and all(s < 500 for s in statuses)
    if valid_prompt:  # the generated values did reach the engine, and most of them were served
        assert statuses.count(200) >= len(statuses) // 2, statuses


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_tiny_schema_valid_temperature_or_penalty_is_served_not_a_500(server, route, field):
    """Found by this fuzzer: 5e-324 (> 0, so schema-valid) overflowed the scaled logits to inf, softmax gave NaN and
    sampling raised (500). Its limit, the most likely token, is served instead."""
    body = {"model": MODEL, "max_tokens": 4, field: 5e-324}
    body.update({"messages": [{"role": "user", "content": "What is 2+3?"}]} if "chat" in route else {"prompt": "2+3="})
    r = httpx.post(server.base + route, json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_still_serving_after_the_fuzzing(server):
    with httpx.Client(base_url=server.base, timeout=30) as client:
        keeps_serving(client, image=True)
        assert client.post("/v1/chat/completions", json=chat_body(stream=True)).status_code == 200
