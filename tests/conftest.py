"""Shared pytest configuration: the Triton interpreter on machines without CUDA, and the slow marker."""
import os

import torch

if not torch.cuda.is_available():  # before any test module (or peft, via transformers) imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes long (a fresh virtual environment and install); deselect with -m 'not slow'")
