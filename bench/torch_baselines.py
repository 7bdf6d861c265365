#!/usr/bin/env python3
"""PyTorch baselines and machine ceilings for `kiln bench`, measured in the same run.

Times, with CUDA events (warm-up, median of many, inputs rotated through more memory than
the L2 cache holds):
  - ceiling: device-to-device copy bandwidth (bytes read + written);
  - gemm: torch.matmul (cuBLAS) of x[M, K] @ W[N, K]^T for the same shapes `kiln bench gemm` times.

Usage: python3 bench/torch_baselines.py --suite gemm --out baseline.json
Prints a table last and writes JSON (one record per measurement).
"""
import argparse
import json
import statistics
import sys

import torch

L2_ROTATE_BYTES = 256 << 20  # rotate inputs through at least this much memory


def time_ms(fn, rotations, warmup=10, iterations=100):
    """Median and min milliseconds of fn(i) over `iterations` launches, with CUDA events."""
    for i in range(warmup):
        fn(i % rotations)
    torch.cuda.synchronize()
    samples = []
    for i in range(iterations):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % rotations)
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop))
    return statistics.median(samples), min(samples)


def copy_ceiling():
    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    median, best = time_ms(lambda i: dst.copy_(src), 1, warmup=5, iterations=30)
    return {"suite": "ceiling", "name": "device_copy", "bytes": 2 * n,
            "median_ms": median, "min_ms": best, "gb_per_s": 2 * n / median / 1e6}


def gemm(dtypes, ks_ns, ms):
    records = []
    for dtype_name in dtypes:
        dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
        for k, n in ks_ns:
            weight_bytes = n * k * 2
            rotations = max(1, -(-L2_ROTATE_BYTES // weight_bytes))
            weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(rotations)]
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                median, best = time_ms(lambda i: torch.matmul(x, weights[i].t()), rotations)
                flops = 2 * m * n * k
                bytes_moved = weight_bytes + (m * k + m * n) * 2
                records.append({
                    "suite": "gemm", "impl": "torch.matmul", "dtype": dtype_name,
                    "m": m, "n": n, "k": k, "median_ms": median, "min_ms": best,
                    "tflops": flops / median / 1e9, "gb_per_s": bytes_moved / median / 1e6,
                })
            del weights
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["gemm", "ceiling"], default="gemm")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible to PyTorch")
    device = torch.cuda.get_device_name()
    records = [copy_ceiling()]
    if args.suite == "gemm":
        records += gemm(["f16", "bf16"], [(4096, 14336), (4096, 4096)], [1, 4, 16, 64, 256, 4096])
    with open(args.out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "records": records}, f, indent=1)
    print(f"device: {device}, torch {torch.__version__}")
    print(f"{'suite':<8} {'name':<14} {'dtype':<5} {'M':>5} {'N':>6} {'K':>5} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8}")
    for r in records:
        print(f"{r['suite']:<8} {r.get('impl', r.get('name')):<14} {r.get('dtype', ''):<5} "
              f"{r.get('m', ''):>5} {r.get('n', ''):>6} {r.get('k', ''):>5} {r['median_ms']:>9.4f} "
              f"{r.get('tflops', 0):>8.1f} {r['gb_per_s']:>8.0f}")


if __name__ == "__main__":
    main()
