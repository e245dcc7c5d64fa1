//! The bodies of the coverage-guided fuzz targets in `rust/core/fuzz/` (cargo-fuzz, nightly,
//! not part of the workspace build). They live here so that `cargo test` compiles them and
//! runs each over a few hundred mutated inputs (see the tests below): the cargo-fuzz crate only
//! wraps them in `fuzz_target!`. Each must return normally on every input; a panic is a bug.

use std::collections::BTreeMap;

use crate::blockwise::{check_4bit_sizes, dequantize_4bit_into, packed_len};
use crate::codebook::{dynamic_map, QuantType4};
use crate::convert::{check_index, parse_index};
use crate::double_quant::{bits_per_parameter, double_dequantize, NESTED_BLOCKSIZE};
use crate::safetensors::SafetensorsFile;

/// The safetensors header parser: any bytes as a whole file. On success every tensor's bytes
/// are in bounds and sized as its shape and dtype say.
pub fn safetensors_header(data: &[u8]) {
    let Ok(file) = SafetensorsFile::from_bytes(data.to_vec()) else {
        return;
    };
    for (name, info) in file.tensors() {
        let bytes = file.data(name).expect("a listed tensor has data");
        assert_eq!(bytes.len(), info.num_bytes(), "{name}");
    }
}

/// The values a quant_state supplies to a 4-bit decode, against the buffers they describe.
///
/// The input is a quant_state JSON entry, a NUL byte, then the tensor bytes: the JSON's
/// `blocksize`, `shape` (its product is `n`, saturating), `quant_type` and `nested_offset`
/// are read as a reader would (anything absent or malformed gets a fuzz-chosen value), the
/// bytes after the NUL are split into packed codes and absmax (float32 or, with
/// `nested_offset`, DQ codes). The sizes are checked with [`check_4bit_sizes`] before
/// anything is allocated, as the Python bindings do; when they pass, the decode must succeed
/// or fail with an error, and fill exactly `n` elements.
pub fn quant_state(data: &[u8]) {
    let (json, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let fields: serde_json::Value = serde_json::from_slice(json).unwrap_or(serde_json::Value::Null);
    let get = |k: &str| fields.get(k);
    let pick = |i: usize| rest.get(i).copied().unwrap_or(0) as usize;
    let blocksize = get("blocksize")
        .and_then(|v| v.as_u64())
        .map_or(32 << (pick(0) % 8), |b| b as usize);
    let n = match get("shape").and_then(|v| v.as_array()) {
        Some(dims) => dims
            .iter()
            .map(|d| d.as_u64().unwrap_or(0) as usize)
            .fold(1usize, usize::saturating_mul),
        None => pick(1) * 3 + pick(2),
    };
    let quant_type = match get("quant_type").and_then(|v| v.as_str()) {
        Some(name) => match QuantType4::parse(name) {
            Ok(qt) => qt,
            Err(_) => return,
        },
        None if pick(3) % 2 == 0 => QuantType4::Nf4,
        None => QuantType4::Fp4,
    };
    let offset = get("nested_offset").and_then(|v| v.as_f64());
    let _ = bits_per_parameter(n, blocksize, offset.is_some());

    // The bytes: packed codes first, then the constants.
    let split = packed_len(n).min(rest.len());
    let (packed, constants) = rest.split_at(split);
    let absmax: Vec<f32> = match offset {
        None => constants
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Some(offset) => {
            // DQ: one code per block, one float32 scale per 256 codes (all ones here).
            let nested = vec![1.0f32; constants.len().div_ceil(NESTED_BLOCKSIZE)];
            match double_dequantize(
                constants,
                &nested,
                offset as f32,
                &dynamic_map(true),
                NESTED_BLOCKSIZE,
            ) {
                Ok(a) => a,
                Err(_) => return,
            }
        }
    };
    if check_4bit_sizes(n, blocksize, packed.len(), absmax.len()).is_err() {
        return;
    }
    // Sizes agree with buffers that exist, so `n` is bounded by the input length.
    let mut out = vec![0.0f32; n];
    if dequantize_4bit_into(packed, &absmax, blocksize, quant_type, &mut out).is_ok() {
        assert_eq!(out.len(), n);
    }
}

/// The shard index parser and its agreement check with the shards. The input is an index
/// JSON; the shards are derived from its own weight map (every other listed tensor is
/// "stored" in the shard named, the rest in a shard chosen from the byte values), so both
/// agreeing and disagreeing folders are reached.
pub fn shard_index(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(weight_map) = parse_index(text) else {
        return;
    };
    let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, (tensor, shard)) in weight_map.iter().enumerate() {
        let shard = if (i + tensor.len()) % 3 == 0 {
            format!("other-{}.safetensors", tensor.len() % 2)
        } else {
            shard.clone()
        };
        shards.entry(shard).or_default().push(tensor.clone());
    }
    for (_, shard) in &weight_map {
        shards.entry(shard.clone()).or_default();
    }
    let present: Vec<String> = shards.keys().cloned().collect();
    let _ = check_index(&weight_map, &shards, &present);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::{write_safetensors, Dtype};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    /// Runs `target` on `seeds` and on byte-level mutations of them.
    fn smoke(target: fn(&[u8]), seeds: &[Vec<u8>]) {
        for seed in seeds {
            target(seed);
        }
        let mut runner = TestRunner::new(Config {
            cases: 300,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (
            0..seeds.len(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
        );
        runner
            .run(&strategy, |(base, edits)| {
                let mut bytes = seeds[base].clone();
                for (at, byte, op) in edits {
                    if bytes.is_empty() {
                        bytes.push(byte);
                        continue;
                    }
                    let i = at.index(bytes.len());
                    match op {
                        0 => bytes[i] = byte,
                        1 => bytes.insert(i, byte),
                        2 => {
                            bytes.remove(i);
                        }
                        _ => bytes.truncate(i),
                    }
                }
                target(&bytes);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn safetensors_header_target() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let data = [1u8; 12];
        write_safetensors(
            &path,
            &[
                ("a", Dtype::U8, &[4], &data[..4]),
                ("b", Dtype::F32, &[2], &data[4..]),
            ],
            None,
        )
        .unwrap();
        smoke(
            safetensors_header,
            &[std::fs::read(&path).unwrap(), b"{}".to_vec(), vec![]],
        );
    }

    #[test]
    fn quant_state_target() {
        let mut dq = br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 64], "nested_offset": 0.1}"#.to_vec();
        dq.push(0);
        dq.extend_from_slice(&[0x12; 64 + 2]);
        let mut plain =
            br#"{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [64]}"#
                .to_vec();
        plain.push(0);
        plain.extend_from_slice(&[0x21; 32]);
        plain.extend_from_slice(&1.0f32.to_le_bytes());
        let huge = br#"{"quant_type": "nf4", "blocksize": 64, "shape": [100000, 80000]}"#.to_vec();
        let zero = br#"{"blocksize": 0, "shape": [18446744073709551615, 2]}"#.to_vec();
        smoke(quant_state, &[dq, plain, huge, zero, vec![]]);
    }

    #[test]
    fn shard_index_target() {
        let ok = br#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
        let odd = br#"{"weight_map": {"a": "x-1-of-99999999.safetensors", "b": "x.safetensors", "a": "y"}}"#;
        smoke(shard_index, &[ok.to_vec(), odd.to_vec(), b"[]".to_vec()]);
    }
}
