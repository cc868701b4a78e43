"""`internvl` command line: each verb is a plain function; user errors print one line, never a traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, OSError)


class PrintStreamer:
    """Prints answer text as tokens arrive (the `put`/`end` protocol of transformers' streamers).

    Decodes the whole answer so far and prints the new suffix, holding back an incomplete UTF-8 character
    and everything from the template's end-of-turn text on.
    """

    def __init__(self, tokenizer, stop_text: str, out=None):
        self.tokenizer, self.stop_text, self.out = tokenizer, stop_text, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0
        self.started = False

    def put(self, value) -> None:
        if not self.started:  # the first call carries the (empty) prompt
            self.started = True
            return
        from internvl.tokenizer import decode_keep_grounding

        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        text = decode_keep_grounding(self.tokenizer, self.ids).split(self.stop_text)[0]
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


# ------------------------------------------------------------------------------------------------ chat
def _split_model_and_prompt(words: list[str]) -> tuple[str | None, str | None]:
    """`[MODEL] [PROMPT]`: with two or more words the first is the model; a single word is the model only when
    it is an existing directory, otherwise it is the prompt."""
    if not words:
        return None, None
    if len(words) == 1:
        return (words[0], None) if Path(words[0]).is_dir() else (None, words[0])
    return words[0], " ".join(words[1:])


def _load_media(args, cfg) -> tuple[object, list[int], str]:
    """-> (pixel_values or None, num_patches_list, prompt prefix with the <image> placeholders)."""
    import torch

    from internvl.preprocessing.image import load_image
    from internvl.preprocessing.video import load_video, video_prompt_prefix

    tiles, patches, prefix = [], [], ""
    max_tiles = args.max_tiles if args.max_tiles is not None else cfg.max_dynamic_patch
    if args.max_image_tokens is not None:  # video frames are one tile each and come off the top
        from internvl.preprocessing.budget import max_tiles_for_budget

        frames, images, per_tile = (args.num_frames if args.video else 0), len(args.image or []), cfg.num_image_token
        left = args.max_image_tokens - frames * per_tile
        if left < images * per_tile:
            raise ValueError(f"--max-image-tokens {args.max_image_tokens} is smaller than one tile per image and "
                             f"video frame: ({images} image(s) + {frames} frame(s)) x {per_tile} tokens = "
                             f"{(frames + images) * per_tile}")
        max_tiles = max_tiles_for_budget(left, per_tile, cfg.use_thumbnail, max_tiles, images)
    size = cfg.image_size
    for i, path in enumerate(args.image or []):
        px = load_image(path, input_size=size, max_num=max_tiles if cfg.dynamic_image_size else 1,
                        use_thumbnail=cfg.use_thumbnail, exif_transpose=not args.no_exif)
        tiles.append(px)
        patches.append(px.shape[0])
        if len(args.image) > 1:
            prefix += f"Image-{i + 1}: <image>\n"
    if args.image and len(args.image) == 1:
        prefix = "<image>\n"
    if args.video:
        px, frames = load_video(args.video, input_size=size, max_num=1, num_segments=args.num_frames)
        tiles.append(px)
        patches += frames
        prefix += video_prompt_prefix(len(frames))
    if not tiles:
        return None, [], ""
    return torch.cat(tiles), patches, prefix


def chat(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="internvl chat",
        description="Chat with an InternVL model about images and videos. With a PROMPT: answer once and exit; "
        "without: an interactive multi-turn session (commands: /reset, /exit).",
    )
    p.add_argument("words", nargs="*", metavar="[MODEL] [PROMPT]",
                   help="checkpoint directory or hub id (default: the shipped demo model), then the prompt; a "
                   "single word is taken as MODEL only when it is an existing directory")
    p.add_argument("--model", help="checkpoint directory or hub id (alternative to the positional MODEL)")
    p.add_argument("--image", action="append", metavar="PATH", help="image file or URL; repeat for several images")
    p.add_argument("--video", metavar="PATH", help="video file (frames sampled as in the model cards)")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled from --video (default 8)")
    p.add_argument("--max-tiles", type=int, default=None,
                   help="maximum 448px tiles per image (default: the model's max_dynamic_patch)")
    p.add_argument("--max-image-tokens", type=int, default=None, metavar="N",
                   help="image token budget of the prompt: each image gets as many tiles as fit (and the context)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit in tokens (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold when sampling")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--system", default=None, help="system message (default: the template's)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--no-exif", action="store_true", help="ignore EXIF orientation (exact reference behaviour)")
    args = p.parse_intermixed_args(argv)  # flags may stand between MODEL and PROMPT words
    model_arg, prompt = _split_model_and_prompt(args.words)
    model_arg = args.model or model_arg
    if args.max_tiles is not None and args.max_tiles < 1:
        p.error("--max-tiles must be >= 1")
    if args.num_frames < 1:
        p.error("--num-frames must be >= 1")
    if args.max_image_tokens is not None and args.max_image_tokens < 1:
        p.error("--max-image-tokens must be >= 1")

    import torch

    from internvl import InternVLChatModel, load_tokenizer
    from internvl.demo.model import resolve_default_model
    from internvl.model.fast import optimize_for_inference

    path = resolve_default_model(model_arg)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = optimize_for_inference(InternVLChatModel.from_pretrained(path, torch_dtype=args.dtype, device=device))
    if args.system is not None:
        model.system_message = args.system
    from internvl.checkpoint.hub import resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(path))
    pixel_values, patches, prefix = _load_media(args, model.config)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
               temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p, seed=args.seed,
               max_image_tokens=args.max_image_tokens)

    def ask(question: str, history):
        streamer = PrintStreamer(tokenizer, model.conv_template.end_of_turn)
        q = prefix + question if history is None else question
        return model.chat(tokenizer, pixel_values, q, dict(gen, streamer=streamer), history=history,
                          return_history=True, num_patches_list=patches or None)

    if prompt is not None:
        ask(prompt, None)
        return 0
    history = None
    print("internvl chat: type a question; /reset starts over, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = None
            continue
        if line:
            try:
                _, history = ask(line, history)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ dispatch
def _verbs():
    from internvl.checkpoint.convert import main as convert

    verbs = {"chat": chat, "convert": convert}
    try:
        from internvl.serve.runner import main as serve

        verbs["serve"] = serve
    except ImportError:  # server extras (fastapi, uvicorn) not installed
        pass
    try:
        from internvl.training.trainer import main as train
        from internvl.training.lora import main_merge as merge_lora

        verbs.update({"train": train, "merge-lora": merge_lora})
    except ImportError:  # training extras (peft) not installed
        pass
    return verbs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbs = _verbs()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: internvl {" + ",".join(verbs) + "} ...\n\n"
              "  chat        chat about images/videos (default model: the shipped demo model)\n"
              "  serve       OpenAI-compatible HTTP server (default model: the shipped demo model)\n"
              "  convert     convert a checkpoint between the original and transformers-native layouts\n"
              "  train       fine-tune (SFT, LoRA) from a YAML config\n"
              "  merge-lora  merge LoRA adapters into the base weights\n\n"
              "Run `internvl VERB --help` for a verb's flags.")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in verbs:
        print(f"internvl: unknown command {verb!r}; choose from: {', '.join(verbs)}", file=sys.stderr)
        return 2
    try:
        return int(verbs[verb](rest) or 0)
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as e:
        print(f"internvl {verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
