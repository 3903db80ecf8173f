"""rmserve: an inference engine for LLM reward models.

The Triton kernels live in the top-level ``kernels/`` folder and install as
``rmserve.kernels`` (Hugging Face's ``kernels`` distribution owns the
top-level name). No CUDA extension is built yet: ``csrc/`` does not exist.
"""
from setuptools import setup

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
)
