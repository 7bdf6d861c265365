//! The fuzz smoke run: every seed of every `fuzz/corpus/<target>/` directory, and a few
//! thousand deterministic mutations of each (bit flips, interesting bytes and integers,
//! truncations, insertions, deletions, repeated ranges; ChaCha8 seeded per file), through
//! [`FuzzTarget::check`] — the same entry points the cargo-fuzz targets run — on the stable
//! toolchain, so that CI catches a parser that panics on bad input without nightly or
//! libFuzzer.
//!
//! Checked: no input panics (an `Err` is fine, and its message is non-empty, which `check`
//! asserts), and at least one seed of each target is accepted, so the corpora keep reaching
//! past the first checks as the formats evolve. A panicking input is written to the temporary
//! directory for `cargo +nightly fuzz run <target> <file>` to reproduce.

use kiln::fuzzing::FuzzTarget;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Mutated inputs per seed file.
const MUTATIONS_PER_SEED: usize = 5000;

/// Byte values that tend to sit on parser boundaries (JSON and CSV syntax, sign bits, zero).
const INTERESTING_BYTES: &[u8] = b"\x00\x01\x7f\x80\xff\",:{}[]\n\r-+.e9";

/// Little-endian integers that tend to break length and count fields.
const INTERESTING_U64: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    12,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
];

/// The seed files of `target`, sorted by name.
fn seeds(target: FuzzTarget) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target.name());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the corpus `{}`: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in `{}`", dir.display());
    files
}

/// One random edit of `input`.
fn mutate_once(input: &mut Vec<u8>, rng: &mut ChaCha8Rng) {
    let len = input.len();
    let at = |rng: &mut ChaCha8Rng, extra: usize| rng.random_range(0..len + extra);
    match rng.random_range(0..7) {
        0 if len > 0 => {
            let i = at(rng, 0);
            input[i] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let i = at(rng, 0);
            input[i] = INTERESTING_BYTES[rng.random_range(0..INTERESTING_BYTES.len())];
        }
        2 if len >= 8 => {
            let i = rng.random_range(0..=len - 8);
            let value = INTERESTING_U64[rng.random_range(0..INTERESTING_U64.len())];
            input[i..i + 8].copy_from_slice(&value.to_le_bytes());
        }
        3 => input.truncate(at(rng, 1)),
        4 => {
            let i = at(rng, 1);
            let count = rng.random_range(1..=16);
            let bytes: Vec<u8> = (0..count).map(|_| rng.random()).collect();
            input.splice(i..i, bytes);
        }
        5 if len > 0 => {
            let start = at(rng, 0);
            let end = (start + rng.random_range(1..=64)).min(len);
            input.drain(start..end);
        }
        6 if len > 0 => {
            let start = at(rng, 0);
            let end = (start + rng.random_range(1..=64)).min(len);
            let copy = input[start..end].to_vec();
            let i = at(rng, 1);
            input.splice(i..i, copy);
        }
        _ => input.push(rng.random()),
    }
}

/// Runs one input, turning a panic into an error naming the seed and mutation, with the
/// input saved for reproduction.
fn run(target: FuzzTarget, input: &[u8], seed: &Path, mutation: Option<usize>) -> bool {
    match catch_unwind(AssertUnwindSafe(|| target.check(input))) {
        Ok(result) => result.is_ok(),
        Err(_) => {
            let saved = std::env::temp_dir().join(format!(
                "kiln-fuzz-smoke-{}-{}-{}.bin",
                target.name(),
                seed.file_name().unwrap().to_string_lossy(),
                mutation.map_or("seed".to_string(), |m| m.to_string())
            ));
            std::fs::write(&saved, input).unwrap();
            panic!(
                "{} panicked on {} of `{}`; the input is saved as `{}`",
                target.name(),
                mutation.map_or("the seed itself".to_string(), |m| format!("mutation {m}")),
                seed.display(),
                saved.display()
            );
        }
    }
}

fn smoke(target: FuzzTarget) {
    let mut accepted = Vec::new();
    for seed in seeds(target) {
        let original = std::fs::read(&seed).unwrap();
        if run(target, &original, &seed, None) {
            accepted.push(seed.clone());
        }
        let name = seed.file_name().unwrap().to_string_lossy().into_owned();
        let mut rng = ChaCha8Rng::seed_from_u64(fnv1a64(name.as_bytes()));
        for mutation in 0..MUTATIONS_PER_SEED {
            let mut input = original.clone();
            for _ in 0..rng.random_range(1..=4) {
                mutate_once(&mut input, &mut rng);
            }
            run(target, &input, &seed, Some(mutation));
        }
    }
    assert!(
        !accepted.is_empty(),
        "no seed of fuzz/corpus/{} is accepted: the corpus no longer reaches past the first \
         checks (regenerate it, see README, Fuzzing)",
        target.name()
    );
}

/// 64-bit FNV-1a, a stable per-file RNG seed.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[test]
fn config_json_corpus_and_mutations_never_panic() {
    smoke(FuzzTarget::ConfigJson);
}

#[test]
fn safetensors_header_corpus_and_mutations_never_panic() {
    smoke(FuzzTarget::SafetensorsHeader);
}

#[test]
fn gguf_metadata_corpus_and_mutations_never_panic() {
    smoke(FuzzTarget::GgufMetadata);
}

#[test]
fn plan_json_corpus_and_mutations_never_panic() {
    smoke(FuzzTarget::PlanJson);
}

#[test]
fn embed_csv_corpus_and_mutations_never_panic() {
    smoke(FuzzTarget::EmbedCsv);
}
