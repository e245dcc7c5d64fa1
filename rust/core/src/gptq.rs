//! GPTQ (Frantar et al., 2022) rounding into bitsandbytes' block-wise NF4 / FP4 layout.
//!
//! The output is exactly what [`crate::blockwise::quantize_4bit`] produces (packed codes, two
//! a byte, and one float32 absmax per block of `blocksize` elements of the flattened row-major
//! weight), so any bitsandbytes reader decodes it and double quantization of the absmax works
//! as usual; only the choice of codes (and of the absmax) differs from round-to-nearest.
//!
//! # The algorithm
//!
//! Given a weight `W` (`rows x cols`, float32) and the Hessian of the layer's reconstruction
//! loss `H = 2 XᵀX` (`cols x cols`, float64) accumulated over calibration inputs `X`:
//!
//! 1. **Dead columns** (`H_ii == 0`: an input that is always zero) get `H_ii = 1` and their
//!    weights are set to zero, as GPTQ does.
//! 2. **Act-order** (optional): columns are processed in order of decreasing `H_ii` (a stable
//!    sort, so ties keep their order).
//! 3. **Damping**: `damp * mean(diag H)` is added to the diagonal.
//! 4. **Inverse Hessian factor**: `U`, the upper Cholesky factor of `H⁻¹` (`H⁻¹ = UᵀU`), in
//!    float64. It is computed without forming `H⁻¹`: with `J` the reversal permutation,
//!    `U = J · L⁻¹ · J` where `L` is the lower Cholesky factor of `J H J` (a blocked, parallel
//!    Cholesky and an in-place blocked triangular inverse).
//! 5. **Column-by-column rounding with error feedback**: for each column `t` (in processing
//!    order) every row rounds its current weight to the nearest code of its block, and the
//!    scaled error `e = (w - q) / U_tt` is subtracted, times `U_t,t+1..`, from the columns not yet
//!    quantized. Updates inside a lazy block of `lazy_block` columns (GPTQ's `B`, default 128)
//!    are applied at once; the rest of the row gets one matrix product per lazy block.
//!    Rows are independent, so they run in parallel (rayon); the working weights are float64.
//!
//! # The absmax of a block
//!
//! A block's absmax must be fixed before its first column is rounded. It is chosen when the
//! block's first column (in processing order) is reached, from the block's **current,
//! error-updated** weights: those of the current lazy block include every update so far, and
//! those beyond it get the pending updates of the current lazy block added for the purpose,
//! so the choice (and the result) does not depend on the lazy block size. This is GPTQ's
//! group-wise variant with groups fixed by the format (contiguous columns of a row; with
//! act-order a block's columns are scattered in processing order, and its absmax is chosen at
//! the first of them, from all of their current values).
//!
//! - [`AbsmaxRule::Max`]: `max |w|` over the block, rounded to float32 (what round-to-nearest
//!   does on the original weights).
//! - [`AbsmaxRule::Search`]: the shrink factor in `[min_shrink, 1]` (a grid of `grid` points,
//!   1 included) of `max |w|` minimising a Hessian-weighted error of the block: GPTQ's own loss
//!   of its columns `Σ ((w - q) / U_pp)²`, either with each column rounded on its own
//!   ([`SearchObjective::Diagonal`]) or with the error feedback between the block's columns
//!   simulated ([`SearchObjective::Sequential`]; exact for a contiguous block without
//!   act-order, an approximation with it).
//! - A caller may also fix every absmax (`fixed_absmax`, e.g. the decoded double-quantized
//!   values of a first pass).
//!
//! When `cols` is not a multiple of `blocksize`, some blocks span two rows; their absmax is
//! taken from the original weights (dead columns zeroed) before any update, so rows stay
//! independent. Codes are decided as [`crate::blockwise`] decides them: the weight, as
//! float32, times the float32 reciprocal of the absmax (divided by it in a trailing partial
//! block), against the midpoints of the code table, ties to the lower code. The error fed back
//! is against the value a reader decodes, `table[code] * absmax` in float32. With a diagonal
//! Hessian nothing is fed back and the result is round-to-nearest, bit for bit.

use rayon::prelude::*;

use crate::blockwise::packed_len;
use crate::codebook::{QuantType4, FP4, NF4};
use crate::element::first_non_finite;
use crate::error::{check_blocksize, check_len, num_blocks, Error, Result};

/// GPTQ's default lazy batch size `B`.
pub const DEFAULT_LAZY_BLOCK: usize = 128;

/// bitsandbytes clamps the divisor so an all-zero block scales to zeros instead of NaN.
const MIN_ABSMAX: f32 = 1e-38;

/// Tile size of the Cholesky factorization and the triangular inverse.
const TILE: usize = 64;

/// Rows handed to one rayon task in the factorizations.
const FACTOR_ROWS: usize = 32;

/// How the absmax of a block is chosen (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AbsmaxRule {
    /// `max |w|` of the block's current weights.
    Max,
    /// The best of `grid` shrink factors in `[min_shrink, 1]` of `max |w|` under `objective`.
    Search {
        grid: usize,
        min_shrink: f64,
        objective: SearchObjective,
    },
}

/// The Hessian-weighted error an absmax search minimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchObjective {
    /// `Σ ((w - q) / U_pp)²` with each column of the block rounded on its own.
    Diagonal,
    /// The same loss with GPTQ's error feedback between the block's columns simulated.
    Sequential,
}

/// Options of one GPTQ quantization.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqOptions {
    pub blocksize: usize,
    pub quant_type: QuantType4,
    /// GPTQ's lazy batch size `B` (columns per batched update); any value >= 1 gives the
    /// same result up to float64 rounding.
    pub lazy_block: usize,
    pub absmax: AbsmaxRule,
}

