"""The AdamW update of `pipeline.train.optim` as one Triton kernel.

Imported only where Triton is (`optim` builds it on first use). `optim.adamw_reference` is the same math in
plain torch, and the tests hold the two to the same bits under Triton's interpreter.
"""

import triton
import triton.language as tl


@triton.jit
def bf16_nearest(x):
    """fp32 `x` rounded to the nearest bf16 value (ties to even), kept in fp32. By hand, as the GPU converts:
    Triton's interpreter would truncate. A NaN whose mantissa's top bits are all set would carry into the
    exponent: the weights, which must stay NaN for the step's checks to see it, are guarded where stored."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).to(tl.float32, bitcast=True)


@triton.jit
def fmix32(x):
    """MurmurHash3's 32-bit finalizer on uint32 `x` (`optim._fmix32`)."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def element_hash(offsets, corrections_ptr, index, stream):
    """The random bits of `optim.element_hash` for these elements at the parameter's step: a few integer
    operations an element, where Philox's ten rounds take about a hundred."""
    step32 = tl.load(corrections_ptr + 3 * index + 2).to(tl.uint32)
    return fmix32(offsets.to(tl.uint32) ^ fmix32(step32 * 0x9E3779B1 + stream.to(tl.uint32)))


@triton.jit
def rounding_bits(hashed):
    """The 16 random bits `bf16_sr` and `bf16_kahan8` round with (`optim._rounding_bits`)."""
    return (hashed * 0x9E3779B1) >> 16


@triton.jit
def compensation_step(x):
    """(a code's value, its inverse) for fp32 `x` holding bf16 values (`optim._compensation_step`)."""
    exponent = tl.maximum((x.to(tl.uint32, bitcast=True) >> 23) & 0xFF, 16)
    return ((exponent - 15) << 23).to(tl.float32, bitcast=True), ((269 - exponent) << 23).to(tl.float32, bitcast=True)


