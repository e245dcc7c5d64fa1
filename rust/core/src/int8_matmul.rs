//! Fused CPU LLM.int8() linear layer: `y = x · Wᵀ (+ bias)` for W stored row-wise int8 with its
//! float32 row absmax `SCB` (bitsandbytes' `Linear8bitLt` layout), x in f32 / bf16 / f16.
//!
//! # Semantics
//!
//! This is LLM.int8() (Dettmers et al., 2022), the same computation as `nybble::int8_linear`'s
//! composition of ops, in one pass and without the float64 GEMM that composition uses on CPU:
//!
//! 1. x is quantized vector-wise by [`crate::int8::vectorwise_quant`]: columns holding any
//!    `|x| >= threshold` are outliers (zeroed in the codes, left out of each row's absmax), every
//!    other element `q = round_half_even(x * ((1 / absmax) * 127))`.
//! 2. `acc[i, j] = Σ_k q_x[i, k] · q_w[j, k]`, exact in integers (i32 lanes, i64 totals).
//! 3. `out = f32(acc) * ((absmax_x[i] * SCB[j]) * f32(1 / 127²))`: the float32 epilogue of
//!    `nybble::int8_matmul_dequant`, rounded the same way.
//! 4. Outlier columns `c` are added in float32: `out += Σ_c x[i, c] · ((q_w[j, c] * SCB[j]) *
//!    f32(1 / 127))` (bitsandbytes' dequantization rule), summed in column order.
//! 5. `out += bias[j]`, then one rounding to x's dtype.
//!
//! Steps 1–3 and 5 are bit for bit those of the composition; step 4 may differ from it in the
//! last bits when two or more outlier columns exist (BLAS picks its own summation order there).
//!
//! # Kernels
//!
//! - **AVX512-VNNI**: `vpdpbusd` (u8 · s8, 64 products per instruction): the weight bytes are
//!   flipped to unsigned (`w ^ 0x80 = w + 128`) in registers and `128 · Σ_k q_x[i, k]` is
//!   subtracted afterwards.
//! - **AVX-512 BW** and **AVX2**: both operands widened to i16, `vpmaddwd` (32 / 16 products).
//! - **Portable**: i32 multiply-adds with 16 lanes, left to the auto-vectoriser.
//!
//! Tiles of up to 4 rows of x by 4 rows of W keep the accumulators in registers over K; work is
//! split over W rows on the current rayon pool.

use crate::element::Element;
use crate::error::{check_len, Error, Result};
use crate::int8;
use crate::parallel::{par_chunks_mut, Threads};
use crate::simd::SimdLevel;

/// `f32(1 / 127²)`: the epilogue scale of `int8_matmul_dequant`.
pub const INV_127_SQ: f32 = (1.0f64 / (127.0 * 127.0)) as f32;
/// `f32(1 / 127)`: bitsandbytes' row-wise int8 dequantization scale.
pub const INV_127: f32 = (1.0f64 / 127.0) as f32;

/// K elements per i32 accumulation pass (lanes stay far from overflow; totals are i64).
const PIECE: usize = 1 << 18;
/// Rows of W per register tile.
const NT: usize = 4;
/// Rows of x per register tile.
const MT: usize = 4;

/// A row-wise int8 weight of `out_features × in_features` (borrowed).
#[derive(Clone, Copy, Debug)]
pub struct Int8Matrix<'a> {
    /// Row-major codes, N·K.
    pub q: &'a [i8],
    /// Row absmax (bitsandbytes' `SCB`), N.
    pub scb: &'a [f32],
    pub out_features: usize,
    pub in_features: usize,
}

/// Which inner loop a call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel8 {
    Portable,
    Avx2Madd,
    Avx512Madd,
    Avx512Vnni,
}

