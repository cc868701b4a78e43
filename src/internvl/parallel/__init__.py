"""Multi-device inference: layers placed over several devices (`placement`), and tensor parallelism over a
torch.distributed process group (`tensor_parallel`). Usage: docs/PARALLEL.md."""

from internvl.parallel.placement import Placement, place_model, plan_placement
from internvl.parallel.tensor_parallel import shard_sizes, tensor_parallel

__all__ = ["Placement", "place_model", "plan_placement", "shard_sizes", "tensor_parallel"]
