"""Tokenization and label masks for supervised fine-tuning, one rule set per template family.

Spec: INTERNVL.md §13 (common rules), §13.1 `internvl2_5`, §13.2 `internlm2-chat`, §13.3 `Hermes-2`, §13.4
`phi3-chat`, §12.3 (every image block must survive truncation), §20 item 29.
Reference: OpenGVLab/InternVL `internvl_chat/internvl/train/dataset.py` (`preprocess_*`), restated in the spec.

Two strategies, as in the reference:

* `internvl2_5` tokenizes each turn **separately** (system, user, assistant segments) and concatenates the ids; the
  labels follow directly from the segment a token came from. Exactly one BOS when the tokenizer adds one.
* `internlm2-chat`, `Hermes-2` and `phi3-chat` tokenize the **whole** rendered string once, then measure how many tokens
  each masked / trained piece occupies by tokenizing the pieces on their own. When the measured total disagrees with
  the real length, the whole sample is set to IGNORE (the reference's "tokenization mismatch" warning); we log it and
  count it in `stats["tokenization_mismatch"]`.

Differences from the reference, all on malformed input or tokenizer details:
* Piece lengths are measured without special tokens and the BOS is accounted for once. The reference's `phi3-chat`
  measurement subtracts 1 or 2 per piece to compensate for the slow Llama tokenizer's stray `▁` before a leading added
  token, which our tokenizer loader does not produce (see `internvl.tokenizer`); `Hermes-2` ignored BOS entirely
  (Qwen has none). Both give the same labels as the reference whenever the reference's own counts are right.
* The mismatch check also runs on samples that truncation shortened (the reference skips it there).
* Placeholder expansion for the older templates goes over the turn values (not the system message), in conversation
  order. The data loader rejects `<image>` outside human turns anyway, so valid data is unaffected.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping, Sequence
from typing import NamedTuple

from internvl.model.internvl import IGNORE_INDEX
from internvl.templates.conversation import Template, get_template
from internvl.templates.tokens import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl.tokenizer import adds_bos, token_id

logger = logging.getLogger(__name__)

HUMAN, GPT, SYSTEM = "human", "gpt", "system"
SUPPORTED_TEMPLATES = ("internvl2_5", "internlm2-chat", "Hermes-2", "phi3-chat")


class SampleError(ValueError):
    """A sample that cannot become a training example (bad roles, placeholder/image count mismatch, an image block
    cut by truncation). The dataset counts it and substitutes another sample (INTERNVL.md §12.5)."""


def tokenize_conversation(
    conversations: Sequence[Mapping[str, str]],
    tokenizer,
    template_name: str,
    num_image_token_list: Sequence[int],
    max_seq_length: int,
    system_message: str | None = None,
    stats: MutableMapping[str, int] | None = None,
) -> tuple[list[int], list[int]]:
    """`conversations` (list of `{"from": "human"|"gpt"|"system", "value": str}`) -> `(input_ids, labels)`.

    The k-th expanded `<image>` becomes `<img>` + `<IMG_CONTEXT>` x `num_image_token_list[k]` + `</img>` (§13).
    `system_message=None` uses the template default (S2/S3) unless the conversation starts with a system turn, which
    only `internvl2_5` accepts (§12.2). Both lists are cut to `max_seq_length`; a `SampleError` is raised when that
    (or anything else) leaves fewer complete image blocks than images (§12.3). `stats`, when given, counts
    `"tokenization_mismatch"` (whole-sample IGNORE, §13.2-13.4).
    """
    template = get_template(template_name)
    if template.name not in SUPPORTED_TEMPLATES:
        raise ValueError(f"no training preprocessing for template {template_name!r}; supported: {SUPPORTED_TEMPLATES}")
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1:
        raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
    tokens_per_image = [int(n) for n in num_image_token_list]
    if any(n < 1 for n in tokens_per_image):
        raise ValueError(f"num_image_token_list entries must be positive, got {list(num_image_token_list)}")

    system, turns = _split_system(conversations, template)
    if system is None:
        system = template.default_system_message if system_message is None else system_message
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []

    if template.name == "internvl2_5":
        turns = _expand_placeholders(turns, tokens_per_image, roles=(HUMAN,))
        input_ids, labels = _segmentwise(turns, system, template, tokenizer, bos)
    else:
        strip = template.name == "internlm2-chat"  # only the InternLM-style preprocessor strips values (§13.2)
        turns = [(role, value.strip() if strip else value) for role, value in turns]
        turns = _expand_placeholders(turns, tokens_per_image, roles=(HUMAN, GPT))
        spans = (_internlm_spans if template.name == "internlm2-chat" else _mpt_spans)(turns, system, template)
        input_ids = bos + _encode(tokenizer, "".join(span.text for span in spans))
        labels = _labels_from_spans(input_ids, spans, tokenizer, len(bos), stats)
        if template.name == "phi3-chat":  # §13.4: never train on <|endoftext|>
            endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
            labels = [IGNORE_INDEX if i == endoftext else label for i, label in zip(input_ids, labels)]

    full_length = len(input_ids)
    input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
    _check_image_blocks(input_ids, tokenizer, tokens_per_image, full_length, max_seq_length)
    return input_ids, labels


# ---------------------------------------------------------------------------------------------------------------
# Turns and placeholders


def _split_system(conversations, template: Template) -> tuple[str | None, list[tuple[str, str]]]:
    """(system text or None, [(role, value), ...]) after checking roles alternate human/gpt starting with human."""
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence) or not conversations:
        raise SampleError("conversations must be a non-empty list of {'from', 'value'} turns")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise SampleError(f"turn {k} must be an object with a string 'value', got {turn!r}")
        turns.append((turn.get("from"), turn["value"]))
    system = None
    if turns[0][0] == SYSTEM:
        if template.name != "internvl2_5":
            raise SampleError(
                f"template {template.name!r} does not accept a system turn (only internvl2_5 does, §12.2)"
            )
        system = turns.pop(0)[1]
    if not turns:
        raise SampleError("conversation has a system turn but no human/gpt turns")
    for k, (role, _) in enumerate(turns):
        expected = HUMAN if k % 2 == 0 else GPT
        if role != expected:
            raise SampleError(f"turn {k + (system is not None)} is from {role!r}; expected {expected!r} (alternating)")
    return system, turns


def _block(num_tokens: int) -> str:
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * num_tokens + IMG_END_TOKEN


def _expand_placeholders(turns, tokens_per_image: list[int], roles: tuple[str, ...]) -> list[tuple[str, str]]:
    """Replace `<image>` placeholders in turns whose role is in `roles`, in order, until every image is used; surplus
    placeholders stay literal text (§13.1 step 2)."""
    used, out = 0, []
    for role, value in turns:
        if role in roles:
            while used < len(tokens_per_image) and IMAGE_PLACEHOLDER in value:
                value = value.replace(IMAGE_PLACEHOLDER, _block(tokens_per_image[used]), 1)
                used += 1
        out.append((role, value))
    if used != len(tokens_per_image):
        where = "human turns" if roles == (HUMAN,) else "the conversation"
        raise SampleError(
            f"{len(tokens_per_image)} images but only {used} {IMAGE_PLACEHOLDER} placeholders in {where}"
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# internvl2_5: segment-wise tokenization (§13.1)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _segmentwise(turns, system: str, template: Template, tokenizer, bos: list[int]) -> tuple[list[int], list[int]]:
    # Tokenizing "<s>" + first segment and dropping the first id of every segment (the reference's recipe) is the
    # same as tokenizing every segment without special tokens and putting one BOS in front.
    header_len = len(_encode(tokenizer, template.assistant_tag))  # n_hdr, without BOS (§13.1 step 5)
    input_ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    input_ids += _encode(tokenizer, template.system_template.format(system_message=system) + template.sep)
    labels += [IGNORE_INDEX] * (len(input_ids) - len(labels))
    for role, value in turns:
        tag = template.user_tag if role == HUMAN else template.assistant_tag
        ids = _encode(tokenizer, tag + value + template.sep)
        input_ids += ids
        if role == HUMAN:
            labels += [IGNORE_INDEX] * len(ids)
        else:
            # Header masked; answer and <|im_end|> trained; the last id (the "\n" of the separator) masked.
            trained = ids[header_len:-1]
            labels += [IGNORE_INDEX] * (len(ids) - len(trained) - 1) + trained + [IGNORE_INDEX]
    return input_ids, labels


# ---------------------------------------------------------------------------------------------------------------
# Whole-string templates (§13.2-13.4)


class _Span(NamedTuple):
    """A piece of the rendered text. Its token count is measured as len(tok(context + text)) - len(tok(context)),
    i.e. on its own when `context` is empty."""

    text: str
    trained: bool
    context: str = ""


def _mpt_spans(turns, system: str, template: Template) -> list[_Span]:
    """Hermes-2 / phi3-chat (§13.3-13.4). Per round: [system block +] user turn + separator + assistant tag (masked),
    then answer + separator (trained). The answer is measured in the context of its instruction, as the reference
    measures a round: len(instruction + answer) + 1 - len(instruction)."""
    spans = []
    instruction = template.system_template.format(system_message=system) + template.sep
    for k in range(0, len(turns), 2):
        instruction += template.user_tag + turns[k][1] + template.sep + template.assistant_tag
        spans.append(_Span(instruction, False))
        if k + 1 < len(turns):
            spans.append(_Span(turns[k + 1][1] + template.sep, True, context=instruction))
        instruction = ""
    return spans


def _internlm_spans(turns, system: str, template: Template) -> list[_Span]:
    """internlm2-chat (§13.2): everything up to and including each assistant tag masked (system block and user turns
    included); each answer and its separator trained. Every piece is measured on its own."""
    spans = []
    masked = template.system_template.format(system_message=system) + template.sep
    for k in range(0, len(turns), 2):
        masked += template.user_tag + turns[k][1] + template.sep + template.assistant_tag
        spans.append(_Span(masked, False))
        if k + 1 < len(turns):
            spans.append(_Span(turns[k + 1][1] + template.sep, True))
        masked = ""
    return spans


def _labels_from_spans(input_ids, spans: list[_Span], tokenizer, num_bos: int, stats) -> list[int]:
    counts = []
    for span in spans:
        n = len(_encode(tokenizer, span.context + span.text))
        if span.context:
            n -= len(_encode(tokenizer, span.context))
        counts.append(n)
    measured = num_bos + sum(counts)
    if measured != len(input_ids) or any(n < 0 for n in counts):
        logger.warning(
            "tokenization mismatch: the pieces measure %d tokens but the sample has %d; whole sample ignored",
            measured,
            len(input_ids),
        )
        if stats is not None:
            stats["tokenization_mismatch"] = stats.get("tokenization_mismatch", 0) + 1
        return [IGNORE_INDEX] * len(input_ids)
    labels, position = [IGNORE_INDEX] * num_bos, num_bos
    for n, span in zip(counts, spans):
        labels += input_ids[position : position + n] if span.trained else [IGNORE_INDEX] * n
        position += n
    return labels


# ---------------------------------------------------------------------------------------------------------------
# Truncation check (§12.3)


def _check_image_blocks(input_ids, tokenizer, tokens_per_image, full_length: int, max_seq_length: int) -> None:
    if not tokens_per_image:
        return
    end_id = token_id(tokenizer, IMG_END_TOKEN)
    context_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
    ends, contexts = input_ids.count(end_id), input_ids.count(context_id)
    if ends == len(tokens_per_image) and contexts == sum(tokens_per_image):
        return
    cause = (
        f"truncation to max_seq_length={max_seq_length} (the sample has {full_length} tokens) cut an image block"
        if full_length > max_seq_length
        else "the text contains stray image tokens"
    )
    raise SampleError(
        f"{cause}: {ends} of {len(tokens_per_image)} {IMG_END_TOKEN} and {contexts} of {sum(tokens_per_image)} "
        f"{IMG_CONTEXT_TOKEN} tokens remain"
    )
