"""`InternVLChatModel`: the network plus the model-card API (`from_pretrained`, `chat`, `batch_chat`, `generate`).

Drop-in for the remote-code class of the OpenGVLab checkpoints: the model-card snippets run with only their
import and loading lines changed (see examples/model_card.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from internvl.api import chat as chat_api
from internvl.config import InternVLConfig
from internvl.generation.generate import generate as reference_generate
from internvl.generation.sampling import GenerationConfig
from internvl.model.internvl import InternVLModel
from internvl.templates.conversation import get_template
from internvl.templates.tokens import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

# from_pretrained keywords that model-card code passes for the remote-code class; they change nothing here.
_ACCEPTED_NOOP_KWARGS = {"trust_remote_code", "low_cpu_mem_usage", "use_flash_attn", "load_in_8bit", "device_map"}
_TOKEN_DEFAULTS = {"IMG_START_TOKEN": IMG_START_TOKEN, "IMG_END_TOKEN": IMG_END_TOKEN, "IMG_CONTEXT_TOKEN": IMG_CONTEXT_TOKEN}


def _check_token_kwargs(kwargs: dict) -> None:
    for k, v in kwargs.items():
        if k not in _TOKEN_DEFAULTS:
            raise TypeError(f"unexpected keyword argument {k!r}")
        if v != _TOKEN_DEFAULTS[k]:
            raise ValueError(f"{k}={v!r} is not supported; InternVL checkpoints use {_TOKEN_DEFAULTS[k]!r}")


class InternVLChatModel(InternVLModel):
    def __init__(self, config: InternVLConfig):
        super().__init__(config)
        # None -> the template default (S2/S3); assign a string to change it, as with the reference class
        self.system_message: str | None = config.system_message
        self.conv_template = get_template(config.template)

    # ------------------------------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, torch_dtype=None, device=None, **kwargs):
        """Load a checkpoint directory (either layout) or a hub id. None = the shipped demo model.

        torch_dtype: None picks float32 on CPU (bf16 matmuls are 6-100x slower on CPUs without native bf16) and
        the checkpoint's dtype on CUDA. `dtype=` is accepted as an alias.
        """
        from internvl.checkpoint.loader import load_model
        from internvl.demo.model import resolve_default_model

        unknown = set(kwargs) - _ACCEPTED_NOOP_KWARGS - {"dtype"}
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)} for from_pretrained")
        torch_dtype = kwargs.get("dtype", torch_dtype)
        path = resolve_default_model(path)
        device_map = kwargs.get("device_map")
        if device is None and isinstance(device_map, str) and device_map != "auto":
            device = device_map  # device_map="cuda:0" style; "auto" placement comes with the engine
        device = device or "cpu"
        return load_model(path, dtype=torch_dtype, device=device, model_cls=cls)

    def save_pretrained(self, out_dir: str | Path, **kwargs) -> None:
        from internvl.checkpoint.saver import save_pretrained

        save_pretrained(self, out_dir, **kwargs)

    # ------------------------------------------------------------------------------------------ generation
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        generation_config=None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Reference `generate`: returns only the new tokens (B, n) (INTERNVL.md §8.3)."""
        if input_ids is None:
            raise ValueError("generate needs input_ids (the tokenized prompt with <IMG_CONTEXT> slots)")
        streamer = generate_kwargs.pop("streamer", None)
        generate_kwargs.pop("output_hidden_states", None)
        cfg = GenerationConfig.from_any(generation_config, **generate_kwargs)
        return reference_generate(self, input_ids, attention_mask, pixel_values, visual_features, cfg, streamer)

    def chat(self, tokenizer, pixel_values, question, generation_config=None, history=None, return_history=False,
             num_patches_list=None, verbose=False, engine=True, max_image_tokens=None, **token_kwargs):
        """Model-card `chat` (INTERNVL.md §8.1); served by the paged engine unless engine=False.
        pixel_values may also be images, tiled to fit max_image_tokens (see `internvl.api.chat.chat`)."""
        _check_token_kwargs(token_kwargs)
        return chat_api.chat(self, tokenizer, pixel_values, question, generation_config, history, return_history,
                             num_patches_list, verbose, engine, max_image_tokens=max_image_tokens)

    def batch_chat(self, tokenizer, pixel_values, questions, generation_config=None, num_patches_list=None,
                   history=None, return_history=False, verbose=False, image_counts=None, engine=True,
                   max_image_tokens=None, **token_kwargs):
        """Model-card `batch_chat` (§8.4), plus one optional history per question; engine=False: reference."""
        _check_token_kwargs(token_kwargs)
        return chat_api.batch_chat(self, tokenizer, pixel_values, questions, generation_config, num_patches_list,
                                   history, return_history, verbose, image_counts, engine,
                                   max_image_tokens=max_image_tokens)
