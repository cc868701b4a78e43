"""Label masks per template (INTERNVL.md §13.1-13.4, §12.3, §20 item 29) on hand-written conversations.

Expected ids and labels are built here from the spec's rules: the rendered strings are written out literally, and the
trained spans are placed by tokenizing the expected trained strings directly with the tokenizer (never by asking
`internvl.training.labels`).
"""

from __future__ import annotations

import pytest
from helpers_tokenizers import make_bpe_tokenizer_dir, make_sentencepiece_tokenizer_dir

from internvl.templates.conversation import SYSTEM_MESSAGE_S2, SYSTEM_MESSAGE_S3, render
from internvl.tokenizer import load_tokenizer
from internvl.training.labels import SampleError, tokenize_conversation

IGNORE = -100
IMG3 = "<img>" + "<IMG_CONTEXT>" * 3 + "</img>"  # one image of 3 tokens (num_image_token_list=[3])


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_tokenizers")
    return {
        "qwen2": load_tokenizer(make_bpe_tokenizer_dir(root / "qwen2")),
        # Real InternLM2 tokenizers do not prepend a dummy-prefix "▁" to every chunk; with it, answers measured on
        # their own gain a token (see test_internlm2_chat_mismatch_ignores_the_whole_sample).
        "internlm2": load_tokenizer(
            make_sentencepiece_tokenizer_dir(root / "il2", "internlm2", add_dummy_prefix=False)
        ),
        "internlm2_prefix": load_tokenizer(make_sentencepiece_tokenizer_dir(root / "il2p", "internlm2")),
        "phi3": load_tokenizer(make_sentencepiece_tokenizer_dir(root / "phi3", "phi3")),
    }


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def masked(tok, text):
    return [IGNORE] * len(enc(tok, text))


def conv(*turns):
    return [{"from": role, "value": value} for role, value in turns]


TWO_ROUNDS = conv(
    ("human", "<image>\nWhat is in the picture?"),
    ("gpt", "A cat sits on the mat."),
    ("human", "And the dog?"),
    ("gpt", "The dog sits by the door."),
)


# ---------------------------------------------------------------------------------------------------------------
# internvl2_5 (§13.1)


def test_internvl2_5_labels_on_qwen_tokenizer(toks):
    tok = toks["qwen2"]
    conversation = [{"from": "system", "value": "Answer shortly."}] + TWO_ROUNDS
    ids, labels = tokenize_conversation(conversation, tok, "internvl2_5", [3], 4096)

    system = "<|im_start|>system\nAnswer shortly.<|im_end|>\n"
    user1 = f"<|im_start|>user\n{IMG3}\nWhat is in the picture?<|im_end|>\n"
    user2 = "<|im_start|>user\nAnd the dog?<|im_end|>\n"
    header = "<|im_start|>assistant\n"
    expected_ids = enc(tok, system + user1 + header + "A cat sits on the mat.<|im_end|>\n" + user2 + header
                       + "The dog sits by the door.<|im_end|>\n")
    # system/human masked; assistant header masked; answer + <|im_end|> trained; trailing "\n" masked.
    expected_labels = (
        masked(tok, system + user1) + masked(tok, header) + enc(tok, "A cat sits on the mat.<|im_end|>")
        + masked(tok, "\n") + masked(tok, user2) + masked(tok, header)
        + enc(tok, "The dog sits by the door.<|im_end|>") + masked(tok, "\n")
    )
    assert ids == expected_ids
    assert labels == expected_labels
    assert ids[0] != tok.bos_token_id  # Qwen: no BOS (§6.2)
    trained = [t for t in labels if t != IGNORE]
    assert tok.decode(trained) == "A cat sits on the mat.<|im_end|>The dog sits by the door.<|im_end|>"


def test_internvl2_5_default_and_explicit_system_message(toks):
    tok = toks["qwen2"]
    short = conv(("human", "Hi"), ("gpt", "Hello"))
    ids, _ = tokenize_conversation(short, tok, "internvl2_5", [], 4096)
    assert ids[: len(enc(tok, f"<|im_start|>system\n{SYSTEM_MESSAGE_S3}<|im_end|>\n"))] == enc(
        tok, f"<|im_start|>system\n{SYSTEM_MESSAGE_S3}<|im_end|>\n"
    )
    ids, _ = tokenize_conversation(short, tok, "internvl2_5", [], 4096, system_message="Be brief.")
    assert ids == enc(tok, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                           "<|im_start|>assistant\nHello<|im_end|>\n")


