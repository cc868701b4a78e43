"""Regenerate the example media (two scenes and a short video) from the demo scene generator.

    python examples/make_media.py
"""

import random
from pathlib import Path

import av
import numpy as np

from internvl.demo.scenes import describe, make_scene, render

OUT = Path(__file__).resolve().parent / "media"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    rng = random.Random(2026)
    scenes = [make_scene(rng, n_objects=3, word=True), make_scene(rng, n_objects=2, word=False)]
    for i, scene in enumerate(scenes, 1):
        render(scene).save(OUT / f"scene{i}.png")
        print(f"scene{i}.png: {describe(scene)}")
    # a 4-second clip: 8 scenes, each shown for half a second
    container = av.open(str(OUT / "shapes.mp4"), mode="w")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width = stream.height = 224
    stream.pix_fmt = "yuv420p"
    for _ in range(8):
        frame = np.asarray(render(make_scene(rng)))
        for _ in range(5):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


if __name__ == "__main__":
    main()
