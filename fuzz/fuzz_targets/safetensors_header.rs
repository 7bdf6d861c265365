//! Fuzz target `safetensors_header`: a safetensors file and a sharded checkpoint's index.
//!
//! Arbitrary bytes go through `kiln::fuzzing::FuzzTarget::SafetensorsHeader`, the entry point that the
//! stable smoke test `tests/fuzz_corpus.rs` runs on this target's corpus too.
#![no_main]

use kiln::fuzzing::FuzzTarget;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let _ = FuzzTarget::SafetensorsHeader.check(input);
});
