"""Model configs and the Flax decoder (full-sequence and KV-cache forward paths)."""

from rl_fp16.models.config import ModelConfig
from rl_fp16.models.decoder import (causal_mask, default_positions, entropy_from_logits, forward,
                                    forward_cached, init_cache, init_params, logprobs_from_logits,
                                    residual_stream, residual_stream_cached, shifted_logprobs,
                                    token_logprobs)
