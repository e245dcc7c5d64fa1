//! Fused CPU matmul with a packed 4-bit weight: `y (M×N) = x (M×K) · Wᵀ (+ bias)` for W in
//! bitsandbytes' NF4 / FP4 layout, without ever materialising the dense weight.
//!
//! # Layout
//!
//! W is N×K row-major, flattened, two codes per byte with element `2j` in the **high** nibble;
//! one float32 absmax per `blocksize` elements of the flattened weight, so a block may span two
//! rows when K is not a multiple of the blocksize. x is M×K row-major in f32, bf16 or f16; the
//! output is M×N in x's dtype; products are accumulated in f32 and rounded once at the end
//! (after adding the bias, given in f32).
//!
//! # Kernels
//!
//! For every run of a weight row that lies in one absmax block (a *span*), the kernel builds a
//! 16-entry table `code[q] * absmax` (exactly the f32 value `dequantize_4bit` produces) and
//! decodes codes in registers by table permutes:
//!
//! - **AVX-512 f32** (`avx512f/bw`; x f32 / f16, or bf16 without AVX512-BF16): 16 packed bytes
//!   widen to 16 dwords; `vpermps` with the dword itself (low nibble, the odd element) and with
//!   it shifted right by 4 (high nibble, the even element) gives 32 weights; x is laid out once
//!   per call with the even and odd elements of each 32-chunk apart, so two FMAs per row of x.
//! - **AVX-512 BF16** (`avx512_bf16`, x bf16): the table is converted to bf16 (round to nearest
//!   even: the weight `dequantize_4bit(..., bfloat16)` gives, i.e. what the dense bf16 path
//!   multiplies) and `vpermw` decodes 32 weights in x's own element order, one `vdpbf16ps` per
//!   row of x (32 multiply-adds, f32 accumulation; like every bf16 dot-product instruction it
//!   flushes denormals). Up to [`WIDE_MAX_ROWS`] rows the *wide* decode: 32 packed bytes widen
//!   to 32 words and two `vpermw` (the low nibble; the high one shifted down) give 64 weights,
//!   half the decode instructions per weight; x is laid out once per call with each 64-chunk's
//!   even elements before its odd ones. One row of x uses the unscaled table and scales each
//!   span's partial sum in f32.
//! - **AVX2 + FMA**: as AVX-512 f32 with 8-wide `vpermps` on the two table halves and a blend on
//!   the code's top bit; on AMD CPUs (slow 256-bit `vpermps`) four `vpshufb` on the table's
//!   byte planes and unpacks instead ([`Avx2Decode`]). One row of bf16 x: `vpshufb` of the
//!   table's bf16 bytes.
//! - **Portable** (any target; also x86 rows whose K is not a multiple of 32): decode a few rows
//!   of a K-slice into a small L1 scratch (never the whole weight), then auto-vectorised dot
//!   products with 16 partial sums.
//!
//! Register tiles are `MT` rows of x by `NT` rows of W (accumulators stay in registers for the
//! whole K loop); the weight tile is decoded once per group of `MT` rows of x and stays in L1
//! while all groups run. Work is split over W rows (output columns) into tasks that the calling
//! thread and pool workers claim ([`crate::parallel`]).

use std::any::TypeId;

use half::bf16;

use crate::blockwise::packed_len;
use crate::codebook::QuantType4;
use crate::element::Element;
use crate::error::{check_blocksize, check_len, num_blocks, Error, Result};
use crate::parallel::{par_chunks_mut, Threads};
use crate::simd::SimdLevel;

/// A packed 4-bit weight of `out_features × in_features` (borrowed).
#[derive(Clone, Copy, Debug)]
pub struct Packed4Matrix<'a> {
    /// `ceil(N*K / 2)` bytes, element `2j` in the high nibble.
    pub packed: &'a [u8],
    /// `ceil(N*K / blocksize)` float32 scales (decode double-quantized constants first).
    pub absmax: &'a [f32],
    /// N: rows of W, columns of the output.
    pub out_features: usize,
    /// K: columns of W and of x.
    pub in_features: usize,
    pub blocksize: usize,
    pub quant_type: QuantType4,
}

/// Which inner loop a call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel4 {
    /// Row-slice decode into L1 scratch + vectorised dots (any shape, any target).
    Rows,
    /// AVX2 register decode (K % 32 == 0).
    Avx2F32,
    /// AVX2, one row of bf16 x: `vpshufb` decode of bf16 table bytes (K % 32 == 0).
    Avx2Bf16Row,
    /// AVX2, f32 FMAs on weights decoded by `vpshufb` from the table's four byte planes
    /// (K % 32 == 0): [`Avx2Decode::Shuffle`].
    Avx2Planes,
    /// AVX-512 register decode, f32 FMAs (K % 32 == 0).
    Avx512F32,
    /// AVX-512 register decode to bf16, `vdpbf16ps` (bf16 x, K % 32 == 0).
    Avx512Bf16,
    /// AVX-512 BF16 on the wide decode: 32 packed bytes widened to words, two `vpermw` give
    /// 64 bf16 weights (bf16 x, K % 32 == 0; x laid out by [`prep_x_wide`]).
    Avx512Bf16Wide,
    /// AMX-BF16 tiles fed by an AVX-512 decode (bf16 x, M > 1, K and the blocksize multiples
    /// of 32, blocks within rows): [`crate::matmul_amx`].
    AmxBf16,
}

/// Fewest rows of bf16 x for the AMX tile kernel: below it the f32-FMA kernel is as fast or
/// faster (measured 4096x4096 and 11008x4096 NF4, 2 threads, cold cache: 2.0-2.3x vs
/// 1.7-1.9x dense bf16 at M = 2, equal at 4, 1.3x vs 1.6x at 6; at 16 0.6x vs 1.65x).
pub const AMX_MIN_ROWS: usize = 5;

/// Most rows of bf16 x for the wide-decode kernel ([`Kernel4::Avx512Bf16Wide`]); above it
/// the narrow one, whose larger register tiles win once the decode is amortised over many rows.
/// Measured on Zen 4 (single thread, 4096-wide NF4 rows in L2): M = 1 1.6-1.8x the f32-FMA
/// kernel (L2, L3 and DRAM alike), M = 2-16 1.16-1.3x the narrow kernel, M = 32 0.9x.
pub const WIDE_MAX_ROWS: usize = 16;

/// How the AVX2 f32-FMA kernels turn codes into exact f32 weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Avx2Decode {
    /// `vpermps` on the two 8-entry table halves and a blend ([`Kernel4::Avx2F32`]): 4
    /// permutes per 16 weights, one per cycle on Intel cores.
    Permute,
    /// Four `vpshufb` on the table's byte planes and byte / word unpacks
    /// ([`Kernel4::Avx2Planes`]): 12 in-lane shuffles per 32 weights. On AMD Zen 2 / 3, where
    /// a 256-bit `vpermps` issues every other cycle: measured on a Zen 3 EPYC (4096x4096 NF4,
    /// 2 threads) 1.57x faster at M = 1 (f32 x), 1.24-1.36x at M = 2-16, 1.10x at 64.
    Shuffle,
}

impl Avx2Decode {
    /// `NYBBLE_AVX2_DECODE` (`permute` / `shuffle`) when set, else [`Avx2Decode::Shuffle`] on
    /// AMD CPUs and [`Avx2Decode::Permute`] on others.
    pub fn preferred() -> Avx2Decode {
        match std::env::var("NYBBLE_AVX2_DECODE").as_deref() {
            Ok("permute") => Avx2Decode::Permute,
            Ok("shuffle") => Avx2Decode::Shuffle,
            _ if crate::simd::cpu_is_amd() => Avx2Decode::Shuffle,
            _ => Avx2Decode::Permute,
        }
    }
}

/// The kernel [`matmul_4bit`] runs for `rows` rows of x of type `T`, K columns and SIMD
/// `level`. At `avx512_bf16` bf16 x runs the bf16 kernels (W rounded to bf16, as the dense bf16
/// path multiplies it); below that level one row of bf16 x runs the f32 kernel.
pub fn kernel_for<T: Element>(
    rows: usize,
    in_features: usize,
    blocksize: usize,
    level: SimdLevel,
) -> Kernel4 {
    kernel_with::<T>(rows, in_features, blocksize, level, Avx2Decode::preferred())
}

/// [`kernel_for`] with the AVX2 decode given.
pub fn kernel_with<T: Element>(
    rows: usize,
    in_features: usize,
    blocksize: usize,
    level: SimdLevel,
    avx2: Avx2Decode,
) -> Kernel4 {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = blocksize; // only the AMX tile kernel looks at it
    if !in_features.is_multiple_of(32) {
        return Kernel4::Rows;
    }
    match level {
        SimdLevel::Portable => Kernel4::Rows,
        SimdLevel::Avx2 => {
            if rows == 1 && TypeId::of::<T>() == TypeId::of::<bf16>() {
                Kernel4::Avx2Bf16Row
            } else if avx2 == Avx2Decode::Shuffle {
                Kernel4::Avx2Planes
            } else {
                Kernel4::Avx2F32
            }
        }
        SimdLevel::Avx512 | SimdLevel::Avx512Vnni => Kernel4::Avx512F32,
        SimdLevel::Avx512Bf16 => {
            if TypeId::of::<T>() != TypeId::of::<bf16>() {
                Kernel4::Avx512F32
            } else if rows <= WIDE_MAX_ROWS {
                Kernel4::Avx512Bf16Wide
            } else {
                Kernel4::Avx512Bf16
            }
        }
        // Where the tiles do not apply, the f32-FMA kernel: on these CPUs `vdpbf16ps` issues
        // every ~2 cycles against 2 FMAs per cycle (measured 1.2-1.5x slower at M = 2..32).
        SimdLevel::AmxBf16 => {
            #[cfg(target_arch = "x86_64")]
            if rows >= AMX_MIN_ROWS
                && TypeId::of::<T>() == TypeId::of::<bf16>()
                && crate::matmul_amx::applies(in_features, blocksize)
            {
                return Kernel4::AmxBf16;
            }
            Kernel4::Avx512F32
        }
    }
}

