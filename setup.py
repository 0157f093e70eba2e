"""tfjax: Transfusion (text next-token prediction + image diffusion) in JAX/Flax."""
from setuptools import find_packages, setup

COMMANDS = ["train", "generate", "eval", "export", "data", "vae", "info", "compile", "sweep",
            "chameleon"]

setup(
    name="tfjax",
    version="0.1.0",
    description="Train Transfusion models (one transformer, text LM + image diffusion) "
                "with JAX/Flax on CPU, GPU and TPU pods.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # configs/ installs too: config files import their shared pieces as `configs.common`.
    packages=find_packages(include=["tfjax", "tfjax.*", "configs", "configs.*"]),
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml_collections>=1.1.0",
        "absl-py",
        "numpy",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "array_record",
        "sentencepiece>=0.2.0",
        "pillow",
        "matplotlib",
        "tensorboardX",
        "safetensors",
        "tqdm",
        "pyarrow",          # Parquet image and text sources (tfjax/data/streams.py)
    ],
    extras_require={
        # CUDA 13 wheels of the same jax version (the GPU machine uses jax 0.11.x + cuda13).
        "gpu": ["jax[cuda13]"],
        # libtpu: for TPU VMs, and for ahead-of-time TPU compiles on any machine
        # (tfjax-compile, the TPU kernel's compile test).
        "tpu": ["jax[tpu]"],
        # Preparing large public TFDS datasets (coco_captions, c4) needs TensorFlow.
        "data": ["tensorflow-cpu"],
        "dev": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel", "flatbuffers",
                "torch==2.13.0", "diffusers", "transformers"],
    },
    entry_points={"console_scripts": [f"tfjax-{c}=tfjax.cli.{c}:main" for c in COMMANDS]
                  + ["tfjax-edit-data=tfjax.cli.edit_data:main"]},
)
