"""rlgaf_fast: fused kernels and a training loop for adversarial RL fine-tuning of language models.

Ops: gumbel_softmax, soft_embedding, gumbel_softmax_embedding, ppo_loss, fused_linear_ppo_loss,
token_logprobs, fused_linear_logprobs, value_loss, gae. Each fused op takes ``backend="auto"``
(or "torch", "cpp", "triton"; which backends have a kernel of which op:
rlgaf_fast.ops.registry).
"""

from rlgaf_fast._backend import available_backends, use_backend
from rlgaf_fast.ops.fused_linear_logprobs import fused_linear_logprobs
from rlgaf_fast.ops.fused_linear_ppo_loss import fused_linear_ppo_loss
from rlgaf_fast.ops.gumbel_softmax import gumbel_softmax, gumbel_softmax_embedding
from rlgaf_fast.ops.ppo_loss import PPOLossOutput, gae, ppo_loss, value_loss
from rlgaf_fast.ops.soft_embedding import soft_embedding
from rlgaf_fast.ops.token_logprobs import token_logprobs
from rlgaf_fast.patch import patch_torch, patched_torch, unpatch_torch

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "use_backend",
    "gumbel_softmax",
    "gumbel_softmax_embedding",
    "soft_embedding",
    "ppo_loss",
    "fused_linear_ppo_loss",
    "token_logprobs",
    "fused_linear_logprobs",
    "value_loss",
    "gae",
    "PPOLossOutput",
    "patch_torch",
    "patched_torch",
    "unpatch_torch",
]
