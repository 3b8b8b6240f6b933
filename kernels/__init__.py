"""Triton kernels of rlgaf_fast (installed as rlgaf_fast.kernels): @triton.jit functions and their
launchers, nothing else. Imported lazily by the op modules, so that rlgaf_fast works without
Triton."""
