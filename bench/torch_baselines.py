#!/usr/bin/env python3
"""PyTorch baselines and machine ceilings for `kiln bench`, measured in the same run.

Times, with CUDA events (warm-up, median of many, inputs rotated through more memory than
the L2 cache holds):
  - ceiling: device-to-device copy bandwidth (bytes read + written);
  - gemm: torch.matmul (cuBLAS) of x[M, K] @ W[N, K]^T for the same shapes `kiln bench gemm` times;
  - attention: torch.nn.functional.scaled_dot_product_attention
      decode (kind "decode"; one query token per sequence, GQA through enable_gqa, or K/V
      expanded with repeat_interleave before timing where this torch lacks it), and
      causal prefill (kind "prefill"; is_causal=True, batch 1, 4K/8K/16K tokens, 8 KV heads,
      f16 and bf16; both GQA through enable_gqa and K/V expanded with repeat_interleave
      before timing, two records, bench/compare.py takes the faster),
    for the shapes `kiln bench attention` times (src/bench/attention.rs);
  - quest: the SDPA decode of the shapes `kiln bench quest` times against its dense decode
    (src/bench/quest.rs: the same shapes as the attention decode rows), so the Quest table
    can set Quest beside SDPA.
Every suite's JSON starts with the ceiling record, measured in the same run.

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


ATTENTION_CONTEXTS = [4096, 8192, 16384, 32768, 65536]
ATTENTION_BATCHES = [1, 16]
ATTENTION_KV_HEADS = [8, 32]
ATTENTION_Q_HEADS = 32
ATTENTION_HEAD_DIM = 128


def sdpa_supports_gqa():
    import inspect
    try:
        return "enable_gqa" in inspect.signature(torch.nn.functional.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):
        return False


def attention(contexts, batches, kv_heads_list, q_heads, head_dim, dtype_name="f16", suite="attention"):
    """SDPA decode: q [B, Hq, 1, D] against contiguous k, v [B, Hkv, T, D]. GB/s counts the K and
    V bytes of the unexpanded cache once, as kiln's rows do, so the ratio of GB/s is the ratio of
    times. Records are tagged with `suite` (attention or quest) and kind "decode"."""
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = sdpa_supports_gqa()
    free_bytes = torch.cuda.mem_get_info()[0]
    records = []
    for batch in batches:
        for kv_heads in kv_heads_list:
            group = q_heads // kv_heads
            for context in contexts:
                kv_bytes = 2 * batch * kv_heads * context * head_dim * 2
                # Expanded copies (no enable_gqa) hold group times the bytes.
                held = kv_bytes * (1 if gqa or group == 1 else 1 + group)
                rotations = max(1, min(8, -(-L2_ROTATE_BYTES // kv_bytes), int(0.6 * free_bytes) // held))
                q = torch.randn(batch, q_heads, 1, head_dim, device="cuda", dtype=dtype)
                caches = []
                for _ in range(rotations):
                    k = torch.randn(batch, kv_heads, context, head_dim, device="cuda", dtype=dtype)
                    v = torch.randn(batch, kv_heads, context, head_dim, device="cuda", dtype=dtype)
                    if not gqa and group > 1:
                        k = k.repeat_interleave(group, dim=1)
                        v = v.repeat_interleave(group, dim=1)
                    caches.append((k, v))
                if gqa:
                    impl = "torch.sdpa"
                    fn = lambda i: sdpa(q, caches[i][0], caches[i][1], enable_gqa=True)
                else:
                    impl = "torch.sdpa" if group == 1 else "torch.sdpa+repeat_interleave"
                    fn = lambda i: sdpa(q, caches[i][0], caches[i][1])
                median, best = time_ms(fn, rotations)
                records.append({
                    "suite": suite, "kind": "decode", "impl": impl, "dtype": dtype_name,
                    "batch": batch, "q_heads": q_heads, "kv_heads": kv_heads,
                    "head_dim": head_dim, "context": context,
                    "median_ms": median, "min_ms": best,
                    "median_us": median * 1e3, "min_us": best * 1e3,
                    "gb_per_s": kv_bytes / median / 1e6,
                })
                del caches, q
                torch.cuda.empty_cache()
    return records


PREFILL_TOKENS = [4096, 8192, 16384]
PREFILL_KV_HEADS = 8


def causal_flops(tokens, head_dim, q_heads):
    """4 * S^2 * D * Hq / 2: QK^T and PV over the lower triangle, as kiln's prefill rows count."""
    return 4 * tokens * tokens * head_dim * q_heads / 2


