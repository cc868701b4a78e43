"""`internvl` CLI: one-shot chat on a tiny checkpoint, interactive session, and clean errors."""

import dataclasses
import subprocess
import sys

import pytest
from PIL import Image

from helpers_tokenizers import make_bpe_tokenizer_dir
from internvl.checkpoint.saver import save_pretrained
from internvl.cli import main
from internvl.model.internvl import InternVLModel
from internvl.tokenizer import load_tokenizer
from tiny import randomize_, tiny_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tok = load_tokenizer(make_bpe_tokenizer_dir(d / "tok"))
    cfg = tiny_config()
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=len(tok)), image_token_id=None, max_dynamic_patch=4)
    save_pretrained(randomize_(InternVLModel(cfg), seed=3), d / "model")
    make_bpe_tokenizer_dir(d / "model")
    img = d / "img.png"
    Image.new("RGB", (120, 60), (200, 30, 30)).save(img)
    return d / "model", img


def test_one_shot_chat_streams_an_answer(ckpt, capsys):
    model, img = ckpt
    code = main(["chat", str(model), "--image", str(img), "--max-new-tokens", "6", "What", "is", "this?"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.endswith("\n") and len(out.strip()) > 0


def test_interactive_session_keeps_history(ckpt, monkeypatch, capsys):
    model, img = ckpt
    lines = iter(["first question", "second question", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    asked = []
    import internvl.api.model as m

    real = m.InternVLChatModel.chat

    def spy(self, tokenizer, pixel_values, question, generation_config=None, history=None, **kw):
        asked.append((question, None if history is None else len(history)))
        return real(self, tokenizer, pixel_values, question, generation_config, history, **kw)

    monkeypatch.setattr(m.InternVLChatModel, "chat", spy)
    assert main(["chat", str(model), "--image", str(img), "--max-new-tokens", "3"]) == 0
    assert asked == [("<image>\nfirst question", None), ("second question", 1)]


@pytest.mark.parametrize("bad, message", [
    ("corrupt", "cannot decode image"),
    ("missing", "not found"),
])
def test_bad_image_is_a_one_line_error(ckpt, tmp_path, capsys, bad, message):
    model, _ = ckpt
    path = tmp_path / "x.png"
    if bad == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    code = main(["chat", str(model), "--image", str(path), "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert message in err.lower()


def test_missing_model_dir_and_bad_dtype(ckpt, tmp_path, capsys):
    model, _ = ckpt
    assert main(["chat", str(tmp_path / "nope"), "hi there"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["chat", str(model), "--dtype", "float33", "hi"]) == 2
    assert "float33" in capsys.readouterr().err


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "internvl.cli", "chat", "--help"], capture_output=True, text=True).stdout
    for flag in ("--image", "--video", "--max-tiles", "--max-new-tokens", "--temperature", "--dtype", "--device"):
        assert flag in out


def test_unknown_verb(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
