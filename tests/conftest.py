import os
import sys

import pytest
import torch

# tests import the flat modules from the repository root, whatever the working directory
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; run with -m slow before resolving an issue")


def pytest_collection_modifyitems(config, items):
    """The default run leaves out tests marked slow; `-m slow` (or any -m that names them) runs them."""
    if config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
