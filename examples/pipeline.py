"""The LMDeploy-style pipeline on this package: one prompt, a batch, numbered images, OpenAI-style messages, a
multi-turn session and streaming. LMDeploy code ports by changing `from lmdeploy import ...` to `from internvl
import ...` (engine options are keywords of `pipeline()` instead of a backend config object).

    python examples/pipeline.py                      # the shipped demo model and example images
    python examples/pipeline.py /path/to/InternVL3-1B --image a.jpg --image b.jpg
"""

import argparse
from pathlib import Path

from internvl import IMAGE_TOKEN, GenerationConfig, pipeline

HERE = Path(__file__).resolve().parent
ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default=None, help="checkpoint directory or hub id (default: the demo model)")
ap.add_argument("--image", action="append", help="two images (default: examples/media/scene*.png)")
args = ap.parse_args()
img1, img2 = args.image or [str(HERE / "media" / "scene1.png"), str(HERE / "media" / "scene2.png")]

pipe = pipeline(args.model, max_batch_size=8)  # dtype, device, quantize, session_len, max_dynamic_patch, ...
gen = GenerationConfig(max_new_tokens=64)

# one prompt: (text, image); the image is a path, a PIL image, or an http(s)/data/file URL
response = pipe(("What color is the triangle?", img1), gen)
print(f"single image: {response.text!r} ({response.input_token_len} prompt tokens, "
      f"{response.generate_token_len} generated, finish_reason={response.finish_reason})")

# a batch: every prompt is submitted at once and decoded together (continuous batching)
questions = ["What color is the triangle?", "How many shapes are there?", "Where is the circle?"]
for q, r in zip(questions, pipe([(q, img2) for q in questions], gen)):
    print(f"batch: {q} -> {r.text!r}")

# several images, numbered as the model cards do; without IMAGE_TOKEN the same Image-N lines are added
prompt = f"Image-1: {IMAGE_TOKEN}\nImage-2: {IMAGE_TOKEN}\nWhich image has more shapes?"
print("two images:", pipe((prompt, [img1, img2]), gen).text)

# OpenAI-style messages, with a per-image tile limit
messages = [{"role": "user", "content": [
    {"type": "text", "text": "Describe the image."},
    {"type": "image_url", "image_url": {"url": img1, "max_dynamic_patch": 4}},
]}]
print("messages:", pipe(messages, gen).text)

# a multi-turn session: earlier turns (and their images) stay in the conversation, their KV is reused
session = pipe.chat(("What color is the triangle?", img1), gen_config=gen)
session = pipe.chat("How many shapes are there?", session, gen_config=gen)
for question, answer in session.history:
    print(f"session: {question if isinstance(question, str) else question[0]} -> {answer!r}")

# streaming: pieces of the answers as they are generated (.index says which prompt)
print("stream: ", end="")
for piece in pipe.stream_infer(("Describe the image.", img2), gen):
    print(piece.text, end="", flush=True)
print()
