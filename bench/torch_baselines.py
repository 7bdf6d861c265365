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
    can set Quest beside SDPA;
  - moe: one MoE layer (router linear + softmax + top-k + renormalise, the experts' SwiGLU FFN,
    the weighted combine) for the shapes `kiln bench moe` times (src/bench/moe.rs: Mixtral 8x7B
    at 1..4096 tokens, Qwen3-30B-A3B at 1 and 64 tokens, bf16), two ways:
      "torch.moe_naive": the Hugging Face style loop over experts (`nonzero` of the top-k ids,
      gather the tokens, silu(x @ gate.T) * (x @ up.T) @ down.T, `index_add_` weighted);
      "torch.moe_grouped": slots sorted by expert, each slot's expert weights gathered with
      `index_select` from stacked [E, I, H] weights and multiplied with `torch.bmm`. That
      gathers slots * 3 * H * I weights per call (Mixtral: 352 MiB per slot), so where it would
      exceed MOE_GATHER_BYTES it becomes "torch.moe_grouped_padded": the slots of each chosen
      expert padded to the largest group, one `torch.bmm` over the chosen experts' stacked
      weights (no weight copy when every expert is chosen).
    GB/s counts the weights of the distinct experts the call chose (distinct * 3 * H * I * 2
    bytes), as kiln's rows do. The weights are random (randn / sqrt(fan-in)), not kiln's, so
    the router may choose a different number of experts than in kiln's run: both records carry
    distinct_experts. No rotation: the same input every call (as in kiln's bench).
Every suite's JSON starts with the ceiling record, measured in the same run.

Usage: python3 bench/torch_baselines.py --suite gemm --out baseline.json
Prints a table last and writes JSON (one record per measurement).
"""
import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

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


MOE_SHAPES = [
    # model, experts, top_k, hidden, intermediate, normalize, token counts
    ("mixtral", 8, 2, 4096, 14336, True, [1, 4, 16, 64, 512, 4096]),
    ("qwen3-30b-a3b", 128, 8, 2048, 768, True, [1, 64]),
]
MOE_GATHER_BYTES = 8 << 30  # the per-slot weight gather of the grouped reference, at most


def moe_route(x, router, top_k, normalize):
    """Router logits, softmax in f32, top-k, renormalised: (weights [T, k] f32, ids [T, k])."""
    probs = torch.softmax((x @ router.t()).float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_naive(x, router, gate, up, down, top_k, normalize):
    """The loop over experts: each expert's tokens found with nonzero (a host sync each)."""
    weights, ids = moe_route(x, router, top_k, normalize)
    out = torch.zeros_like(x)
    for e in range(gate.shape[0]):
        rows, slots = (ids == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        h = x[rows]
        y = (F.silu(h @ gate[e].t()) * (h @ up[e].t())) @ down[e].t()
        out.index_add_(0, rows, y * weights[rows, slots, None].to(x.dtype))
    return out


def moe_sorted(x, router, top_k, normalize):
    """Routing, then the slots (token * k + j) sorted by expert: (token of each sorted slot,
    its weight, its expert)."""
    weights, ids = moe_route(x, router, top_k, normalize)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order // top_k, weights.reshape(-1)[order], flat[order]


def moe_grouped(x, router, gate, up, down, top_k, normalize):
    """Per-slot expert weights gathered with index_select, one bmm per projection."""
    tokens, slot_weights, experts = moe_sorted(x, router, top_k, normalize)
    xs = x[tokens].unsqueeze(2)  # [S, H, 1]
    h = F.silu(torch.bmm(gate.index_select(0, experts), xs)) * torch.bmm(up.index_select(0, experts), xs)
    y = torch.bmm(down.index_select(0, experts), h).squeeze(2)  # [S, H]
    out = torch.zeros_like(x)
    out.index_add_(0, tokens, y * slot_weights[:, None].to(x.dtype))
    return out


def moe_grouped_padded(x, router, gate, up, down, top_k, normalize):
    """Each chosen expert's slots padded to the largest group, one bmm per projection over the
    chosen experts (their weights index_select-ed unless every expert is chosen)."""
    tokens, slot_weights, experts = moe_sorted(x, router, top_k, normalize)
    num_experts = gate.shape[0]
    counts = torch.bincount(experts, minlength=num_experts)
    used = counts.nonzero().squeeze(1)
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(experts.numel(), device=x.device) - starts[experts]
    group_of = torch.full((num_experts,), -1, dtype=torch.long, device=x.device)
    group_of[used] = torch.arange(used.numel(), device=x.device)
    group = group_of[experts]
    padded = x.new_zeros(used.numel(), width, x.shape[1])
    padded[group, position] = x[tokens]
    if used.numel() < num_experts:
        gate, up, down = gate.index_select(0, used), up.index_select(0, used), down.index_select(0, used)
    h = F.silu(torch.bmm(padded, gate.transpose(1, 2))) * torch.bmm(padded, up.transpose(1, 2))
    y = torch.bmm(h, down.transpose(1, 2))[group, position]  # [S, H]
    out = torch.zeros_like(x)
    out.index_add_(0, tokens, y * slot_weights[:, None].to(x.dtype))
    return out


def moe(shapes, dtype_name="bf16"):
    """Both MoE references per shape; one record each. The layer's weights are made once per
    model and shared by its token counts."""
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    records = []
    for model, num_experts, top_k, hidden, inter, normalize, token_counts in shapes:
        router = torch.randn(num_experts, hidden, device="cuda", dtype=dtype) / hidden**0.5
        gate = torch.randn(num_experts, inter, hidden, device="cuda", dtype=dtype) / hidden**0.5
        up = torch.randn(num_experts, inter, hidden, device="cuda", dtype=dtype) / hidden**0.5
        down = torch.randn(num_experts, hidden, inter, device="cuda", dtype=dtype) / inter**0.5
        expert_bytes = 3 * hidden * inter * 2
        for tokens in token_counts:
            x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
            _, ids = moe_route(x, router, top_k, normalize)
            distinct = int(torch.unique(ids).numel())
            slots = tokens * top_k
            grouped = ("torch.moe_grouped", moe_grouped)
            if slots * expert_bytes > MOE_GATHER_BYTES:
                print(f"note: moe {model} {tokens} tokens: the per-slot weight gather would take "
                      f"{slots * expert_bytes >> 20} MiB; grouped reference padded per expert",
                      file=sys.stderr)
                grouped = ("torch.moe_grouped_padded", moe_grouped_padded)
            for impl, fn in [("torch.moe_naive", moe_naive), grouped]:
                def call(_):
                    return fn(x, router, gate, up, down, top_k, normalize)
                try:
                    out = call(0)
                    if not torch.isfinite(out).all():
                        print(f"note: {impl} {model} {tokens} tokens: non-finite output", file=sys.stderr)
                    median, best = time_ms(call, 1)
                except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
                    print(f"note: {impl} {model} {tokens} tokens failed: {error}", file=sys.stderr)
                    torch.cuda.empty_cache()
                    continue
                records.append({
                    "suite": "moe", "impl": impl, "model": model, "dtype": dtype_name,
                    "tokens": tokens, "experts": num_experts, "top_k": top_k, "hidden": hidden,
                    "intermediate": inter, "distinct_experts": distinct,
                    "expert_bytes": distinct * expert_bytes,
                    "median_ms": median, "min_ms": best,
                    "median_us": median * 1e3, "min_us": best * 1e3,
                    "gb_per_s": distinct * expert_bytes / median / 1e6,
                })
            del x
            torch.cuda.empty_cache()
        del router, gate, up, down
        torch.cuda.empty_cache()
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["gemm", "attention", "quest", "moe", "ceiling"], default="gemm")
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
    elif args.suite == "moe":
        records += moe(MOE_SHAPES)
    with open(args.out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "records": records}, f, indent=1)
    print(f"device: {device}, torch {torch.__version__}")
    table = [r for r in records if r["suite"] not in ("attention", "quest", "moe")]
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
    moe_rows = [r for r in records if r["suite"] == "moe"]
    if moe_rows:
        print(f"{'moe impl':<26} {'model':<14} {'dtype':<5} {'tokens':>6} {'distinct':>8} {'median us':>10} {'GB/s':>8}")
    for r in moe_rows:
        print(f"{r['impl']:<26} {r['model']:<14} {r['dtype']:<5} {r['tokens']:>6} {r['distinct_experts']:>8} "
              f"{r['median_us']:>10.1f} {r['gb_per_s']:>8.0f}")


if __name__ == "__main__":
    main()
