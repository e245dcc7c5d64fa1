//! nybble-core: the CPU half of nybble, with no Python in it.
//!
//! - [`codebook`]: NF4, FP4 and the 8-bit dynamic map.
//! - [`blockwise`]: block-wise 4-bit and 8-bit quantization, bit-compatible with bitsandbytes.
//! - [`double_quant`]: QLoRA's double quantization of the block constants.
//! - [`gptq`]: GPTQ's error-compensating rounding into the same 4-bit layout.
//! - [`int8`]: absmax / zero-point int8 and LLM.int8()'s outlier handling.
//! - [`convert`]: streaming whole-checkpoint conversion to packed bitsandbytes layouts.
//! - [`optim`]: fused AdamW steps with 32-bit or 8-bit block-wise states.
//! - [`matmul`], [`int8_matmul`]: fused CPU matmuls with packed 4-bit / LLM.int8() weights,
//!   on the SIMD level of [`simd`] chosen at run time (`matmul_amx`: the AMX-BF16 tile kernel).
//! - [`stats`]: error statistics between two tensors.

pub mod blockwise;
pub mod codebook;
pub mod convert;
pub mod double_quant;
pub mod element;
pub mod error;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod gptq;
pub mod int8;
pub mod int8_matmul;
pub mod matmul;
#[cfg(target_arch = "x86_64")]
pub mod matmul_amx;
pub mod optim;
pub mod parallel;
pub mod safetensors;
pub mod simd;
pub mod stats;

pub use codebook::QuantType4;
pub use element::{Element, FloatDtype};
pub use error::{Error, Result};
