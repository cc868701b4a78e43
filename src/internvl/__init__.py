"""internvl: InternVL vision-language models with the reference behaviour, on CPU and GPU.

    from internvl import InternVLChatModel, load_tokenizer, load_image, load_video
    from internvl import pipeline, GenerationConfig, IMAGE_TOKEN   # LMDeploy-style pipeline (internvl.pipeline)

`GenerationConfig` here is the pipeline's (LMDeploy's fields); the model-card `generate`/`chat` settings class is
`internvl.generation.sampling.GenerationConfig` (plain dicts work there too).
"""

from internvl.api.model import InternVLChatModel
from internvl.config import InternVLConfig
from internvl.pipeline import IMAGE_TOKEN, GenerationConfig, pipeline
from internvl.preprocessing.image import load_image
from internvl.preprocessing.video import load_video
from internvl.tokenizer import load_tokenizer

__all__ = ["InternVLChatModel", "InternVLConfig", "GenerationConfig", "IMAGE_TOKEN", "load_image", "load_video",
           "load_tokenizer", "pipeline"]
__version__ = "0.1.0"
