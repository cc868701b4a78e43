"""A LoRA fine-tune of the demo model on a task it was never trained on, end to end, with its measurements.

    python -m internvl.demo.lora_task OUT_DIR [--model DIR] [--train 3000] [--eval 200] [--steps 900]

The new task inverts one the demo model knows: it was trained to say where a described object is ("Where is the red
circle?" -> "Top left."), never what is at a given place. Here it is asked "What color is the object at the top
left?" about scenes that have an object there (answers: one of the six colours, chance 1/6). The run:

1. writes the task's training conversations (InternVL format) and a held-out set of new scenes;
2. scores the base model on the held-out set (`internvl.demo.scoring` rules: exact match);
3. `internvl train` with LoRA on the LLM (rank 16, alpha 32; ViT and mlp1 frozen), adapters saved unmerged;
4. scores base + adapter (`training.lora.load_adapter`), then `internvl merge-lora` into a float32 checkpoint and
   scores that: the merged model must answer exactly what base + adapter answered, question by question.

`OUT_DIR/report.json` holds the three accuracies, the training time and the number of answers that differ between
the merged model and base + adapter.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from internvl.demo.scenes import POSITIONS, Scene, make_scene, render

KIND = "color_at"
QUESTION = "What color is the object at the {}?"


def ask_color_at(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """(question, answer, position) about a random occupied cell of the scene."""
    obj = rng.choice(scene.objects)
    return QUESTION.format(obj.position), obj.color.capitalize() + ".", obj.position


def write_task(out: str | Path, n_train: int, n_eval: int, seed: int = 0) -> Path:
    """Images, train.jsonl + meta.json (training format) and eval.jsonl (`demo.scoring` format); returns meta."""
    out = Path(out).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"internvl-demo/{seed}/lora-task")
    seen: set[Scene] = set()
    with (out / "train.jsonl").open("w", encoding="utf-8") as f:
        for i in range(n_train):
            scene = make_scene(rng)
            seen.add(scene)
            name = f"train{i:05d}.png"
            render(scene).save(out / "images" / name, compress_level=1)
            question, answer, _ = ask_color_at(scene, rng)
            f.write(json.dumps({"image": name, "width": scene.width, "height": scene.height, "conversations": [
                {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}) + "\n")
    with (out / "eval.jsonl").open("w", encoding="utf-8") as f:
        written = 0
        while written < n_eval:
            scene = make_scene(rng)
            if scene in seen:  # held-out images are never training images
                continue
            name = f"eval{written:05d}.png"
            render(scene).save(out / "images" / name, compress_level=1)
            question, answer, position = ask_color_at(scene, rng)
            f.write(json.dumps({"id": f"{KIND}-{written:05d}", "kind": KIND, "images": [f"images/{name}"],
                                "questions": [question], "answers": [answer],
                                "meta": {"position": position}}) + "\n")
            written += 1
    meta = out / "meta.json"
    meta.write_text(json.dumps({KIND: {"root": str(out / "images"), "annotation": str(out / "train.jsonl"),
                                       "data_augment": False, "repeat_time": 1, "length": n_train}}) + "\n")
    return meta


def answers_of(model, tokenizer, eval_path: Path) -> tuple[list[str], float]:
    """Greedy answers to every held-out question with the model-card `chat` API, and their accuracy."""
    import torch

    from internvl import load_image
    from internvl.demo.scoring import is_correct, load_eval

    records = load_eval(eval_path)
    cfg = model.config
    answers, correct = [], 0
    with torch.no_grad():
        for r in records:
            px = load_image(r["images"][0], input_size=cfg.image_size, max_num=cfg.max_dynamic_patch)
            a = model.chat(tokenizer, px, r["questions"][0], dict(max_new_tokens=16, do_sample=False))
            answers.append(a)
            correct += is_correct(r, [a])
    return answers, correct / len(records)


def lora_config(base: Path, meta: Path, out: Path, steps: int) -> dict:
    return {"model": str(base), "meta_path": str(meta), "output_dir": str(out), "use_llm_lora": 16,
            "freeze_vision": True, "freeze_projector": True, "merge_lora": False, "lr": 1e-3,
            "warmup_steps": max(5, steps // 20), "max_steps": steps, "per_device_batch_size": 16,
            "weight_decay": 0.0, "save_steps": 0, "log_steps": 25, "seed": 0, "max_seq_length": 512,
            "lora_dropout": 0.0}


def run(out: str | Path, base: str | Path | None = None, n_train: int = 3000, n_eval: int = 200,
        steps: int = 900) -> dict:
    import torch

    from internvl import InternVLChatModel, load_tokenizer
    from internvl.demo.model import resolve_default_model
    from internvl.training.config import TrainConfig
    from internvl.training.lora import load_adapter, merge_lora_checkpoint
    from internvl.training.trainer import train

    out = Path(out)
    base = Path(resolve_default_model(base))
    meta = write_task(out / "data", n_train, n_eval)
    eval_path = out / "data" / "eval.jsonl"
    tokenizer = load_tokenizer(base)
    base_answers, base_acc = answers_of(InternVLChatModel.from_pretrained(base).eval(), tokenizer, eval_path)

    t = time.perf_counter()
    adapter_dir = Path(train(TrainConfig(**lora_config(base, meta, out / "run", steps))))
    minutes = (time.perf_counter() - t) / 60

    with_adapter = InternVLChatModel.from_pretrained(adapter_dir, torch_dtype=torch.float32)
    load_adapter(with_adapter, adapter_dir)
    adapter_answers, adapter_acc = answers_of(with_adapter.eval(), tokenizer, eval_path)
    merged_dir = merge_lora_checkpoint(adapter_dir, out / "merged", dtype="fp32", overwrite=True)
    merged_answers, merged_acc = answers_of(InternVLChatModel.from_pretrained(merged_dir).eval(), tokenizer,
                                            eval_path)
    report = {
        "task": QUESTION.format("<position>"), "positions": list(POSITIONS), "n_train": n_train, "n_eval": n_eval,
        "steps": steps, "batch": 16, "train_minutes": round(minutes, 2), "lora": "LLM rank 16, alpha 32",
        "chance": 1 / 6, "base_accuracy": base_acc, "adapter_accuracy": adapter_acc, "merged_accuracy": merged_acc,
        "merged_vs_adapter_differences": sum(a != b for a, b in zip(adapter_answers, merged_answers)),
        "base_answer_examples": base_answers[:5], "adapter_answer_examples": adapter_answers[:5],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m internvl.demo.lora_task", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default=None, help="base checkpoint (default: the shipped demo model)")
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--steps", type=int, default=900)
    args = ap.parse_args(argv)
    report = run(args.out, args.model, args.train, args.eval, args.steps)
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("examples")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
