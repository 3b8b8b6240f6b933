"""Smoke test of an installed rlgaf_fast, run from outside the repository so that nothing is
imported from the work tree by accident: the compiled extension loads and its kernels agree with
the float64 reference, forward and backward."""

import sys
from pathlib import Path

import torch

import rlgaf_fast
from rlgaf_fast import reference

ROOT = Path(__file__).resolve().parents[1]
package = Path(rlgaf_fast.__file__).resolve()
if package.is_relative_to(ROOT):
    sys.exit(f"rlgaf_fast was imported from the work tree ({package}), not from the install")
if "cpp" not in rlgaf_fast.available_backends():
    sys.exit(f"the C++ extension did not load: backends {rlgaf_fast.available_backends()}")

torch.manual_seed(0)
logits = torch.randn(6, 37, dtype=torch.float64, requires_grad=True)
grad = torch.randn(6, 37, dtype=torch.float64)
ours = rlgaf_fast.gumbel_softmax(logits, tau=0.7, seed=5, backend="cpp")
(ours_grad,) = torch.autograd.grad(ours, logits, grad)
ref = reference.gumbel_softmax(logits, tau=0.7, seed=5)
(ref_grad,) = torch.autograd.grad(ref, logits, grad)
torch.testing.assert_close(ours, ref)
torch.testing.assert_close(ours_grad, ref_grad)

actions = torch.randint(0, 37, (6,))
old, adv = torch.randn(6, dtype=torch.float64) - 3.0, torch.randn(6, dtype=torch.float64)
loss = rlgaf_fast.ppo_loss(logits, actions, old, adv, backend="cpp").loss
ref_loss = reference.ppo_loss(logits, actions, old, adv).loss
torch.testing.assert_close(loss, ref_loss)
torch.testing.assert_close(*(torch.autograd.grad(x, logits)[0] for x in (loss, ref_loss)))
print(f"smoke test passed: {package.parent}, backends {rlgaf_fast.available_backends()}")
