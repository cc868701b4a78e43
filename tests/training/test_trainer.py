"""Trainer: end-to-end tiny runs, bitwise resume, atomic checkpoints, freezing, lr groups, config keys, DDP.

Every run uses a from-scratch tiny model (tests/tiny.py shapes, 56-pixel tiles -> 4 image tokens per tile), the tiny
Qwen2-style BPE tokenizer, and a handful of InternVL JSONL records with small images written to tmp.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers_tokenizers import make_bpe_tokenizer_dir
from tiny import tiny_config, tiny_llm

from internvl.training import distributed as D
from internvl.training import trainer as T
from internvl.training.config import TrainConfig, accepted_keys, load_train_config

ANSWERS = ["A cat sits on the mat.", "The dog sits by the door.", "The quick brown fox.", "Hello world."]
SYSTEM = {"from": "system", "value": "Answer."}  # short, so samples are ~50 tokens instead of ~110 with S3


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_bpe_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def model_config_dict(tok_dir: Path) -> dict:
    from internvl.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(tok_dir))
    cfg = tiny_config(llm=tiny_llm(vocab=vocab), image_token_id=None, max_dynamic_patch=2)
    return cfg.to_original_dict()


def write_data(root: Path, n: int = 10) -> Path:
    """n records: image ones (56x56 and 112x56 images) and text-only ones, with the meta file. Returns meta path."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        answer = ANSWERS[i % len(ANSWERS)]
        if i % 3 == 2:
            lines.append({"id": i, "conversations": [SYSTEM, {"from": "human", "value": "Hello world."},
                                                     {"from": "gpt", "value": answer}]})
            continue
        size = (56, 56) if i % 2 else (112, 56)
        color = (40 * (i % 6), 255 - 30 * (i % 8), 100)
        Image.new("RGB", size, color).save(root / f"img{i}.png")
        lines.append({"id": i, "image": f"img{i}.png",
                      "conversations": [SYSTEM, {"from": "human", "value": "What is in the picture?"},
                                        {"from": "gpt", "value": answer}]})
    (root / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    meta = root / "meta.json"
    meta.write_text(json.dumps({"tiny": {"root": str(root), "annotation": "train.jsonl", "data_augment": False,
                                         "repeat_time": 1, "length": n}}), encoding="utf-8")
    return meta


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))


def make_cfg(tok_dir: Path, meta: Path, out: Path, **over) -> TrainConfig:
    kw = dict(model_config=model_config_dict(tok_dir), tokenizer=str(tok_dir), meta_path=str(meta),
              output_dir=str(out), lr=2e-3, warmup_steps=1, per_device_batch_size=2, grad_accum_steps=1,
              max_steps=4, save_steps=0, log_steps=1, seed=3, max_seq_length=512, weight_decay=0.0)
    kw.update(over)
    return TrainConfig(**kw)


def read_log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------------ end to end
def test_cli_run_loss_decreases_and_writes_final_model(tok_dir, meta, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = make_cfg(tok_dir, meta, out)
    yaml_file = tmp_path / "train.yaml"
    import yaml

    yaml_file.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "max_steps"}))
    code = T.main([str(yaml_file), "--max-steps", "8", "--log_steps=4", "--lr", "1e-2"])
    assert code == 0
    log = read_log(out)
    assert [e["step"] for e in log] == list(range(1, 9))
    first, last = sum(e["loss"] for e in log[:3]) / 3, sum(e["loss"] for e in log[-3:]) / 3
    assert last < 0.75 * first, (first, last)
    err = capsys.readouterr().err
    assert "step 4/8" in err and "tok/s" in err and "ETA" in err
    final = out / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    saved = json.loads((final / "config.json").read_text())
    assert saved["architectures"] == ["InternVLChatModel"] and saved["max_dynamic_patch"] == 2
    weights = load_file(str(final / "model.safetensors"))
    assert "language_model.lm_head.weight" in weights and "mlp1.1.weight" in weights
    assert (final / "train_config.yaml").is_file()


