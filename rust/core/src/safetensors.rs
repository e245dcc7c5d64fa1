//! safetensors reading (memory-mapped, fully validated) and atomic writing.

/// A malformed safetensors file: one variant per defect.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {}
