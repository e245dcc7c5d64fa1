//! Fused AdamW steps on the CPU: 32-bit states, and 8-bit block-wise states (bitsandbytes'
//! `AdamW8bit`: dynamic map, signed for the first moment, unsigned for the second, one
//! float32 absmax per block of 256).
//!
//! One pass per block: decode the states, update them and the parameter in float32,
//! re-encode the states against the new block absmax. The parameter update uses the float32
//! states before they are re-encoded, as bitsandbytes does. Blocks run in parallel on the
//! current rayon pool.

use rayon::prelude::*;

use crate::blockwise::nearest_code;
use crate::codebook::check_sorted_codebook;
use crate::element::{first_non_finite, Element};
use crate::error::{check_blocksize, check_len, num_blocks, Error, Result};

/// Block size of the 8-bit optimizer states (bitsandbytes' fixed value).
pub const STATE_BLOCKSIZE: usize = 256;

/// Elements handed to one rayon task in the 32-bit step.
const CHUNK_32BIT: usize = 16 * 1024;

/// bitsandbytes clamps the divisor so an all-zero block scales to zeros instead of NaN.
const MIN_ABSMAX: f32 = 1e-38;

/// AdamW hyper-parameters of one step (`step` counts from 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
}

/// Per-step constants, computed in float64 like torch does in Python, then rounded.
#[derive(Clone, Copy)]
struct Consts {
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

impl AdamW {
    fn validate(&self) -> Result<Consts> {
        let ok = self.lr.is_finite()
            && self.lr >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps.is_finite()
            && self.eps >= 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0
            && self.step >= 1;
        if !ok {
            return Err(Error::InvalidHyperParameter(format!("{self:?}")));
        }
        let step = self.step.min(i32::MAX as u64) as i32;
        let (lr, b1, b2) = (self.lr as f64, self.beta1 as f64, self.beta2 as f64);
        let bc1 = 1.0 - b1.powi(step);
        let bc2 = 1.0 - b2.powi(step);
        Ok(Consts {
            beta1: self.beta1,
            beta2: self.beta2,
            one_minus_beta1: (1.0 - b1) as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            decay: (1.0 - lr * self.weight_decay as f64) as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: self.eps,
        })
    }
}

/// The AdamW update of one element in float32, torch's order of operations:
/// `p *= 1 - lr wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
/// p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`. Returns (p, m, v).
#[inline(always)]
fn update(c: &Consts, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
    let p = p * c.decay;
    let m = m * c.beta1 + g * c.one_minus_beta1;
    let v = v * c.beta2 + (g * g) * c.one_minus_beta2;
    let denom = v.sqrt() / c.bc2_sqrt + c.eps;
    (p - c.step_size * (m / denom), m, v)
}

/// Rejects a gradient holding NaN / Inf before anything is modified.
fn check_grad<T: Element>(g: &[T]) -> Result<()> {
    let bad = g
        .par_chunks(CHUNK_32BIT)
        .any(|c| c.iter().any(|v| !v.to_f32().is_finite()));
    if bad {
        let (index, value) = first_non_finite(g).expect("a chunk reported a non-finite value");
        return Err(Error::NonFinite { index, value });
    }
    Ok(())
}

/// One AdamW step with float32 states (`m`, `v`), updating `p` in place.
pub fn adamw_step_32bit<T: Element>(
    p: &mut [T],
    g: &[T],
    m: &mut [f32],
    v: &mut [f32],
    hp: &AdamW,
) -> Result<()> {
    let c = hp.validate()?;
    let n = p.len();
    check_len("grad", n, g.len())?;
    check_len("exp_avg", n, m.len())?;
    check_len("exp_avg_sq", n, v.len())?;
    check_grad(g)?;
    p.par_chunks_mut(CHUNK_32BIT)
        .zip(g.par_chunks(CHUNK_32BIT))
        .zip(m.par_chunks_mut(CHUNK_32BIT))
        .zip(v.par_chunks_mut(CHUNK_32BIT))
        .for_each(|(((pc, gc), mc), vc)| {
            for (((pe, ge), me), ve) in pc.iter_mut().zip(gc).zip(mc.iter_mut()).zip(vc.iter_mut())
            {
                let (pn, mn, vn) = update(&c, pe.to_f32(), ge.to_f32(), *me, *ve);
                *pe = T::from_f32(pn);
                *me = mn;
                *ve = vn;
            }
        });
    Ok(())
}

/// The 8-bit optimizer states of one tensor: codes per element, absmax per block, and the
/// two code tables (ascending, 256 entries each).
pub struct States8<'a> {
    pub codes1: &'a mut [u8],
    pub codes2: &'a mut [u8],
    pub absmax1: &'a mut [f32],
    pub absmax2: &'a mut [f32],
    pub code1: &'a [f32],
    pub code2: &'a [f32],
    pub blocksize: usize,
}

