//! Block-wise 4-bit (NF4 / FP4) and 8-bit (dynamic map) quantization, bit-compatible with
//! bitsandbytes. The tensor is flattened row-major; blocks of `blocksize` elements may span
//! rows; each block keeps a float32 absmax.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use crate::codebook::{check_sorted_codebook, QuantType4, FP4, NF4};
use crate::element::{first_non_finite, Element};
use crate::error::{check_blocksize, check_len, num_blocks, Error, Result};
use crate::parallel::{par_chunks2_mut, Threads};
use crate::simd::SimdLevel;

/// bitsandbytes clamps the divisor so an all-zero block scales to zeros instead of NaN.
const MIN_ABSMAX: f32 = 1e-38;

/// Blocks handed to one rayon task: enough work to amortize scheduling.
const MIN_BLOCKS_PER_TASK: usize = 64;

/// A packed 4-bit tensor: two codes per byte (element 2j in the high nibble) and one absmax
/// per block.
#[derive(Clone, Debug, PartialEq)]
pub struct Packed4 {
    pub packed: Vec<u8>,
    pub absmax: Vec<f32>,
}

/// A block-wise 8-bit tensor: one code per element and one absmax per block.
#[derive(Clone, Debug, PartialEq)]
pub struct Blockwise8 {
    pub codes: Vec<u8>,
    pub absmax: Vec<f32>,
}

/// Bytes needed to pack `n` 4-bit codes.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// Checks the sizes a 4-bit decode of `n` elements is given (typically read from a
/// quant_state) against the buffers: the blocksize is supported, `packed_len` is
/// `(n + 1) / 2` and `absmax_len` is `ceil(n / blocksize)`. Callers run it before
/// allocating an `n`-element output, so a quant_state claiming 10^12 elements of a 4-byte
/// tensor is an error, not a 4 TB allocation.
pub fn check_4bit_sizes(
    n: usize,
    blocksize: usize,
    packed_len: usize,
    absmax_len: usize,
) -> Result<()> {
    check_blocksize(blocksize)?;
    check_len(
        "packed input (bytes for n elements: (n + 1) / 2)",
        n.div_ceil(2),
        packed_len,
    )?;
    check_len("absmax", num_blocks(n, blocksize), absmax_len)
}

/// Midpoints between sorted neighbours: an input above bound i is nearer code i + 1.
/// An exact tie goes to the lower code, as in bitsandbytes.
fn midpoints<const N: usize, const M: usize>(sorted: &[f32; N]) -> [f32; M] {
    let mut b = [0.0f32; M];
    for (i, o) in b.iter_mut().enumerate() {
        *o = (sorted[i] + sorted[i + 1]) / 2.0;
    }
    b
}

/// Decision tables for one 4-bit type, built once per call.
struct Decider4 {
    quant_type: QuantType4,
    /// NF4: 15 bounds over the signed table. FP4: 7 bounds over the magnitudes (first 8 used).
    bounds: [f32; 15],
}

/// FP4 magnitudes sorted ascending, and the 3-bit code of each.
const FP4_MAGNITUDE_SORTED: [f32; 8] = [
    FP4[0], FP4[1], FP4[6], FP4[7], FP4[4], FP4[5], FP4[2], FP4[3],
];
const FP4_MAGNITUDE_CODE: [u8; 8] = [0, 1, 6, 7, 4, 5, 2, 3];

impl Decider4 {
    fn new(quant_type: QuantType4) -> Self {
        let bounds = match quant_type {
            QuantType4::Nf4 => midpoints::<16, 15>(&NF4),
            QuantType4::Fp4 => {
                let m: [f32; 7] = midpoints::<8, 7>(&FP4_MAGNITUDE_SORTED);
                let mut b = [f32::INFINITY; 15];
                b[..7].copy_from_slice(&m);
                b
            }
        };
        Self { quant_type, bounds }
    }

    /// Writes the 4-bit code of each scaled value (branch-free counting so it vectorizes;
    /// u32 codes keep the count in the compare's lane width instead of narrowing per bound).
    #[inline(always)]
    fn encode(&self, scaled: &[f32], codes: &mut [u32]) {
        match self.quant_type {
            QuantType4::Nf4 => {
                let b = &self.bounds;
                // i32 lanes match the f32 compare width, so LLVM vectorizes the count.
                for (c, &s) in codes.iter_mut().zip(scaled) {
                    let mut k = 0u32;
                    for bound in b {
                        k += (s > *bound) as u32;
                    }
                    *c = k;
                }
            }
            QuantType4::Fp4 => {
                let b = &self.bounds[..7];
                for (c, &s) in codes.iter_mut().zip(scaled) {
                    let m = s.abs();
                    let mut k = 0usize;
                    for bound in b {
                        k += (m > *bound) as usize;
                    }
                    // Negative inputs get the sign bit; -0.0 encodes as +0.
                    *c = (FP4_MAGNITUDE_CODE[k] | (((s < 0.0) as u8) << 3)) as u32;
                }
            }
        }
    }
}

/// Smallest 4-bit decode output written with non-temporal stores: beyond the caches, a
/// normal store reads each output line before overwriting it.
const STREAM_MIN_BYTES: usize = 16 << 20;

/// Elements handled per pass: whole blocks, at most this many (fits L1 as f32 + codes).
const GROUP_ELEMS: usize = 4096;

/// Scales one block in place by its absmax: returns (absmax, saw a non-finite value).
#[inline(always)]
fn scale_block(block: &mut [f32], full_block: bool) -> (f32, bool) {
    // For non-negative floats the bit patterns order like the values, and NaN / Inf sit
    // above every finite value: one integer max (associative, so it vectorizes, unlike a
    // float max) gives both the absmax and the non-finite check.
    let mut lanes = [0u32; 8];
    let mut chunks = block.chunks_exact(8);
    for c in &mut chunks {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = (*m).max(v.to_bits() & 0x7FFF_FFFF);
        }
    }
    let tail = chunks.remainder().iter().map(|v| v.to_bits() & 0x7FFF_FFFF);
    let max_bits = lanes.into_iter().chain(tail).max().unwrap_or(0);
    if max_bits >= 0x7F80_0000 {
        return (0.0, true);
    }
    let amax = f32::from_bits(max_bits);
    let divisor = amax.max(MIN_ABSMAX);
    if full_block {
        // bitsandbytes multiplies full blocks by the reciprocal...
        let inv = 1.0 / divisor;
        block.iter_mut().for_each(|s| *s *= inv);
    } else {
        // ...and divides the trailing partial block.
        block.iter_mut().for_each(|s| *s /= divisor);
    }
    (amax, false)
}

/// Quantizes a run of consecutive blocks; `first_block` is the index of the first one.
/// Widening, encoding and packing run over groups of blocks in long loops (they vectorize);
/// only the absmax and scaling are per block.
#[inline(always)]
fn quantize_blocks_4bit_impl<T: Element>(
    x: &[T],
    packed: &mut [u8],
    absmax: &mut [f32],
    blocksize: usize,
    decider: &Decider4,
    total: usize,
    first_block: usize,
) -> bool {
    let mut scaled = [0.0f32; GROUP_ELEMS];
    let mut codes = [0u32; GROUP_ELEMS];
    let blocks_per_group = (GROUP_ELEMS / blocksize).max(1);
    let group_elems = blocks_per_group * blocksize;
    let mut bad = false;
    for (g, ((xg, pg), ag)) in x
        .chunks(group_elems)
        .zip(packed.chunks_mut(group_elems / 2))
        .zip(absmax.chunks_mut(blocks_per_group))
        .enumerate()
    {
        let n = xg.len();
        let scaled = &mut scaled[..n];
        for (s, v) in scaled.iter_mut().zip(xg) {
            *s = v.to_f32();
        }
        for (b, (block, am)) in scaled.chunks_mut(blocksize).zip(ag.iter_mut()).enumerate() {
            let full = (first_block + g * blocks_per_group + b + 1) * blocksize <= total;
            let (a, bd) = scale_block(block, full);
            *am = a;
            bad |= bd;
        }
        let codes = &mut codes[..n];
        decider.encode(scaled, codes);
        let pairs = n / 2;
        for (o, pair) in pg[..pairs].iter_mut().zip(codes.chunks_exact(2)) {
            *o = ((pair[0] << 4) | pair[1]) as u8;
        }
        if n % 2 == 1 {
            pg[pairs] = ((codes[n - 1] as u8) << 4) | decider.quant_type.zero_code();
        }
    }
    bad
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_blocks_4bit_avx2<T: Element>(
    x: &[T],
    packed: &mut [u8],
    absmax: &mut [f32],
    blocksize: usize,
    decider: &Decider4,
    total: usize,
    first_block: usize,
) -> bool {
    quantize_blocks_4bit_impl(x, packed, absmax, blocksize, decider, total, first_block)
}

/// One task's run of blocks on `level`: whole blocks on the AVX-512 kernel when the level
/// has it, the trailing partial block (and everything below AVX-512) on the loops above
/// (compiled for AVX2 at that level, for the build target at `Portable`).
#[allow(clippy::too_many_arguments)]
fn quantize_blocks_4bit<T: Element>(
    x: &[T],
    packed: &mut [u8],
    absmax: &mut [f32],
    blocksize: usize,
    decider: &Decider4,
    total: usize,
    first_block: usize,
    level: SimdLevel,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if level >= SimdLevel::Avx512 {
            let whole = x.len() / blocksize;
            let elems = whole * blocksize;
            let raw = x.as_ptr() as *const u8;
            let (pp, ap) = (packed.as_mut_ptr(), absmax.as_mut_ptr());
            // SAFETY: the level was checked against the CPU by the caller; the slices hold
            // `whole` blocks of elements, packed bytes and absmaxes (lengths checked there).
            let mut bad = unsafe {
                match avx512::Kind::of(T::DTYPE) {
                    avx512::Kind::F32 => {
                        avx512::quantize_blocks::<0>(raw, whole, blocksize, decider, pp, ap)
                    }
                    avx512::Kind::F16 => {
                        avx512::quantize_blocks::<1>(raw, whole, blocksize, decider, pp, ap)
                    }
                    avx512::Kind::BF16 => {
                        avx512::quantize_blocks::<2>(raw, whole, blocksize, decider, pp, ap)
                    }
                }
            };
            if elems < x.len() {
                bad |= quantize_blocks_4bit_impl(
                    &x[elems..],
                    &mut packed[elems / 2..],
                    &mut absmax[whole..],
                    blocksize,
                    decider,
                    total,
                    first_block + whole,
                );
            }
            return bad;
        }
        if level >= SimdLevel::Avx2 {
            // SAFETY: the level was checked against the CPU by the caller.
            return unsafe {
                quantize_blocks_4bit_avx2(x, packed, absmax, blocksize, decider, total, first_block)
            };
        }
    }
    let _ = level;
    quantize_blocks_4bit_impl(x, packed, absmax, blocksize, decider, total, first_block)
}

