"""Model configs, the Flax decoder (full-sequence and KV-cache forward paths) and its probes."""

from rl_fp16.models.config import ModelConfig
from rl_fp16.models.decoder import (apply_logits, apply_token_logprobs, causal_mask,
                                    default_positions, entropy_from_logits, forward,
                                    forward_cached, init_cache, init_params, logprobs_from_logits,
                                    shifted_logprobs, token_logprobs)
from rl_fp16.models.probes import (expert_choices, expert_choices_cached, residual_stream,
                                   residual_stream_cached, rollout_expert_mismatch)