@triton.jit
def fp8_weight_store(w, w8_ptr, scale_ptr, amax_ptr, scale_inv_ptr, offsets, mask, BY_HAND: tl.constexpr):
    """Transformer Engine's delayed-scaling cast of weights `w` (fp32): w * scale, saturated to E4M3's +-448 and
    rounded to nearest even; their largest magnitude folded into amax; 1 / scale as the tensor's scale_inv.
    Compiled, the conversion is the GPU's own (`cvt.rn.satfinite`, saturating, to nearest even); under Triton's interpreter,
    whose conversion rounds otherwise, the rounding is done by hand (BY_HAND) so the value is an exact E4M3 one."""
    scale = tl.load(scale_ptr)
    y = tl.minimum(tl.maximum(w * scale, -448.0), 448.0)
    if BY_HAND:
        bits = y.to(tl.uint32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20 << 20).to(tl.float32, bitcast=True)
        # below 2^-6 E4M3 steps by 2^-9: y * 512 rounded to an integer by fp32 addition of 1.5 * 2^23
        subnormal = ((y * 512.0 + 12582912.0) - 12582912.0) * (1.0 / 512.0)
        y = tl.where(tl.abs(y) < 0.015625, subnormal, normal)
    tl.store(w8_ptr + offsets, y.to(w8_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    tl.atomic_max(amax_ptr, tl.max(tl.where(mask, tl.abs(w), 0.0), axis=0))
    if tl.program_id(0) == 0:
        tl.store(scale_inv_ptr, tl.math.div_rn(1.0, scale))


@triton.jit(do_not_specialize=["stream"])  # one compiled kernel for every parameter's stream
def adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, extra_ptr, m_scale_ptr, v_scale_ptr, n, corrections_ptr, index,
                 stream, found_inf_ptr, factor_ptr, w8_ptr, w8_scale_ptr, w8_amax_ptr, w8_scale_inv_ptr, lr,
                 weight_decay, beta1, beta2, eps, MODE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 HAS_FACTOR: tl.constexpr, BF16: tl.constexpr, MOMENTS_FP8: tl.constexpr, FP8_WEIGHT: tl.constexpr,
                 BLOCK: tl.constexpr, QBLOCK: tl.constexpr, INTERPRETED: tl.constexpr = False):
    # MODE: 0 round to nearest; 1 fp32 master in extra_ptr; 2 stochastic rounding; 3 Kahan, extra_ptr
    # holding the compensation; 4 Kahan, extra_ptr holding it as int8 codes (`optim.encode_compensation`).
    # MOMENTS_FP8: m_ptr holds m and v_ptr sqrt(v) as E4M3 codes, each QBLOCK of them times a power of two in
    # m_scale_ptr / v_scale_ptr (`quantize_moment`, `dequantize_moment`).
    # FP8_WEIGHT: the new weight is also written to w8_ptr as E4M3 under the delayed-scaling scale in w8_scale_ptr,
    # its amax folded into w8_amax_ptr and 1 / scale written to w8_scale_inv_ptr (`optim.cast_fp8_weight`).
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    if MODE == 1:
        p = tl.load(extra_ptr + offsets, mask=mask)
    else:
        p = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_FACTOR:  # the gradient clipping's factor, applied here instead of in a pass of its own
        g = g * tl.load(factor_ptr)
    if MOMENTS_FP8:
        rows = tl.program_id(0).to(tl.int64) * (BLOCK // QBLOCK) + tl.arange(0, BLOCK // QBLOCK)
        row_mask = rows < n // QBLOCK
        m_scale = tl.load(m_scale_ptr + rows, mask=row_mask)
        v_scale = tl.load(v_scale_ptr + rows, mask=row_mask)
        m = tl.reshape(tl.reshape(tl.load(m_ptr + offsets, mask=mask).to(tl.float32), (BLOCK // QBLOCK, QBLOCK))
                       * m_scale[:, None], (BLOCK,))
        root = tl.reshape(tl.reshape(tl.load(v_ptr + offsets, mask=mask).to(tl.float32), (BLOCK // QBLOCK, QBLOCK))
                          * v_scale[:, None], (BLOCK,))
        v = root * root
    else:
        m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32)
    bias1 = tl.load(corrections_ptr + 3 * index)  # 1 - beta1^step
    bias2_sqrt = tl.load(corrections_ptr + 3 * index + 1)  # sqrt(1 - beta2^step)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    root = tl.sqrt(v)
    # torch's AdamW, m / bias1 / (root / bias2_sqrt + eps), with the bias corrections moved onto the scalars:
    # one division an element instead of two
    delta = -(lr * weight_decay) * p - (lr / bias1 * bias2_sqrt) * m / (root + eps * bias2_sqrt)
    if MODE == 3:
        delta += tl.load(extra_ptr + offsets, mask=mask).to(tl.float32)
    if MODE == 4:
        code_value, _ = compensation_step(p)
        delta += tl.load(extra_ptr + offsets, mask=mask).to(tl.float32) * code_value
    new = p + delta
    if MODE == 2:  # `optim.round_stochastic`
        hashed = element_hash(offsets, corrections_ptr, index, stream)
        carried = new.to(tl.uint32, bitcast=True) + rounding_bits(hashed)
        new = ((carried >> 16) << 16).to(tl.float32, bitcast=True)
    stored = new
    if BF16:
        stored = tl.where(new != new, new, bf16_nearest(new))
    if BF16 and not MOMENTS_FP8:
        m = bf16_nearest(m)
        v = bf16_nearest(v)
    tl.store(p_ptr + offsets, stored.to(p_ptr.dtype.element_ty), mask=mask)
    if FP8_WEIGHT:
        fp8_weight_store(stored, w8_ptr, w8_scale_ptr, w8_amax_ptr, w8_scale_inv_ptr, offsets, mask, INTERPRETED)
    if (MOMENTS_FP8 or MODE == 4) and MODE != 2:  # (hashed after the weight's store: fewer instructions)
        hashed = element_hash(offsets, corrections_ptr, index, stream)
    if MODE == 1:
        tl.store(extra_ptr + offsets, new, mask=mask)
    if MODE == 3:
        lost = bf16_nearest(delta - (stored - p))
        tl.store(extra_ptr + offsets, lost.to(extra_ptr.dtype.element_ty), mask=mask)
    if MODE == 4:
        _, inverse_step = compensation_step(stored)
        y = (delta - (stored - p)) * inverse_step
        y = tl.where(y == y, y, 0.0)
        code = tl.floor(y + rounding_bits(hashed).to(tl.float32) * (1.0 / 65536.0))
        code = tl.minimum(tl.maximum(code, -128.0), 127.0)
        tl.store(extra_ptr + offsets, code.to(tl.int8), mask=mask)
    if MOMENTS_FP8:
        # Each QBLOCK's scale: the power of two at or above its largest magnitude / 448, so products and
        # quotients by it are exact. Codes are rounded stochastically, by hand, so every one is an exact
        # E4M3 value and the cast cannot round: the same codes on the GPU and under the interpreter.
        for which in tl.static_range(2):
            if which == 0:
                x, fraction = m, (hashed & 0xFFFF) << 4
            else:
                x, fraction = root, (hashed >> 16) << 4
            x2 = tl.reshape(x, (BLOCK // QBLOCK, QBLOCK))
            top = (tl.max(tl.abs(x2), axis=1) * (1.0 / 448.0)).to(tl.uint32, bitcast=True)
            exponent = (top >> 23) + ((top & 0x7FFFFF) != 0).to(tl.uint32)
            scale = (exponent << 23).to(tl.float32, bitcast=True)  # 0 for an all-zero block
            inverse = tl.where(exponent > 0, ((254 - exponent) << 23).to(tl.float32, bitcast=True), 0.0)
            y = tl.reshape(x2 * inverse[:, None], (BLOCK,))
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            normal = (((y.to(tl.uint32, bitcast=True) + fraction) >> 20) << 20).to(tl.float32, bitcast=True)
            subnormal = tl.floor(y * 512.0 + fraction.to(tl.float32) * (1.0 / 1048576.0)) * (1.0 / 512.0)
            code = tl.where(tl.abs(y) < 0.015625, subnormal, normal).to(m_ptr.dtype.element_ty)
            if which == 0:
                tl.store(m_ptr + offsets, code, mask=mask)
                tl.store(m_scale_ptr + rows, scale, mask=row_mask)
            else:
                tl.store(v_ptr + offsets, code, mask=mask)
                tl.store(v_scale_ptr + rows, scale, mask=row_mask)
    else:
        tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)
