//! int8 quantization: absmax (symmetric) and zero-point (asymmetric), per tensor, per row or
//! per column, and LLM.int8()'s vector-wise quantization with outlier-column extraction.

use rayon::prelude::*;

use crate::element::{first_non_finite, Element};
use crate::error::{Error, Result};

/// Which elements share one scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per row (LLM.int8()'s choice for activations X).
    Row,
    /// One scale per column.
    Column,
}

impl Granularity {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "tensor" => Ok(Self::Tensor),
            "row" => Ok(Self::Row),
            "column" | "col" => Ok(Self::Column),
            other => Err(Error::UnknownDtype(format!("granularity {other}"))),
        }
    }

    fn groups(self, rows: usize, cols: usize) -> usize {
        match self {
            Self::Tensor => 1,
            Self::Row => rows,
            Self::Column => cols,
        }
    }

    #[inline(always)]
    fn group_of(self, r: usize, c: usize) -> usize {
        match self {
            Self::Tensor => 0,
            Self::Row => r,
            Self::Column => c,
        }
    }
}

/// Symmetric int8: `q = round(x * 127 / absmax)`, `x ~ q * absmax / 127`.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Absmax {
    pub q: Vec<i8>,
    /// absmax per group (bitsandbytes' `SCB` when per row).
    pub absmax: Vec<f32>,
}

/// Asymmetric int8: `q = clamp(round(x * scale) + zero_point, -128, 127)`,
/// `x ~ (q - zero_point) / scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8ZeroPoint {
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    /// Integer-valued, kept in f32 because `min * scale` may exceed i32 for odd ranges.
    pub zero_point: Vec<f32>,
}

/// LLM.int8() vector-wise quantization of one operand.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Vectorwise {
    /// Row-wise int8 with the outlier columns zeroed.
    pub q: Vec<i8>,
    /// absmax of each row over its non-outlier elements.
    pub row_absmax: Vec<f32>,
    /// Columns holding any |x| >= threshold, ascending.
    pub outlier_cols: Vec<usize>,
}

fn check_shape(len: usize, rows: usize, cols: usize) -> Result<()> {
    let needed = rows
        .checked_mul(cols)
        .ok_or(Error::SizeOverflow("rows * cols"))?;
    if needed != len {
        return Err(Error::ShapeMismatch {
            rows,
            cols,
            needed,
            len,
        });
    }
    Ok(())
}

fn check_finite<T: Element>(x: &[T]) -> Result<()> {
    match first_non_finite(x) {
        Some((index, value)) => Err(Error::NonFinite { index, value }),
        None => Ok(()),
    }
}

/// `127 / absmax` rounded as bitsandbytes computes it (torch evaluates `127.0 / t` as
/// `reciprocal(t) * 127`), so codes agree at rounding ties. An all-zero group maps to 0.
#[inline(always)]
fn int8_factor(absmax: f32) -> f32 {
    if absmax > 0.0 {
        (1.0 / absmax) * 127.0
    } else {
        0.0
    }
}

/// Rounds to nearest, ties to even (torch.round), then saturates to int8.
#[inline(always)]
fn round_to_i8(v: f32) -> i8 {
    v.round_ties_even().clamp(-128.0, 127.0) as i8
}

/// Per-group reductions over a row-major matrix.
fn group_reduce<T: Element>(
    x: &[T],
    cols: usize,
    g: Granularity,
    groups: usize,
    init: f32,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Vec<f32> {
    match g {
        Granularity::Row => x
            .par_chunks(cols.max(1))
            .map(|row| row.iter().fold(init, |m, v| f(m, v.to_f32())))
            .collect(),
        Granularity::Tensor | Granularity::Column => {
            let mut acc = vec![init; groups];
            for row in x.chunks(cols.max(1)) {
                for (c, v) in row.iter().enumerate() {
                    let k = g.group_of(0, c);
                    acc[k] = f(acc[k], v.to_f32());
                }
            }
            acc
        }
    }
}

/// Symmetric absmax int8 quantization of a `rows x cols` row-major matrix.
pub fn quantize_absmax<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
    g: Granularity,
) -> Result<Int8Absmax> {
    check_shape(x.len(), rows, cols)?;
    check_finite(x)?;
    let groups = g.groups(rows, cols);
    let absmax = group_reduce(x, cols, g, groups, 0.0, |m, v| m.max(v.abs()));
    let factor: Vec<f32> = absmax.iter().map(|&a| int8_factor(a)).collect();
    let mut q = vec![0i8; x.len()];
    q.par_chunks_mut(cols.max(1))
        .zip(x.par_chunks(cols.max(1)))
        .enumerate()
        .for_each(|(r, (qr, xr))| {
            for (c, (o, v)) in qr.iter_mut().zip(xr).enumerate() {
                *o = round_to_i8(v.to_f32() * factor[g.group_of(r, c)]);
            }
        });
    Ok(Int8Absmax { q, absmax })
}

