"""w2s_jax: weak-to-strong generalization experiments with JAX/Flax LLaMA models."""
from setuptools import find_packages, setup

setup(
    name="w2s_jax",
    version="0.1.0",
    description="Weak-to-strong generalization (Burns et al., 2023) with JAX/Flax LLaMA models",
    packages=find_packages(include=["w2s_jax", "w2s_jax.*"]),
    package_data={"w2s_jax.models": ["onednn_matmul.cc"]},  # built on first use where oneDNN is installed
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "absl-py",
        "numpy",
        "transformers>=4.45",
        "datasets",
        "tokenizers",
        "safetensors",
        "gguf>=0.16",  # GGUF import (ReaderField.contents appeared in 0.16)
        "chess",
        "tqdm",
        "matplotlib",
        "tensorboardX",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "torch==2.13.0"],
    },
)
