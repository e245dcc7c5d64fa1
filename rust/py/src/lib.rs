//! nybble._core: thin PyO3 bindings over nybble-core.
//!
//! Arrays cross as 1-D contiguous numpy arrays without copies: float32 as float32, float16
//! and bfloat16 as uint16 bit patterns plus a dtype name (numpy has no bfloat16; the Python
//! layer views ml_dtypes / torch tensors this way). Work runs with the GIL released on a
//! rayon pool of the requested size.

// Tuples of numpy arrays are the natural return type of these bindings.
#![allow(clippy::type_complexity)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use half::{bf16, f16};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyOSError, PyOverflowError, PyPermissionError,
    PyValueError,
};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};
use pyo3::IntoPyObjectExt;

use nybble_core::codebook::{self, QuantType4};
use nybble_core::element::FloatDtype;
use nybble_core::int8::Granularity;
use nybble_core::safetensors::{Dtype as SafetensorsDtype, SafetensorsFile};
use nybble_core::{blockwise, convert, double_quant, int8, stats, Error};

// ---------------------------------------------------------------- errors

// NonFiniteError and CorruptFileError are defined in Python (nybble/errors.py) rather than
// with create_exception!: Python code raises them too (the optimizers, the CUDA paths), and
// one definition gives both sides the same documented attributes, defaults and constructor.
static NON_FINITE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static CORRUPT_FILE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static INTERNAL_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn error_class<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyType>>,
    name: &str,
) -> PyResult<Bound<'py, PyType>> {
    cell.import(py, "nybble.errors", name).cloned()
}

/// `(attribute name, value)` pairs for an exception.
macro_rules! attrs {
    ($py:expr; $($name:literal => $value:expr),* $(,)?) => {
        vec![$(($name, ($value).into_bound_py_any($py)?)),*]
    };
}

/// The one mapping of core errors to Python exceptions. The class says what kind of failure it
/// is (the classes callers already catch: NonFiniteError, CorruptFileError, ValueError,
/// OverflowError, OSError); attributes carry the variant's fields, so no caller parses text.
fn to_py_err(e: Error) -> PyErr {
    Python::attach(|py| {
        let message = e.to_string();
        match exception(py, &e, &message) {
            Ok(exc) => PyErr::from_value(exc),
            // Only when nybble.errors cannot be imported: still raise, with the message.
            Err(failure) => {
                let err = PyValueError::new_err(message);
                err.set_cause(py, Some(failure));
                err
            }
        }
    })
}

/// The exception for `e` with `message`. A `Tensor` wrapper hands its full message down, so
/// the exception has the inner error's class and fields plus `path` and `tensor`.
fn exception<'py>(py: Python<'py>, e: &Error, message: &str) -> PyResult<Bound<'py, PyAny>> {
    let value_error = || py.get_type::<PyValueError>();
    // Exhaustive on purpose: a new variant must choose its class and attributes here.
    let (class, attrs) = match e {
        Error::InvalidBlocksize(blocksize) => (value_error(), attrs![py; "blocksize" => blocksize]),
        Error::NonFinite { index, value } => (
            error_class(py, &NON_FINITE_ERROR, "NonFiniteError")?,
            attrs![py; "index" => index, "value" => value],
        ),
        Error::LengthMismatch {
            what,
            expected,
            got,
        } => (
            value_error(),
            attrs![py; "what" => what, "expected" => expected, "got" => got],
        ),
        Error::InvalidCodebook { expected, problem } => (
            value_error(),
            attrs![py; "expected" => expected, "problem" => problem],
        ),
        Error::ShapeMismatch {
            rows,
            cols,
            needed,
            len,
        } => (
            value_error(),
            attrs![py; "rows" => rows, "cols" => cols, "needed" => needed, "len" => len],
        ),
        Error::InvalidThreshold(threshold) => (value_error(), attrs![py; "threshold" => threshold]),
        Error::InvalidHyperParameter(reason) => (value_error(), attrs![py; "reason" => reason]),
        Error::SizeOverflow(what) => (py.get_type::<PyOverflowError>(), attrs![py; "what" => what]),
        Error::UnknownQuantType(quant_type) => {
            (value_error(), attrs![py; "quant_type" => quant_type])
        }
        Error::UnknownDtype(dtype) => (value_error(), attrs![py; "dtype" => dtype]),
        Error::InvalidGptqArgument(reason) => (value_error(), attrs![py; "reason" => reason]),
        Error::NotPositiveDefinite {
            column,
            pivot,
            damp,
        } => (
            value_error(),
            attrs![py; "column" => column, "pivot" => pivot, "damp" => damp],
        ),
        Error::UnsupportedSimd {
            requested,
            available,
        } => (
            value_error(),
            attrs![py; "requested" => requested, "available" => available],
        ),
        Error::Safetensors { path, source } => (
            error_class(py, &CORRUPT_FILE_ERROR, "CorruptFileError")?,
            attrs![py; "path" => path, "tensor" => source.tensor(), "reason" => source.to_string()],
        ),
        // The caller's mistake, not a damaged file: a plain ValueError.
        Error::WriterMisuse { path, source } => (
            value_error(),
            attrs![py; "path" => path, "tensor" => source.tensor(), "reason" => source.to_string()],
        ),
        Error::Tensor {
            path,
            tensor,
            source,
        } => {
            let exc = exception(py, source, message)?;
            exc.setattr("path", path)?;
            exc.setattr("tensor", tensor)?;
            return Ok(exc);
        }
        Error::NotQuantizable {
            path,
            tensor,
            dtype,
            shape,
        } => (
            value_error(),
            attrs![py; "path" => path, "tensor" => tensor, "dtype" => dtype, "shape" => shape],
        ),
        Error::DuplicateTensor {
            tensor,
            first,
            second,
        } => (
            value_error(),
            attrs![py; "tensor" => tensor, "first" => first, "second" => second],
        ),
        Error::OutputNameClash {
            output,
            first,
            second,
        } => (
            value_error(),
            attrs![py; "output" => output, "first" => first, "second" => second],
        ),
        Error::InvalidIndex { path, reason } => (
            error_class(py, &CORRUPT_FILE_ERROR, "CorruptFileError")?,
            attrs![py; "path" => path, "reason" => reason],
        ),
        Error::NoCheckpoint { path } => (
            py.get_type::<PyFileNotFoundError>(),
            attrs![py; "path" => path],
        ),
        // Not a checkpoint file either: refused before any read, so it cannot hang.
        Error::NotRegularFile { path, kind } => (
            error_class(py, &CORRUPT_FILE_ERROR, "CorruptFileError")?,
            attrs![py; "path" => path, "reason" => format!("not a regular file ({kind})")],
        ),
        Error::Io { path, source } => return io_exception(py, path, source, message),
    };
    let exc = class.call1((message,))?;
    for (name, value) in attrs {
        exc.setattr(name, value)?;
    }
    Ok(exc)
}

/// An I/O failure as Python's own OSError form where the OS gave an error code, so `errno`,
/// `strerror` and `filename` are set and the subclass (FileNotFoundError, PermissionError, ...)
/// is picked by Python; otherwise the message in the subclass the error kind names. Both get
/// `path` like every other error that names a file.
fn io_exception<'py>(
    py: Python<'py>,
    path: &std::path::Path,
    source: &std::io::Error,
    message: &str,
) -> PyResult<Bound<'py, PyAny>> {
    use std::io::ErrorKind;
    let exc = match source.raw_os_error() {
        Some(code) => {
            let strerror = py.import("os")?.getattr("strerror")?.call1((code,))?;
            py.get_type::<PyOSError>()
                .call1((code, strerror, path.as_os_str()))?
        }
        None => {
            let class = match source.kind() {
                ErrorKind::NotFound => py.get_type::<PyFileNotFoundError>(),
                ErrorKind::PermissionDenied => py.get_type::<PyPermissionError>(),
                ErrorKind::AlreadyExists => py.get_type::<PyFileExistsError>(),
                _ => py.get_type::<PyOSError>(),
            };
            class.call1((message,))?
        }
    };
    exc.setattr("path", path)?;
    Ok(exc)
}

// ---------------------------------------------------------------- thread pools

/// 0 means "rayon's default" (one thread per core).
static DEFAULT_THREADS: AtomicUsize = AtomicUsize::new(0);
/// The pools built so far, most recently used last.
static POOLS: OnceLock<Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>>> = OnceLock::new();
/// At most this many pools are kept; the least recently used one beyond it is dropped (its
/// threads exit once no call is using it).
const MAX_POOLS: usize = 4;
/// A request is capped at this many threads per core: more cannot run at once, and a
/// `threads=3000` must not start 3000 OS threads.
const MAX_THREADS_PER_CORE: usize = 4;

