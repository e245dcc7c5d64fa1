//! Error statistics between a reference tensor and its approximation, in float64.

use rayon::prelude::*;

use crate::element::{first_non_finite, Element};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ErrorStats {
    pub n: usize,
    /// Root mean squared error.
    pub rmse: f64,
    /// Largest absolute error.
    pub max_abs: f64,
    /// Mean absolute error.
    pub mean_abs: f64,
    /// Signal-to-quantization-noise ratio in dB: 10 log10(sum x^2 / sum (x - y)^2);
    /// +inf when the two are equal.
    pub sqnr_db: f64,
}

#[derive(Clone, Copy, Default)]
struct Sums {
    signal: f64,
    err2: f64,
    err_abs: f64,
    max_abs: f64,
}

/// Compares `approx` against `reference` element by element.
pub fn error_stats<A: Element, B: Element>(reference: &[A], approx: &[B]) -> Result<ErrorStats> {
    if reference.len() != approx.len() {
        return Err(Error::LengthMismatch {
            what: "approximation",
            expected: reference.len(),
            got: approx.len(),
        });
    }
    if let Some((index, value)) = first_non_finite(reference).or_else(|| first_non_finite(approx)) {
        return Err(Error::NonFinite { index, value });
    }
    let s = reference
        .par_iter()
        .zip(approx.par_iter())
        .with_min_len(4096)
        .fold(Sums::default, |mut s, (a, b)| {
            let a = a.to_f32() as f64;
            let e = (a - b.to_f32() as f64).abs();
            s.signal += a * a;
            s.err2 += e * e;
            s.err_abs += e;
            s.max_abs = s.max_abs.max(e);
            s
        })
        .reduce(Sums::default, |a, b| Sums {
            signal: a.signal + b.signal,
            err2: a.err2 + b.err2,
            err_abs: a.err_abs + b.err_abs,
            max_abs: a.max_abs.max(b.max_abs),
        });
    let n = reference.len();
    let denom = n.max(1) as f64;
    let sqnr_db = if s.err2 == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (s.signal / s.err2).log10()
    };
    Ok(ErrorStats {
        n,
        rmse: (s.err2 / denom).sqrt(),
        max_abs: s.max_abs,
        mean_abs: s.err_abs / denom,
        sqnr_db,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [1.0f32, 2.5, 3.0, 3.0];
        let s = error_stats(&a, &b).unwrap();
        assert_eq!(s.n, 4);
        assert!((s.rmse - (1.25f64 / 4.0).sqrt()).abs() < 1e-12);
        assert_eq!(s.max_abs, 1.0);
        assert!((s.mean_abs - 1.5 / 4.0).abs() < 1e-12);
        assert!((s.sqnr_db - 10.0 * (30.0f64 / 1.25).log10()).abs() < 1e-9);
        assert_eq!(error_stats(&a, &a).unwrap().sqnr_db, f64::INFINITY);
    }

    #[test]
    fn errors() {
        assert!(matches!(
            error_stats(&[1.0f32], &[1.0f32, 2.0]),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(matches!(
            error_stats(&[1.0f32, f32::NAN], &[1.0f32, 2.0]),
            Err(Error::NonFinite { index: 1, .. })
        ));
    }
}