/// AVX-512 kernels for whole blocks (every blocksize is a multiple of 32 elements): the
/// same arithmetic as the portable loops, in the same order, so the bytes are identical.
/// The trailing partial block, if any, stays on the portable loop (it divides instead of
/// multiplying by the reciprocal).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Decider4, FP4_MAGNITUDE_CODE, MIN_ABSMAX};
    use crate::codebook::QuantType4;
    use crate::element::FloatDtype;

    /// Element type of a raw input / output pointer.
    #[derive(Clone, Copy)]
    pub(super) enum Kind {
        F32,
        F16,
        BF16,
    }

    impl Kind {
        pub(super) fn of(dtype: FloatDtype) -> Kind {
            match dtype {
                FloatDtype::F32 => Kind::F32,
                FloatDtype::F16 => Kind::F16,
                FloatDtype::BF16 => Kind::BF16,
            }
        }
    }

    /// 16 elements from `p + i` widened to f32 (exact for every input type).
    #[inline(always)]
    unsafe fn load16<const K: u8>(p: *const u8, i: usize) -> __m512 {
        match K {
            0 => _mm512_loadu_ps((p as *const f32).add(i)),
            1 => _mm512_cvtph_ps(_mm256_loadu_si256(
                (p as *const u16).add(i) as *const __m256i
            )),
            _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256((p as *const u16).add(i) as *const __m256i),
            ))),
        }
    }

    /// The largest `|x|` of `len` elements (a multiple of 32) from `p + i`, as f32 bits.
    /// For non-negative floats the bit patterns order like the values, NaN / Inf above every
    /// finite one (`>= 0x7F80_0000`), as in the portable `scale_block`.
    #[inline(always)]
    unsafe fn absmax_bits<const K: u8>(p: *const u8, i: usize, len: usize) -> u32 {
        if K == 2 {
            // bfloat16: the top half of an f32, so 16-bit maxima of |bits| give the same answer.
            let mask = _mm512_set1_epi16(0x7FFF);
            let mut acc = _mm512_setzero_si512();
            let q = (p as *const u16).add(i);
            for j in (0..len).step_by(32) {
                let v = _mm512_loadu_si512(q.add(j) as *const __m512i);
                acc = _mm512_max_epu16(acc, _mm512_and_si512(v, mask));
            }
            let lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(acc));
            let hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(acc));
            return (_mm512_reduce_max_epu32(_mm512_max_epu32(lo, hi)) as u32) << 16;
        }
        let mask = _mm512_set1_epi32(0x7FFF_FFFF);
        let mut a0 = _mm512_setzero_si512();
        let mut a1 = _mm512_setzero_si512();
        for j in (0..len).step_by(32) {
            let v0 = _mm512_castps_si512(load16::<K>(p, i + j));
            let v1 = _mm512_castps_si512(load16::<K>(p, i + j + 16));
            a0 = _mm512_max_epu32(a0, _mm512_and_si512(v0, mask));
            a1 = _mm512_max_epu32(a1, _mm512_and_si512(v1, mask));
        }
        _mm512_reduce_max_epu32(_mm512_max_epu32(a0, a1)) as u32
    }

    /// Cells of the encoding grid per unit: `s` in `[k / 16 - 1, (k + 1) / 16 - 1)` is in
    /// NF4 cell `k` (32 cells over [-1, 1]), `|s|` in `[k / 16, (k + 1) / 16)` in FP4 cell `k`.
    /// Every cell holds at most one decision bound, and every bound is more than 1e-3 from a
    /// cell edge (a test holds both), so a value a rounding error away from an edge that
    /// lands in the neighbouring cell still gets the right code.
    const CELLS_PER_UNIT: f32 = 16.0;

    /// Per-cell lookup tables for [`encode16`], built from the decision bounds.
    pub(super) struct Grid {
        /// NF4: the one bound inside each of 32 cells (+inf if none), as two registers;
        /// FP4: the bound inside each of 16 magnitude cells (only `bound_lo`).
        bound_lo: __m512,
        bound_hi: __m512,
        /// NF4: the code of the cell's lower edge (bounds below it), two registers. FP4: the
        /// 3-bit code at the lower edge (`code_lo`) and above the cell's bound (`code_hi`).
        code_lo: __m512i,
        code_hi: __m512i,
        nf4: bool,
    }

    /// The cells' bounds and codes (see [`CELLS_PER_UNIT`]) for 15 NF4 bounds or 7 FP4
    /// magnitude bounds.
    pub(super) fn grid_tables(decider: &Decider4) -> ([f32; 32], [i32; 32], [i32; 32]) {
        let nf4 = decider.quant_type == QuantType4::Nf4;
        let bounds: &[f32] = if nf4 {
            &decider.bounds
        } else {
            &decider.bounds[..7]
        };
        let (cells, origin) = if nf4 { (32, -1.0f32) } else { (16, 0.0f32) };
        let mut bound = [f32::INFINITY; 32];
        let mut lo = [0i32; 32];
        let mut hi = [0i32; 32];
        for k in 0..cells {
            let left = k as f32 / CELLS_PER_UNIT + origin;
            let right = (k + 1) as f32 / CELLS_PER_UNIT + origin;
            let below = bounds.iter().filter(|&&b| b < left).count();
            if let Some(&b) = bounds.iter().find(|&&b| b >= left && b < right) {
                bound[k] = b;
            }
            if nf4 {
                lo[k] = below as i32;
            } else {
                lo[k] = FP4_MAGNITUDE_CODE[below] as i32;
                hi[k] = FP4_MAGNITUDE_CODE[(below + 1).min(7)] as i32;
            }
        }
        (bound, lo, hi)
    }

    impl Grid {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub(super) unsafe fn new(decider: &Decider4) -> Grid {
            let (bound, lo, hi) = grid_tables(decider);
            let nf4 = decider.quant_type == QuantType4::Nf4;
            if nf4 {
                Grid {
                    bound_lo: _mm512_loadu_ps(bound.as_ptr()),
                    bound_hi: _mm512_loadu_ps(bound.as_ptr().add(16)),
                    code_lo: _mm512_loadu_si512(lo.as_ptr() as *const __m512i),
                    code_hi: _mm512_loadu_si512(lo.as_ptr().add(16) as *const __m512i),
                    nf4,
                }
            } else {
                Grid {
                    bound_lo: _mm512_loadu_ps(bound.as_ptr()),
                    bound_hi: _mm512_setzero_ps(),
                    code_lo: _mm512_loadu_si512(lo.as_ptr() as *const __m512i),
                    code_hi: _mm512_loadu_si512(hi.as_ptr() as *const __m512i),
                    nf4,
                }
            }
        }
    }

    /// Codes of 16 scaled values (`|s| <= 1` up to rounding): the number of bounds each
    /// value exceeds (ties to the lower code), found as the cell's code plus one compare with
    /// the single bound inside the cell; FP4 adds the sign bit for negative values (-0.0 is
    /// not below 0, so it encodes as +0).
    #[inline(always)]
    pub(super) unsafe fn encode16(s: __m512, g: &Grid) -> __m512i {
        let scale = _mm512_set1_ps(CELLS_PER_UNIT);
        if g.nf4 {
            let c = _mm512_cvttps_epi32(_mm512_fmadd_ps(s, scale, scale));
            let c = _mm512_min_epi32(
                _mm512_max_epi32(c, _mm512_setzero_si512()),
                _mm512_set1_epi32(31),
            );
            let b = _mm512_permutex2var_ps(g.bound_lo, c, g.bound_hi);
            let base = _mm512_permutex2var_epi32(g.code_lo, c, g.code_hi);
            let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(s, b);
            _mm512_mask_add_epi32(base, gt, base, _mm512_set1_epi32(1))
        } else {
            let m = _mm512_castsi512_ps(_mm512_and_si512(
                _mm512_castps_si512(s),
                _mm512_set1_epi32(0x7FFF_FFFF),
            ));
            let c = _mm512_cvttps_epi32(_mm512_mul_ps(m, scale));
            let c = _mm512_min_epi32(c, _mm512_set1_epi32(15));
            let b = _mm512_permutexvar_ps(c, g.bound_lo);
            let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, b);
            let code = _mm512_mask_blend_epi32(
                gt,
                _mm512_permutexvar_epi32(c, g.code_lo),
                _mm512_permutexvar_epi32(c, g.code_hi),
            );
            let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(s, _mm512_setzero_ps());
            _mm512_mask_or_epi32(code, neg, code, _mm512_set1_epi32(8))
        }
    }

    /// Quantizes `nblocks` whole blocks of `x` (element type `K`: 0 f32, 1 f16, 2 bf16)
    /// starting at element 0, into `packed` (blocksize / 2 bytes per block) and `absmax`.
    /// Returns whether a block held a NaN / Inf (its codes are then unspecified).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ; `x` holds `nblocks * blocksize` elements, `packed`
    /// `nblocks * blocksize / 2` bytes and `absmax` `nblocks` floats; `blocksize % 32 == 0`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn quantize_blocks<const K: u8>(
        x: *const u8,
        nblocks: usize,
        blocksize: usize,
        decider: &Decider4,
        packed: *mut u8,
        absmax: *mut f32,
    ) -> bool {
        let grid = Grid::new(decider);
        let mut bad = false;
        for blk in 0..nblocks {
            let start = blk * blocksize;
            let bits = absmax_bits::<K>(x, start, blocksize);
            if bits >= 0x7F80_0000 {
                bad = true;
                *absmax.add(blk) = 0.0;
                continue;
            }
            let amax = f32::from_bits(bits);
            *absmax.add(blk) = amax;
            let inv = _mm512_set1_ps(1.0 / amax.max(MIN_ABSMAX));
            let out = packed.add(start / 2);
            for j in (0..blocksize).step_by(32) {
                let s0 = _mm512_mul_ps(load16::<K>(x, start + j), inv);
                let s1 = _mm512_mul_ps(load16::<K>(x, start + j + 16), inv);
                let c0 = _mm512_cvtepi32_epi8(encode16(s0, &grid));
                let c1 = _mm512_cvtepi32_epi8(encode16(s1, &grid));
                // 16 u16 lanes: low byte = code of element 2j, high byte = element 2j + 1.
                let w = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(c0), c1);
                let pairs = _mm256_or_si256(_mm256_slli_epi16::<4>(w), _mm256_srli_epi16::<8>(w));
                _mm_storeu_si128(out.add(j / 2) as *mut __m128i, _mm256_cvtepi16_epi8(pairs));
            }
        }
        bad
    }

    /// [`encode16`] over a slice whose length is a multiple of 16 (tests).
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn encode_slice(decider: &Decider4, s: &[f32], out: &mut [u32]) {
        let grid = Grid::new(decider);
        for (c, o) in s.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
            let k = encode16(_mm512_loadu_ps(c.as_ptr()), &grid);
            _mm512_storeu_si512(o.as_mut_ptr() as *mut __m512i, k);
        }
    }

    /// [`absmax_bits`] of the first `len` elements (a multiple of 32) of `p`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ; `p` holds `len` elements of type `K`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn block_absmax_bits<const K: u8>(p: *const u8, len: usize) -> u32 {
        absmax_bits::<K>(p, 0, len)
    }

    /// A sorted 256-entry codebook as [`encode_8bit`] reads it: `.0[j][m] = code[16 m + j]`.
    pub(super) struct Columns8(pub(super) [[f32; 16]; 16]);

    impl Columns8 {
        pub(super) fn new(code: &[f32; 256]) -> Self {
            Columns8(std::array::from_fn(|j| {
                std::array::from_fn(|m| code[16 * m + j])
            }))
        }
    }

    /// The 8-bit codes of `xb` (element type `K`) divided by `divisor`: the nearest of the 256
    /// sorted `code` values, exactly as [`super::nearest_code_256`] picks it (the last code
    /// <= s, then the distance test against the next one), 16 lanes at a time without
    /// gathers. The codebook is held as 16 registers, `column[j]` lane m = `code[16 m + j]`:
    /// a 4-step search over `column[0]` finds each lane's 16-code segment m, then one
    /// `vpermps` per column gives every lane its segment's code j, counted if <= s (the count
    /// is the lower bound, as the codes are sorted) and kept as the last code <= s and the
    /// first one above it. The tail (< 16) is left to the caller; returns how many were
    /// written.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ; `x` holds `len` elements, `out` `len` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn encode_8bit<const K: u8>(
        x: *const u8,
        len: usize,
        divisor: f32,
        code: &Columns8,
        out: *mut u8,
    ) -> usize {
        let d = _mm512_set1_ps(divisor);
        let columns: [__m512; 16] = std::array::from_fn(|j| _mm512_loadu_ps(code.0[j].as_ptr()));
        let last_code = _mm512_set1_ps(code.0[15][15]);
        let abs = |v: __m512| {
            _mm512_castsi512_ps(_mm512_and_si512(
                _mm512_castps_si512(v),
                _mm512_set1_epi32(0x7FFF_FFFF),
            ))
        };
        let whole = len / 16 * 16;
        for i in (0..whole).step_by(16) {
            let s = _mm512_div_ps(load16::<K>(x, i), d);
            // Segment: the last m with code[16 m] <= s (0 when none).
            let mut seg = _mm512_setzero_si512();
            for step in [8, 4, 2, 1] {
                let probe = _mm512_add_epi32(seg, _mm512_set1_epi32(step));
                let c = _mm512_permutexvar_ps(probe, columns[0]);
                let le = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(c, s);
                seg = _mm512_mask_mov_epi32(seg, le, probe);
            }
            // code[16 m] starts both bounds; the one above starts at the next segment's first
            // code (code[255] past the last segment: `next` is capped at 255).
            let mut below = _mm512_permutexvar_ps(seg, columns[0]);
            let after = _mm512_add_epi32(seg, _mm512_set1_epi32(1));
            let in_last = _mm512_cmpeq_epi32_mask(seg, _mm512_set1_epi32(15));
            let mut above =
                _mm512_mask_mov_ps(_mm512_permutexvar_ps(after, columns[0]), in_last, last_code);
            let mut idx = _mm512_slli_epi32::<4>(seg);
            for col in &columns[1..] {
                let c = _mm512_permutexvar_ps(seg, *col);
                let le = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(c, s);
                idx = _mm512_mask_add_epi32(idx, le, idx, _mm512_set1_epi32(1));
                below = _mm512_mask_mov_ps(below, le, c);
                above = _mm512_mask_min_ps(above, !le, above, c);
            }
            let dn = abs(_mm512_sub_ps(s, above));
            let di = abs(_mm512_sub_ps(s, below));
            let closer = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(dn, di);
            let q = _mm512_mask_add_epi32(idx, closer, idx, _mm512_set1_epi32(1));
            _mm_storeu_si128(out.add(i) as *mut __m128i, _mm512_cvtepi32_epi8(q));
        }
        whole
    }

    /// 16 f32 values as 16-bit element type `K` (1 f16, 2 bf16; round to nearest even).
    #[inline(always)]
    unsafe fn narrow16<const K: u8>(v: __m512) -> __m256i {
        if K == 1 {
            _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
        } else {
            // half's bf16::from_f32 for non-NaN values (the products here are finite):
            // (bits + 0x7FFF + lsb) >> 16. Integer arithmetic, so no DAZ / FTZ.
            let bits = _mm512_castps_si512(v);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let r = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
            _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(r))
        }
    }

    /// Stores 32 f32 values at element `i` of `p` as element type `K` (0 f32, 1 f16,
    /// 2 bf16); `STREAM`: non-temporal stores (the 64-byte lines must be aligned).
    #[inline(always)]
    unsafe fn store32<const K: u8, const STREAM: bool>(
        p: *mut u8,
        i: usize,
        v0: __m512,
        v1: __m512,
    ) {
        if K == 0 {
            let q = (p as *mut f32).add(i);
            if STREAM {
                _mm512_stream_ps(q, v0);
                _mm512_stream_ps(q.add(16), v1);
            } else {
                _mm512_storeu_ps(q, v0);
                _mm512_storeu_ps(q.add(16), v1);
            }
        } else {
            let w = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(narrow16::<K>(v0)),
                narrow16::<K>(v1),
            );
            let q = (p as *mut u16).add(i) as *mut __m512i;
            if STREAM {
                _mm512_stream_si512(q, w);
            } else {
                _mm512_storeu_si512(q, w);
            }
        }
    }

    /// Decodes `nblocks` whole blocks: `table[code] * absmax[block]` in f32, then rounded to
    /// the output type `K` (0 f32, 1 f16, 2 bf16). `STREAM`: non-temporal stores, for
    /// outputs far larger than the caches (no read-for-ownership of the output lines).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ; `packed` holds `nblocks * blocksize / 2` bytes,
    /// `absmax` `nblocks` finite floats, `out` `nblocks * blocksize` elements;
    /// `blocksize % 32 == 0`; with `STREAM`, `out` is 64-byte aligned.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn dequantize_blocks<const K: u8, const STREAM: bool>(
        packed: *const u8,
        absmax: *const f32,
        nblocks: usize,
        blocksize: usize,
        table: &[f32; 16],
        out: *mut u8,
    ) {
        let t = _mm512_loadu_ps(table.as_ptr());
        let lo_nibble = _mm256_set1_epi16(0x0F);
        for blk in 0..nblocks {
            let scale = _mm512_set1_ps(*absmax.add(blk));
            let start = blk * blocksize;
            let src = packed.add(start / 2);
            for j in (0..blocksize).step_by(32) {
                let w = _mm256_cvtepu8_epi16(_mm_loadu_si128(src.add(j / 2) as *const __m128i));
                // Byte 2m = high nibble (element 2m), byte 2m + 1 = low nibble.
                let codes = _mm256_or_si256(
                    _mm256_srli_epi16::<4>(w),
                    _mm256_slli_epi16::<8>(_mm256_and_si256(w, lo_nibble)),
                );
                let i0 = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(codes));
                let i1 = _mm512_cvtepu8_epi32(_mm256_extracti128_si256::<1>(codes));
                let v0 = _mm512_mul_ps(_mm512_permutexvar_ps(i0, t), scale);
                let v1 = _mm512_mul_ps(_mm512_permutexvar_ps(i1, t), scale);
                store32::<K, STREAM>(out, start + j, v0, v1);
            }
        }
        if STREAM {
            _mm_sfence();
        }
    }
}

