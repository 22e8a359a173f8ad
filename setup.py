"""sparse_robust: sparse and adversarially robust neural networks in JAX/Flax."""

import pathlib
import re

import setuptools

# The version's one source is sparse_robust/_version.py (read as text: setup must not import jax).
VERSION = re.search(r'^__version__ = "([^"]+)"$',
                    pathlib.Path(__file__).with_name("sparse_robust").joinpath("_version.py")
                    .read_text(encoding="utf-8"), re.M).group(1)

INSTALL_REQUIRES = [
    "jax>=0.4.35",
    "flax>=0.10",
    "optax>=0.2.4",
    "chex>=0.1.87",
    "ml-collections>=0.1.1",
    "tensorflow-datasets>=4.9.7",
    "orbax-checkpoint>=0.10",
    "absl-py>=2.1",
    "numpy>=1.26",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "pillow>=10",  # tfds decodes images with it
    "safetensors>=0.4",  # sparse_robust.interop's checkpoint files (numpy API, no torch)
    "filelock>=3.12",  # JAX's compilation cache locks its folder when it bounds its size
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8", "pytest-xdist>=3.5"],
    # TensorFlow is only needed to *prepare* tfds datasets (CIFAR-10, MNIST) from the
    # network; Fashion-MNIST from local IDX files needs none of it.
    "tf": ["tensorflow-cpu>=2.16", "importlib_resources>=6"],
    # benchmarks/crosscheck.py and benchmarks/torch_peer.py (PyTorch side by side); no test needs them.
    "crosscheck": ["torch>=2.4", "torchattacks>=3.5"],
    # sparse_robust.interop.torch_models (PyTorch twins of exported models) and its tests.
    "interop": ["torch>=2.4"],
    # scripts/docs.sh: the API reference from the docstrings, offline.
    "docs": ["pdoc>=14"],
}

setuptools.setup(
    name="sparse_robust",
    version=VERSION,
    description="Sparse and adversarially robust neural networks: lottery tickets, "
    "adversarial pruning and inverse weights inheritance in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["sparse_robust", "sparse_robust.*"]),
    # The CPU kernels' C++ sources and header, built on first use (models/native.py).
    package_data={"sparse_robust.models": ["*.cc", "*.h"], "sparse_robust.attacks": ["*.cc"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
