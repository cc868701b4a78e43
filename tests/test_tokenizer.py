"""Tokenizer loading, prompt ids and grounding-preserving decoding (INTERNVL.md §6, §8.1 steps 5/8, §8.6, §20.9).

Expectations come from the written tokenizer files and from the `sentencepiece` / `tokenizers` libraries used
directly, never from `internvl.tokenizer` itself.
"""

import importlib.util
import json
import re
import sys

import huggingface_hub
import pytest
import sentencepiece as spm
from helpers_tokenizers import (
    INTERNVL_TOKENS,
    expected_ids,
    make_bpe_tokenizer_dir,
    make_sentencepiece_tokenizer_dir,
    write_remote_code_trap,
)
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer

from internvl.templates import build_chat_prompt
from internvl.tokenizer import (
    adds_bos,
    decode_keep_grounding,
    eos_id_for_template,
    image_context_id,
    load_tokenizer,
)

FAMILIES = ("qwen2", "internlm2", "phi3")
TEMPLATE_FOR = {"qwen2": "internvl2_5", "internlm2": "internlm2-chat", "phi3": "phi3-chat"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "qwen2": make_bpe_tokenizer_dir(root / "qwen2"),
        "internlm2": make_sentencepiece_tokenizer_dir(root / "internlm2", "internlm2"),
        "phi3": make_sentencepiece_tokenizer_dir(root / "phi3", "phi3"),
    }


@pytest.fixture(scope="module")
def toks(dirs):
    return {family: load_tokenizer(path) for family, path in dirs.items()}


def sp_processor(directory, add_dummy_prefix=None):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((directory / "tokenizer.model").read_bytes())
    if add_dummy_prefix is not None:
        proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def slow_reference_ids(directory, text, per_chunk_prefix):
    """Ids the slow SentencePiece tokenizers produce, computed with sentencepiece itself: BOS, then the text split on
    the configured added tokens; each other chunk is encoded on its own. `per_chunk_prefix` = legacy mode (every
    chunk gets SentencePiece's dummy prefix); otherwise only a chunk at the very start of the text gets it."""
    added = expected_ids(directory)
    with_prefix = sp_processor(directory)
    without_prefix = sp_processor(directory, add_dummy_prefix=False)
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids = [added["<s>"]]
    position = 0
    for chunk in re.split(pattern, text):
        if chunk in added:
            ids.append(added[chunk])
        elif chunk:
            processor = with_prefix if per_chunk_prefix or position == 0 else without_prefix
            ids.extend(processor.encode(chunk))
        position += len(chunk)
    return ids


# ------------------------------------------------------------------------------------------------- added tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_configured_added_token_ids_are_honoured(dirs, toks, family):
    for token, token_id in expected_ids(dirs[family]).items():
        assert toks[family].convert_tokens_to_ids(token) == token_id, token


@pytest.mark.parametrize("family", FAMILIES)
def test_internvl_tokens_are_consecutive_single_tokens(dirs, toks, family):
    ids = expected_ids(dirs[family])
    first = ids["<img>"]
    for k, token in enumerate(INTERNVL_TOKENS):
        assert ids[token] == first + k  # len(base) + k, §6.1
        assert toks[family].encode(token, add_special_tokens=False) == [first + k]
    assert image_context_id(toks[family]) == first + 2


@pytest.mark.parametrize(
    ("family", "template", "token"),
    [
        ("qwen2", "internvl2_5", "<|im_end|>"),
        ("internlm2", "internlm2-chat", "<|im_end|>"),
        ("phi3", "phi3-chat", "<|end|>"),
    ],
)
def test_eos_id_for_template(dirs, toks, family, template, token):
    assert eos_id_for_template(toks[family], template) == expected_ids(dirs[family])[token]


def test_eos_id_for_template_raises_when_token_is_missing(toks):
    with pytest.raises(ValueError, match="no single token '<\\|end\\|>'"):
        eos_id_for_template(toks["qwen2"], "phi3-chat")
    with pytest.raises(ValueError, match="no single token '<\\|im_end\\|>'"):
        eos_id_for_template(toks["phi3"], "internvl2_5")