impl GptqOptions {
    pub fn new(blocksize: usize, quant_type: QuantType4) -> Self {
        Self {
            blocksize,
            quant_type,
            lazy_block: DEFAULT_LAZY_BLOCK,
            absmax: AbsmaxRule::Max,
        }
    }
}

/// A GPTQ-quantized weight in [`crate::blockwise::Packed4`]'s layout, and GPTQ's loss.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqResult {
    pub packed: Vec<u8>,
    pub absmax: Vec<f32>,
    /// `Σ ((w - q) / U_tt)² / 2` over all weights: GPTQ's estimate of the increase of the
    /// reconstruction loss `‖XWᵀ - XŴᵀ‖²` (with `H = 2XᵀX`), before damping.
    pub loss: f64,
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidGptqArgument(reason.into())
}

/// The damped inverse-Hessian factor of one layer input, shared by every weight that reads
/// that input (q / k / v projections, for example).
#[derive(Clone, Debug)]
pub struct HessianFactor {
    k: usize,
    /// Processing order: `perm[t]` is the column rounded at step `t`.
    perm: Vec<usize>,
    inv_perm: Vec<usize>,
    dead: Vec<bool>,
    damp: f64,
    /// `U` (k x k, row-major, processing order), upper triangular; the strict lower part is 0.
    u: Vec<f64>,
}

impl HessianFactor {
    /// Factors `h` (k x k, row-major, symmetric; its two triangles are averaged) with
    /// `damp * mean(diag)` added to the diagonal (after dead columns get 1).
    pub fn new(h: &[f64], k: usize, damp: f64, act_order: bool) -> Result<Self> {
        if k == 0 {
            return Err(invalid("the Hessian has no columns"));
        }
        let kk = k
            .checked_mul(k)
            .ok_or(Error::SizeOverflow("GPTQ Hessian size"))?;
        check_len("GPTQ Hessian", kk, h.len())?;
        if !(damp.is_finite() && damp >= 0.0) {
            return Err(invalid(format!("damp must be finite and >= 0, got {damp}")));
        }
        if let Some(i) = h.iter().position(|v| !v.is_finite()) {
            return Err(invalid(format!(
                "the Hessian holds a non-finite value ({}) at row {}, column {}",
                h[i],
                i / k,
                i % k
            )));
        }
        let dead: Vec<bool> = (0..k).map(|c| h[c * k + c] == 0.0).collect();
        let diag: Vec<f64> = (0..k)
            .map(|c| if dead[c] { 1.0 } else { h[c * k + c] })
            .collect();
        let damp_abs = damp * diag.iter().sum::<f64>() / k as f64;
        let mut perm: Vec<usize> = (0..k).collect();
        if act_order {
            // Stable: equal diagonals keep their column order.
            perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
        }
        let mut inv_perm = vec![0usize; k];
        for (t, &c) in perm.iter().enumerate() {
            inv_perm[c] = t;
        }
        // a = J P H Pᵀ J (lower triangle), damped: row i holds original column q(i).
        let q = |i: usize| perm[k - 1 - i];
        let mut a = vec![0.0f64; kk];
        a.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
            let qi = q(i);
            for (j, v) in row[..=i].iter_mut().enumerate() {
                let qj = q(j);
                *v = if i == j {
                    diag[qi] + damp_abs
                } else {
                    0.5 * (h[qi * k + qj] + h[qj * k + qi])
                };
            }
        });
        cholesky_lower(&mut a, k).map_err(|(i, pivot)| Error::NotPositiveDefinite {
            column: q(i),
            pivot,
            damp: damp_abs,
        })?;
        a.par_chunks_mut(k)
            .enumerate()
            .for_each(|(i, row)| row[i + 1..].fill(0.0));
        invert_lower(&mut a, k);
        // U = J L⁻¹ J: reversing the flat buffer reverses both rows and columns.
        a.reverse();
        Ok(Self {
            k,
            perm,
            inv_perm,
            dead,
            damp: damp_abs,
            u: a,
        })
    }

    /// Columns of the layer input.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Processing order: `perm()[t]` is the column rounded at step `t`.
    pub fn perm(&self) -> &[usize] {
        &self.perm
    }

    /// Absolute damping added to the diagonal.
    pub fn damp(&self) -> f64 {
        self.damp
    }

    /// Columns with `H_ii == 0`.
    pub fn dead_columns(&self) -> usize {
        self.dead.iter().filter(|&&d| d).count()
    }

    /// `U` (k x k, row-major, rows and columns in processing order): the upper Cholesky
    /// factor of the damped, permuted `H⁻¹`.
    pub fn upper(&self) -> &[f64] {
        &self.u
    }

    /// GPTQ-quantizes `w` (rows x cols, row-major). `fixed_absmax`, when given, is used for
    /// every block instead of choosing one.
    pub fn quantize(
        &self,
        w: &[f32],
        rows: usize,
        options: &GptqOptions,
        fixed_absmax: Option<&[f32]>,
    ) -> Result<GptqResult> {
        let k = self.k;
        let bs = options.blocksize;
        check_blocksize(bs)?;
        if options.lazy_block == 0 {
            return Err(invalid("lazy_block must be >= 1"));
        }
        if let AbsmaxRule::Search {
            grid, min_shrink, ..
        } = options.absmax
        {
            if grid == 0 {
                return Err(invalid("the absmax search needs a grid of >= 1 points"));
            }
            if !(min_shrink > 0.0 && min_shrink <= 1.0) {
                return Err(invalid(format!(
                    "min_shrink must lie in (0, 1], got {min_shrink}"
                )));
            }
        }
        let n = rows
            .checked_mul(k)
            .ok_or(Error::SizeOverflow("GPTQ weight size"))?;
        if w.len() != n {
            return Err(Error::ShapeMismatch {
                rows,
                cols: k,
                needed: n,
                len: w.len(),
            });
        }
        if let Some((index, value)) = first_non_finite(w) {
            return Err(Error::NonFinite { index, value });
        }
        let nb = num_blocks(n, bs);
        // NaN marks a block whose absmax is chosen during the pass.
        let mut absmax = vec![f32::NAN; nb];
        if let Some(fixed) = fixed_absmax {
            check_len("GPTQ absmax", nb, fixed.len())?;
            if let Some(i) = fixed.iter().position(|a| !(a.is_finite() && *a >= 0.0)) {
                return Err(invalid(format!(
                    "fixed absmax {} of block {i} is not a finite value >= 0",
                    fixed[i]
                )));
            }
            absmax.copy_from_slice(fixed);
        } else {
            absmax.par_iter_mut().enumerate().for_each(|(j, a)| {
                let (start, end) = (j * bs, ((j + 1) * bs).min(n));
                if start / k != (end - 1) / k {
                    // Spans two rows: fixed from the original weights.
                    *a = w[start..end]
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !self.dead[(start + i) % k])
                        .fold(0.0f32, |m, (_, v)| m.max(v.abs()));
                }
            });
        }
        let threads = rayon::current_num_threads().max(1);
        let rows_per_task = ((rows / (2 * threads)) / 4 * 4).clamp(4, 64);
        let encoder = Encoder::new(options.quant_type);
        let mut codes = vec![0u8; n];
        let pass = Pass {
            f: self,
            options,
            encoder: &encoder,
            absmax: &absmax,
            n,
        };
        let results: Vec<(f64, Vec<(usize, f32)>)> = codes
            .par_chunks_mut(rows_per_task * k)
            .zip(w.par_chunks(rows_per_task * k))
            .enumerate()
            .map(|(i, (c, wr))| pass.rows(i * rows_per_task, wr, c))
            .collect();
        let mut loss = 0.0;
        for (l, chosen) in results {
            loss += l;
            for (j, a) in chosen {
                absmax[j] = a;
            }
        }
        debug_assert!(absmax.iter().all(|a| a.is_finite()));
        Ok(GptqResult {
            packed: pack_codes(&codes, options.quant_type),
            absmax,
            loss,
        })
    }
}

