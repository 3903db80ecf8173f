import os
import random

# One torch thread in this process and in the processes tests start (servers, jobs, Ray workers):
# the tests' models are tiny, and on a busy 2-core machine OpenMP threads spinning against other
# processes made them several times slower (a sweep of 80 small jobs: 9 s against 1.5 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Triton kernels run in the interpreter on machines without CUDA; this must be set before
# any kernel module is imported.
try:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
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
    """A fresh random stream per test (seed printed on failure; RMSERVE_TEST_SEED=<seed> replays it)."""
    seed = int(os.environ.get("RMSERVE_TEST_SEED") or random.randrange(1 << 30))
    print(f"random seed {seed}")
    return random.Random(seed)
