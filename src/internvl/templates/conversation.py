"""Conversation templates and prompt building for InternVL chat models.

Spec: INTERNVL.md §7 (templates, exact strings, rendering rule), §8.1 steps 1, 4, 6, 7 (`chat()` prompt building),
§8.2 (multi-image conventions), §8.4 (`batch_chat()`), §20 items 7-13.
Reference: OpenGVLab/InternVL `internvl_chat/internvl/conversation.py` (templates) and
`modeling_internvl_chat.py` (`chat`, `batch_chat`).

Every modern template uses the "MPT" separator style: a system block, then `role_tag + message + sep` per turn, and a
bare assistant tag to open the generation. No whitespace is added anywhere; newlines exist only inside the strings.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from internvl.templates.tokens import DEFAULT_NUM_IMAGE_TOKEN, IMAGE_PLACEHOLDER, image_block

# S2: InternVL 2.0 system message (§7.3). 59 characters; U+FF0C after 大模型, ASCII ", " after InternVL, ends in U+3002.
SYSTEM_MESSAGE_S2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
# S3: InternVL 2.5 / 3 system message (§7.3). 58 characters; U+00B7, two U+FF0C, one U+3001, ends in U+3002.
SYSTEM_MESSAGE_S3 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

# V1-5-era English system messages (CONV before commit 0dc48a2; lmdeploy v0.7.3 agrees), §7.3.
# Used by InternVL-Chat-V1-5 and Mini-InternVL-Chat-2B/4B-V1-5 [unverified against the HF repos' conversation.py].
LEGACY_SYSTEM_MESSAGE_INTERNLM2 = "You are an AI assistant whose name is InternLM (书生·浦语)."
LEGACY_SYSTEM_MESSAGE_PHI3 = "You are an AI assistant whose name is Phi-3."
LEGACY_SYSTEM_MESSAGE_HERMES2 = "Answer the questions."


@dataclass(frozen=True)
class Template:
    """One conversation template (§7.2). Frozen: callers pick a system message per call instead of mutating."""

    name: str
    system_template: str  # contains the field "{system_message}"
    user_tag: str
    assistant_tag: str
    sep: str
    default_system_message: str

    @property
    def end_of_turn(self) -> str:
        """The token that ends a turn and stops generation: `sep.strip()` (§8.1 step 5)."""
        return self.sep.strip()


_IM_SYSTEM = "<|im_start|>system\n{system_message}"
_IM_USER = "<|im_start|>user\n"
_IM_ASSISTANT = "<|im_start|>assistant\n"

# The four templates at the reference commit, exact strings from §7.2.
TEMPLATES: Mapping[str, Template] = types.MappingProxyType(
    {
        "Hermes-2": Template("Hermes-2", _IM_SYSTEM, _IM_USER, _IM_ASSISTANT, "<|im_end|>", SYSTEM_MESSAGE_S2),
        "internlm2-chat": Template(
            "internlm2-chat", _IM_SYSTEM, _IM_USER, _IM_ASSISTANT, "<|im_end|>", SYSTEM_MESSAGE_S2
        ),
        "phi3-chat": Template(
            "phi3-chat", "<|system|>\n{system_message}", "<|user|>\n", "<|assistant|>\n", "<|end|>", SYSTEM_MESSAGE_S2
        ),
        # The only template whose separator carries a newline.
        "internvl2_5": Template("internvl2_5", _IM_SYSTEM, _IM_USER, _IM_ASSISTANT, "<|im_end|>\n", SYSTEM_MESSAGE_S3),
    }
)

_LEGACY_SYSTEM_MESSAGES: Mapping[str, str] = types.MappingProxyType(
    {
        "internlm2-chat": LEGACY_SYSTEM_MESSAGE_INTERNLM2,
        "phi3-chat": LEGACY_SYSTEM_MESSAGE_PHI3,
        "Hermes-2": LEGACY_SYSTEM_MESSAGE_HERMES2,
    }
)


def get_template(name: str) -> Template:
    """The template called `name` (the `template` field of an InternVL `config.json`)."""
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown template {name!r}; supported templates: {', '.join(sorted(TEMPLATES))}") from None


def default_system_message(template_name: str, legacy_v1_5: bool = False) -> str:
    """The system message a checkpoint was trained with (§7.3).

    `legacy_v1_5=True` selects the English prompts of the V1-5 era (InternVL-Chat-V1-5, Mini-InternVL-Chat-*-V1-5);
    they exist for `internlm2-chat`, `phi3-chat` and `Hermes-2` only.
    """
    template = get_template(template_name)
    if not legacy_v1_5:
        return template.default_system_message
    if template_name not in _LEGACY_SYSTEM_MESSAGES:
        raise ValueError(
            f"template {template_name!r} has no V1-5-era system message; "
            f"legacy_v1_5=True is accepted for: {', '.join(sorted(_LEGACY_SYSTEM_MESSAGES))}"
        )
    return _LEGACY_SYSTEM_MESSAGES[template_name]


def _resolve(template: Template | str) -> Template:
    return template if isinstance(template, Template) else get_template(template)


def render(template: Template | str, system_message: str | None, turns: Sequence[tuple[str, str | None]]) -> str:
    """Render a conversation with the MPT rule (§7.1).

    `system_message=None` uses the template default; `""` renders the empty system block, which is always present.
    Each turn is `(role_tag, message)` with `role_tag` one of the template's `user_tag` / `assistant_tag`; a `None` or
    empty message renders the bare tag (that is how a prompt ends with the open assistant turn).
    """
    template = _resolve(template)
    if system_message is None:
        system_message = template.default_system_message
    if not isinstance(system_message, str):
        raise ValueError(f"system_message must be a string or None, got {type(system_message).__name__}")
    allowed_tags = (template.user_tag, template.assistant_tag)
    parts = [template.system_template.format(system_message=system_message), template.sep]
    for index, turn in enumerate(turns):
        if not isinstance(turn, (tuple, list)) or len(turn) != 2:
            raise ValueError(f"turn {index} must be a (role_tag, message) pair, got {turn!r}")
        role_tag, message = turn
        if role_tag not in allowed_tags:
            raise ValueError(
                f"turn {index} has role tag {role_tag!r}; template {template.name!r} accepts {allowed_tags!r}"
            )
        if message is not None and not isinstance(message, str):
            raise ValueError(f"turn {index} message must be a string or None, got {type(message).__name__}")
        parts.append(role_tag + message + template.sep if message else role_tag)
    return "".join(parts)


def expand_image_placeholders(
    prompt: str, num_patches_list: Sequence[int], num_image_token: int = DEFAULT_NUM_IMAGE_TOKEN
) -> str:
    """Replace the first remaining `<image>` by one image block per entry of `num_patches_list`, in order (§8.1.7).

    Placeholders anywhere in the text count (history and system message included); surplus ones stay literal.
    """
    available = prompt.count(IMAGE_PLACEHOLDER)
    if available < len(num_patches_list):
        raise ValueError(
            f"prompt has {available} {IMAGE_PLACEHOLDER} placeholders but {len(num_patches_list)} images were given; "
            f"add one {IMAGE_PLACEHOLDER} per image (or pass fewer entries in num_patches_list)"
        )
    for num_tiles in num_patches_list:
        prompt = prompt.replace(IMAGE_PLACEHOLDER, image_block(num_tiles, num_image_token), 1)
    return prompt


def _resolve_pixels(num_patches_list: Sequence[int] | None, has_pixels: bool | None) -> tuple[bool, list[int]]:
    patches = [] if num_patches_list is None else list(num_patches_list)
    if has_pixels is None:
        has_pixels = bool(patches)
    if has_pixels and not patches:
        raise ValueError("has_pixels=True needs num_patches_list (tiles per image, e.g. [7]); none was given")
    if not has_pixels and patches:
        raise ValueError(f"num_patches_list={patches} was given but has_pixels=False; drop one or the other")
    return has_pixels, patches


def build_chat_prompt(
    template_name: str,
    question: str,
    history: Sequence[tuple[str, str]] | None = None,
    system_message: str | None = None,
    num_patches_list: Sequence[int] | None = None,
    num_image_token: int = DEFAULT_NUM_IMAGE_TOKEN,
    has_pixels: bool | None = None,
) -> tuple[str, str]:
    """The prompt string `chat()` tokenizes, and the question as it is stored in the history (§8.1 steps 1, 4, 6, 7).

    `num_patches_list` gives the tile count of each image in prompt order (one entry = all tiles in one block,
    §8.2 "combined"). `has_pixels` defaults to "num_patches_list is non-empty". `system_message=None` uses the
    template default (S2/S3); pass `default_system_message(name, legacy_v1_5=True)` for V1-5-era checkpoints.
    """
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}")
    has_pixels, patches = _resolve_pixels(num_patches_list, has_pixels)
    template = get_template(template_name)

    # Step 1: the automatic placeholder only on a first turn (history is None, not merely empty).
    if history is None and has_pixels and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question

    # Step 6: history pairs, the new question, and the open assistant turn.
    turns: list[tuple[str, str | None]] = []
    for index, pair in enumerate(history or ()):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise ValueError(f"history entry {index} must be a (question, answer) pair of strings, got {pair!r}")
        turns += [(template.user_tag, pair[0]), (template.assistant_tag, pair[1])]
    turns += [(template.user_tag, question), (template.assistant_tag, None)]
    prompt = render(template, system_message, turns)

    # Step 7: sequential replacement over the whole prompt, history included.
    return expand_image_placeholders(prompt, patches, num_image_token), question


def build_batch_prompts(
    template_name: str,
    questions: Sequence[str],
    num_patches_list: Sequence[int] | None = None,
    system_message: str | None = None,
    num_image_token: int = DEFAULT_NUM_IMAGE_TOKEN,
    has_pixels: bool | None = None,
) -> list[str]:
    """One prompt per question as `batch_chat()` builds them (§8.4).

    With pixels, `num_patches_list[i]` is the tile count of question i's single image: its first `<image>` (auto
    prefixed when absent) becomes that block and any further placeholders stay literal. The template's system
    message (or `system_message`) is applied to every prompt.
    """
    if isinstance(questions, str) or not all(isinstance(q, str) for q in questions):
        raise ValueError("questions must be a list of strings")
    if not questions:
        raise ValueError("questions is empty; batch prompts need at least one question")
    has_pixels, patches = _resolve_pixels(num_patches_list, has_pixels)
    if has_pixels and len(patches) != len(questions):
        raise ValueError(
            f"num_patches_list has {len(patches)} entries but there are {len(questions)} questions; "
            "give one tile count per question"
        )
    template = get_template(template_name)
    prompts = []
    for index, question in enumerate(questions):
        if has_pixels and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        prompt = render(template, system_message, [(template.user_tag, question), (template.assistant_tag, None)])
        if has_pixels:
            prompt = expand_image_placeholders(prompt, [patches[index]], num_image_token)
        prompts.append(prompt)
    return prompts