/// One call's shared state for the per-row passes.
struct Pass<'a> {
    f: &'a HessianFactor,
    options: &'a GptqOptions,
    encoder: &'a Encoder,
    /// Fixed absmax per block; NaN for blocks chosen during the pass.
    absmax: &'a [f32],
    n: usize,
}

impl Pass<'_> {
    /// GPTQ over rows `row0..` (`w`: their weights, `codes`: their unpacked codes). Returns
    /// half the summed squared scaled errors and the absmax chosen for each of their blocks.
    fn rows(&self, row0: usize, w: &[f32], codes: &mut [u8]) -> (f64, Vec<(usize, f32)>) {
        let f = self.f;
        let (k, u, perm) = (f.k, &f.u, &f.perm);
        let bs = self.options.blocksize;
        let shift = bs.trailing_zeros();
        let nrows = w.len() / k;
        let lazy = self.options.lazy_block.min(k);
        let mut work = vec![0.0f64; nrows * k];
        for (wrow, src) in work.chunks_mut(k).zip(w.chunks(k)) {
            for (t, v) in wrow.iter_mut().enumerate() {
                let c = perm[t];
                *v = if f.dead[c] { 0.0 } else { src[c] as f64 };
            }
        }
        let jlo = (row0 * k) >> shift;
        let jhi = ((row0 + nrows) * k - 1) >> shift;
        let mut local: Vec<f32> = self.absmax[jlo..=jhi].to_vec();
        let mut err = vec![0.0f64; nrows * lazy];
        let mut scratch = Vec::with_capacity(2 * bs);
        let mut loss = 0.0f64;
        let mut i1 = 0;
        while i1 < k {
            let i2 = (i1 + lazy).min(k);
            for t in i1..i2 {
                let c = perm[t];
                let urow = &u[t * k..(t + 1) * k];
                let d = urow[t];
                for r in 0..nrows {
                    let row = row0 + r;
                    let j = (row * k + c) >> shift;
                    let full = (j + 1) * bs <= self.n;
                    if local[j - jlo].is_nan() {
                        let ctx = BlockContext {
                            work: &work[r * k..(r + 1) * k],
                            err: &err[r * lazy..r * lazy + (t - i1)],
                            i1,
                            i2,
                            full,
                        };
                        local[j - jlo] = self.choose_absmax(&ctx, row, j, &mut scratch);
                    }
                    let a = local[j - jlo];
                    let x = work[r * k + t];
                    let code = self.encoder.encode(x as f32, a, full);
                    let q = (self.encoder.table[code as usize] * a) as f64;
                    codes[r * k + c] = code;
                    let e = (x - q) / d;
                    loss += e * e;
                    err[r * lazy + t - i1] = e;
                    for (wv, &uv) in work[r * k + t + 1..r * k + i2]
                        .iter_mut()
                        .zip(&urow[t + 1..i2])
                    {
                        *wv -= e * uv;
                    }
                }
            }
            if i2 < k {
                gemm_acc(
                    nrows,
                    k - i2,
                    i2 - i1,
                    -1.0,
                    &err,
                    lazy,
                    &u[i1 * k + i2..],
                    k,
                    &mut work[i2..],
                    k,
                );
            }
            i1 = i2;
        }
        let chosen = (jlo..=jhi)
            .filter(|&j| self.absmax[j].is_nan())
            .map(|j| (j, local[j - jlo]))
            .collect();
        (loss / 2.0, chosen)
    }

    /// The absmax of block `j` (inside row `row`), at the step that reaches its first column.
    fn choose_absmax(
        &self,
        ctx: &BlockContext<'_>,
        row: usize,
        j: usize,
        scratch: &mut Vec<(usize, f64)>,
    ) -> f32 {
        let f = self.f;
        let (k, u) = (f.k, &f.u);
        let bs = self.options.blocksize;
        let row_start = row * k;
        let (c_lo, c_hi) = (j * bs - row_start, ((j + 1) * bs).min(self.n) - row_start);
        // The block's current weights (processing position, value), in processing order.
        scratch.clear();
        for c in c_lo..c_hi {
            let p = f.inv_perm[c];
            let mut v = ctx.work[p];
            if p >= ctx.i2 {
                for (b, &e) in ctx.err.iter().enumerate() {
                    v -= e * u[(ctx.i1 + b) * k + p];
                }
            }
            scratch.push((p, v));
        }
        scratch.sort_unstable_by_key(|&(p, _)| p);
        let amax = scratch.iter().fold(0.0f64, |m, &(_, v)| m.max(v.abs()));
        let AbsmaxRule::Search {
            grid,
            min_shrink,
            objective,
        } = self.options.absmax
        else {
            return amax as f32;
        };
        if amax == 0.0 {
            return 0.0;
        }
        let enc = self.encoder;
        let mut best = (f64::INFINITY, amax as f32);
        let mut values: Vec<f64> = Vec::with_capacity(scratch.len());
        for g in 0..grid {
            let shrink = if grid == 1 {
                1.0
            } else {
                1.0 - (1.0 - min_shrink) * g as f64 / (grid - 1) as f64
            };
            let a = (amax * shrink) as f32;
            if a <= 0.0 {
                continue;
            }
            let mut loss = 0.0;
            match objective {
                SearchObjective::Diagonal => {
                    for &(p, v) in scratch.iter() {
                        let q = (enc.table[enc.encode(v as f32, a, ctx.full) as usize] * a) as f64;
                        let e = (v - q) / u[p * k + p];
                        loss += e * e;
                    }
                }
                SearchObjective::Sequential => {
                    values.clear();
                    values.extend(scratch.iter().map(|&(_, v)| v));
                    for ia in 0..scratch.len() {
                        let pa = scratch[ia].0;
                        let v = values[ia];
                        let q = (enc.table[enc.encode(v as f32, a, ctx.full) as usize] * a) as f64;
                        let e = (v - q) / u[pa * k + pa];
                        loss += e * e;
                        for ib in ia + 1..scratch.len() {
                            values[ib] -= e * u[pa * k + scratch[ib].0];
                        }
                    }
                }
            }
            if loss < best.0 {
                best = (loss, a);
            }
        }
        best.1
    }
}

