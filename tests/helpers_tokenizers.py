"""Tiny tokenizer directories for tests, shaped like the real InternVL checkpoints' tokenizer files.

No network and no downloaded files: every tokenizer is trained here, in well under a second, on `CORPUS`.

* `make_bpe_tokenizer_dir(path, family="qwen2")`: byte-level BPE `tokenizer.json` (+ `vocab.json`, `merges.txt`) like
  Qwen2 / Qwen2.5 (InternVL2-1B, InternVL2.5 / 3 Qwen models). Base vocabulary first, then `<|endoftext|>`,
  `<|im_start|>`, `<|im_end|>`, then the nine InternVL tokens. No BOS, eos `<|im_end|>`, pad `<|endoftext|>`.
* `make_sentencepiece_tokenizer_dir(path, family="internlm2")`: SentencePiece BPE `tokenizer.model` with byte fallback
  and `tokenizer_config.json` like InternLM2's: `tokenizer_class` `InternLM2Tokenizer` with an `auto_map` pointing to
  remote code (the Python files are NOT written; see `write_remote_code_trap`), BOS `<s>` added, eos `</s>`,
  `<|im_end|>` and `<|im_start|>` as the model's last two (user-defined) pieces, then the nine InternVL tokens.
* `make_sentencepiece_tokenizer_dir(path, family="phi3")`: the same kind of model with a Phi-3-shaped config:
  `LlamaTokenizer`, `"legacy": false`, BOS added, eos/pad `<|endoftext|>`, the eleven Phi-3 added tokens
  (`<|endoftext|>`, `<|assistant|>`, placeholders, `<|system|>`, `<|end|>`, `<|user|>`) then the nine InternVL tokens.
* `write_remote_code_trap(path, marker)`: writes `tokenization_*.py` files that create `marker` when imported, to prove
  a loader never executes checkpoint code.

Each `make_*` returns the directory path. Ids follow the real layouts (InternVL tokens at len(base) + k, §6.1), and
`expected_ids(path)` reads them back from the written files for assertions that must not trust the loader.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

INTERNVL_TOKENS = (
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Phi-3-mini's added tokens, ids 32000..32010 in the real tokenizer (base 32000).
PHI3_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)

# Training text: English, Chinese (incl. the system prompts' characters), digits, grounding syntax, newlines.
CORPUS = (
    "Hello world. The quick brown fox jumps over the lazy dog.\n"
    "A cat sits on the mat, and the dog sits by the door.\n"
    "Please describe the image shortly. What is in the picture?\n"
    "Please provide the bounding box coordinate of the region this sentence describes.\n"
    "The cat is at [[120, 340, 560, 780]] and the dog at [[10, 20, 300, 400], [500, 600, 700, 800]].\n"
    "Image-1: Image-2: Frame1: Frame2: Frame3: answer the questions.\n"
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。\n"
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。\n"
    "这是一只猫。图片里有什么？请详细描述这张图片。\n"
    "You are an AI assistant whose name is InternLM (书生·浦语). 0123456789\n"
)

# The pre-tokenization regex of Qwen2's tokenizer.json (data, not code).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _added_entry(content: str, *, special: bool = True, rstrip: bool = False) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": rstrip,
        "single_word": False,
        "special": special,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def make_bpe_tokenizer_dir(path: str | Path, family: str = "qwen2", vocab_size: int = 400) -> Path:
    """Train a byte-level BPE tokenizer like Qwen2's and write `tokenizer.json`, `vocab.json`, `merges.txt` and a
    Qwen2-shaped `tokenizer_config.json` into `path` (created if needed). Returns `path`."""
    if family != "qwen2":
        raise ValueError(f"unknown BPE tokenizer family {family!r}; supported: 'qwen2'")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    base = tokenizer.get_vocab_size()
    added = QWEN_SPECIAL_TOKENS + INTERNVL_TOKENS
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tokenizer.save(str(path / "tokenizer.json"))
    tokenizer.model.save(str(path))  # vocab.json + merges.txt, as the real Qwen2 directories carry them

    _write_json(
        path / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": {str(base + k): _added_entry(t) for k, t in enumerate(added)},
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    return path


def train_sentencepiece_model(add_dummy_prefix: bool = True, vocab_size: int = 400, **options) -> bytes:
    """A serialized SentencePiece BPE model (Llama-like options: byte fallback, identity normalization, split digits)
    trained on `CORPUS`. Extra keyword options go to `SentencePieceTrainer.train`."""
    import sentencepiece as spm

    settings = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    settings.update(options)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS.splitlines()), model_writer=buffer, **settings)
    return buffer.getvalue()


def make_sentencepiece_tokenizer_dir(
    path: str | Path,
    family: str = "internlm2",
    *,
    add_dummy_prefix: bool = True,
    rstrip_role_tokens: bool = False,
    train_options: dict | None = None,
) -> Path:
    """Train a tiny SentencePiece BPE model and write `tokenizer.model` + `tokenizer_config.json` shaped like
    InternLM2's (`family="internlm2"`) or Phi-3's (`family="phi3"`) into `path`. Returns `path`.

    `add_dummy_prefix` is the SentencePiece normalizer flag; `rstrip_role_tokens` (phi3 only) marks the Phi-3 role
    and end tokens `rstrip: true` in `added_tokens_decoder`, as some Phi-3 releases do. `train_options` overrides
    SentencePiece trainer options (e.g. `{"normalization_rule_name": "nmt_nfkc"}`).
    """
    if family not in ("internlm2", "phi3"):
        raise ValueError(f"unknown SentencePiece tokenizer family {family!r}; supported: 'internlm2', 'phi3'")
    from sentencepiece import sentencepiece_model_pb2

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(train_sentencepiece_model(add_dummy_prefix=add_dummy_prefix, **(train_options or {})))
    specials = {
        "0": _added_entry("<unk>"),
        "1": _added_entry("<s>"),
        "2": _added_entry("</s>"),
    }

    if family == "internlm2":
        # InternLM2 keeps <|im_end|> (92542) and <|im_start|> (92543) as the last pieces of its model (§6.2).
        for piece in ("<|im_end|>", "<|im_start|>"):
            proto.pieces.add(piece=piece, score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
        base = len(proto.pieces)
        specials[str(base - 2)] = _added_entry("<|im_end|>")
        specials[str(base - 1)] = _added_entry("<|im_start|>")
        first_internvl = base
        config = {
            "auto_map": {
                "AutoTokenizer": [
                    "tokenization_internlm2.InternLM2Tokenizer",
                    "tokenization_internlm2_fast.InternLM2TokenizerFast",
                ]
            },
            "tokenizer_class": "InternLM2Tokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "</s>",
            "unk_token": "<unk>",
            "clean_up_tokenization_spaces": False,
            "decode_with_prefix_space": False,
            "model_max_length": 1000000000000000019884624838656,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        }
    else:
        base = len(proto.pieces)
        role_tokens = {"<|assistant|>", "<|system|>", "<|end|>", "<|user|>"}
        for k, token in enumerate(PHI3_ADDED_TOKENS):
            rstrip = rstrip_role_tokens and (token in role_tokens or token.startswith("<|placeholder"))
            specials[str(base + k)] = _added_entry(token, rstrip=rstrip)
        first_internvl = base + len(PHI3_ADDED_TOKENS)
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<unk>",
            "legacy": False,
            "clean_up_tokenization_spaces": False,
            "use_default_system_prompt": False,
            "sp_model_kwargs": {},
            "model_max_length": 131072,
        }
    for k, token in enumerate(INTERNVL_TOKENS):
        specials[str(first_internvl + k)] = _added_entry(token)
    config["added_tokens_decoder"] = specials
    (path / "tokenizer.model").write_bytes(proto.SerializeToString())
    _write_json(path / "tokenizer_config.json", config)
    return path


def expected_ids(path: str | Path) -> dict[str, int]:
    """token -> id for every `added_tokens_decoder` entry of the directory's tokenizer_config.json, read straight
    from the file (independent of any loader)."""
    config = json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {entry["content"]: int(i) for i, entry in config["added_tokens_decoder"].items()}


def write_remote_code_trap(path: str | Path, marker: str | Path) -> list[Path]:
    """Write `tokenization_internlm2.py`, `tokenization_internlm2_fast.py` and `tokenization_qwen2.py` into `path`;
    importing any of them creates the file `marker` and raises. Returns the written files."""
    path = Path(path)
    body = (
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('checkpoint code was executed')\n"
        "raise RuntimeError('checkpoint code must never be imported')\n"
    )
    written = []
    for name in ("tokenization_internlm2.py", "tokenization_internlm2_fast.py", "tokenization_qwen2.py"):
        (path / name).write_text(body, encoding="utf-8")
        written.append(path / name)
    return written