def test_internvl2_5_segmentwise_equals_whole_string_tokenization(toks):
    """§13.1 step 7: the concatenated segment tokenizations equal tokenizing the rendered prompt in one call."""
    tok = toks["qwen2"]
    conversation = [{"from": "system", "value": "你是一个助手。"}] + TWO_ROUNDS + conv(
        ("human", "请详细描述这张图片。 [[120, 340, 560, 780]]"),
        ("gpt", "这是一只猫。\n\nThe cat is at <box>[[1, 2]]</box>"),
    )
    ids, _ = tokenize_conversation(conversation, tok, "internvl2_5", [3], 4096)
    turns = [("<|im_start|>user\n" if t["from"] == "human" else "<|im_start|>assistant\n", t["value"])
             for t in conversation[1:]]
    whole = render("internvl2_5", "你是一个助手。", turns).replace("<image>", IMG3, 1)
    assert ids == enc(tok, whole)


def test_internvl2_5_bos_tokenizer_has_exactly_one_bos(toks):
    """§13.1 step 4 on an InternLM2-style tokenizer: one BOS at the start, masked; segments tokenized alone."""
    tok = toks["internlm2_prefix"]
    bos = tok.bos_token_id
    short = conv(("human", "<image>\nWhat is in the picture?"), ("gpt", "A cat."))
    ids, labels = tokenize_conversation(short, tok, "internvl2_5", [3], 4096, system_message="S")
    system = enc(tok, "<|im_start|>system\nS<|im_end|>\n")
    user = enc(tok, f"<|im_start|>user\n{IMG3}\nWhat is in the picture?<|im_end|>\n")
    answer = enc(tok, "<|im_start|>assistant\nA cat.<|im_end|>\n")
    header = len(enc(tok, "<|im_start|>assistant\n"))
    assert ids == [bos] + system + user + answer
    assert ids.count(bos) == 1
    assert labels == [IGNORE] * (1 + len(system) + len(user) + header) + answer[header:-1] + [IGNORE]


def test_internvl2_5_expands_images_only_in_human_turns(toks):
    tok = toks["qwen2"]
    conversation = conv(
        ("human", "Look."), ("gpt", "Where is the <image>?"), ("human", "Here: <image>"), ("gpt", "A cat.")
    )
    ids, labels = tokenize_conversation(conversation, tok, "internvl2_5", [3], 4096, system_message="")
    expected = (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nLook.<|im_end|>\n"
        "<|im_start|>assistant\nWhere is the <image>?<|im_end|>\n"  # gpt placeholder stays literal text
        f"<|im_start|>user\nHere: {IMG3}<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
    )
    assert ids == enc(tok, expected)
    context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ids.count(context) == 3
    # a placeholder only in a gpt turn does not count: the image has nowhere to go
    only_gpt = conv(("human", "Look."), ("gpt", "Where is the <image>?"))
    with pytest.raises(SampleError, match="1 images but only 0 <image> placeholders in human turns"):
        tokenize_conversation(only_gpt, tok, "internvl2_5", [3], 4096)


# ---------------------------------------------------------------------------------------------------------------
# internlm2-chat (§13.2)


def test_internlm2_chat_labels(toks):
    tok = toks["internlm2"]
    padded = conv(
        ("human", "  <image>\nWhat is in the picture?\n"),
        ("gpt", " A cat sits on the mat. "),
        ("human", "And the dog?"),
        ("gpt", "The dog sits by the door.\n"),
    )
    ids, labels = tokenize_conversation(padded, tok, "internlm2-chat", [3], 4096, system_message="Answer.")
    # values stripped; no newline between turns (sep is <|im_end|>); BOS added by the tokenizer.
    first = f"<|im_start|>system\nAnswer.<|im_end|><|im_start|>user\n{IMG3}\nWhat is in the picture?<|im_end|>" \
            "<|im_start|>assistant\n"
    second = "<|im_start|>user\nAnd the dog?<|im_end|><|im_start|>assistant\n"
    answer1, answer2 = "A cat sits on the mat.<|im_end|>", "The dog sits by the door.<|im_end|>"
    assert ids == [tok.bos_token_id] + enc(tok, first + answer1 + second + answer2)
    assert labels == [IGNORE] + masked(tok, first) + enc(tok, answer1) + masked(tok, second) + enc(tok, answer2)


