from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_DIR = FIXTURES / "tiny"
CASES_DIR = FIXTURES / "cases"
IMAGES_DIR = FIXTURES / "images"
REAL_TOKENIZER_DIR = FIXTURES / "glm4_tokenizer"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_cuda = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


def smoke_run_folder(root: Path, sizes: dict, seed: int) -> Path:
    """``root/base``: a smoke-recipe model folder (GLM-4 vocabulary prefix of 2,000 ranks);
    ``root/data``: synthetic conversations of the given split sizes."""
    from glm4v.train import synth
    from glm4v.train.recipes import RECIPES, write_model_folder

    write_model_folder(root / "base", RECIPES["smoke"].dims, REAL_TOKENIZER_DIR)
    synth.write_dataset(root / "data", sizes, seed=seed)
    return root