/// The kernel [`int8_linear`] runs at `level`.
pub fn kernel_for(level: SimdLevel) -> Kernel8 {
    match level {
        SimdLevel::Portable => Kernel8::Portable,
        SimdLevel::Avx2 => Kernel8::Avx2Madd,
        SimdLevel::Avx512 => Kernel8::Avx512Madd,
        SimdLevel::Avx512Vnni | SimdLevel::Avx512Bf16 | SimdLevel::AmxBf16 => Kernel8::Avx512Vnni,
    }
}

fn validate<T: Element>(
    x: &[T],
    m: usize,
    w: &Int8Matrix,
    bias: Option<&[f32]>,
    out: &[T],
) -> Result<()> {
    let (n, k) = (w.out_features, w.in_features);
    let nk = n
        .checked_mul(k)
        .ok_or(Error::SizeOverflow("out_features * in_features"))?;
    check_len("int8 weight", nk, w.q.len())?;
    check_len("SCB", n, w.scb.len())?;
    let mk = m
        .checked_mul(k)
        .ok_or(Error::SizeOverflow("rows * in_features"))?;
    if mk != x.len() {
        return Err(Error::ShapeMismatch {
            rows: m,
            cols: k,
            needed: mk,
            len: x.len(),
        });
    }
    let mn = m
        .checked_mul(n)
        .ok_or(Error::SizeOverflow("rows * out_features"))?;
    check_len("output", mn, out.len())?;
    if let Some(b) = bias {
        check_len("bias", n, b.len())?;
    }
    Ok(())
}

/// LLM.int8() `out = x · Wᵀ (+ bias)`; see the module documentation for the exact semantics.
/// `x` is M×K (`m` rows), `out` M×N in x's dtype. Runs on the calling thread and the current
/// rayon pool with the kernel of `level` (which must be available). Non-finite x is
/// [`Error::NonFinite`] (from the quantization of x), an invalid threshold
/// [`Error::InvalidThreshold`].
pub fn int8_linear<T: Element>(
    x: &[T],
    m: usize,
    w: &Int8Matrix,
    bias: Option<&[f32]>,
    threshold: f32,
    out: &mut [T],
    level: SimdLevel,
) -> Result<()> {
    int8_linear_on(Threads::Current, x, m, w, bias, threshold, out, level)
}

/// [`int8_linear`] on the given threads (the caller always works; see [`crate::parallel`]).
#[allow(clippy::too_many_arguments)]
pub fn int8_linear_on<T: Element>(
    threads: Threads,
    x: &[T],
    m: usize,
    w: &Int8Matrix,
    bias: Option<&[f32]>,
    threshold: f32,
    out: &mut [T],
    level: SimdLevel,
) -> Result<()> {
    validate(x, m, w, bias, out)?;
    let level = level.checked()?;
    let (n, k) = (w.out_features, w.in_features);
    if m == 0 || n == 0 {
        if !(threshold.is_finite() && threshold >= 0.0) {
            return Err(Error::InvalidThreshold(threshold));
        }
        return Ok(());
    }
    // The core's vector-wise quantization (rayon inside): on the pool for several rows, on
    // the caller for one (a single row never splits, so no pool is involved).
    let vq = match threads {
        Threads::Pool(p) if m > 1 => p.install(|| int8::vectorwise_quant(x, m, k, threshold))?,
        _ => int8::vectorwise_quant(x, m, k, threshold)?,
    };
    let cols = &vq.outlier_cols;
    // The outlier columns of x, in f32 (M × C).
    let xo: Vec<f32> = (0..m)
        .flat_map(|i| cols.iter().map(move |&c| x[i * k + c].to_f32()))
        .collect();
    let kernel = kernel_for(level);
    let prep = Prep::new(kernel, &vq.q, m, k);
    let mut acc = vec![0.0f32; n * m]; // W-row major
    let rpt = rows_per_task(threads, n, k, m);
    par_chunks_mut(threads, &mut acc, rpt * m, |t, o| {
        let r0 = t * rpt;
        let r1 = r0 + o.len() / m;
        let mut r = r0;
        while r < r1 {
            let nt = NT.min(r1 - r);
            let mut i = 0;
            while i < m {
                let mt = MT.min(m - i);
                let mut tot = [[0i64; NT]; MT];
                prep.tile(w, r, nt, i, mt, &mut tot);
                for (ii, tr) in tot.iter().enumerate().take(mt) {
                    let row = i + ii;
                    let correction = prep.correction(row);
                    for (j, &s) in tr.iter().enumerate().take(nt) {
                        let rr = r + j;
                        let exact = s - correction;
                        let scale = (vq.row_absmax[row] * w.scb[rr]) * INV_127_SQ;
                        let mut v = exact as f32 * scale;
                        if !cols.is_empty() {
                            let wrow = &w.q[rr * k..rr * k + k];
                            let mut sum = 0.0f32;
                            for (ci, &c) in cols.iter().enumerate() {
                                let wd = (wrow[c] as f32 * w.scb[rr]) * INV_127;
                                sum += xo[row * cols.len() + ci] * wd;
                            }
                            v += sum;
                        }
                        o[(rr - r0) * m + row] = v;
                    }
                }
                i += mt;
            }
            r += nt;
        }
    });
    let rows_per_chunk = (1 << 16) / n + 1;
    par_chunks_mut(threads, out, rows_per_chunk * n, |c, part| {
        for (ii, row) in part.chunks_mut(n).enumerate() {
            let i = c * rows_per_chunk + ii;
            for (r, o) in row.iter_mut().enumerate() {
                let b = bias.map_or(0.0, |b| b[r]);
                *o = T::from_f32(acc[r * m + i] + b);
            }
        }
    });
    Ok(())
}