/// Block-wise 4-bit quantization into caller-provided buffers
/// (`packed`: `packed_len(x.len())` bytes, `absmax`: one per block). Runs on the current
/// rayon pool, on the highest SIMD level of this CPU ([`SimdLevel::detect`]).
pub fn quantize_4bit_into<T: Element>(
    x: &[T],
    blocksize: usize,
    quant_type: QuantType4,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    quantize_4bit_into_with(
        x,
        blocksize,
        quant_type,
        packed,
        absmax,
        SimdLevel::detect(),
    )
}

/// [`quantize_4bit_into`] on a given SIMD level (one the CPU lacks is
/// [`Error::UnsupportedSimd`]); every level writes the same bytes.
pub fn quantize_4bit_into_with<T: Element>(
    x: &[T],
    blocksize: usize,
    quant_type: QuantType4,
    packed: &mut [u8],
    absmax: &mut [f32],
    level: SimdLevel,
) -> Result<()> {
    quantize_4bit_into_on(
        Threads::Current,
        x,
        blocksize,
        quant_type,
        packed,
        absmax,
        level,
    )
}

/// [`quantize_4bit_into_with`] on the given threads (the caller always works; see
/// [`crate::parallel`]): the bindings pass torch's own OpenMP team, so a quantize right after
/// a torch op does not compete with that team's spinning threads for the cores.
pub fn quantize_4bit_into_on<T: Element>(
    threads: Threads,
    x: &[T],
    blocksize: usize,
    quant_type: QuantType4,
    packed: &mut [u8],
    absmax: &mut [f32],
    level: SimdLevel,
) -> Result<()> {
    let level = level.checked()?;
    check_blocksize(blocksize)?;
    let n = x.len();
    let nb = num_blocks(n, blocksize);
    check_len("packed output", packed_len(n), packed.len())?;
    check_len("absmax output", nb, absmax.len())?;
    let decider = Decider4::new(quant_type);
    // Tasks of >= 64K elements amortize the per-task scratch setup; still hundreds of tasks
    // for a 4096x4096 weight.
    let blocks_per_task = MIN_BLOCKS_PER_TASK.max((1 << 16) / blocksize);
    let task_elems = blocksize * blocks_per_task; // even: blocksizes are powers of two >= 32
    let bad = AtomicBool::new(false);
    // Task t: elements [t * task_elems, ..) of x, their packed bytes and their absmax.
    par_chunks2_mut(
        threads,
        packed,
        task_elems / 2,
        absmax,
        blocks_per_task,
        |t, ps, ams| {
            let x0 = t * task_elems;
            let xs = &x[x0..(x0 + task_elems).min(n)];
            let first_block = t * blocks_per_task;
            if quantize_blocks_4bit(xs, ps, ams, blocksize, &decider, n, first_block, level) {
                bad.store(true, Ordering::Relaxed);
            }
        },
    );
    if bad.load(Ordering::Relaxed) {
        return Err(non_finite_error(x));
    }
    Ok(())
}

