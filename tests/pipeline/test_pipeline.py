"""The pipeline against independent paths: `model.chat(..., engine=False)` (the plain reference generate), prompt
ids tokenized from the spec's text, the model's own log-softmax; plus batching, streaming, sessions and errors.

Two models: the shipped demo model (real tokenizer, real images) and a tiny random model whose answers run to the
token limit (long, arbitrary text: a strict check of ids, streaming and stop strings)."""

import dataclasses
import socket
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_tokenizers import make_bpe_tokenizer_dir
from internvl import IMAGE_TOKEN, GenerationConfig, InternVLChatModel, load_image, load_tokenizer, pipeline
from internvl.model.quantize import Int8Linear
from internvl.pipeline import Pipeline, PipelineConfig
from internvl.templates.conversation import build_chat_prompt
from tiny import randomize_, tiny_config

ROOT = Path(__file__).resolve().parents[2]
SCENE1, SCENE2 = ROOT / "examples" / "media" / "scene1.png", ROOT / "examples" / "media" / "scene2.png"
S3 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SMALL_KV = dict(kv_cache_bytes=32 << 20, vision_cache_size=8)
LONG = GenerationConfig(max_new_tokens=12, ignore_eos=True)  # the tiny model's answers always run to the limit


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo():
    return pipeline(None, **SMALL_KV)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_bpe_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tiny_model(tok):
    cfg = tiny_config()
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=len(tok)), image_token_id=None)
    return randomize_(InternVLChatModel(cfg), seed=5, std=0.3).eval()