/// What [`Pass::choose_absmax`] reads of one row at one step.
struct BlockContext<'a> {
    /// The row's working weights (processing order).
    work: &'a [f64],
    /// Scaled errors of the current lazy block's columns rounded so far.
    err: &'a [f64],
    i1: usize,
    i2: usize,
    /// Whether the block is full (a trailing partial block divides instead of multiplying).
    full: bool,
}

/// Nearest-code decisions exactly as [`crate::blockwise`] makes them.
struct Encoder {
    quant_type: QuantType4,
    /// NF4: 15 midpoints of the signed table; FP4: 7 midpoints of the sorted magnitudes.
    bounds: [f32; 15],
    /// FP4: the 3-bit code of each sorted magnitude.
    fp4_codes: [u8; 8],
    table: [f32; 16],
}

impl Encoder {
    fn new(quant_type: QuantType4) -> Self {
        let mut bounds = [f32::INFINITY; 15];
        let mut fp4_codes = [0u8; 8];
        match quant_type {
            QuantType4::Nf4 => {
                for (i, b) in bounds.iter_mut().enumerate() {
                    *b = (NF4[i] + NF4[i + 1]) / 2.0;
                }
            }
            QuantType4::Fp4 => {
                let mut order: Vec<u8> = (0..8).collect();
                order.sort_by(|&a, &b| FP4[a as usize].total_cmp(&FP4[b as usize]));
                fp4_codes.copy_from_slice(&order);
                for i in 0..7 {
                    bounds[i] = (FP4[order[i] as usize] + FP4[order[i + 1] as usize]) / 2.0;
                }
            }
        }
        Self {
            quant_type,
            bounds,
            fp4_codes,
            table: *quant_type.table(),
        }
    }

    /// The code of `x` in a block of absmax `absmax`.
    #[inline]
    fn encode(&self, x: f32, absmax: f32, full: bool) -> u8 {
        let divisor = absmax.max(MIN_ABSMAX);
        let s = if full {
            x * (1.0 / divisor)
        } else {
            x / divisor
        };
        match self.quant_type {
            QuantType4::Nf4 => self.bounds.iter().map(|&b| (s > b) as u8).sum(),
            QuantType4::Fp4 => {
                let m = s.abs();
                let i: usize = self.bounds[..7].iter().map(|&b| (m > b) as usize).sum();
                self.fp4_codes[i] | (((s < 0.0) as u8) << 3)
            }
        }
    }
}

/// Two codes a byte, element 2j in the high nibble; an odd count pads with the zero code.
fn pack_codes(codes: &[u8], quant_type: QuantType4) -> Vec<u8> {
    let mut packed = vec![0u8; packed_len(codes.len())];
    packed
        .par_chunks_mut(1 << 15)
        .zip(codes.par_chunks(1 << 16))
        .for_each(|(p, c)| {
            for (o, pair) in p.iter_mut().zip(c.chunks(2)) {
                let lo = pair.get(1).copied().unwrap_or(quant_type.zero_code());
                *o = (pair[0] << 4) | lo;
            }
        });
    packed
}

// ---------------------------------------------------------------- dense linear algebra

