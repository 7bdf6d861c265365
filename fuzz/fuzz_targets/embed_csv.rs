//! Fuzz target `embed_csv`: an embedding data set in CSV.
//!
//! Arbitrary bytes go through `kiln::fuzzing::FuzzTarget::EmbedCsv`, the entry point that the
//! stable smoke test `tests/fuzz_corpus.rs` runs on this target's corpus too.
#![no_main]

use kiln::fuzzing::FuzzTarget;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let _ = FuzzTarget::EmbedCsv.check(input);
});
