#!/usr/bin/env bash
# Builds what a GPU session needs into dist/ (ignored by git, carried to the GPU machine,
# which has no Rust toolchain): the release `kiln` binary and the test binaries that hold
# GPU tests (gpu_*, cuda_gpu and real_model), stripped. Run bench/gpu_session.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf dist && mkdir -p dist/tests
cargo build --release --locked --bin kiln
cp target/release/kiln dist/kiln
cargo test --workspace --release --locked --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    name = m.get("target", {}).get("name", "")
    if exe and m.get("profile", {}).get("test") and (name.startswith("gpu_") or name.startswith("cuda_gpu") or name == "real_model"):
        shutil.copy(exe, os.path.join("dist/tests", name))
        print("dist/tests/" + name)
'
strip dist/kiln dist/tests/*
du -sh dist
