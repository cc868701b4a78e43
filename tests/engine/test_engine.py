"""The engine against the oracle, the plain reference `generate`: greedy output token for token, whatever the
batching, chunking, prefix caching, preemption or streaming; plus seeds, n > 1, logprobs, stops and abort."""

import asyncio
import contextlib
import dataclasses
import functools

import pytest
import torch

from helpers_tokenizers import make_bpe_tokenizer_dir
from internvl import InternVLChatModel, load_tokenizer
from internvl.api.chat import engine_for, engine_generate
from internvl.engine import Engine, QueueFull, SamplingParams
from internvl.generation.generate import generate
from internvl.generation.sampling import GenerationConfig
from internvl.model.internvl import InternVLModel
from tiny import LLM_ARCHS, randomize_, tiny_config

IMG = 120  # tiny_config's <IMG_CONTEXT> id; 56-pixel tiles give 4 image tokens per tile
GREEDY = SamplingParams(max_new_tokens=12, greedy=True)


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str = "Qwen2ForCausalLM") -> InternVLModel:
    return randomize_(InternVLModel(tiny_config(arch)), seed=1, std=0.3).eval()


def make_prompt(seed: int, length: int, tiles: int = 0, at: int = 4):
    """Random text ids with an image block of `tiles` tiles inserted at position `at`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (length,), generator=g).tolist()
    if tiles:
        ids = ids[:at] + [IMG] * (4 * tiles) + ids[at:]
    return ids, (torch.randn(tiles, 3, 56, 56, generator=g) if tiles else None)


def reference(model, ids, px=None, **cfg) -> list[int]:
    return generate(model, torch.tensor([ids]), pixel_values=px, config=GenerationConfig(**cfg))[0].tolist()


def tokens_of(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def step_once(eng: Engine, tokens: dict) -> None:
    for d in eng.step():
        tokens.setdefault(d.request_id, []).extend(d.token_ids)


def run_steps(eng: Engine, tokens: dict) -> None:
    while eng.has_work:
        step_once(eng, tokens)


# ------------------------------------------------------------------------------------------------ greedy parity
@pytest.mark.parametrize("arch", LLM_ARCHS)
def test_greedy_equals_reference_single_batched_and_chunked(arch):
    model = tiny_model(arch)
    prompts = [make_prompt(1, 12, 1), make_prompt(2, 30), make_prompt(3, 7, 2), make_prompt(4, 3)]
    refs = [reference(model, ids, px, max_new_tokens=12) for ids, px in prompts]
    single = Engine(model, num_blocks=64, block_size=4)
    out = single.generate([dict(prompt_ids=prompts[0][0], pixel_values=prompts[0][1])], GREEDY)
    assert tokens_of(out) == refs[:1]
    eng = Engine(model, num_blocks=64, block_size=4, prefill_chunk_tokens=5)  # tiny chunk budget
    outs = eng.generate([dict(prompt_ids=ids, pixel_values=px) for ids, px in prompts], GREEDY)
    assert tokens_of(outs) == refs
    assert eng.stats.mixed_steps > 0  # prompt chunks ran in the same steps as other requests' decodes
    assert eng.stats.prefill_tokens == sum(len(ids) for ids, _ in prompts)
    assert eng.pool.allocator.num_used == 0 and not eng.has_work


def test_requests_join_while_others_decode():
    model = tiny_model()
    (ids_a, px_a), (ids_b, _), (ids_c, px_c) = make_prompt(5, 9, 1), make_prompt(6, 20), make_prompt(7, 5, 1)
    eng = Engine(model, num_blocks=64, block_size=4, prefill_chunk_tokens=8)
    tokens: dict = {}
    a = eng.add_request(ids_a, GREEDY, pixel_values=px_a)
    for _ in range(4):
        step_once(eng, tokens)
    assert 0 < len(tokens[a]) < 12  # a is mid-way through its decode
    b = eng.add_request(ids_b, GREEDY)
    step_once(eng, tokens)
    c = eng.add_request(ids_c, GREEDY, pixel_values=px_c)
    run_steps(eng, tokens)
    assert tokens[a] == reference(model, ids_a, px_a, max_new_tokens=12)
    assert tokens[b] == reference(model, ids_b, max_new_tokens=12)
    assert tokens[c] == reference(model, ids_c, px_c, max_new_tokens=12)


def test_phi3_long_prompt_keeps_its_rope_regime_when_chunked_and_batched():
    # tiny Phi-3: original_max_position_embeddings 256, so a 300-token prompt uses the long factors (§11.4)
    model = tiny_model("Phi3ForCausalLM")
    (long_ids, _), (short_ids, px) = make_prompt(8, 300), make_prompt(9, 20, 1)
    params = SamplingParams(max_new_tokens=6, greedy=True)
    eng = Engine(model, num_blocks=128, block_size=8, prefill_chunk_tokens=64)
    outs = eng.generate([dict(prompt_ids=long_ids), dict(prompt_ids=short_ids, pixel_values=px)], params)
    assert tokens_of(outs) == [reference(model, long_ids, max_new_tokens=6),
                               reference(model, short_ids, px, max_new_tokens=6)]


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Phi3ForCausalLM"])
def test_engine_runs_on_models_with_the_fused_cpu_modules(arch):
    fast = pytest.importorskip("internvl.model.fast")
    import copy

    model = fast.optimize_for_inference(copy.deepcopy(tiny_model(arch)))
    prompts = [make_prompt(40, 12, 1), make_prompt(41, 25)]
    outs = Engine(model, num_blocks=64, block_size=4, prefill_chunk_tokens=7).generate(
        [dict(prompt_ids=ids, pixel_values=px) for ids, px in prompts], GREEDY)
    assert tokens_of(outs) == [reference(tiny_model(arch), ids, px, max_new_tokens=12) for ids, px in prompts]


# ------------------------------------------------------------------------------------------------ prefix cache
def test_prefix_cache_reuses_blocks_and_keeps_the_output():
    model = tiny_model()
    text, _ = make_prompt(10, 40)
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(11))
    prefix = text[:20] + [IMG] * 8 + text[20:]  # 48 tokens; the image spans positions 20..27
    a, b = prefix + [7, 8, 9], prefix + [10, 11, 12, 13, 14]
    eng = Engine(model, num_blocks=64, block_size=8)
    out_a = eng.generate([dict(prompt_ids=a, pixel_values=px)], GREEDY)[0]
    assert out_a.num_cached_tokens == 0
    before = eng.stats.prefill_tokens
    out_b = eng.generate([dict(prompt_ids=b, pixel_values=px)], GREEDY)[0]
    assert out_b.num_cached_tokens == 48  # six full blocks shared
    assert eng.stats.prefill_tokens - before == len(b) - 48  # only the rest was prefilled
    assert eng.vision.tiles_encoded == 2  # and the image tokens were all cached: no second ViT run
    assert tokens_of([out_a, out_b]) == [reference(model, a, px, max_new_tokens=12),
                                         reference(model, b, px, max_new_tokens=12)]
    # the same ids with a different image share only the blocks before the image
    px2 = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(12))
    out_c = eng.generate([dict(prompt_ids=b, pixel_values=px2)], GREEDY)[0]
    assert out_c.num_cached_tokens == 16
    assert tokens_of([out_c]) == [reference(model, b, px2, max_new_tokens=12)]
    # a prompt that is entirely cached still recomputes its last token (its logits are needed)
    out_d = eng.generate([dict(prompt_ids=prefix, pixel_values=px)], GREEDY)[0]
    assert out_d.num_cached_tokens == 40
    assert tokens_of([out_d]) == [reference(model, prefix, px, max_new_tokens=12)]


# ------------------------------------------------------------------------------------------------ memory bound
def test_32_requests_with_kv_for_8_finish_like_alone_and_stay_in_budget():
    model = tiny_model()
    prompts = [make_prompt(100 + i, 5 + i % 7, tiles=1 if i % 4 == 0 else 0) for i in range(32)]
    params = SamplingParams(max_new_tokens=8, greedy=True)
    probe = Engine(model, num_blocks=1, block_size=4)
    per_request = max(probe.pool.blocks_for(len(ids) + 8) for ids, _ in prompts)
    budget = 8 * per_request * probe.pool.block_nbytes + probe.pool.block_nbytes // 2
    eng = Engine(model, kv_budget_bytes=budget, block_size=4, max_batch_size=32)
    assert eng.pool.num_blocks == 8 * per_request and eng.pool.nbytes <= budget
    outs = eng.generate([dict(prompt_ids=ids, pixel_values=px) for ids, px in prompts], params)
    assert tokens_of(outs) == [reference(model, ids, px, max_new_tokens=8) for ids, px in prompts]
    assert eng.pool.allocator.peak_used <= eng.pool.num_blocks
    assert eng.stats.preemptions > 0  # decode growth outran the pool: newest sequences were recomputed
    assert eng.pool.allocator.num_used == 0


def test_bounded_queue_and_requests_that_can_never_fit():
    model = tiny_model()
    ids, px = make_prompt(12, 6, 1)
    eng = Engine(model, num_blocks=8, block_size=4, max_queue=2)
    eng.add_request(ids, GREEDY, pixel_values=px)
    eng.add_request(ids, GREEDY, pixel_values=px)
    with pytest.raises(QueueFull, match="max_queue=2"):
        eng.add_request(ids, GREEDY, pixel_values=px)
    with pytest.raises(ValueError, match="needs 10 KV blocks"):
        eng.add_request(list(range(3, 40)), SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="4 <IMG_CONTEXT> slots but the images produce 8"):
        eng.add_request(ids, GREEDY, pixel_values=torch.zeros(2, 3, 56, 56))
    with pytest.raises(ValueError, match="stop strings need"):
        eng.add_request(ids, SamplingParams(stop="x"))
    eng.generate([])
    while eng.has_work:
        eng.step()
    eng.add_request(ids, GREEDY, pixel_values=px)  # room again


# ------------------------------------------------------------------------------------------------ abort
def test_abort_mid_stream_returns_blocks_at_once():
    model = tiny_model()
    (ids, px), (ids_b, _) = make_prompt(13, 10, 1), make_prompt(14, 9)
    eng = Engine(model, num_blocks=64, block_size=4)
    stream = eng.stream(ids, SamplingParams(max_new_tokens=40, greedy=True), pixel_values=px)
    first = [next(stream), next(stream)]
    assert [len(d.token_ids) for d in first] == [1, 1] and eng.pool.allocator.num_used > 0
    stream.close()
    assert eng.pool.allocator.num_used == 0 and not eng.has_work
    assert list(stream) == []
    # a request aborted while queued is never scheduled
    rid = eng.add_request(ids, GREEDY, pixel_values=px)
    assert eng.abort(rid) and not eng.abort(rid)
    assert eng.step() == [] and eng.stats.steps == 2
    # aborting one running request frees its blocks at once and leaves the other one's output intact
    tokens: dict = {}
    a = eng.add_request(ids, SamplingParams(max_new_tokens=30, greedy=True), pixel_values=px)
    b = eng.add_request(ids_b, GREEDY)
    for _ in range(3):
        step_once(eng, tokens)
    used = eng.pool.allocator.num_used
    assert eng.abort(a)
    assert eng.pool.allocator.num_used == used - eng.pool.blocks_for(len(ids) + 2)  # a: prompt + 2 cached tokens
    run_steps(eng, tokens)
    assert tokens[b] == reference(model, ids_b, max_new_tokens=12) and len(tokens[a]) == 3
    assert eng.pool.allocator.num_used == 0


def test_a_failing_step_fails_only_its_requests_and_the_loop_keeps_serving():
    model = tiny_model()
    (ids, px), (text_ids, _) = make_prompt(42, 8, 1), make_prompt(43, 9)
    eng = Engine(model, num_blocks=64, block_size=4)
    real_encode = eng.vision.encode

    def broken_encode(images):
        eng.vision.encode = real_encode  # fail once
        raise RuntimeError("simulated ViT failure")

    eng.vision.encode = broken_encode
    eng.start()
    try:
        stream = eng.stream(ids, GREEDY, pixel_values=px)
        with pytest.raises(RuntimeError, match="simulated ViT failure"):
            list(stream)
        assert eng.is_running and eng.pool.allocator.num_used == 0
        out = eng.generate([text_ids], GREEDY)[0]
        assert out.outputs[0].token_ids == reference(model, text_ids, max_new_tokens=12)
    finally:
        eng.shutdown()


def test_async_streams_and_cancellation_free_blocks():
    model = tiny_model()
    ids, px = make_prompt(15, 10, 1)
    ref = reference(model, ids, px, max_new_tokens=12)

    async def main():
        eng = Engine(model, num_blocks=64, block_size=4)
        try:
            got = []
            async for d in eng.astream(ids, GREEDY, pixel_values=px):
                got.extend(d.token_ids)
            assert got == ref and eng.is_running
            started = asyncio.Event()

            async def consume():
                async for _ in eng.astream(ids, SamplingParams(max_new_tokens=200, greedy=True), pixel_values=px):
                    started.set()

            decoded_before = eng.stats.decode_tokens
            task = asyncio.create_task(consume())
            await asyncio.wait_for(started.wait(), 30)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for _ in range(500):  # applied within one step of the background loop
                if eng.pool.allocator.num_used == 0 and not eng.has_work:
                    break
                await asyncio.sleep(0.01)
            assert eng.pool.allocator.num_used == 0 and not eng.has_work
            assert eng.stats.decode_tokens - decoded_before < 150  # it was stopped long before its 199 decodes
            # two concurrent async streams, each equal to running alone
            other, px2 = make_prompt(16, 7, 1)

            async def collect(p, pv):
                out = []
                async for d in eng.astream(p, GREEDY, pixel_values=pv):
                    out.extend(d.token_ids)
                return out

            both = await asyncio.gather(collect(ids, px), collect(other, px2))
            assert both == [ref, reference(model, other, px2, max_new_tokens=12)]
        finally:
            eng.shutdown()
        assert not eng.is_running

    asyncio.run(main())


# ------------------------------------------------------------------------------------------------ sampling
def test_seeded_sampling_ignores_batch_mates_and_equals_the_reference():
    model = tiny_model()
    ids, px = make_prompt(17, 10, 1)
    params = SamplingParams(max_new_tokens=12, temperature=1.5, top_k=50, seed=7)
    alone = Engine(model, num_blocks=64, block_size=4).generate([dict(prompt_ids=ids, pixel_values=px)], params)
    mates = [dict(prompt_ids=make_prompt(18, 15)[0], params=SamplingParams(max_new_tokens=12, temperature=1.0)),
             dict(prompt_ids=ids, pixel_values=px, params=params),
             dict(prompt_ids=make_prompt(19, 4)[0], params=SamplingParams(max_new_tokens=5, temperature=2.0, seed=7))]
    batched = Engine(model, num_blocks=64, block_size=4, prefill_chunk_tokens=6).generate(mates)
    ref = reference(model, ids, px, max_new_tokens=12, do_sample=True, temperature=1.5, seed=7)
    assert tokens_of(alone)[0] == tokens_of(batched)[1] == ref
    other = Engine(model, num_blocks=64, block_size=4).generate([dict(prompt_ids=ids, pixel_values=px)],
                                                               params.replace(seed=8))
    assert tokens_of(other)[0] != ref


def test_n_choices_share_one_prefill():
    model = tiny_model()
    ids, px = make_prompt(20, 10, 1)  # 14 tokens: three full blocks of 4 and a partial one
    params = SamplingParams(max_new_tokens=10, temperature=1.5, top_k=50, seed=3, n=3)  # top_k: HF default
    eng = Engine(model, num_blocks=64, block_size=4)
    rid = eng.add_request(ids, params, pixel_values=px)
    eng.step()  # prefill + fork + first token of every choice
    parent = eng._requests[rid].choices[0].seq
    assert [eng.pool.allocator.refcount[b] for b in parent.block_table[:3]] == [3, 3, 3]
    assert eng.pool.allocator.refcount[parent.block_table[3]] == 1  # the partial block was copied per choice
    run_steps(eng, {})
    assert eng.stats.prefill_tokens == len(ids)  # one prefill for all three
    out = Engine(model, num_blocks=64, block_size=4).generate(
        [dict(prompt_ids=ids, pixel_values=px, params=params)])[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert out.outputs[0].token_ids == reference(model, ids, px, max_new_tokens=10, do_sample=True,
                                                 temperature=1.5, seed=3)
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    greedy = Engine(model, num_blocks=64, block_size=4).generate(
        [dict(prompt_ids=ids, pixel_values=px, params=SamplingParams(max_new_tokens=8, greedy=True, n=2))])[0]
    ref = reference(model, ids, px, max_new_tokens=8)
    assert [o.token_ids for o in greedy.outputs] == [ref, ref]


def test_logprobs_match_log_softmax_of_the_model_logits():
    model = tiny_model()
    ids, px = make_prompt(21, 10, 1)
    params = SamplingParams(max_new_tokens=6, greedy=True, logprobs=True, top_logprobs=3)
    out = Engine(model, num_blocks=64, block_size=4).generate([dict(prompt_ids=ids, pixel_values=px)], params)
    choice = out[0].outputs[0]
    with torch.no_grad():
        logits = model(pixel_values=px, input_ids=torch.tensor([ids + choice.token_ids])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    assert len(choice.logprobs) == 6
    for j, (tok, lp) in enumerate(zip(choice.token_ids, choice.logprobs)):
        row = logp[len(ids) - 1 + j]
        assert lp.token_id == tok and abs(lp.logprob - float(row[tok])) < 1e-4
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist() and lp.top[0][0] == tok
        assert all(abs(v - float(row[t])) < 1e-4 for t, v in lp.top)


def test_stop_tokens_eos_min_new_tokens_and_ignore_eos():
    model = tiny_model()
    ids, px = make_prompt(22, 10, 1)
    free = reference(model, ids, px, max_new_tokens=10)
    stop = free[3]
    first = free.index(stop)
    ref = reference(model, ids, px, max_new_tokens=10, eos_token_id=stop)
    assert ref == free[: first + 1]
    eng = Engine(model, num_blocks=64, block_size=4)
    out = eng.generate([dict(prompt_ids=ids, pixel_values=px)],
                       SamplingParams(max_new_tokens=10, greedy=True, stop_token_ids=[stop]))[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (ref, "stop", stop)
    eos_engine = Engine(model, num_blocks=64, block_size=4, eos_token_ids=[stop])
    p = SamplingParams(max_new_tokens=10, greedy=True)
    assert tokens_of(eos_engine.generate([dict(prompt_ids=ids, pixel_values=px)], p)) == [ref]
    ignored = eos_engine.generate([dict(prompt_ids=ids, pixel_values=px)], p.replace(ignore_eos=True))[0].outputs[0]
    assert (ignored.token_ids, ignored.finish_reason) == (free, "length")
    late = reference(model, ids, px, max_new_tokens=10, eos_token_id=stop, min_new_tokens=first + 2)
    got = eos_engine.generate([dict(prompt_ids=ids, pixel_values=px)], p.replace(min_new_tokens=first + 2))
    assert tokens_of(got) == [late] and late != ref


def test_vision_is_cached_by_content_and_batched_under_a_tile_budget():
    model = tiny_model()
    g = torch.Generator().manual_seed(23)
    images = [torch.randn(3, 3, 56, 56, generator=g) for _ in range(3)]
    prompts = [make_prompt(24 + i, 8, 3)[0] for i in range(4)]
    reqs = [dict(prompt_ids=p, pixel_values=images[i % 3]) for i, p in enumerate(prompts)]  # image 0 used twice
    eng = Engine(model, num_blocks=64, block_size=4, vit_max_batch_tiles=4)
    outs = eng.generate(reqs, GREEDY)
    assert eng.vision.tiles_encoded == 9 and eng.vision.vit_calls == 3  # 9 distinct tiles in micro-batches of 4
    assert tokens_of(outs) == [reference(model, r["prompt_ids"], r["pixel_values"], max_new_tokens=12) for r in reqs]
    eng.generate([dict(prompt_ids=prompts[3][:-1], pixel_values=images[1])], GREEDY)
    assert eng.vision.tiles_encoded == 9 and eng.vision.cache.hits >= 1  # a repeated image skips the ViT


def test_engine_generate_is_a_drop_in_for_the_reference_batch():
    model = tiny_model()
    (a, pa), (b, pb) = make_prompt(30, 12, 1), make_prompt(31, 6, 2)
    pad = len(a) - len(b)
    batch = torch.tensor([a, [0] * pad + b])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    px = torch.cat([pa, pb])
    free = generate(model, batch, mask, px, config=GenerationConfig(max_new_tokens=10))
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=int(free[0, 2]), pad_token_id=0)
    ref = generate(model, batch, mask, px, config=cfg)
    got = engine_generate(model, batch, mask, px, config=cfg)
    assert got.tolist() == ref.tolist() and (got[0] == 0).any()  # row 0 ended early and was padded
    with pytest.raises(ValueError, match="<IMG_CONTEXT> slots"):
        engine_generate(model, batch, mask, px[:2], config=cfg)


# ------------------------------------------------------------------------------------------------ text, chat
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_bpe_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def chat_model(tok):
    cfg = tiny_config()
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=len(tok)), image_token_id=None)
    return randomize_(InternVLChatModel(cfg), seed=5, std=0.3).eval()


def test_stop_strings_are_held_back_and_never_streamed(chat_model, tok):
    prompt = tok("<|im_start|>user\nDescribe the picture.<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    eng = Engine(chat_model, tok, num_blocks=64, block_size=4)
    params = SamplingParams(max_new_tokens=40, greedy=True, ignore_eos=True)
    texts = [d.text for d in eng.stream(prompt, params)]  # one delta per generated token
    full = "".join(texts)
    ends = [len("".join(texts[: i + 1])) for i in range(len(texts))]
    # a stop string that straddles two tokens' text, so streaming has to hold its first half back
    stop, j = None, None
    for j in range(len(texts) // 2, len(texts) - 1):
        cand = texts[j][-2:] + texts[j + 1][:2]
        if texts[j] and texts[j + 1] and "\ufffd" not in cand and cand.strip() and \
                full.find(cand) == ends[j] - len(texts[j][-2:]):
            stop = cand
            break
    assert stop is not None, f"no usable token boundary in {texts!r}"
    expected = full[: full.index(stop)]
    emitted, deltas = "", []
    for d in eng.stream(prompt, params.replace(stop=[stop, "never-there"])):
        deltas.append(d)
        emitted += d.text
        assert stop not in emitted and expected.startswith(emitted)  # nothing past the stop is ever sent
        if len(deltas) == j + 1:
            assert emitted == expected  # the first half of the stop string was held back
    assert len(deltas) == j + 2 and emitted == expected
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", stop)
    assert eng.pool.allocator.num_used == 0


def test_chat_and_batch_chat_with_history_use_the_engine(chat_model, tok):
    gen = dict(max_new_tokens=6, do_sample=False)
    px = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(40))
    history = [("<image>\nWhat is it?", "a circle")]
    responses, histories = chat_model.batch_chat(tok, px, ["And its color?", "describe"], dict(gen),
                                                 num_patches_list=[1, 2], history=[history, None],
                                                 return_history=True)
    singles = [chat_model.chat(tok, px[:1], "And its color?", dict(gen), history=history),
               chat_model.chat(tok, px[1:], "describe", dict(gen))]
    reference_path = chat_model.batch_chat(tok, px, ["And its color?", "describe"], dict(gen),
                                           num_patches_list=[1, 2], history=[history, None], engine=False)
    assert responses == singles == reference_path
    assert histories == [history + [("And its color?", responses[0])], [("<image>\ndescribe", responses[1])]]
    # a second turn reuses the first turn's KV through the prefix cache
    eng = engine_for(chat_model)
    st = eng.stats
    before = (st.prefill_tokens, st.cached_prompt_tokens)
    _, hist = chat_model.chat(tok, px[2:], "Where is it?", dict(gen), return_history=True)
    first_prompt = st.prefill_tokens + st.cached_prompt_tokens - sum(before)
    cached_before = st.cached_prompt_tokens
    chat_model.chat(tok, px[2:], "And its color?", dict(gen), history=hist)
    assert st.cached_prompt_tokens - cached_before >= first_prompt - eng.pool.block_size + 1