@pytest.fixture
def tiny(tiny_model, tok):
    return Pipeline(tiny_model, tok, PipelineConfig(**SMALL_KV))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three random images as files: 112x56 (2 tiles + thumbnail at 56 px), 56x56 (1 tile), 168x56 (3 + 1)."""
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for k, (w, h) in enumerate([(112, 56), (56, 56), (168, 56)]):
        p = d / f"img{k}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def tiles(path, model, max_num=None):
    cfg = model.config
    return load_image(path, input_size=cfg.image_size, max_num=max_num or cfg.max_dynamic_patch)


def reference(pipe, question, pixel_values=None, history=None, num_patches_list=None, max_new_tokens=20):
    """The model-card chat() on the plain reference generate, greedy."""
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False)
    return pipe.model.chat(pipe.tokenizer, pixel_values, question, gen, history=history, return_history=True,
                           num_patches_list=num_patches_list, engine=False)


def record_prompts(pipe, monkeypatch) -> list:
    seen = []
    add = pipe.engine.add_request

    def recording(prompt_ids, params=None, **kw):
        seen.append(list(prompt_ids))
        return add(prompt_ids, params, **kw)

    monkeypatch.setattr(pipe.engine, "add_request", recording)
    return seen


def block(tiles_, n):
    return "<img>" + "<IMG_CONTEXT>" * (tiles_ * n) + "</img>"


# ---------------------------------------------------------------------------------------------- demo model
def test_demo_answer_equals_the_reference_chat(demo):
    question = "What color is the triangle?"
    px = tiles(SCENE1, demo.model)
    want, _ = reference(demo, question, px, max_new_tokens=32)
    got = demo((question, str(SCENE1)), GenerationConfig(max_new_tokens=32))
    assert got.text == want
    prompt, _ = build_chat_prompt("internvl2_5", question, num_patches_list=[px.shape[0]],
                                  num_image_token=demo.model.config.num_image_token)
    assert got.input_token_len == len(demo.tokenizer(prompt)["input_ids"])
    assert got.finish_reason == "stop" and got.generate_token_len == len(got.token_ids) > 0
    assert demo((Image.open(SCENE1), question), GenerationConfig(max_new_tokens=32)).text == want  # PIL, reversed


# ---------------------------------------------------------------------------------------------- prompts and ids
def test_numbered_multi_image_prompt_is_the_spec_text(tiny, images, monkeypatch):
    a, b = images[0], images[1]
    pa, pb = tiles(a, tiny.model), tiles(b, tiny.model)
    assert (pa.shape[0], pb.shape[0]) == (3, 1)
    spec = (f"<|im_start|>system\n{S3}<|im_end|>\n<|im_start|>user\nImage-1: {block(3, 4)}\nImage-2: {block(1, 4)}\n"
            "Which is brighter?<|im_end|>\n<|im_start|>assistant\n")
    seen = record_prompts(tiny, monkeypatch)
    gen = GenerationConfig(max_new_tokens=20)
    numbered = tiny((f"Image-1: {IMAGE_TOKEN}\nImage-2: {IMAGE_TOKEN}\nWhich is brighter?", [a, b]), gen)
    default = tiny(("Which is brighter?", [str(a), Image.open(b)]), gen)
    assert seen == [tiny.tokenizer(spec)["input_ids"]] * 2
    want, _ = reference(tiny, "Image-1: <image>\nImage-2: <image>\nWhich is brighter?", torch.cat([pa, pb]),
                        num_patches_list=[3, 1], max_new_tokens=20)
    assert numbered.text == default.text == want


def test_greedy_text_equals_reference_token_for_token(tiny, images):
    px = tiles(images[2], tiny.model)
    want, _ = reference(tiny, "Describe it.", px, max_new_tokens=20)
    got = tiny(("Describe it.", images[2]), GenerationConfig(max_new_tokens=20))
    assert got.text == want and len(want) > 10


def test_message_list_with_system_and_history_equals_chat(tiny, images, tiny_model):
    px = tiles(images[1], tiny.model)
    msgs = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(images[1])}},
                                         {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "Noise."},
            {"role": "user", "content": "Which colors?"}]
    tiny_model.system_message = "Answer briefly."
    try:
        want, _ = reference(tiny, "Which colors?", px, history=[("<image>\nWhat is it?", "Noise.")])
    finally:
        tiny_model.system_message = None
    assert tiny(msgs, GenerationConfig(max_new_tokens=20)).text == want
    with_config = Pipeline(tiny_model, tiny.tokenizer, PipelineConfig(system_message="Answer briefly.", **SMALL_KV))
    assert with_config(msgs[1:], GenerationConfig(max_new_tokens=20)).text == want


def test_tile_limits_per_pipeline_and_per_image(tiny_model, tok, images):
    n = tiny_model.config.num_image_token
    base = Pipeline(tiny_model, tok, PipelineConfig(**SMALL_KV))
    one_tile = Pipeline(tiny_model, tok, PipelineConfig(max_dynamic_patch=1, **SMALL_KV))
    gen = GenerationConfig(max_new_tokens=1)
    full = base(("q", images[2]), gen).input_token_len
    assert tiles(images[2], tiny_model).shape[0] == 4 and tiles(images[2], tiny_model, 2).shape[0] == 3
    assert full - one_tile(("q", images[2]), gen).input_token_len == (4 - 1) * n
    limited = {"url": images[2], "max_dynamic_patch": 2}
    msg = [{"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image_url", "image_url": limited}]}]
    assert full - base(msg, gen).input_token_len == (4 - 3) * n
    msg[0]["content"][1]["image_url"] = {"url": images[2], "detail": "low"}
    assert full - base(msg, gen).input_token_len == (4 - 1) * n


def test_session_equals_chat_with_history_and_reuses_the_kv(tiny, images):
    px1, px2 = tiles(images[0], tiny.model), tiles(images[1], tiny.model)
    r1, h = reference(tiny, "What is in the image?", px1)
    r2, h = reference(tiny, "Go on.", px1, history=h)
    r3, _ = reference(tiny, "<image>\nAnd here?", torch.cat([px1, px2]), history=h,
                      num_patches_list=[px1.shape[0], px2.shape[0]])
    gen = GenerationConfig(max_new_tokens=20)
    s = tiny.chat(("What is in the image?", images[0]), gen_config=gen)
    cached = tiny.engine.stats.cached_prompt_tokens
    s = tiny.chat("Go on.", s, gen_config=gen)
    assert tiny.engine.stats.cached_prompt_tokens > cached  # turn 2 reused turn 1's KV (prefix cache)
    s = tiny.chat(("And here?", images[1]), s, gen_config=gen)
    assert [a for _, a in s.history] == [r1, r2, r3] and s.response.text == r3
    assert s.history[1][0] == "Go on." and s.history[2][0] == ("And here?", images[1])


def test_quantize_option_answers_as_the_quantized_models_reference_chat(tok, images):
    cfg = tiny_config()
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=len(tok)), image_token_id=None)
    model = randomize_(InternVLChatModel(cfg), seed=5, std=0.3).eval()
    pipe = pipeline(model, tok, quantize="int8", **SMALL_KV)
    assert any(isinstance(m, Int8Linear) for m in pipe.model.modules())
    want, _ = reference(pipe, "What is in the image?", tiles(images[0], model))
    assert pipe(("What is in the image?", images[0]), GenerationConfig(max_new_tokens=20)).text == want


# ---------------------------------------------------------------------------------------------- batching and streaming
def prompts_for(images):
    return ["Tell me a story.",
            ("What is in the image?", images[0]),
            ("Compare them.", [images[1], images[2]]),
            [{"role": "user", "content": [{"type": "text", "text": "Describe."},
                                          {"type": "image_url", "image_url": {"url": str(images[1])}}]}]]


def test_batch_equals_singles_and_runs_together(tiny, images):
    prompts = prompts_for(images)
    batch = tiny(prompts, LONG)
    assert tiny.engine.stats.max_running == len(prompts)  # all submitted at once: continuous batching
    singles = [tiny(p, LONG) for p in prompts]
    assert [(r.text, r.token_ids, r.input_token_len, r.finish_reason) for r in batch] == \
        [(r.text, r.token_ids, r.input_token_len, r.finish_reason) for r in singles]
    assert [r.index for r in batch] == [0, 1, 2, 3]
    assert all(r.generate_token_len == 12 and r.finish_reason == "length" for r in batch)
    per_prompt = tiny(prompts[:2], [GenerationConfig(max_new_tokens=3, ignore_eos=True), LONG])
    assert [r.generate_token_len for r in per_prompt] == [3, 12]


def test_stream_pieces_concatenate_to_the_answers(tiny, images):
    prompts = prompts_for(images)
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True, logprobs=1)
    full = tiny(prompts, gen)
    pieces = list(tiny.stream_infer(prompts, gen))
    by_index = defaultdict(list)
    for p in pieces:
        assert not by_index[p.index] or by_index[p.index][-1].finish_reason is None  # nothing after the last
        by_index[p.index].append(p)
    assert [p.index for p in pieces] != sorted(p.index for p in pieces)  # prompts interleave
    for i, want in enumerate(full):
        got = by_index[i]
        assert "".join(p.text for p in got) == want.text
        assert [t for p in got for t in p.token_ids] == want.token_ids
        assert [d for p in got for d in p.logprobs] == want.logprobs
        assert got[-1].finish_reason == want.finish_reason and got[-1].generate_token_len == 12
        assert [p.generate_token_len for p in got] == sorted(p.generate_token_len for p in got)


def test_chat_stream_updates_the_session(tiny, images):
    s = tiny.chat(("What is in the image?", images[0]), gen_config=LONG)
    stream = tiny.chat("Go on.", s, gen_config=LONG, stream_response=True)
    assert len(s.history) == 1  # nothing changes before the answer exists
    text = "".join(p.text for p in stream)
    assert s.history[-1] == ("Go on.", text) and s.response.text == text
    again = tiny.chat("Go on.", tiny.chat(("What is in the image?", images[0]), gen_config=LONG), gen_config=LONG)
    assert again.response.text == text


def test_stop_words_cut_the_answer_and_streams_agree(tiny):
    full = tiny("Tell me a story.", LONG).text
    stop = next(full[k:k + 2] for k in range(4, len(full) - 2)
                if full[k:k + 2].strip() == full[k:k + 2] and "\ufffd" not in full[k:k + 2])
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True, stop_words=[stop])
    got = tiny("Tell me a story.", gen)
    assert got.finish_reason == "stop" and got.text == full.split(stop)[0].strip()
    assert "".join(p.text for p in tiny.stream_infer("Tell me a story.", gen)) == got.text


def test_logprobs_are_the_models_log_softmax(tiny, images, monkeypatch):
    seen = record_prompts(tiny, monkeypatch)
    got = tiny(("What is in the image?", images[0]), GenerationConfig(max_new_tokens=5, ignore_eos=True, logprobs=2))
    ids = torch.tensor([seen[0] + got.token_ids])
    with torch.no_grad():
        logits = tiny.model(pixel_values=tiles(images[0], tiny.model), input_ids=ids).logits[0]
    logp = torch.log_softmax(logits.float(), -1)[len(seen[0]) - 1: -1]  # (5, V): the positions that chose them
    assert len(got.logprobs) == 5
    for k, (token, entry) in enumerate(zip(got.token_ids, got.logprobs)):
        top2 = torch.topk(logp[k], 2).indices.tolist()
        assert set(entry) == {token, *top2} and token == top2[0]  # greedy: the chosen token is the most likely
        for t, v in entry.items():
            assert v == pytest.approx(float(logp[k, t]), abs=1e-4)


def test_special_tokens_kept_on_request(tiny):
    got = tiny("Tell me a story.", GenerationConfig(max_new_tokens=12, ignore_eos=True, skip_special_tokens=False))
    assert got.text == tiny.tokenizer.decode(got.token_ids, skip_special_tokens=False).split("<|im_end|>")[0].strip()


def test_session_len_lowers_the_limit_or_refuses(tiny_model, tok):
    n_prompt = Pipeline(tiny_model, tok, PipelineConfig(**SMALL_KV))("Hi.", LONG).input_token_len
    short = Pipeline(tiny_model, tok, PipelineConfig(session_len=n_prompt + 3, **SMALL_KV))
    got = short("Hi.", LONG)
    assert (got.generate_token_len, got.finish_reason) == (3, "length")
    with pytest.raises(ValueError, match=f"the prompt is {n_prompt} tokens .* session_len is {n_prompt}"):
        Pipeline(tiny_model, tok, PipelineConfig(session_len=n_prompt, **SMALL_KV))("Hi.")


def test_progress_bar_on_stderr_when_asked_or_for_large_batches(tiny, capsys):
    tiny(["a", "b"], GenerationConfig(max_new_tokens=2))
    assert capsys.readouterr().err == ""
    tiny(["a", "b"], GenerationConfig(max_new_tokens=2), use_tqdm=True)
    assert "2/2" in capsys.readouterr().err
    tiny(["a"] * 16, GenerationConfig(max_new_tokens=1))
    assert "16/16" in capsys.readouterr().err


def test_closing_a_stream_early_aborts_and_frees_the_kv(tiny):
    stream = tiny.stream_infer(["Tell me a story.", "Another one."], LONG)
    next(stream)
    assert tiny.engine.has_work
    stream.close()
    pool = tiny.engine.pool
    assert not tiny.engine.has_work and pool.allocator.num_free == pool.num_blocks


# ---------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_fail_before_anything_runs(tiny, images, tmp_path):
    session = tiny.chat("hi", gen_config=GenerationConfig(max_new_tokens=1))
    steps = tiny.engine.stats.steps
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=r"prompts\[1\], image 1 of message 1: .*nope.png"):
        tiny(["fine", ("q", missing)])
    with pytest.raises(ValueError, match="unsupported image type int"):
        tiny(("q", [3]))
    with pytest.raises(ValueError, match="must not contain the image token <IMG_CONTEXT>"):
        tiny(("look <IMG_CONTEXT>", images[1]))
    with pytest.raises(ValueError, match="2 gen_configs for 3 prompts"):
        tiny(["a", "b", "c"], [GenerationConfig(), GenerationConfig()])
    with pytest.raises(ValueError, match="gen_config must be an internvl GenerationConfig, got dict"):
        tiny("a", dict(max_new_tokens=3))
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        tiny([])
    with pytest.raises(ValueError, match="a system message can only be given on the first turn"):
        tiny.chat([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], session)
    assert tiny.engine.stats.steps == steps and not tiny.engine.has_work  # nothing was submitted
    assert len(session.history) == 1
    assert tiny("still serving", GenerationConfig(max_new_tokens=2)).generate_token_len >= 1


def test_http_urls_go_through_the_safe_fetcher(tiny):
    """The default media policy refuses loopback destinations before connecting (SERVING.md §5.3)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    try:
        with pytest.raises(ValueError, match=r"prompt, image 1 of message 1"):
            tiny(("q", f"http://127.0.0.1:{port}/cat.png"))
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody ever connected
    finally:
        listener.close()


def test_pipeline_construction_errors(tiny_model, tok):
    with pytest.raises(ValueError, match="needs its tokenizer"):
        pipeline(tiny_model)
    with pytest.raises(TypeError, match=r"unknown pipeline option\(s\) \['backend_config'\]"):
        pipeline(tiny_model, tok, backend_config=None)
    with pytest.raises(FileNotFoundError):
        pipeline("/nonexistent/checkpoint/dir")


def test_example_runs_on_the_demo_model():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(ROOT / "examples" / "pipeline.py")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["single image"] + ["batch"] * 3 + [
        "two images", "messages", "session", "session", "stream"]
    assert all(line.split(":", 1)[1].strip(" '") for line in lines)  # every section printed an answer