def prefill(tokens_list, kv_heads, q_heads, head_dim, dtype_names):
    """SDPA causal prefill of one sequence: q [1, Hq, S, D], k, v [1, Hkv, S, D], is_causal=True.
    Two records per shape where this torch has enable_gqa: GQA inside SDPA, and K/V expanded to
    Hq heads with repeat_interleave before timing (the expansion is not timed)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = sdpa_supports_gqa()
    group = q_heads // kv_heads
    records = []
    for dtype_name in dtype_names:
        dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
        for tokens in tokens_list:
            step_bytes = (q_heads + 2 * kv_heads) * tokens * head_dim * 2
            rotations = max(1, min(4, -(-L2_ROTATE_BYTES // step_bytes)))
            def randn(heads):
                return torch.randn(1, heads, tokens, head_dim, device="cuda", dtype=dtype)
            inputs = [(randn(q_heads), randn(kv_heads), randn(kv_heads)) for _ in range(rotations)]
            expanded = []
            variants = []
            if gqa:
                variants.append(("torch.sdpa",
                                 lambda i: sdpa(*inputs[i], is_causal=True, enable_gqa=True)))
            if group > 1:
                expanded = [(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))
                            for q, k, v in inputs]
                variants.append(("torch.sdpa+repeat_interleave",
                                 lambda i: sdpa(*expanded[i], is_causal=True)))
            elif not gqa:
                variants.append(("torch.sdpa", lambda i: sdpa(*inputs[i], is_causal=True)))
            for impl, fn in variants:
                try:
                    median, best = time_ms(fn, rotations)
                except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
                    # A backend without this combination may fall back to the math path, which
                    # materialises the S x S scores; the other variant still gives a baseline.
                    print(f"note: {impl} {dtype_name} prefill {tokens} tokens failed: {error}",
                          file=sys.stderr)
                    torch.cuda.empty_cache()
                    continue
                records.append({
                    "suite": "attention", "kind": "prefill", "impl": impl, "dtype": dtype_name,
                    "batch": 1, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
                    "tokens": tokens, "median_ms": median, "min_ms": best,
                    "median_us": median * 1e3, "min_us": best * 1e3,
                    "tflops": causal_flops(tokens, head_dim, q_heads) / median / 1e9,
                })
            del inputs, expanded, variants
            torch.cuda.empty_cache()
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["gemm", "attention", "quest", "ceiling"], default="gemm")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible to PyTorch")
    device = torch.cuda.get_device_name()
    records = [copy_ceiling()]
    if args.suite == "gemm":
        records += gemm(["f16", "bf16"], [(4096, 14336), (4096, 4096)], [1, 4, 16, 64, 256, 4096])
    elif args.suite == "attention":
        records += attention(ATTENTION_CONTEXTS, ATTENTION_BATCHES, ATTENTION_KV_HEADS,
                             ATTENTION_Q_HEADS, ATTENTION_HEAD_DIM)
        records += prefill(PREFILL_TOKENS, PREFILL_KV_HEADS, ATTENTION_Q_HEADS, ATTENTION_HEAD_DIM,
                           ["f16", "bf16"])
    elif args.suite == "quest":
        records += attention(ATTENTION_CONTEXTS, ATTENTION_BATCHES, ATTENTION_KV_HEADS,
                             ATTENTION_Q_HEADS, ATTENTION_HEAD_DIM, suite="quest")
    with open(args.out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "records": records}, f, indent=1)
    print(f"device: {device}, torch {torch.__version__}")
    table = [r for r in records if r["suite"] not in ("attention", "quest")]
    if table:
        print(f"{'suite':<8} {'name':<14} {'dtype':<5} {'M':>5} {'N':>6} {'K':>5} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8}")
    for r in table:
        print(f"{r['suite']:<8} {r.get('impl', r.get('name')):<14} {r.get('dtype', ''):<5} "
              f"{r.get('m', ''):>5} {r.get('n', ''):>6} {r.get('k', ''):>5} {r['median_ms']:>9.4f} "
              f"{r.get('tflops', 0):>8.1f} {r['gb_per_s']:>8.0f}")
    decode_rows = [r for r in records if r.get("kind") == "decode"]
    if decode_rows:
        print(f"{'decode impl':<28} {'dtype':<5} {'batch':>5} {'kv':>4} {'context':>7} {'median us':>10} {'GB/s':>8}")
    for r in decode_rows:
        print(f"{r['impl']:<28} {r['dtype']:<5} {r['batch']:>5} {r['kv_heads']:>4} {r['context']:>7} "
              f"{r['median_us']:>10.1f} {r['gb_per_s']:>8.0f}")
    prefill_rows = [r for r in records if r.get("kind") == "prefill"]
    if prefill_rows:
        print(f"{'prefill impl':<28} {'dtype':<5} {'batch':>5} {'kv':>4} {'tokens':>7} {'median us':>10} {'TFLOP/s':>8}")
    for r in prefill_rows:
        print(f"{r['impl']:<28} {r['dtype']:<5} {r['batch']:>5} {r['kv_heads']:>4} {r['tokens']:>7} "
              f"{r['median_us']:>10.1f} {r['tflops']:>8.1f}")


if __name__ == "__main__":
    main()
