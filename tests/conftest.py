import os
import random

# Triton kernels run in the interpreter on machines without CUDA; this must be set before
# any kernel module is imported.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest

from rmserve.tiny import write_tiny_checkpoint

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, **settings) -> path of a tiny checkpoint written once per settings."""
    cache: dict = {}

    def make(family: str, **settings) -> str:
        key = (family, tuple(sorted(settings.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny_{family}")
            cache[key] = write_tiny_checkpoint(str(path), family, **settings)
        return cache[key]

    return make


@pytest.fixture
def rng(request):
    """A fresh random stream per test (seed printed on failure through the test id)."""
    seed = random.randrange(1 << 30)
    print(f"random seed {seed}")
    return random.Random(seed)
