"""Incremental detokenization (UTF-8 safe, grounding tags kept) and stop strings held back while streaming."""

import pytest

from helpers_tokenizers import make_bpe_tokenizer_dir, make_sentencepiece_tokenizer_dir
from internvl import load_tokenizer
from internvl.engine.stopping import IncrementalDetokenizer, SequenceText, StopStrings
from internvl.tokenizer import decode_keep_grounding

TEXTS = [
    "a🙂b",  # a 4-byte character split over byte tokens
    "这是一只猫。图片里有什么？",
    "Hello world. The cat is at <ref>the cat</ref><box>[[120, 340, 560, 780]]</box>, ok",
    "  two  spaces\nand a newline 🙂🙂",
]


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def tok(request, tmp_path_factory):
    maker = make_bpe_tokenizer_dir if request.param == "qwen2" else make_sentencepiece_tokenizer_dir
    return load_tokenizer(maker(tmp_path_factory.mktemp(request.param), family=request.param))


def stream(detok, ids):
    deltas = [detok.add(i) for i in ids]
    return deltas, deltas + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode_and_never_splits_a_character(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    deltas, everything = stream(IncrementalDetokenizer(tok), ids)
    assert "".join(everything) == decode_keep_grounding(tok, ids)
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_character_is_held_until_complete(tok):
    ids = tok.encode("a🙂b", add_special_tokens=False)
    pieces = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    partial = [i for i, p in enumerate(pieces) if p.endswith("\ufffd")]
    assert partial, "the tokenizer must split the emoji for this test to mean anything"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert all(deltas[i] == "" for i in partial)
    assert "".join(deltas) == "a🙂b" and "🙂" in deltas[partial[-1] + 1]


def test_flush_emits_an_unfinished_character_at_the_end(tok):
    ids = tok.encode("a🙂", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add(i) for i in ids[:-1]) == "a"
    assert detok.flush() == tok.decode(ids[:-1])[1:]  # the incomplete bytes, as replacement characters


def test_grounding_tags_survive_and_end_of_turn_is_dropped(tok):
    text = "<ref>the cat</ref><box>[[1, 2, 3, 4]]</box>"
    ids = tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    _, everything = stream(IncrementalDetokenizer(tok), ids)
    out = "".join(everything)
    assert out == decode_keep_grounding(tok, ids)  # (SentencePiece encodes a space after each added token)
    assert out.replace(" ", "") == text.replace(" ", "") and "<|im_end|>" not in out


def test_stop_string_is_held_back_then_cut():
    s = StopStrings(["STOP"])
    assert s.feed("abcST") == "abc"  # "ST" could still become "STOP"
    assert s.feed("O") == ""
    assert s.feed("Px tail") == "" and s.matched == "STOP"
    assert s.feed("more") == "" and s.flush() == ""


def test_held_back_text_is_released_when_it_can_no_longer_match():
    s = StopStrings(["STOP"])
    assert s.feed("abS") == "ab"
    assert s.feed("T") == ""
    assert s.feed("x") == "STx" and s.matched is None
    assert s.feed("ST") == "" and s.flush() == "ST"  # end of sequence: can never match now


def test_earliest_stop_string_wins_and_disabled_passes_through():
    s = StopStrings(["cd", "bcdz"])
    assert s.feed("abcdz") == "a" and s.matched == "bcdz"
    s = StopStrings(["cd"])
    assert s.feed("abcd", enabled=False) == "abcd" and s.matched is None
    assert StopStrings([]).feed("xyz") == "xyz"


def test_sequence_text_streams_tokens_with_a_stop_string(tok):
    text = "Hello world. The quick brown fox jumps over the lazy dog."
    stop = "brown fox"
    ids = tok.encode(text, add_special_tokens=False)
    st = SequenceText(tok, [stop])
    emitted, matched = "", None
    for i in ids:
        delta, matched = st.add(i)
        emitted += delta
        assert stop not in emitted and text.startswith(emitted)
        if matched:
            break
    assert matched == stop and emitted == text[: text.index(stop)] == st.text
    assert st.finish() == ("", stop)


def test_sequence_text_without_match_flushes_everything(tok):
    text = "The cat sits on the mat"
    ids = tok.encode(text, add_special_tokens=False)
    st = SequenceText(tok, ["mat!"])
    out = "".join(st.add(i)[0] for i in ids)
    assert out == text[: -len("mat")]  # "mat" could still become "mat!"
    more, matched = st.finish()
    assert matched is None and out + more == text == st.text
