import pytest
import torch

import rlgaf_fast
from rlgaf_fast import reference
from rlgaf_fast.rlgaf.kernel_ops import kernel_ops
from tests.conftest import fused_backends


def inputs(dtype=torch.float32):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5, 11)).to(dtype)
    actions = torch.randint(11, (3, 5))
    mask = torch.rand(3, 5) > 0.3
    return logits, actions, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_are_the_reference_ppo_loss_logprobs_bit_for_bit(dtype, temperature):
    # The PPO update's old log-probabilities come from here, its new ones from the loss: with
    # the reference ops they must agree to the bit, so that the first ratio is exactly 1.
    logits, actions, mask = inputs(dtype)
    zeros = torch.zeros(actions.shape)
    old = reference.ppo_loss(logits, actions, zeros, zeros, mask, temperature=temperature)
    got = kernel_ops(False).token_logprobs(logits, actions, temperature=temperature)
    assert got.dtype == torch.float32
    assert torch.equal(got, old.logprobs.float())


@pytest.mark.parametrize("backend", fused_backends())
def test_fused_token_logprobs_are_the_fused_ppo_loss_logprobs_bit_for_bit(backend):
    logits, actions, mask = inputs()
    zeros = torch.zeros(actions.shape)
    with rlgaf_fast.use_backend(backend):
        fused = rlgaf_fast.ppo_loss(logits, actions, zeros, zeros, mask, temperature=0.7)
        got = kernel_ops(True).token_logprobs(logits, actions, temperature=0.7)
    assert torch.equal(got, fused.logprobs.float())


def test_token_logprobs_are_differentiable():
    logits, actions, _ = inputs()
    logits.requires_grad_(True)
    kernel_ops(False).token_logprobs(logits, actions, temperature=0.5).sum().backward()
    expected = (torch.nn.functional.one_hot(actions, 11) - torch.softmax(logits / 0.5, -1)) / 0.5
    torch.testing.assert_close(logits.grad, expected)


def test_each_op_set_takes_token_logprobs_from_its_own_side():
    assert kernel_ops(False).token_logprobs is reference.token_logprobs
    assert kernel_ops(True).token_logprobs is rlgaf_fast.token_logprobs