def test_special_tokens_from_config(toks):
    qwen, internlm2, phi3 = toks["qwen2"], toks["internlm2"], toks["phi3"]
    assert (qwen.bos_token, qwen.eos_token, qwen.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    assert (internlm2.bos_token, internlm2.eos_token, internlm2.pad_token) == ("<s>", "</s>", "</s>")
    assert (phi3.bos_token, phi3.eos_token, phi3.pad_token) == ("<s>", "<|endoftext|>", "<|endoftext|>")
    assert [adds_bos(t) for t in (qwen, internlm2, phi3)] == [False, True, True]


# ------------------------------------------------------------------------------------------------- prompt ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tiles", [1, 3])
def test_prompt_ids(dirs, toks, family, tiles):
    tok, ids_of = toks[family], expected_ids(dirs[family])
    template = TEMPLATE_FOR[family]
    prompt, _ = build_chat_prompt(template, "What is the cat doing?", num_patches_list=[tiles])
    ids = tok(prompt)["input_ids"]  # one call, default special-token handling (§8.1 step 8)

    assert ids.count(ids_of["<IMG_CONTEXT>"]) == 256 * tiles
    start = ids.index(ids_of["<img>"])
    assert ids[start + 1 : start + 1 + 256 * tiles] == [ids_of["<IMG_CONTEXT>"]] * (256 * tiles)
    assert ids[start + 1 + 256 * tiles] == ids_of["</img>"]
    end_token = "<|end|>" if family == "phi3" else "<|im_end|>"
    assert ids.count(ids_of[end_token]) == prompt.count(end_token) == 2
    if family == "qwen2":
        assert ids[0] == ids_of["<|im_start|>"]  # no BOS
    else:
        assert ids[0] == ids_of["<s>"] and ids.count(ids_of["<s>"]) == 1  # BOS added once


@pytest.mark.parametrize("family", ["internlm2", "phi3"])
def test_sentencepiece_prompt_ids_match_slow_tokenizer_rule(dirs, toks, family):
    prompt, _ = build_chat_prompt(
        TEMPLATE_FOR[family], "Image-1: <image>\nImage-2: <image>\n  Where is the  dog? 你好", num_patches_list=[1, 1]
    )
    expected = slow_reference_ids(dirs[family], prompt, per_chunk_prefix=family == "internlm2")
    assert toks[family](prompt)["input_ids"] == expected


def test_qwen_prompt_ids_match_tokenizer_json(dirs, toks):
    prompt, _ = build_chat_prompt("internvl2_5", "Where is the dog? 你好 [[1, 2, 3, 4]]", num_patches_list=[2])
    raw = Tokenizer.from_file(str(dirs["qwen2"] / "tokenizer.json"))
    assert toks["qwen2"](prompt)["input_ids"] == raw.encode(prompt).ids


TEXTS = [
    "Hello world",
    " Hello  world ",
    "你好世界，这是一个测试。",
    "line one\nline two\n\n  indented",
    "[[120, 340, 560, 780]]",
    "ünïcödé ☃ 😀 Ω≈ç",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_matches_sentencepiece(dirs, toks, text):
    processor = sp_processor(dirs["internlm2"])
    assert toks["internlm2"].encode(text, add_special_tokens=False) == processor.encode(text)
    # Non-legacy Phi-3 ("legacy": false) follows transformers' Llama tokenizers: the start of the text gets the `▁`
    # prefix unless it already begins with a space, which then serves as the prefix.
    prefix = not text.startswith(" ")
    assert toks["phi3"].encode(text, add_special_tokens=False) == sp_processor(dirs["phi3"], prefix).encode(text)


@pytest.mark.parametrize(
    "options",
    [
        {"add_dummy_prefix": False},
        {"train_options": {"remove_extra_whitespaces": True}},
        {"train_options": {"normalization_rule_name": "nmt_nfkc"}},
    ],
    ids=["no-dummy-prefix", "remove-extra-whitespaces", "nmt-nfkc"],
)
def test_sentencepiece_normalizer_variants_match(tmp_path, options):
    directory = make_sentencepiece_tokenizer_dir(tmp_path / "v", "internlm2", **options)
    tok, processor = load_tokenizer(directory), sp_processor(directory)
    for text in TEXTS + ["  many   spaces  here ", "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ①"]:
        assert tok.encode(text, add_special_tokens=False) == processor.encode(text), text


def test_rstrip_flag_of_added_tokens_is_honoured(tmp_path):
    stripping = load_tokenizer(make_sentencepiece_tokenizer_dir(tmp_path / "a", "phi3", rstrip_role_tokens=True))
    keeping = load_tokenizer(make_sentencepiece_tokenizer_dir(tmp_path / "b", "phi3"))
    assert stripping.encode("<|user|>\nhi") == stripping.encode("<|user|>hi")
    assert keeping.encode("<|user|>\nhi") != keeping.encode("<|user|>hi")


# ------------------------------------------------------------------------------------------------- decoding §8.6


def test_decode_keeps_grounding_tags_qwen(toks):
    tok = toks["qwen2"]
    answer = "<ref>a cat</ref><box>[[120, 340, 560, 780]]</box>"
    ids = tok.encode(answer + "<|im_end|>")
    assert decode_keep_grounding(tok, ids) == answer


@pytest.mark.parametrize("family", ["internlm2", "phi3"])
def test_decode_keeps_grounding_tags_sentencepiece(toks, family):
    tok = toks[family]
    end = "<|end|>" if family == "phi3" else "<|im_end|>"
    text = decode_keep_grounding(tok, tok.encode("<ref>a cat</ref><box>[[120, 340, 560, 780]]</box>" + end))
    for tag in ("<ref>", "</ref>", "<box>", "</box>"):
        assert text.count(tag) == 1
    assert end not in text and "<s>" not in text
    assert re.sub(r"\s+", "", text) == "<ref>acat</ref><box>[[120,340,560,780]]</box>"


def test_decode_keeps_internvl_tokens_even_when_listed_as_additional_special(tmp_path):
    directory = make_bpe_tokenizer_dir(tmp_path / "q")
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS]
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = load_tokenizer(directory)
    assert tok.convert_tokens_to_ids("<ref>") in tok.all_special_ids  # so a plain skip would drop it
    answer = "<ref>dog</ref><box>[[1, 2, 3, 4]]</box>"
    assert decode_keep_grounding(tok, tok.encode("<|im_start|>" + answer + "<|im_end|>")) == answer


def test_decode_drops_bos_eos_pad_and_template_tokens(dirs, toks):
    tok, ids_of = toks["internlm2"], expected_ids(dirs["internlm2"])
    body = tok.encode("hello", add_special_tokens=False)
    noisy = [ids_of["<s>"], ids_of["<|im_start|>"], *body, ids_of["<|im_end|>"], ids_of["</s>"], ids_of["</s>"]]
    assert decode_keep_grounding(tok, noisy) == decode_keep_grounding(tok, body) == "hello"


def test_decode_rejects_batches(toks):
    with pytest.raises(ValueError, match="one sequence"):
        decode_keep_grounding(toks["qwen2"], [[1, 2], [3, 4]])


# ------------------------------------------------------------------------------------------------- no remote code


def test_trap_files_do_execute_when_imported(tmp_path):
    # Control: proves the trap below would notice an import.
    marker = tmp_path / "marker"
    (trap,) = [p for p in write_remote_code_trap(tmp_path, marker) if p.name == "tokenization_internlm2.py"]
    spec = importlib.util.spec_from_file_location("trap_control", trap)
    with pytest.raises(RuntimeError, match="never be imported"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert marker.exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_load_never_executes_checkpoint_code(tmp_path, family):
    marker = tmp_path / "executed"
    if family == "qwen2":
        directory = make_bpe_tokenizer_dir(tmp_path / family)
        config = (directory / "tokenizer_config.json").read_text(encoding="utf-8")
        auto_map = '"auto_map": {"AutoTokenizer": ["tokenization_qwen2.Qwen2Tokenizer", null]},\n  '
        config = config.replace('"tokenizer_class"', auto_map + '"tokenizer_class"')
        assert json.loads(config)["auto_map"]
        (directory / "tokenizer_config.json").write_text(config, encoding="utf-8")
    else:
        directory = make_sentencepiece_tokenizer_dir(tmp_path / family, family)
    write_remote_code_trap(directory, marker)
    before = set(sys.modules)
    tok = load_tokenizer(directory)
    assert tok.encode("<IMG_CONTEXT>", add_special_tokens=False) == [expected_ids(directory)["<IMG_CONTEXT>"]]
    assert not marker.exists()
    assert not any("tokenization_internlm2" in m or "tokenization_qwen2" in m for m in set(sys.modules) - before)


# ------------------------------------------------------------------------------------------------- paths and hub


def test_hub_id_without_network_gives_clear_error(monkeypatch):
    calls = []

    def offline(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="could not reach the hub.*OpenGVLab/InternVL2-1B.*pass a local directory"):
        load_tokenizer("OpenGVLab/InternVL2-1B")
    assert len(calls) == 1
    patterns = calls[0][1]["allow_patterns"]
    assert "tokenizer_config.json" in patterns and not any(p.endswith(".py") or "*" in p for p in patterns)


def test_hub_id_loads_from_downloaded_snapshot(monkeypatch, dirs):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(dirs["qwen2"]))
    tok = load_tokenizer("OpenGVLab/InternVL3-1B")
    assert image_context_id(tok) == expected_ids(dirs["qwen2"])["<IMG_CONTEXT>"]


@pytest.mark.parametrize("path", ["/definitely/not/here", "./missing_dir", "a/b/c"])
def test_missing_local_path_is_not_sent_to_the_hub(monkeypatch, path):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub was contacted"))
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(path)


def test_directory_without_tokenizer_files(tmp_path):
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)


def test_unsupported_sentencepiece_class(tmp_path, dirs):
    directory = tmp_path / "other"
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes((dirs["internlm2"] / "tokenizer.model").read_bytes())
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer"}', encoding="utf-8")
    with pytest.raises(ValueError, match="'T5Tokenizer'.*InternLM2Tokenizer, InternLM3Tokenizer, LlamaTokenizer"):
        load_tokenizer(directory)


def test_internlm3_tokenizer_class_encodes_per_chunk_like_internlm2(tmp_path):
    """InternVL3-9B ships `InternLM3Tokenizer`: split on added tokens, SentencePiece per chunk (as InternLM2)."""
    import json

    from helpers_tokenizers import make_sentencepiece_tokenizer_dir

    d2 = make_sentencepiece_tokenizer_dir(tmp_path / "lm2", family="internlm2")
    d3 = make_sentencepiece_tokenizer_dir(tmp_path / "lm3", family="internlm2")
    cfg = json.loads((d3 / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "InternLM3Tokenizer"
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_internlm3.InternLM3Tokenizer", None]}
    (d3 / "tokenizer_config.json").write_text(json.dumps(cfg))
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert load_tokenizer(d3)(text)["input_ids"] == load_tokenizer(d2)(text)["input_ids"]
