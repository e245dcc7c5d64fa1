//! cargo fuzz run quant_state: the body is `nybble_core::fuzz_targets::quant_state` (compiled and smoke-run
//! by `cargo test` in rust/core; a panic here is a bug).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nybble_core::fuzz_targets::quant_state(data));