fn cores() -> usize {
    // Cached: on Linux `available_parallelism` reads the cgroup quota files on every call
    // (~50-90 us on the dev VM), which every binding call would pay.
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The thread count a request (`None`: the default, 0: one per core) actually gets: at most
/// `MAX_THREADS_PER_CORE` x the available parallelism.
fn effective_threads(threads: Option<usize>) -> usize {
    let n = match threads.unwrap_or_else(|| DEFAULT_THREADS.load(Ordering::Relaxed)) {
        0 => cores(),
        n => n,
    };
    n.min(MAX_THREADS_PER_CORE * cores())
}

/// The pool for `threads`, cached: requests that cap to the same count share one pool, and at
/// most `MAX_POOLS` pools (so at most `MAX_POOLS * MAX_THREADS_PER_CORE` threads per core)
/// stay alive, whatever sequence of counts is asked for.
fn pool(threads: Option<usize>) -> PyResult<Arc<rayon::ThreadPool>> {
    let n = effective_threads(threads);
    // A panic while holding the lock cannot leave the list inconsistent: take it anyway.
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(i) = pools.iter().position(|(k, _)| *k == n) {
        let entry = pools.remove(i);
        let p = entry.1.clone();
        pools.push(entry);
        return Ok(p);
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("nybble-{i}"))
        .build()
        .map_err(|e| PyValueError::new_err(format!("cannot start {n} threads: {e}")))?;
    let p = Arc::new(p);
    if pools.len() >= MAX_POOLS {
        pools.remove(0);
    }
    pools.push((n, p.clone()));
    Ok(p)
}

/// A Rust panic caught at the boundary, as `nybble.errors.InternalError`: a bug, reported as
/// an exception the caller can catch (`except Exception`), never an abort.
fn panic_to_py_err(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    Python::attach(|py| {
        let message = format!("internal error in nybble._core (please report it): {what}");
        match error_class(py, &INTERNAL_ERROR, "InternalError")
            .and_then(|c| c.call1((message.clone(),)))
        {
            Ok(exc) => PyErr::from_value(exc),
            Err(_) => pyo3::exceptions::PyRuntimeError::new_err(message),
        }
    })
}

/// Runs `f` with the GIL released on the pool for `threads`.
fn run<R: Send>(
    py: Python<'_>,
    threads: Option<usize>,
    f: impl FnOnce() -> nybble_core::Result<R> + Send,
) -> PyResult<R> {
    let p = pool(threads)?;
    // A panic in the core (a bug: every input is validated first) becomes an exception.
    py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.install(f))))
        .map_err(panic_to_py_err)?
        .map_err(to_py_err)
}

/// Panics inside the worker pool, for the test of the panic guard: the panic must reach
/// Python as `nybble.errors.InternalError`, never abort the interpreter.
#[pyfunction]
fn _test_panic(py: Python<'_>, message: &str) -> PyResult<()> {
    let message = message.to_owned();
    run(py, Some(1), move || -> nybble_core::Result<()> {
        panic!("{message}")
    })
}

/// Sets the default number of worker threads (0: one per core).
#[pyfunction]
fn set_num_threads(n: usize) {
    DEFAULT_THREADS.store(n, Ordering::Relaxed);
}

/// The default number of worker threads used when a call passes none (after the cap of
/// 4 threads per core).
#[pyfunction]
fn get_num_threads() -> usize {
    effective_threads(None)
}

/// The most threads any call gets: 4 x the available parallelism.
#[pyfunction]
fn max_threads() -> usize {
    effective_threads(Some(usize::MAX))
}

// ---------------------------------------------------------------- float arrays

// Arrays are borrowed with rust-numpy's `try_readonly` / `try_readwrite`, never with its
// `FromPyObject` impls (`PyReadonlyArray1` / `PyReadwriteArray1` as argument types), which
// panic when the borrow fails: the same array passed twice, once to be written (or two views
// of one buffer), or a read-only array to be written. A failed borrow is a ValueError.

fn borrow_error(e: numpy::BorrowError) -> PyErr {
    match e {
        numpy::BorrowError::NotWriteable => PyValueError::new_err(
            "an array to be written in place is read-only (its writeable flag is off)",
        ),
        _ => PyValueError::new_err(
            "the same array (or views of one buffer) was passed for two arguments, \
             one of them written in place",
        ),
    }
}

/// A read-only 1-D array argument, borrowed without panicking.
struct In<'py, T: numpy::Element>(PyReadonlyArray1<'py, T>);

/// A 1-D array argument written in place, borrowed without panicking.
struct InOut<'py, T: numpy::Element>(numpy::PyReadwriteArray1<'py, T>);

impl<'a, 'py, T: numpy::Element + 'a> FromPyObject<'a, 'py> for In<'py, T> {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let array = obj.cast::<PyArray1<T>>()?;
        array.try_readonly().map(In).map_err(borrow_error)
    }
}

impl<'a, 'py, T: numpy::Element + 'a> FromPyObject<'a, 'py> for InOut<'py, T> {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let array = obj.cast::<PyArray1<T>>()?;
        array.try_readwrite().map(InOut).map_err(borrow_error)
    }
}

impl<'py, T: numpy::Element> std::ops::Deref for In<'py, T> {
    type Target = PyReadonlyArray1<'py, T>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<'py, T: numpy::Element> std::ops::Deref for InOut<'py, T> {
    type Target = numpy::PyReadwriteArray1<'py, T>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<T: numpy::Element> std::ops::DerefMut for InOut<'_, T> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// Defines a 1-D contiguous float-array argument and its parser: float32, or the uint16 bit
/// patterns of float16 / bfloat16 named by a dtype string. Read-only and writable arrays are
/// different borrow types in rust-numpy, so one definition serves both.
macro_rules! float_array_arg {
    ($(#[$doc:meta])* $name:ident, $parse:ident, $array:ident, $wrap:ident, $needs:literal, $what:literal) => {
        $(#[$doc])*
        enum $name<'py> {
            F32(numpy::$array<'py, f32>),
            Bits16(numpy::$array<'py, u16>, FloatDtype),
        }

        fn $parse<'py>(x: &Bound<'py, PyAny>, dtype: &str) -> PyResult<$name<'py>> {
            let dt = FloatDtype::parse(dtype).map_err(to_py_err)?;
            let arr = match dt {
                FloatDtype::F32 => $name::F32(x.extract::<$wrap<'py, f32>>().map_err(|e| {
                    if e.is_instance_of::<PyValueError>(x.py()) {
                        return e;
                    }
                    PyValueError::new_err(concat!("dtype float32 needs a ", $needs, " float32 numpy array"))
                })?.0),
                _ => $name::Bits16(
                    x.extract::<$wrap<'py, u16>>().map_err(|e| {
                        if e.is_instance_of::<PyValueError>(x.py()) {
                            return e;
                        }
                        PyValueError::new_err(format!(
                            concat!("dtype {} needs a ", $needs, " uint16 numpy array of its bit patterns"),
                            dtype
                        ))
                    })?.0,
                    dt,
                ),
            };
            let contiguous = match &arr {
                $name::F32(a) => a.is_c_contiguous(),
                $name::Bits16(a, _) => a.is_c_contiguous(),
            };
            if !contiguous {
                return Err(PyValueError::new_err(concat!($what, " must be C-contiguous")));
            }
            Ok(arr)
        }
    };
}

float_array_arg!(
    /// A float input, read only.
    FloatIn, float_in, PyReadonlyArray1, In, "1-D", "input array"
);
float_array_arg!(
    /// A float array written in place.
    FloatInOut, float_in_out, PyReadwriteArray1, InOut, "writable 1-D", "array written in place"
);

fn u16_as<T>(s: &[u16]) -> &[T] {
    // SAFETY: f16 and bf16 are repr(transparent) over u16.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const T, s.len()) }
}

fn u16_as_mut<T>(s: &mut [u16]) -> &mut [T] {
    // SAFETY: f16 and bf16 are repr(transparent) over u16.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut T, s.len()) }
}

/// Calls `$body` with `$s` bound to the input as a typed slice.
macro_rules! with_floats {
    ($input:expr, |$s:ident| $body:expr) => {
        match &$input {
            FloatIn::F32(a) => {
                let $s: &[f32] = a.as_slice()?;
                $body
            }
            FloatIn::Bits16(a, FloatDtype::F16) => {
                let $s: &[f16] = u16_as(a.as_slice()?);
                $body
            }
            FloatIn::Bits16(a, _) => {
                let $s: &[bf16] = u16_as(a.as_slice()?);
                $body
            }
        }
    };
}

/// Allocates a float output of `n` elements (uint16 bits for 16-bit types) and fills it.
fn float_out<'py>(
    py: Python<'py>,
    n: usize,
    dtype: &str,
    threads: Option<usize>,
    fill: impl Fn(FloatOut<'_>) -> nybble_core::Result<()> + Send + Sync,
) -> PyResult<Bound<'py, PyAny>> {
    let dt = FloatDtype::parse(dtype).map_err(to_py_err)?;
    match dt {
        FloatDtype::F32 => {
            let out = empty::<f32>(py, n)?;
            {
                let mut rw = out.readwrite();
                let s = rw.as_slice_mut()?;
                run(py, threads, || fill(FloatOut::F32(s)))?;
            }
            Ok(out.into_any())
        }
        _ => {
            let out = empty::<u16>(py, n)?;
            {
                let mut rw = out.readwrite();
                let s = rw.as_slice_mut()?;
                run(py, threads, || {
                    if dt == FloatDtype::F16 {
                        fill(FloatOut::F16(u16_as_mut(s)))
                    } else {
                        fill(FloatOut::BF16(u16_as_mut(s)))
                    }
                })?;
            }
            Ok(out.into_any())
        }
    }
}

enum FloatOut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

macro_rules! with_out {
    ($out:expr, |$s:ident| $body:expr) => {
        match $out {
            FloatOut::F32($s) => $body,
            FloatOut::F16($s) => $body,
            FloatOut::BF16($s) => $body,
        }
    };
}

fn contiguous<'py, T: numpy::Element>(a: &PyReadonlyArray1<'py, T>, what: &str) -> PyResult<()> {
    if a.is_c_contiguous() {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!(
            "{what} must be C-contiguous"
        )))
    }
}

/// An uninitialised 1-D array of `n` elements allocated through numpy, so that a failed
/// allocation is a MemoryError (rust-numpy's constructors panic instead). Callers validate `n`
/// against their input buffers first. Only for outputs the core overwrites entirely (the
/// `_into` functions write every element, or fail and the array is dropped): no zeroing pass
/// over memory the kernel is about to write, and freed pages are reused warm.
fn empty<'py, T: numpy::Element>(py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyArray1<T>>> {
    let np = py.import("numpy")?;
    let out = np.getattr("empty")?.call1((n, numpy::dtype::<T>(py)))?;
    Ok(out.cast_into::<PyArray1<T>>()?)
}

fn vec_out<'py, T: numpy::Element>(py: Python<'py>, v: Vec<T>) -> Bound<'py, PyArray1<T>> {
    PyArray1::from_vec(py, v)
}

// ---------------------------------------------------------------- 4-bit