fn rows_per_task(threads: Threads, n: usize, k: usize, m: usize) -> usize {
    let threads = threads.count();
    let work = n.saturating_mul(k).saturating_mul(m.max(1));
    if work < (1 << 18) {
        return n.max(1);
    }
    let per = n.div_ceil(threads * 8).max(16);
    per.div_ceil(16) * 16
}

/// x's codes laid out for a kernel (padded with zeros to its chunk width).
struct Prep<'a> {
    kernel: Kernel8,
    k: usize,
    /// Row stride of the padded copies.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    stride: usize,
    q: &'a [i8],
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    q8: Vec<i8>,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    q16: Vec<i16>,
    /// `128 · Σ_k q_x[i, k]` per row (VNNI's unsigned-operand correction), else zeros.
    corr: Vec<i64>,
}

impl<'a> Prep<'a> {
    fn new(kernel: Kernel8, q: &'a [i8], m: usize, k: usize) -> Self {
        let width = match kernel {
            Kernel8::Portable => 1,
            Kernel8::Avx2Madd => 16,
            Kernel8::Avx512Madd => 32,
            Kernel8::Avx512Vnni => 64,
        };
        let stride = k.div_ceil(width).max(1) * width;
        let mut p = Prep {
            kernel,
            k,
            stride,
            q,
            q8: vec![],
            q16: vec![],
            corr: vec![0; m],
        };
        match kernel {
            Kernel8::Portable => {}
            Kernel8::Avx2Madd | Kernel8::Avx512Madd => {
                p.q16 = vec![0; m * stride];
                for (o, i) in p.q16.chunks_exact_mut(stride).zip(q.chunks_exact(k.max(1))) {
                    for (a, &b) in o.iter_mut().zip(i) {
                        *a = b as i16;
                    }
                }
            }
            Kernel8::Avx512Vnni => {
                p.q8 = vec![0; m * stride];
                for ((o, i), c) in
                    p.q8.chunks_exact_mut(stride)
                        .zip(q.chunks_exact(k.max(1)))
                        .zip(p.corr.iter_mut())
                {
                    o[..k].copy_from_slice(i);
                    *c = 128 * i.iter().map(|&v| v as i64).sum::<i64>();
                }
            }
        }
        p
    }

    fn correction(&self, row: usize) -> i64 {
        self.corr[row]
    }

