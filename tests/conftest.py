import logging
import sys
from pathlib import Path

import pytest
import torch

# The worked example lives in examples/; tests import it like user code would.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True)
def _isolated_process_state():
    """Each test starts with 2 torch threads and leaves the root logger as it found it: an in-process
    ``polydiff train`` adds Hydra's file handler (the run's cli_train.log), which later tests must not write to."""
    torch.set_num_threads(2)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