/// Validates every length against the shapes (checked arithmetic) before anything is
/// allocated. Returns N·K.
fn validate<T: Element>(
    x: &[T],
    m: usize,
    w: &Packed4Matrix,
    bias: Option<&[f32]>,
    out: &[T],
) -> Result<usize> {
    check_blocksize(w.blocksize)?;
    let (n, k) = (w.out_features, w.in_features);
    let nk = n
        .checked_mul(k)
        .ok_or(Error::SizeOverflow("out_features * in_features"))?;
    check_len("packed weight", packed_len(nk), w.packed.len())?;
    check_len("absmax", num_blocks(nk, w.blocksize), w.absmax.len())?;
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
    Ok(nk)
}

/// `out = x · Wᵀ (+ bias)` with W packed 4-bit; see the module documentation. `x` is M×K
/// row-major (`m` rows), `out` M×N; `bias` (N, float32) is added before the one rounding to
/// `T`. Runs on the calling thread and the current rayon pool with the kernel of `level`
/// (which must be available). A non-finite absmax is [`Error::NonFinite`] (as in
/// `dequantize_4bit`).
pub fn matmul_4bit<T: Element>(
    x: &[T],
    m: usize,
    w: &Packed4Matrix,
    bias: Option<&[f32]>,
    out: &mut [T],
    level: SimdLevel,
) -> Result<()> {
    matmul_4bit_on(Threads::Current, x, m, w, bias, out, level)
}

/// [`matmul_4bit`] on the given threads (the caller always works; see [`crate::parallel`]).
pub fn matmul_4bit_on<T: Element>(
    threads: Threads,
    x: &[T],
    m: usize,
    w: &Packed4Matrix,
    bias: Option<&[f32]>,
    out: &mut [T],
    level: SimdLevel,
) -> Result<()> {
    let kernel = kernel_for::<T>(m, w.in_features, w.blocksize, level);
    matmul_4bit_kernel(threads, x, m, w, bias, out, level, kernel)
}

/// [`matmul_4bit_on`] with the kernel given (one that `level` can run: [`kernel_with`]).
#[allow(clippy::too_many_arguments)]
fn matmul_4bit_kernel<T: Element>(
    threads: Threads,
    x: &[T],
    m: usize,
    w: &Packed4Matrix,
    bias: Option<&[f32]>,
    out: &mut [T],
    level: SimdLevel,
    kernel: Kernel4,
) -> Result<()> {
    validate(x, m, w, bias, out)?;
    let level = level.checked()?;
    let (n, k) = (w.out_features, w.in_features);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let mut acc = vec![0.0f32; n * m]; // W-row major: acc[r * m + i]
    if k > 0 {
        run_kernel(threads, x, m, w, &mut acc, kernel, level);
        // A non-finite absmax makes every output that reads its block non-finite (a zero
        // partial sum times Inf is NaN), so the scan runs only when an output is non-finite.
        if acc.iter().any(|v| !v.is_finite()) {
            if let Some(index) = w.absmax.iter().position(|a| !a.is_finite()) {
                return Err(Error::NonFinite {
                    index,
                    value: w.absmax[index],
                });
            }
        }
    }
    // Transpose into the output, add the bias, round once.
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

/// Rows of W per task: enough tasks to balance (8 per thread), each a few hundred KB of
/// packed weight at most, a multiple of 16 (every tile width).
fn rows_per_task(threads: Threads, n: usize, k: usize, m: usize) -> usize {
    let threads = threads.count();
    let work = n.saturating_mul(k).saturating_mul(m.max(1));
    if work < (1 << 18) {
        return n.max(1);
    }
    let per = n.div_ceil(threads * 8).max(16);
    per.div_ceil(16) * 16
}

/// Runs the chosen kernel over all W rows; `acc` is N×M (W-row major).
fn run_kernel<T: Element>(
    threads: Threads,
    x: &[T],
    m: usize,
    w: &Packed4Matrix,
    acc: &mut [f32],
    kernel: Kernel4,
    level: SimdLevel,
) {
    let (n, k) = (w.out_features, w.in_features);
    let rpt = rows_per_task(threads, n, k, m);
    fn ctx<'b>(w: &Packed4Matrix<'b>, m: usize, x: XRef<'b>) -> Ctx<'b> {
        Ctx {
            packed: w.packed,
            absmax: w.absmax,
            table: w.quant_type.table(),
            k: w.in_features,
            bs: w.blocksize,
            m,
            x,
        }
    }
    let tasks = |f: &(dyn Fn(usize, usize, &mut [f32]) + Sync), acc: &mut [f32]| {
        par_chunks_mut(threads, acc, rpt * m, |t, o| {
            let r0 = t * rpt;
            f(r0, r0 + o.len() / m, o)
        })
    };
    match kernel {
        Kernel4::Rows => {
            let xf = prep_x_natural(threads, x, m, k);
            let c = ctx(w, m, XRef::F32(&xf));
            tasks(&|r0, r1, o| rows::task(&c, r0, r1, o, level), acc)
        }
        #[cfg(target_arch = "x86_64")]
        Kernel4::Avx2F32 => {
            let xf = prep_x_split(threads, x, m, k, 8);
            let c = ctx(w, m, XRef::F32(&xf));
            // SAFETY: the level was checked against the CPU; shapes were validated.
            tasks(&|r0, r1, o| unsafe { x86::task_avx2(&c, r0, r1, o) }, acc)
        }
        #[cfg(target_arch = "x86_64")]
        Kernel4::Avx2Planes => {
            let xf = prep_x_perm(threads, x, m, k, &AVX2_PLANE_ORDER);
            let c = ctx(w, m, XRef::F32(&xf));
            // SAFETY: as above.
            tasks(
                &|r0, r1, o| unsafe { x86::task_avx2_planes(&c, r0, r1, o) },
                acc,
            )
        }
        #[cfg(target_arch = "x86_64")]
        Kernel4::Avx2Bf16Row => {
            let xf = prep_x_perm(threads, x, m, k, &AVX2_BF16_ORDER);
            let c = ctx(w, m, XRef::F32(&xf));
            // SAFETY: as above.
            tasks(
                &|r0, r1, o| unsafe { x86::task_avx2_bf16_row(&c, r0, r1, o) },
                acc,
            )
        }
        #[cfg(target_arch = "x86_64")]
        Kernel4::Avx512F32 => {
            let xf = prep_x_split(threads, x, m, k, 16);
            let c = ctx(w, m, XRef::F32(&xf));
            // SAFETY: as above.
            tasks(
                &|r0, r1, o| unsafe { x86::task_avx512_f32(&c, r0, r1, o) },
                acc,
            )
        }
        #[cfg(target_arch = "x86_64")]
        Kernel4::Avx512Bf16 => {
            // SAFETY: T is bf16 (kernel_for checked the TypeId), which is repr(transparent)
            // over u16.
            let xb: &[u16] = unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) };
            let c = ctx(w, m, XRef::Bf16(xb));
            // SAFETY: as above.
            tasks(
                &|r0, r1, o| unsafe { x86::task_avx512_bf16(&c, r0, r1, o) },
                acc,
            )
        }
        #[cfg(target_arch = "x86_64")]
        Kernel4::Avx512Bf16Wide => {
            // SAFETY: T is bf16 (kernel_for checked the TypeId), repr(transparent) over u16.
            let xb: &[u16] = unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) };
            let xw = prep_x_wide(threads, xb, m, k);
            let c = ctx(w, m, XRef::Bf16(&xw));
            // SAFETY: as above.
            tasks(
                &|r0, r1, o| unsafe { x86::task_avx512_bf16_wide(&c, r0, r1, o) },
                acc,
            )
        }
        #[cfg(target_arch = "x86_64")]
        Kernel4::AmxBf16 => {
            // SAFETY: T is bf16 (kernel_for checked the TypeId), repr(transparent) over u16.
            let xb: &[u16] = unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) };
            let xp = crate::matmul_amx::prep_x(xb, m, k);
            let a = crate::matmul_amx::AmxArgs {
                packed: w.packed,
                absmax: w.absmax,
                table: w.quant_type.table(),
                k,
                bs: w.blocksize,
                m,
                xp: &xp,
            };
            // SAFETY: the level (hence `usable`) was checked, kernel_for checked `applies`,
            // the shapes were validated, and tasks start at multiples of 16 rows.
            tasks(
                &|r0, r1, o| unsafe { crate::matmul_amx::task(&a, r0, r1, o) },
                acc,
            )
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("x86 kernels are only chosen for x86 levels"),
    }
}

/// x as the kernels read it.
#[derive(Clone, Copy)]
enum XRef<'a> {
    F32(&'a [f32]),
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Bf16(&'a [u16]),
}

/// Everything a task reads.
struct Ctx<'a> {
    packed: &'a [u8],
    absmax: &'a [f32],
    table: &'a [f32; 16],
    k: usize,
    bs: usize,
    m: usize,
    x: XRef<'a>,
}

/// x widened to f32, natural order (M×K).
fn prep_x_natural<T: Element>(threads: Threads, x: &[T], m: usize, k: usize) -> Vec<f32> {
    let mut xf = vec![0.0f32; m * k];
    prep_rows(threads, &mut xf, k, |i, o| {
        for (o, v) in o.iter_mut().zip(&x[i * k..i * k + k]) {
            *o = v.to_f32();
        }
    });
    xf
}

/// Fills `xf` (rows of `k`) row by row with `fill(row, dst)`, several rows per task.
fn prep_rows(threads: Threads, xf: &mut [f32], k: usize, fill: impl Fn(usize, &mut [f32]) + Sync) {
    let rows_per_task = (1 << 15) / k.max(1) + 1;
    par_chunks_mut(threads, xf, rows_per_task * k, |t, part| {
        for (j, row) in part.chunks_mut(k).enumerate() {
            fill(t * rows_per_task + j, row);
        }
    });
}

/// x widened to f32 with each group of `2 * half` elements split into its even elements then
/// its odd ones (the order the register decode produces weights in). K % (2 * half) == 0.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn prep_x_split<T: Element>(
    threads: Threads,
    x: &[T],
    m: usize,
    k: usize,
    half: usize,
) -> Vec<f32> {
    let mut xf = vec![0.0f32; m * k];
    prep_rows(threads, &mut xf, k, |i, o| {
        for (og, ig) in o
            .chunks_exact_mut(2 * half)
            .zip(x[i * k..i * k + k].chunks_exact(2 * half))
        {
            let (even, odd) = og.split_at_mut(half);
            for j in 0..half {
                even[j] = ig[2 * j].to_f32();
                odd[j] = ig[2 * j + 1].to_f32();
            }
        }
    });
    xf
}

