import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py and helpers importable as top-level modules
torch.set_num_threads(min(2, os.cpu_count() or 1))
