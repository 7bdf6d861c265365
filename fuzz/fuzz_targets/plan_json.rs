//! Fuzz target `plan_json`: an artifact's `plan.json`.
//!
//! Arbitrary bytes go through `kiln::fuzzing::FuzzTarget::PlanJson`, the entry point that the
//! stable smoke test `tests/fuzz_corpus.rs` runs on this target's corpus too.
#![no_main]

use kiln::fuzzing::FuzzTarget;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let _ = FuzzTarget::PlanJson.check(input);
});