/// In-place lower Cholesky factorization of the lower triangle of `a` (k x k, row-major):
/// blocked right-looking, the trailing updates in parallel. The strict upper triangle is
/// scratch on return. Fails with (index, pivot) at the first pivot that is not > 0.
fn cholesky_lower(a: &mut [f64], k: usize) -> std::result::Result<(), (usize, f64)> {
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + TILE).min(k);
        // The diagonal tile (already updated by the tiles to its left), unblocked.
        for j in k0..k1 {
            let (rowj, below) = a[j * k..].split_at_mut(k);
            let mut d = rowj[j];
            for v in &rowj[k0..j] {
                d -= v * v;
            }
            if !(d > 0.0 && d.is_finite()) {
                return Err((j, d));
            }
            let l = d.sqrt();
            rowj[j] = l;
            for rowi in below.chunks_mut(k).take(k1 - j - 1) {
                let mut s = rowi[j];
                for p in k0..j {
                    s -= rowi[p] * rowj[p];
                }
                rowi[j] = s / l;
            }
        }
        if k1 < k {
            let (top, rest) = a.split_at_mut(k1 * k);
            let lkk = &top[k0 * k..];
            let nbk = k1 - k0;
            let m = k - k1;
            // The panel below the tile: A[i, k0..k1] <- A[i, k0..k1] L_kk⁻ᵀ.
            rest.par_chunks_mut(k * FACTOR_ROWS).for_each(|rows| {
                for row in rows.chunks_mut(k) {
                    for j in k0..k1 {
                        let lj = &lkk[(j - k0) * k..(j - k0 + 1) * k];
                        let mut s = row[j];
                        for p in k0..j {
                            s -= row[p] * lj[p];
                        }
                        row[j] = s / lj[j];
                    }
                }
            });
            // The trailing matrix: A[i, k1..=i] -= P[i] · P[c]ᵀ.
            let mut panel = vec![0.0f64; m * nbk];
            let mut panel_t = vec![0.0f64; nbk * m];
            for (i, row) in rest.chunks(k).enumerate() {
                let src = &row[k0..k1];
                panel[i * nbk..(i + 1) * nbk].copy_from_slice(src);
                for (p, &v) in src.iter().enumerate() {
                    panel_t[p * m + i] = v;
                }
            }
            rest.par_chunks_mut(k * FACTOR_ROWS)
                .enumerate()
                .for_each(|(ci, rows)| {
                    let r0 = ci * FACTOR_ROWS;
                    let mr = rows.len() / k;
                    gemm_acc(
                        mr,
                        r0 + mr,
                        nbk,
                        -1.0,
                        &panel[r0 * nbk..],
                        nbk,
                        &panel_t,
                        m,
                        &mut rows[k1..],
                        k,
                    );
                });
        }
        k0 = k1;
    }
    Ok(())
}

/// In-place inverse of the lower-triangular `a` (k x k, row-major, strict upper triangle
/// zero, which it stays): blocked, last tile column first (LAPACK's trtri order), each tile
/// column's panel in parallel.
fn invert_lower(a: &mut [f64], k: usize) {
    let starts: Vec<usize> = (0..k).step_by(TILE).collect();
    for &j0 in starts.iter().rev() {
        let j1 = (j0 + TILE).min(k);
        let nbj = j1 - j0;
        // Inverse of the diagonal tile, by forward substitution per column.
        let mut xjj = vec![0.0f64; nbj * nbj];
        for c in 0..nbj {
            xjj[c * nbj + c] = 1.0 / a[(j0 + c) * k + j0 + c];
            for r in c + 1..nbj {
                let lrow = &a[(j0 + r) * k + j0..(j0 + r) * k + j1];
                let mut s = 0.0;
                for p in c..r {
                    s += lrow[p] * xjj[p * nbj + c];
                }
                xjj[r * nbj + c] = -s / lrow[r];
            }
        }
        if j1 < k {
            let m = k - j1;
            let rest = &mut a[j1 * k..];
            let mut panel = vec![0.0f64; m * nbj];
            for (i, row) in rest.chunks(k).enumerate() {
                panel[i * nbj..(i + 1) * nbj].copy_from_slice(&row[j0..j1]);
            }
            // X21 = -X22 · L21 · X11, X22 (already inverted) lower with a zero upper part.
            rest.par_chunks_mut(k * FACTOR_ROWS)
                .enumerate()
                .for_each(|(ci, rows)| {
                    let r0 = ci * FACTOR_ROWS;
                    let mr = rows.len() / k;
                    let mut t = vec![0.0f64; mr * nbj];
                    gemm_acc(
                        mr,
                        nbj,
                        r0 + mr,
                        1.0,
                        &rows[j1..],
                        k,
                        &panel,
                        nbj,
                        &mut t,
                        nbj,
                    );
                    for row in rows.chunks_mut(k) {
                        row[j0..j1].fill(0.0);
                    }
                    gemm_acc(mr, nbj, nbj, -1.0, &t, nbj, &xjj, nbj, &mut rows[j0..], k);
                });
        }
        for (r, src) in xjj.chunks(nbj).enumerate() {
            a[(j0 + r) * k + j0..(j0 + r) * k + j1].copy_from_slice(src);
        }
    }
}

/// Cache blocking of [`gemm_acc`]: rows of B per pass, columns of B per pass.
const GEMM_KC: usize = 128;
const GEMM_NC: usize = 256;

/// `C[i][j] += alpha * Σ_p A[i][p] B[p][j]` for `i < m`, `j < n`, `p < kk` (row-major with
/// leading dimensions `lda`, `ldb`, `ldc`; slices start at element (0, 0)).
#[allow(clippy::too_many_arguments)]
fn gemm_acc(
    m: usize,
    n: usize,
    kk: usize,
    alpha: f64,
    a: &[f64],
    lda: usize,
    b: &[f64],
    ldb: usize,
    c: &mut [f64],
    ldc: usize,
) {
    if m == 0 || n == 0 || kk == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features the function was compiled for.
        unsafe { gemm_acc_avx2(m, n, kk, alpha, a, lda, b, ldb, c, ldc) };
        return;
    }
    gemm_acc_impl::<false>(m, n, kk, alpha, a, lda, b, ldb, c, ldc);
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_acc_avx2(
    m: usize,
    n: usize,
    kk: usize,
    alpha: f64,
    a: &[f64],
    lda: usize,
    b: &[f64],
    ldb: usize,
    c: &mut [f64],
    ldc: usize,
) {
    gemm_acc_impl::<true>(m, n, kk, alpha, a, lda, b, ldb, c, ldc)
}

