//! QLoRA's double quantization: the float32 block absmaxes of a 4-bit tensor are themselves
//! quantized block-wise to 8 bits with the dynamic map, around their mean.

use rayon::prelude::*;

use crate::blockwise::{quantize_8bit_with, Blockwise8};
use crate::error::{check_blocksize, num_blocks, Error, Result};
use crate::simd::SimdLevel;

/// Elements per second-level block (bitsandbytes and the QLoRA paper use 256).
pub const NESTED_BLOCKSIZE: usize = 256;

/// Double-quantized block constants.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit code per first-level block.
    pub codes: Vec<u8>,
    /// One float32 absmax per `nested_blocksize` codes.
    pub nested_absmax: Vec<f32>,
    /// Mean of the first-level absmaxes, subtracted before quantizing.
    pub offset: f32,
}

/// Quantizes first-level absmaxes: `offset = mean(absmax)`, then `absmax - offset`
/// block-wise 8-bit with `code` (the signed dynamic map) and `nested_blocksize`, on the
/// highest SIMD level of this CPU.
pub fn double_quantize(
    absmax: &[f32],
    code: &[f32],
    nested_blocksize: usize,
) -> Result<DoubleQuant> {
    double_quantize_with(absmax, code, nested_blocksize, SimdLevel::detect())
}

/// [`double_quantize`] on a given SIMD level (one the CPU lacks is
/// [`crate::error::Error::UnsupportedSimd`]); every level writes the same codes.
pub fn double_quantize_with(
    absmax: &[f32],
    code: &[f32],
    nested_blocksize: usize,
    level: SimdLevel,
) -> Result<DoubleQuant> {
    check_blocksize(nested_blocksize)?;
    let level = level.checked()?;
    if absmax.is_empty() {
        return Ok(DoubleQuant {
            codes: vec![],
            nested_absmax: vec![],
            offset: 0.0,
        });
    }
    // Mean in f64 so the offset does not depend on summation order or thread count.
    let sum: f64 = absmax.par_iter().map(|&a| a as f64).sum();
    let offset = (sum / absmax.len() as f64) as f32;
    let centered: Vec<f32> = absmax.par_iter().map(|&a| a - offset).collect();
    let Blockwise8 { codes, absmax } =
        quantize_8bit_with(&centered, code, nested_blocksize, level)?;
    Ok(DoubleQuant {
        codes,
        nested_absmax: absmax,
        offset,
    })
}

/// Restores first-level absmaxes: `code[q] * nested_absmax[i / nested_blocksize] + offset`,
/// in float32 in that order (bit-identical to bitsandbytes).
pub fn double_dequantize_into(
    codes: &[u8],
    nested_absmax: &[f32],
    offset: f32,
    code: &[f32],
    nested_blocksize: usize,
    out: &mut [f32],
) -> Result<()> {
    check_blocksize(nested_blocksize)?;
    if code.len() != 256 {
        return Err(Error::InvalidCodebook {
            expected: 256,
            problem: "wrong length",
        });
    }
    if !offset.is_finite() {
        return Err(Error::NonFinite {
            index: 0,
            value: offset,
        });
    }
    crate::blockwise::dequantize_8bit_into(codes, nested_absmax, code, nested_blocksize, out)?;
    out.par_iter_mut().for_each(|a| *a += offset);
    Ok(())
}

pub fn double_dequantize(
    codes: &[u8],
    nested_absmax: &[f32],
    offset: f32,
    code: &[f32],
    nested_blocksize: usize,
) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; codes.len()];
    double_dequantize_into(
        codes,
        nested_absmax,
        offset,
        code,
        nested_blocksize,
        &mut out,
    )?;
    Ok(out)
}

/// Storage cost of the 4-bit weight plus its block constants, in bits per parameter, for
/// `n` parameters (exact, including partial blocks). The blocksize is checked like every
/// other entry point's ([`check_blocksize`]).
pub fn bits_per_parameter(n: usize, blocksize: usize, double_quant: bool) -> Result<f64> {
    check_blocksize(blocksize)?;
    if n == 0 {
        return Ok(0.0);
    }
    let blocks = num_blocks(n, blocksize);
    let constant_bits = if double_quant {
        // 8-bit code per block + f32 per nested block + the f32 offset.
        8 * blocks + 32 * num_blocks(blocks, NESTED_BLOCKSIZE) + 32
    } else {
        32 * blocks
    };
    Ok((4.0 * n as f64 + constant_bits as f64) / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codebook::dynamic_map;

    #[test]
    fn paper_arithmetic() {
        // QLoRA section 3: 8/64 + 32/(64*256) = 0.127 bits per parameter instead of 32/64 = 0.5.
        let dq = 8.0 / 64.0 + 32.0 / (64.0 * 256.0);
        assert!((dq - 0.127f64).abs() < 0.0005);
        let n = 64 * 256 * 1000;
        // The one f32 offset per tensor adds 32 / n bits.
        let bits = |dq| bits_per_parameter(n, 64, dq).unwrap();
        assert!((bits(true) - 4.0 - dq - 32.0 / n as f64).abs() < 1e-9);
        assert!((bits(false) - 4.5).abs() < 1e-12);
        // A blocksize of 0 (or any unsupported one) is an error, not a division by zero.
        for blocksize in [0, 1, 48, 8192] {
            assert!(matches!(
                bits_per_parameter(n, blocksize, true),
                Err(Error::InvalidBlocksize(b)) if b == blocksize
            ));
        }
    }

    #[test]
    fn round_trip_is_close() {
        let code = dynamic_map(true);
        let absmax: Vec<f32> = (0..1000)
            .map(|i| 0.5 + ((i * 37) % 101) as f32 / 100.0)
            .collect();
        let dq = double_quantize(&absmax, &code, NESTED_BLOCKSIZE).unwrap();
        assert_eq!(dq.codes.len(), 1000);
        assert_eq!(dq.nested_absmax.len(), 4);
        let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / 1000.0;
        assert!((dq.offset as f64 - mean).abs() < 1e-6);
        let back = double_dequantize(&dq.codes, &dq.nested_absmax, dq.offset, &code, 256).unwrap();
        for (a, b) in absmax.iter().zip(&back) {
            assert!((a - b).abs() < 0.01, "{a} vs {b}");
        }
    }

    #[test]
    fn empty_and_errors() {
        let code = dynamic_map(true);
        let dq = double_quantize(&[], &code, 256).unwrap();
        assert!(dq.codes.is_empty());
        assert!(matches!(
            double_quantize(&[1.0, f32::INFINITY], &code, 256),
            Err(Error::NonFinite { .. })
        ));
        assert!(matches!(
            double_dequantize(&[0, 1], &[1.0], f32::NAN, &code, 256),
            Err(Error::NonFinite { .. })
        ));
        assert!(matches!(
            double_dequantize(&[0, 1], &[1.0, 2.0], 0.0, &code, 256),
            Err(Error::LengthMismatch { .. })
        ));
    }
}
