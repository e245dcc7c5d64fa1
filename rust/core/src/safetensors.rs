//! safetensors reading (memory-mapped, fully validated) and atomic writing.
//!
//! Layout of a file: an 8-byte little-endian `u64` N, then N bytes of UTF-8 JSON (the header,
//! possibly padded with trailing spaces), then the data buffer. The header maps each tensor
//! name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the data
//! buffer) and may hold `"__metadata__"`, an object of string to string.
//!
//! [`parse_header`] checks everything a reader relies on: once it succeeds, every tensor's
//! bytes lie inside the file, the tensors tile the data buffer exactly (no gap, no overlap,
//! nothing left over), and each byte range matches its shape and dtype. [`SafetensorsWriter`]
//! streams tensors into a temporary file beside the target and renames it into place only
//! when every tensor has been written, so a failed or interrupted write leaves nothing behind.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufWriter, Write};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::element::FloatDtype;
use crate::error::{Error, Result};

/// Largest header accepted (and written), as in the reference implementation: a bound on the
/// memory a hostile file can make the JSON parser allocate.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Size of the little-endian header-length prefix.
const LEN_PREFIX: usize = 8;

/// Reserved top-level key holding the free-form string metadata.
const METADATA_KEY: &str = "__metadata__";

/// The writer pads the header so the data buffer starts at a multiple of this.
const DATA_ALIGN: usize = 8;

/// A malformed safetensors file (reported as [`Error::Safetensors`]) or a misuse of
/// [`SafetensorsWriter`] (reported as [`Error::WriterMisuse`]): one variant per defect.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    // The first seven variants are what any other kind of file (a README, a pickle, a
    // tokenizer) runs into: their messages say so first, and never present arbitrary first
    // bytes as if they were a header length.
    #[error("not a safetensors file: {len} bytes long, too short for the 8-byte header length")]
    FileTooShort { len: usize },

    #[error("not a safetensors file: the 8-byte header length prefix reads {len}, too small for a JSON header")]
    HeaderTooSmall { len: u64 },

    #[error("not a safetensors file: its first 8 bytes are not a header length (read as one, they exceed the limit of {MAX_HEADER_LEN} bytes)")]
    HeaderTooLarge { len: u64 },

    #[error("not a safetensors file, or a truncated one: the header length prefix ({len} bytes) runs past the end of the file ({available} bytes follow it)")]
    HeaderOutOfBounds { len: u64, available: usize },

    #[error("not a safetensors file: header is not valid UTF-8")]
    HeaderNotUtf8(#[source] std::str::Utf8Error),

    #[error("not a safetensors file: header is not valid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),

    #[error("not a safetensors file: header must be a JSON object, found {found}")]
    HeaderNotObject { found: &'static str },

    /// The writer's counterpart of [`FormatError::HeaderTooLarge`].
    #[error("the header to write is {len} bytes, above the limit of {MAX_HEADER_LEN} bytes")]
    WriteHeaderTooLarge { len: u64 },

    #[error("invalid __metadata__: {reason}")]
    InvalidMetadata { reason: String },

    #[error("tensor {name:?}: invalid header entry: {reason}")]
    InvalidTensorEntry { name: String, reason: String },

    #[error("tensor {name:?}: unknown dtype {dtype:?}")]
    UnknownDtype { name: String, dtype: String },

    #[error("tensor {name:?} appears more than once")]
    DuplicateTensorName { name: String },

    #[error("tensor {name:?}: data_offsets [{begin}, {end}] end before they begin")]
    OffsetsReversed {
        name: String,
        begin: usize,
        end: usize,
    },

    #[error("tensor {name:?}: byte size of shape {shape:?} x {dtype} overflows")]
    SizeOverflow {
        name: String,
        dtype: Dtype,
        shape: Vec<usize>,
    },

    #[error(
        "tensor {name:?}: shape and dtype need {expected} bytes but data_offsets span {actual}"
    )]
    SizeMismatch {
        name: String,
        expected: usize,
        actual: usize,
    },

    #[error("tensor {name:?}: the first tensor must start at offset 0, it starts at {begin}")]
    FirstTensorNotAtStart { name: String, begin: usize },

    #[error("tensor {name:?} starts at {begin}, leaving a gap after {previous:?} which ends at {previous_end}")]
    Gap {
        name: String,
        begin: usize,
        previous: String,
        previous_end: usize,
    },

    #[error(
        "tensor {name:?} starts at {begin}, overlapping {previous:?} which ends at {previous_end}"
    )]
    Overlap {
        name: String,
        begin: usize,
        previous: String,
        previous_end: usize,
    },

    #[error("tensor {name:?} ends at data offset {end} but the data buffer holds only {data_len} bytes (truncated file?)")]
    DataTruncated {
        name: String,
        end: usize,
        data_len: usize,
    },

    #[error("data buffer holds {data_len} bytes but the tensors cover only {covered}")]
    TrailingBytes { data_len: usize, covered: usize },

    #[error("tensor name {METADATA_KEY:?} is reserved for the metadata")]
    ReservedName,

    #[error("write_tensor({got:?}) out of order: tensor {expected:?} comes next")]
    WriteOutOfOrder { expected: String, got: String },

    #[error("write_tensor({name:?}): expected {expected} bytes, got {got}")]
    WriteSizeMismatch {
        name: String,
        expected: usize,
        got: usize,
    },

    #[error("write_tensor({name:?}): all {declared} declared tensors are already written")]
    WriteTooMany { name: String, declared: usize },

    #[error("finish() with {written} of {declared} tensors written; {next:?} is missing")]
    MissingTensors {
        next: String,
        written: usize,
        declared: usize,
    },
}

impl FormatError {
    /// The tensor the defect belongs to, when it is one tensor's (for the Python attribute).
    pub fn tensor(&self) -> Option<&str> {
        match self {
            Self::InvalidTensorEntry { name, .. }
            | Self::UnknownDtype { name, .. }
            | Self::DuplicateTensorName { name }
            | Self::OffsetsReversed { name, .. }
            | Self::SizeOverflow { name, .. }
            | Self::SizeMismatch { name, .. }
            | Self::FirstTensorNotAtStart { name, .. }
            | Self::Gap { name, .. }
            | Self::Overlap { name, .. }
            | Self::DataTruncated { name, .. }
            | Self::WriteSizeMismatch { name, .. }
            | Self::WriteTooMany { name, .. } => Some(name),
            Self::WriteOutOfOrder { got, .. } => Some(got),
            Self::MissingTensors { next, .. } => Some(next),
            Self::FileTooShort { .. }
            | Self::HeaderTooSmall { .. }
            | Self::HeaderTooLarge { .. }
            | Self::WriteHeaderTooLarge { .. }
            | Self::HeaderOutOfBounds { .. }
            | Self::HeaderNotUtf8(_)
            | Self::InvalidJson(_)
            | Self::HeaderNotObject { .. }
            | Self::InvalidMetadata { .. }
            | Self::TrailingBytes { .. }
            | Self::ReservedName => None,
        }
    }
}

/// Element types of the safetensors format (the sub-byte F4 / F6 types are not supported).
///
/// Variant names are the strings the format uses.
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    BOOL,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    F8_E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
}

impl Dtype {
    /// Every supported dtype.
    pub const ALL: [Dtype; 17] = [
        Dtype::BOOL,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8_E5M2,
        Dtype::F8_E4M3,
        Dtype::F8_E8M0,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::C64,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// Parses the name used in safetensors headers (exact, case-sensitive).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|dtype| dtype.name() == name)
    }