/// One AdamW step with 8-bit block-wise states, updating `p` and the states in place.
pub fn adamw_step_8bit<T: Element>(
    p: &mut [T],
    g: &[T],
    states: States8<'_>,
    hp: &AdamW,
) -> Result<()> {
    let c = hp.validate()?;
    let States8 {
        codes1,
        codes2,
        absmax1,
        absmax2,
        code1,
        code2,
        blocksize,
    } = states;
    check_blocksize(blocksize)?;
    check_sorted_codebook(code1, 256)?;
    check_sorted_codebook(code2, 256)?;
    let n = p.len();
    let nb = num_blocks(n, blocksize);
    check_len("grad", n, g.len())?;
    check_len("state1", n, codes1.len())?;
    check_len("state2", n, codes2.len())?;
    check_len("absmax1", nb, absmax1.len())?;
    check_len("absmax2", nb, absmax2.len())?;
    if let Some(i) = absmax1
        .iter()
        .chain(absmax2.iter())
        .position(|a| !a.is_finite())
    {
        let value = if i < nb { absmax1[i] } else { absmax2[i - nb] };
        return Err(Error::NonFinite {
            index: i % nb.max(1),
            value,
        });
    }
    check_grad(g)?;
    p.par_chunks_mut(blocksize)
        .zip(g.par_chunks(blocksize))
        .zip(codes1.par_chunks_mut(blocksize))
        .zip(codes2.par_chunks_mut(blocksize))
        .zip(absmax1.par_iter_mut())
        .zip(absmax2.par_iter_mut())
        .with_min_len(16)
        .for_each(|(((((pb, gb), c1), c2), a1), a2)| {
            let mut m = [0.0f32; 4096];
            let mut v = [0.0f32; 4096];
            let len = pb.len();
            let (m, v) = (&mut m[..len], &mut v[..len]);
            let (s1, s2) = (*a1, *a2);
            let (mut new1, mut new2) = (0.0f32, 0.0f32);
            for i in 0..len {
                let m_old = code1[c1[i] as usize] * s1;
                let v_old = code2[c2[i] as usize] * s2;
                let (pn, mn, vn) = update(&c, pb[i].to_f32(), gb[i].to_f32(), m_old, v_old);
                pb[i] = T::from_f32(pn);
                m[i] = mn;
                v[i] = vn;
                new1 = new1.max(mn.abs());
                new2 = new2.max(vn.abs());
            }
            let (d1, d2) = (new1.max(MIN_ABSMAX), new2.max(MIN_ABSMAX));
            for i in 0..len {
                c1[i] = nearest_code(code1, m[i] / d1);
                c2[i] = nearest_code(code2, v[i] / d2);
            }
            *a1 = new1;
            *a2 = new2;
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::{dequantize_8bit, quantize_8bit};
    use crate::codebook::dynamic_map;
    use half::bf16;
    use proptest::prelude::*;

    fn lcg(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((s >> 40) as f32) / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    /// float64 AdamW of one element: (p, m, v).
    fn reference(hp: &AdamW, p: f64, g: f64, m: f64, v: f64) -> (f64, f64, f64) {
        let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
        let t = hp.step as i32;
        let p = p * (1.0 - hp.lr as f64 * hp.weight_decay as f64);
        let m = b1 * m + (1.0 - b1) * g;
        let v = b2 * v + (1.0 - b2) * g * g;
        let denom = v.sqrt() / (1.0 - b2.powi(t)).sqrt() + hp.eps as f64;
        (p - hp.lr as f64 / (1.0 - b1.powi(t)) * m / denom, m, v)
    }

    fn hp(step: u64) -> AdamW {
        AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
        }
    }

    #[test]
    fn step_32bit_matches_float64() {
        let n = 40_000;
        let mut p = lcg(1, n, 2.0);
        let mut m = vec![0.0f32; n];
        let mut v = vec![0.0f32; n];
        let mut rp: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let mut rm = vec![0.0f64; n];
        let mut rv = vec![0.0f64; n];
        for step in 1..=20 {
            let g = lcg(100 + step, n, 1.0);
            adamw_step_32bit(&mut p, &g, &mut m, &mut v, &hp(step)).unwrap();
            for i in 0..n {
                (rp[i], rm[i], rv[i]) = reference(&hp(step), rp[i], g[i] as f64, rm[i], rv[i]);
            }
        }
        for i in 0..n {
            assert!(
                (p[i] as f64 - rp[i]).abs() <= 1e-5 * rp[i].abs().max(1.0),
                "{i}"
            );
            assert!(
                (m[i] as f64 - rm[i]).abs() <= 1e-5 * rm[i].abs() + 1e-6,
                "{i}"
            );
        }
    }

    #[test]
    fn step_8bit_first_step_states_are_requantized_fp32_states() {
        // After one step from zero states the 8-bit states are exactly the block-wise
        // quantization of the float32 states, and the parameter equals the 32-bit step's.
        let n = 1000;
        let code1 = dynamic_map(true);
        let code2 = dynamic_map(false);
        let p0 = lcg(7, n, 1.0);
        let g = lcg(8, n, 0.5);
        let (mut p8, mut p32) = (p0.clone(), p0.clone());
        let (mut c1, mut c2) = (vec![127u8; n], vec![0u8; n]);
        let nb = num_blocks(n, 256);
        let (mut a1, mut a2) = (vec![0.0f32; nb], vec![0.0f32; nb]);
        let states = States8 {
            codes1: &mut c1,
            codes2: &mut c2,
            absmax1: &mut a1,
            absmax2: &mut a2,
            code1: &code1,
            code2: &code2,
            blocksize: 256,
        };
        adamw_step_8bit(&mut p8, &g, states, &hp(1)).unwrap();
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        adamw_step_32bit(&mut p32, &g, &mut m, &mut v, &hp(1)).unwrap();
        assert_eq!(p8, p32);
        let q1 = quantize_8bit(&m, &code1, 256).unwrap();
        let q2 = quantize_8bit(&v, &code2, 256).unwrap();
        assert_eq!(q1.codes, c1);
        assert_eq!(q2.codes, c2);
        assert_eq!(q1.absmax, a1);
        assert_eq!(q2.absmax, a2);
    }

    #[test]
    fn rejects_non_finite_grad_without_touching_anything() {
        let mut p = vec![1.0f32; 10];
        let mut g = vec![0.5f32; 10];
        g[3] = f32::NAN;
        let (mut m, mut v) = (vec![0.0f32; 10], vec![0.0f32; 10]);
        let e = adamw_step_32bit(&mut p, &g, &mut m, &mut v, &hp(1)).unwrap_err();
        assert!(matches!(e, Error::NonFinite { index: 3, .. }));
        assert!(p.iter().all(|&x| x == 1.0));
    }

    #[test]
    fn rejects_bad_hyper_parameters_and_lengths() {
        let mut p = vec![1.0f32; 10];
        let g = vec![0.5f32; 10];
        let (mut m, mut v) = (vec![0.0f32; 10], vec![0.0f32; 10]);
        let mut bad = hp(1);
        bad.beta1 = 1.0;
        assert!(matches!(
            adamw_step_32bit(&mut p, &g, &mut m, &mut v, &bad),
            Err(Error::InvalidHyperParameter(_))
        ));
        assert!(matches!(
            adamw_step_32bit(&mut p, &g, &mut m, &mut v, &hp(0)),
            Err(Error::InvalidHyperParameter(_))
        ));
        let mut short = vec![0.0f32; 9];
        assert!(matches!(
            adamw_step_32bit(&mut p, &g, &mut short, &mut v, &hp(1)),
            Err(Error::LengthMismatch { .. })
        ));
    }

    #[test]
    fn bf16_params_update() {
        let n = 600;
        let p0 = lcg(3, n, 1.0);
        let mut p: Vec<bf16> = p0.iter().map(|&x| bf16::from_f32(x)).collect();
        let g: Vec<bf16> = lcg(4, n, 1.0).iter().map(|&x| bf16::from_f32(x)).collect();
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        adamw_step_32bit(&mut p, &g, &mut m, &mut v, &hp(1)).unwrap();
        // First Adam step moves each element by about lr * sign(g).
        for i in 0..n {
            let moved = p[i].to_f32() - bf16::from_f32(p0[i]).to_f32();
            if g[i].to_f32().abs() > 1e-3 {
                assert!(moved * g[i].to_f32() <= 0.0, "{i}");
            }
        }
    }

    proptest! {
        /// The quantized-state round trip: after a step, decoding the states gives the
        /// float32 states within half a code step of the dynamic map (relative to absmax).
        #[test]
        fn states_round_trip(seed in 0u64..1000, n in 1usize..2000, scale in 1e-4f32..1e3) {
            let code1 = dynamic_map(true);
            let code2 = dynamic_map(false);
            let g = lcg(seed, n, scale);
            let mut p = lcg(seed + 1, n, 1.0);
            let nb = num_blocks(n, 256);
            let (mut c1, mut c2) = (vec![127u8; n], vec![0u8; n]);
            let (mut a1, mut a2) = (vec![0.0f32; nb], vec![0.0f32; nb]);
            let states = States8 { codes1: &mut c1, codes2: &mut c2, absmax1: &mut a1, absmax2: &mut a2,
                                   code1: &code1, code2: &code2, blocksize: 256 };
            adamw_step_8bit(&mut p, &g, states, &hp(1)).unwrap();
            let m: Vec<f32> = dequantize_8bit(&c1, &a1, &code1, 256).unwrap();
            let v: Vec<f32> = dequantize_8bit(&c2, &a2, &code2, 256).unwrap();
            for i in 0..n {
                let gm = 0.1 * g[i];
                let gv = 0.001 * g[i] * g[i];
                let b = i / 256;
                // The dynamic map's widest gap is about 1/8 of the range near +-1.
                prop_assert!((m[i] - gm).abs() <= a1[b] * 0.008 + 1e-30, "m {} vs {}", m[i], gm);
                prop_assert!((v[i] - gv).abs() <= a2[b] * 0.008 + 1e-30, "v {} vs {}", v[i], gv);
                // The block maximum is represented exactly (code 1.0).
                prop_assert!(a1[b] >= gm.abs() * (1.0 - 1e-6));
            }
        }
    }
}
