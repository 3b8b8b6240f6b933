"""Counter-based Gumbel noise for Triton kernels: the randomness contract (docs/design.md).

Element (row r, column c) uses Philox4x32-10 keyed by (seed & 0xffffffff, seed >> 32) with counter
(c >> 2, r & 0xffffffff, r >> 32, 0) and takes output word c & 3; u = (2 * (word >> 9) + 1) * 2^-24
and g = -log(-log(u)) in float32, as rlgaf_fast.reference.gumbel_noise. One Philox call yields the
words of four consecutive columns, so a block of BLOCK columns costs BLOCK // 4 Philox calls.

The noise is the arithmetic bottleneck of the kernels that use it, so the logarithms are cheap
ones: with PTX_LOG (NVIDIA GPUs) log2 of the mantissa comes from the hardware approximation
(lg2.approx, absolute error about 2^-22 on [1, 2)), elsewhere (the interpreter) from tl.log2;
either way g agrees with the reference to a few 1e-7.
"""

import triton
import triton.language as tl


@triton.jit
def _log2_mantissa(m, PTX_LOG: tl.constexpr):
    """log2(m) for float32 m in [1, 2)."""
    if PTX_LOG:
        return tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=f,f", [m], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log2(m)


@triton.jit
def _log(x, PTX_LOG: tl.constexpr):
    """Natural log of positive normal float32 x with an absolute error of a few 1e-7: x is split
    into 2^e * m with m in [1, 2), so the approximate log2 only ever sees [1, 2)."""
    bits = x.to(tl.uint32, bitcast=True)
    # the biased exponent as a float without an int-to-float convert: 2^23 + b - (2^23 + 127)
    exponent = ((bits >> 23) | 0x4B000000).to(tl.float32, bitcast=True) - 8388735.0
    mantissa = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    # e * ln2 + log2(m) * ln2 with one rounding of the sum (fma): about 5e-7 worst case in g
    ln2 = 0.6931471805599453
    return tl.fma(exponent, ln2, _log2_mantissa(mantissa, PTX_LOG) * ln2)


@triton.jit
def _minus_log_uniform(u, PTX_LOG: tl.constexpr):
    """-log(u) for float32 u in (0, 1) with a relative error of a few 1e-7, also as u -> 1.

    The largest Gumbel values come from u close to 1, where -log(u) is tiny and a log with an
    absolute error bound would lose its digits. For u >= 0.75, d = 1 - u is exact and
    -log(1 - d) = d * (1 + d * q(d)), with q a degree-6 least squares fit of
    (-log(1 - d) / d - 1) / d on [0, 0.25] (relative error below 1e-9 in float64); below 0.75,
    -log(u) > 0.28 and the absolute error bound of _log is enough.
    """
    d = 1.0 - u
    q = 0.29605358839035034
    q = q * d + 0.07368192076683044
    q = q * d + 0.17945295572280884
    q = q * d + 0.19882497191429138
    q = q * d + 0.2500505745410919
    q = q * d + 0.33333253860473633
    q = q * d + 0.5
    near_one = d + d * (d * q)
    return tl.where(u >= 0.75, near_one, -_log(u, PTX_LOG))


@triton.jit
def _words_to_gumbel(word, PTX_LOG: tl.constexpr):
    """Gumbel samples (float32) from uint32 Philox words."""
    # 1 + k * 2^-23 in [1, 2) by setting the exponent bits, then subtracting 1 - 2^-24 gives
    # (2k + 1) * 2^-24 exactly (the result is representable), without an int-to-float convert.
    one_plus = ((word >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
    u = one_plus - 0.99999994039535522461  # 1 - 2^-24
    return -_log(_minus_log_uniform(u, PTX_LOG), PTX_LOG)


@triton.jit
def _philox_gumbel(seed, counter, row_lo, row_hi, PTX_LOG: tl.constexpr):
    """Gumbel noise [..., C, 2, 2] of 4 * C consecutive columns, column 4 * i + j (row-major)
    taking word j of counter i. counter: uint32 [..., C]; row_lo, row_hi: uint32 broadcastable
    to it."""
    zero = tl.zeros_like(counter)
    w0, w1, w2, w3 = tl.philox(seed, counter, row_lo + zero, row_hi + zero, zero)
    # join(join(w0, w2), join(w1, w3))[..., i, a, b] is word 2a + b of counter i, so the
    # row-major reshape lists the words of counter i in order 0, 1, 2, 3.
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    return _words_to_gumbel(words, PTX_LOG)


@triton.jit
def gumbel_noise_row(seed, row, col_start, BLOCK: tl.constexpr, PTX_LOG: tl.constexpr = False):
    """Gumbel noise, float32 [BLOCK], of columns col_start .. col_start + BLOCK - 1 of one row.

    seed: integer scalar in [0, 2^63); row: integer scalar (int64 for rows >= 2^31);
    col_start: integer scalar, a multiple of 4; BLOCK: a multiple of 4; PTX_LOG: use the
    hardware log2 approximation (NVIDIA GPUs only, not under the interpreter). Columns past the
    end of the row get noise too (callers mask them).
    """
    tl.static_assert(BLOCK % 4 == 0, "BLOCK must be a multiple of 4")
    row = row.to(tl.int64)
    counter = ((col_start // 4) + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    row_lo = (row & 0xFFFFFFFF).to(tl.uint32)
    row_hi = (row >> 32).to(tl.uint32)
    g = _philox_gumbel(seed, counter, row_lo, row_hi, PTX_LOG)
    return tl.reshape(g, (BLOCK,))


@triton.jit
def gumbel_noise_tile(seed, rows, col_start, BLOCK: tl.constexpr, PTX_LOG: tl.constexpr = False):
    """Gumbel noise, float32 [R, BLOCK], of columns col_start .. col_start + BLOCK - 1 of the
    rows ``rows`` (an integer [R] tensor). col_start and BLOCK multiples of 4; PTX_LOG as in
    gumbel_noise_row."""
    tl.static_assert(BLOCK % 4 == 0, "BLOCK must be a multiple of 4")
    rows = rows.to(tl.int64)
    counter = ((col_start // 4) + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    row_lo = (rows & 0xFFFFFFFF).to(tl.uint32)
    row_hi = (rows >> 32).to(tl.uint32)
    counter = counter[None, :] + tl.zeros((rows.shape[0], BLOCK // 4), tl.uint32)
    g = _philox_gumbel(seed, counter, row_lo[:, None], row_hi[:, None], PTX_LOG)
    return tl.reshape(g, (rows.shape[0], BLOCK))
