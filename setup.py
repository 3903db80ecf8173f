"""rmserve: an inference engine for LLM reward models.

The Triton kernels live in the top-level ``kernels/`` folder and install as
``rmserve.kernels`` (Hugging Face's ``kernels`` distribution owns the
top-level name). The CUDA C++ ops in ``csrc/`` (FP8 quantization fused into the
norm and activation) build as ``rmserve._C`` only where they can, as
flash-attention's setup.py decides: a CUDA build of torch importable while
building (``pip install -e . --no-build-isolation``) and ``nvcc`` present.
RMSERVE_BUILD_CSRC=auto (default) builds them where it can and says why not
elsewhere; 1 requires them (the build fails with the reason); 0 skips them.
A CPU install never imports torch here, so it stays as fast as without csrc.
"""
import os
import re
import shutil
import sys
from importlib.util import find_spec

from setuptools import setup

CSRC = ["csrc/torch_bindings.cpp", "csrc/quant.cu", "csrc/norm_quant.cu", "csrc/act_quant.cu"]
# FP8 conversions and torch._scaled_mm need sm_89+; TORCH_CUDA_ARCH_LIST overrides.
DEFAULT_ARCHS = "8.9;9.0a"


def _csrc_blocker() -> str | None:
    """Why csrc cannot be built here, or None. Reads torch/version.py instead of importing torch."""
    spec = find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return "torch is not importable in the build environment (pip builds in isolation: add --no-build-isolation)"
    with open(os.path.join(spec.submodule_search_locations[0], "version.py"), encoding="utf-8") as f:
        cuda = re.search(r"^cuda\b.*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
    if cuda is None:
        return "torch is a CPU build (torch.version.cuda is None)"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not (home and os.path.exists(os.path.join(home, "bin", "nvcc"))) and shutil.which("nvcc") is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def csrc_extension() -> dict:
    """setup() arguments that build csrc/ as rmserve._C, or none (with the reason on stderr)."""
    mode = os.environ.get("RMSERVE_BUILD_CSRC", "auto")
    if mode not in ("auto", "1", "0"):
        sys.exit(f"RMSERVE_BUILD_CSRC must be auto, 1 or 0, got {mode!r}")
    blocker = "RMSERVE_BUILD_CSRC=0" if mode == "0" else _csrc_blocker()
    if blocker is not None:
        if mode == "1":
            sys.exit(f"RMSERVE_BUILD_CSRC=1, but csrc/ cannot be built: {blocker}")
        print(f"rmserve: not building the csrc CUDA ops: {blocker}", file=sys.stderr)
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    ext = CUDAExtension("rmserve._C", CSRC, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="rmserve",
    version="0.1.0",
    description="Fast, exact inference for Llama-3 reward models (BT, ArmoRM, QRM, URM, GRM)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["rmserve", "rmserve.model", "rmserve.heads", "rmserve.server", "rmserve.kernels", "rmserve.offline",
              "rmserve.integrations", "rmserve.eval"],
    package_dir={"rmserve.kernels": "kernels"},
    install_requires=[
        # torch 2.11 is the GPU image's; 2.13 is what CPU CI runs.
        "torch>=2.11,<2.15",
        # 3.6 on the GPU image, 3.7.1 pinned by torch 2.13; 3.9 dropped tl.make_block_ptr.
        "triton>=3.6,<3.9",
        "transformers>=4.48,<6",
        "tokenizers>=0.20",
        "safetensors>=0.4.3",
        "huggingface_hub>=0.24",
        "jinja2>=3.1",
        "numpy>=1.26",
        "tqdm>=4.66",
        # the offline job's parquet input and output (parquet is its default output)
        "pyarrow>=15",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "ray": ["ray[data]>=2.40", "pyarrow>=15"],
        # `rmserve score` on a Hugging Face dataset (save_to_disk directory or hf:<name>)
        "datasets": ["datasets>=2.19"],
        "server": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20", "httpx>=0.27"],
        "bench": ["pytest>=8", "pytest-benchmark>=4.0"],
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4.0",
            "pyarrow>=15",
            "pandas>=2",
            "datasets>=2.19",
            "ray[data]>=2.40",
            "fastapi>=0.110",
            "uvicorn>=0.29",
            "prometheus_client>=0.20",
            "httpx>=0.27",
            # tests/test_rl_clients.py trains a tiny policy with TRL's GRPOTrainer (reward call shape read at 1.16)
            "trl>=1.16,<2",
        ],
    },
    entry_points={"console_scripts": ["rmserve=rmserve.cli:main"]},
    **csrc_extension(),
)
