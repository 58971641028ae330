"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Measurements runs remember (src/training/compile_choice.py) go to a temporary cache,
    never the user's: a test must not change what a later real run decides."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and on cores shared with other processes
    OpenMP's waits can make a 1 ms forward pass take half a second. Use it in a module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