    /// Integer dot products of x rows `i..i + mt` with W rows `r..r + nt` into `tot[ii][j]`
    /// (VNNI sums still include the correction).
    fn tile(
        &self,
        w: &Int8Matrix,
        r: usize,
        nt: usize,
        i: usize,
        mt: usize,
        tot: &mut [[i64; NT]; MT],
    ) {
        let k = self.k;
        let rows: [&[i8]; NT] = std::array::from_fn(|j| {
            let rr = r + j.min(nt - 1);
            &w.q[rr * k..rr * k + k]
        });
        match self.kernel {
            Kernel8::Portable => {
                let xs: [&[i8]; MT] = std::array::from_fn(|ii| {
                    let row = i + ii.min(mt - 1);
                    &self.q[row * k..row * k + k]
                });
                portable_tile(&rows, nt, &xs, mt, tot)
            }
            #[cfg(target_arch = "x86_64")]
            Kernel8::Avx2Madd => {
                let xs = &self.q16[i * self.stride..(i + mt) * self.stride];
                // SAFETY: the level was checked; every load stays inside `rows` / `xs`.
                unsafe { x86::tile_avx2(&rows, nt, xs, self.stride, mt, k, tot) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel8::Avx512Madd => {
                let xs = &self.q16[i * self.stride..(i + mt) * self.stride];
                // SAFETY: as above (the tail uses masked loads).
                unsafe { x86::tile_avx512(&rows, nt, xs, self.stride, mt, k, tot) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel8::Avx512Vnni => {
                let xs = &self.q8[i * self.stride..(i + mt) * self.stride];
                // SAFETY: as above.
                unsafe { x86::tile_vnni(&rows, nt, xs, self.stride, mt, k, tot) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("x86 kernels are only chosen for x86 levels"),
        }
    }
}

#[inline(always)]
fn portable_tile(
    rows: &[&[i8]; NT],
    nt: usize,
    xs: &[&[i8]; MT],
    mt: usize,
    tot: &mut [[i64; NT]; MT],
) {
    for (ii, x) in xs.iter().enumerate().take(mt) {
        for (j, w) in rows.iter().enumerate().take(nt) {
            let mut total = 0i64;
            for (xp, wp) in x.chunks(PIECE).zip(w.chunks(PIECE)) {
                let mut lanes = [0i32; 16];
                let mut xc = xp.chunks_exact(16);
                let mut wc = wp.chunks_exact(16);
                for (a, b) in (&mut xc).zip(&mut wc) {
                    for l in 0..16 {
                        lanes[l] += a[l] as i32 * b[l] as i32;
                    }
                }
                let tail: i32 = xc
                    .remainder()
                    .iter()
                    .zip(wc.remainder())
                    .map(|(&a, &b)| a as i32 * b as i32)
                    .sum();
                total += lanes.iter().map(|&v| v as i64).sum::<i64>() + tail as i64;
            }
            tot[ii][j] = total;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MT, NT, PIECE};

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    unsafe fn hsum_epi32_wide(v: __m512i) -> i64 {
        let lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v));
        let hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64::<1>(v));
        _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi))
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hsum256_epi32_wide(v: __m256i) -> i64 {
        let mut a = [0i32; 8];
        _mm256_storeu_si256(a.as_mut_ptr().cast(), v);
        a.iter().map(|&x| x as i64).sum()
    }

    macro_rules! by_shape {
        ($f:ident, $nt:expr, $mt:expr, $($args:expr),*) => {
            match ($mt, $nt) {
                (1, 4) => $f::<1, 4>($($args),*),
                (2, 4) => $f::<2, 4>($($args),*),
                (3, 4) => $f::<3, 4>($($args),*),
                (4, 4) => $f::<4, 4>($($args),*),
                (1, _) => $f::<1, 1>($($args),*),
                (2, _) => $f::<2, 1>($($args),*),
                (3, _) => $f::<3, 1>($($args),*),
                (4, _) => $f::<4, 1>($($args),*),
                _ => unreachable!("tiles have 1 to 4 rows of x"),
            }
        };
    }

    /// Rows with fewer than NT real rows run one row at a time.
    macro_rules! tile_entry {
        ($name:ident, $inner:ident, $xt:ty, $feat:literal) => {
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name(
                rows: &[&[i8]; NT],
                nt: usize,
                xs: &[$xt],
                stride: usize,
                mt: usize,
                k: usize,
                tot: &mut [[i64; NT]; MT],
            ) {
                if nt == NT {
                    by_shape!($inner, 4, mt, rows, xs, stride, k, tot, 0);
                } else {
                    for j in 0..nt {
                        let one: [&[i8]; NT] = [rows[j]; NT];
                        by_shape!($inner, 1, mt, &one, xs, stride, k, tot, j);
                    }
                }
            }
        };
    }

    tile_entry!(
        tile_vnni,
        vnni,
        i8,
        "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"
    );
    tile_entry!(
        tile_avx512,
        madd512,
        i16,
        "avx512f,avx512bw,avx512vl,avx512dq"
    );
    tile_entry!(tile_avx2, madd256, i16, "avx2");

    /// Prefetches (into L2) the part of the next tile matching step `kk` of this one, which
    /// reads `STEP` bytes of each of its `R` rows: W is row-major, so the next tile's bytes
    /// start R rows on and are as many. Prefetches never fault, past the matrix included.
    #[inline(always)]
    unsafe fn prefetch_next<const R: usize, const STEP: usize>(
        rows: &[&[i8]; NT],
        k: usize,
        kk: usize,
    ) {
        let next = rows[0].as_ptr().wrapping_add(R * k + kk * R);
        for l in 0..(R * STEP).div_ceil(64) {
            _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(l * 64).cast());
        }
    }

    /// `tot[ii][col + j] = Σ (w_j + 128) · x_ii` (`R` rows of W, `M` of x).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    unsafe fn vnni<const M: usize, const R: usize>(
        rows: &[&[i8]; NT],
        xs: &[i8],
        stride: usize,
        k: usize,
        tot: &mut [[i64; NT]; MT],
        col: usize,
    ) {
        let flip = _mm512_set1_epi8(-128);
        let x = xs.as_ptr();
        let mut p0 = 0;
        while p0 < k {
            let p1 = (p0 + PIECE).min(k);
            let mut acc = [[_mm512_setzero_si512(); R]; M];
            let mut kk = p0;
            while kk + 64 <= p1 {
                prefetch_next::<R, 64>(rows, k, kk);
                for r in 0..R {
                    let u =
                        _mm512_xor_si512(_mm512_loadu_si512(rows[r].as_ptr().add(kk).cast()), flip);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = _mm512_loadu_si512(x.add(i * stride + kk).cast());
                        a[r] = _mm512_dpbusd_epi32(a[r], u, xv);
                    }
                }
                kk += 64;
            }
            if kk < p1 {
                // Masked-off weight bytes load as 0 (u = 128) against x's zero padding.
                let mask: u64 = (1u64 << (p1 - kk)) - 1;
                for r in 0..R {
                    let wv = _mm512_maskz_loadu_epi8(mask, rows[r].as_ptr().add(kk).cast());
                    let u = _mm512_xor_si512(wv, flip);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = _mm512_loadu_si512(x.add(i * stride + kk).cast());
                        a[r] = _mm512_dpbusd_epi32(a[r], u, xv);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                for (r, v) in a.iter().enumerate() {
                    let t = &mut tot[i][col + r];
                    let before = if p0 == 0 { 0 } else { *t };
                    *t = before + hsum_epi32_wide(*v);
                }
            }
            p0 = p1;
        }
        if k == 0 {
            for t in tot.iter_mut().take(M) {
                t[col..col + R].iter_mut().for_each(|v| *v = 0);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    unsafe fn madd512<const M: usize, const R: usize>(
        rows: &[&[i8]; NT],
        xs: &[i16],
        stride: usize,
        k: usize,
        tot: &mut [[i64; NT]; MT],
        col: usize,
    ) {
        let x = xs.as_ptr();
        let mut p0 = 0;
        while p0 < k {
            let p1 = (p0 + PIECE).min(k);
            let mut acc = [[_mm512_setzero_si512(); R]; M];
            let mut kk = p0;
            while kk < p1 {
                let left = p1 - kk;
                prefetch_next::<R, 32>(rows, k, kk);
                for r in 0..R {
                    let p = rows[r].as_ptr().add(kk);
                    let wb = if left >= 32 {
                        _mm256_loadu_si256(p.cast())
                    } else {
                        _mm256_maskz_loadu_epi8((1u32 << left) - 1, p.cast())
                    };
                    let wv = _mm512_cvtepi8_epi16(wb);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = _mm512_loadu_si512(x.add(i * stride + kk).cast());
                        a[r] = _mm512_add_epi32(a[r], _mm512_madd_epi16(wv, xv));
                    }
                }
                kk += 32;
            }
            for (i, a) in acc.iter().enumerate() {
                for (r, v) in a.iter().enumerate() {
                    let t = &mut tot[i][col + r];
                    let before = if p0 == 0 { 0 } else { *t };
                    *t = before + hsum_epi32_wide(*v);
                }
            }
            p0 = p1;
        }
        if k == 0 {
            for t in tot.iter_mut().take(M) {
                t[col..col + R].iter_mut().for_each(|v| *v = 0);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn madd256<const M: usize, const R: usize>(
        rows: &[&[i8]; NT],
        xs: &[i16],
        stride: usize,
        k: usize,
        tot: &mut [[i64; NT]; MT],
        col: usize,
    ) {
        let x = xs.as_ptr();
        for t in tot.iter_mut().take(M) {
            t[col..col + R].iter_mut().for_each(|v| *v = 0);
        }
        let mut p0 = 0;
        while p0 < k {
            let p1 = (p0 + PIECE).min(k);
            let mut acc = [[_mm256_setzero_si256(); R]; M];
            let mut kk = p0;
            while kk + 16 <= p1 {
                prefetch_next::<R, 16>(rows, k, kk);
                for r in 0..R {
                    let wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(rows[r].as_ptr().add(kk).cast()));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_si256(x.add(i * stride + kk).cast());
                        a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(wv, xv));
                    }
                }
                kk += 16;
            }
            for (i, a) in acc.iter().enumerate() {
                for (r, v) in a.iter().enumerate() {
                    let mut s = hsum256_epi32_wide(*v);
                    for t in kk..p1 {
                        s += *rows[r].get_unchecked(t) as i64 * *x.add(i * stride + t) as i64;
                    }
                    tot[i][col + r] += s;
                }
            }
            p0 = p1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use proptest::prelude::*;

    fn lcg(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(7);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((s >> 40) as f32) / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// The composition `nybble::int8_linear` runs, written out: codes from vectorwise_quant,
    /// exact integer dot, the f32 epilogue, outliers, bias, one rounding.
    fn reference<T: Element>(
        x: &[T],
        m: usize,
        w: &Int8Matrix,
        bias: Option<&[f32]>,
        threshold: f32,
    ) -> Vec<T> {
        let (n, k) = (w.out_features, w.in_features);
        let vq = int8::vectorwise_quant(x, m, k, threshold).unwrap();
        let mut out = vec![T::from_f32(0.0); m * n];
        for i in 0..m {
            for j in 0..n {
                let acc: i64 = (0..k)
                    .map(|c| vq.q[i * k + c] as i64 * w.q[j * k + c] as i64)
                    .sum();
                let mut v = acc as f32 * ((vq.row_absmax[i] * w.scb[j]) * INV_127_SQ);
                let mut o = 0.0f32;
                for &c in &vq.outlier_cols {
                    o += x[i * k + c].to_f32() * ((w.q[j * k + c] as f32 * w.scb[j]) * INV_127);
                }
                if !vq.outlier_cols.is_empty() {
                    v += o;
                }
                out[i * n + j] = T::from_f32(v + bias.map_or(0.0, |b| b[j]));
            }
        }
        out
    }

    fn check<T: Element + PartialEq + std::fmt::Debug>(
        m: usize,
        n: usize,
        k: usize,
        seed: u64,
        outliers: bool,
    ) {
        let mut xf = lcg(seed, m * k, 2.0);
        if outliers && k > 3 {
            for i in 0..m {
                xf[i * k + 3] *= 10.0; // a whole outlier column (|x| >= 6 in most rows)
            }
            xf[k - 1] = -9.0;
        }
        let x: Vec<T> = xf.iter().map(|&v| T::from_f32(v)).collect();
        let wf = lcg(seed ^ 5, n * k, 0.1);
        let qw = int8::quantize_absmax(&wf, n, k, int8::Granularity::Row).unwrap();
        let w = Int8Matrix {
            q: &qw.q,
            scb: &qw.absmax,
            out_features: n,
            in_features: k,
        };
        let bias = lcg(seed ^ 9, n, 1.0);
        let expected = reference(&x, m, &w, Some(&bias), 6.0);
        for level in SimdLevel::available() {
            let mut out = vec![T::from_f32(0.0); m * n];
            int8_linear(&x, m, &w, Some(&bias), 6.0, &mut out, level).unwrap();
            // Same summation order as the reference: equal bit for bit.
            assert_eq!(out, expected, "{level:?} m={m} n={n} k={k}");
        }
    }

    #[test]
    fn equals_the_composition() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 7, 64),
            (3, 9, 100),
            (4, 8, 128),
            (5, 13, 33),
            (9, 6, 257),
            (2, 17, 4096),
            (16, 5, 31),
        ] {
            for outliers in [false, true] {
                let seed = (m * 100 + n * 10 + k) as u64 + outliers as u64;
                check::<f32>(m, n, k, seed, outliers);
                check::<bf16>(m, n, k, seed, outliers);
                check::<f16>(m, n, k, seed, outliers);
            }
        }
    }

    #[test]
    fn errors() {
        let q = vec![1i8; 12];
        let scb = vec![1.0f32; 3];
        let w = Int8Matrix {
            q: &q,
            scb: &scb,
            out_features: 3,
            in_features: 4,
        };
        let x = vec![1.0f32; 8];
        let mut out = vec![0.0f32; 6];
        assert!(matches!(
            int8_linear(&x[..7], 2, &w, None, 6.0, &mut out, SimdLevel::Portable),
            Err(Error::ShapeMismatch {
                needed: 8,
                len: 7,
                ..
            })
        ));
        assert!(matches!(
            int8_linear(&x, 2, &w, None, -1.0, &mut out, SimdLevel::Portable),
            Err(Error::InvalidThreshold(_))
        ));
        assert!(matches!(
            int8_linear(
                &x,
                2,
                &Int8Matrix {
                    scb: &scb[..2],
                    ..w
                },
                None,
                6.0,
                &mut out,
                SimdLevel::Portable
            ),
            Err(Error::LengthMismatch { what: "SCB", .. })
        ));
        let mut xn = x.clone();
        xn[5] = f32::NAN;
        assert!(matches!(
            int8_linear(&xn, 2, &w, None, 6.0, &mut out, SimdLevel::detect()),
            Err(Error::NonFinite { index: 5, .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn prop_equals_the_composition(
            m in 1usize..10,
            n in 1usize..20,
            k in 1usize..300,
            seed in any::<u64>(),
            outliers in any::<bool>(),
        ) {
            check::<f32>(m, n, k, seed, outliers);
            check::<bf16>(m, n, k, seed, outliers);
        }
    }
}