/// Block-wise 4-bit quantization (NF4 or FP4).
pub fn quantize_4bit<T: Element>(
    x: &[T],
    blocksize: usize,
    quant_type: QuantType4,
) -> Result<Packed4> {
    check_blocksize(blocksize)?;
    let mut packed = vec![0u8; packed_len(x.len())];
    let mut absmax = vec![0.0f32; num_blocks(x.len(), blocksize)];
    quantize_4bit_into(x, blocksize, quant_type, &mut packed, &mut absmax)?;
    Ok(Packed4 { packed, absmax })
}

fn non_finite_error<T: Element>(x: &[T]) -> Error {
    match first_non_finite(x) {
        Some((index, value)) => Error::NonFinite { index, value },
        None => unreachable!("a block reported a non-finite value that a rescan cannot find"),
    }
}

/// Checks absmax values read from a file or passed by a caller before they scale anything.
fn check_absmax(absmax: &[f32]) -> Result<()> {
    match absmax.iter().position(|a| !a.is_finite()) {
        Some(index) => Err(Error::NonFinite {
            index,
            value: absmax[index],
        }),
        None => Ok(()),
    }
}

#[inline(always)]
fn dequantize_blocks_4bit_impl<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    out: &mut [T],
    blocksize: usize,
    table: &[f32; 16],
) {
    for ((ob, pb), &scale) in out
        .chunks_mut(blocksize)
        .zip(packed.chunks(blocksize / 2))
        .zip(absmax)
    {
        let pairs = ob.len() / 2;
        for (o, &byte) in ob.chunks_exact_mut(2).zip(&pb[..pairs]) {
            o[0] = T::from_f32(table[(byte >> 4) as usize] * scale);
            o[1] = T::from_f32(table[(byte & 0x0F) as usize] * scale);
        }
        if ob.len() % 2 == 1 {
            ob[ob.len() - 1] = T::from_f32(table[(pb[pairs] >> 4) as usize] * scale);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_blocks_4bit_avx2<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    out: &mut [T],
    blocksize: usize,
    table: &[f32; 16],
) {
    dequantize_blocks_4bit_impl(packed, absmax, out, blocksize, table)
}

/// One task's run of blocks on `level` (as [`quantize_blocks_4bit`]).
fn dequantize_blocks_4bit<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    out: &mut [T],
    blocksize: usize,
    table: &[f32; 16],
    level: SimdLevel,
    stream: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if level >= SimdLevel::Avx512 {
            let whole = out.len() / blocksize;
            let elems = whole * blocksize;
            let raw = out.as_mut_ptr() as *mut u8;
            let (pp, ap) = (packed.as_ptr(), absmax.as_ptr());
            // SAFETY: the level was checked against the CPU by the caller; the slices hold
            // `whole` blocks (lengths checked there), and every absmax is finite.
            unsafe {
                use avx512::{dequantize_blocks as d, Kind};
                match (
                    Kind::of(T::DTYPE),
                    stream && (raw as usize).is_multiple_of(64),
                ) {
                    (Kind::F32, false) => d::<0, false>(pp, ap, whole, blocksize, table, raw),
                    (Kind::F16, false) => d::<1, false>(pp, ap, whole, blocksize, table, raw),
                    (Kind::BF16, false) => d::<2, false>(pp, ap, whole, blocksize, table, raw),
                    (Kind::F32, true) => d::<0, true>(pp, ap, whole, blocksize, table, raw),
                    (Kind::F16, true) => d::<1, true>(pp, ap, whole, blocksize, table, raw),
                    (Kind::BF16, true) => d::<2, true>(pp, ap, whole, blocksize, table, raw),
                }
            }
            if elems < out.len() {
                dequantize_blocks_4bit_impl(
                    &packed[elems / 2..],
                    &absmax[whole..],
                    &mut out[elems..],
                    blocksize,
                    table,
                );
            }
            return;
        }
        if level >= SimdLevel::Avx2 {
            // SAFETY: the level was checked against the CPU by the caller.
            unsafe { dequantize_blocks_4bit_avx2(packed, absmax, out, blocksize, table) };
            return;
        }
    }
    let _ = (level, stream);
    dequantize_blocks_4bit_impl(packed, absmax, out, blocksize, table)
}