def test_cli_bad_records_fail_up_front_or_are_skipped_and_counted(tok_dir, tmp_path, capsys):
    root = tmp_path / "data"
    meta = write_data(root, n=6)
    good = (root / "train.jsonl").read_text(encoding="utf-8")
    bad = [
        json.dumps({"image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                              {"from": "gpt", "value": "A"}]}),
        '{"conversations": [',
        json.dumps({"image": "img0.png", "conversations": [{"from": "human", "value": "<image><image> Q"},
                                                           {"from": "gpt", "value": "A"}]}),
        json.dumps({"conversations": []}),
    ]
    (root / "train.jsonl").write_text(good + "\n".join(bad) + "\n", encoding="utf-8")
    import yaml

    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text(yaml.safe_dump({"model_config": model_config_dict(tok_dir), "tokenizer": str(tok_dir),
                                         "meta_path": str(meta), "max_steps": 3, "per_device_batch_size": 2}))
    base = [str(yaml_file)]
    # without the flag: one error listing every bad line with file:line, before any model is built or step taken
    assert T.main(base + ["--output_dir", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    annotation = str(root / "train.jsonl")
    for line, what in ((7, "file not found"), (8, "invalid JSON"), (9, "2 <image> placeholders but 1 image"),
                       (10, "empty 'conversations'")):
        assert f"{annotation}:{line}: " in err and what in err, (line, what, err)
    assert "Traceback" not in err and not (tmp_path / "strict" / "train_log.jsonl").exists()
    # with it: the run goes through on the 6 good lines and says what it skipped
    assert T.main(base + ["--output_dir", str(tmp_path / "lenient"), "--skip-bad-records"]) == 0
    err = capsys.readouterr().err
    assert "skipped 4 bad annotation lines" in err and f"{annotation}:7: " in err
    assert [e["step"] for e in read_log(tmp_path / "lenient")] == [1, 2, 3]
    assert (tmp_path / "lenient" / "final" / "model.safetensors").is_file()


def test_final_model_holds_the_trained_weights_and_restarts_training(tok_dir, meta, tmp_path):
    """lr 0: the saved weights are the ones step 1 ran with. Recompute its loss from final/ with the model's own
    loss and the first two samples of the seeded order; then fine-tune from final/ (model + its tokenizer files)."""
    from internvl.api.model import InternVLChatModel
    from internvl.config import InternVLConfig
    from internvl.tokenizer import image_context_id, load_tokenizer
    from internvl.training.data import SupervisedDataset, collate

    out = tmp_path / "one"
    cfg = make_cfg(tok_dir, meta, out, max_steps=1, lr=0.0, warmup_steps=0)
    final = T.train(cfg)
    logged = read_log(out)[0]["loss"]
    model = InternVLChatModel(InternVLConfig.from_pretrained(final))
    # internal names equal original names for Qwen2 (vision_model.*, mlp1.*, language_model.model.*, lm_head)
    missing, unexpected = model.load_state_dict(load_file(str(final / "model.safetensors")), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    tok = load_tokenizer(tok_dir)
    model.img_context_token_id = image_context_id(tok)
    ds = SupervisedDataset(meta, tok, T.data_config(cfg, model.config))
    first = D.epoch_permutation(len(ds), cfg.seed, 0)[:2].tolist()
    batch = collate([ds[i] for i in first], tok.pad_token_id)
    with torch.no_grad():
        loss = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                     batch["image_flags"], labels=batch["labels"]).loss
    assert abs(float(loss) - logged) < 1e-5

    T.train(cfg.replace(model_config=None, model=str(final), tokenizer=None, output_dir=str(tmp_path / "again")))
    assert read_log(tmp_path / "again")[0]["loss"] == pytest.approx(logged, abs=1e-6)


def test_gradient_checkpointing_and_bf16(tok_dir, meta, tmp_path):
    runs = {}
    for name, over in {"plain": {}, "ckpt": {"gradient_checkpointing": True}, "bf16": {"dtype": "bf16"}}.items():
        T.train(make_cfg(tok_dir, meta, tmp_path / name, max_steps=1 if name == "bf16" else 2, **over))
        runs[name] = [e["loss"] for e in read_log(tmp_path / name)]
    assert runs["ckpt"] == pytest.approx(runs["plain"], abs=1e-6)  # recomputation changes nothing
    assert runs["bf16"][0] != runs["plain"][0]  # autocast really ran in bf16 ...
    assert runs["bf16"][0] == pytest.approx(runs["plain"][0], abs=5e-2)  # ... and stays close


# ------------------------------------------------------------------------------------------------ resume
class Crash(RuntimeError):
    pass


def crash_after(step: int):
    def hook(s, metrics):
        if s == step:
            raise Crash(f"simulated crash after step {s}")
    return hook


def test_resume_is_bitwise_identical_and_ignores_incomplete_checkpoints(tok_dir, tmp_path):
    # 6 samples, 1 per micro-batch x 2 accumulation steps = 3 steps per epoch: the crash after step 3 resumes from
    # checkpoint-2 in the middle of epoch 0 and the run crosses into epoch 1. LoRA dropout draws from the global RNG
    # every step, so data position, RNG state and optimizer state all have to be restored exactly.
    meta6 = write_data(tmp_path / "data6", n=6)
    common = dict(max_steps=4, per_device_batch_size=1, grad_accum_steps=2, save_steps=2, save_total_limit=1,
                  use_llm_lora=4, lora_dropout=0.1, freeze_vision=True, merge_lora=False)
    ref_out, out = tmp_path / "ref", tmp_path / "crashed"
    T.train(make_cfg(tok_dir, meta6, ref_out, **common))

    with pytest.raises(Crash):
        T.train(make_cfg(tok_dir, meta6, out, **common), on_step_end=crash_after(3))
    assert [s for s, _ in T.complete_checkpoints(out)] == [2]
    # a checkpoint directory without its COMPLETE marker (a copy cut short) and a stale temp dir from a crash mid-save
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"garbage")
    (out / ".checkpoint-4.partial").mkdir()
    assert T.latest_checkpoint(out) == out / "checkpoint-2"

    T.train(make_cfg(tok_dir, meta6, out, **common, resume=True))
    assert not (out / ".checkpoint-4.partial").exists()
    assert [s for s, _ in T.complete_checkpoints(out)] == [4]  # rotated to save_total_limit
    assert json.loads((out / "checkpoint-4" / "data_state_0.json").read_text()) == \
        {"epoch": 1, "position": 2, "pack_offset": 0}

    ref_log, log = read_log(ref_out), read_log(out)
    assert [e["step"] for e in log] == [1, 2, 3, 4]  # nothing lost, nothing logged twice
    assert [e["loss"] for e in log] == [e["loss"] for e in ref_log]
    a = load_file(str(ref_out / "checkpoint-4" / "model.safetensors"))
    b = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise, CPU fp32
    fa = load_file(str(ref_out / "final" / "adapter_model.safetensors"))
    fb = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in load_file(str(out / "final" / "model.safetensors"))


def test_fresh_run_never_overwrites_a_previous_run(tok_dir, meta, tmp_path):
    out = tmp_path / "run"
    T.train(make_cfg(tok_dir, meta, out, max_steps=1, save_steps=0))  # no checkpoints, but final/ and a log
    before = (out / "final" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        T.train(make_cfg(tok_dir, meta, out, max_steps=1, seed=4))
    assert (out / "final" / "model.safetensors").read_bytes() == before


def test_crash_while_saving_leaves_no_checkpoint(tok_dir, meta, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        T.train(make_cfg(tok_dir, meta, out, max_steps=1, save_steps=1))
    assert T.complete_checkpoints(out) == [] and not (out / "checkpoint-1").exists()
    assert (out / ".checkpoint-1.partial").is_dir()  # the half-written one, removed by the next start


def test_resume_rejects_changed_data_order(tok_dir, meta, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        T.train(make_cfg(tok_dir, meta, out, max_steps=3, save_steps=1), on_step_end=crash_after(1))
    with pytest.raises(ValueError, match="per_device_batch_size"):
        T.train(make_cfg(tok_dir, meta, out, max_steps=3, save_steps=1, per_device_batch_size=1, resume=True))


# ------------------------------------------------------------------------------------------------ freezing, lr
def test_freezing_keeps_frozen_weights_bitwise(tok_dir, meta, tmp_path):
    from internvl.tokenizer import load_tokenizer

    cfg = make_cfg(tok_dir, meta, tmp_path / "run", max_steps=2, freeze_vision=True, freeze_projector=True)
    T._seed_everything(cfg.seed)  # the initial weights train() builds from the same seed
    initial = {k: v.clone() for k, v in T.build_model(cfg, load_tokenizer(tok_dir)).state_dict().items()}
    final = load_file(str(T.train(cfg) / "model.safetensors"))
    frozen = [k for k in initial if k.startswith(("vision_model.", "mlp1."))]
    assert frozen and all(torch.equal(final[k], initial[k]) for k in frozen)
    llm = [k for k in initial if k.startswith("language_model.") and "rotary" not in k]
    assert sum(not torch.equal(final[k], initial[k]) for k in llm) == len(llm)  # every LLM tensor moved


def test_per_module_learning_rates_and_decay_groups(tok_dir, meta, tmp_path):
    from internvl.api.model import InternVLChatModel
    from internvl.config import InternVLConfig

    cfg = make_cfg(tok_dir, meta, tmp_path, lr=1.0, lr_vision=1e-5, lr_projector=2e-4, lr_llm=3e-3, weight_decay=0.1)
    model = InternVLChatModel(InternVLConfig.from_dict(cfg.model_config))
    opt = T.build_optimizer(model, cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"vision", "vision_no_decay", "projector", "projector_no_decay", "llm", "llm_no_decay"}
    expected_lr = {"vision": 1e-5, "projector": 2e-4, "llm": 3e-3}
    for name, g in by_name.items():
        assert g["lr"] == expected_lr[name.removesuffix("_no_decay")]
        assert g["weight_decay"] == (0.0 if name.endswith("_no_decay") else 0.1)
    where = {id(p): g["name"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert where[id(params["vision_model.encoder.layers.0.ls1"])] == "vision_no_decay"
    assert where[id(params["vision_model.encoder.layers.0.attn.qkv.bias"])] == "vision_no_decay"
    assert where[id(params["vision_model.encoder.layers.0.attn.qkv.weight"])] == "vision"
    assert where[id(params["mlp1.0.weight"])] == "projector_no_decay"  # the LayerNorm
    assert where[id(params["mlp1.1.weight"])] == "projector"
    assert where[id(params["language_model.model.layers.1.input_layernorm.weight"])] == "llm_no_decay"
    assert where[id(params["language_model.lm_head.weight"])] == "llm"
    assert len(where) == len(params)  # every trainable parameter in exactly one group


def test_frozen_parts_have_no_optimizer_group(tok_dir, meta, tmp_path):
    from internvl.api.model import InternVLChatModel
    from internvl.config import InternVLConfig

    cfg = make_cfg(tok_dir, meta, tmp_path, freeze_vision=True)
    model = T.apply_training_setup(InternVLChatModel(InternVLConfig.from_dict(cfg.model_config)), cfg)
    names = {g["name"] for g in T.build_optimizer(model, cfg).param_groups}
    assert names == {"projector", "projector_no_decay", "llm", "llm_no_decay"}


def test_lr_schedule_warmup_then_cosine():
    warmup, total = 3, 13
    got = [T.lr_factor(s, warmup, total) for s in range(total)]
    assert got[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    # cosine over the 10 post-warm-up updates: 0.5 * (1 + cos(pi * k / 10)), k = 0..9
    assert got[3:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(10)])


# ------------------------------------------------------------------------------------------------ config
def test_unknown_yaml_key_is_rejected_with_accepted_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: x\nmeta_path: m\noutput_dir: o\nlearning_rate: 1e-5\n")
    with pytest.raises(ValueError) as e:
        load_train_config(f, {})
    msg = str(e.value)
    assert "'learning_rate'" in msg and "accepted keys" in msg and "lr_vision" in msg


def test_unknown_override_rejected_and_overrides_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: x\nmeta_path: m\noutput_dir: o\nlr: 1.0e-5\nfreeze_vision: false\n")
    with pytest.raises(ValueError, match="accepted keys"):
        load_train_config(f, {"lrr": "1"})
    cfg = load_train_config(f, {"lr": "3e-4", "freeze_vision": "true", "max_steps": "7", "lr_llm": "null"})
    assert cfg.lr == 3e-4 and cfg.freeze_vision is True and cfg.max_steps == 7 and cfg.lr_llm is None
    assert load_train_config(f, {}).lr == 1e-5


def test_bad_values_are_clear_errors(tmp_path):
    base = dict(model="x", meta_path="m", output_dir="o")
    with pytest.raises(ValueError, match="dtype 'fp16' is not supported"):
        TrainConfig(**base, dtype="fp16")
    with pytest.raises(ValueError, match="freeze_vision.*bool"):
        TrainConfig(**base, freeze_vision="yes")
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(**base, use_packed_ds=True)
    with pytest.raises(ValueError, match="only one of"):
        TrainConfig(**base, model_config={})


def test_cli_user_error_exit_code_without_traceback(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("model: x\nmeta_path: m\noutput_dir: o\nbogus: 1\n")
    assert T.main([str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("internvl train: error: unknown config key") and "Traceback" not in err
    assert T.main([str(f), "--nope", "1"]) == 2


def test_docs_mention_every_key():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    missing = [k for k in accepted_keys() if f"`{k}`" not in doc]
    assert not missing, missing


# ------------------------------------------------------------------------------------------------ packed
def test_packed_run_resumes_exactly_and_trains(tok_dir, meta, tmp_path):
    out, ref = tmp_path / "packed", tmp_path / "packed_ref"
    cfg = make_cfg(tok_dir, meta, out, use_packed_ds=True, per_device_batch_size=1, max_seq_length=256,
                   max_packed_tokens=256, max_packed_tiles=6, loss_reduction="square", max_steps=3, save_steps=1,
                   lr=1e-2)
    T.train(cfg.replace(output_dir=str(ref)))
    with pytest.raises(Crash):
        T.train(cfg, on_step_end=crash_after(2))
    assert json.loads((out / "checkpoint-2" / "data_state_0.json").read_text())["pack_offset"] == 2
    T.train(cfg.replace(resume=True))
    assert [e["loss"] for e in read_log(out)] == [e["loss"] for e in read_log(ref)]
    log = read_log(ref)
    assert log[-1]["loss"] < log[0]["loss"]
    assert all(e["tokens"] > 80 for e in log)  # one sample has ~50 tokens: every pack holds several


# ------------------------------------------------------------------------------------------------ data parallel
def _ddp_worker(rank: int, world: int, init_file: str, cfg_dict: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        T.train(TrainConfig(**cfg_dict))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process(tok_dir, meta, tmp_path):
    """2 ranks x 2 samples == 1 process x 4 samples: same loss curve and weights up to float summation order."""
    import torch.multiprocessing as mp

    single = make_cfg(tok_dir, meta, tmp_path / "single", per_device_batch_size=4, max_steps=3)
    T.train(single)
    ddp = single.replace(per_device_batch_size=2, output_dir=str(tmp_path / "ddp"))
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), ddp.to_dict()), nprocs=2, join=True)
    a, b = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    assert [e["step"] for e in b] == [1, 2, 3]
    assert [e["tokens"] for e in a] == [e["tokens"] for e in b]  # the same samples per step
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["loss"], y["loss"])
    wa = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5)


def test_rank_batches_are_disjoint_shards_of_one_permutation():
    n, b, world = 23, 3, 2
    perm = D.epoch_permutation(n, 5, 1).tolist()
    ranks = [list(D.RankBatchSampler(n, b, 5, 1, r, world)) for r in range(world)]
    assert len(ranks[0]) == len(ranks[1]) == n // (b * world)
    for m in range(len(ranks[0])):
        assert ranks[0][m] + ranks[1][m] == perm[m * b * world:(m + 1) * b * world]
    assert list(D.RankBatchSampler(n, b, 5, 1, 1, world, start=2)) == ranks[1][2:]
    assert D.epoch_permutation(n, 5, 2).tolist() != perm and D.epoch_permutation(n, 5, 1).tolist() == perm


