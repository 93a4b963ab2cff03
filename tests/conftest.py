import sys
from pathlib import Path

import torch

# The worked example lives in examples/; tests import it like user code would.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(2)