/// Block-wise 4-bit dequantization into `out` (its length is the element count), on the
/// highest SIMD level of this CPU.
pub fn dequantize_4bit_into<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    quant_type: QuantType4,
    out: &mut [T],
) -> Result<()> {
    dequantize_4bit_into_with(
        packed,
        absmax,
        blocksize,
        quant_type,
        out,
        SimdLevel::detect(),
    )
}

/// [`dequantize_4bit_into`] on a given SIMD level; every level writes the same values.
pub fn dequantize_4bit_into_with<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    quant_type: QuantType4,
    out: &mut [T],
    level: SimdLevel,
) -> Result<()> {
    let level = level.checked()?;
    check_blocksize(blocksize)?;
    let n = out.len();
    check_len("packed input", packed_len(n), packed.len())?;
    check_len("absmax", num_blocks(n, blocksize), absmax.len())?;
    check_absmax(absmax)?;
    let table = quant_type.table();
    // >= 64K elements per task: a task of 4K bf16 outputs takes about as long as rayon's
    // scheduling of it.
    let per_task = MIN_BLOCKS_PER_TASK.max((1 << 16) / blocksize);
    // An output far larger than the caches is written around them: a task's chunk starts
    // a whole number of 64-byte lines after an aligned `out` (blocks are >= 32 elements).
    let stream = std::mem::size_of_val(out) >= STREAM_MIN_BYTES;
    out.par_chunks_mut(blocksize * per_task)
        .zip(packed.par_chunks(blocksize / 2 * per_task))
        .zip(absmax.par_chunks(per_task))
        .for_each(|((o, p), a)| dequantize_blocks_4bit(p, a, o, blocksize, table, level, stream));
    Ok(())
}

/// Block-wise 4-bit dequantization of `n` elements.
pub fn dequantize_4bit<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    n: usize,
    blocksize: usize,
    quant_type: QuantType4,
) -> Result<Vec<T>> {
    let mut out = vec![T::from_f32(0.0); n];
    dequantize_4bit_into(packed, absmax, blocksize, quant_type, &mut out)?;
    Ok(out)
}

/// Index of the nearest code (ties to the lower index) in an ascending codebook of at most
/// 256 entries: the left neighbour by binary search, then a distance comparison, as
/// bitsandbytes' CPU kernel does (it sometimes misses the nearest; this does not).
#[inline(always)]
pub fn nearest_code(code: &[f32], s: f32) -> u8 {
    if let Ok(book) = <&[f32; 256]>::try_from(code) {
        return nearest_code_256(book, s);
    }
    let idx = code.partition_point(|&c| c <= s).saturating_sub(1);
    if idx + 1 < code.len() && (s - code[idx + 1]).abs() < (s - code[idx]).abs() {
        (idx + 1) as u8
    } else {
        idx as u8
    }
}

/// [`nearest_code`] for the 256-entry maps of 8-bit quantization.
#[inline(always)]
pub fn nearest_code_256(code: &[f32; 256], s: f32) -> u8 {
    // Branch-free lower bound (last index whose code is <= s, or 0): data-dependent
    // branches here mispredict half the time and cost ~4x the arithmetic. The probe index
    // never exceeds 255, and the mask lets the compiler drop the bounds check.
    let mut idx = 0usize;
    for step in [128usize, 64, 32, 16, 8, 4, 2, 1] {
        idx += step * (code[(idx + step) & 255] <= s) as usize;
    }
    let next = (idx + 1).min(255);
    let closer = (s - code[next]).abs() < (s - code[idx]).abs();
    (idx + closer as usize) as u8
}

/// Block-wise 8-bit quantization against a sorted 256-entry codebook (the dynamic map).
/// Values are divided by the block absmax and mapped to the nearest code. Runs on the
/// highest SIMD level of this CPU.
pub fn quantize_8bit<T: Element>(x: &[T], code: &[f32], blocksize: usize) -> Result<Blockwise8> {
    quantize_8bit_with(x, code, blocksize, SimdLevel::detect())
}

/// [`quantize_8bit`] on a given SIMD level; every level writes the same codes.
pub fn quantize_8bit_with<T: Element>(
    x: &[T],
    code: &[f32],
    blocksize: usize,
    level: SimdLevel,
) -> Result<Blockwise8> {
    let level = level.checked()?;
    #[cfg(not(target_arch = "x86_64"))]
    let _ = level; // only x86 has kernels beyond the portable loop
    check_blocksize(blocksize)?;
    check_sorted_codebook(code, 256)?;
    let book: &[f32; 256] = code.try_into().expect("checked: 256 entries");
    let n = x.len();
    let mut codes = vec![0u8; n];
    let mut absmax = vec![0.0f32; num_blocks(n, blocksize)];
    #[cfg(target_arch = "x86_64")]
    let columns = avx512::Columns8::new(book);
    let bad = x
        .par_chunks(blocksize)
        .zip(codes.par_chunks_mut(blocksize))
        .zip(absmax.par_iter_mut())
        .with_min_len(MIN_BLOCKS_PER_TASK)
        .map(|((xb, cb), am)| {
            let mut amax = 0.0f32;
            let mut bad = false;
            #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
            let mut scanned = 0;
            #[cfg(target_arch = "x86_64")]
            if level >= SimdLevel::Avx512 {
                scanned = xb.len() / 32 * 32;
                let raw = xb.as_ptr() as *const u8;
                // SAFETY: the level was checked against the CPU; `xb` holds `scanned`.
                let bits = unsafe {
                    match avx512::Kind::of(T::DTYPE) {
                        avx512::Kind::F32 => avx512::block_absmax_bits::<0>(raw, scanned),
                        avx512::Kind::F16 => avx512::block_absmax_bits::<1>(raw, scanned),
                        avx512::Kind::BF16 => avx512::block_absmax_bits::<2>(raw, scanned),
                    }
                };
                // NaN / Inf order above every finite |x| (see `absmax_bits`).
                bad = bits >= f32::INFINITY.to_bits();
                amax = if bad { 0.0 } else { f32::from_bits(bits) };
            }
            for v in &xb[scanned..] {
                let a = v.to_f32().abs();
                amax = if a > amax { a } else { amax };
                #[allow(clippy::neg_cmp_op_on_partial_ord)]
                {
                    bad |= !(a <= f32::MAX);
                }
            }
            let divisor = amax.max(MIN_ABSMAX);
            #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if level >= SimdLevel::Avx512 && !bad {
                let raw = xb.as_ptr() as *const u8;
                let (len, o) = (xb.len(), cb.as_mut_ptr());
                // SAFETY: the level was checked against the CPU; `xb` and `cb` hold `len`.
                done = unsafe {
                    match avx512::Kind::of(T::DTYPE) {
                        avx512::Kind::F32 => {
                            avx512::encode_8bit::<0>(raw, len, divisor, &columns, o)
                        }
                        avx512::Kind::F16 => {
                            avx512::encode_8bit::<1>(raw, len, divisor, &columns, o)
                        }
                        avx512::Kind::BF16 => {
                            avx512::encode_8bit::<2>(raw, len, divisor, &columns, o)
                        }
                    }
                };
            }
            for (c, v) in cb[done..].iter_mut().zip(&xb[done..]) {
                *c = nearest_code_256(book, v.to_f32() / divisor);
            }
            *am = amax;
            bad
        })
        .reduce(|| false, |a, b| a | b);
    if bad {
        return Err(non_finite_error(x));
    }
    Ok(Blockwise8 { codes, absmax })
}

/// Block-wise 8-bit dequantization: `code[q] * absmax[block]`.
pub fn dequantize_8bit_into<T: Element>(
    codes: &[u8],
    absmax: &[f32],
    code: &[f32],
    blocksize: usize,
    out: &mut [T],
) -> Result<()> {
    check_blocksize(blocksize)?;
    if code.len() != 256 {
        return Err(Error::InvalidCodebook {
            expected: 256,
            problem: "wrong length",
        });
    }
    check_len("output", codes.len(), out.len())?;
    check_len("absmax", num_blocks(codes.len(), blocksize), absmax.len())?;
    check_absmax(absmax)?;
    out.par_chunks_mut(blocksize)
        .zip(codes.par_chunks(blocksize))
        .zip(absmax.par_iter())
        .with_min_len(MIN_BLOCKS_PER_TASK)
        .for_each(|((ob, cb), &scale)| {
            for (o, &q) in ob.iter_mut().zip(cb) {
                *o = T::from_f32(code[q as usize] * scale);
            }
        });
    Ok(())
}

