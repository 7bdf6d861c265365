//! Informational timings of the CPU kernels (ignored by default; run with
//! `cargo test --release -p kiln-runtime --test cpu_bench -- --ignored --nocapture`).
//! Prints GFLOP/s of the dot kernel, GB/s of a map, and the weight GB/s of one Mixtral expert
//! projection in int4, bf16 and f32 beside a host copy; asserts only correctness.

use kiln_codegen::cpu::{DotSpec, ElemType, ElementFormat, Int4DotSpec, MapSpec};
use kiln_codegen::expr::Expr;
use kiln_runtime::cpu::{CpuJit, DotShape, Parallelism};
use std::time::Instant;

/// Median seconds of `runs` calls after a warm-up (the best is printed too: this machine is
/// shared, so the best is closer to what the code can do).
fn median_seconds(runs: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up (and compile)
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    eprintln!(
        "    best {:.1} ms, median {:.1} ms",
        times[0] * 1e3,
        times[runs / 2] * 1e3
    );
    times[runs / 2]
}

#[test]
#[ignore = "benchmark; run in release with --ignored --nocapture"]
fn dot_1024_cubed() {
    let jit = CpuJit::new().unwrap();
    let n = 1024;
    let tiles: Vec<(u32, u32)> = match std::env::var("KILN_DOT_TILES") {
        Ok(list) => list
            .split(',')
            .map(|t| {
                let (r, c) = t.split_once('x').unwrap();
                (r.parse().unwrap(), c.parse().unwrap())
            })
            .collect(),
        Err(_) => vec![(2, 4)],
    };
    eprintln!(
        "host: {:?}, rayon threads {}",
        jit.target(),
        rayon::current_num_threads()
    );
    for elem in [ElemType::F64, ElemType::F32] {
        for &(r, c) in &tiles {
            let kernel = jit.dot(DotSpec::new(elem).with_tile(r, c)).unwrap();
            for parallelism in [Parallelism::Sequential, Parallelism::Rayon] {
                let seconds = match elem {
                    ElemType::F64 => {
                        let a: Vec<f64> = (0..n * n).map(|i| (i % 7) as f64 - 3.0).collect();
                        let b: Vec<f64> = (0..n * n).map(|i| (i % 5) as f64 - 2.0).collect();
                        let mut out = vec![0.0f64; n * n];
                        let s = median_seconds(5, || {
                            kernel
                                .run(
                                    &a,
                                    &b,
                                    &mut out,
                                    DotShape::new(n, n, n),
                                    1.0,
                                    0.0,
                                    parallelism,
                                )
                                .unwrap()
                        });
                        let want: f64 = (0..n).map(|k| a[k] * b[(n - 1) * n + k]).sum();
                        assert_eq!(out[n - 1], want);
                        s
                    }
                    ElemType::F32 => {
                        let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 - 3.0).collect();
                        let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 - 2.0).collect();
                        let mut out = vec![0.0f32; n * n];
                        median_seconds(5, || {
                            kernel
                                .run(
                                    &a,
                                    &b,
                                    &mut out,
                                    DotShape::new(n, n, n),
                                    1.0,
                                    0.0,
                                    parallelism,
                                )
                                .unwrap()
                        })
                    }
                };
                let gflops = 2.0 * (n * n * n) as f64 / seconds / 1e9;
                eprintln!(
                    "dot {elem:?} {n}³ tile {r}×{c} {parallelism:?}: {:.1} ms, {gflops:.2} GFLOP/s",
                    seconds * 1e3
                );
            }
        }
    }
}

#[test]
#[ignore = "benchmark; run in release with --ignored --nocapture"]
fn map_swiglu_bandwidth() {
    let jit = CpuJit::new().unwrap();
    let len = 1 << 24;
    let kernel = jit
        .map(MapSpec::new(
            Expr::input(0).silu() * Expr::input(1),
            2,
            ElemType::F32,
        ))
        .unwrap();
    let x = vec![0.5f32; len];
    let y = vec![2.0f32; len];
    let mut out = vec![0.0f32; len];
    for parallelism in [Parallelism::Sequential, Parallelism::Rayon] {
        let s = median_seconds(5, || kernel.run(&[&x, &y], &mut out, parallelism).unwrap());
        eprintln!(
            "map silu(x)·y f32 2^24 {parallelism:?}: {:.2} ms, {:.1} GB/s, {:.2} Gelem/s",
            s * 1e3,
            3.0 * 4.0 * len as f64 / s / 1e9,
            len as f64 / s / 1e9
        );
    }
}

/// One Mixtral expert projection (N 14336, K 4096) at 1, 4 and 16 tokens: the int4 grouped
/// dot (group 128) against the bf16 and f32 dot kernels, as GB/s of weights read, beside the
/// host copy bandwidth (a 256 MiB `copy_from_slice`, read + write) — Fiddler's CPU expert.
#[test]
#[ignore = "benchmark; run in release with --ignored --nocapture"]
fn expert_projection_int4_bf16_f32() {
    let jit = CpuJit::new().unwrap();
    let (n, k) = (14336, 4096);
    let source = vec![1u8; 256 << 20];
    let mut target = vec![0u8; 256 << 20];
    eprintln!("host copy, 256 MiB:");
    let copy = median_seconds(5, || target.copy_from_slice(&source));
    eprintln!(
        "  {:.1} GB/s (read + write)",
        2.0 * source.len() as f64 / copy / 1e9
    );
    drop((source, target));

    let int4 = jit.int4_dot(Int4DotSpec::new(128)).unwrap();
    let packed: Vec<u8> = (0..n * k / 2).map(|i| (i * 37 % 251) as u8).collect();
    let scales = vec![0.01f32; n * k / 128];
    let bf16 = jit
        .dot(DotSpec::new(ElemType::F32).with_formats(ElementFormat::F32, ElementFormat::Bf16))
        .unwrap();
    let weights_bf16: Vec<half::bf16> = (0..n * k)
        .map(|i| half::bf16::from_f32((i % 17) as f32 * 0.01))
        .collect();
    let f32_dot = jit.dot(DotSpec::new(ElemType::F32)).unwrap();
    let weights_f32: Vec<f32> = weights_bf16.iter().map(|v| v.to_f32()).collect();
    // Median seconds of one call, printed with the GB/s of `bytes` of weights.
    let report = |what: &str, bytes: usize, call: &mut dyn FnMut()| {
        eprintln!("{what}:");
        let t = median_seconds(7, call);
        eprintln!(
            "  {:.2} ms, {:.1} GB/s of weights",
            t * 1e3,
            bytes as f64 / t / 1e9
        );
    };
    for m in [1, 4, 16] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let mut c = vec![0.0f32; m * n];
        let shape = DotShape::new(m, n, k);
        let rayon = Parallelism::Rayon;
        report(
            &format!("{m} token(s), int4 g128"),
            packed.len() + 4 * scales.len(),
            &mut || {
                int4.run(&a, &packed, &scales, &mut c, (m, n, k), rayon)
                    .unwrap()
            },
        );
        report(&format!("{m} token(s), bf16"), 2 * n * k, &mut || {
            bf16.run(&a, &weights_bf16, &mut c, shape, 1.0, 0.0, rayon)
                .unwrap()
        });
        report(&format!("{m} token(s), f32"), 4 * n * k, &mut || {
            f32_dot
                .run(&a, &weights_f32, &mut c, shape, 1.0, 0.0, rayon)
                .unwrap()
        });
    }
}