/// bf16 x with each 64-chunk as its 32 even elements then its 32 odd ones (a final 32-chunk:
/// 16 and 16), the order the wide decode produces weights in. K % 32 == 0.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn prep_x_wide(threads: Threads, x: &[u16], m: usize, k: usize) -> Vec<u16> {
    let mut xw = vec![0u16; m * k];
    let rows_per_task = (1 << 15) / k.max(1) + 1;
    par_chunks_mut(threads, &mut xw, rows_per_task * k, |t, part| {
        for (j, row) in part.chunks_mut(k).enumerate() {
            let i = t * rows_per_task + j;
            for (og, ig) in row.chunks_mut(64).zip(x[i * k..i * k + k].chunks(64)) {
                let (even, odd) = og.split_at_mut(ig.len() / 2);
                for (q, pair) in ig.chunks_exact(2).enumerate() {
                    even[q] = pair[0];
                    odd[q] = pair[1];
                }
            }
        }
    });
    xw
}

/// Element order, within each 32-chunk, in which the AVX2 bf16 decode produces weights: two
/// `vpshufb` (high nibbles in lane 0, low in lane 1), byte unpacks, then each 16-bit half of the
/// dwords widened to f32.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const AVX2_BF16_ORDER: [usize; 32] = [
    0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 16, 20, 24, 28, 17, 21, 25, 29, 18, 22,
    26, 30, 19, 23, 27, 31,
];

/// Element order, within each 32-chunk, of the AVX2 byte-plane decode: every 8 consecutive
/// elements as their 4 even then their 4 odd ones (high nibbles in lane 0, low in lane 1).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const AVX2_PLANE_ORDER: [usize; 32] = [
    0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15, 16, 18, 20, 22, 17, 19, 21, 23, 24, 26,
    28, 30, 25, 27, 29, 31,
];

/// x widened to f32 with each 32-chunk permuted: element `order[p]` of a chunk at position `p`.
/// K % 32 == 0.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn prep_x_perm<T: Element>(
    threads: Threads,
    x: &[T],
    m: usize,
    k: usize,
    order: &[usize; 32],
) -> Vec<f32> {
    let mut xf = vec![0.0f32; m * k];
    prep_rows(threads, &mut xf, k, |i, o| {
        for (og, ig) in o
            .chunks_exact_mut(32)
            .zip(x[i * k..i * k + k].chunks_exact(32))
        {
            for (v, &src) in og.iter_mut().zip(order) {
                *v = ig[src].to_f32();
            }
        }
    });
    xf
}

/// The portable kernel: a K-slice of a few W rows decoded into L1 scratch, then dot products
/// against every row of x.
mod rows {
    use super::{Ctx, XRef};
    use crate::simd::SimdLevel;

    /// Rows of W decoded together (x is read once per group).
    const RB: usize = 4;
    /// K elements decoded per pass: RB × KS f32 = 32 KB of scratch.
    const KS: usize = 2048;