/// Block-wise 4-bit quantization. Returns (packed uint8 ((n+1)//2,), absmax float32 (nblocks,)).
/// `simd`: the SIMD level (as for the fused matmuls: `NYBBLE_SIMD`, else detected); every
/// level writes the same bytes.
#[pyfunction]
#[pyo3(signature = (x, dtype, blocksize, quant_type, threads=None, simd=None))]
fn quantize_4bit<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dtype: &str,
    blocksize: usize,
    quant_type: &str,
    threads: Option<usize>,
    simd: Option<&str>,
) -> PyResult<(Bound<'py, PyArray1<u8>>, Bound<'py, PyArray1<f32>>)> {
    let qt = QuantType4::parse(quant_type).map_err(to_py_err)?;
    let level = requested_simd_level(simd)?;
    let input = float_in(x, dtype)?;
    nybble_core::error::check_blocksize(blocksize).map_err(to_py_err)?;
    let n = match &input {
        FloatIn::F32(a) => a.len(),
        FloatIn::Bits16(a, _) => a.len(),
    };
    let packed = empty::<u8>(py, blockwise::packed_len(n))?;
    let absmax = empty::<f32>(py, nybble_core::error::num_blocks(n, blocksize))?;
    {
        let mut p = packed.readwrite();
        let mut a = absmax.readwrite();
        let (ps, as_) = (p.as_slice_mut()?, a.as_slice_mut()?);
        // On torch's OpenMP team where it has one, as the fused matmuls: its threads spin
        // after each torch op, and a second pool would fight them for the cores.
        with_floats!(input, |s| run_fused(py, threads, |t| {
            blockwise::quantize_4bit_into_on(t, s, blocksize, qt, ps, as_, level)
        })?);
    }
    Ok((packed, absmax))
}

/// Block-wise 4-bit dequantization of `n` elements into `out_dtype` (16-bit types as uint16 bits).
#[pyfunction]
#[pyo3(signature = (packed, absmax, n, blocksize, quant_type, out_dtype, threads=None, simd=None))]
#[allow(clippy::too_many_arguments)]
fn dequantize_4bit<'py>(
    py: Python<'py>,
    packed: In<'py, u8>,
    absmax: In<'py, f32>,
    n: usize,
    blocksize: usize,
    quant_type: &str,
    out_dtype: &str,
    threads: Option<usize>,
    simd: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    let qt = QuantType4::parse(quant_type).map_err(to_py_err)?;
    let level = requested_simd_level(simd)?;
    contiguous(&packed, "packed")?;
    contiguous(&absmax, "absmax")?;
    let (p, a) = (packed.as_slice()?, absmax.as_slice()?);
    // Sizes against the buffers before the output is allocated: `n` comes from a quant_state
    // (a file), and n=10**12 on a 4-byte input must be an error, not a 4 TB allocation.
    blockwise::check_4bit_sizes(n, blocksize, p.len(), a.len()).map_err(to_py_err)?;
    float_out(py, n, out_dtype, threads, |out| {
        with_out!(out, |o| blockwise::dequantize_4bit_into_with(
            p, a, blocksize, qt, o, level
        ))
    })
}

/// Block-wise 4-bit dequantization into a caller-owned `out` (float32, or uint16 bits of
/// float16 / bfloat16 named by `out_dtype`); `out`'s length is the element count. Lets a
/// caller reuse a buffer (or hand in torch-allocated memory) instead of a fresh allocation.
#[pyfunction]
#[pyo3(signature = (packed, absmax, blocksize, quant_type, out, out_dtype, threads=None, simd=None))]
#[allow(clippy::too_many_arguments)]
fn dequantize_4bit_into<'py>(
    py: Python<'py>,
    packed: In<'py, u8>,
    absmax: In<'py, f32>,
    blocksize: usize,
    quant_type: &str,
    out: &Bound<'py, PyAny>,
    out_dtype: &str,
    threads: Option<usize>,
    simd: Option<&str>,
) -> PyResult<()> {
    let qt = QuantType4::parse(quant_type).map_err(to_py_err)?;
    let level = requested_simd_level(simd)?;
    contiguous(&packed, "packed")?;
    contiguous(&absmax, "absmax")?;
    let (p, a) = (packed.as_slice()?, absmax.as_slice()?);
    let mut target = float_in_out(out, out_dtype)?;
    match &mut target {
        FloatInOut::F32(o) => {
            let o = o.as_slice_mut()?;
            run(py, threads, || {
                blockwise::dequantize_4bit_into_with(p, a, blocksize, qt, o, level)
            })
        }
        FloatInOut::Bits16(o, FloatDtype::F16) => {
            let o: &mut [f16] = u16_as_mut(o.as_slice_mut()?);
            run(py, threads, || {
                blockwise::dequantize_4bit_into_with(p, a, blocksize, qt, o, level)
            })
        }
        FloatInOut::Bits16(o, _) => {
            let o: &mut [bf16] = u16_as_mut(o.as_slice_mut()?);
            run(py, threads, || {
                blockwise::dequantize_4bit_into_with(p, a, blocksize, qt, o, level)
            })
        }
    }
}

// ---------------------------------------------------------------- 8-bit block-wise

/// Block-wise 8-bit quantization against a sorted 256-entry float32 codebook.
/// Returns (codes uint8 (n,), absmax float32 (nblocks,)). `simd` as for `quantize_4bit`.
#[pyfunction]
#[pyo3(signature = (x, dtype, code, blocksize, threads=None, simd=None))]
fn quantize_blockwise<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dtype: &str,
    code: In<'py, f32>,
    blocksize: usize,
    threads: Option<usize>,
    simd: Option<&str>,
) -> PyResult<(Bound<'py, PyArray1<u8>>, Bound<'py, PyArray1<f32>>)> {
    let level = requested_simd_level(simd)?;
    let input = float_in(x, dtype)?;
    contiguous(&code, "code")?;
    let c = code.as_slice()?;
    let q = with_floats!(input, |s| run(py, threads, || {
        blockwise::quantize_8bit_with(s, c, blocksize, level)
    })?);
    Ok((vec_out(py, q.codes), vec_out(py, q.absmax)))
}

/// Block-wise 8-bit dequantization into `out_dtype`.
#[pyfunction]
#[pyo3(signature = (codes, absmax, code, blocksize, out_dtype, threads=None))]
fn dequantize_blockwise<'py>(
    py: Python<'py>,
    codes: In<'py, u8>,
    absmax: In<'py, f32>,
    code: In<'py, f32>,
    blocksize: usize,
    out_dtype: &str,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyAny>> {
    contiguous(&codes, "codes")?;
    contiguous(&absmax, "absmax")?;
    contiguous(&code, "code")?;
    let (q, a, c) = (codes.as_slice()?, absmax.as_slice()?, code.as_slice()?);
    float_out(py, q.len(), out_dtype, threads, |out| {
        with_out!(out, |o| blockwise::dequantize_8bit_into(
            q, a, c, blocksize, o
        ))
    })
}

// ---------------------------------------------------------------- double quantization

/// Double quantization of float32 absmaxes. Returns (codes uint8, nested_absmax float32, offset).
/// `simd` as for `quantize_4bit`.
#[pyfunction]
#[pyo3(signature = (absmax, code, nested_blocksize=256, threads=None, simd=None))]
fn double_quantize<'py>(
    py: Python<'py>,
    absmax: In<'py, f32>,
    code: In<'py, f32>,
    nested_blocksize: usize,
    threads: Option<usize>,
    simd: Option<&str>,
) -> PyResult<(Bound<'py, PyArray1<u8>>, Bound<'py, PyArray1<f32>>, f32)> {
    let level = requested_simd_level(simd)?;
    contiguous(&absmax, "absmax")?;
    contiguous(&code, "code")?;
    let (a, c) = (absmax.as_slice()?, code.as_slice()?);
    let dq = run(py, threads, || {
        double_quant::double_quantize_with(a, c, nested_blocksize, level)
    })?;
    Ok((
        vec_out(py, dq.codes),
        vec_out(py, dq.nested_absmax),
        dq.offset,
    ))
}

/// Restores float32 absmaxes from double-quantized constants.
#[pyfunction]
#[pyo3(signature = (codes, nested_absmax, offset, code, nested_blocksize=256, threads=None))]
fn double_dequantize<'py>(
    py: Python<'py>,
    codes: In<'py, u8>,
    nested_absmax: In<'py, f32>,
    offset: f32,
    code: In<'py, f32>,
    nested_blocksize: usize,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    contiguous(&codes, "codes")?;
    contiguous(&nested_absmax, "nested_absmax")?;
    contiguous(&code, "code")?;
    let (q, n, c) = (
        codes.as_slice()?,
        nested_absmax.as_slice()?,
        code.as_slice()?,
    );
    let v = run(py, threads, || {
        double_quant::double_dequantize(q, n, offset, c, nested_blocksize)
    })?;
    Ok(vec_out(py, v))
}

/// Bits per parameter of a 4-bit tensor of `n` elements with its block constants.
#[pyfunction]
fn bits_per_parameter(n: usize, blocksize: usize, double_quant: bool) -> PyResult<f64> {
    double_quant::bits_per_parameter(n, blocksize, double_quant).map_err(to_py_err)
}

// ---------------------------------------------------------------- int8

fn granularity(name: &str) -> PyResult<Granularity> {
    Granularity::parse(name).map_err(|_| {
        PyValueError::new_err(format!(
            "unknown granularity {name:?}: expected \"tensor\", \"row\" or \"column\""
        ))
    })
}

/// Symmetric absmax int8 of a rows x cols matrix. Returns (q int8 (n,), absmax float32 (groups,)).
#[pyfunction]
#[pyo3(signature = (x, dtype, rows, cols, granularity_name, threads=None))]
fn int8_quantize_absmax<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dtype: &str,
    rows: usize,
    cols: usize,
    granularity_name: &str,
    threads: Option<usize>,
) -> PyResult<(Bound<'py, PyArray1<i8>>, Bound<'py, PyArray1<f32>>)> {
    let g = granularity(granularity_name)?;
    let input = float_in(x, dtype)?;
    let r = with_floats!(input, |s| run(py, threads, || int8::quantize_absmax(
        s, rows, cols, g
    ))?);
    Ok((vec_out(py, r.q), vec_out(py, r.absmax)))
}

