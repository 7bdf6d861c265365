//! Fuzz target `gguf_metadata`: a GGUF file's header, metadata and tensor directory.
//!
//! Arbitrary bytes go through `kiln::fuzzing::FuzzTarget::GgufMetadata`, the entry point that the
//! stable smoke test `tests/fuzz_corpus.rs` runs on this target's corpus too.
#![no_main]

use kiln::fuzzing::FuzzTarget;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let _ = FuzzTarget::GgufMetadata.check(input);
});
