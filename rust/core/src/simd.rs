//! Run-time SIMD levels of the fused matmul kernels ([`crate::matmul`], [`crate::int8_matmul`]).
//!
//! The levels form a ladder: each one needs the CPU features of the one below it plus its own,
//! so "every level up to the detected one" is every kernel path this CPU can run. A caller may
//! force a lower level (tests run each in turn; benchmarks compare them); asking for a level
//! the CPU lacks is an error, never undefined behaviour.

use crate::error::{Error, Result};

/// A kernel path, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Plain Rust, auto-vectorised by the compiler for the build target (any architecture).
    Portable,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F + BW + VL + DQ (plus everything of [`SimdLevel::Avx2`]).
    Avx512,
    /// [`SimdLevel::Avx512`] + AVX512-VNNI (`vpdpbusd` int8 dot products).
    Avx512Vnni,
    /// [`SimdLevel::Avx512Vnni`] + AVX512-BF16 (`vdpbf16ps` bf16 dot products).
    Avx512Bf16,
    /// [`SimdLevel::Avx512Bf16`] + AMX-BF16 tiles granted by the OS (Intel Sapphire Rapids and
    /// later, Linux): bf16 x with several rows runs the tile kernel of `matmul_amx`.
    AmxBf16,
}

impl SimdLevel {
    /// Every level, lowest first.
    pub const ALL: [SimdLevel; 6] = [
        SimdLevel::Portable,
        SimdLevel::Avx2,
        SimdLevel::Avx512,
        SimdLevel::Avx512Vnni,
        SimdLevel::Avx512Bf16,
        SimdLevel::AmxBf16,
    ];

    /// The name [`SimdLevel::parse`] reads (and `NYBBLE_SIMD` takes).
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Avx512Vnni => "avx512_vnni",
            SimdLevel::Avx512Bf16 => "avx512_bf16",
            SimdLevel::AmxBf16 => "amx_bf16",
        }
    }

    /// Whether this CPU can run the level's kernels.
    pub fn is_available(self) -> bool {
        match self {
            SimdLevel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => {
                SimdLevel::Avx2.is_available()
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512dq")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512Vnni => {
                SimdLevel::Avx512.is_available() && std::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512Bf16 => {
                SimdLevel::Avx512Vnni.is_available() && std::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::AmxBf16 => {
                SimdLevel::Avx512Bf16.is_available() && crate::matmul_amx::usable()
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The highest level this CPU runs.
    pub fn detect() -> SimdLevel {
        Self::available()
            .last()
            .copied()
            .unwrap_or(SimdLevel::Portable)
    }

    /// Every level this CPU runs, lowest first (always starts with `Portable`).
    pub fn available() -> Vec<SimdLevel> {
        Self::ALL.into_iter().filter(|l| l.is_available()).collect()
    }

    /// A level by name; `"auto"` (or an empty string) is [`SimdLevel::detect`]. A level the
    /// CPU cannot run, or an unknown name, is [`Error::UnsupportedSimd`].
    pub fn parse(name: &str) -> Result<SimdLevel> {
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() || name == "auto" {
            return Ok(Self::detect());
        }
        let level = Self::ALL.into_iter().find(|l| l.name() == name);
        match level {
            Some(l) if l.is_available() => Ok(l),
            _ => Err(Error::UnsupportedSimd {
                requested: name,
                available: Self::available()
                    .iter()
                    .map(|l| l.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// `self`, checked against the CPU (a level built by hand may not be runnable).
    pub fn checked(self) -> Result<SimdLevel> {
        if self.is_available() {
            Ok(self)
        } else {
            Err(Error::UnsupportedSimd {
                requested: self.name().to_owned(),
                available: Self::available()
                    .iter()
                    .map(|l| l.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    }
}

/// Whether the CPU's vendor string is AMD's ("AuthenticAMD"): the AVX2 kernels choose their
/// decode by it ([`crate::matmul::Avx2Decode`]).
pub fn cpu_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AMD.get_or_init(|| {
            // CPUID leaf 0 exists on every x86-64 CPU.
            let r = std::arch::x86_64::__cpuid(0);
            // The vendor string is in EBX, EDX, ECX: "Auth" "enti" "cAMD".
            [r.ebx, r.edx, r.ecx] == [0x6874_7541, 0x6974_6E65, 0x444D_4163]
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_and_names() {
        let avail = SimdLevel::available();
        assert_eq!(avail[0], SimdLevel::Portable);
        // A ladder: once a level is missing, every higher one is too.
        let n = avail.len();
        assert_eq!(&SimdLevel::ALL[..n], avail.as_slice());
        assert_eq!(SimdLevel::detect(), avail[n - 1]);
        for l in SimdLevel::ALL {
            match SimdLevel::parse(l.name()) {
                Ok(p) => assert!(p == l && l.is_available()),
                Err(Error::UnsupportedSimd { requested, .. }) => {
                    assert!(!l.is_available());
                    assert_eq!(requested, l.name());
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(SimdLevel::parse("auto").unwrap(), SimdLevel::detect());
        assert_eq!(
            SimdLevel::parse(" AVX2 ").ok(),
            SimdLevel::Avx2.checked().ok()
        );
        assert!(matches!(
            SimdLevel::parse("sse9"),
            Err(Error::UnsupportedSimd { .. })
        ));
    }
}