    pub(super) fn task(c: &Ctx, r0: usize, r1: usize, out: &mut [f32], level: SimdLevel) {
        #[cfg(target_arch = "x86_64")]
        {
            if level >= SimdLevel::Avx512 {
                // SAFETY: the level was checked against the CPU.
                return unsafe { task_avx512(c, r0, r1, out) };
            }
            if level >= SimdLevel::Avx2 {
                // SAFETY: as above.
                return unsafe { task_avx2(c, r0, r1, out) };
            }
        }
        let _ = level;
        task_impl(c, r0, r1, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn task_avx512(c: &Ctx, r0: usize, r1: usize, out: &mut [f32]) {
        task_impl(c, r0, r1, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn task_avx2(c: &Ctx, r0: usize, r1: usize, out: &mut [f32]) {
        task_impl(c, r0, r1, out)
    }

    /// Decodes elements `[k0, k1)` of W row `r` into `dst` (length k1 - k0).
    #[inline(always)]
    fn decode(c: &Ctx, r: usize, k0: usize, k1: usize, dst: &mut [f32]) {
        let f_end = r * c.k + k1;
        let mut f = r * c.k + k0;
        let mut d = 0usize;
        while f < f_end {
            let b = f / c.bs;
            let seg_end = ((b + 1) * c.bs).min(f_end);
            let a = c.absmax[b];
            let mut lut = [0.0f32; 16];
            for (l, t) in lut.iter_mut().zip(c.table) {
                *l = t * a;
            }
            if f % 2 == 1 {
                dst[d] = lut[(c.packed[f / 2] & 0x0F) as usize];
                f += 1;
                d += 1;
            }
            let pairs = (seg_end - f) / 2;
            let bytes = &c.packed[f / 2..f / 2 + pairs];
            for (o, &byte) in dst[d..d + 2 * pairs].chunks_exact_mut(2).zip(bytes) {
                o[0] = lut[(byte >> 4) as usize];
                o[1] = lut[(byte & 0x0F) as usize];
            }
            f += 2 * pairs;
            d += 2 * pairs;
            if f < seg_end {
                dst[d] = lut[(c.packed[f / 2] >> 4) as usize];
                f += 1;
                d += 1;
            }
        }
    }

    /// Dot products of one x slice with `N` decoded rows, 16 partial sums each.
    #[inline(always)]
    fn dots<const N: usize>(x: &[f32], w: [&[f32]; N]) -> [f32; N] {
        let mut acc = [[0.0f32; 16]; N];
        let chunks = x.len() / 16;
        for ch in 0..chunks {
            let xc = &x[ch * 16..ch * 16 + 16];
            for (a, wr) in acc.iter_mut().zip(&w) {
                let wc = &wr[ch * 16..ch * 16 + 16];
                for l in 0..16 {
                    a[l] += xc[l] * wc[l];
                }
            }
        }
        let mut res = [0.0f32; N];
        for (j, (a, wr)) in acc.iter().zip(&w).enumerate() {
            let mut tail = 0.0f32;
            for l in chunks * 16..x.len() {
                tail += x[l] * wr[l];
            }
            // Pairwise reduction of the 16 lanes.
            let mut s = *a;
            let mut width = 8;
            while width > 0 {
                for l in 0..width {
                    s[l] += s[l + width];
                }
                width /= 2;
            }
            res[j] = s[0] + tail;
        }
        res
    }

    #[inline(always)]
    fn task_impl(c: &Ctx, r0: usize, r1: usize, out: &mut [f32]) {
        let XRef::F32(xf) = c.x else {
            unreachable!("the portable kernel reads f32 x")
        };
        let (k, m) = (c.k, c.m);
        let ks = KS.min(k);
        let mut scratch = vec![0.0f32; RB * ks];
        out.iter_mut().for_each(|o| *o = 0.0);
        let mut rb = r0;
        while rb < r1 {
            let nr = RB.min(r1 - rb);
            let mut k0 = 0;
            while k0 < k {
                let k1 = (k0 + ks).min(k);
                let len = k1 - k0;
                for j in 0..nr {
                    decode(c, rb + j, k0, k1, &mut scratch[j * ks..j * ks + len]);
                }
                for i in 0..m {
                    let xs = &xf[i * k + k0..i * k + k1];
                    if nr == RB {
                        let w: [&[f32]; RB] =
                            std::array::from_fn(|j| &scratch[j * ks..j * ks + len]);
                        let d = dots::<RB>(xs, w);
                        for (j, v) in d.iter().enumerate() {
                            out[(rb - r0 + j) * m + i] += v;
                        }
                    } else {
                        for j in 0..nr {
                            let d = dots::<1>(xs, [&scratch[j * ks..j * ks + len]]);
                            out[(rb - r0 + j) * m + i] += d[0];
                        }
                    }
                }
                k0 = k1;
            }
            rb += nr;
        }
    }
}

/// One 64-byte decode table: 16 f32 entries, or 16 bf16 entries repeated twice.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Lut([u32; 16]);

#[cfg(target_arch = "x86_64")]
// Tile loops index several per-row arrays (rows, tables, accumulators) with one row index.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Ctx, Lut, XRef};

    /// Ranges of K over which no row of a tile changes absmax block.
    #[derive(Clone, Copy)]
    enum Spans<'a> {
        /// K % blocksize == 0: every row's blocks start at multiples of `len`.
        Uniform { len: usize, count: usize },
        /// Otherwise: `(k0, k1)` ranges (multiples of 32), planned per tile.
        List(&'a [(usize, usize)]),
    }

    impl Spans<'_> {
        #[inline(always)]
        fn count(&self) -> usize {
            match self {
                Spans::Uniform { count, .. } => *count,
                Spans::List(l) => l.len(),
            }
        }

        #[inline(always)]
        fn get(&self, s: usize) -> (usize, usize) {
            match self {
                Spans::Uniform { len, .. } => (s * len, s * len + len),
                Spans::List(l) => l[s],
            }
        }
    }

    /// The packed rows of a tile, their spans and the absmax of each row for each span.
    struct Tile<'a> {
        /// Start of each W row's packed bytes (only the first `nt` are used).
        rows: [*const u8; 8],
        /// `*scales[r].add(s)`: row r's absmax over span s.
        scales: [*const f32; 8],
        spans: Spans<'a>,
        /// `spans.count() * NT` tables, span-major (LUT kernels only).
        luts: *const Lut,
        /// Where the next tile's packed bytes start (rows are contiguous): the kernels
        /// prefetch it while this tile runs, as the hardware prefetchers stop at each 4 KB
        /// page and a tile's short row streams keep them from ramping up.
        next: *const u8,
        /// The same for the next tile's absmax bytes, and log2 of the blocksize (their rate
        /// per step: a shift, not a division in the inner loop).
        next_scales: *const u8,
        bs_shift: u32,
    }

    /// Scratch a task reuses for every tile.
    struct Scratch {
        spans: Vec<(usize, usize)>,
        scales: Vec<f32>,
        luts: Vec<Lut>,
    }

    impl Scratch {
        fn new() -> Self {
            Scratch {
                spans: Vec::new(),
                scales: Vec::new(),
                luts: Vec::new(),
            }
        }
    }

    /// A buffer of at least `n` tables (contents unspecified: every one used is written first).
    #[inline(always)]
    fn lut_buffer(luts: &mut Vec<Lut>, n: usize) -> *mut Lut {
        if luts.len() < n {
            luts.resize(n, Lut([0; 16]));
        }
        luts.as_mut_ptr()
    }

    /// Plans rows `r..r + nt`: their packed starts, spans and per-span scales.
    #[inline(always)]
    unsafe fn plan<'s>(
        c: &Ctx,
        r: usize,
        nt: usize,
        spans_buf: &'s mut Vec<(usize, usize)>,
        scales_buf: &mut Vec<f32>,
    ) -> Tile<'s> {
        let mut rows = [std::ptr::null::<u8>(); 8];
        let mut scales = [std::ptr::null::<f32>(); 8];
        for j in 0..nt {
            // Row starts are even (K % 32 == 0): byte aligned.
            rows[j] = c.packed.as_ptr().add((r + j) * c.k / 2);
        }
        let spans = if c.k.is_multiple_of(c.bs) {
            for (j, s) in scales.iter_mut().take(nt).enumerate() {
                *s = c.absmax.as_ptr().add((r + j) * c.k / c.bs);
            }
            Spans::Uniform {
                len: c.bs,
                count: c.k / c.bs,
            }
        } else {
            spans_buf.clear();
            let mut k = 0;
            while k < c.k {
                let mut len = c.k - k;
                for rr in r..r + nt {
                    len = len.min(c.bs - (rr * c.k + k) % c.bs);
                }
                spans_buf.push((k, k + len));
                k += len;
            }
            let ns = spans_buf.len();
            scales_buf.clear();
            scales_buf.resize(nt * ns, 0.0);
            for j in 0..nt {
                for (s, &(k0, _)) in spans_buf.iter().enumerate() {
                    scales_buf[j * ns + s] = c.absmax[((r + j) * c.k + k0) / c.bs];
                }
            }
            for (j, s) in scales.iter_mut().take(nt).enumerate() {
                *s = scales_buf.as_ptr().add(j * ns);
            }
            Spans::List(spans_buf)
        };
        Tile {
            rows,
            scales,
            spans,
            luts: std::ptr::null(),
            next: rows[0].wrapping_add(nt * c.k / 2),
            next_scales: c.absmax.as_ptr().wrapping_add((r + nt) * c.k / c.bs).cast(),
            // Blocksizes are powers of two (check_blocksize).
            bs_shift: c.bs.trailing_zeros(),
        }
    }

    /// Dispatches (rows of x, rows of W) to the tile kernel instantiated for it: `$mt` rows of
    /// x (1 to 8) by `$ntmain` (a full tile) or 1 (the last rows of a task) rows of W.
    macro_rules! dispatch_tile {
        ($f:ident, $t:expr, $mt:expr, $nt:expr, $ntmain:literal, $($args:expr),*) => {
            match ($mt, $nt == $ntmain) {
                (1, true) => $f::<1, $ntmain>($t, $($args),*),
                (2, true) => $f::<2, $ntmain>($t, $($args),*),
                (3, true) => $f::<3, $ntmain>($t, $($args),*),
                (4, true) => $f::<4, $ntmain>($t, $($args),*),
                (5, true) => $f::<5, $ntmain>($t, $($args),*),
                (6, true) => $f::<6, $ntmain>($t, $($args),*),
                (7, true) => $f::<7, $ntmain>($t, $($args),*),
                (8, true) => $f::<8, $ntmain>($t, $($args),*),
                (1, false) => $f::<1, 1>($t, $($args),*),
                (2, false) => $f::<2, 1>($t, $($args),*),
                (3, false) => $f::<3, 1>($t, $($args),*),
                (4, false) => $f::<4, 1>($t, $($args),*),
                (5, false) => $f::<5, 1>($t, $($args),*),
                (6, false) => $f::<6, 1>($t, $($args),*),
                (7, false) => $f::<7, 1>($t, $($args),*),
                (8, false) => $f::<8, 1>($t, $($args),*),
                _ => unreachable!("tiles have 1 to 8 rows of x"),
            }
        };
    }

    /// Prefetches (into L2) the part of the next tile that matches step `k` of this one: a
    /// step reads `NT * 16` bytes of the tile, the next tile is as long and starts where it
    /// ends. Prefetches never fault, so the last tile's reach past the matrix is harmless.
    #[inline(always)]
    unsafe fn prefetch_next<const NT: usize>(t: &Tile, k: usize) {
        let p = t.next.wrapping_add(k * NT / 2);
        _mm_prefetch::<_MM_HINT_T1>(p.cast());
        if NT > 4 {
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64).cast());
        }
        // The next tile's absmax, NT * 4 / bs bytes per element of K (a line every few steps).
        _mm_prefetch::<_MM_HINT_T1>(
            t.next_scales
                .wrapping_add((k * NT * 4) >> t.bs_shift)
                .cast(),
        );
    }

    /// Rows of W per tile for one row of x, and for several.
    const NT1: usize = 8;
    const NTM: usize = 4;
    const NTM_AVX2: usize = 2;

    // ------------------------------------------------------------ AVX-512, f32 FMAs

    /// The f32 kernels: x in the split layout (32-chunks as 16 even then 16 odd elements).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn task_avx512_f32(c: &Ctx, r0: usize, r1: usize, out: &mut [f32]) {
        let XRef::F32(x) = c.x else {
            unreachable!("the f32 kernel reads f32 x")
        };
        let (k, m) = (c.k, c.m);
        let table = _mm512_loadu_ps(c.table.as_ptr());
        let mut sc = Scratch::new();
        let mut r = r0;
        while r < r1 {
            let o = out.as_mut_ptr().add((r - r0) * m);
            if m == 1 {
                let nt = if r1 - r >= NT1 { NT1 } else { 1 };
                let t = plan(c, r, nt, &mut sc.spans, &mut sc.scales);
                if nt == NT1 {
                    row_f32_avx512::<NT1>(&t, table, x.as_ptr(), o);
                } else {
                    row_f32_avx512::<1>(&t, table, x.as_ptr(), o);
                }
                r += nt;
            } else {
                let nt = if r1 - r >= NTM { NTM } else { 1 };
                let mut t = plan(c, r, nt, &mut sc.spans, &mut sc.scales);
                let lp = lut_buffer(&mut sc.luts, t.spans.count() * nt);
                for s in 0..t.spans.count() {
                    for j in 0..nt {
                        let v = _mm512_mul_ps(table, _mm512_set1_ps(*t.scales[j].add(s)));
                        _mm512_store_ps(lp.add(s * nt + j).cast(), v);
                    }
                }
                t.luts = lp;
                let mut i = 0;
                while i < m {
                    let mt = 4.min(m - i);
                    let xp = x.as_ptr().add(i * k);
                    dispatch_tile!(lut_f32_avx512, &t, mt, nt, 4, xp, k, o.add(i), m);
                    i += mt;
                }
                r += nt;
            }
        }
    }

    /// One row of x by `NT` rows of W: the unscaled table in a register, each span's partial
    /// sum scaled by its absmax with one FMA (no table built per block).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn row_f32_avx512<const NT: usize>(
        t: &Tile,
        table: __m512,
        x: *const f32,
        out: *mut f32,
    ) {
        let mut acc = [_mm512_setzero_ps(); NT];
        for s in 0..t.spans.count() {
            let (k0, k1) = t.spans.get(s);
            let mut blk = [_mm512_setzero_ps(); NT];
            let mut k = k0;
            while k < k1 {
                prefetch_next::<NT>(t, k);
                let xe = _mm512_loadu_ps(x.add(k));
                let xo = _mm512_loadu_ps(x.add(k + 16));
                for r in 0..NT {
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(t.rows[r].add(k / 2).cast()));
                    let we = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), table);
                    let wo = _mm512_permutexvar_ps(v, table);
                    blk[r] = _mm512_fmadd_ps(we, xe, blk[r]);
                    blk[r] = _mm512_fmadd_ps(wo, xo, blk[r]);
                }
                k += 32;
            }
            for r in 0..NT {
                acc[r] = _mm512_fmadd_ps(blk[r], _mm512_set1_ps(*t.scales[r].add(s)), acc[r]);
            }
        }
        for (r, v) in acc.iter().enumerate() {
            *out.add(r) = _mm512_reduce_add_ps(*v);
        }
    }

    /// `MT` rows of x (stride `xs`) by `NT` rows of W with per-span scaled tables; sums to
    /// `out[r * os + i]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn lut_f32_avx512<const MT: usize, const NT: usize>(
        t: &Tile,
        x: *const f32,
        xs: usize,
        out: *mut f32,
        os: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NT]; MT];
        let mut lut = t.luts;
        for s in 0..t.spans.count() {
            let (k0, k1) = t.spans.get(s);
            let mut tab = [_mm512_setzero_ps(); NT];
            for (r, tb) in tab.iter_mut().enumerate() {
                *tb = _mm512_load_ps(lut.add(r).cast());
            }
            lut = lut.add(NT);
            let mut k = k0;
            while k < k1 {
                prefetch_next::<NT>(t, k);
                let mut we = [_mm512_setzero_ps(); NT];
                let mut wo = [_mm512_setzero_ps(); NT];
                for r in 0..NT {
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(t.rows[r].add(k / 2).cast()));
                    we[r] = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), tab[r]);
                    wo[r] = _mm512_permutexvar_ps(v, tab[r]);
                }
                // Each x vector is loaded once and used by every row of W in the tile.
                for (i, a) in acc.iter_mut().enumerate() {
                    let xe = _mm512_loadu_ps(x.add(i * xs + k));
                    let xo = _mm512_loadu_ps(x.add(i * xs + k + 16));
                    for r in 0..NT {
                        a[r] = _mm512_fmadd_ps(we[r], xe, a[r]);
                        a[r] = _mm512_fmadd_ps(wo[r], xo, a[r]);
                    }
                }
                k += 32;
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (r, v) in a.iter().enumerate() {
                *out.add(r * os + i) = _mm512_reduce_add_ps(*v);
            }
        }
    }

    // ------------------------------------------------------------ AVX-512 BF16, M > 1

    /// The 16-entry f32 table `v` rounded to bf16, repeated in both 256-bit halves (`vpermw`
    /// takes 5-bit indices; the top bit, a neighbouring nibble's, then does not matter).
    #[inline(always)]
    unsafe fn bf16_table(v: __m512) -> __m512i {
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm512_broadcast_i64x4(h)
    }

    /// The tile's per-span bf16 tables (the code table times each span's absmax, one per row
    /// and span) into `luts`, and `t.luts` pointed at them.
    #[inline(always)]
    unsafe fn scaled_bf16_tables(table: __m512, t: &mut Tile, nt: usize, luts: &mut Vec<Lut>) {
        let lp = lut_buffer(luts, t.spans.count() * nt);
        for s in 0..t.spans.count() {
            for j in 0..nt {
                let v = _mm512_mul_ps(table, _mm512_set1_ps(*t.scales[j].add(s)));
                _mm512_store_si512(lp.add(s * nt + j).cast(), bf16_table(v));
            }
        }
        t.luts = lp;
    }

    /// bf16 x (natural order) with per-span bf16 tables and `vdpbf16ps`, for more than
    /// [`super::WIDE_MAX_ROWS`] rows (fewer run [`task_avx512_bf16_wide`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
    pub(super) unsafe fn task_avx512_bf16(c: &Ctx, r0: usize, r1: usize, out: &mut [f32]) {
        let XRef::Bf16(x) = c.x else {
            unreachable!("the bf16 kernel reads bf16 x")
        };
        let (k, m) = (c.k, c.m);
        let table = _mm512_loadu_ps(c.table.as_ptr());
        // Register tiles (rows of x, rows of W): at most 24 accumulators, each decoded W chunk
        // shared by up to 8 rows of x and each x vector by 3–4 rows of W. Measured on Zen 4
        // (single thread, 4096×4096): (4, 4) best up to M = 4, (8, 3) for 5–16, (6, 4) above.
        let (mt_max, nt_main) = match m {
            0..=4 => (4, 4),
            5..=16 => (8, 3),
            _ => (6, 4),
        };
        let mut sc = Scratch::new();
        let mut r = r0;
        while r < r1 {
            let o = out.as_mut_ptr().add((r - r0) * m);
            let nt = if r1 - r >= nt_main { nt_main } else { 1 };
            let mut t = plan(c, r, nt, &mut sc.spans, &mut sc.scales);
            scaled_bf16_tables(table, &mut t, nt, &mut sc.luts);
            let mut i = 0;
            while i < m {
                let mt = mt_max.min(m - i);
                let xp = x.as_ptr().add(i * k);
                if nt_main == 3 {
                    dispatch_tile!(lut_bf16_avx512, &t, mt, nt, 3, xp, k, o.add(i), m);
                } else {
                    dispatch_tile!(lut_bf16_avx512, &t, mt, nt, 4, xp, k, o.add(i), m);
                }
                i += mt;
            }
            r += nt;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
    unsafe fn lut_bf16_avx512<const MT: usize, const NT: usize>(
        t: &Tile,
        x: *const u16,
        xs: usize,
        out: *mut f32,
        os: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NT]; MT];
        let mut lut = t.luts;
        for s in 0..t.spans.count() {
            let (k0, k1) = t.spans.get(s);
            let mut tab = [_mm512_setzero_si512(); NT];
            for (r, tb) in tab.iter_mut().enumerate() {
                *tb = _mm512_load_si512(lut.add(r).cast());
            }
            lut = lut.add(NT);
            let mut k = k0;
            while k < k1 {
                prefetch_next::<NT>(t, k);
                let mut wv = [_mm512_setzero_si512(); NT];
                for r in 0..NT {
                    // Word 2i: the high nibble (element 2i); word 2i+1: the low nibble. `vpermw`
                    // reads 5 index bits: the 5th (a neighbouring nibble's bit) is ignored
                    // because the table repeats. (A `vpmultishiftqb` unpack, one op fewer, was
                    // slower on Zen 4.)
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(t.rows[r].add(k / 2).cast()));
                    let idx =
                        _mm512_or_si512(_mm512_srli_epi32::<4>(v), _mm512_slli_epi32::<16>(v));
                    wv[r] = _mm512_permutexvar_epi16(idx, tab[r]);
                }
                // Each x vector is loaded once and used by every row of W in the tile.
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(x.add(i * xs + k).cast()));
                    for r in 0..NT {
                        a[r] = _mm512_dpbf16_ps(
                            a[r],
                            std::mem::transmute::<__m512i, __m512bh>(wv[r]),
                            xv,
                        );
                    }
                }
                k += 32;
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (r, v) in a.iter().enumerate() {
                *out.add(r * os + i) = _mm512_reduce_add_ps(*v);
            }
        }
    }

    // ------------------------------------------------------------ AVX-512 BF16, wide decode

    /// Where, in the [`super::prep_x_wide`] layout, the even and the odd elements of the
    /// 32-chunk at `k` start: each 64-chunk holds its 32 even elements then its 32 odd ones (a
    /// final 32-chunk its 16 and 16).
    #[inline(always)]
    fn wide_halves(k: usize, len: usize) -> (usize, usize) {
        let c = k & !63;
        let half = (len - c).min(64) / 2;
        let h = (k - c) / 2; // 0 or 16
        (c + h, c + half + h)
    }

    /// 64 weights from 32 packed bytes: their bytes widen to words, `vpermw` looks up the low
    /// nibble (bit 4 of the index is the high nibble's low bit, ignored: the 16-word table is
    /// repeated) and the high nibble shifted down. Returns (even elements, odd elements).
    #[inline(always)]
    unsafe fn decode64_bf16(src: *const u8, tab: __m512i) -> (__m512i, __m512i) {
        let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(src.cast()));
        (
            _mm512_permutexvar_epi16(_mm512_srli_epi16::<4>(v), tab),
            _mm512_permutexvar_epi16(v, tab),
        )
    }

    /// [`decode64_bf16`] for 32 weights: the upper 16 words of each result are table[0]
    /// (multiplied by the zeros [`load16_bf16`] puts above x's 16).
    #[inline(always)]
    unsafe fn decode32_bf16(src: *const u8, tab: __m512i) -> (__m512i, __m512i) {
        let v = _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(_mm_loadu_si128(src.cast())));
        (
            _mm512_permutexvar_epi16(_mm512_srli_epi16::<4>(v), tab),
            _mm512_permutexvar_epi16(v, tab),
        )
    }

    /// 16 bf16 of x, the upper 16 words zero.
    #[inline(always)]
    unsafe fn load16_bf16(p: *const u16) -> __m512bh {
        std::mem::transmute(_mm512_maskz_loadu_epi16(0xFFFF, p.cast()))
    }

    #[inline(always)]
    unsafe fn dp(acc: __m512, w: __m512i, x: __m512bh) -> __m512 {
        _mm512_dpbf16_ps(acc, std::mem::transmute::<__m512i, __m512bh>(w), x)
    }

    /// The bf16 kernels on the wide decode: x in the [`super::prep_x_wide`] layout.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
    pub(super) unsafe fn task_avx512_bf16_wide(c: &Ctx, r0: usize, r1: usize, out: &mut [f32]) {
        let XRef::Bf16(x) = c.x else {
            unreachable!("the bf16 kernel reads bf16 x")
        };
        let (k, m) = (c.k, c.m);
        let table = _mm512_loadu_ps(c.table.as_ptr());
        let mut sc = Scratch::new();
        let mut r = r0;
        if m == 1 {
            let tab = bf16_table(table);
            while r < r1 {
                let o = out.as_mut_ptr().add(r - r0);
                let nt = if r1 - r >= NT1 { NT1 } else { 1 };
                let t = plan(c, r, nt, &mut sc.spans, &mut sc.scales);
                if nt == NT1 {
                    row_bf16_wide::<NT1>(&t, tab, x.as_ptr(), k, o);
                } else {
                    row_bf16_wide::<1>(&t, tab, x.as_ptr(), k, o);
                }
                r += nt;
            }
            return;
        }
        // Register tiles: each 64-step holds 2 * NT decoded vectors (even and odd elements),
        // so the tiles are smaller than `task_avx512_bf16`'s. Measured on Zen 4 (single thread,
        // 512x4096 NF4 in L2, against that kernel): (4, 4) 1.16x at M = 2, (4, 3) 1.25-1.3x at
        // M = 8 and 16; at 32 it is 0.9x, so above WIDE_MAX_ROWS the narrow kernel runs.
        let (mt_max, nt_main) = if m <= 4 { (4, 4) } else { (4, 3) };
        while r < r1 {
            let o = out.as_mut_ptr().add((r - r0) * m);
            let nt = if r1 - r >= nt_main { nt_main } else { 1 };
            let mut t = plan(c, r, nt, &mut sc.spans, &mut sc.scales);
            scaled_bf16_tables(table, &mut t, nt, &mut sc.luts);
            let mut i = 0;
            while i < m {
                let mt = mt_max.min(m - i);
                let xp = x.as_ptr().add(i * k);
                if nt_main == 3 {
                    dispatch_tile!(lut_bf16_wide, &t, mt, nt, 3, xp, k, o.add(i), m);
                } else {
                    dispatch_tile!(lut_bf16_wide, &t, mt, nt, 4, xp, k, o.add(i), m);
                }
                i += mt;
            }
            r += nt;
        }
    }

    /// One row of x by `NT` rows of W: the unscaled bf16 table, each span's partial sum scaled
    /// by its absmax in f32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
    unsafe fn row_bf16_wide<const NT: usize>(
        t: &Tile,
        tab: __m512i,
        x: *const u16,
        len: usize,
        out: *mut f32,
    ) {
        let mut acc = [_mm512_setzero_ps(); NT];
        for s in 0..t.spans.count() {
            let (k0, k1) = t.spans.get(s);
            let mut blk = [_mm512_setzero_ps(); NT];
            let mut k = k0;
            while k < k1 {
                prefetch_next::<NT>(t, k);
                if k % 64 == 0 && k + 64 <= k1 {
                    prefetch_next::<NT>(t, k + 32);
                    let xe = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        x.add(k).cast(),
                    ));
                    let xo = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        x.add(k + 32).cast(),
                    ));
                    for r in 0..NT {
                        let (we, wo) = decode64_bf16(t.rows[r].add(k / 2), tab);
                        blk[r] = dp(blk[r], we, xe);
                        blk[r] = dp(blk[r], wo, xo);
                    }
                    k += 64;
                } else {
                    let (e, o) = wide_halves(k, len);
                    let (xe, xo) = (load16_bf16(x.add(e)), load16_bf16(x.add(o)));
                    for r in 0..NT {
                        let (we, wo) = decode32_bf16(t.rows[r].add(k / 2), tab);
                        blk[r] = dp(blk[r], we, xe);
                        blk[r] = dp(blk[r], wo, xo);
                    }
                    k += 32;
                }
            }
            for r in 0..NT {
                acc[r] = _mm512_fmadd_ps(blk[r], _mm512_set1_ps(*t.scales[r].add(s)), acc[r]);
            }
        }
        for (r, v) in acc.iter().enumerate() {
            *out.add(r) = _mm512_reduce_add_ps(*v);
        }
    }

    /// `MT` rows of x (stride `xs`, also K) by `NT` rows of W with per-span scaled bf16 tables;
    /// sums to `out[r * os + i]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
    unsafe fn lut_bf16_wide<const MT: usize, const NT: usize>(
        t: &Tile,
        x: *const u16,
        xs: usize,
        out: *mut f32,
        os: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NT]; MT];
        let mut lut = t.luts;
        for s in 0..t.spans.count() {
            let (k0, k1) = t.spans.get(s);
            let mut tab = [_mm512_setzero_si512(); NT];
            for (r, tb) in tab.iter_mut().enumerate() {
                *tb = _mm512_load_si512(lut.add(r).cast());
            }
            lut = lut.add(NT);
            let mut k = k0;
            while k < k1 {
                prefetch_next::<NT>(t, k);
                let mut we = [_mm512_setzero_si512(); NT];
                let mut wo = [_mm512_setzero_si512(); NT];
                if k % 64 == 0 && k + 64 <= k1 {
                    prefetch_next::<NT>(t, k + 32);
                    for r in 0..NT {
                        (we[r], wo[r]) = decode64_bf16(t.rows[r].add(k / 2), tab[r]);
                    }
                    // Each x vector is loaded once and used by every row of W in the tile.
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xp = x.add(i * xs + k);
                        let xe =
                            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(xp.cast()));
                        let xo = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                            xp.add(32).cast(),
                        ));
                        for r in 0..NT {
                            a[r] = dp(a[r], we[r], xe);
                            a[r] = dp(a[r], wo[r], xo);
                        }
                    }
                    k += 64;
                } else {
                    for r in 0..NT {
                        (we[r], wo[r]) = decode32_bf16(t.rows[r].add(k / 2), tab[r]);
                    }
                    let (e, o) = wide_halves(k, xs);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xe = load16_bf16(x.add(i * xs + e));
                        let xo = load16_bf16(x.add(i * xs + o));
                        for r in 0..NT {
                            a[r] = dp(a[r], we[r], xe);
                            a[r] = dp(a[r], wo[r], xo);
                        }
                    }
                    k += 32;
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (r, v) in a.iter().enumerate() {
                *out.add(r * os + i) = _mm512_reduce_add_ps(*v);
            }
        }
    }

    // ------------------------------------------------------------ AVX2

    /// x in the split layout of 16-groups (8 even then 8 odd elements).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn task_avx2(c: &Ctx, r0: usize, r1: usize, out: &mut [f32]) {
        let XRef::F32(x) = c.x else {
            unreachable!("the f32 kernel reads f32 x")
        };
        let (k, m) = (c.k, c.m);
        let lo = _mm256_loadu_ps(c.table.as_ptr());
        let hi = _mm256_loadu_ps(c.table.as_ptr().add(8));
        let mut sc = Scratch::new();
        let mut r = r0;
        while r < r1 {
            let o = out.as_mut_ptr().add((r - r0) * m);
            if m == 1 {
                let nt = if r1 - r >= NT1 { NT1 } else { 1 };
                let t = plan(c, r, nt, &mut sc.spans, &mut sc.scales);
                if nt == NT1 {
                    row_avx2::<NT1>(&t, lo, hi, x.as_ptr(), o);
                } else {
                    row_avx2::<1>(&t, lo, hi, x.as_ptr(), o);
                }
                r += nt;
            } else {
                let nt = if r1 - r >= NTM_AVX2 { NTM_AVX2 } else { 1 };
                let mut t = plan(c, r, nt, &mut sc.spans, &mut sc.scales);
                let lp = lut_buffer(&mut sc.luts, t.spans.count() * nt);
                for s in 0..t.spans.count() {
                    for j in 0..nt {
                        let a = _mm256_set1_ps(*t.scales[j].add(s));
                        let p: *mut f32 = lp.add(s * nt + j).cast();
                        _mm256_store_ps(p, _mm256_mul_ps(lo, a));
                        _mm256_store_ps(p.add(8), _mm256_mul_ps(hi, a));
                    }
                }
                t.luts = lp;
                let mut i = 0;
                while i < m {
                    let mt = 4.min(m - i);
                    let xp = x.as_ptr().add(i * k);
                    dispatch_tile!(lut_avx2, &t, mt, nt, 2, xp, k, o.add(i), m);
                    i += mt;
                }
                r += nt;
            }
        }
    }

    /// 8 weights from 8 codes (dwords): `vpermps` reads the low 3 bits, bit 3 (moved to the
    /// sign by `shifted`) picks the table half.
    #[inline(always)]
    unsafe fn decode8(lo: __m256, hi: __m256, idx: __m256i, sign: __m256i) -> __m256 {
        _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(lo, idx),
            _mm256_permutevar8x32_ps(hi, idx),
            _mm256_castsi256_ps(sign),
        )
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_avx2<const NT: usize>(
        t: &Tile,
        lo: __m256,
        hi: __m256,
        x: *const f32,
        out: *mut f32,
    ) {
        let mut acc = [_mm256_setzero_ps(); NT];
        for s in 0..t.spans.count() {
            let (k0, k1) = t.spans.get(s);
            let mut blk = [_mm256_setzero_ps(); NT];
            let mut k = k0;
            while k < k1 {
                prefetch_next::<NT>(t, k);
                let xe = _mm256_loadu_ps(x.add(k));
                let xo = _mm256_loadu_ps(x.add(k + 8));
                for r in 0..NT {
                    let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(t.rows[r].add(k / 2).cast()));
                    let we = decode8(
                        lo,
                        hi,
                        _mm256_srli_epi32::<4>(v),
                        _mm256_slli_epi32::<24>(v),
                    );
                    let wo = decode8(lo, hi, v, _mm256_slli_epi32::<28>(v));
                    blk[r] = _mm256_fmadd_ps(we, xe, blk[r]);
                    blk[r] = _mm256_fmadd_ps(wo, xo, blk[r]);
                }
                k += 16;
            }
            for r in 0..NT {
                acc[r] = _mm256_fmadd_ps(blk[r], _mm256_set1_ps(*t.scales[r].add(s)), acc[r]);
            }
        }
        for (r, v) in acc.iter().enumerate() {
            *out.add(r) = hsum256(*v);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lut_avx2<const MT: usize, const NT: usize>(
        t: &Tile,
        x: *const f32,
        xs: usize,
        out: *mut f32,
        os: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NT]; MT];
        let mut lut = t.luts;
        for s in 0..t.spans.count() {
            let (k0, k1) = t.spans.get(s);
            let mut tlo = [_mm256_setzero_ps(); NT];
            let mut thi = [_mm256_setzero_ps(); NT];
            for r in 0..NT {
                let p: *const f32 = lut.add(r).cast();
                tlo[r] = _mm256_load_ps(p);
                thi[r] = _mm256_load_ps(p.add(8));
            }
            lut = lut.add(NT);
            let mut k = k0;
            while k < k1 {
                prefetch_next::<NT>(t, k);
                let mut we = [_mm256_setzero_ps(); NT];
                let mut wo = [_mm256_setzero_ps(); NT];
                for r in 0..NT {
                    let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(t.rows[r].add(k / 2).cast()));
                    we[r] = decode8(
                        tlo[r],
                        thi[r],
                        _mm256_srli_epi32::<4>(v),
                        _mm256_slli_epi32::<24>(v),
                    );
                    wo[r] = decode8(tlo[r], thi[r], v, _mm256_slli_epi32::<28>(v));
                }
                for (i, a) in acc.iter_mut().enumerate() {
                    let xe = _mm256_loadu_ps(x.add(i * xs + k));
                    let xo = _mm256_loadu_ps(x.add(i * xs + k + 8));
                    for r in 0..NT {
                        a[r] = _mm256_fmadd_ps(we[r], xe, a[r]);
                        a[r] = _mm256_fmadd_ps(wo[r], xo, a[r]);
                    }
                }
                k += 16;
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (r, v) in a.iter().enumerate() {
                *out.add(r * os + i) = hsum256(*v);
            }
        }
    }

    /// One row of bf16 x on AVX2: the table as bf16 bytes (high and low) in two `vpshufb`
    /// registers, x in [`super::AVX2_BF16_ORDER`]; per-span sums scaled by absmax.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn task_avx2_bf16_row(c: &Ctx, r0: usize, r1: usize, out: &mut [f32]) {
        let XRef::F32(x) = c.x else {
            unreachable!("the AVX2 bf16 kernel reads permuted f32 x")
        };
        let mut hi = [0u8; 32];
        let mut lo = [0u8; 32];
        for (i, v) in c.table.iter().enumerate() {
            let b = half::bf16::from_f32(*v).to_bits();
            hi[i] = (b >> 8) as u8;
            lo[i] = b as u8;
            hi[i + 16] = hi[i];
            lo[i + 16] = lo[i];
        }
        let th = _mm256_loadu_si256(hi.as_ptr().cast());
        let tl = _mm256_loadu_si256(lo.as_ptr().cast());
        let mut sc = Scratch::new();
        let mut r = r0;
        while r < r1 {
            let o = out.as_mut_ptr().add(r - r0);
            let nt = if r1 - r >= NT_AVX2_BF16 {
                NT_AVX2_BF16
            } else {
                1
            };
            let t = plan(c, r, nt, &mut sc.spans, &mut sc.scales);
            if nt == NT_AVX2_BF16 {
                row_avx2_bf16::<NT_AVX2_BF16>(&t, th, tl, x.as_ptr(), o);
            } else {
                row_avx2_bf16::<1>(&t, th, tl, x.as_ptr(), o);
            }
            r += nt;
        }
    }

    const NT_AVX2_BF16: usize = 4;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_avx2_bf16<const NT: usize>(
        t: &Tile,
        th: __m256i,
        tl: __m256i,
        x: *const f32,
        out: *mut f32,
    ) {
        // Lane 0 takes the high nibbles (even elements), lane 1 the low ones (odd elements).
        let shifts = _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0);
        let nib = _mm256_set1_epi8(0x0F);
        let top = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let mut acc = [_mm256_setzero_ps(); NT];
        for s in 0..t.spans.count() {
            let (k0, k1) = t.spans.get(s);
            let mut blk = [_mm256_setzero_ps(); NT];
            let mut k = k0;
            while k < k1 {
                prefetch_next::<NT>(t, k);
                for r in 0..NT {
                    let v =
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(t.rows[r].add(k / 2).cast()));
                    let idx = _mm256_and_si256(_mm256_srlv_epi32(v, shifts), nib);
                    let hb = _mm256_shuffle_epi8(th, idx);
                    let lb = _mm256_shuffle_epi8(tl, idx);
                    let w0 = _mm256_unpacklo_epi8(lb, hb);
                    let w1 = _mm256_unpackhi_epi8(lb, hb);
                    let xp = x.add(k);
                    let a = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w0));
                    blk[r] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xp), blk[r]);
                    let b = _mm256_castsi256_ps(_mm256_and_si256(w0, top));
                    blk[r] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xp.add(8)), blk[r]);
                    let c = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w1));
                    blk[r] = _mm256_fmadd_ps(c, _mm256_loadu_ps(xp.add(16)), blk[r]);
                    let d = _mm256_castsi256_ps(_mm256_and_si256(w1, top));
                    blk[r] = _mm256_fmadd_ps(d, _mm256_loadu_ps(xp.add(24)), blk[r]);
                }
                k += 32;
            }
            for r in 0..NT {
                acc[r] = _mm256_fmadd_ps(blk[r], _mm256_set1_ps(*t.scales[r].add(s)), acc[r]);
            }
        }
        for (r, v) in acc.iter().enumerate() {
            *out.add(r) = hsum256(*v);
        }
    }

    // ------------------------------------------------------------ AVX2, byte-plane decode

    /// The 16 table entries as four byte planes (byte `b` of every entry's f32 bits), each
    /// repeated in both 128-bit lanes: the `vpshufb` tables of [`decode32_planes`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn byte_planes(table: &[f32; 16]) -> [__m256i; 4] {
        let mut p = [[0u8; 32]; 4];
        for (q, v) in table.iter().enumerate() {
            for (b, byte) in v.to_bits().to_le_bytes().into_iter().enumerate() {
                p[b][q] = byte;
                p[b][q + 16] = byte;
            }
        }
        p.map(|plane| _mm256_loadu_si256(plane.as_ptr().cast()))
    }

    /// The 32 weights whose codes are the 16 bytes at `src`, exactly (table entries, f32), as
    /// four vectors in [`super::AVX2_PLANE_ORDER`]: lane 0 decodes the high nibbles (even
    /// elements), lane 1 the low ones; one `vpshufb` per byte of the f32, then byte pairs and
    /// word pairs interleaved back into dwords.
    #[inline(always)]
    unsafe fn decode32_planes(src: *const u8, pl: &[__m256i; 4]) -> [__m256; 4] {
        let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(src.cast()));
        let idx = _mm256_and_si256(
            _mm256_srlv_epi32(v, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0)),
            _mm256_set1_epi8(0x0F),
        );
        let b0 = _mm256_shuffle_epi8(pl[0], idx);
        let b1 = _mm256_shuffle_epi8(pl[1], idx);
        let b2 = _mm256_shuffle_epi8(pl[2], idx);
        let b3 = _mm256_shuffle_epi8(pl[3], idx);
        let (lo01, hi01) = (_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1));
        let (lo23, hi23) = (_mm256_unpacklo_epi8(b2, b3), _mm256_unpackhi_epi8(b2, b3));
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23)),
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23)),
        ]
    }

    /// Rows of W per tile of the one-row kernel, rows of x per pass of the several-row one.
    const NT_PLANES: usize = 4;
    const MT_PLANES: usize = 8;

    /// The byte-plane kernels: x in [`super::AVX2_PLANE_ORDER`]. One row of x: `NT_PLANES` W
    /// rows decoded from the unscaled table, per-span sums scaled by absmax (as [`row_avx2`]).
    /// Several: each W row decoded once per group of up to `MT_PLANES` x rows and scaled to
    /// the exact dequantized weight (`code * absmax` in f32) before the FMAs.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn task_avx2_planes(c: &Ctx, r0: usize, r1: usize, out: &mut [f32]) {
        let XRef::F32(x) = c.x else {
            unreachable!("the byte-plane kernel reads permuted f32 x")
        };
        let (k, m) = (c.k, c.m);
        let pl = byte_planes(c.table);
        let mut sc = Scratch::new();
        if m == 1 {
            let mut r = r0;
            while r < r1 {
                let o = out.as_mut_ptr().add(r - r0);
                let nt = if r1 - r >= NT_PLANES { NT_PLANES } else { 1 };
                let t = plan(c, r, nt, &mut sc.spans, &mut sc.scales);
                if nt == NT_PLANES {
                    row_planes::<NT_PLANES>(&t, &pl, x.as_ptr(), o);
                } else {
                    row_planes::<1>(&t, &pl, x.as_ptr(), o);
                }
                r += nt;
            }
            return;
        }
        let mut r = r0;
        while r < r1 {
            let o = out.as_mut_ptr().add((r - r0) * m);
            let t = plan(c, r, 1, &mut sc.spans, &mut sc.scales);
            let mut i = 0;
            while i < m {
                let mt = MT_PLANES.min(m - i);
                let xp = x.as_ptr().add(i * k);
                let oi = o.add(i);
                match mt {
                    1 => rows_planes::<1>(&t, &pl, xp, k, oi),
                    2 => rows_planes::<2>(&t, &pl, xp, k, oi),
                    3 => rows_planes::<3>(&t, &pl, xp, k, oi),
                    4 => rows_planes::<4>(&t, &pl, xp, k, oi),
                    5 => rows_planes::<5>(&t, &pl, xp, k, oi),
                    6 => rows_planes::<6>(&t, &pl, xp, k, oi),
                    7 => rows_planes::<7>(&t, &pl, xp, k, oi),
                    _ => rows_planes::<8>(&t, &pl, xp, k, oi),
                }
                i += mt;
            }
            r += 1;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_planes<const NT: usize>(
        t: &Tile,
        pl: &[__m256i; 4],
        x: *const f32,
        out: *mut f32,
    ) {
        let mut acc = [_mm256_setzero_ps(); NT];
        for s in 0..t.spans.count() {
            let (k0, k1) = t.spans.get(s);
            let mut blk = [_mm256_setzero_ps(); NT];
            let mut k = k0;
            while k < k1 {
                prefetch_next::<NT>(t, k);
                let xp = x.add(k);
                for r in 0..NT {
                    let w = decode32_planes(t.rows[r].add(k / 2), pl);
                    for (g, wg) in w.iter().enumerate() {
                        blk[r] = _mm256_fmadd_ps(*wg, _mm256_loadu_ps(xp.add(8 * g)), blk[r]);
                    }
                }
                k += 32;
            }
            for r in 0..NT {
                acc[r] = _mm256_fmadd_ps(blk[r], _mm256_set1_ps(*t.scales[r].add(s)), acc[r]);
            }
        }
        for (r, v) in acc.iter().enumerate() {
            *out.add(r) = hsum256(*v);
        }
    }

    /// One W row (tile of 1) against `MT` rows of x (stride `xs`); `out[i]` for x row i.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_planes<const MT: usize>(
        t: &Tile,
        pl: &[__m256i; 4],
        x: *const f32,
        xs: usize,
        out: *mut f32,
    ) {
        let mut acc = [_mm256_setzero_ps(); MT];
        for s in 0..t.spans.count() {
            let (k0, k1) = t.spans.get(s);
            let a = _mm256_set1_ps(*t.scales[0].add(s));
            let mut k = k0;
            while k < k1 {
                prefetch_next::<1>(t, k);
                let w = decode32_planes(t.rows[0].add(k / 2), pl).map(|v| _mm256_mul_ps(v, a));
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let xp = x.add(i * xs + k);
                    for (g, wg) in w.iter().enumerate() {
                        *acc_i = _mm256_fmadd_ps(*wg, _mm256_loadu_ps(xp.add(8 * g)), *acc_i);
                    }
                }
                k += 32;
            }
        }
        for (i, v) in acc.iter().enumerate() {
            *out.add(i) = hsum256(*v);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::{dequantize_4bit, quantize_4bit};
    use half::f16;
    use proptest::prelude::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(99);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32) / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// Checks `matmul_4bit` against float64 math on the dequantized weight, within the f32
    /// accumulation bound (plus bf16 weight rounding for the bf16 kernel and the output's own
    /// rounding).
    fn check<T: Element>(
        m: usize,
        n: usize,
        k: usize,
        bs: usize,
        qt: QuantType4,
        seed: u64,
        bias: bool,
    ) {
        let wf = lcg(seed, n * k);
        let q = quantize_4bit(&wf, bs, qt).unwrap();
        let w64: Vec<f64> = dequantize_4bit::<f32>(&q.packed, &q.absmax, n * k, bs, qt)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let x: Vec<T> = lcg(seed ^ 0xABCD, m * k)
            .into_iter()
            .map(T::from_f32)
            .collect();
        let b: Vec<f32> = lcg(seed ^ 7, n);
        let w = Packed4Matrix {
            packed: &q.packed,
            absmax: &q.absmax,
            out_features: n,
            in_features: k,
            blocksize: bs,
            quant_type: qt,
        };
        // Unit roundoff of the output, and half its smallest subnormal.
        let (out_eps, out_tiny) = match T::DTYPE {
            crate::FloatDtype::F32 => (2f64.powi(-24), 2f64.powi(-150)),
            crate::FloatDtype::F16 => (2f64.powi(-11), 2f64.powi(-25)),
            crate::FloatDtype::BF16 => (2f64.powi(-8), 2f64.powi(-134)),
        };
        let w_eps = if T::DTYPE == crate::FloatDtype::BF16 {
            2f64.powi(-8)
        } else {
            0.0
        };
        // Every level, and at AVX2 both decodes whatever the vendor.
        let runs = SimdLevel::available().into_iter().flat_map(|level| {
            [Avx2Decode::Permute, Avx2Decode::Shuffle]
                .map(|d| (level, kernel_with::<T>(m, k, bs, level, d)))
        });
        for (level, kernel) in runs {
            let mut out = vec![T::from_f32(0.0); m * n];
            let bias_arg = bias.then_some(&b[..]);
            matmul_4bit_kernel(
                Threads::Current,
                &x,
                m,
                &w,
                bias_arg,
                &mut out,
                level,
                kernel,
            )
            .unwrap();
            for i in 0..m {
                for r in 0..n {
                    let (mut exact, mut mag) = (0.0f64, 0.0f64);
                    for kk in 0..k {
                        let p = x[i * k + kk].to_f32() as f64 * w64[r * k + kk];
                        exact += p;
                        mag += p.abs();
                    }
                    if bias {
                        exact += b[r] as f64;
                        mag += (b[r] as f64).abs();
                    }
                    let got = out[i * n + r].to_f32() as f64;
                    let bound = (k as f64 + 2.0) * 2f64.powi(-24) * mag
                        + w_eps * mag
                        + out_eps * exact.abs()
                        + out_tiny
                        + 1e-30;
                    assert!(
                        (got - exact).abs() <= bound,
                        "{level:?} {kernel:?} m={m} n={n} k={k} bs={bs} ({i},{r}): {got} vs {exact} (bound {bound})"
                    );
                }
            }
        }
    }

    #[test]
    fn avx2_decode_by_vendor_and_kernels_of_each() {
        use super::Kernel4;
        let l = SimdLevel::Avx2;
        let with = |rows, d| kernel_with::<f32>(rows, 4096, 64, l, d);
        assert_eq!(with(1, Avx2Decode::Permute), Kernel4::Avx2F32);
        assert_eq!(with(8, Avx2Decode::Shuffle), Kernel4::Avx2Planes);
        assert_eq!(
            kernel_with::<bf16>(1, 4096, 64, l, Avx2Decode::Shuffle),
            Kernel4::Avx2Bf16Row
        );
        assert_eq!(
            kernel_with::<bf16>(2, 4096, 64, l, Avx2Decode::Shuffle),
            Kernel4::Avx2Planes
        );
        assert_eq!(
            kernel_with::<f32>(8, 33, 32, l, Avx2Decode::Shuffle),
            Kernel4::Rows
        );
        if std::env::var_os("NYBBLE_AVX2_DECODE").is_none() {
            let expected = if crate::simd::cpu_is_amd() {
                Avx2Decode::Shuffle
            } else {
                Avx2Decode::Permute
            };
            assert_eq!(Avx2Decode::preferred(), expected);
        }
    }

    #[test]
    fn wide_bf16_kernel_up_to_its_row_limit() {
        use super::Kernel4;
        let l = SimdLevel::Avx512Bf16;
        assert_eq!(kernel_for::<bf16>(1, 4096, 64, l), Kernel4::Avx512Bf16Wide);
        assert_eq!(
            kernel_for::<bf16>(WIDE_MAX_ROWS, 4096, 64, l),
            Kernel4::Avx512Bf16Wide
        );
        assert_eq!(
            kernel_for::<bf16>(WIDE_MAX_ROWS + 1, 4096, 64, l),
            Kernel4::Avx512Bf16
        );
        assert_eq!(kernel_for::<f32>(1, 4096, 64, l), Kernel4::Avx512F32);
        assert_eq!(kernel_for::<bf16>(1, 4112, 64, l), Kernel4::Rows);
    }

    #[test]
    fn amx_kernel_where_it_applies() {
        use super::Kernel4;
        if !SimdLevel::AmxBf16.is_available() {
            return; // the CPU (or OS) has no AMX tiles; the level is then never offered
        }
        let l = SimdLevel::AmxBf16;
        assert_eq!(
            kernel_for::<bf16>(AMX_MIN_ROWS, 4096, 64, l),
            Kernel4::AmxBf16
        );
        assert_eq!(
            kernel_for::<bf16>(AMX_MIN_ROWS - 1, 4096, 64, l),
            Kernel4::Avx512F32
        );
        assert_eq!(kernel_for::<bf16>(64, 4096, 4096, l), Kernel4::AmxBf16);
        assert_eq!(kernel_for::<bf16>(1, 4096, 64, l), Kernel4::Avx512F32);
        assert_eq!(kernel_for::<f32>(8, 4096, 64, l), Kernel4::Avx512F32);
        assert_eq!(kernel_for::<bf16>(8, 4160, 4096, l), Kernel4::Avx512F32); // blocks straddle rows
        assert_eq!(kernel_for::<bf16>(8, 33, 32, l), Kernel4::Rows);
    }

    #[test]
    fn shapes_blocksizes_and_types() {
        for &(m, n, k, bs) in &[
            (1, 7, 64, 64),
            (1, 9, 96, 64),  // blocks span rows
            (3, 17, 32, 32), // one chunk per row
            (5, 33, 160, 128),
            (4, 19, 4096, 4096),
            (2, 5, 4160, 4096), // rows straddle a 4096 block
            (1, 3, 33, 32),     // K not a multiple of 32: the portable kernel
            (6, 11, 45, 64),    // odd K: rows start mid-byte
            (7, 13, 257, 256),
            (64, 10, 128, 32),
            (9, 24, 2112, 64), // several portable K-slices
            // AMX tile passes: x groups 1..4 and two rounds of them, W rows past a pass
            (16, 16, 512, 256),
            (5, 17, 4096, 4096),
            (20, 70, 256, 64),
            (40, 37, 128, 128),
            (70, 100, 64, 32),
            // wide decode: a final 32-chunk (K % 64 == 32), spans starting at odd 32s
            (1, 17, 224, 32),
            (1, 9, 4128, 64),
            (3, 10, 4128, 64),
            (12, 7, 96, 32),
            (1, 16, 4160, 4096),
        ] {
            for qt in [QuantType4::Nf4, QuantType4::Fp4] {
                let seed = (m * 1000 + n * 10 + k) as u64;
                check::<f32>(m, n, k, bs, qt, seed, true);
                check::<bf16>(m, n, k, bs, qt, seed + 1, false);
                check::<f16>(m, n, k, bs, qt, seed + 2, true);
            }
        }
    }

    #[test]
    fn empty_and_zero_k() {
        let w = Packed4Matrix {
            packed: &[],
            absmax: &[],
            out_features: 3,
            in_features: 0,
            blocksize: 64,
            quant_type: QuantType4::Nf4,
        };
        let mut out = vec![1.0f32; 6];
        matmul_4bit::<f32>(
            &[],
            2,
            &w,
            Some(&[1.0, 2.0, 3.0]),
            &mut out,
            SimdLevel::detect(),
        )
        .unwrap();
        assert_eq!(out, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        let mut none: Vec<f32> = vec![];
        matmul_4bit::<f32>(&[], 0, &w, None, &mut none, SimdLevel::Portable).unwrap();
    }

    #[test]
    fn bad_lengths_and_non_finite_absmax() {
        let q = quantize_4bit(&lcg(1, 8 * 64), 64, QuantType4::Nf4).unwrap();
        let w = Packed4Matrix {
            packed: &q.packed,
            absmax: &q.absmax,
            out_features: 8,
            in_features: 64,
            blocksize: 64,
            quant_type: QuantType4::Nf4,
        };
        let x = vec![1.0f32; 2 * 64];
        let mut out = vec![0.0f32; 16];
        assert!(matches!(
            matmul_4bit(&x[..100], 2, &w, None, &mut out, SimdLevel::Portable),
            Err(Error::ShapeMismatch {
                rows: 2,
                cols: 64,
                needed: 128,
                len: 100
            })
        ));
        assert!(matches!(
            matmul_4bit(&x, 2, &w, None, &mut out[..15], SimdLevel::Portable),
            Err(Error::LengthMismatch { what: "output", .. })
        ));
        assert!(matches!(
            matmul_4bit(&x, 2, &w, Some(&[0.0; 7]), &mut out, SimdLevel::Portable),
            Err(Error::LengthMismatch { what: "bias", .. })
        ));
        let short = Packed4Matrix {
            packed: &q.packed[1..],
            ..w
        };
        assert!(matches!(
            matmul_4bit(&x, 2, &short, None, &mut out, SimdLevel::Portable),
            Err(Error::LengthMismatch {
                what: "packed weight",
                ..
            })
        ));
        let bs = Packed4Matrix { blocksize: 48, ..w };
        assert!(matches!(
            matmul_4bit(&x, 2, &bs, None, &mut out, SimdLevel::Portable),
            Err(Error::InvalidBlocksize(48))
        ));
        let huge = Packed4Matrix {
            out_features: usize::MAX,
            in_features: 3,
            ..w
        };
        assert!(matches!(
            matmul_4bit(&x, 2, &huge, None, &mut out, SimdLevel::Portable),
            Err(Error::SizeOverflow(_))
        ));
        let mut am = q.absmax.clone();
        am[5] = f32::INFINITY;
        let inf = Packed4Matrix { absmax: &am, ..w };
        for level in SimdLevel::available() {
            assert!(matches!(
                matmul_4bit(&x, 2, &inf, None, &mut out, level),
                Err(Error::NonFinite { index: 5, .. })
            ));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn prop_matches_float64(
            m in 1usize..40,
            n in 1usize..40,
            kc in 1usize..12,
            ktail in prop_oneof![Just(0usize), 1usize..32],
            bs_pow in 5u32..13,
            nf4 in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let k = kc * 32 + ktail;
            let qt = if nf4 { QuantType4::Nf4 } else { QuantType4::Fp4 };
            check::<f32>(m, n, k, 1 << bs_pow, qt, seed, true);
            check::<bf16>(m, n, k, 1 << bs_pow, qt, seed, true);
        }
    }
}
