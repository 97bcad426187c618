"""Shared test set-up: CPU JAX, in-process vLLM, and a float32 matmul precision that is exact enough."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