/// Inverse of [`quantize_absmax`].
pub fn dequantize_absmax(
    q: &[i8],
    absmax: &[f32],
    rows: usize,
    cols: usize,
    g: Granularity,
) -> Result<Vec<f32>> {
    check_shape(q.len(), rows, cols)?;
    let groups = g.groups(rows, cols);
    if absmax.len() != groups {
        return Err(Error::LengthMismatch {
            what: "absmax",
            expected: groups,
            got: absmax.len(),
        });
    }
    let mut out = vec![0.0f32; q.len()];
    out.par_chunks_mut(cols.max(1))
        .zip(q.par_chunks(cols.max(1)))
        .enumerate()
        .for_each(|(r, (or, qr))| {
            for (c, (o, &v)) in or.iter_mut().zip(qr).enumerate() {
                *o = v as f32 * (absmax[g.group_of(r, c)] / 127.0);
            }
        });
    Ok(out)
}

/// Asymmetric (zero-point) int8 quantization: each group's [min, max] maps onto [-128, 127].
pub fn quantize_zeropoint<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
    g: Granularity,
) -> Result<Int8ZeroPoint> {
    check_shape(x.len(), rows, cols)?;
    check_finite(x)?;
    let groups = g.groups(rows, cols);
    let mins = group_reduce(x, cols, g, groups, f32::INFINITY, f32::min);
    let maxs = group_reduce(x, cols, g, groups, f32::NEG_INFINITY, f32::max);
    let (scale, zero_point): (Vec<f32>, Vec<f32>) = mins
        .iter()
        .zip(&maxs)
        .map(|(&lo, &hi)| {
            let range = hi as f64 - lo as f64;
            if range > 0.0 {
                let s = (255.0 / range) as f32;
                (s, -128.0 - (lo * s).round_ties_even())
            } else if lo != 0.0 {
                // Constant group: symmetric scale reproduces the constant exactly.
                (127.0 / lo.abs(), 0.0)
            } else {
                (1.0, 0.0)
            }
        })
        .unzip();
    let mut q = vec![0i8; x.len()];
    q.par_chunks_mut(cols.max(1))
        .zip(x.par_chunks(cols.max(1)))
        .enumerate()
        .for_each(|(r, (qr, xr))| {
            for (c, (o, v)) in qr.iter_mut().zip(xr).enumerate() {
                let k = g.group_of(r, c);
                *o = round_to_i8((v.to_f32() * scale[k]).round_ties_even() + zero_point[k]);
            }
        });
    Ok(Int8ZeroPoint {
        q,
        scale,
        zero_point,
    })
}

/// Inverse of [`quantize_zeropoint`].
pub fn dequantize_zeropoint(
    q: &[i8],
    scale: &[f32],
    zero_point: &[f32],
    rows: usize,
    cols: usize,
    g: Granularity,
) -> Result<Vec<f32>> {
    check_shape(q.len(), rows, cols)?;
    let groups = g.groups(rows, cols);
    for (what, v) in [("scale", scale), ("zero_point", zero_point)] {
        if v.len() != groups {
            return Err(Error::LengthMismatch {
                what,
                expected: groups,
                got: v.len(),
            });
        }
    }
    let mut out = vec![0.0f32; q.len()];
    out.par_chunks_mut(cols.max(1))
        .zip(q.par_chunks(cols.max(1)))
        .enumerate()
        .for_each(|(r, (or, qr))| {
            for (c, (o, &v)) in or.iter_mut().zip(qr).enumerate() {
                let k = g.group_of(r, c);
                *o = (v as f32 - zero_point[k]) / scale[k];
            }
        });
    Ok(out)
}

