import json
import re

import pytest
import transformers

from internvl.demo.dataset import write_dataset
from internvl.demo.tokenizer import corpus_texts, render_conversation, train_tokenizer

VOCAB = 1024
# Written out here (INTERNVL.md §6.1, §6.2, §7.3), not imported from the module under test.
EXPECTED_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>",
                  "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
S3 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"  # noqa: E501


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = tmp_path_factory.mktemp("tok_data")
    write_dataset(data, 200, 10, seed=11)
    # Repeated OCR-style words: frequent enough that letter pairs would merge without the capitals rule.
    texts = [*corpus_texts(data), *["The word ZDSXW is written in the image.", "KLMB."] * 20]
    out = train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=VOCAB)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    with open(data / "train.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return out, tok, records


def ids(tok, text):
    return tok(text, add_special_tokens=True)["input_ids"]


def test_files_and_config(trained):
    out, tok, _ = trained
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file()
    assert len(tok) <= VOCAB
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.model_max_length == 4096
    assert ids(tok, "Red.") == tok.encode("Red.", add_special_tokens=False)  # nothing (no BOS/EOS) is added


def test_added_tokens_single_ids_in_order(trained):
    _, tok, _ = trained
    base = len(tok) - len(EXPECTED_ADDED)
    for k, token in enumerate(EXPECTED_ADDED):
        assert ids(tok, token) == [base + k]
        assert tok.convert_ids_to_tokens(base + k) == token
    internvl = [tok.convert_tokens_to_ids(t) for t in EXPECTED_ADDED[3:]]
    assert internvl == list(range(internvl[0], internvl[0] + 9))
    # Added tokens never split, even glued to text.
    glued = ids(tok, "x<ref>the red circle</ref><box>[[1, 2, 3, 4]]</box>")
    for token in ("<ref>", "</ref>", "<box>", "</box>"):
        assert glued.count(base + EXPECTED_ADDED.index(token)) == 1


def test_matches_pretrained_fast_from_file(trained):
    out, tok, records = trained
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    for r in records[:50]:
        text = render_conversation(r["conversations"], image_tokens=4)
        assert fast(text)["input_ids"] == ids(tok, text)


def test_round_trip_on_dataset_strings(trained):
    _, tok, records = trained
    texts = [render_conversation(r["conversations"], image_tokens=64) for r in records]
    texts += [t["value"] for r in records for t in r["conversations"]]
    texts += [S3, "Ünïcödé ✓ 😀 tabs\tand  spaces\n\n", "What is 1000 minus 999?"]
    for text in texts:
        assert tok.decode(ids(tok, text), skip_special_tokens=False) == text


def test_segmentwise_equals_whole_string(trained):
    # INTERNVL.md §13.1 step 7: training tokenizes each turn segment separately, inference the whole prompt.
    _, tok, records = trained
    image = "<img>" + "<IMG_CONTEXT>" * 64 + "</img>"
    for r in records[:100]:
        segments = [f"<|im_start|>system\n{S3}<|im_end|>\n"]
        for turn in r["conversations"]:
            role = "user" if turn["from"] == "human" else "assistant"
            segments.append(f"<|im_start|>{role}\n{turn['value'].replace('<image>', image)}<|im_end|>\n")
        pieced = [i for s in segments for i in ids(tok, s)]
        assert pieced == ids(tok, "".join(segments))
        assert "".join(segments) == render_conversation(r["conversations"], image_tokens=64)


def test_compact_numbers_boxes_and_system_prompt(trained):
    _, tok, _ = trained
    box = "[[411, 728, 643, 960]]"
    pieces = tok.convert_ids_to_tokens(ids(tok, box))
    assert all(len(re.findall(r"\d", p)) <= 1 for p in pieces)  # one digit per token at most
    assert len(pieces) <= 12 + 3 + 3 + 2  # digits + commas + spaces + the two bracket pairs
    assert len(ids(tok, "[[")) == 1 and len(ids(tok, "]]")) == 1
    assert len(ids(tok, S3)) <= 20  # 58 characters, 170 UTF-8 bytes
    assert len(ids(tok, "What color is the circle?")) <= 6
    # OCR words are spelled one capital letter per token, however often letter pairs occurred in training.
    for text in ("KLMB.", "The word ZDSXW is written in the image."):
        assert all(len(re.findall(r"[A-Z]", p)) <= 1 for p in tok.convert_ids_to_tokens(ids(tok, text)))


def test_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError):
        train_tokenizer(["abc"], tmp_path, vocab_size=200)
