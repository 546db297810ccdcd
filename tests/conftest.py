import os
import sys

import torch

# tests import the flat modules from the repository root, whatever the working directory
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; run with -m slow before resolving an issue")