#[pyfunction]
#[pyo3(signature = (q, absmax, rows, cols, granularity_name, threads=None))]
fn int8_dequantize_absmax<'py>(
    py: Python<'py>,
    q: In<'py, i8>,
    absmax: In<'py, f32>,
    rows: usize,
    cols: usize,
    granularity_name: &str,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let g = granularity(granularity_name)?;
    contiguous(&q, "q")?;
    contiguous(&absmax, "absmax")?;
    let (qs, a) = (q.as_slice()?, absmax.as_slice()?);
    let v = run(py, threads, || {
        int8::dequantize_absmax(qs, a, rows, cols, g)
    })?;
    Ok(vec_out(py, v))
}

/// Zero-point int8. Returns (q int8, scale float32, zero_point float32).
#[pyfunction]
#[pyo3(signature = (x, dtype, rows, cols, granularity_name, threads=None))]
#[allow(clippy::type_complexity)]
fn int8_quantize_zeropoint<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dtype: &str,
    rows: usize,
    cols: usize,
    granularity_name: &str,
    threads: Option<usize>,
) -> PyResult<(
    Bound<'py, PyArray1<i8>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
)> {
    let g = granularity(granularity_name)?;
    let input = float_in(x, dtype)?;
    let r = with_floats!(input, |s| run(py, threads, || int8::quantize_zeropoint(
        s, rows, cols, g
    ))?);
    Ok((
        vec_out(py, r.q),
        vec_out(py, r.scale),
        vec_out(py, r.zero_point),
    ))
}

#[pyfunction]
#[pyo3(signature = (q, scale, zero_point, rows, cols, granularity_name, threads=None))]
#[allow(clippy::too_many_arguments)]
fn int8_dequantize_zeropoint<'py>(
    py: Python<'py>,
    q: In<'py, i8>,
    scale: In<'py, f32>,
    zero_point: In<'py, f32>,
    rows: usize,
    cols: usize,
    granularity_name: &str,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let g = granularity(granularity_name)?;
    contiguous(&q, "q")?;
    contiguous(&scale, "scale")?;
    contiguous(&zero_point, "zero_point")?;
    let (qs, s, z) = (q.as_slice()?, scale.as_slice()?, zero_point.as_slice()?);
    let v = run(py, threads, || {
        int8::dequantize_zeropoint(qs, s, z, rows, cols, g)
    })?;
    Ok(vec_out(py, v))
}

/// Columns of a rows x cols matrix holding any |x| >= threshold, as int64.
#[pyfunction]
#[pyo3(signature = (x, dtype, rows, cols, threshold, threads=None))]
fn int8_outlier_columns<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dtype: &str,
    rows: usize,
    cols: usize,
    threshold: f32,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let input = float_in(x, dtype)?;
    let cols_found = with_floats!(input, |s| run(py, threads, || int8::outlier_columns(
        s, rows, cols, threshold
    ))?);
    Ok(vec_out(
        py,
        cols_found.into_iter().map(|c| c as i64).collect(),
    ))
}

/// LLM.int8() vector-wise quantization. Returns (q int8, row_absmax float32, outlier_cols int64).
#[pyfunction]
#[pyo3(signature = (x, dtype, rows, cols, threshold, threads=None))]
#[allow(clippy::type_complexity)]
fn int8_vectorwise_quant<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dtype: &str,
    rows: usize,
    cols: usize,
    threshold: f32,
    threads: Option<usize>,
) -> PyResult<(
    Bound<'py, PyArray1<i8>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<i64>>,
)> {
    let input = float_in(x, dtype)?;
    let r = with_floats!(input, |s| run(py, threads, || int8::vectorwise_quant(
        s, rows, cols, threshold
    ))?);
    let oc: Vec<i64> = r.outlier_cols.into_iter().map(|c| c as i64).collect();
    Ok((vec_out(py, r.q), vec_out(py, r.row_absmax), vec_out(py, oc)))
}

// ---------------------------------------------------------------- stats and codebooks

/// Error statistics of `b` against reference `a`: dict with n, rmse, max_abs, mean_abs, sqnr_db.
#[pyfunction]
#[pyo3(signature = (a, a_dtype, b, b_dtype, threads=None))]
fn error_stats<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    a_dtype: &str,
    b: &Bound<'py, PyAny>,
    b_dtype: &str,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let ia = float_in(a, a_dtype)?;
    let ib = float_in(b, b_dtype)?;
    let s = with_floats!(ia, |sa| with_floats!(ib, |sb| run(py, threads, || {
        stats::error_stats(sa, sb)
    })?));
    let d = PyDict::new(py);
    d.set_item("n", s.n)?;
    d.set_item("rmse", s.rmse)?;
    d.set_item("max_abs", s.max_abs)?;
    d.set_item("mean_abs", s.mean_abs)?;
    d.set_item("sqnr_db", s.sqnr_db)?;
    Ok(d)
}

/// The 16-entry code table of "nf4" or "fp4" (index = 4-bit code).
#[pyfunction]
fn code_4bit<'py>(py: Python<'py>, quant_type: &str) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let qt = QuantType4::parse(quant_type).map_err(to_py_err)?;
    Ok(vec_out(py, qt.table().to_vec()))
}

/// NF4 built from normal quantiles (QLoRA's construction).
#[pyfunction]
#[pyo3(signature = (offset=codebook::NF4_OFFSET))]
fn nf4_from_normal_quantiles(py: Python<'_>, offset: f64) -> PyResult<Bound<'_, PyArray1<f32>>> {
    if !(0.5 < offset && offset < 1.0) {
        return Err(PyValueError::new_err(format!(
            "offset must lie in (0.5, 1), got {offset}"
        )));
    }
    Ok(vec_out(
        py,
        codebook::nf4_from_normal_quantiles(offset).to_vec(),
    ))
}

/// bitsandbytes' 256-entry dynamic map (signed: first Adam moment and DQ; unsigned: second moment).
#[pyfunction]
#[pyo3(signature = (signed=true))]
fn dynamic_map(py: Python<'_>, signed: bool) -> Bound<'_, PyArray1<f32>> {
    vec_out(py, codebook::dynamic_map(signed).to_vec())
}

// ---------------------------------------------------------------- checkpoint conversion

/// The checkpoint files of a file or model folder (shards of model.safetensors.index.json,
/// else model.safetensors).
#[pyfunction]
fn resolve_checkpoint(path: std::path::PathBuf) -> PyResult<Vec<std::path::PathBuf>> {
    convert::resolve_inputs(&path).map_err(to_py_err)
}

/// The validated header of a safetensors file: (tensors, metadata) where tensors is a list of
/// (name, dtype, shape, data_start_offset, byte_length) in file order, offsets absolute.
#[pyfunction]
fn read_safetensors_header(
    path: std::path::PathBuf,
) -> PyResult<(
    Vec<(String, &'static str, Vec<usize>, usize, usize)>,
    Option<std::collections::BTreeMap<String, String>>,
)> {
    let file = SafetensorsFile::open(&path).map_err(to_py_err)?;
    let start = file.header().data_start;
    let tensors = file
        .tensors()
        .map(|(name, info)| {
            (
                name.to_owned(),
                info.dtype.name(),
                info.shape.clone(),
                start + info.data_offsets.0,
                info.num_bytes(),
            )
        })
        .collect();
    Ok((tensors, file.metadata().cloned()))
}

/// Whether the default rule quantizes this tensor (2-D float `.weight`, not an embedding,
/// head or norm).
#[pyfunction]
fn is_default_quantizable(name: &str, dtype: &str, shape: Vec<usize>) -> PyResult<bool> {
    let dtype = SafetensorsDtype::parse(dtype)
        .ok_or_else(|| to_py_err(Error::UnknownDtype(dtype.to_owned())))?;
    let info = nybble_core::safetensors::TensorInfo {
        dtype,
        shape,
        data_offsets: (0, 0),
    };
    Ok(convert::is_default_quantizable(name, &info))
}

/// A checkpoint conversion driven one tensor at a time from Python (for progress and
/// Ctrl-C): `step()` converts the next tensor with the GIL released.
#[pyclass(module = "nybble._core")]
struct Converter {
    inner: Option<convert::Conversion>,
    threads: Option<usize>,
}

#[pymethods]
impl Converter {
    #[new]
    #[pyo3(signature = (inputs, output_dir, quantize, *, method="nf4", blocksize=64, double_quant=true, max_shard_bytes=5_000_000_000, error_stats=true, threads=None, quant_storage="uint8"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        inputs: Vec<std::path::PathBuf>,
        output_dir: std::path::PathBuf,
        quantize: std::collections::HashSet<String>,
        method: &str,
        blocksize: usize,
        double_quant: bool,
        max_shard_bytes: u64,
        error_stats: bool,
        threads: Option<usize>,
        quant_storage: &str,
    ) -> PyResult<Self> {
        let options = convert::ConvertOptions {
            method: convert::Method::parse(method).map_err(to_py_err)?,
            blocksize,
            quant_storage: convert::QuantStorage::parse(quant_storage).map_err(to_py_err)?,
            double_quant,
            max_shard_bytes,
            error_stats,
        };
        let inner = py
            .detach(|| {
                convert::Conversion::plan(
                    &inputs,
                    &|name, _| quantize.contains(name),
                    &output_dir,
                    options,
                )
            })
            .map_err(to_py_err)?;
        Ok(Self {
            inner: Some(inner),
            threads,
        })
    }

    /// Planned tensors: dicts with name, dtype, shape, quantize, in_bytes, out_bytes, shard.
    fn plan<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.conversion()?
            .tensors()
            .iter()
            .map(|t| {
                let d = PyDict::new(py);
                d.set_item("name", &t.name)?;
                d.set_item("dtype", t.info.dtype.name())?;
                d.set_item("shape", t.info.shape.clone())?;
                d.set_item("quantize", t.quantize)?;
                d.set_item("in_bytes", t.in_bytes())?;
                d.set_item("out_bytes", t.out_bytes())?;
                d.set_item("shard", t.shard)?;
                Ok(d)
            })
            .collect()
    }

    /// Output shard file names.
    fn shard_names(&self) -> PyResult<Vec<String>> {
        Ok(self
            .conversion()?
            .shard_names()
            .into_iter()
            .map(str::to_owned)
            .collect())
    }

    /// Converts the next tensor; returns a dict (name, quantized, num_elements, in_bytes,
    /// out_bytes, stats) or None when all are done. Checks for Ctrl-C first.
    fn step<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        py.check_signals()?;
        let p = pool(self.threads)?;
        let conversion = self
            .inner
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("this conversion has already ended"))?;
        let report = match py.detach(|| p.install(|| conversion.step())) {
            Ok(report) => report,
            Err(e) => {
                // The partial shard is removed when the conversion is dropped.
                self.inner = None;
                return Err(to_py_err(e));
            }
        };
        let Some(r) = report else { return Ok(None) };
        let d = PyDict::new(py);
        d.set_item("name", r.name)?;
        d.set_item("quantized", r.quantized)?;
        d.set_item("num_elements", r.num_elements)?;
        d.set_item("in_bytes", r.in_bytes)?;
        d.set_item("out_bytes", r.out_bytes)?;
        match r.stats {
            Some(s) => {
                let st = PyDict::new(py);
                st.set_item("n", s.n)?;
                st.set_item("rmse", s.rmse)?;
                st.set_item("max_abs", s.max_abs)?;
                st.set_item("mean_abs", s.mean_abs)?;
                st.set_item("sqnr_db", s.sqnr_db)?;
                d.set_item("stats", st)?;
            }
            None => d.set_item("stats", py.None())?,
        }
        Ok(Some(d))
    }

    /// Converts what is left and writes the shard index; the conversion then ends.
    fn finish(&mut self, py: Python<'_>) -> PyResult<()> {
        let conversion = self
            .inner
            .take()
            .ok_or_else(|| PyValueError::new_err("this conversion has already ended"))?;
        let p = pool(self.threads)?;
        py.detach(|| p.install(|| conversion.finish()))
            .map_err(to_py_err)
    }

    /// Abandons the conversion, deleting the shard being written.
    fn abort(&mut self) {
        self.inner = None;
    }
}