pub fn dequantize_8bit<T: Element>(
    codes: &[u8],
    absmax: &[f32],
    code: &[f32],
    blocksize: usize,
) -> Result<Vec<T>> {
    let mut out = vec![T::from_f32(0.0); codes.len()];
    dequantize_8bit_into(codes, absmax, code, blocksize, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codebook::dynamic_map;
    use half::{bf16, f16};
    use proptest::prelude::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        // Deterministic pseudo-normal values (sum of uniforms) without a rand dependency.
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                let mut acc = 0.0f32;
                for _ in 0..4 {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    acc += ((s >> 40) as f32) / (1u64 << 24) as f32 - 0.5;
                }
                acc
            })
            .collect()
    }

    /// Reference: nearest code by exhaustive search in f64, ties to the lower code.
    fn reference_nf4_code(s: f32) -> u8 {
        let bounds = midpoints::<16, 15>(&NF4);
        bounds.iter().filter(|b| s > **b).count() as u8
    }

    #[test]
    fn packing_layout_high_nibble_first() {
        // Values picked to land exactly on codes 15, 0 and 7 within one block.
        let x = [1.0f32, -1.0, 0.0];
        let q = quantize_4bit(&x, 64, QuantType4::Nf4).unwrap();
        assert_eq!(q.packed, vec![0xF0, 0x77]);
        assert_eq!(q.absmax, vec![1.0]);
    }

    #[test]
    fn odd_length_pads_with_zero_code() {
        let x = [0.5f32];
        let q = quantize_4bit(&x, 64, QuantType4::Fp4).unwrap();
        assert_eq!(q.packed.len(), 1);
        assert_eq!(q.packed[0] & 0x0F, 0);
        assert_eq!(q.packed[0] >> 4, 3); // 0.5/0.5 = 1.0 -> FP4 code 3
    }

    #[test]
    fn all_zero_block_decodes_to_zeros() {
        for qt in [QuantType4::Nf4, QuantType4::Fp4] {
            let x = vec![0.0f32; 100];
            let q = quantize_4bit(&x, 64, qt).unwrap();
            assert_eq!(q.absmax, vec![0.0, 0.0]);
            let y: Vec<f32> = dequantize_4bit(&q.packed, &q.absmax, 100, 64, qt).unwrap();
            assert!(y.iter().all(|v| *v == 0.0));
        }
    }

    #[test]
    fn nf4_ties_go_to_lower_code() {
        let bounds = midpoints::<16, 15>(&NF4);
        for (i, b) in bounds.iter().enumerate() {
            // Block of [1.0, b]: absmax 1, so b scales to itself.
            let q = quantize_4bit(&[1.0f32, *b], 64, QuantType4::Nf4).unwrap();
            assert_eq!(q.packed[0] & 0x0F, i as u8, "bound {i} = {b}");
        }
    }

    #[test]
    fn fp4_sign_and_negative_zero() {
        let q = quantize_4bit(&[1.0f32, -0.0, -1.0, -0.5], 64, QuantType4::Fp4).unwrap();
        assert_eq!(q.packed, vec![0x30, 0xBD]);
        let fp4_ties = midpoints::<8, 7>(&FP4_MAGNITUDE_SORTED);
        for (k, t) in fp4_ties.iter().enumerate() {
            let q = quantize_4bit(&[1.0f32, -*t], 64, QuantType4::Fp4).unwrap();
            // Tie goes to the lower magnitude, sign bit set.
            assert_eq!(q.packed[0] & 0x0F, FP4_MAGNITUDE_CODE[k] | 8);
        }
    }

    #[test]
    fn codes_match_reference_and_error_is_bounded() {
        for &(n, bs) in &[
            (1usize, 64usize),
            (63, 32),
            (4097, 64),
            (10_000, 128),
            (70_001, 4096),
        ] {
            let x = lcg(n as u64, n);
            let q = quantize_4bit(&x, bs, QuantType4::Nf4).unwrap();
            for (b, block) in x.chunks(bs).enumerate() {
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert_eq!(q.absmax[b], amax);
                for (j, v) in block.iter().enumerate() {
                    let i = b * bs + j;
                    let full = (b + 1) * bs <= n;
                    let s = if full { v * (1.0 / amax) } else { v / amax };
                    let byte = q.packed[i / 2];
                    let code = if i % 2 == 0 { byte >> 4 } else { byte & 0xF };
                    assert_eq!(code, reference_nf4_code(s), "n={n} i={i}");
                }
            }
            let y: Vec<f32> =
                dequantize_4bit(&q.packed, &q.absmax, n, bs, QuantType4::Nf4).unwrap();
            for (b, (xb, yb)) in x.chunks(bs).zip(y.chunks(bs)).enumerate() {
                // Largest NF4 gap is -0.6962 - (-1): half of it bounds the error.
                let bound = q.absmax[b] as f64 * 0.1520;
                for (a, c) in xb.iter().zip(yb) {
                    assert!(((*a as f64) - (*c as f64)).abs() <= bound + 1e-7);
                }
            }
        }
    }

    #[test]
    fn dtypes_agree() {
        let x = lcg(7, 1000);
        let xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
        let xh: Vec<f16> = x.iter().map(|v| f16::from_f32(*v)).collect();
        let xb32: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        let xh32: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
        assert_eq!(
            quantize_4bit(&xb, 64, QuantType4::Nf4).unwrap(),
            quantize_4bit(&xb32, 64, QuantType4::Nf4).unwrap()
        );
        assert_eq!(
            quantize_4bit(&xh, 64, QuantType4::Fp4).unwrap(),
            quantize_4bit(&xh32, 64, QuantType4::Fp4).unwrap()
        );
        let q = quantize_4bit(&x, 64, QuantType4::Nf4).unwrap();
        let y32: Vec<f32> =
            dequantize_4bit(&q.packed, &q.absmax, 1000, 64, QuantType4::Nf4).unwrap();
        let yb: Vec<bf16> =
            dequantize_4bit(&q.packed, &q.absmax, 1000, 64, QuantType4::Nf4).unwrap();
        for (a, b) in y32.iter().zip(&yb) {
            assert_eq!(bf16::from_f32(*a), *b);
        }
    }

    #[test]
    fn non_finite_input_is_reported_with_its_index() {
        let mut x = lcg(3, 5000);
        x[4321] = f32::NAN;
        x[4999] = f32::INFINITY;
        match quantize_4bit(&x, 64, QuantType4::Nf4) {
            Err(Error::NonFinite { index, value }) => {
                assert_eq!(index, 4321);
                assert!(value.is_nan());
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
        x[4321] = 0.0;
        assert!(matches!(
            quantize_8bit(&x, &dynamic_map(true), 256),
            Err(Error::NonFinite { index: 4999, .. })
        ));
    }

    #[test]
    fn invalid_blocksizes_and_lengths() {
        let x = [1.0f32; 10];
        for bs in [0, 16, 48, 100, 8192] {
            assert!(matches!(
                quantize_4bit(&x, bs, QuantType4::Nf4),
                Err(Error::InvalidBlocksize(b)) if b == bs
            ));
        }
        let q = quantize_4bit(&x, 64, QuantType4::Nf4).unwrap();
        assert!(matches!(
            dequantize_4bit::<f32>(&q.packed, &q.absmax, 12, 64, QuantType4::Nf4),
            Err(Error::LengthMismatch {
                what: "packed input",
                ..
            })
        ));
        assert!(matches!(
            dequantize_4bit::<f32>(&q.packed, &[], 10, 64, QuantType4::Nf4),
            Err(Error::LengthMismatch { what: "absmax", .. })
        ));
        assert!(matches!(
            dequantize_4bit::<f32>(&q.packed, &[f32::NAN], 10, 64, QuantType4::Nf4),
            Err(Error::NonFinite { index: 0, .. })
        ));
        assert!(matches!(
            quantize_8bit(&x, &[0.0; 10], 64),
            Err(Error::InvalidCodebook { .. })
        ));
    }

    #[test]
    fn nearest_code_ties_and_edges() {
        let small = [-1.0f32, 0.0, 0.5, 1.0];
        assert_eq!(nearest_code(&small, -0.5), 0);
        assert_eq!(nearest_code(&small, 0.76), 3);
        assert_eq!(nearest_code(&small, 9.0), 3);
        // A 256-entry book: -1, 0, 0.5, then 1, 2, 3, ..., 253.
        let mut code: [f32; 256] = std::array::from_fn(|k| k as f32 - 2.0);
        code[..3].copy_from_slice(&[-1.0, 0.0, 0.5]);
        assert_eq!(nearest_code(&code, -2.0), 0);
        assert_eq!(nearest_code(&code, -0.5), 0); // tie -> lower
        assert_eq!(nearest_code(&code, -0.49), 1);
        assert_eq!(nearest_code(&code, 0.25), 1); // tie -> lower
        assert_eq!(nearest_code(&code, 0.76), 3);
        assert_eq!(nearest_code(&code, 5.0), 7);
        assert_eq!(nearest_code(&code, 5.5), 7); // tie -> lower
        assert_eq!(nearest_code(&code, 1e9), 255);
        // Exhaustive check against a linear scan on the real map.
        let dm = crate::codebook::dynamic_map(true);
        for i in 0..20_001 {
            let s = -1.0 + i as f32 * 1e-4;
            let best = (0..256)
                .min_by(|&a, &b| {
                    (s - dm[a])
                        .abs()
                        .total_cmp(&(s - dm[b]).abs())
                        .then(a.cmp(&b))
                })
                .unwrap();
            assert_eq!(nearest_code(&dm, s) as usize, best, "s = {s}");
        }
    }

    #[test]
    fn blockwise_8bit_round_trip() {
        for signed in [true, false] {
            let code = dynamic_map(signed);
            let mut x = lcg(11, 3001);
            if !signed {
                x.iter_mut().for_each(|v| *v = v.abs());
            }
            let q = quantize_8bit(&x, &code, 256).unwrap();
            let y: Vec<f32> = dequantize_8bit(&q.codes, &q.absmax, &code, 256).unwrap();
            for (b, (xb, yb)) in x.chunks(256).zip(y.chunks(256)).enumerate() {
                let amax = q.absmax[b];
                for (a, c) in xb.iter().zip(yb) {
                    // Dynamic map gaps are at most ~0.0141 near +-1.
                    assert!((a - c).abs() <= amax * 0.0071 + 1e-7, "{a} vs {c}");
                }
            }
        }
    }

    /// Deterministic 64-bit stream (splitmix64) for the SIMD comparisons.
    fn bits_stream(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    /// Finite f32 inputs that exercise every branch: normal values, exact code bounds and
    /// table values (ties), +-0.0, subnormals, huge values, all-zero and constant blocks,
    /// and arbitrary finite bit patterns.
    fn tricky_inputs(seed: u64, n: usize, blocksize: usize) -> Vec<f32> {
        let mut next = bits_stream(seed);
        let nf4_bounds = midpoints::<16, 15>(&NF4);
        let fp4_bounds = midpoints::<8, 7>(&FP4_MAGNITUDE_SORTED);
        let normal = lcg(seed, n);
        let mut x: Vec<f32> = (0..n)
            .map(|i| {
                let r = next();
                match r % 16 {
                    0 => nf4_bounds[(r >> 8) as usize % 15] * if r & 16 != 0 { -1.0 } else { 1.0 },
                    1 => fp4_bounds[(r >> 8) as usize % 7] * if r & 16 != 0 { -1.0 } else { 1.0 },
                    2 => NF4[(r >> 8) as usize % 16],
                    3 => {
                        if r & 16 != 0 {
                            -0.0
                        } else {
                            0.0
                        }
                    }
                    4 => f32::from_bits(((r >> 8) as u32) & 0x807F_FFFF), // subnormal
                    5 => {
                        let b = (r >> 8) as u32;
                        let v = f32::from_bits(b);
                        if v.is_finite() {
                            v
                        } else {
                            1.0
                        }
                    }
                    6 => 1.0,
                    7 => -1.0,
                    _ => normal[i],
                }
            })
            .collect();
        // One all-zero block, one block of one repeated value, one block of subnormals.
        for (b, block) in x.chunks_mut(blocksize).enumerate() {
            match b % 7 {
                3 => block.iter_mut().for_each(|v| *v = 0.0),
                4 => block.iter_mut().for_each(|v| *v = -0.5),
                5 => block
                    .iter_mut()
                    .for_each(|v| *v = f32::from_bits(v.to_bits() & 0x807F_FFFF)),
                _ => {}
            }
        }
        x
    }

    fn assert_levels_quantize_alike<T: Element + std::fmt::Debug>(
        x: &[T],
        bs: usize,
        qt: QuantType4,
    ) {
        let n = x.len();
        let mut want_p = vec![0u8; packed_len(n)];
        let mut want_a = vec![0f32; num_blocks(n, bs)];
        let want =
            quantize_4bit_into_with(x, bs, qt, &mut want_p, &mut want_a, SimdLevel::Portable);
        for level in SimdLevel::available() {
            let mut p = vec![0xAAu8; packed_len(n)];
            let mut a = vec![f32::NAN; num_blocks(n, bs)];
            let got = quantize_4bit_into_with(x, bs, qt, &mut p, &mut a, level);
            match (&want, &got) {
                (Ok(()), Ok(())) => {
                    assert_eq!(p, want_p, "{level:?} n={n} bs={bs} {qt:?} {:?}", T::DTYPE);
                    let (ab, wb): (Vec<u32>, Vec<u32>) = (
                        a.iter().map(|v| v.to_bits()).collect(),
                        want_a.iter().map(|v| v.to_bits()).collect(),
                    );
                    assert_eq!(ab, wb, "{level:?} absmax n={n} bs={bs}");
                }
                (
                    Err(Error::NonFinite { index: i, value: v }),
                    Err(Error::NonFinite { index: j, value: w }),
                ) => assert!(i == j && v.to_bits() == w.to_bits(), "{level:?}"),
                (w, g) => panic!("{level:?}: portable {w:?}, level {g:?}"),
            }
        }
    }

    #[test]
    fn simd_levels_quantize_bit_identical() {
        let lengths = |bs: usize| {
            [
                1,
                2,
                31,
                33,
                bs - 1,
                bs,
                bs + 1,
                3 * bs,
                5 * bs + 17,
                70_001,
            ]
        };
        for bs_pow in 5..=12 {
            let bs = 1usize << bs_pow;
            for (k, n) in lengths(bs).into_iter().enumerate() {
                let x = tricky_inputs((bs_pow * 100 + k) as u64, n, bs);
                let xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
                let xh: Vec<f16> = x.iter().map(|v| f16::from_f32(*v)).collect();
                // f16 may round huge values to inf: keep those finite.
                let xh: Vec<f16> = xh
                    .into_iter()
                    .map(|v| if v.is_finite() { v } else { f16::from_f32(1.0) })
                    .collect();
                let xb: Vec<bf16> = xb
                    .into_iter()
                    .map(|v| {
                        if v.is_finite() {
                            v
                        } else {
                            bf16::from_f32(1.0)
                        }
                    })
                    .collect();
                for qt in [QuantType4::Nf4, QuantType4::Fp4] {
                    assert_levels_quantize_alike(&x, bs, qt);
                    assert_levels_quantize_alike(&xb, bs, qt);
                    assert_levels_quantize_alike(&xh, bs, qt);
                }
            }
        }
    }

    /// `x` in a 16-bit type, with the finite f32 values too large for it (which would round to
    /// inf) zeroed: only the positions `planted` says stay non-finite.
    fn narrowed<T: Element>(x: &[f32], planted: impl Fn(usize) -> bool) -> Vec<T> {
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                let h = T::from_f32(v);
                if h.to_f32().is_finite() || planted(i) {
                    h
                } else {
                    T::from_f32(0.0)
                }
            })
            .collect()
    }

    #[test]
    fn simd_levels_report_the_same_non_finite() {
        for bs in [32usize, 64, 4096] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
                for at in [0usize, 5, bs - 1, bs + 3, 3 * bs + 1] {
                    let mut x = tricky_inputs(at as u64, 4 * bs + 9, bs);
                    x[at] = bad;
                    x[4 * bs + 5] = f32::NAN; // a second one, in the partial block
                    let planted = |i: usize| i == at || i == 4 * bs + 5;
                    let xb: Vec<bf16> = narrowed(&x, planted);
                    let xh: Vec<f16> = narrowed(&x, planted);
                    for qt in [QuantType4::Nf4, QuantType4::Fp4] {
                        assert_levels_quantize_alike(&x, bs, qt);
                        assert_levels_quantize_alike(&xb, bs, qt);
                        assert_levels_quantize_alike(&xh, bs, qt);
                        assert!(matches!(
                            quantize_4bit(&xb, bs, qt),
                            Err(Error::NonFinite { index, .. }) if index == at
                        ));
                    }
                }
            }
        }
    }

    fn assert_levels_dequantize_alike<T: Element + std::fmt::Debug + PartialEq>(
        packed: &[u8],
        absmax: &[f32],
        n: usize,
        bs: usize,
        qt: QuantType4,
    ) {
        let want: Vec<T> = {
            let mut o = vec![T::from_f32(0.0); n];
            dequantize_4bit_into_with(packed, absmax, bs, qt, &mut o, SimdLevel::Portable).unwrap();
            o
        };
        for level in SimdLevel::available() {
            let mut o = vec![T::from_f32(7.0); n];
            dequantize_4bit_into_with(packed, absmax, bs, qt, &mut o, level).unwrap();
            let same = o
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits());
            assert!(same, "{level:?} n={n} bs={bs} {qt:?} {:?}", T::DTYPE);
        }
    }

    #[test]
    fn simd_levels_dequantize_bit_identical() {
        for bs_pow in 5..=12 {
            let bs = 1usize << bs_pow;
            for (k, n) in [
                1,
                2,
                31,
                33,
                bs - 1,
                bs,
                bs + 1,
                3 * bs,
                5 * bs + 17,
                70_001,
            ]
            .into_iter()
            .enumerate()
            {
                let mut next = bits_stream((bs_pow * 1000 + k) as u64);
                let mut packed: Vec<u8> = (0..packed_len(n)).map(|_| next() as u8).collect();
                if n % 2 == 1 {
                    // A real odd tail carries the zero code in its low nibble; any value decodes.
                    let last = packed.len() - 1;
                    packed[last] |= 0x0F;
                }
                // Finite scales over the whole range: subnormal, tiny, ordinary, huge, zero.
                let absmax: Vec<f32> = (0..num_blocks(n, bs))
                    .map(|b| {
                        let r = next();
                        match b % 6 {
                            0 => f32::from_bits((r as u32) & 0x007F_FFFF),
                            1 => 0.0,
                            2 => f32::MAX,
                            3 => {
                                let v = f32::from_bits((r as u32) & 0x7FFF_FFFF);
                                if v.is_finite() {
                                    v
                                } else {
                                    3.0
                                }
                            }
                            _ => lcg(r, 1)[0].abs(),
                        }
                    })
                    .collect();
                for qt in [QuantType4::Nf4, QuantType4::Fp4] {
                    assert_levels_dequantize_alike::<f32>(&packed, &absmax, n, bs, qt);
                    assert_levels_dequantize_alike::<bf16>(&packed, &absmax, n, bs, qt);
                    assert_levels_dequantize_alike::<f16>(&packed, &absmax, n, bs, qt);
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_grid_cells_hold_one_bound_far_from_their_edges() {
        for qt in [QuantType4::Nf4, QuantType4::Fp4] {
            let d = Decider4::new(qt);
            let (bounds, cells, origin) = match qt {
                QuantType4::Nf4 => (&d.bounds[..], 32, -1.0f64),
                QuantType4::Fp4 => (&d.bounds[..7], 16, 0.0f64),
            };
            for k in 0..cells {
                let left = k as f64 / 16.0 + origin;
                let inside = bounds
                    .iter()
                    .filter(|&&b| (b as f64) >= left && (b as f64) < left + 1.0 / 16.0)
                    .count();
                assert!(inside <= 1, "{qt:?} cell {k} holds {inside} bounds");
            }
            for &b in bounds {
                let edge = ((b as f64 - origin) * 16.0).round() / 16.0 + origin;
                assert!(
                    (b as f64 - edge).abs() > 1e-3,
                    "{qt:?} bound {b} near edge {edge}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_encoder_matches_portable_on_every_value_that_matters() {
        if !SimdLevel::Avx512.is_available() {
            return;
        }
        // Every bfloat16 value in [-1.01, 1.01], every f32 within 300 ulps of each bound,
        // cell edge and +-1, and a million uniform values (scaled inputs lie in [-1, 1] up to
        // the rounding of x * (1 / absmax)).
        let mut s: Vec<f32> = (0..=u16::MAX)
            .map(|b| f32::from_bits((b as u32) << 16))
            .filter(|v| v.abs() <= 1.01)
            .collect();
        let mut centres: Vec<f32> = (0..=32).map(|k| k as f32 / 16.0 - 1.0).collect();
        centres.extend(midpoints::<16, 15>(&NF4));
        centres.extend(midpoints::<8, 7>(&FP4_MAGNITUDE_SORTED));
        for c in centres {
            for sign in [1.0f32, -1.0] {
                let c = c * sign;
                for d in -300i32..=300 {
                    let v = if c == 0.0 {
                        f32::from_bits(d.unsigned_abs()) * d.signum() as f32
                    } else {
                        f32::from_bits((c.to_bits() as i64 + d as i64) as u32)
                    };
                    if v.is_finite() && v.abs() <= 1.01 {
                        s.push(v);
                    }
                }
            }
        }
        let mut next = bits_stream(42);
        s.extend(
            (0..1_000_000).map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32) * 2.02 - 1.01),
        );
        s.extend([0.0, -0.0, 1.0, -1.0]);
        while !s.len().is_multiple_of(16) {
            s.push(0.5);
        }
        for qt in [QuantType4::Nf4, QuantType4::Fp4] {
            let d = Decider4::new(qt);
            let mut want = vec![0u32; s.len()];
            d.encode(&s, &mut want);
            let mut got = vec![99u32; s.len()];
            // SAFETY: AVX-512 checked above.
            unsafe { avx512::encode_slice(&d, &s, &mut got) };
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a, b, "{qt:?} s = {:e} ({:#x})", s[i], s[i].to_bits());
            }
        }
    }

    #[test]
    fn simd_levels_quantize_8bit_bit_identical() {
        let code = dynamic_map(true);
        for bs in [32usize, 64, 256, 4096] {
            for n in [1usize, 15, 17, 255, 1000, 3 * bs + 5] {
                let mut x = tricky_inputs(n as u64 + bs as u64, n, bs);
                // The dynamic map's own values and the midpoints between them (ties).
                for (i, v) in x.iter_mut().enumerate().step_by(5) {
                    let k = i % 255;
                    *v = if i % 2 == 0 {
                        code[k]
                    } else {
                        (code[k] + code[k + 1]) / 2.0
                    };
                }
                let xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
                let want = quantize_8bit_with(&x, &code, bs, SimdLevel::Portable).unwrap();
                let want_b = quantize_8bit_with(&xb, &code, bs, SimdLevel::Portable).unwrap();
                for level in SimdLevel::available() {
                    assert_eq!(
                        quantize_8bit_with(&x, &code, bs, level).unwrap(),
                        want,
                        "{level:?} n={n}"
                    );
                    assert_eq!(
                        quantize_8bit_with(&xb, &code, bs, level).unwrap(),
                        want_b,
                        "{level:?}"
                    );
                }
                x[n / 2] = f32::NAN;
                for level in SimdLevel::available() {
                    assert!(matches!(
                        quantize_8bit_with(&x, &code, bs, level),
                        Err(Error::NonFinite { index, .. }) if index == n / 2
                    ));
                }
            }
        }
    }

    #[test]
    fn simd_levels_quantize_8bit_any_sorted_codebook() {
        // Not the dynamic map: random sorted codes with runs of duplicates, a signed zero pair
        // and clustered values, against inputs at, between and beyond them.
        let mut next = bits_stream(77);
        for round in 0..8u64 {
            let raw = lcg(round * 31 + 5, 256);
            let mut code: Vec<f32> = raw.iter().map(|v| v * 0.9).collect();
            code[10] = -0.0;
            code[11] = 0.0;
            for i in (0..256).step_by(37) {
                let v = code[i];
                for c in code.iter_mut().skip(i).take((round as usize % 4) + 1) {
                    *c = v; // duplicates
                }
            }
            code.sort_by(|a, b| a.total_cmp(b));
            let book: [f32; 256] = code.clone().try_into().unwrap();
            let n = 4096 + 7;
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    let k = (next() % 255) as usize;
                    match i % 4 {
                        0 => book[k],
                        1 => (book[k] + book[k + 1]) / 2.0,
                        2 => f32::from_bits(book[k].to_bits().wrapping_add(1)),
                        _ => (next() % 2000) as f32 / 1000.0 - 1.0,
                    }
                })
                .collect();
            for bs in [64usize, 256] {
                let want = quantize_8bit_with(&x, &code, bs, SimdLevel::Portable).unwrap();
                for level in SimdLevel::available() {
                    let got = quantize_8bit_with(&x, &code, bs, level).unwrap();
                    assert_eq!(got, want, "{level:?} round {round} bs {bs}");
                }
            }
        }
    }

    #[test]
    fn simd_level_not_on_this_cpu_is_an_error() {
        for level in SimdLevel::ALL {
            if level.is_available() {
                continue;
            }
            let x = [1.0f32; 64];
            let (mut p, mut a) = (vec![0u8; 32], vec![0f32; 1]);
            assert!(matches!(
                quantize_4bit_into_with(&x, 64, QuantType4::Nf4, &mut p, &mut a, level),
                Err(Error::UnsupportedSimd { .. })
            ));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn prop_4bit_round_trip(
            x in proptest::collection::vec(-1000.0f32..1000.0, 1..600),
            bs_pow in 5u32..13,
            nf4 in any::<bool>(),
        ) {
            let bs = 1usize << bs_pow;
            let qt = if nf4 { QuantType4::Nf4 } else { QuantType4::Fp4 };
            let q = quantize_4bit(&x, bs, qt).unwrap();
            prop_assert_eq!(q.packed.len(), x.len().div_ceil(2));
            prop_assert_eq!(q.absmax.len(), x.len().div_ceil(bs));
            let y: Vec<f32> = dequantize_4bit(&q.packed, &q.absmax, x.len(), bs, qt).unwrap();
            // Re-quantizing the decoded values is a fixed point: codes are stable.
            let q2 = quantize_4bit(&y, bs, qt).unwrap();
            let y2: Vec<f32> = dequantize_4bit(&q2.packed, &q2.absmax, x.len(), bs, qt).unwrap();
            for (a, b) in y.iter().zip(&y2) {
                prop_assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0));
            }
            // Max error is bounded by half the widest gap of the table times absmax.
            let half_gap = if nf4 { 0.1520 } else { 0.1667 };
            for (bi, (xb, yb)) in x.chunks(bs).zip(y.chunks(bs)).enumerate() {
                for (a, c) in xb.iter().zip(yb) {
                    prop_assert!((a - c).abs() <= q.absmax[bi] * half_gap + 1e-4);
                }
            }
        }

        #[test]
        fn prop_8bit_round_trip(x in proptest::collection::vec(-50.0f32..50.0, 1..1000)) {
            let code = dynamic_map(true);
            let q = quantize_8bit(&x, &code, 64).unwrap();
            let y: Vec<f32> = dequantize_8bit(&q.codes, &q.absmax, &code, 64).unwrap();
            for (bi, (xb, yb)) in x.chunks(64).zip(y.chunks(64)).enumerate() {
                for (a, c) in xb.iter().zip(yb) {
                    prop_assert!((a - c).abs() <= q.absmax[bi] * 0.0071 + 1e-6);
                }
            }
        }
    }
}
