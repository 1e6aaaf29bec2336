"""The INC 2.x tests run only in the second environment (neural-compressor 3.7.1; see requirements-inc2.txt)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

try:
    from neural_compressor.config import PostTrainingQuantConfig  # noqa: F401
except ImportError:  # pragma: no cover - the main environment (neural-compressor-pt 3.10) has no 2.x API
    pytest.exit("tests_inc2 needs INC's 2.x API (neural-compressor 3.7.1): run them in .venv-inc2, see "
                "requirements-inc2.txt", returncode=4)