#[inline(always)]
fn fmadd<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_acc_impl<const FMA: bool>(
    m: usize,
    n: usize,
    kk: usize,
    alpha: f64,
    a: &[f64],
    lda: usize,
    b: &[f64],
    ldb: usize,
    c: &mut [f64],
    ldc: usize,
) {
    const MR: usize = 4;
    const NR: usize = 8;
    // B's block is copied into strips of NR columns, each contiguous over p (zero-padded past
    // n): the micro-kernel then streams memory instead of striding by ldb, whose power-of-two
    // values (4096 columns) map every row of B to the same cache set.
    let mut packed = vec![0.0f64; GEMM_KC * GEMM_NC.div_ceil(NR) * NR];
    for p0 in (0..kk).step_by(GEMM_KC) {
        let p1 = (p0 + GEMM_KC).min(kk);
        let kc = p1 - p0;
        for j0 in (0..n).step_by(GEMM_NC) {
            let j1 = (j0 + GEMM_NC).min(n);
            let strips = (j1 - j0).div_ceil(NR);
            for s in 0..strips {
                let (js, je) = (j0 + s * NR, (j0 + s * NR + NR).min(j1));
                let dst = &mut packed[s * kc * NR..(s + 1) * kc * NR];
                for (pi, p) in (p0..p1).enumerate() {
                    let d = &mut dst[pi * NR..(pi + 1) * NR];
                    d[..je - js].copy_from_slice(&b[p * ldb + js..p * ldb + je]);
                    d[je - js..].fill(0.0);
                }
            }
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(MR);
                for s in 0..strips {
                    let j = j0 + s * NR;
                    let nr = (j1 - j).min(NR);
                    let bs = &packed[s * kc * NR..(s + 1) * kc * NR];
                    let mut acc = [[0.0f64; NR]; MR];
                    if mr == MR {
                        let rows: [&[f64]; MR] =
                            std::array::from_fn(|r| &a[(i + r) * lda + p0..(i + r) * lda + p1]);
                        for (pi, bp) in bs.chunks_exact(NR).enumerate() {
                            for r in 0..MR {
                                let av = rows[r][pi];
                                for q in 0..NR {
                                    acc[r][q] = fmadd::<FMA>(av, bp[q], acc[r][q]);
                                }
                            }
                        }
                    } else {
                        for (r, accr) in acc.iter_mut().enumerate().take(mr) {
                            let arow = &a[(i + r) * lda + p0..(i + r) * lda + p1];
                            for (&av, bp) in arow.iter().zip(bs.chunks_exact(NR)) {
                                for q in 0..NR {
                                    accr[q] = fmadd::<FMA>(av, bp[q], accr[q]);
                                }
                            }
                        }
                    }
                    for (r, accr) in acc.iter().enumerate().take(mr) {
                        let cr = &mut c[(i + r) * ldc + j..(i + r) * ldc + j + nr];
                        for (cv, &v) in cr.iter_mut().zip(accr) {
                            *cv = fmadd::<FMA>(alpha, v, *cv);
                        }
                    }
                }
                i += mr;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::{dequantize_4bit, quantize_4bit};

    /// xorshift64*: deterministic test data without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }

        fn normal(&mut self) -> f64 {
            // Box-Muller.
            let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        }
    }

    fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// Correlated inputs: X = Z · M with a random mixing M, plus a per-column scale.
    fn correlated_inputs(rng: &mut Rng, samples: usize, k: usize) -> Vec<f64> {
        let mix: Vec<f64> = (0..k * k).map(|_| rng.normal()).collect();
        let scale: Vec<f64> = (0..k).map(|_| 0.2 + 2.0 * rng.uniform()).collect();
        let z: Vec<f64> = (0..samples * k).map(|_| rng.normal()).collect();
        let mut x = vec![0.0; samples * k];
        for s in 0..samples {
            for j in 0..k {
                let mut v = 0.0;
                for p in 0..k {
                    // Mostly local mixing: neighbouring inputs are strongly correlated.
                    let wgt = (-((p as f64 - j as f64).abs()) / 3.0).exp();
                    v += z[s * k + p] * mix[p * k + j] * wgt;
                }
                x[s * k + j] = v * scale[j];
            }
        }
        x
    }

    fn hessian(x: &[f64], samples: usize, k: usize) -> Vec<f64> {
        let mut h = vec![0.0; k * k];
        for s in 0..samples {
            let xs = &x[s * k..(s + 1) * k];
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += 2.0 * xs[i] * xs[j];
                }
            }
        }
        h
    }

    /// ‖X Δᵀ‖² = tr(Δ H Δᵀ) / 2 for Δ = W - Ŵ.
    fn output_error(h: &[f64], w: &[f32], w_hat: &[f32], rows: usize, k: usize) -> f64 {
        let mut total = 0.0;
        for r in 0..rows {
            let d: Vec<f64> = (0..k)
                .map(|c| (w[r * k + c] - w_hat[r * k + c]) as f64)
                .collect();
            for i in 0..k {
                let mut s = 0.0;
                for j in 0..k {
                    s += h[i * k + j] * d[j];
                }
                total += d[i] * s;
            }
        }
        total / 2.0
    }

    fn matmul_naive(a: &[f64], b: &[f64], m: usize, kk: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for p in 0..kk {
                for j in 0..n {
                    c[i * n + j] += a[i * kk + p] * b[p * n + j];
                }
            }
        }
        c
    }

    #[test]
    fn gemm_matches_naive_for_odd_shapes() {
        let mut rng = Rng(7);
        for &(m, n, kk) in &[(1, 1, 1), (5, 13, 3), (4, 8, 300), (9, 270, 130), (3, 7, 1)] {
            let a: Vec<f64> = (0..m * kk).map(|_| rng.normal()).collect();
            let b: Vec<f64> = (0..kk * n).map(|_| rng.normal()).collect();
            let c0: Vec<f64> = (0..m * n).map(|_| rng.normal()).collect();
            let mut c = c0.clone();
            gemm_acc(m, n, kk, -0.5, &a, kk, &b, n, &mut c, n);
            let ab = matmul_naive(&a, &b, m, kk, n);
            for i in 0..m * n {
                let want = c0[i] - 0.5 * ab[i];
                assert!(
                    (c[i] - want).abs() < 1e-10 * (1.0 + want.abs()),
                    "{m}x{n}x{kk} at {i}"
                );
            }
        }
    }

    #[test]
    fn factor_is_the_upper_cholesky_of_the_damped_inverse() {
        let mut rng = Rng(11);
        for &(k, act_order) in &[(1, false), (5, true), (64, false), (70, true), (200, false)] {
            let samples = 2 * k + 3;
            let x = correlated_inputs(&mut rng, samples, k);
            let h = hessian(&x, samples, k);
            let f = HessianFactor::new(&h, k, 0.01, act_order).unwrap();
            let u = f.upper();
            // Upper triangular with a positive diagonal.
            for i in 0..k {
                assert!(u[i * k + i] > 0.0);
                for j in 0..i {
                    assert_eq!(u[i * k + j], 0.0);
                }
            }
            // Uᵀ U Hp = I with Hp the damped, permuted Hessian.
            let p = f.perm();
            let hp: Vec<f64> = (0..k * k)
                .map(|e| {
                    let (i, j) = (e / k, e % k);
                    h[p[i] * k + p[j]] + if i == j { f.damp() } else { 0.0 }
                })
                .collect();
            let ut: Vec<f64> = (0..k * k).map(|e| u[(e % k) * k + e / k]).collect();
            let inv = matmul_naive(&ut, u, k, k, k);
            let id = matmul_naive(&inv, &hp, k, k, k);
            for i in 0..k {
                for j in 0..k {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!(
                        (id[i * k + j] - want).abs() < 1e-8,
                        "k={k} ({i}, {j}): {}",
                        id[i * k + j]
                    );
                }
            }
            if act_order {
                for t in 1..k {
                    assert!(h[p[t - 1] * k + p[t - 1]] >= h[p[t] * k + p[t]]);
                }
            }
        }
    }

    #[test]
    fn encoder_matches_blockwise() {
        let mut rng = Rng(3);
        for qt in [QuantType4::Nf4, QuantType4::Fp4] {
            let enc = Encoder::new(qt);
            // Odd length: the last block is partial (divided, not multiplied).
            let x: Vec<f32> = (0..64 * 40 + 37)
                .map(|i| {
                    let v = rng.normal() as f32;
                    if i % 97 == 0 {
                        0.0
                    } else if i % 89 == 0 {
                        -0.0
                    } else {
                        v
                    }
                })
                .collect();
            let r = quantize_4bit(&x, 64, qt).unwrap();
            for (i, &v) in x.iter().enumerate() {
                let j = i / 64;
                let full = (j + 1) * 64 <= x.len();
                let want = if i % 2 == 0 {
                    r.packed[i / 2] >> 4
                } else {
                    r.packed[i / 2] & 15
                };
                assert_eq!(enc.encode(v, r.absmax[j], full), want, "{qt:?} element {i}");
            }
        }
    }

    fn rtn(w: &[f32], bs: usize, qt: QuantType4) -> (Vec<u8>, Vec<f32>) {
        let r = quantize_4bit(w, bs, qt).unwrap();
        (r.packed, r.absmax)
    }

    #[test]
    fn diagonal_hessian_gives_round_to_nearest_bit_for_bit() {
        let mut rng = Rng(5);
        // Blocks inside rows, blocks spanning rows, an odd element count.
        for &(rows, k, bs) in &[(8, 128, 64), (7, 96, 64), (5, 45, 32), (3, 33, 64)] {
            let w = randn(&mut rng, rows * k);
            let mut h = vec![0.0; k * k];
            for i in 0..k {
                h[i * k + i] = 0.5 + rng.uniform();
            }
            for act_order in [false, true] {
                let f = HessianFactor::new(&h, k, 0.01, act_order).unwrap();
                for qt in [QuantType4::Nf4, QuantType4::Fp4] {
                    let got = f
                        .quantize(&w, rows, &GptqOptions::new(bs, qt), None)
                        .unwrap();
                    let (packed, absmax) = rtn(&w, bs, qt);
                    assert_eq!(
                        got.packed, packed,
                        "{rows}x{k} bs {bs} {qt:?} act {act_order}"
                    );
                    assert_eq!(got.absmax, absmax);
                }
            }
        }
    }

    fn dequant(r: &GptqResult, n: usize, bs: usize, qt: QuantType4) -> Vec<f32> {
        dequantize_4bit(&r.packed, &r.absmax, n, bs, qt).unwrap()
    }

    #[test]
    fn gptq_beats_round_to_nearest_on_correlated_inputs() {
        let mut rng = Rng(9);
        let (rows, k, samples, bs) = (24, 128, 400, 64);
        let x = correlated_inputs(&mut rng, samples, k);
        let h = hessian(&x, samples, k);
        let w = randn(&mut rng, rows * k);
        let (packed, absmax) = rtn(&w, bs, QuantType4::Nf4);
        let w_rtn =
            dequantize_4bit::<f32>(&packed, &absmax, rows * k, bs, QuantType4::Nf4).unwrap();
        let e_rtn = output_error(&h, &w, &w_rtn, rows, k);
        for act_order in [false, true] {
            let f = HessianFactor::new(&h, k, 0.01, act_order).unwrap();
            for absmax in [
                AbsmaxRule::Max,
                AbsmaxRule::Search {
                    grid: 8,
                    min_shrink: 0.8,
                    objective: SearchObjective::Sequential,
                },
            ] {
                let opts = GptqOptions {
                    absmax,
                    ..GptqOptions::new(bs, QuantType4::Nf4)
                };
                let r = f.quantize(&w, rows, &opts, None).unwrap();
                let e = output_error(&h, &w, &dequant(&r, rows * k, bs, QuantType4::Nf4), rows, k);
                assert!(
                    e < 0.8 * e_rtn,
                    "act {act_order} {absmax:?}: {e} vs RTN {e_rtn}"
                );
            }
        }
    }

    #[test]
    fn result_does_not_depend_on_the_lazy_block_size() {
        let mut rng = Rng(13);
        let (rows, k, samples) = (9, 100, 300);
        let x = correlated_inputs(&mut rng, samples, k);
        let h = hessian(&x, samples, k);
        let w = randn(&mut rng, rows * k);
        for act_order in [false, true] {
            let f = HessianFactor::new(&h, k, 0.01, act_order).unwrap();
            let base = GptqOptions::new(32, QuantType4::Nf4);
            let want = f.quantize(&w, rows, &base, None).unwrap();
            for lazy in [1, 3, 32, 1000] {
                let opts = GptqOptions {
                    lazy_block: lazy,
                    ..base
                };
                let got = f.quantize(&w, rows, &opts, None).unwrap();
                assert_eq!(got.packed, want.packed, "lazy {lazy} act {act_order}");
                for (a, b) in got.absmax.iter().zip(&want.absmax) {
                    assert!((a - b).abs() <= 1e-6 * b.abs(), "lazy {lazy}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn dead_columns_quantize_to_zero() {
        let mut rng = Rng(17);
        let (rows, k, samples) = (6, 64, 200);
        let mut x = correlated_inputs(&mut rng, samples, k);
        for s in 0..samples {
            x[s * k + 5] = 0.0;
            x[s * k + 40] = 0.0;
        }
        let h = hessian(&x, samples, k);
        let w = randn(&mut rng, rows * k);
        let f = HessianFactor::new(&h, k, 0.01, true).unwrap();
        assert_eq!(f.dead_columns(), 2);
        let r = f
            .quantize(&w, rows, &GptqOptions::new(32, QuantType4::Nf4), None)
            .unwrap();
        let wq = dequant(&r, rows * k, 32, QuantType4::Nf4);
        for row in 0..rows {
            assert_eq!(wq[row * k + 5], 0.0);
            assert_eq!(wq[row * k + 40], 0.0);
        }
    }

    #[test]
    fn fixed_absmax_is_used() {
        let mut rng = Rng(19);
        let (rows, k, samples) = (4, 64, 200);
        let h = hessian(&correlated_inputs(&mut rng, samples, k), samples, k);
        let w = randn(&mut rng, rows * k);
        let f = HessianFactor::new(&h, k, 0.01, false).unwrap();
        let fixed: Vec<f32> = (0..rows * k / 64).map(|i| 1.5 + i as f32).collect();
        let opts = GptqOptions::new(64, QuantType4::Nf4);
        let r = f.quantize(&w, rows, &opts, Some(&fixed)).unwrap();
        assert_eq!(r.absmax, fixed);
        assert!(matches!(
            f.quantize(&w, rows, &opts, Some(&fixed[1..])),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(matches!(
            f.quantize(&w, rows, &opts, Some(&[f32::NAN; 4])),
            Err(Error::InvalidGptqArgument(_))
        ));
    }

    #[test]
    fn errors_name_the_problem() {
        let k = 4;
        let mut h = vec![0.0; k * k];
        for i in 0..k {
            h[i * k + i] = 1.0;
        }
        h[2 * k + 2] = -5.0;
        match HessianFactor::new(&h, k, 0.01, false) {
            Err(Error::NotPositiveDefinite { column, pivot, .. }) => {
                assert_eq!(column, 2);
                assert!(pivot < 0.0);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            HessianFactor::new(&h[1..], k, 0.01, false),
            Err(Error::LengthMismatch { .. })
        ));
        let mut bad = vec![0.0; k * k];
        bad[3] = f64::NAN;
        assert!(matches!(
            HessianFactor::new(&bad, k, 0.01, false),
            Err(Error::InvalidGptqArgument(_))
        ));
        assert!(matches!(
            HessianFactor::new(&h, k, -1.0, false),
            Err(Error::InvalidGptqArgument(_))
        ));
        let id: Vec<f64> = (0..k * k)
            .map(|e| if e % (k + 1) == 0 { 1.0 } else { 0.0 })
            .collect();
        let f = HessianFactor::new(&id, k, 0.01, false).unwrap();
        let opts = GptqOptions::new(32, QuantType4::Nf4);
        assert!(matches!(
            f.quantize(&[0.0; 7], 2, &opts, None),
            Err(Error::ShapeMismatch { .. })
        ));
        let mut w = vec![0.5f32; 8];
        w[6] = f32::INFINITY;
        assert!(matches!(
            f.quantize(&w, 2, &opts, None),
            Err(Error::NonFinite { index: 6, .. })
        ));
        assert!(matches!(
            f.quantize(&[0.0; 8], 2, &GptqOptions::new(48, QuantType4::Nf4), None),
            Err(Error::InvalidBlocksize(48))
        ));
        let lazy0 = GptqOptions {
            lazy_block: 0,
            ..opts
        };
        assert!(matches!(
            f.quantize(&[0.0; 8], 2, &lazy0, None),
            Err(Error::InvalidGptqArgument(_))
        ));
    }
}
