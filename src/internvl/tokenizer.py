"""Loading InternVL tokenizers without running checkpoint code, and the id look-ups prompting needs.

Spec: INTERNVL.md §6 (special tokens and ids), §8.1 steps 5, 8, 10 (end-of-turn id, one-call tokenization),
§8.6 (decoding keeps the grounding tags), §20 items 9, 13, 28.

Checkpoints ship two kinds of tokenizer:

* `tokenizer.json` (Qwen2 / Qwen2.5 and our demo model): loaded as-is by `tokenizers` through the built-in
  `PreTrainedTokenizerFast`, honouring `tokenizer_config.json` (bos/eos/pad, added tokens).
* a SentencePiece `tokenizer.model` whose `tokenizer_config.json` names a class living in the checkpoint's own Python
  files (InternLM2's `InternLM2Tokenizer` via `auto_map`) or `LlamaTokenizer` (Phi-3). We never import those files.
  Instead we convert the SentencePiece BPE model into a `tokenizers.Tokenizer` ourselves and reproduce the encoding
  of the slow class the model cards use (`use_fast=False`):
    - `InternLM2Tokenizer`, and `LlamaTokenizer` with `legacy` true or absent: the text is split on added tokens and
      every remaining chunk is encoded by SentencePiece on its own, so each chunk gets the dummy-prefix `▁` when
      the model's normalizer asks for it.
    - `LlamaTokenizer` with `"legacy": false` (Phi-3): only the start of the whole text gets the `▁` prefix (none
      when it already starts with a space), exactly as transformers >= 5 `LlamaTokenizer` does. The transformers
      4.37 slow class differs in two corners we do not reproduce: a text starting with a space gets `▁▁`, and a
      text starting with an added token that is not a named/additional special token gets a lone `▁` token first
      [unverified against the released InternVL2-4B / Mini-InternVL-4B-V1-5 tokenizer files].
  BOS is added by the post-processor when `add_bos_token` is true (the default of both classes), §6.2.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from internvl.templates.conversation import Template, get_template
from internvl.templates.tokens import IMG_CONTEXT_TOKEN, INTERNVL_TOKENS

logger = logging.getLogger(__name__)

# Files a tokenizer may need; nothing else (in particular no *.py) is ever fetched from the hub.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)

# Slow SentencePiece classes we can reproduce, mapped to "split on added tokens, SentencePiece per chunk" (legacy).
# For LlamaTokenizer the config's "legacy" flag decides (absent means legacy, the transformers 4.37 default).
_SENTENCEPIECE_CLASSES = ("InternLM2Tokenizer", "InternLM3Tokenizer", "LlamaTokenizer")
# Classes whose slow `tokenize` splits on added tokens and SentencePiece-encodes each chunk as is. InternLM3's
# (InternVL3-9B) subclasses LlamaTokenizer but calls PreTrainedTokenizer.tokenize and sp_model.encode per chunk,
# the same encoding as InternLM2's [read from its shipped tokenization file; not checked against real ids here].
_PER_CHUNK_CLASSES = ("InternLM2Tokenizer", "InternLM3Tokenizer")

# Template control tokens (§6.2) that decoding removes even when a tokenizer does not flag them as special.
TEMPLATE_CONTROL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# SentencePiece ModelProto enums.
_SPM_BPE = 2
_SPM_NORMAL, _SPM_USER_DEFINED = 1, 4


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Load the tokenizer of a checkpoint directory (or a hub id; None = the shipped demo model, as
    `InternVLChatModel.from_pretrained(None)`) without executing any file from it.

    Accepted layouts: a directory with `tokenizer.json`; or a directory with `tokenizer.model` and a
    `tokenizer_config.json` whose `tokenizer_class` is `InternLM2Tokenizer` or `LlamaTokenizer` (a `Fast` suffix is
    ignored). A string that is not an existing directory and looks like `owner/name` is downloaded from the hub
    (tokenizer files only).
    """
    from internvl.demo.model import resolve_default_model

    directory = _resolve_directory(resolve_default_model(path))
    config = _read_json(directory / "tokenizer_config.json")
    class_name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    has_json = (directory / "tokenizer.json").is_file()
    has_spm = (directory / "tokenizer.model").is_file()

    # The model cards load with use_fast=False, so a SentencePiece class prefers tokenizer.model (§8.1 step 8).
    if has_spm and (class_name in _SENTENCEPIECE_CLASSES or not has_json):
        if class_name not in _SENTENCEPIECE_CLASSES:
            raise ValueError(
                f"{directory} has tokenizer.model but tokenizer_config.json names tokenizer_class "
                f"{class_name or None!r}; supported SentencePiece classes: {', '.join(_SENTENCEPIECE_CLASSES)} "
                "(or provide a tokenizer.json)"
            )
        legacy = class_name in _PER_CHUNK_CLASSES or config.get("legacy") is None or bool(config["legacy"])
        return _load_sentencepiece(directory, config, class_name, legacy=legacy)
    if has_json:
        # The class-level from_pretrained reads tokenizer.json + tokenizer_config.json; unlike AutoTokenizer it never
        # looks at auto_map, so no checkpoint code is imported.
        return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    raise ValueError(
        f"{directory} holds no tokenizer: expected tokenizer.json, or tokenizer.model with a tokenizer_config.json "
        f"naming one of {', '.join(_SENTENCEPIECE_CLASSES)}"
    )


