import torch
import torch.nn.functional as F

import rlgaf_fast


def test_patch_torch_routes_functional_gumbel_softmax():
    x = torch.randn(4, 9)
    original = F.gumbel_softmax
    with rlgaf_fast.patched_torch():
        assert F.gumbel_softmax is not original
        torch.manual_seed(3)
        patched = F.gumbel_softmax(x, tau=0.5, hard=True)
    assert F.gumbel_softmax is original
    torch.manual_seed(3)
    assert torch.equal(patched, rlgaf_fast.gumbel_softmax(x, 0.5, hard=True))
    rlgaf_fast.patch_torch()
    try:
        torch.manual_seed(4)
        y = F.gumbel_softmax(x, tau=2.0, dim=0)
    finally:
        rlgaf_fast.unpatch_torch()
    torch.manual_seed(4)
    assert torch.equal(y, rlgaf_fast.gumbel_softmax(x, 2.0, dim=0))
    assert F.gumbel_softmax is original
