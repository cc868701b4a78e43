"""MPO (INTERNVL.md §16): the mixed loss against an independent formula, the δ running mean, log-prob sums,
preference data and collation, and MPO training steps on a tiny model."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers_tokenizers import make_bpe_tokenizer_dir
from tiny import randomize_, tiny_config, tiny_llm

from internvl.model.internvl import IGNORE_INDEX
from internvl.training.mpo import (
    MPOState,
    PreferenceDataset,
    collate_preference,
    copy_reference,
    mpo_forward,
    mpo_loss,
    sequence_logps,
    token_mean_ce,
)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def reference_loss(pc, pr, rc, rr, sft, delta, beta, w_p, w_q, alpha) -> float:
    """§16 written out with floats, one example at a time."""
    per_example = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        dpo = -math.log(sig(beta * ((a - b) - (c - d))))
        bco = -math.log(sig(beta * (a - c) - delta)) - math.log(sig(-(beta * (b - d) - delta)))
        per_example.append(w_p * dpo + w_q * bco)
    return sum(per_example) / len(per_example) + alpha * sft


def test_loss_matches_independent_formula():
    pc, pr = [-12.0, -30.5, -7.25], [-15.0, -28.0, -9.0]
    rc, rr = [-13.0, -29.0, -8.0], [-14.5, -27.5, -8.5]
    sft = 1.75
    beta, w_p, w_q, alpha = 0.1, 0.8, 0.2, 1.0
    state = MPOState()
    loss, metrics = mpo_loss(*(torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr)),
                             torch.tensor(sft, dtype=torch.float64), state, beta, w_p, w_q, alpha)
    # first batch: δ = batch mean of the concatenated rewards
    rewards = [beta * (a - c) for a, c in zip(pc, rc)] + [beta * (b - d) for b, d in zip(pr, rr)]
    delta = sum(rewards) / len(rewards)
    assert metrics["delta"] == pytest.approx(delta, abs=1e-12)
    assert float(loss) == pytest.approx(reference_loss(pc, pr, rc, rr, sft, delta, beta, w_p, w_q, alpha), abs=1e-9)
    # other weights and beta: every term is really weighted
    loss2, _ = mpo_loss(*(torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr)),
                        torch.tensor(sft, dtype=torch.float64), MPOState(), 0.5, 0.3, 0.6, 2.0)
    rewards = [0.5 * (a - c) for a, c in zip(pc, rc)] + [0.5 * (b - d) for b, d in zip(pr, rr)]
    expected = reference_loss(pc, pr, rc, rr, sft, sum(rewards) / 6, 0.5, 0.3, 0.6, 2.0)
    assert float(loss2) == pytest.approx(expected, abs=1e-9)


def test_delta_is_running_mean_updated_before_use():
    beta = 0.1
    state = MPOState()
    batches = [([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.5, -2.0]),
               ([-10.0, -4.0], [-3.0, -6.0], [-1.0, -2.0], [-4.0, -2.0]),
               ([0.0, -1.0], [-1.0, -1.0], [-0.5, -0.5], [-0.5, -2.0])]
    means = []
    for pc, pr, rc, rr in batches:
        rewards = [beta * (a - c) for a, c in zip(pc, rc)] + [beta * (b - d) for b, d in zip(pr, rr)]
        means.append(sum(rewards) / len(rewards))
        loss, metrics = mpo_loss(*(torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr)),
                                 torch.tensor(0.0, dtype=torch.float64), state, beta, 0.8, 0.2, 1.0)
        running = sum(means) / len(means)  # the current batch is already in the mean it uses
        assert metrics["delta"] == pytest.approx(running, abs=1e-12)
        assert float(loss) == pytest.approx(reference_loss(pc, pr, rc, rr, 0.0, running, beta, 0.8, 0.2, 1.0),
                                            abs=1e-9)
    assert state.count == 3
    restored = MPOState()
    restored.load_state_dict(state.state_dict())
    assert restored == state


def test_sequence_logps_are_sums_over_response_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 4, 7, 1, IGNORE_INDEX],
                           [IGNORE_INDEX, 3, IGNORE_INDEX, 9, 9, 2]])
    expected = []
    for b in range(2):
        total = 0.0
        for t in range(1, 6):  # label t is predicted from position t - 1
            if labels[b, t] != IGNORE_INDEX:
                total += float(torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]])
        expected.append(total)
    assert sequence_logps(logits, labels).tolist() == pytest.approx(expected, abs=1e-5)
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert float(token_mean_ce(logits, labels)) == pytest.approx(-sum(expected) / n, abs=1e-5)


# ------------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_bpe_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def write_pairs(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (56, 56), (20, 30, 230)).save(root / "b.png")
    records = [
        {"image": "a.png", "question": "What is in the picture?", "chosen": "A cat sits on the mat.",
         "rejected": "The dog sits by the door."},
        {"image": "b.png", "question": "<image>\nPlease describe the image shortly.", "chosen": "The quick brown fox.",
         "rejected": "Hello world."},
        {"question": "Hello world.", "chosen": "Hello world.", "rejected": "The lazy dog."},
        {"image": "a.png", "question": "What is in the picture?", "chosen": "A cat.", "rejected": "A dog."},
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (root / "meta.json").write_text(json.dumps({"prefs": {"root": ".", "annotation": "pairs.jsonl"}}))
    return root / "meta.json"


def data_cfg():
    from internvl.training.data import DataConfig

    return DataConfig(template="internvl2_5", num_image_token=4, image_size=56, max_dynamic_patch=1,
                      max_seq_length=512)


def test_dataset_tokenizes_two_turn_conversations(tok_dir, tmp_path):
    from internvl.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    ds = PreferenceDataset(write_pairs(tmp_path), tok, data_cfg())
    assert len(ds) == 4
    item = ds[0]
    text = tok.decode(item["chosen_input_ids"].tolist())
    assert "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nWhat is in the picture?<|im_end|>" in text
    trained = [int(i) for i in item["chosen_labels"] if i != IGNORE_INDEX]
    assert tok.decode(trained) == "A cat sits on the mat.<|im_end|>"
    trained = [int(i) for i in item["rejected_labels"] if i != IGNORE_INDEX]
    assert tok.decode(trained) == "The dog sits by the door.<|im_end|>"
    assert item["pixel_values"].shape == (1, 3, 56, 56) and item["image_flags"].tolist() == [1]
    # a question that already has the placeholder is not prefixed again
    assert tok.decode(ds[1]["chosen_input_ids"].tolist()).count("<img>") == 1
    # text-only pair: one dummy tile, flag 0, no image block
    text_only = ds[2]
    assert text_only["image_flags"].tolist() == [0] and "<img>" not in tok.decode(text_only["chosen_input_ids"])


def test_collate_puts_chosen_first_and_repeats_images(tok_dir, tmp_path):
    from internvl.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    ds = PreferenceDataset(write_pairs(tmp_path), tok, data_cfg())
    items = [ds[0], ds[2]]
    batch = collate_preference(items, pad_token_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    for row, seq in enumerate([items[0]["chosen_input_ids"], items[1]["chosen_input_ids"],
                               items[0]["rejected_input_ids"], items[1]["rejected_input_ids"]]):
        n = len(seq)
        assert torch.equal(batch["input_ids"][row, :n], seq) and int(batch["attention_mask"][row].sum()) == n
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert batch["position_ids"][row, :n].tolist() == list(range(n))
    px = torch.cat([items[0]["pixel_values"], items[1]["pixel_values"]])
    assert torch.equal(batch["pixel_values"], torch.cat([px, px]))
    assert batch["image_flags"].tolist() == [1, 0, 1, 0]


def tiny_policy(tok):
    from internvl.api.model import InternVLChatModel
    from internvl.tokenizer import image_context_id

    model = InternVLChatModel(tiny_config(llm=tiny_llm(vocab=len(tok)), image_token_id=None))
    randomize_(model, std=0.05)
    model.img_context_token_id = image_context_id(tok)
    return model


def test_one_mpo_step_improves_preference(tok_dir, tmp_path):
    from internvl.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(tok_dir)
    ds = PreferenceDataset(write_pairs(tmp_path), tok, data_cfg())
    batch = collate_preference([ds[i] for i in range(4)], tok.pad_token_id)
    policy = tiny_policy(tok)
    reference = copy_reference(policy)
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    before = {k: v.clone() for k, v in reference.state_dict().items()}

    state = MPOState()
    with torch.no_grad():
        loss0, m0 = mpo_forward(policy, reference, batch, copy.deepcopy(state))
    assert m0["reward_margin"] == 0.0  # policy == reference at the start
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    loss, _ = mpo_forward(policy, reference, batch, state)
    loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        loss1, m1 = mpo_forward(policy, reference, batch, copy.deepcopy(state))
    assert loss1.item() < loss0.item()
    assert m1["reward_margin"] > 0  # chosen gained log-probability relative to rejected
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in before.items())  # reference frozen


def test_mpo_training_run_with_checkpoint(tok_dir, tmp_path):
    from internvl.training.config import TrainConfig
    from internvl.training.trainer import train

    meta = write_pairs(tmp_path / "data")
    from internvl.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(tok_dir))
    cfg = TrainConfig(model_config=tiny_config(llm=tiny_llm(vocab=vocab), image_token_id=None,
                                               max_dynamic_patch=1).to_original_dict(),
                      tokenizer=str(tok_dir), meta_path=str(meta), output_dir=str(tmp_path / "out"),
                      objective="mpo", per_device_batch_size=2, max_steps=3, save_steps=2, lr=1e-3, warmup_steps=0,
                      max_seq_length=512, use_llm_lora=4, freeze_vision=True, freeze_projector=True)
    final = train(cfg)
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]
    assert all(k in log[0] for k in ("dpo", "bco", "sft", "delta", "reward_margin"))
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["mpo"]["count"] == 2  # δ's running mean is part of the checkpoint
    assert (final / "model.safetensors").is_file()