impl Converter {
    fn conversion(&self) -> PyResult<&convert::Conversion> {
        self.inner
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("this conversion has already ended"))
    }
}

/// Writes a safetensors file atomically (temporary file + rename): `tensors` is a list of
/// (name, dtype, shape, data) with data a 1-D uint8 view of the tensor's little-endian bytes.
#[pyfunction]
#[pyo3(signature = (path, tensors, metadata=None))]
fn write_safetensors_file(
    py: Python<'_>,
    path: std::path::PathBuf,
    tensors: Vec<(String, String, Vec<usize>, In<'_, u8>)>,
    metadata: Option<std::collections::BTreeMap<String, String>>,
) -> PyResult<()> {
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, data) in &tensors {
        let dtype = SafetensorsDtype::parse(dtype)
            .ok_or_else(|| to_py_err(Error::UnknownDtype(dtype.clone())))?;
        contiguous(data, "tensor data")?;
        entries.push((name.as_str(), dtype, shape.as_slice(), data.as_slice()?));
    }
    py.detach(|| nybble_core::safetensors::write_safetensors(&path, &entries, metadata))
        .map_err(to_py_err)
}

// ---------------------------------------------------------------- optimizers

#[allow(clippy::too_many_arguments)]
fn adamw_hp(
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step: u64,
) -> nybble_core::optim::AdamW {
    nybble_core::optim::AdamW {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
    }
}

/// Calls `$body` with `$p` (mutable param slice) and `$g` (grad slice) of one element type.
macro_rules! with_param_grad {
    ($param:expr, $grad:expr, |$p:ident, $g:ident| $body:expr) => {
        match (&mut $param, &$grad) {
            (FloatInOut::F32(pa), FloatIn::F32(ga)) => {
                let $p: &mut [f32] = pa.as_slice_mut()?;
                let $g: &[f32] = ga.as_slice()?;
                $body
            }
            (FloatInOut::Bits16(pa, FloatDtype::F16), FloatIn::Bits16(ga, FloatDtype::F16)) => {
                let $p: &mut [f16] = u16_as_mut(pa.as_slice_mut()?);
                let $g: &[f16] = u16_as(ga.as_slice()?);
                $body
            }
            (FloatInOut::Bits16(pa, FloatDtype::BF16), FloatIn::Bits16(ga, FloatDtype::BF16)) => {
                let $p: &mut [bf16] = u16_as_mut(pa.as_slice_mut()?);
                let $g: &[bf16] = u16_as(ga.as_slice()?);
                $body
            }
            _ => {
                return Err(PyValueError::new_err(
                    "param and grad must have the same dtype",
                ))
            }
        }
    };
}

/// One fused AdamW step with float32 states, in place: `param` (writable, `dtype`),
/// `grad` (same dtype), `exp_avg` and `exp_avg_sq` (writable float32). `step` counts from 1.
#[pyfunction]
#[pyo3(signature = (param, grad, dtype, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, threads=None))]
#[allow(clippy::too_many_arguments)]
fn adamw_step_32bit<'py>(
    py: Python<'py>,
    param: &Bound<'py, PyAny>,
    grad: &Bound<'py, PyAny>,
    dtype: &str,
    mut exp_avg: InOut<'py, f32>,
    mut exp_avg_sq: InOut<'py, f32>,
    step: u64,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    threads: Option<usize>,
) -> PyResult<()> {
    let mut p_arr = float_in_out(param, dtype)?;
    let g_arr = float_in(grad, dtype)?;
    let hp = adamw_hp(lr, beta1, beta2, eps, weight_decay, step);
    let m = exp_avg.as_slice_mut()?;
    let v = exp_avg_sq.as_slice_mut()?;
    with_param_grad!(p_arr, g_arr, |p, g| run(py, threads, || {
        nybble_core::optim::adamw_step_32bit(p, g, m, v, &hp)
    }))
}

/// One fused AdamW step with 8-bit block-wise states, in place: `state1` / `state2` uint8
/// codes, `absmax1` / `absmax2` float32 per block, `code1` / `code2` the 256-entry maps
/// (signed dynamic for the first moment, unsigned for the second).
#[pyfunction]
#[pyo3(signature = (param, grad, dtype, state1, state2, absmax1, absmax2, code1, code2, blocksize, step, lr, beta1, beta2, eps, weight_decay, threads=None))]
#[allow(clippy::too_many_arguments)]
fn adamw_step_8bit<'py>(
    py: Python<'py>,
    param: &Bound<'py, PyAny>,
    grad: &Bound<'py, PyAny>,
    dtype: &str,
    mut state1: InOut<'py, u8>,
    mut state2: InOut<'py, u8>,
    mut absmax1: InOut<'py, f32>,
    mut absmax2: InOut<'py, f32>,
    code1: In<'py, f32>,
    code2: In<'py, f32>,
    blocksize: usize,
    step: u64,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    threads: Option<usize>,
) -> PyResult<()> {
    let mut p_arr = float_in_out(param, dtype)?;
    let g_arr = float_in(grad, dtype)?;
    contiguous(&code1, "code1")?;
    contiguous(&code2, "code2")?;
    let hp = adamw_hp(lr, beta1, beta2, eps, weight_decay, step);
    let states = nybble_core::optim::States8 {
        codes1: state1.as_slice_mut()?,
        codes2: state2.as_slice_mut()?,
        absmax1: absmax1.as_slice_mut()?,
        absmax2: absmax2.as_slice_mut()?,
        code1: code1.as_slice()?,
        code2: code2.as_slice()?,
        blocksize,
    };
    with_param_grad!(p_arr, g_arr, |p, g| run(py, threads, || {
        nybble_core::optim::adamw_step_8bit(p, g, states, &hp)
    }))
}

// ---------------------------------------------------------------- fused CPU matmuls

/// The SIMD level a kernel call runs (fused matmuls, quantize, dequantize): `simd` if given,
/// else `NYBBLE_SIMD` (read at each call), else the best this CPU has. An unknown or
/// unavailable level is a ValueError.
fn requested_simd_level(simd: Option<&str>) -> PyResult<nybble_core::simd::SimdLevel> {
    let name = match simd {
        Some(s) => s.to_owned(),
        None => std::env::var("NYBBLE_SIMD").unwrap_or_default(),
    };
    nybble_core::simd::SimdLevel::parse(&name).map_err(to_py_err)
}

/// `GOMP_parallel` of an OpenMP runtime already loaded in the process (torch's libgomp):
/// when set, the fused matmuls run on that runtime's thread team, the threads torch's own ops
/// use (they spin between ops, so a second pool would fight them for the cores).
static GOMP_PARALLEL: std::sync::atomic::AtomicPtr<std::ffi::c_void> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

type GompParallel = unsafe extern "C" fn(
    unsafe extern "C" fn(*mut std::ffi::c_void),
    *mut std::ffi::c_void,
    std::ffi::c_uint,
    std::ffi::c_uint,
);