fn check_threshold(threshold: f32) -> Result<()> {
    if threshold.is_finite() && threshold >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidThreshold(threshold))
    }
}

/// Columns of a `rows x cols` matrix holding any |x| >= threshold (LLM.int8()'s outlier
/// feature dimensions). `threshold == 0` disables detection.
pub fn outlier_columns<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
    threshold: f32,
) -> Result<Vec<usize>> {
    check_shape(x.len(), rows, cols)?;
    check_threshold(threshold)?;
    check_finite(x)?;
    if threshold == 0.0 || cols == 0 {
        return Ok(vec![]);
    }
    let flags = x
        .par_chunks(cols)
        .fold(
            || vec![false; cols],
            |mut acc, row| {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a |= v.to_f32().abs() >= threshold;
                }
                acc
            },
        )
        .reduce(
            || vec![false; cols],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x |= y);
                a
            },
        );
    Ok(flags
        .iter()
        .enumerate()
        .filter_map(|(c, &f)| f.then_some(c))
        .collect())
}

/// LLM.int8() vector-wise quantization (bitsandbytes' `int8_vectorwise_quant`): elements with
/// |x| >= threshold are left out of the row absmax, and whole outlier columns are zeroed in
/// the int8 result (they are multiplied in 16-bit instead).
pub fn vectorwise_quant<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
    threshold: f32,
) -> Result<Int8Vectorwise> {
    let outlier_cols = outlier_columns(x, rows, cols, threshold)?;
    let is_outlier_col = {
        let mut v = vec![false; cols];
        outlier_cols.iter().for_each(|&c| v[c] = true);
        v
    };
    let is_outlier = |v: f32| threshold > 0.0 && v.abs() >= threshold;
    let mut q = vec![0i8; x.len()];
    let mut row_absmax = vec![0.0f32; rows];
    q.par_chunks_mut(cols.max(1))
        .zip(x.par_chunks(cols.max(1)))
        .zip(row_absmax.par_iter_mut())
        .for_each(|((qr, xr), am)| {
            let amax = xr.iter().map(|v| v.to_f32()).fold(0.0f32, |m, v| {
                if is_outlier(v) {
                    m
                } else {
                    m.max(v.abs())
                }
            });
            let factor = int8_factor(amax);
            for (c, (o, v)) in qr.iter_mut().zip(xr).enumerate() {
                *o = if is_outlier_col[c] {
                    0
                } else {
                    round_to_i8(v.to_f32() * factor)
                };
            }
            *am = amax;
        });
    Ok(Int8Vectorwise {
        q,
        row_absmax,
        outlier_cols,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn absmax_row_known_values() {
        let x = [1.0f32, -2.0, 0.5, 4.0, 0.0, -4.0];
        let r = quantize_absmax(&x, 2, 3, Granularity::Row).unwrap();
        assert_eq!(r.absmax, vec![2.0, 4.0]);
        assert_eq!(r.q, vec![64, -127, 32, 127, 0, -127]); // 63.5 rounds to even 64
        let c = quantize_absmax(&x, 2, 3, Granularity::Column).unwrap();
        assert_eq!(c.absmax, vec![4.0, 2.0, 4.0]);
        let t = quantize_absmax(&x, 2, 3, Granularity::Tensor).unwrap();
        assert_eq!(t.absmax, vec![4.0]);
        let back = dequantize_absmax(&t.q, &t.absmax, 2, 3, Granularity::Tensor).unwrap();
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 4.0 / 254.0 + 1e-6);
        }
    }

    #[test]
    fn zeropoint_uses_full_range() {
        let x = [0.0f32, 1.0, 2.0, 3.0];
        let z = quantize_zeropoint(&x, 1, 4, Granularity::Tensor).unwrap();
        assert_eq!(z.q[0], -128);
        assert_eq!(z.q[3], 127);
        let back =
            dequantize_zeropoint(&z.q, &z.scale, &z.zero_point, 1, 4, Granularity::Tensor).unwrap();
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 3.0 / 255.0 + 1e-6);
        }
        let k = quantize_zeropoint(&[2.5f32; 4], 2, 2, Granularity::Row).unwrap();
        let back =
            dequantize_zeropoint(&k.q, &k.scale, &k.zero_point, 2, 2, Granularity::Row).unwrap();
        assert!(back.iter().all(|v| (*v - 2.5).abs() < 1e-6));
    }

    #[test]
    fn outliers_and_vectorwise() {
        // 2x4: column 2 holds an outlier in row 1.
        let x = [0.5f32, -1.0, 0.25, 2.0, 1.0, 0.5, -7.0, -0.5];
        assert_eq!(outlier_columns(&x, 2, 4, 6.0).unwrap(), vec![2]);
        assert!(outlier_columns(&x, 2, 4, 0.0).unwrap().is_empty());
        let v = vectorwise_quant(&x, 2, 4, 6.0).unwrap();
        assert_eq!(v.outlier_cols, vec![2]);
        assert_eq!(v.row_absmax, vec![2.0, 1.0]);
        assert_eq!(v.q[2], 0);
        assert_eq!(v.q[6], 0);
        assert_eq!(v.q[3], 127);
        assert_eq!(v.q[4], 127);
        let v0 = vectorwise_quant(&x, 2, 4, 0.0).unwrap();
        assert!(v0.outlier_cols.is_empty());
        assert_eq!(v0.row_absmax, vec![2.0, 7.0]);
    }

    #[test]
    fn errors() {
        let x = [1.0f32; 6];
        assert!(matches!(
            quantize_absmax(&x, 4, 2, Granularity::Row),
            Err(Error::ShapeMismatch {
                needed: 8,
                len: 6,
                ..
            })
        ));
        assert!(matches!(
            quantize_absmax(&x, usize::MAX, 2, Granularity::Row),
            Err(Error::SizeOverflow(_))
        ));
        assert!(matches!(
            outlier_columns(&x, 2, 3, -1.0),
            Err(Error::InvalidThreshold(_))
        ));
        assert!(matches!(
            outlier_columns(&x, 2, 3, f32::NAN),
            Err(Error::InvalidThreshold(_))
        ));
        let mut y = x;
        y[5] = f32::NEG_INFINITY;
        assert!(matches!(
            vectorwise_quant(&y, 2, 3, 6.0),
            Err(Error::NonFinite { index: 5, .. })
        ));
        assert!(matches!(
            dequantize_absmax(&[0i8; 6], &[1.0], 2, 3, Granularity::Row),
            Err(Error::LengthMismatch { what: "absmax", .. })
        ));
    }

    proptest! {
        #[test]
        fn prop_absmax_round_trip(
            x in proptest::collection::vec(-100.0f32..100.0, 1..200),
            col_split in 1usize..8,
        ) {
            let cols = col_split.min(x.len());
            let rows = x.len() / cols;
            let x = &x[..rows * cols];
            for g in [Granularity::Tensor, Granularity::Row, Granularity::Column] {
                let r = quantize_absmax(x, rows, cols, g).unwrap();
                let back = dequantize_absmax(&r.q, &r.absmax, rows, cols, g).unwrap();
                for (i, (a, b)) in x.iter().zip(&back).enumerate() {
                    let k = g.group_of(i / cols, i % cols);
                    prop_assert!((a - b).abs() <= r.absmax[k] / 254.0 * 1.0001 + 1e-6);
                }
                let z = quantize_zeropoint(x, rows, cols, g).unwrap();
                let back = dequantize_zeropoint(&z.q, &z.scale, &z.zero_point, rows, cols, g).unwrap();
                for (i, (a, b)) in x.iter().zip(&back).enumerate() {
                    let k = g.group_of(i / cols, i % cols);
                    prop_assert!((a - b).abs() <= 1.0 / z.scale[k] * 1.0001 + 1e-5);
                }
            }
        }
    }
}
