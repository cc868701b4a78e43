"""LMDeploy-style VLM pipeline over the engine: `pipeline()`, `GenerationConfig`, `Response`, `IMAGE_TOKEN`.

    from internvl import pipeline, GenerationConfig, IMAGE_TOKEN
    pipe = pipeline()                                      # None = the shipped demo model
    print(pipe(("describe this image", "photo.jpg")).text)

Note: `from internvl import pipeline` gives the function; import the modules of this package by their full names
(`from internvl.pipeline.messages import parse_messages`).
"""

from internvl.pipeline.api import Pipeline, Session, pipeline
from internvl.pipeline.config import GenerationConfig, PipelineConfig, Response
from internvl.pipeline.messages import IMAGE_TOKEN

__all__ = ["IMAGE_TOKEN", "GenerationConfig", "Pipeline", "PipelineConfig", "Response", "Session", "pipeline"]
