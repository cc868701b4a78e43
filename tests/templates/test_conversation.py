"""Templates and prompt building against the exact strings of INTERNVL.md §7.2-§7.4 and the rules of §8.1, §8.2, §8.4.

Expected strings are written out here from the spec text, never produced by the code under test.
"""

import dataclasses

import pytest

from internvl.templates import (
    INTERNVL_TOKENS,
    LEGACY_SYSTEM_MESSAGE_HERMES2,
    LEGACY_SYSTEM_MESSAGE_INTERNLM2,
    LEGACY_SYSTEM_MESSAGE_PHI3,
    SYSTEM_MESSAGE_S2,
    SYSTEM_MESSAGE_S3,
    TEMPLATES,
    build_batch_prompts,
    build_chat_prompt,
    default_system_message,
    get_template,
    image_block,
    render,
)

# §7.3, copied character for character from the spec.
S2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
S3 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def img(tiles: int) -> str:
    """§7.4: IMG = <img> + <IMG_CONTEXT> x (256 T) + </img>."""
    return "<img>" + "<IMG_CONTEXT>" * (256 * tiles) + "</img>"


# ------------------------------------------------------------------------------------------------- tokens


def test_internvl_tokens_in_spec_order():
    assert INTERNVL_TOKENS == (
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


def test_image_block_counts():
    assert image_block(1) == "<img>" + "<IMG_CONTEXT>" * 256 + "</img>"
    assert image_block(3, num_image_token=2) == "<img>" + "<IMG_CONTEXT>" * 6 + "</img>"


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_image_block_rejects_non_positive_ints(bad):
    with pytest.raises(ValueError, match="num_tiles must be a positive integer"):
        image_block(bad)


# ------------------------------------------------------------------------------------------------- system messages


def test_s2_is_character_exact():
    assert SYSTEM_MESSAGE_S2 == S2
    assert len(SYSTEM_MESSAGE_S2) == 59
    comma_positions = [i for i, c in enumerate(SYSTEM_MESSAGE_S2) if c in ",\uff0c"]
    first, second = comma_positions
    assert SYSTEM_MESSAGE_S2[first] == "\uff0c"  # full-width comma after 大模型
    assert SYSTEM_MESSAGE_S2[second - len("InternVL") : second + 2] == "InternVL, "  # ASCII comma + space
    assert SYSTEM_MESSAGE_S2[-1] == "\u3002"


def test_s3_is_character_exact():
    assert SYSTEM_MESSAGE_S3 == S3
    assert len(SYSTEM_MESSAGE_S3) == 58
    assert SYSTEM_MESSAGE_S3.count("\u00b7") == 1
    assert SYSTEM_MESSAGE_S3.count("\uff0c") == 2
    assert SYSTEM_MESSAGE_S3.count("\u3001") == 1
    assert "," not in SYSTEM_MESSAGE_S3
    assert SYSTEM_MESSAGE_S3[-1] == "\u3002"


def test_default_system_messages():
    assert default_system_message("internvl2_5") == S3
    for name in ("Hermes-2", "internlm2-chat", "phi3-chat"):
        assert default_system_message(name) == S2


def test_legacy_v1_5_system_messages():
    assert LEGACY_SYSTEM_MESSAGE_INTERNLM2 == "You are an AI assistant whose name is InternLM (书生\u00b7浦语)."
    assert LEGACY_SYSTEM_MESSAGE_PHI3 == "You are an AI assistant whose name is Phi-3."
    assert LEGACY_SYSTEM_MESSAGE_HERMES2 == "Answer the questions."
    assert default_system_message("internlm2-chat", legacy_v1_5=True) == LEGACY_SYSTEM_MESSAGE_INTERNLM2
    assert default_system_message("phi3-chat", legacy_v1_5=True) == LEGACY_SYSTEM_MESSAGE_PHI3
    assert default_system_message("Hermes-2", legacy_v1_5=True) == LEGACY_SYSTEM_MESSAGE_HERMES2
    with pytest.raises(ValueError, match="internvl2_5.*no V1-5-era system message"):
        default_system_message("internvl2_5", legacy_v1_5=True)


# ------------------------------------------------------------------------------------------------- template table


def test_template_table_matches_spec_7_2():
    im_system = "<|im_start|>system\n{system_message}"
    expected = {
        "Hermes-2": (im_system, "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>", S2),
        "internlm2-chat": (im_system, "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>", S2),
        "phi3-chat": ("<|system|>\n{system_message}", "<|user|>\n", "<|assistant|>\n", "<|end|>", S2),
        "internvl2_5": (im_system, "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n", S3),
    }
    assert set(TEMPLATES) == set(expected)
    for name, fields in expected.items():
        t = get_template(name)
        assert t.name == name
        assert (t.system_template, t.user_tag, t.assistant_tag, t.sep, t.default_system_message) == fields


def test_end_of_turn_is_stripped_separator():
    assert get_template("internvl2_5").end_of_turn == "<|im_end|>"
    assert get_template("Hermes-2").end_of_turn == "<|im_end|>"
    assert get_template("internlm2-chat").end_of_turn == "<|im_end|>"
    assert get_template("phi3-chat").end_of_turn == "<|end|>"


def test_templates_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_template("internvl2_5").sep = "x"


def test_unknown_template_lists_supported_names():
    with pytest.raises(ValueError, match="'vicuna_v1'.*Hermes-2, internlm2-chat, internvl2_5, phi3-chat"):
        get_template("vicuna_v1")


# ------------------------------------------------------------------------------------------------- §7.4 single turn

QUESTION = "What is shown in this image?"


@pytest.mark.parametrize("tiles", [1, 2])
def test_internvl2_5_single_turn(tiles):
    prompt, stored = build_chat_prompt("internvl2_5", QUESTION, num_patches_list=[tiles])
    assert prompt == (
        f"<|im_start|>system\n{S3}<|im_end|>\n<|im_start|>user\n{img(tiles)}\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert stored == "<image>\n" + QUESTION


@pytest.mark.parametrize("name", ["Hermes-2", "internlm2-chat"])
def test_hermes_and_internlm2_single_turn(name):
    prompt, _ = build_chat_prompt(name, QUESTION, num_patches_list=[2])
    assert prompt == (
        f"<|im_start|>system\n{S2}<|im_end|><|im_start|>user\n{img(2)}\n{QUESTION}<|im_end|><|im_start|>assistant\n"
    )


def test_phi3_single_turn():
    prompt, _ = build_chat_prompt("phi3-chat", QUESTION, num_patches_list=[1])
    assert prompt == f"<|system|>\n{S2}<|end|><|user|>\n{img(1)}\n{QUESTION}<|end|><|assistant|>\n"


def test_legacy_system_message_is_used_when_passed():
    legacy = default_system_message("internlm2-chat", legacy_v1_5=True)
    prompt, _ = build_chat_prompt("internlm2-chat", "Hi", system_message=legacy)
    assert prompt == (
        "<|im_start|>system\nYou are an AI assistant whose name is InternLM (书生\u00b7浦语).<|im_end|>"
        "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    )


def test_empty_system_message_renders_empty_block():
    prompt, _ = build_chat_prompt("internvl2_5", "Hi", system_message="")
    assert prompt == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    prompt, _ = build_chat_prompt("phi3-chat", "Hi", system_message="")
    assert prompt == "<|system|>\n<|end|><|user|>\nHi<|end|><|assistant|>\n"


def test_text_only_has_no_placeholder_but_keeps_system_block():
    prompt, stored = build_chat_prompt("Hermes-2", "Tell me a joke.")
    assert prompt == (
        f"<|im_start|>system\n{S2}<|im_end|><|im_start|>user\nTell me a joke.<|im_end|><|im_start|>assistant\n"
    )
    assert stored == "Tell me a joke."
    assert "<image>" not in prompt and "<img>" not in prompt


def test_explicit_placeholder_is_not_prefixed_again():
    prompt, stored = build_chat_prompt("internvl2_5", "Look: <image> what?", num_patches_list=[1])
    assert stored == "Look: <image> what?"
    assert f"<|im_start|>user\nLook: {img(1)} what?<|im_end|>\n" in prompt


# ------------------------------------------------------------------------------------------------- multi-turn


def test_internvl2_5_multi_turn():
    history = [("<image>\nWhat is it?", "A cat.")]
    prompt, stored = build_chat_prompt("internvl2_5", "What colour?", history=history, num_patches_list=[1])
    assert stored == "What colour?"  # no auto prefix once history is given
    assert prompt == (
        f"<|im_start|>system\n{S3}<|im_end|>\n"
        f"<|im_start|>user\n{img(1)}\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nWhat colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_hermes_multi_turn_has_no_newline_between_turns():
    history = [("Hi", "Hello!"), ("How are you?", "Fine.")]
    prompt, _ = build_chat_prompt("Hermes-2", "Bye", history=history)
    assert prompt == (
        f"<|im_start|>system\n{S2}<|im_end|>"
        "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello!<|im_end|>"
        "<|im_start|>user\nHow are you?<|im_end|><|im_start|>assistant\nFine.<|im_end|>"
        "<|im_start|>user\nBye<|im_end|><|im_start|>assistant\n"
    )


def test_empty_history_disables_auto_prefix():
    # §8.1 step 1: "Not done when history is given (even an empty list)"; the image then has no placeholder.
    with pytest.raises(ValueError, match="prompt has 0 <image> placeholders but 1 images were given"):
        build_chat_prompt("internvl2_5", "What is it?", history=[], num_patches_list=[1])


def test_placeholder_in_later_question_with_history():
    # The first remaining <image> anywhere wins: here the one in the new question (history has none).
    prompt, _ = build_chat_prompt(
        "internvl2_5", "<image>\nAnd this?", history=[("Hi", "Hello")], num_patches_list=[2]
    )
    assert f"<|im_start|>user\n{img(2)}\nAnd this?<|im_end|>\n" in prompt
    assert prompt.startswith(f"<|im_start|>system\n{S3}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_history_placeholder_is_replaced_before_the_new_one():
    # Model-card usage: the same pixels every turn keep the image attached to the first turn; a second
    # placeholder in the new question then stays literal.
    history = [("<image>\nDescribe.", "A dog.")]
    prompt, _ = build_chat_prompt("internvl2_5", "<image>\nAgain?", history=history, num_patches_list=[1])
    assert f"<|im_start|>user\n{img(1)}\nDescribe.<|im_end|>\n" in prompt
    assert "<|im_start|>user\n<image>\nAgain?<|im_end|>\n" in prompt


# ------------------------------------------------------------------------------------------------- multi-image §8.2


def test_combined_multi_image_is_one_block():
    prompt, _ = build_chat_prompt("internvl2_5", "Compare.", num_patches_list=[5])  # 2 images' tiles concatenated
    assert prompt.count("<img>") == 1 and prompt.count("<IMG_CONTEXT>") == 1280
    assert f"<|im_start|>user\n{img(5)}\nCompare.<|im_end|>\n" in prompt


def test_separate_multi_image_blocks_in_order():
    question = "Image-1: <image>\nImage-2: <image>\nWhat differs?"
    prompt, stored = build_chat_prompt("internvl2_5", question, num_patches_list=[2, 3])
    assert stored == question
    assert f"<|im_start|>user\nImage-1: {img(2)}\nImage-2: {img(3)}\nWhat differs?<|im_end|>\n" in prompt


def test_surplus_placeholders_stay_literal():
    prompt, _ = build_chat_prompt("Hermes-2", "A <image> B <image> C", num_patches_list=[1])
    assert f"<|im_start|>user\nA {img(1)} B <image> C<|im_end|>" in prompt


def test_too_few_placeholders_raise_with_counts():
    with pytest.raises(ValueError, match="prompt has 1 <image> placeholders but 3 images were given"):
        build_chat_prompt("internvl2_5", "Image-1: <image>\nWhat?", num_patches_list=[1, 1, 1])


def test_pixel_flags_must_agree():
    with pytest.raises(ValueError, match="has_pixels=True needs num_patches_list"):
        build_chat_prompt("internvl2_5", "Hi", has_pixels=True)
    with pytest.raises(ValueError, match="has_pixels=False"):
        build_chat_prompt("internvl2_5", "Hi", num_patches_list=[1], has_pixels=False)


def test_bad_history_entry_raises():
    with pytest.raises(ValueError, match="history entry 0 must be a \\(question, answer\\) pair"):
        build_chat_prompt("internvl2_5", "Hi", history=[("only question",)])


# ------------------------------------------------------------------------------------------------- render §7.1


def test_render_rule_bare_tag_for_none_and_empty():
    t = get_template("internvl2_5")
    text = render(t, "sys", [(t.user_tag, "q"), (t.assistant_tag, ""), (t.user_tag, None)])
    assert text == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\n"
    )


def test_render_none_system_message_uses_default():
    assert render("phi3-chat", None, []) == f"<|system|>\n{S2}<|end|>"


def test_render_rejects_unknown_role_tag():
    with pytest.raises(ValueError, match="role tag 'user'.*accepts"):
        render("internvl2_5", None, [("user", "hi")])


# ------------------------------------------------------------------------------------------------- batch §8.4


def test_batch_prompts_one_block_each():
    prompts = build_batch_prompts("internvl2_5", ["Describe.", "Count <image> items. <image>"], num_patches_list=[1, 2])
    assert prompts == [
        f"<|im_start|>system\n{S3}<|im_end|>\n<|im_start|>user\n{img(1)}\nDescribe.<|im_end|>\n<|im_start|>assistant\n",
        f"<|im_start|>system\n{S3}<|im_end|>\n<|im_start|>user\nCount {img(2)} items. <image><|im_end|>\n"
        "<|im_start|>assistant\n",
    ]


def test_batch_prompts_apply_system_message():
    prompts = build_batch_prompts("Hermes-2", ["a", "b"], system_message="Answer the questions.")
    assert prompts == [
        f"<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n"
        for q in ("a", "b")
    ]


def test_batch_prompts_need_one_count_per_question():
    with pytest.raises(ValueError, match="num_patches_list has 1 entries but there are 2 questions"):
        build_batch_prompts("internvl2_5", ["a", "b"], num_patches_list=[1])
    with pytest.raises(ValueError, match="questions must be a list of strings"):
        build_batch_prompts("internvl2_5", "a single string")