/// The address of `GOMP_parallel` in an already loaded `libgomp.so.1` (never loads one).
#[cfg(target_os = "linux")]
fn find_gomp_parallel() -> *mut std::ffi::c_void {
    extern "C" {
        fn dlopen(
            filename: *const std::ffi::c_char,
            flags: std::ffi::c_int,
        ) -> *mut std::ffi::c_void;
        fn dlsym(
            handle: *mut std::ffi::c_void,
            symbol: *const std::ffi::c_char,
        ) -> *mut std::ffi::c_void;
    }
    const RTLD_LAZY: std::ffi::c_int = 0x1;
    const RTLD_NOLOAD: std::ffi::c_int = 0x4;
    // SAFETY: plain C calls with NUL-terminated strings; RTLD_NOLOAD only returns a handle to
    // a library that is already loaded (whose constructors have run).
    unsafe {
        let handle = dlopen(c"libgomp.so.1".as_ptr(), RTLD_LAZY | RTLD_NOLOAD);
        if handle.is_null() {
            return std::ptr::null_mut();
        }
        dlsym(handle, c"GOMP_parallel".as_ptr())
    }
}

#[cfg(not(target_os = "linux"))]
fn find_gomp_parallel() -> *mut std::ffi::c_void {
    std::ptr::null_mut()
}

/// An OpenMP thread team as a fork-join [`nybble_core::parallel::Team`].
struct GompTeam {
    parallel: GompParallel,
    threads: usize,
}

impl nybble_core::parallel::Team for GompTeam {
    fn size(&self) -> usize {
        self.threads
    }

    fn run(&self, f: &(dyn Fn() + Sync)) {
        unsafe extern "C" fn member(data: *mut std::ffi::c_void) {
            // SAFETY: `data` points at the `&dyn Fn` below, alive until GOMP_parallel returns.
            let f = unsafe { *(data as *const &(dyn Fn() + Sync)) };
            // Never unwind into C (the tasks catch their own panics already).
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        }
        let mut fref: &(dyn Fn() + Sync) = f;
        let threads = std::ffi::c_uint::try_from(self.threads).unwrap_or(1);
        // SAFETY: GOMP_parallel(fn, data, num_threads, flags) calls `member(data)` on each of
        // the team's threads and returns once all have returned.
        unsafe {
            (self.parallel)(
                member,
                (&mut fref as *mut &(dyn Fn() + Sync)).cast(),
                threads,
                0,
            )
        }
    }
}

/// Selects the threads of the fused matmuls: "openmp" (the OpenMP runtime already loaded in
/// the process, i.e. torch's; falls back to "rayon" when there is none) or "rayon" (nybble's
/// own pools). Returns the backend now in use.
#[pyfunction]
fn set_parallel_backend(name: &str) -> PyResult<&'static str> {
    let ptr = match name {
        "openmp" => find_gomp_parallel(),
        "rayon" => std::ptr::null_mut(),
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown parallel backend {other:?}: expected \"openmp\" or \"rayon\""
            )))
        }
    };
    GOMP_PARALLEL.store(ptr, Ordering::Relaxed);
    Ok(parallel_backend())
}

/// The threads the fused matmuls run on: "openmp" or "rayon".
#[pyfunction]
fn parallel_backend() -> &'static str {
    if GOMP_PARALLEL.load(Ordering::Relaxed).is_null() {
        "rayon"
    } else {
        "openmp"
    }
}

/// Runs a fused matmul (or the 4-bit quantize) with the GIL released on the calling thread
/// plus `threads` - 1 others: the OpenMP team when one is selected, else the workers of the
/// rayon pool for `threads`, which join as they wake (no hand-off to a sleeping pool thread;
/// see `nybble_core::parallel`). A panic becomes InternalError as in `run`.
fn run_fused<R: Send>(
    py: Python<'_>,
    threads: Option<usize>,
    f: impl FnOnce(nybble_core::parallel::Threads) -> nybble_core::Result<R> + Send,
) -> PyResult<R> {
    let gomp = GOMP_PARALLEL.load(Ordering::Relaxed);
    let result = if gomp.is_null() {
        let p = pool(threads)?;
        py.detach(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                f(nybble_core::parallel::Threads::Pool(&p))
            }))
        })
    } else {
        // SAFETY: the address of GOMP_parallel, whose C signature GompParallel matches.
        let parallel = unsafe { std::mem::transmute::<*mut std::ffi::c_void, GompParallel>(gomp) };
        let team = GompTeam {
            parallel,
            threads: effective_threads(threads),
        };
        py.detach(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                f(nybble_core::parallel::Threads::Team(&team))
            }))
        })
    };
    result.map_err(panic_to_py_err)?.map_err(to_py_err)
}

/// The SIMD levels of the fused matmuls this CPU runs, lowest first ("portable" first).
#[pyfunction]
fn simd_levels() -> Vec<&'static str> {
    nybble_core::simd::SimdLevel::available()
        .into_iter()
        .map(|l| l.name())
        .collect()
}

/// The SIMD level a fused matmul would run with `simd` (None: `NYBBLE_SIMD`, else detected).
#[pyfunction]
#[pyo3(signature = (simd=None))]
fn simd_level(simd: Option<&str>) -> PyResult<&'static str> {
    Ok(requested_simd_level(simd)?.name())
}

/// Calls `$body` with `$x` (input slice) and `$o` (output slice) of one element type.
macro_rules! with_x_out {
    ($x:expr, $out:expr, |$xs:ident, $os:ident| $body:expr) => {
        match (&$x, &mut $out) {
            (FloatIn::F32(xa), FloatInOut::F32(oa)) => {
                let $xs: &[f32] = xa.as_slice()?;
                let $os: &mut [f32] = oa.as_slice_mut()?;
                $body
            }
            (FloatIn::Bits16(xa, FloatDtype::F16), FloatInOut::Bits16(oa, FloatDtype::F16)) => {
                let $xs: &[f16] = u16_as(xa.as_slice()?);
                let $os: &mut [f16] = u16_as_mut(oa.as_slice_mut()?);
                $body
            }
            (FloatIn::Bits16(xa, FloatDtype::BF16), FloatInOut::Bits16(oa, FloatDtype::BF16)) => {
                let $xs: &[bf16] = u16_as(xa.as_slice()?);
                let $os: &mut [bf16] = u16_as_mut(oa.as_slice_mut()?);
                $body
            }
            _ => return Err(PyValueError::new_err("x and out must have the same dtype")),
        }
    };
}

/// The checks both fused 4-bit entries make before reading any array: the quant type, the
/// SIMD level, and contiguous weight, absmax and bias arrays.
fn fused_4bit_args(
    quant_type: &str,
    simd: Option<&str>,
    packed: &PyReadonlyArray1<'_, u8>,
    absmax: &PyReadonlyArray1<'_, f32>,
    bias: &Option<PyReadonlyArray1<'_, f32>>,
) -> PyResult<(QuantType4, nybble_core::simd::SimdLevel)> {
    let qt = QuantType4::parse(quant_type).map_err(to_py_err)?;
    let level = requested_simd_level(simd)?;
    contiguous(packed, "packed")?;
    contiguous(absmax, "absmax")?;
    if let Some(b) = bias {
        contiguous(b, "bias")?;
    }
    Ok((qt, level))
}

/// Fused `out = x · Wᵀ (+ bias)` with a packed NF4 / FP4 W (`out_features × in_features`,
/// bitsandbytes layout) and float32 `absmax`: codes decoded in registers, never a dense W.
/// `x` is `rows × in_features` (flat, `dtype`), `out` a writable `rows × out_features` array of
/// the same dtype; `bias` is float32 or None. Every length is checked before any work.
#[pyfunction]
#[pyo3(signature = (x, dtype, rows, packed, absmax, out_features, in_features, blocksize, quant_type, bias, out, simd=None, threads=None))]
#[allow(clippy::too_many_arguments)]
fn matmul_4bit<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dtype: &str,
    rows: usize,
    packed: PyReadonlyArray1<'py, u8>,
    absmax: PyReadonlyArray1<'py, f32>,
    out_features: usize,
    in_features: usize,
    blocksize: usize,
    quant_type: &str,
    bias: Option<PyReadonlyArray1<'py, f32>>,
    out: &Bound<'py, PyAny>,
    simd: Option<&str>,
    threads: Option<usize>,
) -> PyResult<()> {
    let (qt, level) = fused_4bit_args(quant_type, simd, &packed, &absmax, &bias)?;
    let x_arr = float_in(x, dtype)?;
    let mut out_arr = float_in_out(out, dtype)?;
    let w = nybble_core::matmul::Packed4Matrix {
        packed: packed.as_slice()?,
        absmax: absmax.as_slice()?,
        out_features,
        in_features,
        blocksize,
        quant_type: qt,
    };
    let b = match &bias {
        Some(b) => Some(b.as_slice()?),
        None => None,
    };
    with_x_out!(x_arr, out_arr, |xs, os| run_fused(py, threads, |t| {
        nybble_core::matmul::matmul_4bit_on(t, xs, rows, &w, b, os, level)
    }))
}

/// The torch dtypes the fused kernels take, looked up once: float32, float16, bfloat16, int8
/// (indexed by the `TORCH_*` positions below).
static TORCH_DTYPES: PyOnceLock<[Py<PyAny>; 4]> = PyOnceLock::new();
const TORCH_FLOAT32: usize = 0;
const TORCH_FLOAT16: usize = 1;
const TORCH_BFLOAT16: usize = 2;
const TORCH_INT8: usize = 3;

fn torch_dtypes(py: Python<'_>) -> PyResult<&[Py<PyAny>; 4]> {
    TORCH_DTYPES.get_or_try_init(py, || -> PyResult<_> {
        let torch = py.import("torch")?;
        Ok([
            torch.getattr("float32")?.unbind(),
            torch.getattr("float16")?.unbind(),
            torch.getattr("bfloat16")?.unbind(),
            torch.getattr("int8")?.unbind(),
        ])
    })
}

