#!/usr/bin/env python3
"""Side-by-side table of `kiln bench` and the PyTorch baseline JSON of the same run.

Usage: python3 bench/compare.py kiln.json torch.json
Rows join on (dtype, m, n, k). Ratios: speedup = torch time / kiln time; "% ceiling" =
achieved bytes per second over the device copy ceiling measured in the same run.
Prints a Markdown table (paste into bench/RESULTS.md with date, card and command).
"""
import json
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    kiln = json.load(open(sys.argv[1]))
    torch = json.load(open(sys.argv[2]))
    ceiling = next((r["gb_per_s"] for r in torch["records"] if r.get("name") == "device_copy"), None)
    baseline = {(r["dtype"], r["m"], r["n"], r["k"]): r for r in torch["records"] if r["suite"] != "ceiling"}
    print(f"device: {kiln.get('device')} | torch run on: {torch.get('device')} (torch {torch.get('torch')})")
    if ceiling:
        print(f"device copy ceiling (read+write): {ceiling:.0f} GB/s")
    print()
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


if __name__ == "__main__":
    main()
