"""response_format (JSON mode, JSON Schema) in the engine: random tiny models sampled at temperature 1 emit JSON that
parses and obeys the schema, on a byte-level BPE and a SentencePiece tokenizer; batch mates are untouched; bad
schemas fail with a clear ValueError; length cut-offs, stop strings, streaming, n > 1 and preemption behave."""

import copy
import dataclasses
import json

import jsonschema
import pytest
import torch

from helpers_tokenizers import make_bpe_tokenizer_dir, make_sentencepiece_tokenizer_dir
from internvl import InternVLChatModel, load_tokenizer
from internvl.engine import Engine, ResponseFormat, ResponseFormatError, SamplingParams
from tiny import randomize_, tiny_config

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
COLOR = ResponseFormat("json_schema", {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                                       "required": ["color"], "additionalProperties": False}, name="color")
PERSON = ResponseFormat.from_openai({"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
JSON_OBJECT = ResponseFormat.from_openai({"type": "json_object"})
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """family -> (tokenizer, random chat model with the tokenizer's vocabulary)."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            tok = load_tokenizer(make_bpe_tokenizer_dir(path) if family == "qwen2"
                                 else make_sentencepiece_tokenizer_dir(path, family=family))
            cfg = tiny_config()
            cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=len(tok)), image_token_id=None)
            cache[family] = tok, randomize_(InternVLChatModel(cfg), seed=5, std=0.3).eval()
        return cache[family]

    return get


def prompt(tok, text="Describe the person as JSON."):
    return tok(CHAT.format(text))["input_ids"]


def choices(outs):
    return [c for o in outs for c in o.outputs]


def check_person(obj):
    jsonschema.validate(obj, SCHEMA)
    # the same rules by hand, so a lenient validator could not hide a miss
    assert {"name", "age", "color"} <= set(obj) <= {"name", "age", "color", "tags"}
    assert obj["color"] in ("red", "green", "blue")
    assert type(obj["age"]) is int and 0 <= obj["age"] <= 120
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 6


# ------------------------------------------------------------------------------------------------ validity
@pytest.mark.parametrize("family", ["qwen2", "internlm2"])
def test_sampled_outputs_parse_and_obey_the_schema_with_n_batching_and_preemption(setups, family):
    tok, model = setups(family)
    # 12 sequences of up to ~120 tokens in a 28-block pool: sequences get preempted and recomputed mid-document
    eng = Engine(model, tok, num_blocks=28, block_size=8)
    ids = prompt(tok)
    params = [SamplingParams(max_new_tokens=160, temperature=1.0, seed=seed, n=6, response_format=PERSON)
              for seed in (100, 200)]
    outs = eng.generate([dict(prompt_ids=ids, params=p) for p in params])
    texts = []
    for c in choices(outs):
        assert (c.finish_reason, c.stop_reason) == ("stop", eng.eos_token_ids[0]), c.text
        assert c.token_ids[-1] == eng.eos_token_ids[0]
        assert c.text == tok.decode(c.token_ids[:-1])  # the text is exactly what the grammar consumed
        check_person(json.loads(c.text))
        texts.append(c.text)
    assert len(set(texts)) >= 10  # really sampled, not one forced string
    assert any("tags" in json.loads(t) for t in texts) and any("tags" not in json.loads(t) for t in texts)
    assert eng.stats.preemptions > 0
    assert eng.pool.allocator.num_used == 0


def test_greedy_output_obeys_the_schema(setups):
    tok, model = setups("qwen2")
    eng = Engine(model, tok, num_blocks=64, block_size=8)
    out = eng.generate([prompt(tok)], SamplingParams(max_new_tokens=160, greedy=True, response_format=PERSON))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop"
    check_person(json.loads(c.text))
    plain = eng.generate([prompt(tok)], SamplingParams(max_new_tokens=20, greedy=True))[0].outputs[0]
    assert not plain.text.lstrip().startswith("{")  # without the constraint this model writes no JSON


class FavourClosingTokens(torch.nn.Module):
    """lm_head + a bias towards tokens holding `"`, `}` or `]`, so free-form JSON (strings, containers) ends soon."""

    def __init__(self, head, tok):
        super().__init__()
        self.head, self.weight = head, head.weight
        texts = [tok.decode([i]) for i in range(head.weight.shape[0])]
        self.register_buffer("bias", torch.tensor([6.0 if any(ch in t for ch in '"}]') else 0.0 for t in texts]))

    def forward(self, x):
        return self.head(x) + self.bias


def test_json_object_gives_an_object(setups):
    tok, model = setups("qwen2")
    model = copy.deepcopy(model)
    model.language_model.lm_head = FavourClosingTokens(model.language_model.lm_head, tok)
    eng = Engine(model, tok, num_blocks=64, block_size=8)
    params = [SamplingParams(max_new_tokens=200, temperature=1.0, seed=s, n=8, response_format=JSON_OBJECT)
              for s in (11, 22)]
    cs = choices(eng.generate([dict(prompt_ids=prompt(tok, "Answer in JSON."), params=p) for p in params]))
    for c in cs:
        assert c.finish_reason == "stop", c.text
        assert isinstance(json.loads(c.text), dict), c.text
    assert sum(bool(json.loads(c.text)) for c in cs) >= 4  # non-empty objects too, not only "{}"
    plain = eng.generate([prompt(tok)], SamplingParams(max_new_tokens=20, temperature=1.0, seed=11))[0]
    with pytest.raises(json.JSONDecodeError):  # the biased model alone does not write a JSON object
        json.loads(plain.outputs[0].text)


def test_a_non_object_schema_ends_when_complete_even_before_min_new_tokens(setups):
    tok, model = setups("internlm2")
    eng = Engine(model, tok, num_blocks=64, block_size=8)
    fmt = ResponseFormat("json_schema", {"enum": ["yes", "no"]}, name="answer")
    cs = choices(eng.generate([prompt(tok)], SamplingParams(max_new_tokens=30, min_new_tokens=20, temperature=1.0,
                                                            seed=3, n=4, response_format=fmt)))
    for c in cs:
        assert c.finish_reason == "stop" and json.loads(c.text) in ("yes", "no")
        assert len(c.token_ids) < 20  # the grammar's end beats min_new_tokens


def test_the_shipped_demo_model_and_tokenizer_answer_in_the_schema():
    from internvl.demo.model import DEMO_MODEL_DIR

    tok, model = load_tokenizer(DEMO_MODEL_DIR), InternVLChatModel.from_pretrained(DEMO_MODEL_DIR).eval()
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue", "yellow"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["color", "count"], "additionalProperties": False}
    eng = Engine(model, tok, num_blocks=64, block_size=16)
    ids = prompt(tok, "What color is the triangle?")
    plain = eng.generate([ids], SamplingParams(max_new_tokens=40, greedy=True))[0].outputs[0]
    with pytest.raises(json.JSONDecodeError):  # the demo model answers in sentences, not JSON
        json.loads(plain.text)
    fmt = ResponseFormat("json_schema", schema, name="shape")
    for c in eng.generate([ids], SamplingParams(max_new_tokens=80, temperature=1.0, seed=1, n=4,
                                                response_format=fmt))[0].outputs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)


# ------------------------------------------------------------------------------------------------ batch mates
def test_batch_mates_without_constraints_are_unaffected(setups):
    tok, model = setups("qwen2")
    mates = [dict(prompt_ids=prompt(tok, "Hello there."), params=SamplingParams(max_new_tokens=24, greedy=True)),
             dict(prompt_ids=prompt(tok, "Tell me a story."),
                  params=SamplingParams(max_new_tokens=24, temperature=1.0, seed=7, n=2))]
    constrained = dict(prompt_ids=prompt(tok),
                       params=SamplingParams(max_new_tokens=160, temperature=1.0, seed=5, response_format=PERSON))
    alone = Engine(model, tok, num_blocks=64, block_size=8).generate(mates)
    c_alone = Engine(model, tok, num_blocks=64, block_size=8).generate([constrained])[0]
    eng = Engine(model, tok, num_blocks=64, block_size=8)
    mixed = eng.generate([mates[0], constrained, mates[1]])
    assert eng.stats.max_running >= 3
    assert [[c.token_ids for c in o.outputs] for o in (mixed[0], mixed[2])] == \
        [[c.token_ids for c in o.outputs] for o in alone]
    assert mixed[1].outputs[0].token_ids == c_alone.outputs[0].token_ids  # and the other way round
    assert not any(c.text.lstrip().startswith("{") for o in alone for c in o.outputs)
    check_person(json.loads(mixed[1].outputs[0].text))


# ------------------------------------------------------------------------------------------------ cut-offs, stops
def test_max_tokens_cut_off_gives_length_and_a_json_prefix(setups):
    tok, model = setups("qwen2")
    eng = Engine(model, tok, num_blocks=64, block_size=8)
    full = eng.generate([prompt(tok)], SamplingParams(max_new_tokens=60, temperature=1.0, seed=9,
                                                      response_format=COLOR))[0].outputs[0]
    cut = eng.generate([prompt(tok)], SamplingParams(max_new_tokens=6, temperature=1.0, seed=9,
                                                     response_format=COLOR))[0].outputs[0]
    assert full.finish_reason == "stop" and len(full.token_ids) > 7
    assert cut.finish_reason == "length" and len(cut.token_ids) == 6
    assert full.text.startswith(cut.text) and cut.text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.text)
    assert eng.pool.allocator.num_used == 0


def test_streaming_and_stop_strings(setups):
    tok, model = setups("qwen2")
    eng = Engine(model, tok, num_blocks=64, block_size=8)
    params = SamplingParams(max_new_tokens=60, temperature=1.0, seed=21, response_format=COLOR)
    full = eng.generate([prompt(tok)], params)[0].outputs[0]
    deltas = list(eng.stream(prompt(tok), params))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert deltas[-1].finish_reason == "stop"
    assert json.loads(full.text)["color"] in ("red", "green", "blue")
    # a stop string inside the document ends it there, like any other request
    stopped = list(eng.stream(prompt(tok), params.replace(stop=[":"])))
    text = "".join(d.text for d in stopped)
    assert text == full.text[: full.text.index(":")]
    assert (stopped[-1].finish_reason, stopped[-1].stop_reason) == ("stop", ":")


# ------------------------------------------------------------------------------------------------ errors, API
@pytest.mark.parametrize("value, param, fragment", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integr"}}},
     "response_format.json_schema.schema", "integr"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"],
        "additionalProperties": False}}}, "response_format.json_schema.schema", "unsatisfiable"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}},
     "response_format.json_schema.schema", "unclosed group"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
     "response_format.json_schema.schema", "missing"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": ["not", "an", "object"]}},
     "response_format.json_schema.schema", "must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema", "required"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name", "required"),
    ({"type": "json_schema"}, "response_format.json_schema", "needs a 'json_schema' object"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
     "response_format.json_schema.name", "a-z"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
     "response_format.json_schema.strict", "true, false"),
    ({"type": "yaml"}, "response_format.type", "'yaml' is not supported"),
    ("json", "response_format", "must be an object"),
])
def test_invalid_response_formats_raise_a_clear_value_error(value, param, fragment):
    with pytest.raises(ValueError, match=fragment) as err:
        ResponseFormat.from_openai(value)
    assert isinstance(err.value, ResponseFormatError) and err.value.param == param
    assert str(err.value).startswith(param + ": ")
    if isinstance(value, dict):
        with pytest.raises(ValueError, match=fragment):
            SamplingParams(response_format=value)


def test_from_openai_and_sampling_params_field():
    assert ResponseFormat.from_openai(None) is None
    assert ResponseFormat.from_openai({"type": "text"}) is None
    assert ResponseFormat.from_openai({"type": "json_object"}) == ResponseFormat("json_object")
    fmt = ResponseFormat.from_openai({"type": "json_schema", "json_schema": {
        "name": "person", "strict": True, "description": "ignored", "schema": SCHEMA}})
    assert (fmt.type, fmt.name, fmt.strict) == ("json_schema", "person", True)
    assert json.loads(fmt.schema) == SCHEMA
    assert list(json.loads(fmt.schema)["properties"]) == ["name", "age", "color", "tags"]  # order kept
    assert SamplingParams(response_format={"type": "json_schema", "json_schema": {"name": "person", "strict": True,
                                                                                 "schema": SCHEMA}}) == \
        SamplingParams(response_format=fmt)
    assert hash(SamplingParams(response_format=fmt)) == hash(SamplingParams(response_format=fmt.__class__(
        "json_schema", json.dumps(SCHEMA, indent=2), "person", True)))  # text or dict, same format
    assert SamplingParams(response_format={"type": "text"}).response_format is None
    with pytest.raises(ValueError, match="response_format=42"):
        SamplingParams(response_format=42)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fmt.schema = "{}"


def test_engine_refuses_what_it_cannot_end_and_compiles_each_schema_once(setups):
    tok, model = setups("qwen2")
    with pytest.raises(ValueError, match="needs an engine with a tokenizer"):
        Engine(model, num_blocks=16).add_request([1, 2, 3], SamplingParams(response_format=JSON_OBJECT))
    eng = Engine(model, tok, num_blocks=64, block_size=8)
    with pytest.raises(ValueError, match="ignore_eos=True without stop_token_ids"):
        eng.add_request(prompt(tok), SamplingParams(ignore_eos=True, response_format=JSON_OBJECT))
    same_schema = ResponseFormat("json_schema", json.dumps(SCHEMA), name="other")  # same compact text
    for fmt in (PERSON, same_schema, PERSON, JSON_OBJECT):
        eng.add_request(prompt(tok), SamplingParams(max_new_tokens=4, response_format=fmt))
    assert eng._grammars.num_compiled == 2
    while eng.has_work:
        eng.step()
    assert eng.pool.allocator.num_used == 0