/// (address, elements) of a contiguous CPU tensor of `elem_size`-byte elements, read through
/// the tensor's own accessors (what `__array_interface__` views would read, without building
/// one per call); the address is non-null and aligned when there are elements. `what` names
/// the argument in errors.
fn cpu_tensor_memory(
    t: &Bound<'_, PyAny>,
    what: &str,
    elem_size: usize,
) -> PyResult<(usize, usize)> {
    let py = t.py();
    if !t.getattr(intern!(py, "is_cpu"))?.is_truthy()? {
        return Err(PyValueError::new_err(format!(
            "{what} must be a CPU tensor"
        )));
    }
    if !t.call_method0(intern!(py, "is_contiguous"))?.is_truthy()? {
        return Err(PyValueError::new_err(format!("{what} must be contiguous")));
    }
    let n: usize = t.call_method0(intern!(py, "numel"))?.extract()?;
    let addr: usize = t.call_method0(intern!(py, "data_ptr"))?.extract()?;
    if n > 0 && (addr == 0 || !addr.is_multiple_of(elem_size)) {
        return Err(PyValueError::new_err(format!(
            "{what} has no addressable memory (address {addr:#x})"
        )));
    }
    Ok((addr, n))
}

/// The memory of a contiguous CPU torch tensor of a float dtype the fused kernels take:
/// (address, elements, dtype); see [`cpu_tensor_memory`].
fn cpu_float_tensor(t: &Bound<'_, PyAny>, what: &str) -> PyResult<(usize, usize, FloatDtype)> {
    let py = t.py();
    let dtypes = torch_dtypes(py)?;
    let dtype = t.getattr(intern!(py, "dtype"))?;
    let dt = if dtype.is(&dtypes[TORCH_FLOAT32]) {
        FloatDtype::F32
    } else if dtype.is(&dtypes[TORCH_FLOAT16]) {
        FloatDtype::F16
    } else if dtype.is(&dtypes[TORCH_BFLOAT16]) {
        FloatDtype::BF16
    } else {
        return Err(PyValueError::new_err(format!(
            "{what} must be a float32, float16 or bfloat16 tensor, not {dtype}"
        )));
    };
    let (addr, n) = cpu_tensor_memory(t, what, if dt == FloatDtype::F32 { 4 } else { 2 })?;
    Ok((addr, n, dt))
}

/// [`cpu_tensor_memory`] of a tensor that must have torch dtype `dtypes[index]` (named `name`).
fn cpu_tensor_of(
    t: &Bound<'_, PyAny>,
    what: &str,
    index: usize,
    name: &str,
    elem_size: usize,
) -> PyResult<(usize, usize)> {
    let py = t.py();
    let dtype = t.getattr(intern!(py, "dtype"))?;
    if !dtype.is(&torch_dtypes(py)?[index]) {
        return Err(PyValueError::new_err(format!(
            "{what} must be a torch.{name} tensor, not {dtype}"
        )));
    }
    cpu_tensor_memory(t, what, elem_size)
}

/// Whether byte ranges `[a, a + alen)` and `[b, b + blen)` share a byte.
fn overlaps(a: usize, alen: usize, b: usize, blen: usize) -> bool {
    a < b + blen && b < a + alen
}

/// A typed view of tensor memory checked by [`cpu_tensor_memory`].
///
/// # Safety
/// `addr` is the aligned, non-null start of `len` elements of T (any address when `len` is
/// 0) that stay alive and unwritten for `'a`.
unsafe fn tensor_view<'a, T>(addr: usize, len: usize) -> &'a [T] {
    if len == 0 {
        &[]
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(addr as *const T, len) }
    }
}

/// [`tensor_view`], writable.
///
/// # Safety
/// As [`tensor_view`], and nothing else reads or writes the memory for `'a`.
unsafe fn tensor_view_mut<'a, T>(addr: usize, len: usize) -> &'a mut [T] {
    if len == 0 {
        &mut []
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(addr as *mut T, len) }
    }
}

/// x and out of a fused call on torch tensors, checked: contiguous CPU tensors of one float
/// dtype, x a whole number of `in_features` rows, out as many rows of `out_features`, and out
/// sharing no byte with x or any of `inputs` ((address, bytes) of the weight's arrays).
struct TensorXOut {
    x: (usize, usize),
    out: (usize, usize),
    dtype: FloatDtype,
    rows: usize,
}

impl TensorXOut {
    fn check(
        x: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        in_features: usize,
        out_features: usize,
        inputs: &[(usize, usize)],
    ) -> PyResult<Self> {
        let (x_addr, x_len, x_dt) = cpu_float_tensor(x, "x")?;
        let (o_addr, o_len, o_dt) = cpu_float_tensor(out, "out")?;
        if x_dt != o_dt {
            return Err(PyValueError::new_err("x and out must have the same dtype"));
        }
        if in_features == 0 || !x_len.is_multiple_of(in_features) {
            return Err(PyValueError::new_err(format!(
                "x has {x_len} elements, not a multiple of in_features = {in_features}"
            )));
        }
        let rows = x_len / in_features;
        if rows.checked_mul(out_features) != Some(o_len) {
            return Err(PyValueError::new_err(format!(
                "out has {o_len} elements, expected {rows} x {out_features}"
            )));
        }
        // out is written while x and the weight are read: no byte may be shared.
        let size = if x_dt == FloatDtype::F32 { 4 } else { 2 };
        let o_bytes = o_len * size;
        let shared = overlaps(o_addr, o_bytes, x_addr, x_len * size)
            || inputs.iter().any(|&(a, n)| overlaps(o_addr, o_bytes, a, n));
        if o_len > 0 && shared {
            return Err(PyValueError::new_err(
                "out overlaps x, the weight or the bias",
            ));
        }
        Ok(TensorXOut {
            x: (x_addr, x_len),
            out: (o_addr, o_len),
            dtype: x_dt,
            rows,
        })
    }
}

/// Runs `$body` with `$xs` / `$os` typed views of a [`TensorXOut`]'s x and out.
macro_rules! with_tensor_x_out {
    ($io:expr, |$xs:ident, $os:ident| $body:expr) => {{
        let io = &$io;
        // SAFETY: `TensorXOut::check` found both contiguous CPU tensors of this dtype whose
        // `numel` elements start at these addresses (the caller holds them for this call), and
        // out sharing no byte with x or the weight.
        unsafe {
            match io.dtype {
                FloatDtype::F32 => {
                    let $xs = tensor_view::<f32>(io.x.0, io.x.1);
                    let $os = tensor_view_mut::<f32>(io.out.0, io.out.1);
                    $body
                }
                FloatDtype::F16 => {
                    let $xs = tensor_view::<f16>(io.x.0, io.x.1);
                    let $os = tensor_view_mut::<f16>(io.out.0, io.out.1);
                    $body
                }
                FloatDtype::BF16 => {
                    let $xs = tensor_view::<bf16>(io.x.0, io.x.1);
                    let $os = tensor_view_mut::<bf16>(io.out.0, io.out.1);
                    $body
                }
            }
        }
    }};
}

/// [`matmul_4bit`] on torch tensors: `x` (`rows x in_features`) and `out` (`rows x
/// out_features`, written) contiguous CPU tensors of one float dtype, any leading shape. The
/// per-token decode path: no numpy views of x and out to build per call.
#[pyfunction]
#[pyo3(signature = (x, out, packed, absmax, out_features, in_features, blocksize, quant_type, bias=None, simd=None, threads=None))]
#[allow(clippy::too_many_arguments)]
fn matmul_4bit_tensor<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    packed: PyReadonlyArray1<'py, u8>,
    absmax: PyReadonlyArray1<'py, f32>,
    out_features: usize,
    in_features: usize,
    blocksize: usize,
    quant_type: &str,
    bias: Option<PyReadonlyArray1<'py, f32>>,
    simd: Option<&str>,
    threads: Option<usize>,
) -> PyResult<()> {
    let (qt, level) = fused_4bit_args(quant_type, simd, &packed, &absmax, &bias)?;
    let p = packed.as_slice()?;
    let a = absmax.as_slice()?;
    let b = match &bias {
        Some(b) => Some(b.as_slice()?),
        None => None,
    };
    let weight = [
        (p.as_ptr() as usize, p.len()),
        (a.as_ptr() as usize, a.len() * 4),
    ];
    let io = TensorXOut::check(x, out, in_features, out_features, &weight)?;
    let w = nybble_core::matmul::Packed4Matrix {
        packed: p,
        absmax: a,
        out_features,
        in_features,
        blocksize,
        quant_type: qt,
    };
    with_tensor_x_out!(io, |xs, os| run_fused(py, threads, |t| {
        nybble_core::matmul::matmul_4bit_on(t, xs, io.rows, &w, b, os, level)
    }))
}

/// The value of environment variable `name` (None when unset), read from the process
/// environment, which `os.environ` writes through: a cheaper read than `os.environ.get` for
/// the settings consulted on every fused call.
#[pyfunction]
fn env_var(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

/// Fused LLM.int8() linear: `out = x · Wᵀ (+ bias)` with `q_w` int8 (`out_features ×
/// in_features`, row-wise) and `scb` its float32 row absmax; x is quantized vector-wise with
/// outlier columns `|x| >= threshold` (0: none) kept in float32, int8 dot products are exact,
/// the epilogue is `int8_matmul_dequant`'s. Same array conventions as :func:`matmul_4bit`.
#[pyfunction]
#[pyo3(signature = (x, dtype, rows, q_w, scb, out_features, in_features, bias, threshold, out, simd=None, threads=None))]
#[allow(clippy::too_many_arguments)]
fn int8_linear<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dtype: &str,
    rows: usize,
    q_w: PyReadonlyArray1<'py, i8>,
    scb: PyReadonlyArray1<'py, f32>,
    out_features: usize,
    in_features: usize,
    bias: Option<PyReadonlyArray1<'py, f32>>,
    threshold: f32,
    out: &Bound<'py, PyAny>,
    simd: Option<&str>,
    threads: Option<usize>,
) -> PyResult<()> {
    let level = requested_simd_level(simd)?;
    contiguous(&q_w, "q_w")?;
    contiguous(&scb, "scb")?;
    if let Some(b) = &bias {
        contiguous(b, "bias")?;
    }
    let x_arr = float_in(x, dtype)?;
    let mut out_arr = float_in_out(out, dtype)?;
    let w = nybble_core::int8_matmul::Int8Matrix {
        q: q_w.as_slice()?,
        scb: scb.as_slice()?,
        out_features,
        in_features,
    };
    let b = match &bias {
        Some(b) => Some(b.as_slice()?),
        None => None,
    };
    with_x_out!(x_arr, out_arr, |xs, os| run_fused(py, threads, |t| {
        nybble_core::int8_matmul::int8_linear_on(t, xs, rows, &w, b, threshold, os, level)
    }))
}

