//! Floating-point element types the quantizers accept and produce.

use half::{bf16, f16};

/// The three floating dtypes of model weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatDtype {
    F32,
    F16,
    BF16,
}

impl FloatDtype {
    /// Parses the names numpy, torch and safetensors use.
    pub fn parse(name: &str) -> crate::Result<Self> {
        match name {
            "float32" | "f32" | "F32" | "fp32" => Ok(Self::F32),
            "float16" | "f16" | "F16" | "fp16" | "half" => Ok(Self::F16),
            "bfloat16" | "bf16" | "BF16" => Ok(Self::BF16),
            other => Err(crate::Error::UnknownDtype(other.to_string())),
        }
    }

    /// Name as written in bitsandbytes' quant_state JSON (torch's spelling without the prefix).
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// A float element convertible to and from f32 (round-to-nearest-even on the way down).
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: FloatDtype;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: FloatDtype = FloatDtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: FloatDtype = FloatDtype::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const DTYPE: FloatDtype = FloatDtype::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // A bfloat16 is the top half of an f32: widening is a shift.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// Index and value of the first non-finite element, if any.
pub fn first_non_finite<T: Element>(x: &[T]) -> Option<(usize, f32)> {
    x.iter()
        .map(|v| v.to_f32())
        .enumerate()
        .find(|(_, v)| !v.is_finite())
}
