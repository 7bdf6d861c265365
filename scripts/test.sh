#!/usr/bin/env bash
# kiln's test command (the README's, and the one CI runs through .ci/run).
#
# On a fresh machine it installs what the tests need, then checks formatting and lints and
# runs every test of the workspace:
#   - ptxas, from the nvidia-cuda-nvcc-cu12 wheel, into .tools/ (PTX validation tests use it
#     through KILN_PTXAS; under CI a missing ptxas fails those tests instead of skipping);
#   - then cargo fmt --check, cargo clippy -D warnings, cargo test --workspace.
# GPU tests are #[ignore]d here; run them on a GPU machine with `cargo test -- --ignored`.
set -euo pipefail
cd "$(dirname "$0")/.."

tools="$PWD/.tools"
nvcc_wheel="nvidia-cuda-nvcc-cu12==12.9.86"
ptxas="$tools/python/nvidia/cuda_nvcc/bin/ptxas"
if [ ! -x "$ptxas" ]; then
  echo "== installing ptxas ($nvcc_wheel) into $tools"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$tools/python" "$nvcc_wheel"
fi
"$ptxas" --version | tail -n 1
export KILN_PTXAS="$ptxas"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