def _resolve_directory(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"tokenizer path must be a directory path or a hub id string, got {type(path).__name__}")
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    text = os.fspath(path)
    looks_local = local.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local or not _HUB_ID.match(text):
        raise ValueError(f"tokenizer directory {text!r} does not exist (expected a directory or a hub id owner/name)")
    return _download_tokenizer_files(text)


def _download_tokenizer_files(repo_id: str) -> Path:
    import huggingface_hub

    try:
        snapshot = huggingface_hub.snapshot_download(repo_id, allow_patterns=list(TOKENIZER_FILES))
    except Exception as error:  # offline, unknown repo, gated repo, rate limit: all mean "no files"
        raise OSError(
            f"could not reach the hub to fetch the tokenizer of {repo_id!r} ({type(error).__name__}: {error}); "
            "pass a local directory that holds the checkpoint's tokenizer files instead"
        ) from error
    return Path(snapshot)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, null, or a serialized AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"unrecognised special-token entry in tokenizer_config.json: {value!r}")


def _load_sentencepiece(directory: Path, config: dict[str, Any], class_name: str, legacy: bool):
    from sentencepiece import sentencepiece_model_pb2

    model_path = directory / "tokenizer.model"
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_path.read_bytes())
    except Exception as error:
        raise ValueError(f"{model_path} is not a SentencePiece model: {error}") from None
    if proto.trainer_spec.model_type != _SPM_BPE:
        raise ValueError(f"{model_path} is a SentencePiece model of type {proto.trainer_spec.model_type}; only BPE (2)")

    backend = _backend_from_proto(proto, legacy=legacy)
    _add_configured_tokens(backend, config, model_path)

    # Defaults of the slow classes when the config is silent: InternLM2Tokenizer pads with </s>, Llama has no pad.
    defaults = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": None}
    if class_name == "InternLM2Tokenizer":
        defaults["pad_token"] = "</s>"
    special = {key: _token_text(config.get(key, default)) for key, default in defaults.items()}
    add_bos = bool(config.get("add_bos_token", True))
    add_eos = bool(config.get("add_eos_token", False))
    listed = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    extra = [text for text in (_token_text(t) for t in listed) if text is not None]

    bos, eos = special["bos_token"], special["eos_token"]
    single = " ".join(([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else []))
    used = [t for t, flag in ((bos, add_bos), (eos, add_eos)) if flag and t]
    backend.post_processor = processors.TemplateProcessing(
        single=single,
        pair=single + " " + single.replace(":0", ":1").replace("$A", "$B"),
        special_tokens=[(t, _require_id(backend, t, model_path)) for t in used],
    )
    kwargs: dict[str, Any] = {k: v for k, v in special.items() if v is not None}
    if extra:
        kwargs["additional_special_tokens"] = extra
    if isinstance(config.get("model_max_length"), int):
        kwargs["model_max_length"] = config["model_max_length"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        name_or_path=str(directory),
        **kwargs,
    )
    _check_ids(tokenizer, config, model_path)
    return tokenizer


def _backend_from_proto(proto, legacy: bool) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes like `SentencePieceProcessor.encode` on each chunk between added tokens."""
    pieces = list(proto.pieces)
    vocab = {piece.piece: index for index, piece in enumerate(pieces)}
    unk_id = proto.trainer_spec.unk_id
    model = BPE(
        vocab=vocab,
        merges=_bpe_merges(pieces, vocab),
        unk_token=pieces[unk_id].piece if 0 <= unk_id < len(pieces) else None,
        fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback,
    )
    backend = Tokenizer(model)

    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:  # e.g. nmt_nfkc; identity models (Llama, InternLM2) have none
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if legacy:
        if spec.add_dummy_prefix:
            steps.append(normalizers.Prepend("▁"))  # applied per chunk: added tokens are split off first
        steps.append(normalizers.Replace(" ", "▁"))
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if spec.add_dummy_prefix else "never", split=False
        )
    if steps:
        backend.normalizer = normalizers.Sequence(steps)

    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(decode_steps)

    # SentencePiece always matches user-defined pieces whole, before BPE.
    user_defined = [p.piece for p in pieces if p.type == _SPM_USER_DEFINED]
    if user_defined:
        backend.add_tokens([AddedToken(p, normalized=False, special=False) for p in user_defined])
    return backend


def _bpe_merges(pieces: Sequence[Any], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merge rules equivalent to SentencePiece BPE: a pair may merge when the result is a normal piece; the merge
    whose result scores highest wins, ties broken by piece id (SentencePiece assigns ids in score order)."""
    ranked = []
    for index, piece in enumerate(pieces):
        if piece.type != _SPM_NORMAL or len(piece.piece) < 2:
            continue
        text = piece.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-piece.score, index, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_configured_tokens(backend: Tokenizer, config: dict[str, Any], model_path: Path) -> None:
    """Add `added_tokens_decoder` entries at exactly their configured ids (InternVL tokens are len(base)+k, §6.1)."""
    entries = config.get("added_tokens_decoder") or {}
    if not isinstance(entries, dict):
        raise ValueError(f"added_tokens_decoder in tokenizer_config.json must be an object, got {entries!r}")
    for raw_id, entry in sorted(entries.items(), key=lambda item: int(item[0])):
        token_id = int(raw_id)
        fields = {"content": entry} if isinstance(entry, str) else dict(entry)
        content = fields.get("content")
        if not isinstance(content, str):
            raise ValueError(f"added_tokens_decoder[{raw_id}] has no string 'content': {entry!r}")
        size = backend.get_vocab_size(with_added_tokens=True)
        existing = backend.token_to_id(content)
        if existing is not None and existing != token_id:
            raise ValueError(
                f"{model_path}: added token {content!r} is configured as id {token_id} but the model has it as "
                f"{existing}"
            )
        if existing is None and token_id < size:
            raise ValueError(
                f"{model_path}: added token {content!r} is configured as id {token_id}, which the SentencePiece "
                f"model already uses for {backend.id_to_token(token_id)!r}"
            )
        while existing is None and backend.get_vocab_size(with_added_tokens=True) < token_id:
            # A gap in the configured ids: keep later ids aligned with placeholders nobody can type by accident.
            gap = backend.get_vocab_size(with_added_tokens=True)
            backend.add_special_tokens([AddedToken(f"<|internvl_unused_{gap}|>", normalized=False)])
        backend.add_tokens(
            [
                AddedToken(
                    content,
                    single_word=bool(fields.get("single_word", False)),
                    lstrip=bool(fields.get("lstrip", False)),
                    rstrip=bool(fields.get("rstrip", False)),
                    normalized=bool(fields.get("normalized", False)),
                    special=bool(fields.get("special", True)),
                )
            ]
        )


def _require_id(backend: Tokenizer, token: str, model_path: Path) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{model_path}: special token {token!r} from tokenizer_config.json is not in the vocabulary")
    return token_id


def _check_ids(tokenizer: PreTrainedTokenizerFast, config: dict[str, Any], model_path: Path) -> None:
    for raw_id, entry in (config.get("added_tokens_decoder") or {}).items():
        content = entry if isinstance(entry, str) else entry["content"]
        actual = tokenizer.convert_tokens_to_ids(content)
        if actual != int(raw_id):
            raise ValueError(f"{model_path}: added token {content!r} loaded as id {actual}, configured {raw_id}")


# ---------------------------------------------------------------------------------------------------------------
# Id look-ups and decoding


def token_id(tokenizer, token: str) -> int:
    """The id of `token`, which must be a single, atomic token of `tokenizer` (never split into pieces)."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != token:
        raise ValueError(
            f"the tokenizer has no single token {token!r} (it encodes to {len(ids)} ids); InternVL checkpoints' "
            "tokenizers include the template and InternVL tokens as added tokens"
        )
    return ids[0]


def eos_id_for_template(tokenizer, template: Template | str) -> int:
    """The end-of-turn id `chat()` stops on: the id of `template.sep.strip()` (§8.1 step 5, §20 item 13)."""
    template = template if isinstance(template, Template) else get_template(template)
    return token_id(tokenizer, template.end_of_turn)


def image_context_id(tokenizer) -> int:
    """The id of `<IMG_CONTEXT>`, whose embedding rows are overwritten with vision features (§8.3)."""
    return token_id(tokenizer, IMG_CONTEXT_TOKEN)


def adds_bos(tokenizer) -> bool:
    """Whether encoding with special tokens puts BOS first (InternLM2 and Phi-3 do, Qwen does not; §6.2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == bos


def _ids_to_drop(tokenizer) -> set[int]:
    drop = {i for i in tokenizer.all_special_ids if i is not None}
    for token in TEMPLATE_CONTROL_TOKENS:
        token_id_or_unk = tokenizer.convert_tokens_to_ids(token)
        if token_id_or_unk is not None and tokenizer.convert_ids_to_tokens(token_id_or_unk) == token:
            drop.add(token_id_or_unk)
    keep = set()
    for token in INTERNVL_TOKENS:
        candidate = tokenizer.convert_tokens_to_ids(token)
        if candidate is not None and tokenizer.convert_ids_to_tokens(candidate) == token:
            keep.add(candidate)
    return drop - keep


def decode_keep_grounding(tokenizer, ids: Iterable[int]) -> str:
    """Decode like the slow tokenizers' `skip_special_tokens=True` (§8.6): drop bos/eos/pad/unk, additional special
    tokens and template control tokens (`<|im_end|>`, `<|end|>`, ...) but keep the nine InternVL tokens, so
    `<ref>`, `</ref>`, `<box>`, `</box>` survive for grounding (§18)."""
    if hasattr(ids, "tolist"):  # torch / numpy
        ids = ids.tolist()
    ids = list(ids)
    if any(isinstance(i, (list, tuple)) for i in ids):
        raise ValueError("decode_keep_grounding decodes one sequence; pass a flat list of ids")
    drop = _ids_to_drop(tokenizer)
    kept = [int(i) for i in ids if int(i) not in drop]
    return tokenizer.decode(kept, skip_special_tokens=False)