/// [`int8_linear`] on torch tensors (the per-token decode path: no numpy views built per
/// call): `x` (`rows x in_features`) and `out` (`rows x out_features`, written) contiguous
/// CPU tensors of one float dtype, any leading shape; `q_w` int8 (`out_features x
/// in_features`), `scb` and `bias` float32, all contiguous CPU tensors; `out` shares no byte
/// with any of them.
#[pyfunction]
#[pyo3(signature = (x, out, q_w, scb, out_features, in_features, threshold, bias=None, simd=None, threads=None))]
#[allow(clippy::too_many_arguments)]
fn int8_linear_tensor<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    q_w: &Bound<'py, PyAny>,
    scb: &Bound<'py, PyAny>,
    out_features: usize,
    in_features: usize,
    threshold: f32,
    bias: Option<&Bound<'py, PyAny>>,
    simd: Option<&str>,
    threads: Option<usize>,
) -> PyResult<()> {
    let level = requested_simd_level(simd)?;
    let (q_addr, q_len) = cpu_tensor_of(q_w, "q_w", TORCH_INT8, "int8", 1)?;
    let (s_addr, s_len) = cpu_tensor_of(scb, "scb", TORCH_FLOAT32, "float32", 4)?;
    let bias_mem = match bias {
        Some(b) => Some(cpu_tensor_of(b, "bias", TORCH_FLOAT32, "float32", 4)?),
        None => None,
    };
    let mut inputs = vec![(q_addr, q_len), (s_addr, s_len * 4)];
    if let Some((b_addr, b_len)) = bias_mem {
        inputs.push((b_addr, b_len * 4));
    }
    let io = TensorXOut::check(x, out, in_features, out_features, &inputs)?;
    // SAFETY: contiguous CPU tensors of these dtypes whose `numel` elements start at the
    // checked addresses, kept alive by the caller for this call and not written (out shares no
    // byte with them). The core checks every length against the shapes.
    let w = nybble_core::int8_matmul::Int8Matrix {
        q: unsafe { tensor_view::<i8>(q_addr, q_len) },
        scb: unsafe { tensor_view::<f32>(s_addr, s_len) },
        out_features,
        in_features,
    };
    let b = bias_mem.map(|(addr, len)| unsafe { tensor_view::<f32>(addr, len) });
    with_tensor_x_out!(io, |xs, os| run_fused(py, threads, |t| {
        nybble_core::int8_matmul::int8_linear_on(t, xs, io.rows, &w, b, threshold, os, level)
    }))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Importing the classes here makes a missing nybble.errors fail the import, not an error.
    let py = m.py();
    // rust-numpy imports NumPy's C API on first use, running Python code (numpy's version
    // parsing) inside that call; a signal handler that raises there (SIGTERM during a
    // conversion) turned into a panic. Import it now, before any handler is installed.
    numpy::PyArray1::<f32>::zeros(py, 0, false);
    m.add(
        "NonFiniteError",
        error_class(py, &NON_FINITE_ERROR, "NonFiniteError")?,
    )?;
    m.add(
        "CorruptFileError",
        error_class(py, &CORRUPT_FILE_ERROR, "CorruptFileError")?,
    )?;
    m.add(
        "InternalError",
        error_class(py, &INTERNAL_ERROR, "InternalError")?,
    )?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(max_threads, m)?)?;
    m.add_function(wrap_pyfunction!(_test_panic, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit_into, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_blockwise, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_blockwise, m)?)?;
    m.add_function(wrap_pyfunction!(double_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(double_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(bits_per_parameter, m)?)?;
    m.add_function(wrap_pyfunction!(int8_quantize_absmax, m)?)?;
    m.add_function(wrap_pyfunction!(int8_dequantize_absmax, m)?)?;
    m.add_function(wrap_pyfunction!(int8_quantize_zeropoint, m)?)?;
    m.add_function(wrap_pyfunction!(int8_dequantize_zeropoint, m)?)?;
    m.add_function(wrap_pyfunction!(int8_outlier_columns, m)?)?;
    m.add_function(wrap_pyfunction!(int8_vectorwise_quant, m)?)?;
    m.add_function(wrap_pyfunction!(error_stats, m)?)?;
    m.add_function(wrap_pyfunction!(code_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(nf4_from_normal_quantiles, m)?)?;
    m.add_function(wrap_pyfunction!(dynamic_map, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(read_safetensors_header, m)?)?;
    m.add_function(wrap_pyfunction!(is_default_quantizable, m)?)?;
    m.add_function(wrap_pyfunction!(write_safetensors_file, m)?)?;
    m.add_class::<Converter>()?;
    m.add_class::<GptqHessian>()?;
    m.add_function(wrap_pyfunction!(adamw_step_32bit, m)?)?;
    m.add_function(wrap_pyfunction!(adamw_step_8bit, m)?)?;
    m.add_function(wrap_pyfunction!(simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(set_parallel_backend, m)?)?;
    m.add_function(wrap_pyfunction!(parallel_backend, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(matmul_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(matmul_4bit_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(int8_linear_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(env_var, m)?)?;
    m.add_function(wrap_pyfunction!(int8_linear, m)?)?;
    Ok(())
}

// ---------------------------------------------------------------- GPTQ

/// The damped inverse-Hessian factor of one layer input for GPTQ
/// (`nybble_core::gptq::HessianFactor`): built once from `h` (k x k float64, flattened
/// row-major, `2 XᵀX` over the calibration inputs), shared by every weight reading that input.
#[pyclass(module = "nybble._core", name = "GptqHessian", frozen)]
struct GptqHessian {
    inner: nybble_core::gptq::HessianFactor,
}

#[pymethods]
impl GptqHessian {
    #[new]
    #[pyo3(signature = (h, k, damp=0.01, act_order=false, threads=None))]
    fn new(
        py: Python<'_>,
        h: PyReadonlyArray1<'_, f64>,
        k: usize,
        damp: f64,
        act_order: bool,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        contiguous(&h, "h")?;
        let hs = h.as_slice()?;
        let inner = run(py, threads, || {
            nybble_core::gptq::HessianFactor::new(hs, k, damp, act_order)
        })?;
        Ok(Self { inner })
    }

    /// Columns of the layer input (k).
    #[getter]
    fn cols(&self) -> usize {
        self.inner.cols()
    }

    /// Absolute damping added to the diagonal (`damp * mean(diag H)`).
    #[getter]
    fn damp(&self) -> f64 {
        self.inner.damp()
    }

    /// Columns with `H_ii == 0` (their weights quantize to zero).
    #[getter]
    fn dead_columns(&self) -> usize {
        self.inner.dead_columns()
    }

    /// Processing order as int64: column `perm[t]` is rounded at step `t`.
    fn perm<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        vec_out(py, self.inner.perm().iter().map(|&p| p as i64).collect())
    }

    /// `U` (k*k float64, row-major, processing order): the upper Cholesky factor of the
    /// damped, permuted inverse Hessian.
    fn upper<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        vec_out(py, self.inner.upper().to_vec())
    }

    /// GPTQ of `w` (rows x k float32, flattened row-major) into bitsandbytes' 4-bit layout.
    /// Returns (packed uint8 ((n+1)//2,), absmax float32 (nblocks,), loss). `search_grid` 0
    /// takes `max |w|` per block; > 0 searches that many shrink factors in [min_shrink, 1]
    /// under `objective` ("sequential" or "diagonal"). `absmax` fixes every block's absmax.
    #[pyo3(signature = (w, rows, blocksize=64, quant_type="nf4", lazy_block=128, search_grid=0,
                        min_shrink=0.8, objective="sequential", absmax=None, threads=None))]
    #[allow(clippy::too_many_arguments)]
    fn quantize<'py>(
        &self,
        py: Python<'py>,
        w: PyReadonlyArray1<'py, f32>,
        rows: usize,
        blocksize: usize,
        quant_type: &str,
        lazy_block: usize,
        search_grid: usize,
        min_shrink: f64,
        objective: &str,
        absmax: Option<PyReadonlyArray1<'py, f32>>,
        threads: Option<usize>,
    ) -> PyResult<(Bound<'py, PyArray1<u8>>, Bound<'py, PyArray1<f32>>, f64)> {
        use nybble_core::gptq::{AbsmaxRule, GptqOptions, SearchObjective};
        let qt = QuantType4::parse(quant_type).map_err(to_py_err)?;
        let objective = match objective {
            "sequential" => SearchObjective::Sequential,
            "diagonal" => SearchObjective::Diagonal,
            other => {
                return Err(PyValueError::new_err(format!(
                    "objective {other:?} is not \"sequential\" or \"diagonal\""
                )))
            }
        };
        let rule = if search_grid == 0 {
            AbsmaxRule::Max
        } else {
            AbsmaxRule::Search {
                grid: search_grid,
                min_shrink,
                objective,
            }
        };
        let options = GptqOptions {
            blocksize,
            quant_type: qt,
            lazy_block,
            absmax: rule,
        };
        contiguous(&w, "w")?;
        if let Some(a) = &absmax {
            contiguous(a, "absmax")?;
        }
        let ws = w.as_slice()?;
        let fixed = match &absmax {
            Some(a) => Some(a.as_slice()?),
            None => None,
        };
        let r = run(py, threads, || {
            self.inner.quantize(ws, rows, &options, fixed)
        })?;
        Ok((vec_out(py, r.packed), vec_out(py, r.absmax), r.loss))
    }
}
