"""Small model configs the project makes itself (no downloads): random tiny models for tests and
for mismatch measurements before a trained base model exists."""

from __future__ import annotations

import jax
import numpy as np

from rl_fp16.models.config import ModelConfig
from rl_fp16.models.decoder import init_params

# A random Qwen2 whose logits are scaled up so that next-token distributions are peaked like an
# LLM's (mean entropy around 1-2 nats) rather than near-uniform, which would hide the mismatch.
PEAKED_RANDOM_QWEN2 = ModelConfig(
    model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=384,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, qkv_bias=True,
    tie_word_embeddings=False, max_position_embeddings=2048, rms_norm_eps=1e-6,
    initializer_range=0.05, bos_token_id=None, eos_token_id=None)


def peaked_random_model(seed: int = 0, logit_std: float = 4.0,
                        config: ModelConfig = PEAKED_RANDOM_QWEN2):
  """(config, float32 params) of a random model with LM-head scaled to give logits of about
  `logit_std` standard deviation."""
  params = init_params(config, jax.random.key(seed))
  head = np.asarray(params["lm_head"]["kernel"])
  # The final RMSNorm makes hidden states unit-RMS, so logit std ~ head std * sqrt(hidden).
  head = head * (logit_std / (head.std() * np.sqrt(config.hidden_size)))
  params["lm_head"]["kernel"] = head.astype(np.float32)
  return config, params
