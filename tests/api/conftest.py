"""The tiny random chat model and BPE tokenizer the API tests share (one of each per test module)."""

from __future__ import annotations

import dataclasses

import pytest

from helpers_tokenizers import make_bpe_tokenizer_dir
from internvl import InternVLChatModel, load_tokenizer
from tiny import randomize_, tiny_config


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_bpe_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(tok):
    cfg = tiny_config()
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=len(tok)), image_token_id=None)
    return randomize_(InternVLChatModel(cfg), seed=5, std=0.3).eval()
