//! Code tables: NF4, FP4 (bitsandbytes layout) and the 8-bit dynamic map.

use crate::{Error, Result};

/// NF4 levels, index = 4-bit code (QLoRA, Appendix E; bitsandbytes' shipped table).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 levels in bitsandbytes' layout: bit 3 is the sign, the low 3 bits index
/// `0, 0.0625, 8, 12, 4, 6, 2, 3` (all / 12).
pub const FP4: [f32; 16] = {
    const MAG: [f32; 8] = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0];
    let mut t = [0.0f32; 16];
    let mut i = 0;
    while i < 8 {
        t[i] = MAG[i] / 12.0;
        t[i + 8] = -MAG[i] / 12.0;
        i += 1;
    }
    t
};

/// The code of 0.0 in each 4-bit table: what a missing last element pads as.
pub const NF4_ZERO_CODE: u8 = 0b0111;
pub const FP4_ZERO_CODE: u8 = 0b0000;

/// Which 4-bit data type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType4 {
    Nf4,
    Fp4,
}

impl QuantType4 {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "nf4" | "NF4" => Ok(Self::Nf4),
            "fp4" | "FP4" => Ok(Self::Fp4),
            other => Err(Error::UnknownQuantType(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
        }
    }

    pub fn table(self) -> &'static [f32; 16] {
        match self {
            Self::Nf4 => &NF4,
            Self::Fp4 => &FP4,
        }
    }

    pub fn zero_code(self) -> u8 {
        match self {
            Self::Nf4 => NF4_ZERO_CODE,
            Self::Fp4 => FP4_ZERO_CODE,
        }
    }
}

/// Inverse of the standard normal CDF (Wichura's AS241, about 1e-16 relative accuracy).
#[allow(clippy::inconsistent_digit_grouping, clippy::excessive_precision)]
pub fn normal_ppf(p: f64) -> f64 {
    assert!(p > 0.0 && p < 1.0, "normal_ppf needs 0 < p < 1, got {p}");
    let q = p - 0.5;
    if q.abs() <= 0.425 {
        let r = 0.180625 - q * q;
        let num = ((((((2509.080_928_730_122_7 * r + 33_430.575_583_588_13) * r
            + 67_265.770_927_008_7)
            * r
            + 45_921.953_931_549_87)
            * r
            + 13_731.693_765_509_46)
            * r
            + 1971.590_950_306_551_3)
            * r
            + 133.141_667_891_784_38)
            * r
            + 3.387_132_872_796_366_5;
        let den = ((((((5_226.495_278_852_545 * r + 28729.085_735_721_943) * r
            + 39_307.895_800_092_71)
            * r
            + 21213.794_301_586_595)
            * r
            + 5_394.196_021_424_751)
            * r
            + 687.187_007_492_057_9)
            * r
            + 42.313_330_701_600_91)
            * r
            + 1.0;
        return q * num / den;
    }
    let mut r = if q < 0.0 { p } else { 1.0 - p };
    r = (-r.ln()).sqrt();
    let val = if r <= 5.0 {
        let r = r - 1.6;
        let num = ((((((7.745_450_142_783_414e-4 * r + 0.022_723_844_989_269_184) * r
            + 0.241_780_725_177_450_6)
            * r
            + 1.270_458_252_452_368_4)
            * r
            + 3.647_848_324_763_204_5)
            * r
            + 5.769_497_221_460_691)
            * r
            + 4.630_337_846_156_546)
            * r
            + 1.423_437_110_749_683_5;
        let den = ((((((1.050_750_071_644_416_9e-9 * r + 5.475_938_084_995_345e-4) * r
            + 0.015_198_666_563_616_457)
            * r
            + 0.148_103_976_427_480_08)
            * r
            + 0.689_767_334_985_100_1)
            * r
            + 1.676_384_830_183_803_8)
            * r
            + 2.053_191_626_637_759)
            * r
            + 1.0;
        num / den
    } else {
        let r = r - 5.0;
        let num = ((((((2.010_334_399_292_288_1e-7 * r + 2.711_555_568_743_487_6e-5) * r
            + 0.001_242_660_947_388_078_4)
            * r
            + 0.026_532_189_526_576_124)
            * r
            + 0.296_560_571_828_504_9)
            * r
            + 1.784_826_539_917_291_3)
            * r
            + 5.463_784_911_164_114)
            * r
            + 6.657_904_643_501_103;
        let den = ((((((2.044_263_103_389_939_7e-15 * r + 1.421_511_758_316_446e-7) * r
            + 1.846_318_317_510_054_8e-5)
            * r
            + 7.868_691_311_456_133e-4)
            * r
            + 0.014_875_361_290_850_615)
            * r
            + 0.136_929_880_922_735_8)
            * r
            + 0.599_832_206_555_888)
            * r
            + 1.0;
        num / den
    };
    if q < 0.0 {
        -val
    } else {
        val
    }
}

/// torch.linspace in float32 as its CPU kernel computes it (fused multiply-add from the
/// nearer end), so the maps below match bitsandbytes bit for bit.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// NF4 built from normal quantiles as in the QLoRA paper: 8 positive and 7 negative
/// quantiles of N(0, 1) between `offset` and 0.5, an exact zero, normalized to [-1, 1].
/// In float32 this reproduces 15 of the 16 shipped entries exactly (the last within 1 ulp);
/// [`NF4`] is the table to use.
pub fn nf4_from_normal_quantiles(offset: f64) -> [f32; 16] {
    let pos: Vec<f64> = linspace_f32(offset as f32, 0.5, 9)[..8]
        .iter()
        .map(|&p| normal_ppf(p as f64))
        .collect();
    let neg: Vec<f64> = linspace_f32(offset as f32, 0.5, 8)[..7]
        .iter()
        .map(|&p| -normal_ppf(p as f64))
        .collect();
    let mut v: Vec<f32> = pos
        .iter()
        .chain(std::iter::once(&0.0))
        .chain(neg.iter())
        .map(|&x| x as f32)
        .collect();
    v.sort_by(f32::total_cmp);
    let max = v.iter().copied().fold(f32::MIN, f32::max);
    let mut out = [0.0f32; 16];
    for (o, x) in out.iter_mut().zip(v) {
        *o = x / max;
    }
    out
}