    /// The name used in safetensors headers.
    pub fn name(&self) -> &'static str {
        match self {
            Dtype::BOOL => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::F8_E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::C64 => "C64",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// Bytes per element.
    pub fn size_bytes(&self) -> usize {
        match self {
            Dtype::BOOL | Dtype::U8 | Dtype::I8 => 1,
            Dtype::F8_E5M2 | Dtype::F8_E4M3 | Dtype::F8_E8M0 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::C64 | Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }

    /// The model-weight float type this dtype stores, if it is one.
    pub fn float_dtype(&self) -> Option<FloatDtype> {
        match self {
            Dtype::F32 => Some(FloatDtype::F32),
            Dtype::F16 => Some(FloatDtype::F16),
            Dtype::BF16 => Some(FloatDtype::BF16),
            _ => None,
        }
    }
}

impl From<FloatDtype> for Dtype {
    fn from(dtype: FloatDtype) -> Self {
        match dtype {
            FloatDtype::F32 => Dtype::F32,
            FloatDtype::F16 => Dtype::F16,
            FloatDtype::BF16 => Dtype::BF16,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range `[begin, end)` relative to the start of the data buffer.
    pub data_offsets: (usize, usize),
}

impl TensorInfo {
    /// Product of the shape (1 for a scalar). Exact for entries from [`parse_header`], which
    /// rejects sizes that overflow; saturates for hand-built entries.
    pub fn num_elements(&self) -> usize {
        self.shape.iter().fold(1usize, |n, &d| n.saturating_mul(d))
    }

    /// Bytes the shape and dtype need; equals the span of `data_offsets` for parsed entries.
    pub fn num_bytes(&self) -> usize {
        self.num_elements().saturating_mul(self.dtype.size_bytes())
    }

    /// Exact byte size, or `None` when it does not fit in `usize`.
    fn checked_num_bytes(dtype: Dtype, shape: &[usize]) -> Option<usize> {
        shape
            .iter()
            .try_fold(dtype.size_bytes(), |n, &d| n.checked_mul(d))
    }
}

/// A validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Tensors sorted by data offset (the order their bytes appear in the file).
    pub tensors: Vec<(String, TensorInfo)>,
    /// The `__metadata__` object, if the header has one (a JSON `null` counts as none).
    pub metadata: Option<BTreeMap<String, String>>,
    /// Absolute file offset of the data buffer (8 + header length).
    pub data_start: usize,
}

impl Header {
    /// Length of the data buffer: the end of the last tensor.
    pub fn data_len(&self) -> usize {
        self.tensors
            .last()
            .map_or(0, |(_, info)| info.data_offsets.1)
    }
}

/// Parses and fully validates the header of a safetensors file.
///
/// `bytes` is the whole file (a memory map or an in-memory buffer). On success, for every
/// tensor `bytes[data_start + begin..data_start + end]` is in bounds, `end - begin` equals
/// shape x dtype size, and the tensors tile `bytes[data_start..]` exactly.
pub fn parse_header(bytes: &[u8]) -> std::result::Result<Header, FormatError> {
    let Some((prefix, rest)) = bytes.split_first_chunk::<LEN_PREFIX>() else {
        return Err(FormatError::FileTooShort { len: bytes.len() });
    };
    let len = u64::from_le_bytes(*prefix);
    if len < 2 {
        return Err(FormatError::HeaderTooSmall { len });
    }
    if len > MAX_HEADER_LEN {
        return Err(FormatError::HeaderTooLarge { len });
    }
    // `len` fits in usize: it is at most MAX_HEADER_LEN.
    let header_len = len as usize;
    if header_len > rest.len() {
        return Err(FormatError::HeaderOutOfBounds {
            len,
            available: rest.len(),
        });
    }
    let (header_bytes, data) = rest.split_at(header_len);
    let text = std::str::from_utf8(header_bytes).map_err(FormatError::HeaderNotUtf8)?;

    let root = match parse_json_strict(text)? {
        (Value::Object(root), None) => root,
        (Value::Object(_), Some(duplicate)) => return Err(duplicate.into_error()),
        (other, _) => {
            return Err(FormatError::HeaderNotObject {
                found: json_kind(&other),
            })
        }
    };

    let mut metadata = None;
    let mut tensors = Vec::with_capacity(root.len());
    for (name, value) in root {
        if name == METADATA_KEY {
            metadata = parse_metadata(value)?;
        } else {
            let info = parse_entry(&name, value)?;
            tensors.push((name, info));
        }
    }

    // Stable sort: zero-sized tensors sharing an offset keep their header order.
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    check_layout(&tensors, data.len())?;

    Ok(Header {
        tensors,
        metadata,
        data_start: LEN_PREFIX + header_len,
    })
}

/// Checks one entry on its own: field types, dtype, offsets order and size agreement.
fn parse_entry(name: &str, value: Value) -> std::result::Result<TensorInfo, FormatError> {
    let invalid = |reason: String| FormatError::InvalidTensorEntry {
        name: name.to_owned(),
        reason,
    };
    let Value::Object(fields) = value else {
        return Err(invalid(format!(
            "expected an object, found {}",
            json_kind(&value)
        )));
    };
    let field = |key: &str| {
        fields
            .get(key)
            .ok_or_else(|| invalid(format!("missing field {key:?}")))
    };

    let Value::String(dtype_name) = field("dtype")? else {
        return Err(invalid("\"dtype\" must be a string".into()));
    };
    let shape = match field("shape")? {
        Value::Array(dims) => dims.iter().map(json_usize).collect::<Option<Vec<_>>>(),
        _ => None,
    }
    .ok_or_else(|| invalid("\"shape\" must be an array of non-negative integers".into()))?;
    let (begin, end) = match field("data_offsets")? {
        Value::Array(pair) if pair.len() == 2 => json_usize(&pair[0]).zip(json_usize(&pair[1])),
        _ => None,
    }
    .ok_or_else(|| {
        invalid("\"data_offsets\" must be an array of two non-negative integers".into())
    })?;
    // Unknown fields are ignored, as the reference implementation does.

    let dtype = Dtype::parse(dtype_name).ok_or_else(|| FormatError::UnknownDtype {
        name: name.to_owned(),
        dtype: dtype_name.clone(),
    })?;
    if begin > end {
        return Err(FormatError::OffsetsReversed {
            name: name.to_owned(),
            begin,
            end,
        });
    }
    let expected =
        TensorInfo::checked_num_bytes(dtype, &shape).ok_or_else(|| FormatError::SizeOverflow {
            name: name.to_owned(),
            dtype,
            shape: shape.clone(),
        })?;
    if expected != end - begin {
        return Err(FormatError::SizeMismatch {
            name: name.to_owned(),
            expected,
            actual: end - begin,
        });
    }
    Ok(TensorInfo {
        dtype,
        shape,
        data_offsets: (begin, end),
    })
}

/// `__metadata__` must be an object of strings; `null` is accepted as "no metadata" for
/// compatibility with the reference implementation.
fn parse_metadata(
    value: Value,
) -> std::result::Result<Option<BTreeMap<String, String>>, FormatError> {
    let fields = match value {
        Value::Null => return Ok(None),
        Value::Object(fields) => fields,
        other => {
            return Err(FormatError::InvalidMetadata {
                reason: format!("expected an object, found {}", json_kind(&other)),
            })
        }
    };
    fields
        .into_iter()
        .map(|(key, value)| match value {
            Value::String(s) => Ok((key, s)),
            other => Err(FormatError::InvalidMetadata {
                reason: format!(
                    "value of {key:?} must be a string, found {}",
                    json_kind(&other)
                ),
            }),
        })
        .collect::<std::result::Result<_, _>>()
        .map(Some)
}

/// Checks that the tensors, sorted by offset, tile `[0, data_len)` exactly.
fn check_layout(
    tensors: &[(String, TensorInfo)],
    data_len: usize,
) -> std::result::Result<(), FormatError> {
    let mut previous: Option<(&str, usize)> = None;
    for (name, info) in tensors {
        let (begin, end) = info.data_offsets;
        match previous {
            None if begin != 0 => {
                return Err(FormatError::FirstTensorNotAtStart {
                    name: name.clone(),
                    begin,
                })
            }
            Some((prev, prev_end)) if begin != prev_end => {
                let (name, previous) = (name.clone(), prev.to_owned());
                return Err(if begin > prev_end {
                    FormatError::Gap {
                        name,
                        begin,
                        previous,
                        previous_end: prev_end,
                    }
                } else {
                    FormatError::Overlap {
                        name,
                        begin,
                        previous,
                        previous_end: prev_end,
                    }
                });
            }
            _ => {}
        }
        if end > data_len {
            return Err(FormatError::DataTruncated {
                name: name.clone(),
                end,
                data_len,
            });
        }
        previous = Some((name, end));
    }
    let covered = previous.map_or(0, |(_, end)| end);
    if covered != data_len {
        return Err(FormatError::TrailingBytes { data_len, covered });
    }
    Ok(())
}

fn json_usize(value: &Value) -> Option<usize> {
    value.as_u64().and_then(|n| usize::try_from(n).ok())
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------------------------
// Strict JSON: serde_json's maps keep one value per key and drop repeats silently, which would
// let a file name a tensor twice with different offsets. This seed builds the same `Value` but
// records the first repeated key, and where it sits, so it can be reported precisely.

/// The first key found twice in one JSON object.
struct Duplicate {
    /// Top-level key the object sits under; `None` for the top-level object itself.
    under: Option<String>,
    key: String,
}

impl Duplicate {
    fn into_error(self) -> FormatError {
        match self.under.as_deref() {
            None if self.key == METADATA_KEY => FormatError::InvalidMetadata {
                reason: "it appears more than once".into(),
            },
            None => FormatError::DuplicateTensorName { name: self.key },
            Some(METADATA_KEY) => FormatError::InvalidMetadata {
                reason: format!("key {:?} appears more than once", self.key),
            },
            Some(name) => FormatError::InvalidTensorEntry {
                name: name.to_owned(),
                reason: format!("field {:?} appears more than once", self.key),
            },
        }
    }
}

#[derive(Clone, Copy)]
enum Position<'a> {
    Root,
    Under(&'a str),
}

/// Deserializes any JSON value into a `Value`, noting the first duplicate key in `duplicate`.
/// Parsing goes on past a duplicate so that a syntax error later in the text still wins.
#[derive(Clone, Copy)]
struct StrictValue<'a> {
    duplicate: &'a RefCell<Option<Duplicate>>,
    position: Position<'a>,
}

fn parse_json_strict(text: &str) -> std::result::Result<(Value, Option<Duplicate>), FormatError> {
    parse_json_noting_duplicate(text).map_err(FormatError::InvalidJson)
}

fn parse_json_noting_duplicate(
    text: &str,
) -> std::result::Result<(Value, Option<Duplicate>), serde_json::Error> {
    let duplicate = RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = StrictValue {
        duplicate: &duplicate,
        position: Position::Root,
    }
    .deserialize(&mut deserializer)
    .and_then(|value| deserializer.end().map(|()| value))?;
    Ok((value, duplicate.into_inner()))
}

/// A duplicated JSON key: the top-level key its object sits under (None for the top level
/// itself), and the key.
pub(crate) type DuplicateKey = (Option<String>, String);

/// Parses JSON as the header parser does (nesting depth bounded, so hostile input cannot
/// overflow the stack) and also returns the first duplicated key, as `(the top-level key its
/// object sits under, or None for the top level itself; the key)`: plain JSON parsers keep the
/// last of duplicated keys silently.
pub(crate) fn parse_json_with_duplicate(
    text: &str,
) -> std::result::Result<(Value, Option<DuplicateKey>), serde_json::Error> {
    let (value, duplicate) = parse_json_noting_duplicate(text)?;
    Ok((value, duplicate.map(|d| (d.under, d.key))))
}

impl<'de> DeserializeSeed<'de> for StrictValue<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<Value, D::Error> {
        // serde_json bounds nesting depth (128) inside deserialize_any, so this recursion
        // cannot overflow the stack on hostile input.
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Value, E> {
        // JSON text cannot spell NaN or infinity, so this is always a number.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let position = match self.position {
                Position::Root => Position::Under(&key),
                under => under,
            };
            let value = map.next_value_seed(StrictValue {
                duplicate: self.duplicate,
                position,
            })?;
            if fields.contains_key(&key) {
                let mut first = self.duplicate.borrow_mut();
                if first.is_none() {
                    *first = Some(Duplicate {
                        under: match self.position {
                            Position::Root => None,
                            Position::Under(name) => Some(name.to_owned()),
                        },
                        key,
                    });
                }
            } else {
                fields.insert(key, value);
            }
        }
        Ok(Value::Object(fields))
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

/// What kind of non-regular file `t` is, for messages.
pub fn file_kind(t: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// Opens `path` (symlinks followed) for reading if it is a regular file, and refuses anything
/// else with [`Error::NotRegularFile`] before reading a byte: a FIFO would block forever (and
/// ignore Ctrl-C), a device would stream endlessly. The type is checked on the path first, then
/// again on the open handle (the path may have changed in between); the open itself uses
/// `O_NONBLOCK`, so even a FIFO swapped in at that moment cannot block it. On a regular file the
/// flag changes nothing.
pub fn open_regular(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let io_error = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let not_regular = |t: fs::FileType| Error::NotRegularFile {
        path: path.to_owned(),
        kind: file_kind(t),
    };
    let kind = fs::metadata(path).map_err(io_error)?.file_type();
    if !kind.is_file() {
        return Err(not_regular(kind));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io_error)?;
    let kind = file.metadata().map_err(io_error)?.file_type();
    if !kind.is_file() {
        return Err(not_regular(kind));
    }
    Ok(file)
}

/// Reads a small regular file (an index or config JSON) of at most `limit` bytes as UTF-8.
pub fn read_small_text(path: &Path, limit: u64) -> Result<String> {
    use std::io::Read;
    let io_error = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() as u64 > limit {
        return Err(io_error(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than the {limit}-byte limit for this file"),
        )));
    }
    String::from_utf8(bytes).map_err(|_| {
        io_error(io::Error::new(
            io::ErrorKind::InvalidData,
            "not valid UTF-8",
        ))
    })
}

enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for Storage {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(map) => map,
            Storage::Owned(bytes) => bytes,
        }
    }
}

/// A safetensors file with a validated header; tensor bytes are borrowed, never copied.
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Storage,
    header: Header,
    /// Name -> index into `header.tensors`.
    index: HashMap<String, usize>,
}

