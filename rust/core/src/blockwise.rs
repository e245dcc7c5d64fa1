//! Block-wise 4-bit (NF4 / FP4) and 8-bit (dynamic map) quantization, bit-compatible with
//! bitsandbytes. The tensor is flattened row-major; blocks of `blocksize` elements may span
//! rows; each block keeps a float32 absmax.

use rayon::prelude::*;

use crate::codebook::{check_sorted_codebook, QuantType4, FP4, NF4};
use crate::element::{first_non_finite, Element};
use crate::error::{check_blocksize, check_len, num_blocks, Error, Result};

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

fn quantize_blocks_4bit<T: Element>(
    x: &[T],
    packed: &mut [u8],
    absmax: &mut [f32],
    blocksize: usize,
    decider: &Decider4,
    total: usize,
    first_block: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe {
            quantize_blocks_4bit_avx2(x, packed, absmax, blocksize, decider, total, first_block)
        };
    }
    quantize_blocks_4bit_impl(x, packed, absmax, blocksize, decider, total, first_block)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// Block-wise 4-bit quantization into caller-provided buffers
/// (`packed`: `packed_len(x.len())` bytes, `absmax`: one per block). Runs on the current
/// rayon pool.
pub fn quantize_4bit_into<T: Element>(
    x: &[T],
    blocksize: usize,
    quant_type: QuantType4,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    check_blocksize(blocksize)?;
    let n = x.len();
    let nb = num_blocks(n, blocksize);
    check_len("packed output", packed_len(n), packed.len())?;
    check_len("absmax output", nb, absmax.len())?;
    let decider = Decider4::new(quant_type);
    // Tasks of >= 64K elements amortize the per-task scratch setup; still hundreds of tasks
    // for a 4096x4096 weight.
    let blocks_per_task = MIN_BLOCKS_PER_TASK.max((1 << 16) / blocksize);
    let bad = x
        .par_chunks(blocksize * blocks_per_task)
        .zip(packed.par_chunks_mut(blocksize / 2 * blocks_per_task))
        .zip(absmax.par_chunks_mut(blocks_per_task))
        .enumerate()
        .map(|(t, ((xs, ps), ams))| {
            quantize_blocks_4bit(xs, ps, ams, blocksize, &decider, n, t * blocks_per_task)
        })
        .reduce(|| false, |a, b| a | b);
    if bad {
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

/// Block-wise 4-bit dequantization into `out` (its length is the element count).
pub fn dequantize_4bit_into<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    quant_type: QuantType4,
    out: &mut [T],
) -> Result<()> {
    check_blocksize(blocksize)?;
    let n = out.len();
    check_len("packed input", packed_len(n), packed.len())?;
    check_len("absmax", num_blocks(n, blocksize), absmax.len())?;
    check_absmax(absmax)?;
    let table = quant_type.table();
    let per_task = MIN_BLOCKS_PER_TASK;
    out.par_chunks_mut(blocksize * per_task)
        .zip(packed.par_chunks(blocksize / 2 * per_task))
        .zip(absmax.par_chunks(per_task))
        .for_each(|((o, p), a)| {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the CPU supports the features the function was compiled for.
                unsafe { dequantize_blocks_4bit_avx2(p, a, o, blocksize, table) };
                return;
            }
            dequantize_blocks_4bit_impl(p, a, o, blocksize, table)
        });
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
/// Values are divided by the block absmax and mapped to the nearest code.
pub fn quantize_8bit<T: Element>(x: &[T], code: &[f32], blocksize: usize) -> Result<Blockwise8> {
    check_blocksize(blocksize)?;
    check_sorted_codebook(code, 256)?;
    let n = x.len();
    let mut codes = vec![0u8; n];
    let mut absmax = vec![0.0f32; num_blocks(n, blocksize)];
    let bad = x
        .par_chunks(blocksize)
        .zip(codes.par_chunks_mut(blocksize))
        .zip(absmax.par_iter_mut())
        .with_min_len(MIN_BLOCKS_PER_TASK)
        .map(|((xb, cb), am)| {
            let mut amax = 0.0f32;
            let mut bad = false;
            for v in xb {
                let a = v.to_f32().abs();
                amax = if a > amax { a } else { amax };
                #[allow(clippy::neg_cmp_op_on_partial_ord)]
                {
                    bad |= !(a <= f32::MAX);
                }
            }
            let divisor = amax.max(MIN_ABSMAX);
            for (c, v) in cb.iter_mut().zip(xb) {
                *c = nearest_code(code, v.to_f32() / divisor);
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
