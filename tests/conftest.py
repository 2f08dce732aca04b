from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A small trained Llama (hidden 128, 2 layers, vocab 512) as a float16 HF dir + tokenizer."""
    from tests.tiny import build_llama

    return build_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Keep quantgate's cache (converted models, built suites, baseline cache) out of $HOME in tests.
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path_factory.getbasetemp() / "qg_cache"))