impl SafetensorsFile {
    /// Memory-maps `path` and validates its header.
    ///
    /// As with any memory map, the file must not be truncated or rewritten in place while
    /// this value lives (nybble's own writer replaces files by rename, which is safe).
    pub fn open(path: &Path) -> Result<Self> {
        let io_error = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        let file = open_regular(path)?;
        // SAFETY: the map is read-only and private to this value; see the caveat above about
        // concurrent modification, which no Rust-side API can rule out for a shared file.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_error)?;
        Self::new(path.to_owned(), Storage::Mapped(map)).map_err(|source| Error::Safetensors {
            path: path.to_owned(),
            source,
        })
    }

    /// Validates a file held in memory; [`path`](Self::path) is then empty.
    pub fn from_bytes(bytes: Vec<u8>) -> std::result::Result<Self, FormatError> {
        Self::new(PathBuf::new(), Storage::Owned(bytes))
    }

    fn new(path: PathBuf, bytes: Storage) -> std::result::Result<Self, FormatError> {
        let header = parse_header(&bytes)?;
        let index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (name.clone(), i))
            .collect();
        Ok(Self {
            path,
            bytes,
            header,
            index,
        })
    }

    /// The path this file was opened from (empty for [`from_bytes`](Self::from_bytes)).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Tensor names in data-offset order.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.header.tensors.iter().map(|(name, _)| name.as_str())
    }

    /// Tensors in data-offset order.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = (&str, &TensorInfo)> + '_ {
        self.header
            .tensors
            .iter()
            .map(|(name, info)| (name.as_str(), info))
    }

    pub fn len(&self) -> usize {
        self.header.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.header.tensors.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.header.tensors[i].1)
    }

    /// The raw little-endian bytes of tensor `name`.
    pub fn data(&self, name: &str) -> Option<&[u8]> {
        self.info(name).map(|info| self.slice(info))
    }

    /// Header entry and bytes of tensor `name` together.
    pub fn tensor(&self, name: &str) -> Option<(&TensorInfo, &[u8])> {
        self.info(name).map(|info| (info, self.slice(info)))
    }

    pub fn metadata(&self) -> Option<&BTreeMap<String, String>> {
        self.header.metadata.as_ref()
    }

    fn slice(&self, info: &TensorInfo) -> &[u8] {
        // In bounds and overflow-free: parse_header checked data_start + end <= file length.
        let (begin, end) = info.data_offsets;
        &self.bytes[self.header.data_start + begin..self.header.data_start + end]
    }
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.header.tensors.len())
            .field("data_start", &self.header.data_start)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Encodes the length prefix and space-padded header for `tensors` laid out back to back in the
/// given order. Returns the bytes and each tensor's size.
fn encode_header(
    tensors: &[(String, Dtype, Vec<usize>)],
    metadata: Option<&BTreeMap<String, String>>,
) -> std::result::Result<(Vec<u8>, Vec<usize>), FormatError> {
    let mut root = Map::new();
    if let Some(metadata) = metadata {
        let fields = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        root.insert(METADATA_KEY.to_owned(), Value::Object(fields));
    }
    let mut sizes = Vec::with_capacity(tensors.len());
    let mut seen = HashSet::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, dtype, shape) in tensors {
        if name == METADATA_KEY {
            return Err(FormatError::ReservedName);
        }
        if !seen.insert(name.as_str()) {
            return Err(FormatError::DuplicateTensorName { name: name.clone() });
        }
        let overflow = || FormatError::SizeOverflow {
            name: name.clone(),
            dtype: *dtype,
            shape: shape.clone(),
        };
        let size = TensorInfo::checked_num_bytes(*dtype, shape).ok_or_else(overflow)?;
        let end = offset.checked_add(size).ok_or_else(overflow)?;
        let mut entry = Map::new();
        entry.insert("dtype".into(), dtype.name().into());
        entry.insert("shape".into(), shape.clone().into());
        entry.insert("data_offsets".into(), vec![offset, end].into());
        root.insert(name.clone(), Value::Object(entry));
        sizes.push(size);
        offset = end;
    }

    // Compact JSON, metadata first, entries as dtype/shape/data_offsets: the same text the
    // reference implementation writes for the same tensor order.
    let mut json = Value::Object(root).to_string().into_bytes();
    let padded = (LEN_PREFIX + json.len()).next_multiple_of(DATA_ALIGN) - LEN_PREFIX;
    json.resize(padded, b' ');
    let len = json.len() as u64;
    if len > MAX_HEADER_LEN {
        return Err(FormatError::WriteHeaderTooLarge { len });
    }
    let mut out = Vec::with_capacity(LEN_PREFIX + json.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&json);
    Ok((out, sizes))
}

/// A temporary file that deletes itself unless disarmed.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: there is no one to report a failure to during drop or unwinding.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A name no other writer in any process is using: pid, plus a per-process random key and a
/// counter hashed together.
fn temp_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("tmp-{}-{:016x}", std::process::id(), hasher.finish())
}

/// Creates `.{file name}.tmp-{pid}-{random}` beside `path`, so the final rename stays within
/// one file system and is atomic.
fn create_temp(path: &Path) -> io::Result<(TempFile, File)> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "output path has no file name")
    })?;
    // A clash needs the same pid and a 64-bit random collision; retrying a few times only
    // guards against that, and the bound keeps a misbehaving file system from looping forever.
    let mut last_error = None;
    for _ in 0..16 {
        let mut name = OsString::from(".");
        name.push(file_name);
        name.push(".");
        name.push(temp_suffix());
        let temp_path = path.with_file_name(name);
        // create_new: never clobber someone else's file.
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)
        {
            Ok(file) => {
                let guard = TempFile {
                    path: temp_path,
                    armed: true,
                };
                return Ok((guard, file));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_error.unwrap_or_else(|| io::ErrorKind::AlreadyExists.into()))
}

/// Streams a safetensors file to disk: the header is fixed up front, then each tensor's bytes
/// are written in declared order, then [`finish`](Self::finish) renames the file into place.
///
/// Until `finish` succeeds the output lives in a hidden temporary file beside the target,
/// which is deleted if the writer is dropped (error, panic, interrupt), so `path` never holds a
/// partial file.
pub struct SafetensorsWriter {
    // Declared before `temp` so the handle is closed before the guard deletes the file.
    out: BufWriter<File>,
    temp: TempFile,
    path: PathBuf,
    plan: Vec<(String, usize)>,
    written: usize,
    /// Bytes of tensor `written` already appended by [`write_tensor_part`](Self::write_tensor_part).
    partial: usize,
    /// File offset up to which [`start_writeback`](Self::start_writeback) has asked the
    /// kernel to write the data out, and the offset of the next byte appended.
    writeback_from: u64,
    position: u64,
    /// Set after an I/O error: the temp file's contents are then unknown and must not be kept.
    poisoned: bool,
}

impl SafetensorsWriter {
    /// Lays out `tensors` (name, dtype, shape) back to back in the given order, creates the
    /// temporary file and writes the header. The data buffer starts 8-byte aligned.
    pub fn create(
        path: &Path,
        tensors: Vec<(String, Dtype, Vec<usize>)>,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<Self> {
        let (header, sizes) =
            // A plan that cannot be laid out (duplicate or reserved name, overflow) is the
        // caller's mistake, not a corrupt file.
        encode_header(&tensors, metadata.as_ref()).map_err(|source| Error::WriterMisuse {
                path: path.to_owned(),
                source,
            })?;
        let io_error = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        let (temp, file) = create_temp(path).map_err(io_error)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&header).map_err(io_error)?;
        let position = header.len() as u64;
        let plan = tensors
            .into_iter()
            .zip(sizes)
            .map(|((name, _, _), size)| (name, size))
            .collect();
        Ok(Self {
            out,
            temp,
            path: path.to_owned(),
            plan,
            written: 0,
            partial: 0,
            writeback_from: 0,
            position,
            poisoned: false,
        })
    }

