//! Whole-checkpoint conversion: plain safetensors in, bitsandbytes-compatible packed
//! safetensors out, one tensor at a time.
//!
//! [`Conversion::plan`] validates every input header, decides the output keys, shapes and
//! shards up front (all of them follow from the input shapes), and [`Conversion::step`] then
//! converts one input tensor per call, so a caller can report progress and stop between
//! tensors.
//!
//! Reading, quantizing and writing overlap, in bounded memory: a read-ahead thread `pread`s
//! the input in chunks of [`CHUNK_BYTES`] (not through the memory map, whose pages would
//! otherwise stay resident) into a few recycled buffers, one chunk ahead of the quantizer; a
//! write-behind thread per output shard streams the pieces through a [`SafetensorsWriter`]
//! (asking the kernel to write back as it goes, so the final fsync is short), which only
//! renames its file into place once complete. Copied tensors and 4-bit tensors without error
//! statistics stream chunk by chunk (block-aligned chunks quantize to the same bytes as the
//! whole tensor); int8 tensors and 4-bit tensors with statistics are read whole into one
//! reused tensor-sized buffer. A write error stops the conversion at the next tensor piece
//! with the writer's own error, and the partial shard is deleted.
//!
//! The caller owns the output folder: write into a staging folder and rename it into place
//! when [`Conversion::finish`] succeeds, so a failed run leaves nothing behind.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::Value;

use crate::blockwise::{dequantize_4bit_into, packed_len, quantize_4bit_into};
use crate::codebook::{dynamic_map, QuantType4};
use crate::double_quant::{double_dequantize, double_quantize, NESTED_BLOCKSIZE};
use crate::element::{Element, FloatDtype};
use crate::error::{check_blocksize, num_blocks, Error, Result};
use crate::int8::{dequantize_absmax, quantize_absmax, Granularity};
use crate::safetensors::{Dtype, SafetensorsFile, SafetensorsWriter, TensorInfo};
use crate::stats::{error_stats, ErrorStats};

/// Index file naming the shard of each tensor in a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single-file checkpoint name transformers uses.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Longest `repr` of a float32 widened to float64 ("-1.1754943508222875e-38"): the padded
/// width of `nested_offset` in the quant_state JSON (see [`quant_state_json`]).
const MAX_FLOAT_REPR: usize = 24;

/// Target format of the quantized tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Block-wise 4-bit (bitsandbytes `Linear4bit` / `Params4bit`).
    FourBit(QuantType4),
    /// LLM.int8() row-wise int8 (bitsandbytes `Linear8bitLt` / `Int8Params`).
    Int8,
}

impl Method {
    /// "nf4", "fp4" or "int8".
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "int8" => Ok(Method::Int8),
            other => QuantType4::parse(other).map(Method::FourBit),
        }
    }
}

/// How the packed 4-bit codes are stored (bitsandbytes' `quant_storage`): as uint8, or the
/// same bytes viewed as bfloat16 / float16 / float32 (for FSDP, which wants one dtype per
/// flat parameter), shaped `(packed_len / itemsize, 1)`. The bytes never change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuantStorage {
    #[default]
    U8,
    BF16,
    F16,
    F32,
}

impl QuantStorage {
    /// "uint8", "bfloat16", "float16" or "float32" (torch's names, as transformers records
    /// `bnb_4bit_quant_storage`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "uint8" => Ok(Self::U8),
            "bfloat16" => Ok(Self::BF16),
            "float16" => Ok(Self::F16),
            "float32" => Ok(Self::F32),
            other => Err(Error::UnknownDtype(other.into())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "uint8",
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
            Self::F32 => "float32",
        }
    }

    /// The safetensors dtype of the stored weight.
    pub fn dtype(self) -> Dtype {
        match self {
            Self::U8 => Dtype::U8,
            Self::BF16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
            Self::F32 => Dtype::F32,
        }
    }

    /// Shape of the stored weight holding `packed_len` bytes; bitsandbytes cannot view a
    /// byte count that is not a multiple of the item size, and neither does nybble.
    pub fn packed_shape(self, packed_len: usize) -> Result<Vec<usize>> {
        let itemsize = self.dtype().size_bytes();
        if !packed_len.is_multiple_of(itemsize) {
            return Err(Error::LengthMismatch {
                what: "packed 4-bit bytes for this quant_storage (a multiple of its item size)",
                expected: packed_len.next_multiple_of(itemsize),
                got: packed_len,
            });
        }
        Ok(vec![packed_len / itemsize, 1])
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvertOptions {
    pub method: Method,
    /// 4-bit block size (ignored for int8).
    pub blocksize: usize,
    /// Storage dtype of the packed 4-bit weights (ignored for int8).
    pub quant_storage: QuantStorage,
    /// Double-quantize the 4-bit block absmaxes (ignored for int8).
    pub double_quant: bool,
    /// Largest output shard in bytes (tensor data); one tensor larger than this gets a shard
    /// of its own.
    pub max_shard_bytes: u64,
    /// Dequantize each tensor again and compare it with the input (costs about a third more).
    pub error_stats: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            method: Method::FourBit(QuantType4::Nf4),
            blocksize: 64,
            quant_storage: QuantStorage::U8,
            double_quant: true,
            max_shard_bytes: 5_000_000_000,
            error_stats: true,
        }
    }
}

/// The default rule: 2-D float `.weight` tensors of linear layers, except embeddings,
/// output heads and norms, which lose too much accuracy (and which transformers keeps in
/// full precision too).
pub fn is_default_quantizable(name: &str, info: &TensorInfo) -> bool {
    if !is_quantizable(info) || !name.ends_with(".weight") {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    const EXCLUDED: [&str; 7] = ["embed", "wte", "wpe", "lm_head", "norm", "ln_", "layernorm"];
    !EXCLUDED.iter().any(|word| lower.contains(word))
}

/// Whether a tensor can be quantized at all: a non-empty 2-D float32 / float16 / bfloat16.
pub fn is_quantizable(info: &TensorInfo) -> bool {
    info.shape.len() == 2 && info.num_elements() > 0 && info.dtype.float_dtype().is_some()
}

/// Largest shard index read (the index of a 1000-shard model is a few MB).
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// The checkpoint files of `path`: the file itself, or in a folder the shards listed by
/// `model.safetensors.index.json` (sorted by name), else `model.safetensors`.
///
/// Every input must be a regular file (symlinks followed): a FIFO, device or socket is refused
/// before it is opened for reading ([`Error::NotRegularFile`]). A sharded folder's index and
/// its shards must agree ([`check_index`]): every listed tensor is in the shard the index
/// names, every tensor of a listed shard is listed, and a numbered series
/// (`model-00002-of-00003.safetensors`) is complete and fully listed; otherwise the folder is
/// an [`Error::InvalidIndex`] rather than a conversion that silently drops tensors.
pub fn resolve_inputs(path: &Path) -> Result<Vec<PathBuf>> {
    let io_error = |path: &Path, source| Error::Io {
        path: path.to_owned(),
        source,
    };
    // The OS error, so a missing path reads "No such file or directory".
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if !meta.is_dir() {
        if !meta.is_file() {
            return Err(Error::NotRegularFile {
                path: path.to_owned(),
                kind: crate::safetensors::file_kind(meta.file_type()),
            });
        }
        return Ok(vec![path.to_owned()]);
    }
    let index = path.join(INDEX_FILE);
    let index_meta = match std::fs::metadata(&index) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error(&index, e)),
    };
    if index_meta.is_some() {
        let invalid = |reason: String| Error::InvalidIndex {
            path: index.clone(),
            reason,
        };
        let text = crate::safetensors::read_small_text(&index, MAX_INDEX_BYTES)?;
        let weight_map = parse_index(&text).map_err(invalid)?;
        let mut names: Vec<&str> = Vec::new();
        for (_, file) in &weight_map {
            if !names.contains(&file.as_str()) {
                names.push(file);
            }
        }
        let mut shards = BTreeMap::new();
        for name in &names {
            let shard = path.join(name);
            match std::fs::metadata(&shard) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(invalid(format!("shard {name:?} does not exist")))
                }
                Err(e) => return Err(io_error(&shard, e)),
                Ok(_) => {}
            }
            let file = SafetensorsFile::open(&shard)?;
            let tensors: Vec<String> = file.tensors().map(|(t, _)| t.to_owned()).collect();
            shards.insert((*name).to_owned(), tensors);
        }
        let present: Vec<String> = std::fs::read_dir(path)
            .map_err(|e| io_error(path, e))?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect();
        // Unlisted members of a listed series too, so that a tensor listed in the wrong shard
        // is reported as stored in the unlisted one (not as a ghost).
        let series: Vec<(String, usize)> = names
            .iter()
            .filter_map(|n| shard_series(n).map(|(p, _, t, _, _)| (p.to_owned(), t)))
            .collect();
        for other in &present {
            let member = shard_series(other)
                .is_some_and(|(p, _, t, _, _)| series.iter().any(|(sp, st)| sp == p && *st == t));
            if member && !shards.contains_key(other) {
                let tensors = SafetensorsFile::open(&path.join(other))
                    .map(|f| f.tensors().map(|(t, _)| t.to_owned()).collect())
                    .unwrap_or_default();
                shards.insert(other.clone(), tensors);
            }
        }
        check_index(&weight_map, &shards, &present).map_err(invalid)?;
        let mut files: Vec<PathBuf> = names.iter().map(|n| path.join(n)).collect();
        files.sort();
        return Ok(files);
    }
    let single = path.join(SINGLE_FILE);
    match std::fs::metadata(&single) {
        Ok(m) if m.is_file() => Ok(vec![single]),
        Ok(m) => Err(Error::NotRegularFile {
            path: single,
            kind: crate::safetensors::file_kind(m.file_type()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NoCheckpoint {
            path: path.to_owned(),
        }),
        Err(e) => Err(io_error(&single, e)),
    }
}

/// The `weight_map` of a shard index, as `(tensor, shard file name)` pairs in file order, or
/// why the text is not a valid index: not JSON (nesting is bounded), no `weight_map` object,
/// a file name that is not a string or not a plain name in the folder, a tensor listed twice,
/// an empty map.
pub fn parse_index(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let (root, duplicate) = crate::safetensors::parse_json_with_duplicate(text)
        .map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(Value::Object(weight_map)) = root.get("weight_map") else {
        return Err("missing the \"weight_map\" object".into());
    };
    if let Some((Some(under), key)) = duplicate {
        if under == "weight_map" {
            return Err(format!("tensor {key:?} is listed more than once"));
        }
    }
    let mut out = Vec::with_capacity(weight_map.len());
    for (tensor, file) in weight_map {
        let Value::String(file) = file else {
            return Err(format!("tensor {tensor:?}: file name is not a string"));
        };
        // A shard must be a plain file name in the folder: no way out of it.
        if file.is_empty()
            || file.contains('/')
            || file.contains('\\')
            || file.contains('\0')
            || file.starts_with('.')
        {
            return Err(format!("tensor {tensor:?}: bad shard name {file:?}"));
        }
        out.push((tensor.clone(), file.clone()));
    }
    if out.is_empty() {
        return Err("\"weight_map\" is empty".into());
    }
    Ok(out)
}

/// `name` as a member of a numbered shard series: `("model", 2, 3)` for
/// `model-00002-of-00003.safetensors`, with the digit widths as written.
fn shard_series(name: &str) -> Option<(&str, usize, usize, usize, usize)> {
    let stem = name.strip_suffix(".safetensors")?;
    let (rest, total) = stem.rsplit_once("-of-")?;
    let (prefix, k) = rest.rsplit_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit());
    if prefix.is_empty() || !digits(k) || !digits(total) {
        return None;
    }
    Some((
        prefix,
        k.parse().ok()?,
        total.parse().ok()?,
        k.len(),
        total.len(),
    ))
}

