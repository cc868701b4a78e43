"""The InternVL model-card quick start, run on this package.

Compared with the model cards (InternVL2-1B, InternVL3-1B, InternVL-Chat-V1-5), only the import and loading lines
differ: `InternVLChatModel.from_pretrained` instead of `AutoModel.from_pretrained(..., trust_remote_code=True)`,
`load_tokenizer` instead of `AutoTokenizer`, and the cards' `load_image` / `load_video` helpers come from the
package. Everything after loading is the cards' code.

    python examples/model_card.py                    # the shipped demo model and example media
    python examples/model_card.py /path/to/InternVL3-1B --image a.jpg --image b.jpg --video clip.mp4
"""

import argparse
from pathlib import Path
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from internvl import InternVLChatModel, load_image, load_tokenizer, load_video
from internvl.demo.model import resolve_default_model

HERE = Path(__file__).resolve().parent
ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default=None, help="checkpoint directory or hub id (default: the demo model)")
ap.add_argument("--image", action="append", help="two images (default: examples/images/*.png)")
ap.add_argument("--video", default=str(HERE / "media" / "shapes.mp4"))
args = ap.parse_args()
images = args.image or [str(HERE / "media" / "scene1.png"), str(HERE / "media" / "scene2.png")]

# --- loading: the only lines that differ from the model card ------------------------------------------------------
path = resolve_default_model(args.model)
model = InternVLChatModel.from_pretrained(path, low_cpu_mem_usage=True, use_flash_attn=True).eval()
tokenizer = load_tokenizer(path)
if torch.cuda.is_available():
    model = model.cuda()
device = next(model.parameters()).device
dtype = next(model.parameters()).dtype
size = model.config.image_size  # 448 for the released models; the demo model uses smaller tiles
max_num = model.config.max_dynamic_patch

# --- the model card -------------------------------------------------------------------------------------------------
# set the max number of tiles in `max_num`
pixel_values = load_image(images[0], input_size=size, max_num=max_num).to(dtype).to(device)
generation_config = dict(max_new_tokens=1024, do_sample=False)

# pure-text conversation (纯文本对话)
question = "Hello, who are you?"
response, history = model.chat(tokenizer, None, question, generation_config, history=None, return_history=True)
print(f"User: {question}\nAssistant: {response}")

question = "Can you tell me a story?"
response, history = model.chat(tokenizer, None, question, generation_config, history=history, return_history=True)
print(f"User: {question}\nAssistant: {response}")

# single-image single-round conversation (单图单轮对话)
question = "<image>\nPlease describe the image shortly."
response = model.chat(tokenizer, pixel_values, question, generation_config)
print(f"User: {question}\nAssistant: {response}")

# single-image multi-round conversation (单图多轮对话)
question = "<image>\nPlease describe the image in detail."
response, history = model.chat(tokenizer, pixel_values, question, generation_config, history=None, return_history=True)
print(f"User: {question}\nAssistant: {response}")

question = "Please write a poem according to the image."
response, history = model.chat(tokenizer, pixel_values, question, generation_config, history=history, return_history=True)
print(f"User: {question}\nAssistant: {response}")

# multi-image multi-round conversation, combined images (多图多轮对话，拼接图像)
pixel_values1 = load_image(images[0], input_size=size, max_num=max_num).to(dtype).to(device)
pixel_values2 = load_image(images[1], input_size=size, max_num=max_num).to(dtype).to(device)
pixel_values = torch.cat((pixel_values1, pixel_values2), dim=0)

question = "<image>\nDescribe the two images in detail."
response, history = model.chat(tokenizer, pixel_values, question, generation_config, history=None, return_history=True)
print(f"User: {question}\nAssistant: {response}")

question = "What are the similarities and differences between these two images."
response, history = model.chat(tokenizer, pixel_values, question, generation_config, history=history, return_history=True)
print(f"User: {question}\nAssistant: {response}")

# multi-image multi-round conversation, separate images (多图多轮对话，独立图像)
num_patches_list = [pixel_values1.size(0), pixel_values2.size(0)]
question = "Image-1: <image>\nImage-2: <image>\nDescribe the two images in detail."
response, history = model.chat(tokenizer, pixel_values, question, generation_config,
                               num_patches_list=num_patches_list, history=None, return_history=True)
print(f"User: {question}\nAssistant: {response}")

question = "What are the similarities and differences between these two images."
response, history = model.chat(tokenizer, pixel_values, question, generation_config,
                               num_patches_list=num_patches_list, history=history, return_history=True)
print(f"User: {question}\nAssistant: {response}")

# batch inference, single image per sample (单图批处理)
questions = ["<image>\nDescribe the image in detail."] * len(num_patches_list)
responses = model.batch_chat(tokenizer, pixel_values, num_patches_list=num_patches_list, questions=questions,
                             generation_config=generation_config)
for question, response in zip(questions, responses):
    print(f"User: {question}\nAssistant: {response}")

# video multi-round conversation (视频多轮对话)
pixel_values, num_patches_list = load_video(args.video, input_size=size, num_segments=8, max_num=1)
pixel_values = pixel_values.to(dtype).to(device)
video_prefix = "".join([f"Frame{i + 1}: <image>\n" for i in range(len(num_patches_list))])
question = video_prefix + "What is shown in this video?"
response, history = model.chat(tokenizer, pixel_values, question, generation_config,
                               num_patches_list=num_patches_list, history=None, return_history=True)
print(f"User: {question}\nAssistant: {response}")

question = "Describe this video in detail."
response, history = model.chat(tokenizer, pixel_values, question, generation_config,
                               num_patches_list=num_patches_list, history=history, return_history=True)
print(f"User: {question}\nAssistant: {response}")

# streaming output (流式输出)
pixel_values = load_image(images[0], input_size=size, max_num=max_num).to(dtype).to(device)
streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
generation_config = dict(max_new_tokens=1024, do_sample=False, streamer=streamer)
question = "<image>\nPlease describe the image shortly."
thread = Thread(target=model.chat, kwargs=dict(tokenizer=tokenizer, pixel_values=pixel_values, question=question,
                                               history=None, return_history=False, generation_config=generation_config))
thread.start()
generated_text = ""
for new_text in streamer:
    if new_text == model.conv_template.sep:
        break
    generated_text += new_text
    print(new_text, end="", flush=True)
thread.join()
print()
