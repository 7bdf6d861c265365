#!/usr/bin/env python3
"""Side-by-side table of `kiln bench` and the PyTorch baseline JSON of the same run.

Usage: python3 bench/compare.py kiln.json torch.json
The suite is read from kiln's records:
  - gemm: rows join on (dtype, m, n, k);
  - attention: decode rows join on (dtype, batch, q_heads, kv_heads, head_dim, context), prefill
    rows on (dtype, batch, q_heads, kv_heads, head_dim, tokens), each within its kind (a torch
    record without "kind" is a decode record); two tables, decode then prefill;
  - quest: kiln's Quest rows (one per shape and budget, with the dense decode of the shape
    timed in the same run) join the torch SDPA decode records on (dtype, batch, q_heads,
    kv_heads, head_dim, context);
  - moe: kiln's MoE layer rows join the torch records of the naive expert loop
    ("torch.moe_naive") and of the grouped bmm reference ("torch.moe_grouped", or
    "torch.moe_grouped_padded" where the per-slot weight gather would not fit; the impl is
    named) on (model, dtype, tokens). GB/s on both sides counts the weights of the distinct
    experts each run's router chose (torch's weights are random, not kiln's: the "distinct"
    columns say whether both read as many experts).
Decode and Quest rows also carry the same step timed as the attention step of a compiled
decode plan (`plan_*` fields, `kiln::bench::plan_step`): those are the figures of what a model
plan runs, and the decode table leads with them (GB/s and % ceiling of the plan step; the
kernels launched by hand, without the plan's KV append, follow as "kernels only"); "-" where
a shape was skipped.
Where torch has several records for one key (SDPA with enable_gqa and with repeat_interleave),
the fastest is the baseline and its impl is named. Ratios: speedup = torch time / kiln time;
"% ceiling" = achieved bytes per second over the device copy ceiling measured in the same run.
Prints Markdown tables (paste into bench/RESULTS.md with date, card and command), then kiln's
notes (shapes skipped for lack of memory).
"""
import json
import sys


def load(path):
    data = json.load(open(path))
    if isinstance(data, list):  # an early `kiln bench attention` wrote the bare rows
        data = {"device": None, "records": data}
    return data


def header(kiln, torch):
    ceiling = next((r["gb_per_s"] for r in torch["records"] if r.get("name") == "device_copy"), None)
    print(f"device: {kiln.get('device')} | torch run on: {torch.get('device')} (torch {torch.get('torch')})")
    if ceiling:
        print(f"device copy ceiling (read+write): {ceiling:.0f} GB/s")
    print()
    return ceiling