/// The QLoRA paper's NF4 offset: 1/2 (1/32 + 1/30) quantile spacing, `0.9677083`.
pub const NF4_OFFSET: f64 = 0.9677083;

/// bitsandbytes' dynamic (tree) quantization map, `create_dynamic_map(signed, 7, 8)`:
/// 256 sorted values; signed: min -0.99296875, exact 0 at index 127, max 1.0;
/// unsigned: 0 ..= 1.0 (used for Adam's second moment).
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    const MAX_EXPONENT_BITS: i32 = 7;
    const NON_SIGN_BITS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..MAX_EXPONENT_BITS {
        let fraction_items = if signed {
            (1usize << (i + NON_SIGN_BITS - MAX_EXPONENT_BITS)) + 1
        } else {
            (1usize << (i + NON_SIGN_BITS - MAX_EXPONENT_BITS + 1)) + 1
        };
        let bounds = linspace_f32(0.1, 1.0, fraction_items);
        let scale = 10f64.powi(-(MAX_EXPONENT_BITS - 1) + i) as f32;
        let means: Vec<f32> = bounds.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|m| scale * m));
        if signed {
            data.extend(means.iter().map(|m| -scale * m));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0.0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// Checks that a codebook is finite and sorted ascending (nearest-code search relies on it).
pub fn check_sorted_codebook(code: &[f32], expected: usize) -> Result<()> {
    if code.len() != expected {
        return Err(Error::InvalidCodebook {
            expected,
            problem: "wrong length",
        });
    }
    if code.iter().any(|c| !c.is_finite()) {
        return Err(Error::InvalidCodebook {
            expected,
            problem: "non-finite entry",
        });
    }
    if code.windows(2).any(|w| w[0] > w[1]) {
        return Err(Error::InvalidCodebook {
            expected,
            problem: "not sorted ascending",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_construction_reproduces_shipped_table() {
        let built = nf4_from_normal_quantiles(NF4_OFFSET);
        let exact = built.iter().zip(NF4).filter(|(a, b)| **a == *b).count();
        assert!(exact >= 15, "only {exact} of 16 entries equal: {built:?}");
        for (a, b) in built.iter().zip(NF4) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn nf4_shape() {
        assert_eq!(NF4[7], 0.0);
        assert_eq!(NF4[0], -1.0);
        assert_eq!(NF4[15], 1.0);
        assert!(NF4.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(NF4.iter().filter(|v| **v > 0.0).count(), 8);
        assert_eq!(NF4.iter().filter(|v| **v < 0.0).count(), 7);
    }

    #[test]
    fn fp4_layout() {
        assert_eq!(FP4[0], 0.0);
        assert_eq!(FP4[3], 1.0);
        assert_eq!(FP4[1], 0.0625 / 12.0);
        assert_eq!(FP4[11], -1.0);
        for i in 0..8 {
            assert_eq!(FP4[i + 8], -FP4[i]);
        }
    }

    #[test]
    fn normal_ppf_known_values() {
        assert!((normal_ppf(0.5)).abs() < 1e-15);
        assert!((normal_ppf(0.975) - 1.959_963_984_540_054).abs() < 1e-12);
        assert!((normal_ppf(0.025) + 1.959_963_984_540_054).abs() < 1e-12);
        assert!((normal_ppf(1e-10) + 6.361_340_902_404_056).abs() < 1e-9);
        assert!((normal_ppf(0.8413447460685429) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn dynamic_map_signed_landmarks() {
        let m = dynamic_map(true);
        assert_eq!(m[0], -0.992_968_75);
        assert_eq!(m[127], 0.0);
        assert_eq!(m[255], 1.0);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        check_sorted_codebook(&m, 256).unwrap();
    }

    #[test]
    fn dynamic_map_unsigned_landmarks() {
        let m = dynamic_map(false);
        assert_eq!(m[0], 0.0);
        assert_eq!(m[255], 1.0);
        assert!(m.iter().all(|v| *v >= 0.0));
        check_sorted_codebook(&m, 256).unwrap();
    }

    #[test]
    fn codebook_validation_errors() {
        assert!(matches!(
            check_sorted_codebook(&[0.0; 3], 4),
            Err(Error::InvalidCodebook {
                problem: "wrong length",
                ..
            })
        ));
        assert!(matches!(
            check_sorted_codebook(&[0.0, f32::NAN], 2),
            Err(Error::InvalidCodebook {
                problem: "non-finite entry",
                ..
            })
        ));
        assert!(matches!(
            check_sorted_codebook(&[1.0, 0.0], 2),
            Err(Error::InvalidCodebook {
                problem: "not sorted ascending",
                ..
            })
        ));
    }

    #[test]
    fn quant_type_parse() {
        assert_eq!(QuantType4::parse("nf4").unwrap(), QuantType4::Nf4);
        assert_eq!(QuantType4::parse("fp4").unwrap(), QuantType4::Fp4);
        assert!(matches!(
            QuantType4::parse("int3"),
            Err(Error::UnknownQuantType(_))
        ));
    }
}