    /// The final path (written only by a successful [`finish`](Self::finish)).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary file being written.
    pub fn temp_path(&self) -> &Path {
        &self.temp.path
    }

    /// Name of the tensor `write_tensor` expects next, `None` once all are written.
    pub fn next_tensor(&self) -> Option<&str> {
        self.plan.get(self.written).map(|(name, _)| name.as_str())
    }

    /// Appends the bytes of the next declared tensor. `name` must be that tensor and `data`
    /// exactly its size; on such a misuse nothing is written and the writer stays usable.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.check_healthy()?;
        if self.partial > 0 {
            // Only the rest of a tensor begun with write_tensor_part may follow.
            let expected = self.plan[self.written].1 - self.partial;
            return Err(self.misuse(FormatError::WriteSizeMismatch {
                name: name.to_owned(),
                expected,
                got: data.len(),
            }));
        }
        let expected_size = self.next_planned_size(name)?;
        if data.len() != expected_size {
            return Err(self.misuse(FormatError::WriteSizeMismatch {
                name: name.to_owned(),
                expected: expected_size,
                got: data.len(),
            }));
        }
        self.append(data)?;
        self.written += 1;
        Ok(())
    }

    /// The size of the tensor the plan has next, which must be `name` (else a misuse error).
    fn next_planned_size(&self, name: &str) -> Result<usize> {
        let (expected_name, size) = match self.plan.get(self.written) {
            Some((n, s)) => (n.as_str(), *s),
            None => {
                return Err(self.misuse(FormatError::WriteTooMany {
                    name: name.to_owned(),
                    declared: self.plan.len(),
                }))
            }
        };
        if name != expected_name {
            return Err(self.misuse(FormatError::WriteOutOfOrder {
                expected: expected_name.to_owned(),
                got: name.to_owned(),
            }));
        }
        Ok(size)
    }

    /// Writes `data` at the current position; an I/O failure poisons the writer.
    fn append(&mut self, data: &[u8]) -> Result<()> {
        if let Err(source) = self.out.write_all(data) {
            self.poisoned = true;
            return Err(self.io_error(source));
        }
        self.position += data.len() as u64;
        Ok(())
    }

    /// Appends the next piece of the next declared tensor, so a tensor can be streamed
    /// without ever holding all of it: the tensor counts as written once its pieces add up
    /// to its size. `name` must be that tensor and the pieces must not overrun it; on such a
    /// misuse nothing is written and the writer stays usable.
    pub fn write_tensor_part(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.check_healthy()?;
        let size = self.next_planned_size(name)?;
        if data.len() > size - self.partial {
            return Err(self.misuse(FormatError::WriteSizeMismatch {
                name: name.to_owned(),
                expected: size - self.partial,
                got: data.len(),
            }));
        }
        self.append(data)?;
        self.partial += data.len();
        if self.partial == size {
            self.partial = 0;
            self.written += 1;
        }
        Ok(())
    }

    /// Asks the kernel to start writing out what has been appended since the last call
    /// (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`: it does not wait), so that the
    /// fsync of [`finish`](Self::finish) finds little left to write. The buffered bytes are
    /// flushed first (a failure there poisons the writer); the hint itself is best effort.
    pub fn start_writeback(&mut self) -> Result<()> {
        self.check_healthy()?;
        if let Err(source) = self.out.flush() {
            self.poisoned = true;
            return Err(self.io_error(source));
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::io::AsRawFd;
            let (from, to) = (self.writeback_from, self.position);
            if to > from {
                // SAFETY: a plain syscall on an open descriptor; errors are ignored (a hint).
                unsafe {
                    libc::sync_file_range(
                        self.out.get_ref().as_raw_fd(),
                        from as libc::off64_t,
                        (to - from) as libc::off64_t,
                        libc::SYNC_FILE_RANGE_WRITE,
                    );
                }
            }
        }
        self.writeback_from = self.position;
        Ok(())
    }

    /// Bytes appended since the last [`start_writeback`](Self::start_writeback).
    pub fn unsynced_bytes(&self) -> u64 {
        self.position - self.writeback_from
    }

    /// Checks every tensor was written, flushes and fsyncs the data, then atomically renames
    /// the temporary file onto the target path (replacing any existing file).
    pub fn finish(self) -> Result<()> {
        self.check_healthy()?;
        if let Some((next, _)) = self.plan.get(self.written) {
            return Err(self.misuse(FormatError::MissingTensors {
                next: next.clone(),
                written: self.written,
                declared: self.plan.len(),
            }));
        }
        let Self {
            out,
            mut temp,
            path,
            ..
        } = self;
        let io_error = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = out.into_inner().map_err(|e| io_error(e.into_error()))?;
        // Data must be durable before the rename makes it visible under the final name.
        file.sync_all().map_err(io_error)?;
        drop(file);
        fs::rename(&temp.path, &path).map_err(io_error)?;
        temp.armed = false;
        sync_parent_dir(&path);
        Ok(())
    }

    fn check_healthy(&self) -> Result<()> {
        if self.poisoned {
            return Err(self.io_error(io::Error::other(
                "an earlier write to this file failed; the output is abandoned",
            )));
        }
        Ok(())
    }

    fn io_error(&self, source: io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn misuse(&self, source: FormatError) -> Error {
        Error::WriterMisuse {
            path: self.path.clone(),
            source,
        }
    }
}

impl fmt::Debug for SafetensorsWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsWriter")
            .field("path", &self.path)
            .field("temp_path", &self.temp.path)
            .field("written", &self.written)
            .field("declared", &self.plan.len())
            .finish_non_exhaustive()
    }
}

