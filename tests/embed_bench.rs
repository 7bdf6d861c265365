//! Informational timings of the product kernel at the embedding solvers' shapes (ignored):
//! `TILES=4x2,3x2 cargo test --release --test embed_bench -- --ignored --nocapture`.
use kiln_codegen::cpu::{DotSpec, ElemType};
use kiln_runtime::cpu::{CpuJit, DotShape, Parallelism};
use std::time::Instant;

#[test]
#[ignore]
fn product_shapes() {
    let jit = CpuJit::global().unwrap();
    let tiles: Vec<(u32, u32)> = std::env::var("TILES")
        .unwrap_or("4x2".into())
        .split(',')
        .map(|t| {
            let (r, c) = t.split_once('x').unwrap();
            (r.parse().unwrap(), c.parse().unwrap())
        })
        .collect();
    let shapes = [
        (16, 81, 80),
        (16, 80, 81),
        (32, 1797, 61),
        (32, 61, 1797),
        (61, 61, 1797),
        (1797, 61, 61),
    ];
    for (m, n, k) in shapes {
        let a: Vec<f64> = (0..m * k).map(|i| (i % 7) as f64 - 3.0).collect();
        let b: Vec<f64> = (0..n * k).map(|i| (i % 5) as f64 - 2.0).collect();
        let mut c = vec![0.0; m * n];
        let kernels: Vec<_> = tiles
            .iter()
            .map(|&(r, t)| {
                jit.dot(DotSpec::new(ElemType::F64).with_tile(r, t))
                    .unwrap()
            })
            .collect();
        let reps = (2e7 / (m * n * k) as f64).ceil() as usize;
        let mut best = vec![f64::INFINITY; tiles.len()];
        for _ in 0..20 {
            for (kernel, best) in kernels.iter().zip(&mut best) {
                let t = Instant::now();
                for _ in 0..reps {
                    let shape = DotShape::new(m, n, k);
                    let seq = Parallelism::Sequential;
                    kernel.run(&a, &b, &mut c, shape, 1.0, 0.0, seq).unwrap();
                }
                *best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
        }
        for (&(r, t), best) in tiles.iter().zip(best) {
            let gflops = 2.0 * (m * n * k) as f64 / best / 1e9;
            println!(
                "{m}x{n}x{k} tile {r}x{t}: {:.4} ms, {gflops:.2} GFLOP/s",
                best * 1e3
            );
        }
    }
}
