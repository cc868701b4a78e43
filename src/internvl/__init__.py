"""internvl: InternVL vision-language models with the reference behaviour, on CPU and GPU.

    from internvl import InternVLChatModel, load_tokenizer, load_image, load_video
"""

from internvl.api.model import InternVLChatModel
from internvl.config import InternVLConfig
from internvl.generation.sampling import GenerationConfig
from internvl.preprocessing.image import load_image
from internvl.preprocessing.video import load_video
from internvl.tokenizer import load_tokenizer

__all__ = ["InternVLChatModel", "InternVLConfig", "GenerationConfig", "load_image", "load_video", "load_tokenizer"]
__version__ = "0.1.0"