def gemm_table(kiln, torch):
    ceiling = header(kiln, torch)
    baseline = {(r["dtype"], r["m"], r["n"], r["k"]): r for r in torch["records"] if r["suite"] != "ceiling"}
    print("| dtype | M | N | K | kiln kernel | kiln µs | kiln TFLOP/s | kiln GB/s | % ceiling | torch µs | torch TFLOP/s | speedup vs torch |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in kiln["records"]:
        key = (r["dtype"], r["m"], r["n"], r["k"])
        b = baseline.get(key)
        pct = f"{100 * r['gb_per_s'] / ceiling:.0f}%" if ceiling else "-"
        torch_us = f"{1000 * b['median_ms']:.1f}" if b else "-"
        torch_tf = f"{b['tflops']:.1f}" if b else "-"
        speedup = f"{b['median_ms'] / r['median_ms']:.2f}x" if b else "-"
        print(f"| {r['dtype']} | {r['m']} | {r['n']} | {r['k']} | {r['impl']} | {1000 * r['median_ms']:.1f} | "
              f"{r['tflops']:.1f} | {r['gb_per_s']:.0f} | {pct} | {torch_us} | {torch_tf} | {speedup} |")


SHAPE = ("dtype", "batch", "q_heads", "kv_heads", "head_dim")


def torch_us(r):
    return r["median_us"] if "median_us" in r else 1000 * r["median_ms"]


def fastest(records, kind, length):
    """The fastest torch record of `kind` per (shape, length field)."""
    best = {}
    for r in records:
        if r.get("suite") == "ceiling" or r.get("kind", "decode") != kind or length not in r:
            continue
        key = tuple(r[f] for f in SHAPE) + (r[length],)
        if key not in best or torch_us(r) < torch_us(best[key]):
            best[key] = r
    return best


def key_of(r, length):
    return tuple(r[f] for f in SHAPE) + (r[length],)


def ratio(numerator, denominator):
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def field(record, name, spec):
    """`record[name]` formatted with `spec`, or "-" without a record or the field."""
    return format(record[name], spec) if record and name in record else "-"


def plan_cell(r, name):
    """A plan-step time of a kiln row, or "-" where it was skipped (or an older run)."""
    return format(r[name], ".1f") if r.get(name) else "-"


def baseline_columns(b, kiln_us, rate):
    """torch impl, torch µs, torch `rate` (gb_per_s or tflops), speedup vs torch."""
    if not b:
        return "- | - | - | -"
    spec = ".0f" if rate == "gb_per_s" else ".1f"
    return f"{b['impl']} | {torch_us(b):.1f} | {field(b, rate, spec)} | {ratio(torch_us(b), kiln_us)}"


def attention_tables(kiln, torch):
    ceiling = header(kiln, torch)
    decode = [r for r in kiln["records"] if r.get("kind", "decode") == "decode"]
    prefill = [r for r in kiln["records"] if r.get("kind") == "prefill"]
    if decode:
        baseline = fastest(torch["records"], "decode", "context")
        print("| kind | dtype | batch | KV heads | context | splits | plan step µs | plan step GB/s | % ceiling | torch impl | torch µs | torch GB/s | plan step vs torch | kernels only µs | kernels only vs torch |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
        for r in decode:
            b = baseline.get(key_of(r, "context"))
            plan = r.get("plan_median_us")
            # The K/V bytes one step reads, from the kernels-only figure of the same row.
            kv_bytes = r["gb_per_s"] * r["median_us"] * 1e3
            plan_gbs = kv_bytes / plan / 1e3 if plan else None
            pct = f"{100 * plan_gbs / ceiling:.0f}%" if ceiling and plan_gbs else "-"
            torch_time = torch_us(b) if b else None
            print(f"| decode | {r['dtype']} | {r['batch']} | {r['kv_heads']} | {r['context']} | {r.get('splits', '-')} | "
                  f"{format(plan, '.1f') if plan else '-'} | {format(plan_gbs, '.0f') if plan_gbs else '-'} | {pct} | "
                  f"{field(b, 'impl', '')} | {format(torch_time, '.1f') if b else '-'} | {field(b, 'gb_per_s', '.0f')} | "
                  f"{ratio(torch_time, plan)} | {r['median_us']:.1f} | {ratio(torch_time, r['median_us'])} |")
    if decode and prefill:
        print()
    if prefill:
        baseline = fastest(torch["records"], "prefill", "tokens")
        print("| kind | dtype | batch | KV heads | tokens | kiln tile | kiln µs | kiln TFLOP/s | torch impl | torch µs | torch TFLOP/s | speedup vs torch |")
        print("|---|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|")
        for r in prefill:
            b = baseline.get(key_of(r, "tokens"))
            tile = f"{r['block_q']}x{r['block_kv']}" if "block_q" in r else "-"
            print(f"| prefill | {r['dtype']} | {r['batch']} | {r['kv_heads']} | {r['tokens']} | {tile} | "
                  f"{r['median_us']:.1f} | {r['tflops']:.1f} | {baseline_columns(b, r['median_us'], 'tflops')} |")


def quest_table(kiln, torch):
    header(kiln, torch)
    baseline = fastest(torch["records"], "decode", "context")
    print("| dtype | batch | KV heads | context | budget | estimate µs | top-K µs | sparse µs | Quest µs | dense µs | "
          "Quest vs dense | SDPA impl | SDPA µs | Quest vs SDPA | dense vs SDPA | plan Quest step µs | plan dense step µs | "
          "plan Quest vs SDPA |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in kiln["records"]:
        b = baseline.get(key_of(r, "context"))
        sdpa = torch_us(b) if b else None
        budget = f"{r['budget']}" + (" (all pages)" if r.get("dense_fallback") else "")
        print(f"| {r['dtype']} | {r['batch']} | {r['kv_heads']} | {r['context']} | {budget} | "
              f"{r['estimate_us']:.1f} | {r['top_k_us']:.1f} | {r['sparse_us']:.1f} | {r['total_us']:.1f} | "
              f"{r['dense_us']:.1f} | {ratio(r['dense_us'], r['total_us'])} | {field(b, 'impl', '')} | "
              f"{format(sdpa, '.1f') if b else '-'} | {ratio(sdpa, r['total_us'])} | {ratio(sdpa, r['dense_us'])} | "
              f"{plan_cell(r, 'plan_quest_us')} | {plan_cell(r, 'plan_dense_us')} | {ratio(sdpa, r.get('plan_quest_us'))} |")


MOE_KEY = ("model", "dtype", "tokens")


def moe_table(kiln, torch):
    ceiling = header(kiln, torch)
    naive, grouped = {}, {}
    for r in torch["records"]:
        if r.get("suite") != "moe":
            continue
        table = naive if r["impl"] == "torch.moe_naive" else grouped
        key = tuple(r[f] for f in MOE_KEY)
        if key not in table or torch_us(r) < torch_us(table[key]):
            table[key] = r
    print("| model | dtype | tokens | E | k | distinct | kiln µs | kiln GB/s | % ceiling | router+dispatch µs | expert FFN µs | "
          "combine µs | naive torch µs | naive distinct | grouped torch impl | grouped torch µs | grouped torch GB/s | "
          "speedup vs naive | speedup vs grouped |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in kiln["records"]:
        key = tuple(r[f] for f in MOE_KEY)
        n, g = naive.get(key), grouped.get(key)
        pct = f"{100 * r['gb_per_s'] / ceiling:.0f}%" if ceiling else "-"
        # The router's linear is fused into its step; runs from before the fusion timed it apart.
        routing = r.get("router_linear_us", 0.0) + r["router_us"] + r["dispatch_us"]
        print(f"| {r['model']} | {r['dtype']} | {r['tokens']} | {r['experts']} | {r['top_k']} | {r['distinct_experts']} | "
              f"{r['median_us']:.1f} | {r['gb_per_s']:.0f} | {pct} | {routing:.1f} | {r['expert_ffn_us']:.1f} | "
              f"{r['combine_us']:.1f} | {format(torch_us(n), '.1f') if n else '-'} | {field(n, 'distinct_experts', '')} | "
              f"{field(g, 'impl', '')} | {format(torch_us(g), '.1f') if g else '-'} | {field(g, 'gb_per_s', '.0f')} | "
              f"{ratio(torch_us(n) if n else None, r['median_us'])} | {ratio(torch_us(g) if g else None, r['median_us'])} |")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    kiln = load(sys.argv[1])
    torch = load(sys.argv[2])
    suites = {r.get("suite") for r in kiln["records"]}
    if "moe" in suites:
        moe_table(kiln, torch)
    elif "quest" in suites:
        quest_table(kiln, torch)
    elif "attention" in suites:
        attention_tables(kiln, torch)
    else:
        gemm_table(kiln, torch)
    notes = kiln.get("notes") or []
    if notes:
        print()
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