/// Whether a shard index and its shards agree; the reason when they do not.
///
/// `weight_map` is [`parse_index`]'s result, `shards` the tensor names of every shard it lists
/// (and of any other shard read), `present` the file names in the folder. Refused: a tensor listed in a shard that does not
/// hold it (stored in another shard, or in none: a ghost), a tensor of a listed shard that the
/// index omits, a tensor stored in two shards, and a numbered series of shards with a member
/// missing from the folder or present but not listed (its tensors would be dropped).
pub fn check_index(
    weight_map: &[(String, String)],
    shards: &BTreeMap<String, Vec<String>>,
    present: &[String],
) -> std::result::Result<(), String> {
    let mut stored: HashMap<&str, &str> = HashMap::new();
    for (shard, tensors) in shards {
        for t in tensors {
            if let Some(other) = stored.insert(t, shard) {
                return Err(format!(
                    "tensor {t:?} is stored in both {other:?} and {shard:?}"
                ));
            }
        }
    }
    let listed_shards: std::collections::BTreeSet<&str> =
        weight_map.iter().map(|(_, s)| s.as_str()).collect();
    let mut listed: HashMap<&str, &str> = HashMap::with_capacity(weight_map.len());
    for (tensor, shard) in weight_map {
        if !shards.contains_key(shard) {
            return Err(format!(
                "shard {shard:?} (of tensor {tensor:?}) was not read"
            ));
        }
        match stored.get(tensor.as_str()) {
            Some(&s) if s == shard => {}
            Some(&s) => {
                return Err(format!(
                    "tensor {tensor:?} is listed in {shard:?} but stored in {s:?}"
                ))
            }
            None => {
                return Err(format!(
                    "tensor {tensor:?} is listed in {shard:?}, but no shard holds it"
                ))
            }
        }
        listed.insert(tensor, shard);
    }
    for (shard, tensors) in shards {
        if !listed_shards.contains(shard.as_str()) {
            continue;
        }
        if let Some(t) = tensors.iter().find(|t| !listed.contains_key(t.as_str())) {
            let missing = tensors
                .iter()
                .filter(|t| !listed.contains_key(t.as_str()))
                .count();
            return Err(format!(
                "tensor {t:?} of shard {shard:?} is not in the index ({missing} of its tensors are not)"
            ));
        }
    }
    // Numbered series: every member exists and is listed.
    let mut series = BTreeMap::new();
    for shard in &listed_shards {
        if let Some((prefix, _, total, kw, tw)) = shard_series(shard) {
            series.insert((prefix.to_owned(), total), (kw, tw));
        }
    }
    for ((prefix, total), (kw, tw)) in &series {
        if *total > 100_000 {
            return Err(format!("shard series {prefix:?} claims {total} shards"));
        }
        for k in 1..=*total {
            let name = format!("{prefix}-{k:0kw$}-of-{total:0tw$}.safetensors");
            if listed_shards.contains(name.as_str()) {
                continue;
            }
            return Err(if present.contains(&name) {
                format!("shard {name:?} exists but the index lists none of its tensors (they would be dropped)")
            } else {
                format!("shard {name:?} of the {total}-shard series is missing")
            });
        }
        // Members numbered outside 1..=total, or other spellings of the same series.
        for other in present {
            if let Some((p, k, t, _, _)) = shard_series(other) {
                if p == prefix && t == *total && !listed_shards.contains(other.as_str()) {
                    return Err(format!(
                        "shard {other:?} (number {k} of {total}) exists but the index does not list it"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// What happens to one input tensor.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    /// Index into the input files.
    pub file: usize,
    pub name: String,
    pub info: TensorInfo,
    pub quantize: bool,
    /// Output tensors (name, dtype, shape), in write order.
    pub outputs: Vec<(String, Dtype, Vec<usize>)>,
    /// Output shard index.
    pub shard: usize,
}

impl TensorPlan {
    pub fn in_bytes(&self) -> usize {
        self.info.num_bytes()
    }

    pub fn out_bytes(&self) -> usize {
        self.outputs
            .iter()
            .map(|(_, dtype, shape)| shape.iter().product::<usize>() * dtype.size_bytes())
            .sum()
    }
}

/// Result of converting one tensor.
#[derive(Clone, Debug)]
pub struct TensorReport {
    pub name: String,
    pub quantized: bool,
    pub num_elements: usize,
    pub in_bytes: usize,
    pub out_bytes: usize,
    /// Present for quantized tensors when [`ConvertOptions::error_stats`] is set.
    pub stats: Option<ErrorStats>,
}

struct Shard {
    file_name: String,
    /// Range of `Conversion::tensors` written to this shard.
    tensors: std::ops::Range<usize>,
}

/// A checkpoint conversion in progress; dropping it before [`finish`](Self::finish) removes
/// the partial shard being written.
pub struct Conversion {
    inputs: Vec<SafetensorsFile>,
    handles: Vec<File>,
    tensors: Vec<TensorPlan>,
    shards: Vec<Shard>,
    out_dir: PathBuf,
    options: ConvertOptions,
    metadata: BTreeMap<String, String>,
    next: usize,
    /// The read-ahead and write-behind threads, started by the first step (a Mutex only so
    /// that the conversion is `Sync`; it is only ever used through `&mut self`).
    pipeline: Mutex<Option<Pipeline>>,
    /// Set once a step failed: the threads' state no longer matches the plan.
    failed: bool,
}

impl Conversion {
    /// Opens and validates every input and lays out the output. `quantize` lists the tensors
    /// to quantize (each must be [`is_quantizable`]); use [`is_default_quantizable`] for the
    /// default choice.
    pub fn plan(
        inputs: &[PathBuf],
        quantize: &dyn Fn(&str, &TensorInfo) -> bool,
        out_dir: &Path,
        options: ConvertOptions,
    ) -> Result<Self> {
        if let Method::FourBit(_) = options.method {
            check_blocksize(options.blocksize)?;
        }
        let mut files = Vec::with_capacity(inputs.len());
        let mut handles = Vec::with_capacity(inputs.len());
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut tensors = Vec::new();
        for (i, path) in inputs.iter().enumerate() {
            let file = SafetensorsFile::open(path)?;
            handles.push(crate::safetensors::open_regular(path)?);
            for (name, info) in file.tensors() {
                if let Some(first) = seen.insert(name.to_owned(), i) {
                    return Err(Error::DuplicateTensor {
                        tensor: name.to_owned(),
                        first: inputs[first].clone(),
                        second: path.clone(),
                    });
                }
                let quantize = quantize(name, info);
                if quantize && !is_quantizable(info) {
                    return Err(Error::NotQuantizable {
                        path: path.clone(),
                        tensor: name.to_owned(),
                        dtype: info.dtype.name(),
                        shape: info.shape.clone(),
                    });
                }
                let outputs = if quantize {
                    quantized_outputs(name, info, &options).map_err(|source| Error::Tensor {
                        path: path.clone(),
                        tensor: name.to_owned(),
                        source: Box::new(source),
                    })?
                } else {
                    vec![(name.to_owned(), info.dtype, info.shape.clone())]
                };
                tensors.push(TensorPlan {
                    file: i,
                    name: name.to_owned(),
                    info: info.clone(),
                    quantize,
                    outputs,
                    shard: 0,
                });
            }
            files.push(file);
        }
        // Output keys must not collide with each other or with copied tensors (a checkpoint
        // that is already quantized would, for example).
        let mut out_names: HashMap<&str, &str> = HashMap::new();
        for t in &tensors {
            for (out, _, _) in &t.outputs {
                if let Some(other) = out_names.insert(out, &t.name) {
                    return Err(Error::OutputNameClash {
                        output: out.clone(),
                        first: other.to_owned(),
                        second: t.name.clone(),
                    });
                }
            }
        }
        let shards = assign_shards(&mut tensors, options.max_shard_bytes);
        // Keep the input's free-form metadata; transformers requires format "pt".
        let mut metadata = files
            .first()
            .and_then(|f| f.metadata().cloned())
            .unwrap_or_default();
        metadata.insert("format".into(), "pt".into());
        Ok(Self {
            inputs: files,
            handles,
            tensors,
            shards,
            out_dir: out_dir.to_owned(),
            options,
            metadata,
            next: 0,
            pipeline: Mutex::new(None),
            failed: false,
        })
    }

    pub fn tensors(&self) -> &[TensorPlan] {
        &self.tensors
    }

    /// Output shard file names, in order.
    pub fn shard_names(&self) -> Vec<&str> {
        self.shards.iter().map(|s| s.file_name.as_str()).collect()
    }

    /// Input tensors converted so far.
    pub fn position(&self) -> usize {
        self.next
    }

    /// Converts the next input tensor; `None` once all are done.
    pub fn step(&mut self) -> Result<Option<TensorReport>> {
        if self.failed {
            return Err(Error::Io {
                path: self.out_dir.clone(),
                source: std::io::Error::other("an earlier step of this conversion failed"),
            });
        }
        let result = self.step_inner();
        if result.is_err() {
            self.failed = true;
            // Stop the threads now: the shard being written is deleted.
            self.stop_pipeline();
        }
        result
    }

    fn step_inner(&mut self) -> Result<Option<TensorReport>> {
        let Some(plan) = self.tensors.get(self.next) else {
            return Ok(None);
        };
        let pipe_slot = self.pipeline.get_mut().unwrap_or_else(|e| e.into_inner());
        if pipe_slot.is_none() {
            *pipe_slot = Some(Pipeline::start(
                &self.inputs,
                &self.handles,
                &self.tensors,
                &self.options,
            )?);
        }
        let pipe = pipe_slot.as_mut().expect("started above");
        let shard = &self.shards[plan.shard];
        if pipe.writer.is_none() {
            let declared = self.tensors[shard.tensors.clone()]
                .iter()
                .flat_map(|t| t.outputs.iter().cloned())
                .collect();
            let writer = SafetensorsWriter::create(
                &self.out_dir.join(&shard.file_name),
                declared,
                Some(self.metadata.clone()),
            )?;
            pipe.writer = Some(WriteBehind::start(writer, pipe.recycle.clone())?);
        }
        let input_path = self.inputs[plan.file].path().to_owned();
        let with_tensor = |source: Error| Error::Tensor {
            path: input_path.clone(),
            tensor: plan.name.clone(),
            source: Box::new(source),
        };
        let stats = match read_mode(plan, &self.options) {
            ReadMode::Chunks(_) if !plan.quantize => {
                for _ in 0..read_count(plan, &self.options) {
                    let buf = pipe.next_read()?;
                    pipe.write(&plan.name, Piece::Input(buf))?;
                }
                None
            }
            ReadMode::Chunks(chunk) => {
                stream_4bit(pipe, plan, chunk, &self.options).map_err(|e| match e {
                    // The writer's and the reader's own errors name their file already.
                    e @ Error::Io { .. } => e,
                    e => with_tensor(e),
                })?;
                None
            }
            ReadMode::Whole => {
                let buf = pipe.next_read()?;
                let quantized = quantize_tensor(plan, buf.bytes(), &self.options);
                pipe.return_whole(buf);
                let (outputs, stats) = quantized.map_err(with_tensor)?;
                for ((name, _, _), data) in plan.outputs.iter().zip(outputs) {
                    pipe.write(name, Piece::Owned(data))?;
                }
                stats
            }
        };
        let report = TensorReport {
            name: plan.name.clone(),
            quantized: plan.quantize,
            num_elements: plan.info.num_elements(),
            in_bytes: plan.in_bytes(),
            out_bytes: plan.out_bytes(),
            stats,
        };
        self.next += 1;
        if self.next == shard.tensors.end {
            pipe.writer.take().expect("opened above").finish()?;
        }
        Ok(Some(report))
    }

    /// Stops the read-ahead and write-behind threads; an unfinished shard is deleted.
    fn stop_pipeline(&mut self) {
        let slot = self.pipeline.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(pipe) = slot.take() {
            pipe.stop();
        }
    }

    /// Converts whatever is left, then writes `model.safetensors.index.json` when the output
    /// has more than one shard.
    pub fn finish(mut self) -> Result<()> {
        while self.step()?.is_some() {}
        if self.shards.len() > 1 {
            let mut weight_map = BTreeMap::new();
            let mut total_size = 0u64;
            for t in &self.tensors {
                total_size += t.out_bytes() as u64;
                for (name, _, _) in &t.outputs {
                    weight_map.insert(name.clone(), self.shards[t.shard].file_name.clone());
                }
            }
            let index = serde_json::json!({
                "metadata": {"total_size": total_size},
                "weight_map": weight_map,
            });
            let path = self.out_dir.join(INDEX_FILE);
            let text = serde_json::to_string_pretty(&index).expect("plain JSON values");
            std::fs::write(&path, text + "\n").map_err(|source| Error::Io { path, source })?;
        }
        Ok(())
    }
}

impl Drop for Conversion {
    fn drop(&mut self) {
        self.stop_pipeline();
    }
}

/// Input bytes per streamed chunk (a multiple of every blocksize's bytes).
pub const CHUNK_BYTES: usize = 8 << 20;
/// Chunk buffers the read-ahead thread cycles through: one being quantized or written, one
/// read ahead, the rest queued for writing (copied tensors).
const READ_BUFFERS: usize = 4;
/// Pieces queued for the write-behind thread.
const WRITE_QUEUE: usize = 3;
/// Bytes appended to a shard between write-back hints.
const WRITEBACK_BYTES: u64 = 32 << 20;

/// A byte buffer with 8-byte-aligned storage (for every float type), reused between reads;
/// growing it zeroes only the new part.
struct Buf {
    data: Vec<u64>,
    len: usize,
}

impl Buf {
    fn new() -> Self {
        Self {
            data: Vec::new(),
            len: 0,
        }
    }

    fn set_len(&mut self, len: usize) {
        let words = len.div_ceil(8);
        if self.data.len() < words {
            self.data.resize(words, 0);
        }
        self.len = len;
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: u64 storage of at least `len` bytes.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const u8, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.data.as_mut_ptr() as *mut u8, self.len) }
    }
}

/// How one input tensor is read.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ReadMode {
    /// In pieces of this many bytes (the last one shorter).
    Chunks(usize),
    /// At once, into the tensor-sized buffer.
    Whole,
}

fn read_mode(plan: &TensorPlan, options: &ConvertOptions) -> ReadMode {
    if !plan.quantize {
        return ReadMode::Chunks(CHUNK_BYTES);
    }
    match options.method {
        Method::FourBit(_) if !options.error_stats => {
            // Whole blocks per chunk, so the chunks quantize as the tensor would.
            let item = plan.info.dtype.size_bytes();
            let per_chunk = (CHUNK_BYTES / item / options.blocksize).max(1) * options.blocksize;
            ReadMode::Chunks(per_chunk * item)
        }
        _ => ReadMode::Whole,
    }
}

/// Reads of one tensor (at least one, so an empty tensor still takes a turn).
fn read_count(plan: &TensorPlan, options: &ConvertOptions) -> usize {
    match read_mode(plan, options) {
        ReadMode::Chunks(chunk) => plan.in_bytes().div_ceil(chunk).max(1),
        ReadMode::Whole => 1,
    }
}

/// One read of the plan: `len` bytes at `offset` of input `file`.
#[derive(Clone, Copy, Debug)]
struct ReadItem {
    file: usize,
    offset: u64,
    len: usize,
    whole: bool,
}

/// A piece of an output tensor handed to the write-behind thread; input and packed buffers
/// go back to their pools once written.
enum Piece {
    Input(Buf),
    Packed(Vec<u8>),
    Owned(Cow<'static, [u8]>),
}

enum WriteMsg {
    Write(String, Piece),
    Finish,
}

/// The write-behind thread of one shard.
struct WriteBehind {
    tx: SyncSender<WriteMsg>,
    handle: JoinHandle<Result<()>>,
    packed_back: Receiver<Vec<u8>>,
}

impl WriteBehind {
    fn start(writer: SafetensorsWriter, recycle: Sender<Buf>) -> Result<Self> {
        let (tx, rx) = sync_channel::<WriteMsg>(WRITE_QUEUE);
        let (packed_tx, packed_back) = channel::<Vec<u8>>();
        let path = writer.path().to_owned();
        let handle = std::thread::Builder::new()
            .name("nybble-write".into())
            .spawn(move || write_behind(writer, rx, recycle, packed_tx))
            .map_err(|source| Error::Io { path, source })?;
        Ok(Self {
            tx,
            handle,
            packed_back,
        })
    }

    /// The thread's result: its error if a write failed (or it panicked: re-raised here).
    fn join(self) -> Result<()> {
        let Self { tx, handle, .. } = self;
        drop(tx);
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Writes what is queued, then finishes the shard (fsync, rename into place).
    fn finish(self) -> Result<()> {
        if self.tx.send(WriteMsg::Finish).is_err() {
            return self.join_failed();
        }
        self.join()
    }

    /// After a send failed: the thread stopped on an error, which this returns.
    fn join_failed(self) -> Result<()> {
        let path = PathBuf::new();
        match self.join() {
            Err(e) => Err(e),
            Ok(()) => Err(Error::Io {
                path,
                source: std::io::Error::other("the shard writer stopped early"),
            }),
        }
    }
}

/// The write-behind loop: appends each piece, hints write-back every [`WRITEBACK_BYTES`],
/// finishes on [`WriteMsg::Finish`]. Returning early (an error, or the conversion dropped)
/// drops the writer, which deletes its temporary file.
fn write_behind(
    mut writer: SafetensorsWriter,
    rx: Receiver<WriteMsg>,
    recycle: Sender<Buf>,
    packed_back: Sender<Vec<u8>>,
) -> Result<()> {
    for msg in rx {
        match msg {
            WriteMsg::Write(name, piece) => {
                let data: &[u8] = match &piece {
                    Piece::Input(b) => b.bytes(),
                    Piece::Packed(v) => v,
                    Piece::Owned(c) => c,
                };
                writer.write_tensor_part(&name, data)?;
                if writer.unsynced_bytes() >= WRITEBACK_BYTES {
                    writer.start_writeback()?;
                }
                // The pools may be gone (the conversion is ending): then the buffer is freed.
                match piece {
                    Piece::Input(b) => drop(recycle.send(b)),
                    Piece::Packed(v) => drop(packed_back.send(v)),
                    Piece::Owned(_) => {}
                }
            }
            WriteMsg::Finish => return writer.finish(),
        }
    }
    Err(Error::Io {
        path: writer.path().to_owned(),
        source: std::io::Error::other("the conversion was abandoned"),
    })
}

/// The read-ahead thread (over the whole plan) and the current shard's write-behind thread.
struct Pipeline {
    filled: Receiver<Result<Buf>>,
    recycle: Sender<Buf>,
    whole_back: Sender<Buf>,
    reader: Option<JoinHandle<()>>,
    writer: Option<WriteBehind>,
    /// Packed-chunk buffers written and returned, for reuse.
    packed_pool: Vec<Vec<u8>>,
}

impl Pipeline {
    fn start(
        inputs: &[SafetensorsFile],
        handles: &[File],
        tensors: &[TensorPlan],
        options: &ConvertOptions,
    ) -> Result<Self> {
        let mut items = Vec::new();
        for plan in tensors {
            let file = &inputs[plan.file];
            let info = file.info(&plan.name).expect("planned from this file");
            // parse_header checked that data_start + end lies within the file.
            let base = (file.header().data_start + info.data_offsets.0) as u64;
            let len = plan.in_bytes();
            match read_mode(plan, options) {
                ReadMode::Whole => items.push(ReadItem {
                    file: plan.file,
                    offset: base,
                    len,
                    whole: true,
                }),
                ReadMode::Chunks(chunk) => {
                    for k in 0..read_count(plan, options) {
                        let start = k * chunk;
                        items.push(ReadItem {
                            file: plan.file,
                            offset: base + start as u64,
                            len: chunk.min(len - start),
                            whole: false,
                        });
                    }
                }
            }
        }
        let mut files = Vec::with_capacity(handles.len());
        for (h, f) in handles.iter().zip(inputs) {
            let io_error = |source| Error::Io {
                path: f.path().to_owned(),
                source,
            };
            files.push((h.try_clone().map_err(io_error)?, f.path().to_owned()));
        }
        let (filled_tx, filled) = sync_channel::<Result<Buf>>(1);
        let (recycle, recycle_rx) = channel::<Buf>();
        let (whole_back, whole_rx) = channel::<Buf>();
        let path = files.first().map(|f| f.1.clone()).unwrap_or_default();
        let reader = std::thread::Builder::new()
            .name("nybble-read".into())
            .spawn(move || read_ahead(items, files, filled_tx, recycle_rx, whole_rx))
            .map_err(|source| Error::Io { path, source })?;
        Ok(Self {
            filled,
            recycle,
            whole_back,
            reader: Some(reader),
            writer: None,
            packed_pool: Vec::new(),
        })
    }

    /// The next read of the plan, in order.
    fn next_read(&mut self) -> Result<Buf> {
        match self.filled.recv() {
            Ok(result) => result,
            Err(_) => Err(Error::Io {
                path: PathBuf::new(),
                source: std::io::Error::other("the input reader stopped early"),
            }),
        }
    }

    fn return_chunk(&self, buf: Buf) {
        let _ = self.recycle.send(buf);
    }

    fn return_whole(&self, buf: Buf) {
        let _ = self.whole_back.send(buf);
    }

    /// A buffer for `len` packed bytes, reused when one has come back from the writer.
    fn packed_buffer(&mut self, len: usize) -> Vec<u8> {
        if let Some(w) = &self.writer {
            self.packed_pool.extend(w.packed_back.try_iter());
        }
        let mut v = self.packed_pool.pop().unwrap_or_default();
        v.resize(len, 0);
        v
    }

    /// Queues a piece for the shard writer; its error if it has stopped on one.
    fn write(&mut self, name: &str, piece: Piece) -> Result<()> {
        let w = self.writer.as_ref().expect("a shard writer is open");
        if w.tx.send(WriteMsg::Write(name.to_owned(), piece)).is_ok() {
            return Ok(());
        }
        self.writer.take().expect("checked above").join_failed()
    }

    /// Stops both threads: the shard writer abandons its file (deleted), the reader exits at
    /// its next hand-over.
    fn stop(mut self) {
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        let Self {
            filled,
            recycle,
            whole_back,
            reader,
            ..
        } = self;
        drop((filled, recycle, whole_back));
        if let Some(r) = reader {
            let _ = r.join();
        }
    }
}

/// The read-ahead loop: reads every item of the plan in order into a recycled buffer (the
/// single tensor-sized one for whole reads) and hands it over; stops after an error or when
/// the conversion stops listening.
fn read_ahead(
    items: Vec<ReadItem>,
    files: Vec<(File, PathBuf)>,
    filled: SyncSender<Result<Buf>>,
    recycle: Receiver<Buf>,
    whole_back: Receiver<Buf>,
) {
    let mut made = 0usize;
    let mut whole = Some(Buf::new());
    for item in items {
        let next = if item.whole {
            whole.take().or_else(|| whole_back.recv().ok())
        } else if let Ok(b) = recycle.try_recv() {
            Some(b)
        } else if made < READ_BUFFERS {
            made += 1;
            Some(Buf::new())
        } else {
            recycle.recv().ok()
        };
        let Some(mut buf) = next else { return };
        buf.set_len(item.len);
        let (handle, path) = &files[item.file];
        let result = handle
            .read_exact_at(buf.bytes_mut(), item.offset)
            .map(|()| buf)
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            });
        let failed = result.is_err();
        if filled.send(result).is_err() || failed {
            return;
        }
    }
}

/// Streams one 4-bit tensor: each block-aligned chunk is quantized as it arrives and its
/// packed bytes queued for writing; the block constants (double-quantized once all are
/// known) follow.
fn stream_4bit(
    pipe: &mut Pipeline,
    plan: &TensorPlan,
    chunk_bytes: usize,
    options: &ConvertOptions,
) -> Result<()> {
    let Method::FourBit(quant_type) = options.method else {
        unreachable!("only 4-bit tensors stream")
    };
    let n = plan.info.num_elements();
    let blocksize = options.blocksize;
    let item = plan.info.dtype.size_bytes();
    let chunk_elems = chunk_bytes / item;
    let mut absmax = vec![0.0f32; num_blocks(n, blocksize)];
    let weight = &plan.outputs[0].0;
    for k in 0..read_count(plan, options) {
        let buf = pipe.next_read()?;
        let start = k * chunk_elems;
        let len = buf.bytes().len() / item;
        let mut packed = pipe.packed_buffer(packed_len(len));
        let blocks = &mut absmax[start / blocksize..(start + len).div_ceil(blocksize)];
        let bytes = buf.bytes();
        let result = match plan.info.dtype.float_dtype() {
            Some(FloatDtype::F32) => quantize_4bit_into::<f32>(
                as_elements(bytes),
                blocksize,
                quant_type,
                &mut packed,
                blocks,
            ),
            Some(FloatDtype::F16) => quantize_4bit_into::<f16>(
                as_elements(bytes),
                blocksize,
                quant_type,
                &mut packed,
                blocks,
            ),
            Some(FloatDtype::BF16) => quantize_4bit_into::<bf16>(
                as_elements(bytes),
                blocksize,
                quant_type,
                &mut packed,
                blocks,
            ),
            None => Err(Error::UnknownDtype(plan.info.dtype.name().into())),
        };
        pipe.return_chunk(buf);
        result.map_err(|e| match e {
            // Indices of the whole tensor, not of the chunk.
            Error::NonFinite { index, value } => Error::NonFinite {
                index: index + start,
                value,
            },
            e => e,
        })?;
        pipe.write(weight, Piece::Packed(packed))?;
    }
    let table = f32_bytes(quant_type.table());
    let rest: Vec<Cow<'static, [u8]>> = if options.double_quant {
        let code = dynamic_map(true);
        let dq = double_quantize(&absmax, &code, NESTED_BLOCKSIZE)?;
        let json = quant_state_json(quant_type, options, &plan.info, Some(dq.offset))?;
        vec![
            Cow::Owned(dq.codes),
            Cow::Owned(table),
            Cow::Owned(f32_bytes(&dq.nested_absmax)),
            Cow::Owned(f32_bytes(&code)),
            Cow::Owned(json.into_bytes()),
        ]
    } else {
        let json = quant_state_json(quant_type, options, &plan.info, None)?;
        vec![
            Cow::Owned(f32_bytes(&absmax)),
            Cow::Owned(table),
            Cow::Owned(json.into_bytes()),
        ]
    };
    for ((name, _, _), data) in plan.outputs[1..].iter().zip(rest) {
        pipe.write(name, Piece::Owned(data))?;
    }
    Ok(())
}

/// Output keys, dtypes and shapes of one quantized tensor (bitsandbytes' serialization).
fn quantized_outputs(
    name: &str,
    info: &TensorInfo,
    options: &ConvertOptions,
) -> Result<Vec<(String, Dtype, Vec<usize>)>> {
    let n = info.num_elements();
    let prefix = name.strip_suffix(".weight").unwrap_or(name);
    Ok(match options.method {
        Method::Int8 => vec![
            (name.to_owned(), Dtype::I8, info.shape.clone()),
            (format!("{prefix}.SCB"), Dtype::F32, vec![info.shape[0]]),
            (format!("{prefix}.weight_format"), Dtype::U8, vec![]),
        ],
        Method::FourBit(quant_type) => {
            let nb = num_blocks(n, options.blocksize);
            let json_len = quant_state_json(quant_type, options, info, None)?.len();
            let storage = options.quant_storage;
            let mut out = vec![(
                name.to_owned(),
                storage.dtype(),
                storage.packed_shape(packed_len(n))?,
            )];
            if options.double_quant {
                out.push((format!("{name}.absmax"), Dtype::U8, vec![nb]));
                out.push((format!("{name}.quant_map"), Dtype::F32, vec![16]));
                out.push((
                    format!("{name}.nested_absmax"),
                    Dtype::F32,
                    vec![num_blocks(nb, NESTED_BLOCKSIZE)],
                ));
                out.push((format!("{name}.nested_quant_map"), Dtype::F32, vec![256]));
            } else {
                out.push((format!("{name}.absmax"), Dtype::F32, vec![nb]));
                out.push((format!("{name}.quant_map"), Dtype::F32, vec![16]));
            }
            out.push((
                format!("{name}.quant_state.bitsandbytes__{}", quant_type.name()),
                Dtype::U8,
                vec![json_len],
            ));
            out
        }
    })
}

/// bitsandbytes' `QuantState.as_dict(packed=True)` JSON, spelled as Python's `json.dumps`
/// spells it. With double quant the header must be written before `nested_offset` is known,
/// so the JSON is right-padded with spaces to the length of the longest possible offset
/// (JSON allows trailing whitespace; `offset: None` gives the padded length).
pub fn quant_state_json(
    quant_type: QuantType4,
    options: &ConvertOptions,
    info: &TensorInfo,
    offset: Option<f32>,
) -> Result<String> {
    let dtype = info
        .dtype
        .float_dtype()
        .ok_or_else(|| Error::UnknownDtype(info.dtype.name().into()))?;
    let shape: Vec<String> = info.shape.iter().map(usize::to_string).collect();
    let mut json = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        quant_type.name(),
        options.blocksize,
        dtype.torch_name(),
        shape.join(", ")
    );
    if options.double_quant {
        json.push_str(&format!(
            ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": "
        ));
        let width = json.len() + MAX_FLOAT_REPR + 1;
        if let Some(offset) = offset {
            json.push_str(&python_float_repr(offset as f64));
        }
        json.push('}');
        while json.len() < width {
            json.push(' ');
        }
    } else {
        json.push('}');
    }
    Ok(json)
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 or from
/// 1e16 on, with at least two exponent digits, and always a decimal point or exponent.
pub fn python_float_repr(v: f64) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let abs = v.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let s = format!("{v:e}");
        let (mantissa, exp) = s.split_once('e').expect("{:e} always has an exponent");
        let exp: i32 = exp.parse().expect("integer exponent");
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let s = format!("{v}");
    if s.contains('.') {
        s
    } else {
        s + ".0"
    }
}

/// Greedy sharding in input order, as transformers does: start a new shard when the next
/// tensor would push the current one past `max_bytes`.
fn assign_shards(tensors: &mut [TensorPlan], max_bytes: u64) -> Vec<Shard> {
    let mut ranges = vec![std::ops::Range { start: 0, end: 0 }];
    let mut size = 0u64;
    for (i, t) in tensors.iter_mut().enumerate() {
        let bytes = t.out_bytes() as u64;
        if size > 0 && size.saturating_add(bytes) > max_bytes {
            ranges.push(i..i);
            size = 0;
        }
        size += bytes;
        let last = ranges.last_mut().expect("never empty");
        last.end = i + 1;
        t.shard = ranges.len() - 1;
    }
    let count = ranges.len();
    ranges
        .into_iter()
        .enumerate()
        .map(|(i, tensors)| Shard {
            file_name: if count == 1 {
                SINGLE_FILE.to_owned()
            } else {
                format!("model-{:05}-of-{count:05}.safetensors", i + 1)
            },
            tensors,
        })
        .collect()
}

// safetensors data is little-endian and is reinterpreted in place below.
#[cfg(target_endian = "big")]
compile_error!("nybble_core::convert assumes a little-endian target");

/// Reinterprets little-endian tensor bytes as elements (the buffer is 8-byte aligned).
fn as_elements<T>(bytes: &[u8]) -> &[T] {
    assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
    // SAFETY: aligned (checked), and f32 / f16 / bf16 accept any bit pattern.
    unsafe {
        std::slice::from_raw_parts(
            bytes.as_ptr() as *const T,
            bytes.len() / std::mem::size_of::<T>(),
        )
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

type Outputs = (Vec<Cow<'static, [u8]>>, Option<ErrorStats>);

fn quantize_tensor(plan: &TensorPlan, bytes: &[u8], options: &ConvertOptions) -> Result<Outputs> {
    match plan.info.dtype.float_dtype() {
        Some(FloatDtype::F32) => quantize_typed::<f32>(plan, as_elements(bytes), options),
        Some(FloatDtype::F16) => quantize_typed::<f16>(plan, as_elements(bytes), options),
        Some(FloatDtype::BF16) => quantize_typed::<bf16>(plan, as_elements(bytes), options),
        None => Err(Error::UnknownDtype(plan.info.dtype.name().into())),
    }
}

fn quantize_typed<T: Element>(
    plan: &TensorPlan,
    x: &[T],
    options: &ConvertOptions,
) -> Result<Outputs> {
    let (rows, cols) = (plan.info.shape[0], plan.info.shape[1]);
    match options.method {
        Method::Int8 => {
            // bitsandbytes' Int8Params casts the weight to float16 before quantizing; do the
            // same so SCB and the codes match it bit for bit.
            let x16: Vec<f16> = x.par_iter().map(|v| f16::from_f32(v.to_f32())).collect();
            let q = quantize_absmax(&x16, rows, cols, Granularity::Row)?;
            drop(x16);
            let stats = if options.error_stats {
                let back = dequantize_absmax(&q.q, &q.absmax, rows, cols, Granularity::Row)?;
                Some(error_stats(x, &back)?)
            } else {
                None
            };
            // i8 -> u8 is a bit-for-bit reinterpretation.
            let codes: Vec<u8> = q.q.iter().map(|&v| v as u8).collect();
            let outputs = vec![
                Cow::Owned(codes),
                Cow::Owned(f32_bytes(&q.absmax)),
                Cow::Borrowed(&[0u8][..]),
            ];
            Ok((outputs, stats))
        }
        Method::FourBit(quant_type) => {
            let n = x.len();
            let blocksize = options.blocksize;
            let mut packed = vec![0u8; packed_len(n)];
            let mut absmax = vec![0.0f32; num_blocks(n, blocksize)];
            quantize_4bit_into(x, blocksize, quant_type, &mut packed, &mut absmax)?;
            let table = f32_bytes(quant_type.table());
            let (outputs, decoded_absmax) = if options.double_quant {
                let code = dynamic_map(true);
                let dq = double_quantize(&absmax, &code, NESTED_BLOCKSIZE)?;
                let json = quant_state_json(quant_type, options, &plan.info, Some(dq.offset))?;
                // The scales a loader will actually use, for the error statistics.
                let decoded = if options.error_stats {
                    double_dequantize(
                        &dq.codes,
                        &dq.nested_absmax,
                        dq.offset,
                        &code,
                        NESTED_BLOCKSIZE,
                    )?
                } else {
                    Vec::new()
                };
                let outputs = vec![
                    Cow::Owned(packed),
                    Cow::Owned(dq.codes),
                    Cow::Owned(table),
                    Cow::Owned(f32_bytes(&dq.nested_absmax)),
                    Cow::Owned(f32_bytes(&code)),
                    Cow::Owned(json.into_bytes()),
                ];
                (outputs, decoded)
            } else {
                let json = quant_state_json(quant_type, options, &plan.info, None)?;
                let outputs = vec![
                    Cow::Owned(packed),
                    Cow::Owned(f32_bytes(&absmax)),
                    Cow::Owned(table),
                    Cow::Owned(json.into_bytes()),
                ];
                (outputs, absmax)
            };
            let stats = if options.error_stats {
                let mut back = vec![T::from_f32(0.0); n];
                dequantize_4bit_into(
                    &outputs[0],
                    &decoded_absmax,
                    blocksize,
                    quant_type,
                    &mut back,
                )?;
                Some(error_stats(x, &back)?)
            } else {
                None
            };
            Ok((outputs, stats))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::write_safetensors;

    fn bf16_bytes(values: &[f32]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect()
    }

    fn info(dtype: Dtype, shape: &[usize]) -> TensorInfo {
        TensorInfo {
            dtype,
            shape: shape.to_vec(),
            data_offsets: (0, 0),
        }
    }

    #[test]
    fn default_rule() {
        let w = info(Dtype::BF16, &[8, 8]);
        assert!(is_default_quantizable(
            "model.layers.0.mlp.up_proj.weight",
            &w
        ));
        assert!(!is_default_quantizable(
            "model.layers.0.mlp.up_proj.bias",
            &w
        ));
        assert!(!is_default_quantizable("model.embed_tokens.weight", &w));
        assert!(!is_default_quantizable("transformer.wte.weight", &w));
        assert!(!is_default_quantizable("lm_head.weight", &w));
        assert!(!is_default_quantizable("model.norm.weight", &w));
        assert!(!is_default_quantizable("h.0.ln_1.weight", &w));
        assert!(!is_default_quantizable("x.LayerNorm.weight", &w));
        assert!(!is_default_quantizable(
            "a.weight",
            &info(Dtype::BF16, &[8])
        ));
        assert!(!is_default_quantizable(
            "a.weight",
            &info(Dtype::I32, &[8, 8])
        ));
    }

    #[test]
    fn python_float_repr_matches_python() {
        assert_eq!(
            python_float_repr(0.11392103135585785),
            "0.11392103135585785"
        );
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(0.0), "0.0");
        assert_eq!(python_float_repr(1.5e-5), "1.5e-05");
        assert_eq!(python_float_repr(-2.5e20), "-2.5e+20");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        let longest = python_float_repr(-f32::MIN_POSITIVE as f64);
        assert_eq!(longest, "-1.1754943508222875e-38");
        assert!(longest.len() <= MAX_FLOAT_REPR);
    }

    #[test]
    fn quant_state_json_is_padded_to_planned_length() {
        let opts = ConvertOptions::default();
        let i = info(Dtype::F32, &[384, 384]);
        let planned = quant_state_json(QuantType4::Nf4, &opts, &i, None).unwrap();
        let real = quant_state_json(QuantType4::Nf4, &opts, &i, Some(0.113_921_03)).unwrap();
        assert_eq!(planned.len(), real.len());
        assert_eq!(
            real.trim_end(),
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [384, 384], \
             \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.11392103135585785}"
        );
        let plain = ConvertOptions {
            double_quant: false,
            ..opts
        };
        let json = quant_state_json(QuantType4::Fp4, &plain, &i, None).unwrap();
        assert_eq!(
            json,
            "{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [384, 384]}"
        );
    }

    #[test]
    fn sharding_is_greedy_and_keeps_groups_together() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.safetensors");
        let w = bf16_bytes(&vec![0.5f32; 64 * 64]);
        let b = bf16_bytes(&[1.0f32; 64]);
        write_safetensors(
            &input,
            &[
                ("a.weight", Dtype::BF16, &[64, 64], &w),
                ("a.bias", Dtype::BF16, &[64], &b),
                ("b.weight", Dtype::BF16, &[64, 64], &w),
            ],
            None,
        )
        .unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let options = ConvertOptions {
            max_shard_bytes: 3600,
            ..Default::default()
        };
        let conv = Conversion::plan(&[input], &is_default_quantizable, &out, options).unwrap();
        assert_eq!(
            conv.shard_names(),
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        let shards: Vec<usize> = conv.tensors().iter().map(|t| t.shard).collect();
        assert_eq!(shards, [0, 0, 1]);
        conv.finish().unwrap();
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(
            index["weight_map"]["b.weight.absmax"],
            "model-00002-of-00002.safetensors"
        );
        let second = SafetensorsFile::open(&out.join("model-00002-of-00002.safetensors")).unwrap();
        assert_eq!(second.len(), 6);
        assert_eq!(second.metadata().unwrap()["format"], "pt");
    }

    #[test]
    fn converts_and_copies_bytes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.safetensors");
        let values: Vec<f32> = (0..96 * 40)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let w = bf16_bytes(&values);
        let ids: Vec<u8> = (0..16u8).collect();
        write_safetensors(
            &input,
            &[
                ("l.weight", Dtype::BF16, &[96, 40], &w),
                ("ids", Dtype::I32, &[4], &ids),
            ],
            None,
        )
        .unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let mut conv = Conversion::plan(
            &[input],
            &is_default_quantizable,
            &out,
            ConvertOptions::default(),
        )
        .unwrap();
        let first = conv.step().unwrap().unwrap();
        assert_eq!(first.name, "l.weight");
        let stats = first.stats.unwrap();
        assert!(stats.sqnr_db > 15.0, "{stats:?}");
        conv.finish().unwrap();
        let f = SafetensorsFile::open(&out.join(SINGLE_FILE)).unwrap();
        assert_eq!(f.data("ids").unwrap(), &ids[..]);
        let x: &[bf16] = as_elements(&w);
        let direct = crate::blockwise::quantize_4bit(x, 64, QuantType4::Nf4).unwrap();
        assert_eq!(f.data("l.weight").unwrap(), &direct.packed[..]);
        assert_eq!(f.info("l.weight").unwrap().shape, [96 * 40 / 2, 1]);
        assert_eq!(f.info("l.weight.absmax").unwrap().dtype, Dtype::U8);
        let json = f.data("l.weight.quant_state.bitsandbytes__nf4").unwrap();
        let parsed: Value = serde_json::from_slice(json).unwrap();
        assert_eq!(parsed["shape"], serde_json::json!([96, 40]));
        assert_eq!(parsed["dtype"], "bfloat16");
    }

    /// A checkpoint whose tensors span several chunks: an odd-sized bf16 weight (partial
    /// last block, odd element count), an f32 weight, a copied tensor bigger than a chunk,
    /// and an empty one.
    type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

    fn multi_chunk_checkpoint(dir: &Path) -> (PathBuf, Tensors) {
        let input = dir.join("in.safetensors");
        let mut s = 0x1234_5678u64;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        };
        let (r, c) = (1031usize, 4097usize); // 2.1 chunks of bf16, odd n
        let big: Vec<f32> = (0..r * c).map(|_| next()).collect();
        let small: Vec<f32> = (0..2_200_001).map(|_| next()).collect(); // f32, 1.05 chunks
        let copied: Vec<u8> = (0..CHUNK_BYTES * 2 + 999)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let tensors = vec![
            (
                "a.weight".to_owned(),
                Dtype::BF16,
                vec![r, c],
                bf16_bytes(&big),
            ),
            ("e.bias".to_owned(), Dtype::F32, vec![0], vec![]),
            ("c.ids".to_owned(), Dtype::U8, vec![copied.len()], copied),
            (
                "b.weight".to_owned(),
                Dtype::F32,
                vec![1, small.len()],
                f32_bytes(&small),
            ),
        ];
        let refs: Vec<(&str, Dtype, &[usize], &[u8])> = tensors
            .iter()
            .map(|(n, d, sh, b)| (n.as_str(), *d, sh.as_slice(), b.as_slice()))
            .collect();
        write_safetensors(&input, &refs, None).unwrap();
        (input, tensors)
    }

    #[test]
    fn streamed_chunks_write_the_bytes_of_whole_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let (input, tensors) = multi_chunk_checkpoint(dir.path());
        for (stats, dq, qt, bs) in [
            (false, true, QuantType4::Nf4, 64),
            (false, false, QuantType4::Fp4, 4096),
            (false, true, QuantType4::Fp4, 32),
            (true, true, QuantType4::Nf4, 128),
        ] {
            let out = dir.path().join(format!("out-{stats}-{dq}-{bs}"));
            std::fs::create_dir(&out).unwrap();
            let options = ConvertOptions {
                method: Method::FourBit(qt),
                blocksize: bs,
                double_quant: dq,
                error_stats: stats,
                ..ConvertOptions::default()
            };
            let conv = Conversion::plan(
                std::slice::from_ref(&input),
                &is_default_quantizable,
                &out,
                options,
            )
            .unwrap();
            conv.finish().unwrap();
            let f = SafetensorsFile::open(&out.join(SINGLE_FILE)).unwrap();
            for (name, dtype, _, bytes) in &tensors {
                if !name.ends_with(".weight") {
                    assert_eq!(f.data(name).unwrap(), &bytes[..], "{name}");
                    continue;
                }
                let q = match dtype {
                    Dtype::BF16 => {
                        crate::blockwise::quantize_4bit::<bf16>(as_elements(bytes), bs, qt)
                    }
                    _ => crate::blockwise::quantize_4bit::<f32>(as_elements(bytes), bs, qt),
                }
                .unwrap();
                assert_eq!(f.data(name).unwrap(), &q.packed[..], "{name} {options:?}");
                let absmax = f.data(&format!("{name}.absmax")).unwrap();
                if dq {
                    let d =
                        double_quantize(&q.absmax, &dynamic_map(true), NESTED_BLOCKSIZE).unwrap();
                    assert_eq!(absmax, &d.codes[..]);
                    let nested = f.data(&format!("{name}.nested_absmax")).unwrap();
                    assert_eq!(nested, &f32_bytes(&d.nested_absmax)[..]);
                } else {
                    assert_eq!(absmax, &f32_bytes(&q.absmax)[..]);
                }
            }
            // Nothing but the shard (no temporary files left behind).
            assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
        }
    }

    /// A conversion of `input` into the new folder `out`, default options without the error
    /// statistics (they need the whole tensor; these tests watch the chunked path).
    fn plan_without_stats(input: &Path, out: &Path) -> Conversion {
        std::fs::create_dir(out).unwrap();
        let options = ConvertOptions {
            error_stats: false,
            ..ConvertOptions::default()
        };
        Conversion::plan(
            &[input.to_path_buf()],
            &is_default_quantizable,
            out,
            options,
        )
        .unwrap()
    }

    #[test]
    fn streamed_non_finite_reports_the_tensor_index_and_leaves_no_shard() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.safetensors");
        let n = CHUNK_BYTES / 2 * 2 + 100; // three chunks of bf16
        let mut values = vec![0.25f32; n];
        let at = CHUNK_BYTES / 2 + 12_345; // in the second chunk
        values[at] = f32::INFINITY;
        write_safetensors(
            &input,
            &[("l.weight", Dtype::BF16, &[1, n], &bf16_bytes(&values))],
            None,
        )
        .unwrap();
        let out = dir.path().join("out");
        let mut conv = plan_without_stats(&input, &out);
        let err = conv.step().unwrap_err();
        assert!(
            matches!(err, Error::Tensor { ref source, .. } if matches!(**source, Error::NonFinite { index, .. } if index == at)),
            "{err}"
        );
        // The threads are stopped and the partial shard deleted at once; a later step refuses.
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
        assert!(conv.step().is_err());
        drop(conv);
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }

    #[test]
    fn dropping_a_conversion_midway_deletes_the_partial_shard() {
        let dir = tempfile::tempdir().unwrap();
        let (input, _) = multi_chunk_checkpoint(dir.path());
        let out = dir.path().join("out");
        let mut conv = plan_without_stats(&input, &out);
        conv.step().unwrap().unwrap();
        conv.step().unwrap().unwrap();
        drop(conv);
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }

    #[test]
    fn quant_storage_changes_only_the_weight_header() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.safetensors");
        let values: Vec<f32> = (0..64 * 40)
            .map(|i| ((i * 13 % 29) as f32) - 14.0)
            .collect();
        let w = bf16_bytes(&values);
        write_safetensors(&input, &[("l.weight", Dtype::BF16, &[64, 40], &w)], None).unwrap();
        let convert = |storage: QuantStorage| {
            let out = dir.path().join(storage.name());
            std::fs::create_dir(&out).unwrap();
            let options = ConvertOptions {
                quant_storage: storage,
                ..Default::default()
            };
            Conversion::plan(
                std::slice::from_ref(&input),
                &is_default_quantizable,
                &out,
                options,
            )
            .unwrap()
            .finish()
            .unwrap();
            SafetensorsFile::open(&out.join(SINGLE_FILE)).unwrap()
        };
        let base = convert(QuantStorage::U8);
        for (storage, dtype, rows) in [
            (QuantStorage::BF16, Dtype::BF16, 640),
            (QuantStorage::F16, Dtype::F16, 640),
            (QuantStorage::F32, Dtype::F32, 320),
        ] {
            let f = convert(storage);
            let info = f.info("l.weight").unwrap();
            assert_eq!((info.dtype, info.shape.clone()), (dtype, vec![rows, 1]));
            for name in base.names() {
                assert_eq!(f.data(name).unwrap(), base.data(name).unwrap(), "{name}");
                if name != "l.weight" {
                    assert_eq!(f.info(name).unwrap().dtype, base.info(name).unwrap().dtype);
                }
            }
        }
        assert_eq!(QuantStorage::parse("bfloat16").unwrap(), QuantStorage::BF16);
        assert!(matches!(
            QuantStorage::parse("int8"),
            Err(Error::UnknownDtype(_))
        ));
        // 3 x 3 elements pack into 5 bytes: no float32 view of them exists.
        let odd = dir.path().join("odd.safetensors");
        write_safetensors(
            &odd,
            &[("o.weight", Dtype::F32, &[3, 3], &f32_bytes(&[1.0; 9]))],
            None,
        )
        .unwrap();
        let options = ConvertOptions {
            quant_storage: QuantStorage::F32,
            ..Default::default()
        };
        let err = Conversion::plan(&[odd], &is_default_quantizable, dir.path(), options).err();
        assert!(
            matches!(err, Some(Error::Tensor { ref tensor, ref source, .. }) if tensor == "o.weight"
                && matches!(**source, Error::LengthMismatch { expected: 8, got: 5, .. }))
        );
    }

    #[test]
    fn nan_names_tensor_and_leaves_no_shard() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.safetensors");
        let mut values = vec![0.25f32; 64 * 2];
        values[77] = f32::NAN;
        let w = f32_bytes(&values);
        write_safetensors(&input, &[("l.weight", Dtype::F32, &[2, 64], &w)], None).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let conv = Conversion::plan(
            std::slice::from_ref(&input),
            &is_default_quantizable,
            &out,
            ConvertOptions::default(),
        )
        .unwrap();
        let err = conv.finish().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("in.safetensors") && msg.contains("l.weight"),
            "{msg}"
        );
        assert!(
            matches!(err, Error::Tensor { ref source, .. } if matches!(**source, Error::NonFinite { index: 77, .. }))
        );
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }

    #[test]
    fn rejects_non_quantizable_choice_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.safetensors");
        let b = dir.path().join("b.safetensors");
        write_safetensors(&a, &[("x.weight", Dtype::I8, &[2, 2], &[0u8; 4])], None).unwrap();
        write_safetensors(&b, &[("x.weight", Dtype::U8, &[4], &[0u8; 4])], None).unwrap();
        let out = dir.path();
        let all = |_: &str, _: &TensorInfo| true;
        let err = Conversion::plan(
            std::slice::from_ref(&a),
            &all,
            out,
            ConvertOptions::default(),
        )
        .err();
        assert!(matches!(err, Some(Error::NotQuantizable { .. })));
        let none = |_: &str, _: &TensorInfo| false;
        let err = Conversion::plan(&[a, b], &none, out, ConvertOptions::default()).err();
        assert!(matches!(err, Some(Error::DuplicateTensor { .. })));
    }

    /// Writes shard `name` holding one 4-byte U8 tensor per name in `tensors`.
    fn shard(dir: &Path, name: &str, tensors: &[&str]) {
        let data = [0u8; 4];
        let entries: Vec<(&str, Dtype, &[usize], &[u8])> = tensors
            .iter()
            .map(|t| (*t, Dtype::U8, &[4usize][..], &data[..]))
            .collect();
        write_safetensors(&dir.join(name), &entries, None).unwrap();
    }

    fn index(dir: &Path, map: &[(&str, &str)]) {
        let map: serde_json::Map<String, Value> = map
            .iter()
            .map(|(t, f)| ((*t).to_owned(), Value::String((*f).to_owned())))
            .collect();
        let text = serde_json::json!({"metadata": {}, "weight_map": map}).to_string();
        std::fs::write(dir.join(INDEX_FILE), text).unwrap();
    }

    fn index_error(dir: &Path) -> String {
        match resolve_inputs(dir) {
            Err(Error::InvalidIndex { reason, .. }) => reason,
            other => panic!("expected an invalid index, got {other:?}"),
        }
    }

    #[test]
    fn resolves_sharded_folder() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            resolve_inputs(dir.path()),
            Err(Error::NoCheckpoint { .. })
        ));
        shard(dir.path(), "s2.safetensors", &["a", "c"]);
        shard(dir.path(), "s1.safetensors", &["b"]);
        index(
            dir.path(),
            &[
                ("a", "s2.safetensors"),
                ("b", "s1.safetensors"),
                ("c", "s2.safetensors"),
            ],
        );
        let files = resolve_inputs(dir.path()).unwrap();
        assert_eq!(
            files,
            [
                dir.path().join("s1.safetensors"),
                dir.path().join("s2.safetensors")
            ]
        );
        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"weight_map": {"a": "../x"}}"#,
        )
        .unwrap();
        assert!(index_error(dir.path()).contains("bad shard name"));
    }

    #[test]
    fn index_and_shards_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        shard(d, "model-00001-of-00002.safetensors", &["a", "b"]);
        shard(d, "model-00002-of-00002.safetensors", &["c"]);
        let one = "model-00001-of-00002.safetensors";
        let two = "model-00002-of-00002.safetensors";
        index(d, &[("a", one), ("b", one), ("c", two)]);
        assert_eq!(resolve_inputs(d).unwrap().len(), 2);
        // The index omits a shard that exists: its tensors would be dropped.
        index(d, &[("a", one), ("b", one)]);
        let reason = index_error(d);
        assert!(
            reason.contains(two) && reason.contains("exists"),
            "{reason}"
        );
        // A tensor listed in the wrong shard.
        index(d, &[("a", one), ("b", two), ("c", two)]);
        let reason = index_error(d);
        assert!(
            reason.contains("\"b\" is listed in") && reason.contains("stored in"),
            "{reason}"
        );
        // A ghost tensor that no shard holds.
        index(d, &[("a", one), ("b", one), ("c", two), ("ghost", two)]);
        assert!(index_error(d).contains("no shard holds it"));
        // A tensor of a listed shard that the index omits.
        index(d, &[("a", one), ("c", two)]);
        assert!(index_error(d).contains("\"b\" of shard"));
        // A listed shard that does not exist.
        std::fs::remove_file(d.join(two)).unwrap();
        index(d, &[("a", one), ("b", one), ("c", two)]);
        assert!(index_error(d).contains("does not exist"));
        // A series member neither listed nor present.
        index(d, &[("a", one), ("b", one)]);
        assert!(index_error(d).contains("is missing"));
        // A tensor listed twice (JSON keeps the last silently).
        std::fs::write(
            d.join(INDEX_FILE),
            format!(r#"{{"weight_map": {{"a": "{one}", "b": "{one}", "a": "{one}"}}}}"#),
        )
        .unwrap();
        assert!(index_error(d).contains("more than once"));
    }

    #[test]
    fn index_json_is_bounded() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse_index(&deep).unwrap_err().contains("not valid JSON"));
        assert!(parse_index("[1, 2]").unwrap_err().contains("weight_map"));
        assert!(parse_index(r#"{"weight_map": {"a": 3}}"#)
            .unwrap_err()
            .contains("not a string"));
        assert!(parse_index(r#"{"weight_map": {}}"#)
            .unwrap_err()
            .contains("empty"));
    }

    #[test]
    fn non_regular_inputs_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("model.safetensors");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // As the folder's checkpoint, as a path of its own, and when opened directly.
        assert!(matches!(
            resolve_inputs(dir.path()),
            Err(Error::NotRegularFile { kind: "a FIFO", .. })
        ));
        assert!(matches!(
            resolve_inputs(&fifo),
            Err(Error::NotRegularFile { kind: "a FIFO", .. })
        ));
        assert!(matches!(
            SafetensorsFile::open(&fifo),
            Err(Error::NotRegularFile { .. })
        ));
        assert!(matches!(
            SafetensorsFile::open(dir.path()),
            Err(Error::NotRegularFile {
                kind: "a directory",
                ..
            })
        ));
        // A missing path reports the OS error, not "entity not found".
        let err = resolve_inputs(&dir.path().join("nope")).unwrap_err();
        assert!(
            err.to_string().contains("No such file or directory"),
            "{err}"
        );
    }
}