/// Makes the rename itself durable. Best effort: the new file is already in place, and some
/// platforms or file systems cannot sync a directory.
fn sync_parent_dir(path: &Path) {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Writes a whole file at once: `(name, dtype, shape, bytes)` per tensor, in file order.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(&str, Dtype, &[usize], &[u8])],
    metadata: Option<BTreeMap<String, String>>,
) -> Result<()> {
    let plan = tensors
        .iter()
        .map(|&(name, dtype, shape, _)| (name.to_owned(), dtype, shape.to_vec()))
        .collect();
    let mut writer = SafetensorsWriter::create(path, plan, metadata)?;
    for &(name, _, _, data) in tensors {
        writer.write_tensor(name, data)?;
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    use std::sync::atomic::AtomicUsize;

    /// A file from raw header text and `data_len` data bytes (0, 1, 2, ...).
    fn file_with(header: &str, data_len: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend((0..data_len).map(|i| i as u8));
        out
    }

    fn parse_err(header: &str, data_len: usize) -> FormatError {
        parse_header(&file_with(header, data_len)).expect_err("header should be rejected")
    }

    /// A valid in-memory file built by the writer's own header encoder.
    fn encoded_file(
        tensors: &[(&str, Dtype, &[usize])],
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Vec<u8> {
        let plan: Vec<_> = tensors
            .iter()
            .map(|&(n, d, s)| (n.to_owned(), d, s.to_vec()))
            .collect();
        let (mut out, sizes) = encode_header(&plan, metadata).unwrap();
        let total: usize = sizes.iter().sum();
        out.extend((0..total).map(|i| (i * 7 + 3) as u8));
        out
    }

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    // ---- one test per parse-time FormatError variant ------------------------------------

    #[test]
    fn file_too_short() {
        for len in 0..LEN_PREFIX {
            let err = parse_header(&vec![0u8; len]).unwrap_err();
            assert!(
                matches!(err, FormatError::FileTooShort { len: l } if l == len),
                "{err}"
            );
        }
    }

    #[test]
    fn header_too_small() {
        for n in [0u64, 1] {
            let mut bytes = n.to_le_bytes().to_vec();
            bytes.extend_from_slice(b"{}");
            let err = parse_header(&bytes).unwrap_err();
            assert!(matches!(err, FormatError::HeaderTooSmall { len } if len == n));
        }
    }

    #[test]
    fn header_too_large() {
        for n in [MAX_HEADER_LEN + 1, u64::MAX] {
            let mut bytes = n.to_le_bytes().to_vec();
            bytes.extend_from_slice(b"{}");
            let err = parse_header(&bytes).unwrap_err();
            assert!(matches!(err, FormatError::HeaderTooLarge { len } if len == n));
        }
    }

    #[test]
    fn header_out_of_bounds() {
        let mut bytes = 10u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}   ");
        let err = parse_header(&bytes).unwrap_err();
        assert!(matches!(
            err,
            FormatError::HeaderOutOfBounds {
                len: 10,
                available: 5
            }
        ));
    }

    #[test]
    fn header_not_utf8() {
        let mut bytes = 4u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{\xff}");
        bytes.push(b' ');
        assert!(matches!(
            parse_header(&bytes).unwrap_err(),
            FormatError::HeaderNotUtf8(_)
        ));
    }

    #[test]
    fn invalid_json() {
        for header in [
            "{ ",
            "{\"a\":}",
            "{} x",
            "{}\0",
            "{\"a\": {\"dtype\": \"F32\",}}",
            "\u{feff}{}",
        ] {
            let err = parse_err(header, 0);
            assert!(
                matches!(err, FormatError::InvalidJson(_)),
                "{header:?}: {err}"
            );
        }
        // A syntax error wins over a duplicate key earlier in the text.
        let err = parse_err("{\"a\": 1, \"a\": 2", 0);
        assert!(matches!(err, FormatError::InvalidJson(_)), "{err}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let depth = 100_000;
        let header = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(matches!(parse_err(&header, 0), FormatError::InvalidJson(_)));
        let header = format!("{{\"a\":{}{}}}", "{\"b\":".repeat(depth), "}".repeat(depth));
        assert!(matches!(parse_err(&header, 0), FormatError::InvalidJson(_)));
    }

    #[test]
    fn header_not_object() {
        for (header, kind) in [
            ("[]", "an array"),
            ("null", "null"),
            ("\"{}\"", "a string"),
            ("12", "a number"),
            ("true", "a boolean"),
        ] {
            let err = parse_err(header, 0);
            assert!(
                matches!(err, FormatError::HeaderNotObject { found } if found == kind),
                "{header}: {err}"
            );
        }
    }

    #[test]
    fn invalid_metadata() {
        for header in [
            r#"{"__metadata__": []}"#,
            r#"{"__metadata__": "x"}"#,
            r#"{"__metadata__": {"k": 1}}"#,
            r#"{"__metadata__": {"k": null}}"#,
            r#"{"__metadata__": {"k": {"nested": "x"}}}"#,
            r#"{"__metadata__": {"k": "a", "k": "b"}}"#,
            r#"{"__metadata__": {}, "__metadata__": {}}"#,
        ] {
            let err = parse_err(header, 0);
            assert!(
                matches!(err, FormatError::InvalidMetadata { .. }),
                "{header}: {err}"
            );
        }
    }

    #[test]
    fn invalid_tensor_entry() {
        let cases = [
            r#"{"t": 3}"#,
            r#"{"t": {"shape": [1], "data_offsets": [0, 1]}}"#,
            r#"{"t": {"dtype": "U8", "data_offsets": [0, 1]}}"#,
            r#"{"t": {"dtype": "U8", "shape": [1]}}"#,
            r#"{"t": {"dtype": 8, "shape": [1], "data_offsets": [0, 1]}}"#,
            r#"{"t": {"dtype": "U8", "shape": 1, "data_offsets": [0, 1]}}"#,
            r#"{"t": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}"#,
            r#"{"t": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}}"#,
            r#"{"t": {"dtype": "U8", "shape": ["1"], "data_offsets": [0, 1]}}"#,
            r#"{"t": {"dtype": "U8", "shape": [1e30], "data_offsets": [0, 1]}}"#,
            r#"{"t": {"dtype": "U8", "shape": [18446744073709551616], "data_offsets": [0, 1]}}"#,
            r#"{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0]}}"#,
            r#"{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}"#,
            r#"{"t": {"dtype": "U8", "shape": [1], "data_offsets": {"0": 0}}}"#,
            r#"{"t": {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}}"#,
            r#"{"t": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}"#,
        ];
        for header in cases {
            let err = parse_err(header, 1);
            assert!(
                matches!(&err, FormatError::InvalidTensorEntry { name, .. } if name == "t"),
                "{header}: {err}"
            );
        }
    }

    #[test]
    fn unknown_dtype() {
        for dtype in ["F33", "f32", "", "F4", "float32"] {
            let header =
                format!(r#"{{"t": {{"dtype": "{dtype}", "shape": [1], "data_offsets": [0, 1]}}}}"#);
            let err = parse_err(&header, 1);
            assert!(
                matches!(&err, FormatError::UnknownDtype { name, dtype: d } if name == "t" && d == dtype),
                "{err}"
            );
        }
    }

    #[test]
    fn duplicate_tensor_name() {
        // serde_json would keep one of these silently; the two entries even disagree.
        let header = r#"{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}"#;
        let err = parse_err(header, 2);
        assert!(
            matches!(&err, FormatError::DuplicateTensorName { name } if name == "t"),
            "{err}"
        );
        // Same key spelled with an escape is the same name.
        let header = r#"{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "\u0074": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}"#;
        let err = parse_err(header, 2);
        assert!(
            matches!(&err, FormatError::DuplicateTensorName { name } if name == "t"),
            "{err}"
        );
    }

    #[test]
    fn offsets_reversed() {
        let err = parse_err(
            r#"{"t": {"dtype": "U8", "shape": [0], "data_offsets": [4, 2]}}"#,
            4,
        );
        assert!(matches!(
            &err,
            FormatError::OffsetsReversed { name, begin: 4, end: 2 } if name == "t"
        ));
    }

    #[test]
    fn size_overflow() {
        let big = usize::MAX / 2 + 1;
        let header =
            format!(r#"{{"t": {{"dtype": "F16", "shape": [{big}], "data_offsets": [0, 0]}}}}"#);
        let err = parse_err(&header, 0);
        assert!(
            matches!(&err, FormatError::SizeOverflow { name, dtype: Dtype::F16, .. } if name == "t"),
            "{err}"
        );
        let header = format!(
            r#"{{"t": {{"dtype": "U8", "shape": [{big}, 2, 0], "data_offsets": [0, 0]}}}}"#
        );
        // A zero dimension does not excuse an overflow earlier in the product.
        let err = parse_err(&header, 0);
        assert!(matches!(err, FormatError::SizeOverflow { .. }), "{err}");
    }

    #[test]
    fn size_mismatch() {
        let err = parse_err(
            r#"{"t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}"#,
            20,
        );
        assert!(matches!(
            &err,
            FormatError::SizeMismatch { name, expected: 24, actual: 20 } if name == "t"
        ));
    }

    #[test]
    fn first_tensor_not_at_start() {
        let err = parse_err(
            r#"{"t": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}"#,
            4,
        );
        assert!(matches!(
            &err,
            FormatError::FirstTensorNotAtStart { name, begin: 2 } if name == "t"
        ));
    }

    #[test]
    fn gap() {
        let header = r#"{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                         "b": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]}}"#;
        let err = parse_err(header, 5);
        assert!(
            matches!(
                &err,
                FormatError::Gap { name, begin: 3, previous, previous_end: 2 } if name == "b" && previous == "a"
            ),
            "{err}"
        );
    }

    #[test]
    fn overlap() {
        let header = r#"{"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                         "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}"#;
        let err = parse_err(header, 4);
        assert!(
            matches!(
                &err,
                FormatError::Overlap { name, begin: 2, previous, previous_end: 4 } if name == "b" && previous == "a"
            ),
            "{err}"
        );
        // Two tensors on the very same bytes.
        let header = r#"{"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                         "b": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}}"#;
        assert!(matches!(parse_err(header, 4), FormatError::Overlap { .. }));
    }

    #[test]
    fn data_truncated() {
        let header = r#"{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                         "b": {"dtype": "U16", "shape": [2], "data_offsets": [2, 6]}}"#;
        let err = parse_err(header, 5);
        assert!(
            matches!(
                &err,
                FormatError::DataTruncated { name, end: 6, data_len: 5 } if name == "b"
            ),
            "{err}"
        );
        // Offsets near usize::MAX must not overflow when compared with the file.
        let end = usize::MAX;
        let header =
            format!(r#"{{"t": {{"dtype": "U8", "shape": [{end}], "data_offsets": [0, {end}]}}}}"#);
        assert!(matches!(
            parse_err(&header, 3),
            FormatError::DataTruncated { .. }
        ));
    }

    #[test]
    fn trailing_bytes() {
        let err = parse_err(
            r#"{"t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}"#,
            3,
        );
        assert!(matches!(
            err,
            FormatError::TrailingBytes {
                data_len: 3,
                covered: 2
            }
        ));
        let err = parse_err("{}", 1);
        assert!(matches!(
            err,
            FormatError::TrailingBytes {
                data_len: 1,
                covered: 0
            }
        ));
    }

    // ---- what must be accepted --------------------------------------------------------------

    #[test]
    fn accepts_what_the_reference_accepts() {
        // Leading / trailing JSON whitespace, null metadata, unknown entry fields, zero-sized
        // tensors sharing an offset, entries listed out of offset order.
        let header = r#"  {"__metadata__": null,
            "b": {"dtype": "F32", "shape": [1, 2], "data_offsets": [2, 10], "extra": [1, {"x": 2}]},
            "z1": {"dtype": "U8", "shape": [0], "data_offsets": [10, 10]},
            "a": {"shape": [2], "dtype": "BF16", "data_offsets": [0, 2]},
            "z0": {"dtype": "F64", "shape": [3, 0], "data_offsets": [10, 10]},
            "s": {"dtype": "U16", "shape": [], "data_offsets": [10, 12]}}    "#;
        let header = header.replace(
            r#""shape": [2], "dtype": "BF16""#,
            r#""shape": [1], "dtype": "BF16""#,
        );
        let bytes = file_with(&header, 12);
        let parsed = parse_header(&bytes).unwrap();
        let names: Vec<_> = parsed.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "z1", "z0", "s"]);
        assert_eq!(parsed.metadata, None);
        assert_eq!(parsed.data_start, 8 + header.len());
        assert_eq!(parsed.data_len(), 12);
        let s = &parsed.tensors[4].1;
        assert_eq!((s.num_elements(), s.num_bytes()), (1, 2));

        let parsed = parse_header(&file_with("{}", 0)).unwrap();
        assert!(parsed.tensors.is_empty());
        assert_eq!(parsed.data_start, 10);
    }

    #[test]
    fn dtype_names_round_trip() {
        for dtype in Dtype::ALL {
            assert_eq!(Dtype::parse(dtype.name()), Some(dtype));
            assert_eq!(dtype.to_string(), dtype.name());
            assert!(dtype.size_bytes().is_power_of_two());
        }
        assert_eq!(Dtype::parse("bf16"), None);
        for float in [FloatDtype::F32, FloatDtype::F16, FloatDtype::BF16] {
            let dtype = Dtype::from(float);
            assert_eq!(dtype.float_dtype(), Some(float));
            assert_eq!(dtype.size_bytes(), float.size_bytes());
        }
        assert_eq!(Dtype::I8.float_dtype(), None);
    }

    // ---- writer ------------------------------------------------------------------------------

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writer_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let f32s: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0, 3.0, -0.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bf16s: Vec<u8> = [half::bf16::from_f32(1.0), half::bf16::from_f32(-3.5)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let u8s = vec![7u8, 9, 11];
        let i64s: Vec<u8> = [-1i64, i64::MAX]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bools = vec![1u8];
        let tensors: Vec<(&str, Dtype, &[usize], &[u8])> = vec![
            ("layer.0.weight", Dtype::F32, &[2, 3], &f32s),
            ("layer.0.bias \"quoted\" é", Dtype::BF16, &[2], &bf16s),
            ("codes", Dtype::U8, &[3, 1], &u8s),
            ("empty", Dtype::F16, &[0, 4], &[]),
            ("big", Dtype::I64, &[2], &i64s),
            ("flag", Dtype::BOOL, &[], &bools),
        ];
        let metadata = meta(&[("format", "pt"), ("nybble", "{\"v\": 1}")]);
        write_safetensors(&path, &tensors, Some(metadata.clone())).unwrap();
        assert_eq!(dir_entries(dir.path()), ["model.safetensors"]);

        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.path(), path);
        assert_eq!(file.metadata(), Some(&metadata));
        assert_eq!(file.header().data_start % DATA_ALIGN, 0);
        assert_eq!(file.len(), tensors.len());
        // Offsets follow the declared order, so names come back in it.
        let names: Vec<_> = file.names().collect();
        let declared: Vec<_> = tensors.iter().map(|t| t.0).collect();
        assert_eq!(names, declared);
        for (name, dtype, shape, data) in &tensors {
            let (info, bytes) = file.tensor(name).unwrap();
            assert_eq!(info.dtype, *dtype);
            assert_eq!(info.shape, *shape);
            assert_eq!(info.num_bytes(), data.len());
            assert_eq!(bytes, *data);
            assert_eq!(file.data(name), Some(*data));
        }
        assert!(file.info("missing").is_none() && file.data("missing").is_none());
        assert!(file.contains("codes") && !file.contains("__metadata__"));

        // The same bytes through the in-memory path.
        let in_memory = SafetensorsFile::from_bytes(fs::read(&path).unwrap()).unwrap();
        assert_eq!(in_memory.header(), file.header());
        assert_eq!(in_memory.path(), Path::new(""));
    }

    #[test]
    fn writer_output_matches_reference_layout() {
        // What the reference implementation writes for one F32 tensor [1.0, 2.0] with
        // metadata {"format": "pt"}: compact JSON, metadata first, space padding to 8.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ref.safetensors");
        let data: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        write_safetensors(
            &path,
            &[("a", Dtype::F32, &[2], &data)],
            Some(meta(&[("format", "pt")])),
        )
        .unwrap();
        let json = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let padded = format!(
            "{json:<width$}",
            width = (8 + json.len()).next_multiple_of(8) - 8
        );
        let mut expected = (padded.len() as u64).to_le_bytes().to_vec();
        expected.extend_from_slice(padded.as_bytes());
        expected.extend_from_slice(&data);
        assert_eq!(fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn writer_with_no_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.safetensors");
        SafetensorsWriter::create(&path, vec![], None)
            .unwrap()
            .finish()
            .unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes, b"\x08\0\0\0\0\0\0\0{}      ");
        let file = SafetensorsFile::open(&path).unwrap();
        assert!(file.is_empty() && file.metadata().is_none());
    }

    #[test]
    fn writer_replaces_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        fs::write(&path, b"old contents").unwrap();
        write_safetensors(&path, &[("x", Dtype::U8, &[1], &[42])], None).unwrap();
        assert_eq!(
            SafetensorsFile::open(&path).unwrap().data("x"),
            Some(&[42u8][..])
        );
        assert_eq!(dir_entries(dir.path()), ["out.safetensors"]);
    }

    #[test]
    fn dropped_writer_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("partial.safetensors");
        let plan = vec![
            ("a".to_owned(), Dtype::U8, vec![2]),
            ("b".to_owned(), Dtype::U8, vec![2]),
        ];
        let mut writer = SafetensorsWriter::create(&path, plan.clone(), None).unwrap();
        writer.write_tensor("a", &[1, 2]).unwrap();
        let temp = writer.temp_path().to_owned();
        assert_eq!(temp.parent(), path.parent());
        let temp_name = temp.file_name().unwrap().to_str().unwrap();
        assert!(
            temp_name.starts_with(".partial.safetensors.tmp-"),
            "{temp_name}"
        );
        assert!(temp.exists() && !path.exists());
        drop(writer);
        assert!(dir_entries(dir.path()).is_empty());

        // A panic mid-write unwinds through the writer and cleans up the same way.
        let result = std::panic::catch_unwind(|| {
            let mut writer = SafetensorsWriter::create(&path, plan.clone(), None).unwrap();
            writer.write_tensor("a", &[1, 2]).unwrap();
            // resume_unwind unwinds like a panic without printing one into the test output.
            std::panic::resume_unwind(Box::new("interrupted"));
        });
        assert!(result.is_err());
        assert!(dir_entries(dir.path()).is_empty());

        // A failed finish() also leaves nothing, and does not touch an existing target.
        fs::write(&path, b"keep me").unwrap();
        let mut writer = SafetensorsWriter::create(&path, plan, None).unwrap();
        writer.write_tensor("a", &[1, 2]).unwrap();
        let err = writer.finish().unwrap_err();
        assert!(
            matches!(&err, Error::WriterMisuse { path: p, source: FormatError::MissingTensors { next, written: 1, declared: 2 } }
                if p == &path && next == "b"),
            "{err}"
        );
        assert_eq!(dir_entries(dir.path()), ["partial.safetensors"]);
        assert_eq!(fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn write_tensor_part_streams_and_checks_its_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.safetensors");
        let a: Vec<u8> = (0..40u8).collect();
        let mut w = SafetensorsWriter::create(
            &path,
            vec![
                ("a".into(), Dtype::U8, vec![40]),
                ("z".into(), Dtype::U8, vec![0]),
                ("b".into(), Dtype::U8, vec![2]),
            ],
            None,
        )
        .unwrap();
        w.write_tensor_part("a", &a[..15]).unwrap();
        // Misuse mid-tensor: another name, an overrun, a whole write; nothing is written.
        assert!(matches!(
            w.write_tensor_part("b", &[1]),
            Err(Error::WriterMisuse { .. })
        ));
        assert!(matches!(
            w.write_tensor_part("a", &a),
            Err(Error::WriterMisuse { .. })
        ));
        assert!(matches!(
            w.write_tensor("a", &a[15..]),
            Err(Error::WriterMisuse { .. })
        ));
        w.write_tensor_part("a", &a[15..39]).unwrap();
        w.start_writeback().unwrap();
        w.write_tensor_part("a", &a[39..]).unwrap();
        assert_eq!(w.next_tensor(), Some("z"));
        w.write_tensor_part("z", &[]).unwrap();
        w.write_tensor_part("b", &[7]).unwrap();
        assert_eq!(w.unsynced_bytes(), 40 - 39 + 1);
        let w = {
            let e = SafetensorsWriter::create(
                &dir.path().join("q"),
                vec![("x".into(), Dtype::U8, vec![2])],
                None,
            )
            .unwrap();
            let mut e = e;
            e.write_tensor_part("x", &[1]).unwrap();
            // A tensor begun but not completed is missing at finish.
            assert!(matches!(e.finish(), Err(Error::WriterMisuse { .. })));
            w
        };
        let mut w = w;
        w.write_tensor_part("b", &[8]).unwrap();
        w.finish().unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.data("a").unwrap(), &a[..]);
        assert_eq!(f.data("b").unwrap(), &[7, 8]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_tensor_misuse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let plan = vec![
            ("a".to_owned(), Dtype::F32, vec![2]),
            ("b".to_owned(), Dtype::U8, vec![3]),
        ];
        let mut writer = SafetensorsWriter::create(&path, plan, None).unwrap();
        let source = |r: Result<()>| match r.unwrap_err() {
            Error::WriterMisuse { source, .. } => source,
            other => panic!("unexpected error {other}"),
        };
        let err = source(writer.write_tensor("b", &[0; 3]));
        assert!(
            matches!(&err, FormatError::WriteOutOfOrder { expected, got } if expected == "a" && got == "b"),
            "{err}"
        );
        let err = source(writer.write_tensor("a", &[0; 7]));
        assert!(
            matches!(&err, FormatError::WriteSizeMismatch { name, expected: 8, got: 7 } if name == "a"),
            "{err}"
        );
        // Misuse writes nothing: the writer carries on and produces a valid file.
        assert_eq!(writer.next_tensor(), Some("a"));
        writer.write_tensor("a", &[0; 8]).unwrap();
        writer.write_tensor("b", &[1, 2, 3]).unwrap();
        assert_eq!(writer.next_tensor(), None);
        let err = source(writer.write_tensor("c", &[]));
        assert!(
            matches!(&err, FormatError::WriteTooMany { name, declared: 2 } if name == "c"),
            "{err}"
        );
        writer.finish().unwrap();
        assert_eq!(
            SafetensorsFile::open(&path).unwrap().data("b"),
            Some(&[1u8, 2, 3][..])
        );
    }

    #[test]
    fn writer_rejects_bad_plans() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let create = |plan: Vec<(&str, Dtype, Vec<usize>)>| {
            let plan = plan
                .into_iter()
                .map(|(n, d, s)| (n.to_owned(), d, s))
                .collect();
            match SafetensorsWriter::create(&path, plan, None).unwrap_err() {
                Error::WriterMisuse { source, path: p } => {
                    assert_eq!(p, path);
                    source
                }
                other => panic!("unexpected error {other}"),
            }
        };
        let err = create(vec![("x", Dtype::U8, vec![1]), ("x", Dtype::U8, vec![1])]);
        assert!(matches!(&err, FormatError::DuplicateTensorName { name } if name == "x"));
        assert!(matches!(
            create(vec![("__metadata__", Dtype::U8, vec![1])]),
            FormatError::ReservedName
        ));
        let err = create(vec![("x", Dtype::F32, vec![usize::MAX / 2, 3])]);
        assert!(matches!(&err, FormatError::SizeOverflow { name, .. } if name == "x"));
        // Each tensor fits but their total does not.
        let half = usize::MAX / 2 + 1;
        let err = create(vec![
            ("x", Dtype::U8, vec![half]),
            ("y", Dtype::U8, vec![half]),
        ]);
        assert!(matches!(&err, FormatError::SizeOverflow { name, .. } if name == "y"));
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[test]
    fn io_errors_carry_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/x.safetensors");
        let err = write_safetensors(&path, &[], None).unwrap_err();
        assert!(
            matches!(&err, Error::Io { path: p, source } if p == &path && source.kind() == io::ErrorKind::NotFound)
        );
        let err = SafetensorsFile::open(&path).unwrap_err();
        assert!(matches!(&err, Error::Io { path: p, .. } if p == &path));

        // A malformed file reports the path and the defect.
        let bad = dir.path().join("bad.safetensors");
        fs::write(&bad, b"\x02\0\0").unwrap();
        let err = SafetensorsFile::open(&bad).unwrap_err();
        assert!(
            matches!(&err, Error::Safetensors { path: p, source: FormatError::FileTooShort { len: 3 } } if p == &bad)
        );
        assert!(err.to_string().contains("bad.safetensors"), "{err}");
        fs::write(&bad, b"").unwrap();
        assert!(matches!(
            SafetensorsFile::open(&bad).unwrap_err(),
            Error::Safetensors {
                source: FormatError::FileTooShort { len: 0 },
                ..
            }
        ));
    }

    #[test]
    fn writer_misuse_is_not_a_corrupt_file() {
        // What a caller gets wrong is WriterMisuse (a ValueError in Python); only a damaged
        // file read back is Safetensors (CorruptFileError). Both name the path and tensor.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let misuse = |tensors: &[(&str, Dtype, &[usize], &[u8])]| match write_safetensors(
            &path, tensors, None,
        )
        .unwrap_err()
        {
            Error::WriterMisuse { path: p, source } => {
                assert_eq!(p, path);
                source
            }
            other => panic!("expected WriterMisuse, got {other:?}"),
        };
        let err = misuse(&[("w", Dtype::F32, &[2], &[0; 7])]);
        assert!(matches!(
            &err,
            FormatError::WriteSizeMismatch {
                expected: 8,
                got: 7,
                ..
            }
        ));
        assert_eq!(err.tensor(), Some("w"));
        let err = misuse(&[("w", Dtype::U8, &[1], &[1]), ("w", Dtype::U8, &[1], &[2])]);
        assert!(matches!(&err, FormatError::DuplicateTensorName { .. }));
        assert_eq!(err.tensor(), Some("w"));
        let err = misuse(&[(METADATA_KEY, Dtype::U8, &[1], &[1])]);
        assert!(matches!(err, FormatError::ReservedName) && err.tensor().is_none());
        assert!(dir_entries(dir.path()).is_empty());

        write_safetensors(&path, &[("w", Dtype::F32, &[4], &[7; 16])], None).unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        match SafetensorsFile::open(&path).unwrap_err() {
            Error::Safetensors { path: p, source } => {
                assert_eq!(p, path);
                assert!(
                    matches!(source, FormatError::DataTruncated { .. }),
                    "{source}"
                );
                assert_eq!(source.tensor(), Some("w"));
            }
            other => panic!("expected Safetensors, got {other:?}"),
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn disk_full_is_an_io_error_and_leaves_no_file() {
        // /dev/full accepts opens and fails every write with ENOSPC; a writer can't target it
        // directly (it renames), so exercise the poisoning path through a BufWriter swap.
        let Ok(full) = OpenOptions::new().write(true).open("/dev/full") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.safetensors");
        let plan = vec![("a".to_owned(), Dtype::U8, vec![4 << 20])];
        let mut writer = SafetensorsWriter::create(&path, plan, None).unwrap();
        writer.out = BufWriter::new(full);
        let err = writer.write_tensor("a", &vec![0; 4 << 20]).unwrap_err();
        assert!(
            matches!(&err, Error::Io { path: p, .. } if p == &path),
            "{err}"
        );
        // The output is abandoned: nothing more is accepted and nothing is left behind.
        assert!(matches!(writer.finish().unwrap_err(), Error::Io { .. }));
        assert!(dir_entries(dir.path()).is_empty());
    }

    // ---- fuzzing ----------------------------------------------------------------------------

    /// Edits applied to a valid file to probe the parser.
    #[derive(Debug, Clone)]
    enum Mutation {
        /// XOR a byte of the header (or of anything, when the index lands past it).
        Flip {
            at: usize,
            mask: u8,
        },
        Truncate {
            at: usize,
        },
        Insert {
            at: usize,
            bytes: Vec<u8>,
        },
        Remove {
            at: usize,
            len: usize,
        },
        /// Replace a run of header text with a JSON-ish fragment.
        Splice {
            at: usize,
            len: usize,
            with: String,
        },
        /// Overwrite the length prefix.
        SetLen(u64),
        /// Edit one parsed field and re-encode the header consistently.
        Field {
            tensor: usize,
            edit: FieldEdit,
        },
        /// Grow or shrink the data buffer.
        Resize(isize),
    }

    #[derive(Debug, Clone)]
    enum FieldEdit {
        Offset {
            which: usize,
            value: u64,
        },
        /// Move a tensor without resizing it: reaches the gap / overlap / start checks.
        Shift(i64),
        Dim {
            which: usize,
            value: u64,
        },
        Dtype(String),
        Rename(String),
        Remove(String),
        Set(String, Value),
    }

    fn json_fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "{",
                "}",
                "[",
                "]",
                ",",
                ":",
                "\"",
                "\\",
                "null",
                "true",
                "-1",
                "0",
                "1e400",
                "18446744073709551615",
                "18446744073709551616",
                "1.5",
                "\"__metadata__\"",
                "\"F32\"",
                "\"U8\"",
                "\"XX\"",
                "[0,0]",
                "[]",
                "{}",
                "\"a\"",
                "\"dtype\"",
                "\"shape\"",
                "\"data_offsets\"",
                " ",
                "\u{fffd}",
                "\\u0000",
            ])
            .prop_map(str::to_owned),
            "[ -~]{0,6}",
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<u64>().prop_map(Value::from),
            (0u64..64).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            Just(Value::from(2.5)),
            "[A-Z0-9_]{0,8}".prop_map(Value::from),
            prop::collection::vec(0u64..32, 0..4).prop_map(Value::from),
            Just(Value::Object(Map::new())),
        ]
    }

    fn field_edit() -> impl Strategy<Value = FieldEdit> {
        let field = prop::sample::select(vec!["dtype", "shape", "data_offsets", "other"]);
        prop_oneof![
            (0..2usize, prop_oneof![0u64..64, any::<u64>()])
                .prop_map(|(which, value)| FieldEdit::Offset { which, value }),
            (-9i64..9).prop_map(FieldEdit::Shift),
            (0..3usize, prop_oneof![0u64..8, any::<u64>()])
                .prop_map(|(which, value)| FieldEdit::Dim { which, value }),
            prop::sample::select(vec!["F32", "F16", "U8", "I64", "BOOL", "F4", "x"])
                .prop_map(|d| FieldEdit::Dtype(d.to_owned())),
            prop::sample::select(vec!["a", "b", "__metadata__", ""])
                .prop_map(|n| FieldEdit::Rename(n.to_owned())),
            field.clone().prop_map(|f| FieldEdit::Remove(f.to_owned())),
            (field, json_value()).prop_map(|(f, v)| FieldEdit::Set(f.to_owned(), v)),
        ]
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            // Mostly low masks: ASCII stays ASCII, so flips reach the JSON parser.
            3 => (any::<usize>(), prop_oneof![4 => 1..128u8, 1 => 128..=255u8])
                .prop_map(|(at, mask)| Mutation::Flip { at, mask }),
            1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
            2 => (any::<usize>(), prop::collection::vec(prop_oneof![3 => 0x20..0x7fu8, 1 => any::<u8>()], 1..4))
                .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
            1 => (any::<usize>(), 1..8usize).prop_map(|(at, len)| Mutation::Remove { at, len }),
            3 => (any::<usize>(), 0..6usize, json_fragment())
                .prop_map(|(at, len, with)| Mutation::Splice { at, len, with }),
            1 => prop_oneof![0u64..300, any::<u64>()].prop_map(Mutation::SetLen),
            5 => (any::<usize>(), field_edit()).prop_map(|(tensor, edit)| Mutation::Field { tensor, edit }),
            1 => (-9isize..9).prop_map(Mutation::Resize),
        ]
    }

    /// Header length from the prefix, clamped to what is really there.
    fn header_span(bytes: &[u8]) -> usize {
        let declared = bytes
            .first_chunk::<8>()
            .map_or(0, |p| u64::from_le_bytes(*p).min(1 << 20) as usize);
        declared.min(bytes.len().saturating_sub(LEN_PREFIX))
    }

    /// Rewrites the header text, fixing the length prefix so the edit reaches the JSON parser.
    fn replace_header(bytes: &mut Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) {
        let span = header_span(bytes);
        if bytes.len() < LEN_PREFIX {
            return;
        }
        let mut header = bytes[LEN_PREFIX..LEN_PREFIX + span].to_vec();
        edit(&mut header);
        let data = bytes.split_off(LEN_PREFIX + span);
        bytes.clear();
        bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&data);
    }

    fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
        let span = header_span(bytes);
        // Most byte-level edits land in the header, where the parser is.
        let in_header = |at: usize| at % (span + 1);
        match mutation {
            Mutation::Flip { at, mask } => {
                if !bytes.is_empty() {
                    let i = if at % 4 == 0 {
                        at % bytes.len()
                    } else {
                        (LEN_PREFIX + in_header(*at)).min(bytes.len() - 1)
                    };
                    bytes[i] ^= mask;
                }
            }
            Mutation::Truncate { at } => bytes.truncate(at % (bytes.len() + 1)),
            Mutation::Insert { at, bytes: new } => replace_header(bytes, |h| {
                let i = in_header(*at).min(h.len());
                h.splice(i..i, new.iter().copied());
            }),
            Mutation::Remove { at, len } => replace_header(bytes, |h| {
                let i = in_header(*at).min(h.len());
                h.drain(i..(i + len).min(h.len()));
            }),
            Mutation::Splice { at, len, with } => replace_header(bytes, |h| {
                let i = in_header(*at).min(h.len());
                h.splice(i..(i + len).min(h.len()), with.bytes());
            }),
            Mutation::SetLen(len) => {
                if bytes.len() >= LEN_PREFIX {
                    bytes[..LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
                }
            }
            Mutation::Field { tensor, edit } => replace_header(bytes, |h| {
                let Ok(Value::Object(mut root)) = serde_json::from_slice::<Value>(h) else {
                    return;
                };
                let names: Vec<String> = root
                    .keys()
                    .filter(|k| *k != METADATA_KEY)
                    .cloned()
                    .collect();
                if names.is_empty() {
                    return;
                }
                let name = &names[tensor % names.len()];
                if let FieldEdit::Rename(new) = edit {
                    // Renaming onto an existing key builds a duplicate in the text itself.
                    let entry = root.get(name).unwrap().clone();
                    let text = Value::Object(root).to_string();
                    let dup = format!("{}:{}", Value::from(new.as_str()), entry);
                    *h = format!("{},{}}}", &text[..text.len() - 1], dup).into_bytes();
                    return;
                }
                let Some(Value::Object(entry)) = root.get_mut(name) else {
                    return;
                };
                match edit {
                    FieldEdit::Offset { which, value } => {
                        if let Some(Value::Array(o)) = entry.get_mut("data_offsets") {
                            if let Some(slot) = o.get_mut(*which) {
                                *slot = Value::from(*value);
                            }
                        }
                    }
                    FieldEdit::Shift(delta) => {
                        if let Some(Value::Array(o)) = entry.get_mut("data_offsets") {
                            for slot in o.iter_mut() {
                                if let Some(v) = slot.as_u64() {
                                    *slot = Value::from(v.saturating_add_signed(*delta));
                                }
                            }
                        }
                    }
                    FieldEdit::Dim { which, value } => {
                        if let Some(Value::Array(s)) = entry.get_mut("shape") {
                            if let Some(slot) = s.get_mut(*which) {
                                *slot = Value::from(*value);
                            } else {
                                s.push(Value::from(*value));
                            }
                        }
                    }
                    FieldEdit::Dtype(d) => {
                        entry.insert("dtype".into(), Value::from(d.as_str()));
                    }
                    FieldEdit::Remove(f) => {
                        entry.remove(f);
                    }
                    FieldEdit::Set(f, v) => {
                        entry.insert(f.clone(), v.clone());
                    }
                    FieldEdit::Rename(_) => unreachable!(),
                }
                *h = Value::Object(root).to_string().into_bytes();
            }),
            Mutation::Resize(delta) => {
                if *delta >= 0 {
                    bytes.extend(std::iter::repeat_n(0xAB, *delta as usize));
                } else {
                    bytes.truncate(bytes.len().saturating_sub(delta.unsigned_abs()));
                }
            }
        }
    }

    /// Everything a successful parse promises, checked independently.
    fn check_accepted(bytes: &[u8], header: &Header) -> std::result::Result<(), TestCaseError> {
        let mut cursor = 0usize;
        let mut names = HashSet::new();
        prop_assert!(header.data_start >= LEN_PREFIX + 2 && header.data_start <= bytes.len());
        for (name, info) in &header.tensors {
            let (begin, end) = info.data_offsets;
            prop_assert!(names.insert(name.as_str()), "duplicate {name}");
            prop_assert_ne!(name.as_str(), METADATA_KEY);
            prop_assert_eq!(begin, cursor);
            prop_assert!(begin <= end);
            let n = info
                .shape
                .iter()
                .try_fold(info.dtype.size_bytes(), |a, &d| a.checked_mul(d));
            prop_assert_eq!(n, Some(end - begin));
            prop_assert_eq!(info.num_bytes(), end - begin);
            let abs_end = header.data_start.checked_add(end);
            prop_assert!(abs_end.is_some_and(|e| e <= bytes.len()));
            cursor = end;
        }
        prop_assert_eq!(header.data_start + cursor, bytes.len());
        let file = SafetensorsFile::from_bytes(bytes.to_vec()).unwrap();
        for (name, info) in file.tensors() {
            prop_assert_eq!(file.data(name).map(<[u8]>::len), Some(info.num_bytes()));
        }
        Ok(())
    }

    fn fuzz_bases() -> Vec<Vec<u8>> {
        vec![
            encoded_file(
                &[
                    ("a", Dtype::F32, &[2, 3]),
                    ("b", Dtype::U8, &[5]),
                    ("c", Dtype::BF16, &[1, 1, 2]),
                ],
                Some(&meta(&[("format", "pt"), ("k", "v")])),
            ),
            encoded_file(&[("w", Dtype::I64, &[3]), ("z", Dtype::F16, &[0])], None),
            encoded_file(
                &[("x", Dtype::BOOL, &[]), ("y", Dtype::F8_E4M3, &[2, 2])],
                Some(&BTreeMap::new()),
            ),
            encoded_file(&[], None),
            // Hand-written: unpadded, entries out of offset order, spaces in the JSON.
            file_with(
                r#"{ "t2": {"dtype": "U16", "shape": [2], "data_offsets": [3, 7]}, "t1": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]} }"#,
                7,
            ),
        ]
    }

    #[test]
    fn fuzz_mutated_headers() {
        const CASES: u32 = 10_000;
        let bases = fuzz_bases();
        for base in &bases {
            check_accepted(base, &parse_header(base).unwrap()).unwrap();
        }
        let (ran, accepted) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let rejected = std::sync::Mutex::new(BTreeMap::<String, usize>::new());
        let config = Config {
            cases: CASES,
            failure_persistence: None,
            ..Config::default()
        };
        let strategy = (0..bases.len(), prop::collection::vec(mutation(), 1..5));
        TestRunner::new(config)
            .run(&strategy, |(base, mutations)| {
                let mut bytes = bases[base].clone();
                for m in &mutations {
                    apply(&mut bytes, m);
                }
                ran.fetch_add(1, Ordering::Relaxed);
                match parse_header(&bytes) {
                    Ok(header) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        check_accepted(&bytes, &header)?;
                    }
                    Err(err) => {
                        // Every message renders (names included) without panicking.
                        let _ = err.to_string();
                        let variant = format!("{err:?}");
                        let variant = variant.split(['(', ' ', '{']).next().unwrap().to_owned();
                        *rejected.lock().unwrap().entry(variant).or_default() += 1;
                    }
                }
                Ok(())
            })
            .unwrap();
        let (ran, accepted) = (ran.into_inner(), accepted.into_inner());
        let rejected = rejected.into_inner().unwrap();
        let total_rejected: usize = rejected.values().sum();
        eprintln!("safetensors fuzz: {ran} inputs, {accepted} accepted, {total_rejected} rejected");
        eprintln!("safetensors fuzz: rejections by variant: {rejected:?}");
        assert_eq!(ran, accepted + total_rejected);
        assert!(ran >= CASES as usize);
        // The mutations must reach deep validation, not just fail to parse JSON.
        for variant in [
            "InvalidJson",
            "InvalidTensorEntry",
            "SizeMismatch",
            "FirstTensorNotAtStart",
            "Gap",
            "Overlap",
            "TrailingBytes",
            "DuplicateTensorName",
        ] {
            assert!(
                rejected.contains_key(variant),
                "no input reached {variant}: {rejected:?}"
            );
        }
        assert!(accepted > 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Arbitrary bytes behind a plausible length prefix: never a panic, and any accepted
        /// file honours every promise.
        #[test]
        fn fuzz_random_bytes(len in 0u64..64, body in prop::collection::vec(any::<u8>(), 0..96)) {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(&body);
            if let Ok(header) = parse_header(&bytes) {
                check_accepted(&bytes, &header)?;
            }
        }

        /// Any plan the writer accepts round-trips through parse_header.
        #[test]
        fn writer_header_round_trips(
            plan in prop::collection::vec(
                ("[a-z.]{1,6}", prop::sample::select(Dtype::ALL.to_vec()), prop::collection::vec(0usize..5, 0..4)),
                0..6,
            ),
            metadata in prop::option::of(prop::collection::btree_map("[ -~]{0,5}", "\\PC{0,5}", 0..3)),
        ) {
            let mut seen = HashSet::new();
            let plan: Vec<_> = plan.into_iter().filter(|(n, _, _)| seen.insert(n.clone())).collect();
            let (mut bytes, sizes) = encode_header(&plan, metadata.as_ref()).unwrap();
            prop_assert_eq!(bytes.len() % DATA_ALIGN, 0);
            bytes.resize(bytes.len() + sizes.iter().sum::<usize>(), 0);
            let header = parse_header(&bytes).unwrap();
            check_accepted(&bytes, &header)?;
            prop_assert_eq!(&header.metadata, &metadata);
            let got: Vec<_> = header.tensors.iter().map(|(n, i)| (n.clone(), i.dtype, i.shape.clone())).collect();
            // Stable sort keeps declared order, zero-sized tensors included.
            prop_assert_eq!(got, plan);
        }
    }
}
