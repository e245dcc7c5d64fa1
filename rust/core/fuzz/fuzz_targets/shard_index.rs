//! cargo fuzz run shard_index: the body is `nybble_core::fuzz_targets::shard_index` (compiled and smoke-run
//! by `cargo test` in rust/core; a panic here is a bug).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nybble_core::fuzz_targets::shard_index(data));
