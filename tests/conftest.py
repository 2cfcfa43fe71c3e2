import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_lm  # noqa: E402


@pytest.fixture
def lm():
    return tiny_lm("llama")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, request):
    """Unit tests get a throwaway cache; integration tests share the user cache (the converted default model)."""
    if "integration" not in request.keywords:
        monkeypatch.setenv("PERSONAEDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models gain nothing from intra-op threads, and on a busy machine the threads' spinning made
    unit tests up to 9x slower; the real default model keeps every thread."""
    import torch

    threads = torch.get_num_threads()
    if "integration" not in request.keywords:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PERSONAEDIT_SKIP_INTEGRATION"):
        skip = pytest.mark.skip(reason="PERSONAEDIT_SKIP_INTEGRATION is set")
        for item in items:
            if "integration" in item.keywords:
                item.add_marker(skip)
