"""Byte-level BPE tokenizer for the demo model, trained with the `tokenizers` library.

Shape of the result (Qwen2-like, INTERNVL.md §6, §11.3):
* NFC normalizer, a regex split then a ByteLevel pre-tokenizer (no prefix space), ByteLevel decoder, so every string
  round-trips through encode/decode.
* The split keeps each digit a separate piece (an optional leading space may stay attached: " 4"), so coordinates
  such as `[[411, 728, 643, 960]]` cost one token per digit plus a few for the brackets and commas; runs of capitals
  are split into single letters (see SPLIT_PATTERN).
* Ids `0 .. base-1` are the learned vocabulary; then, in this order, `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`
  and the nine InternVL tokens of §6.1 (`<img>` ... `</box>`), all added as special tokens so they never split.
  `len(tokenizer) <= vocab_size`.
* No BOS is added; eos is `<|im_end|>` (the `internvl2_5` end of turn), pad is `<|endoftext|>`.

The config names `PreTrainedTokenizerFast`, not `Qwen2TokenizerFast`: transformers 5 rebuilds a Qwen2 tokenizer
from vocab and merges with Qwen2's own split regex, which would not reproduce this tokenizer.json. As with released
InternVL tokenizers, the nine InternVL tokens are special but not `additional_special_tokens`; a fast tokenizer's
`decode(skip_special_tokens=True)` nevertheless drops every special added token, including `<ref>`/`<box>`, so
decoders that must keep grounding tags (§8.6) should decode without skipping and cut at `<|im_end|>` themselves.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
ADDED_TOKENS = CONTROL_TOKENS + INTERNVL_TOKENS
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"

# internvl2_5 template pieces (INTERNVL.md §7.2) and its default system message S3 (§7.3).
SYSTEM_S3 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"  # noqa: E501
SYSTEM_TEMPLATE = "<|im_start|>system\n{}"
USER_TAG, ASSISTANT_TAG, SEP = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"
IMAGE_TOKENS_PER_TILE = 64  # 224 px tile, patch 14 -> 16x16 patches -> 8x8 after pixel shuffle

# Pre-tokenizer split: English contractions; words with at most one leading non-letter (" red", "<Image"), where an
# upper-case letter not followed by a lower-case one stands alone, so OCR answers like "JTHGY" are spelled one
# letter per token instead of by arbitrary merges of random letters; single digits with an optional leading space;
# punctuation runs; newlines; other whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?(?:\p{Lu}(?!\p{Ll})|\p{Lu}?\p{Ll}+|\p{L}+)"
    r"| ?\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
_ADDED_RE = re.compile("|".join(re.escape(t) for t in ADDED_TOKENS))


def render_conversation(conversations: list[dict], image_tokens: int = 1, system: str = SYSTEM_S3) -> str:
    """The full `internvl2_5` training string of one conversation (§13.1), `<image>` expanded in human turns.

    `image_tokens` is the number of `<IMG_CONTEXT>` per image (1 is enough for tokenizer training; the real count is
    IMAGE_TOKENS_PER_TILE per tile).
    """
    image = "<img>" + "<IMG_CONTEXT>" * image_tokens + "</img>"
    turns = list(conversations)
    if turns and turns[0]["from"] == "system":
        system = turns.pop(0)["value"]
    parts = [SYSTEM_TEMPLATE.format(system) + SEP]
    for turn in turns:
        if turn["from"] == "human":
            parts.append(USER_TAG + turn["value"].replace("<image>", image) + SEP)
        elif turn["from"] == "gpt":
            parts.append(ASSISTANT_TAG + turn["value"] + SEP)
        else:
            raise ValueError(f"unexpected turn role {turn['from']!r}; expected 'human' or 'gpt' after the system turn")
    return "".join(parts)


def corpus_texts(dataset_dir: str | Path, annotation: str = "train.jsonl") -> Iterator[str]:
    """Rendered training conversations of a dataset written by `internvl.demo.dataset` (template and S3 included)."""
    with (Path(dataset_dir) / annotation).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield render_conversation(json.loads(line)["conversations"])


def _strip_added(texts: Iterable[str]) -> Iterator[str]:
    """Cut texts at added tokens: they get fixed ids after the learned vocabulary, so BPE must not learn them."""
    for text in texts:
        for piece in _ADDED_RE.split(text):
            if piece:
                yield piece


def build_tokenizer() -> Tokenizer:
    """An untrained tokenizer with this module's normalizer, pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2048,
                    model_max_length: int = 4096) -> Path:
    """Train on `texts`, write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return `out_dir`.

    `vocab_size` bounds the total (learned + 12 added tokens); a small corpus may learn fewer merges.
    """
    n_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_bytes + len(ADDED_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the {n_bytes} byte symbols + {len(ADDED_TOKENS)} "
                         f"added tokens")
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ADDED_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(_strip_added(texts), trainer)
    base = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
    ids = [tok.token_to_id(t) for t in ADDED_TOKENS]
    assert ids == list(range(base, base + len(ADDED_TOKENS))), ids

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in zip(ids, ADDED_TOKENS)}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": model_max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    special_map = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
                   "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m internvl.demo.tokenizer",
        description="Train the demo tokenizer on a dataset written by internvl.demo.dataset.",
    )
    parser.add_argument("dataset", type=Path, help="dataset directory (contains train.jsonl)")
    parser.add_argument("out", type=Path, help="output directory for the tokenizer files")
    parser.add_argument("--vocab-size", type=int, default=2048, help="upper bound on the total vocabulary")
    args = parser.parse_args(argv)
    print(train_tokenizer(corpus_texts(args.dataset), args.out, args.vocab_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
