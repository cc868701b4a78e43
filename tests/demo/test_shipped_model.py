"""The shipped demo model: present, small, loadable by default, and the model-card example runs on it."""

import subprocess
import sys
from pathlib import Path

from internvl import InternVLChatModel, load_image, load_tokenizer
from internvl.demo.model import DEMO_MODEL_DIR, resolve_default_model

ROOT = Path(__file__).resolve().parents[2]


def test_demo_model_is_shipped_small_and_in_the_original_layout():
    files = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"} <= files
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir())
    assert size <= 25 * 2**20, f"demo model is {size / 2**20:.1f} MiB; the budget is 25 MB"
    import json

    cfg = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLChatModel"] and cfg["template"] == "internvl2_5"


def test_none_resolves_to_the_demo_model_and_it_answers_in_the_trained_format():
    assert resolve_default_model(None) == DEMO_MODEL_DIR
    model = InternVLChatModel.from_pretrained(None).eval()
    tok = load_tokenizer(None)  # the README's quick start passes the same `path` (None) to both
    assert tok.get_vocab() == load_tokenizer(DEMO_MODEL_DIR).get_vocab()
    assert len(tok) <= model.config.llm.vocab_size
    size = model.config.image_size
    assert model.config.max_dynamic_patch == 1  # trained on single tiles, so that is what it tiles to by default
    px = load_image(ROOT / "examples" / "media" / "scene1.png", input_size=size, max_num=model.config.max_dynamic_patch)
    assert px.shape == (1, 3, size, size)  # one tile, no thumbnail
    answer = model.chat(tok, px, "What color is the triangle?", dict(max_new_tokens=16, do_sample=False))
    # the training data answers every question with a short sentence ending in a period
    assert answer.endswith(".") and 1 < len(answer) < 40


def test_model_card_example_runs_unchanged_on_the_demo_model():
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "model_card.py")], capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("Assistant:") == 13  # every snippet of the cards produced an answer
