//! nybble-core: the CPU half of nybble, with no Python in it.
//!
//! - [`codebook`]: NF4, FP4 and the 8-bit dynamic map.
//! - [`blockwise`]: block-wise 4-bit and 8-bit quantization, bit-compatible with bitsandbytes.
//! - [`double_quant`]: QLoRA's double quantization of the block constants.
//! - [`int8`]: absmax / zero-point int8 and LLM.int8()'s outlier handling.
//! - [`convert`]: streaming whole-checkpoint conversion to packed bitsandbytes layouts.
//! - [`optim`]: fused AdamW steps with 32-bit or 8-bit block-wise states.
//! - [`stats`]: error statistics between two tensors.

pub mod blockwise;
pub mod codebook;
pub mod convert;
pub mod double_quant;
pub mod element;
pub mod error;
pub mod int8;
pub mod optim;
pub mod safetensors;
pub mod stats;

pub use codebook::QuantType4;
pub use element::{Element, FloatDtype};
pub use error::{Error, Result};
