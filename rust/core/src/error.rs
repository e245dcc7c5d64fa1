//! One error variant per failure a caller can act on.

use std::path::PathBuf;

/// Every failure the core reports. Messages name the offending value or place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("blocksize {0} is not supported: use a power of two from 32 to 4096")]
    InvalidBlocksize(usize),

    #[error("input holds a non-finite value ({value}) at flat index {index}; quantization needs finite numbers")]
    NonFinite { index: usize, value: f32 },

    #[error("{what}: expected {expected} elements, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },

    #[error("codebook must hold {expected} finite values sorted ascending ({problem})")]
    InvalidCodebook {
        expected: usize,
        problem: &'static str,
    },

    #[error("shape {rows}x{cols} needs {needed} elements but the input has {len}")]
    ShapeMismatch {
        rows: usize,
        cols: usize,
        needed: usize,
        len: usize,
    },

    #[error("outlier threshold must be finite and >= 0, got {0}")]
    InvalidThreshold(f32),

    #[error("invalid optimizer hyper-parameters: {0} (need lr >= 0, 0 <= betas < 1, eps >= 0, weight_decay >= 0, step >= 1)")]
    InvalidHyperParameter(String),

    #[error("size overflow computing {0}")]
    SizeOverflow(&'static str),

    #[error("unknown quantization type {0:?}: expected \"nf4\" or \"fp4\"")]
    UnknownQuantType(String),

    #[error("unknown dtype {0:?}")]
    UnknownDtype(String),

    /// GPTQ was given an argument it cannot use (damping, lazy block size, absmax search,
    /// a Hessian with a non-finite entry, fixed absmax values).
    #[error("GPTQ: {0}")]
    InvalidGptqArgument(String),

    /// GPTQ's damped Hessian is not positive definite: its Cholesky factorization met a pivot
    /// that is not > 0 at `column` (of the layer input). More damping fixes it.
    #[error("GPTQ: the damped Hessian is not positive definite (pivot {pivot:e} at input column {column}, damping {damp:e}); raise damp")]
    NotPositiveDefinite {
        column: usize,
        pivot: f64,
        damp: f64,
    },

    /// A fused-matmul SIMD level that is unknown or that this CPU cannot run.
    #[error(
        "SIMD level {requested:?} is unknown or not supported by this CPU; available: {available}"
    )]
    UnsupportedSimd {
        requested: String,
        available: String,
    },

    #[error("{path}: {source}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: crate::safetensors::FormatError,
    },

    /// The caller asked [`SafetensorsWriter`](crate::safetensors::SafetensorsWriter) for
    /// something it cannot write (a bad plan, wrong order or size, a missing tensor): a
    /// programming error, not a damaged file, so it is kept apart from [`Error::Safetensors`].
    #[error("{path}: {source}")]
    WriterMisuse {
        path: PathBuf,
        #[source]
        source: crate::safetensors::FormatError,
    },

    #[error("{path}: tensor {tensor:?}: {source}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        #[source]
        source: Box<Error>,
    },

    #[error("{path}: tensor {tensor:?} ({dtype} {shape:?}) cannot be quantized: only 2-D float32 / float16 / bfloat16 tensors can")]
    NotQuantizable {
        path: PathBuf,
        tensor: String,
        dtype: &'static str,
        shape: Vec<usize>,
    },

    #[error("tensor {tensor:?} is in both {first} and {second}")]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },

    #[error("output tensor {output:?} would be written for both {first:?} and {second:?} (is the input already quantized?)")]
    OutputNameClash {
        output: String,
        first: String,
        second: String,
    },

    #[error("{path}: invalid checkpoint index: {reason}")]
    InvalidIndex { path: PathBuf, reason: String },

    #[error("{path}: no model.safetensors or model.safetensors.index.json in this folder")]
    NoCheckpoint { path: PathBuf },

    /// A FIFO, socket, device or other non-regular file given as input: refused before it is
    /// opened for reading (opening a FIFO would block until a writer appears).
    #[error(
        "{path}: not a regular file ({kind}); nybble reads checkpoints from regular files only"
    )]
    NotRegularFile { path: PathBuf, kind: &'static str },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Block sizes bitsandbytes supports for block-wise quantization.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if (32..=4096).contains(&blocksize) && blocksize.is_power_of_two() {
        Ok(())
    } else {
        Err(Error::InvalidBlocksize(blocksize))
    }
}

/// A buffer of the wrong length, named for the error message.
pub fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

/// Number of blocks covering `n` elements (the last block may be partial).
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}