def test_internlm2_chat_mismatch_ignores_the_whole_sample(toks):
    """With a dummy-prefix tokenizer each answer measured on its own gains a "▁", so the measured length disagrees
    with the real one: the whole sample becomes IGNORE and the mismatch is counted (§13.2)."""
    tok = toks["internlm2_prefix"]
    short = conv(("human", "Hi"), ("gpt", "A cat."))
    first = "<|im_start|>system\nS<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    whole = [tok.bos_token_id] + enc(tok, first + "A cat.<|im_end|>")
    assert 1 + len(enc(tok, first)) + len(enc(tok, "A cat.<|im_end|>")) != len(whole)  # precondition of the test
    stats = {}
    ids, labels = tokenize_conversation(short, tok, "internlm2-chat", [], 4096, system_message="S", stats=stats)
    assert ids == whole
    assert labels == [IGNORE] * len(whole)
    assert stats == {"tokenization_mismatch": 1}


# ---------------------------------------------------------------------------------------------------------------
# Hermes-2 (§13.3) and phi3-chat (§13.4)


def test_hermes2_labels(toks):
    tok = toks["qwen2"]
    unstripped = conv(
        ("human", "<image>\nWhat is in the picture? "), ("gpt", "A cat sits on the mat."),
        ("human", "And the dog?"), ("gpt", "The dog sits by the door."),
    )
    ids, labels = tokenize_conversation(unstripped, tok, "Hermes-2", [3], 4096)
    first = f"<|im_start|>system\n{SYSTEM_MESSAGE_S2}<|im_end|><|im_start|>user\n{IMG3}\nWhat is in the picture? " \
            "<|im_end|><|im_start|>assistant\n"
    second = "<|im_start|>user\nAnd the dog?<|im_end|><|im_start|>assistant\n"
    answer1, answer2 = "A cat sits on the mat.<|im_end|>", "The dog sits by the door.<|im_end|>"
    assert ids == enc(tok, first + answer1 + second + answer2)
    assert labels == masked(tok, first) + enc(tok, answer1) + masked(tok, second) + enc(tok, answer2)


def test_phi3_labels_mask_bos_and_endoftext(toks):
    tok = toks["phi3"]
    conversation = conv(
        ("human", "<image>\nWhat is in the picture?"), ("gpt", "A cat.<|endoftext|> Done."),
        ("human", "And the dog?"), ("gpt", "The dog sits by the door."),
    )
    ids, labels = tokenize_conversation(conversation, tok, "phi3-chat", [3], 4096, system_message="Answer.")
    first = f"<|system|>\nAnswer.<|end|><|user|>\n{IMG3}\nWhat is in the picture?<|end|><|assistant|>\n"
    second = "<|user|>\nAnd the dog?<|end|><|assistant|>\n"
    answer1, answer2 = "A cat.<|endoftext|> Done.<|end|>", "The dog sits by the door.<|end|>"

    def in_context(instruction, answer):  # the answer's tokens as they appear right after its instruction
        return enc(tok, instruction + answer)[len(enc(tok, instruction)):]

    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    trained1 = [IGNORE if t == endoftext else t for t in in_context(first, answer1)]
    assert ids == [tok.bos_token_id] + enc(tok, first + answer1 + second + answer2)
    assert labels == [IGNORE] + masked(tok, first) + trained1 + masked(tok, second) + in_context(second, answer2)
    assert endoftext in ids and endoftext not in labels


@pytest.mark.parametrize("template", ["Hermes-2", "internlm2-chat", "phi3-chat"])
def test_older_templates_reject_a_system_turn(toks, template):
    tok = toks["phi3" if template == "phi3-chat" else "qwen2"]
    with pytest.raises(SampleError, match="does not accept a system turn"):
        tokenize_conversation(conv(("system", "S"), ("human", "Hi"), ("gpt", "Yo")), tok, template, [], 4096)


def test_roles_must_alternate(toks):
    with pytest.raises(SampleError, match="expected 'gpt'"):
        tokenize_conversation(conv(("human", "a"), ("human", "b")), toks["qwen2"], "internvl2_5", [], 4096)


# ---------------------------------------------------------------------------------------------------------------
# Truncation (§12.3)


def test_truncation_that_cuts_an_image_block_is_an_error(toks):
    tok = toks["qwen2"]
    prefix = len(enc(tok, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<img><IMG_CONTEXT>"))
    with pytest.raises(SampleError, match="truncation to max_seq_length=.* cut an image block: 0 of 1 </img>"):
        tokenize_conversation(TWO_ROUNDS, tok, "internvl2_5", [3], prefix, system_message="S")


def test_truncation_after_the_image_keeps_the_prefix(toks):
    tok = toks["qwen2"]
    full_ids, full_labels = tokenize_conversation(TWO_ROUNDS, tok, "internvl2_5", [3], 4096, system_message="S")
    limit = len(full_ids) - 5
    ids, labels = tokenize_conversation(TWO_ROUNDS, tok, "internvl2_5", [3], limit, system_message="S")
    assert (ids, labels) == (full_ids[:limit], full_labels[:limit])
