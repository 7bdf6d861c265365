//! GPU tests of the memory-bound generators (elementwise map, RMSNorm, RoPE) against
//! `kiln_ir::interp`: fresh random inputs, outputs poisoned before each launch, relative
//! error ≤ 1e-2 for f16/bf16. Run on a GPU machine with `cargo test -- --ignored`.

mod common;
use common::{input, reference};

use common::{assert_close, device, fresh_seed, random, rng};
use kiln::ir::dtype::DType;
use kiln::ir::graph::Graph;
use kiln::ir::interp;
use kiln::ir::op::{InputKind, Op};
use kiln::ir::shape::Shape;
use kiln::ir::tensor::Tensor;
use kiln_codegen::expr::Expr;
use kiln_kernels::elementwise::{self, ElementwiseSpec};
use kiln_kernels::rms_norm::{self, RmsNormSpec};
use kiln_kernels::rope::{self, RopeSpec};
use kiln_runtime::cuda::{Args, DeviceTensor};
use rand::Rng;
use std::collections::HashMap;

const DTYPES: [DType; 2] = [DType::F16, DType::BF16];

#[test]
#[ignore = "needs a CUDA device"]
fn elementwise_swiglu_matches_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("elementwise"));
    for dtype in DTYPES {
        let spec = ElementwiseSpec {
            dtype,
            inputs: 2,
            expr: Expr::input(0).silu() * Expr::input(1),
            scalar_inputs: vec![],
            row_inputs: vec![],
            row_width: 0,
        };
        let kernel = device.load(&elementwise::generate(&spec).unwrap()).unwrap();
        for n in [1usize, 7, 8, 9, 1000, 3 * 4096 + 5, 1 << 20] {
            let gate = random(dtype, &[n], 2.0, &mut rng);
            let up = random(dtype, &[n], 1.0, &mut rng);
            let mut g = Graph::new("swiglu");
            let a = input(&mut g, "gate", &gate);
            let b = input(&mut g, "up", &up);
            let s = g.add1("silu", Op::Silu, &[a]).unwrap();
            let m = g.add1("mul", Op::Mul, &[s, b]).unwrap();
            g.output("out", m);
            let want = reference(&g, &[("gate", &gate), ("up", &up)]);
            let (dg, du) = (
                DeviceTensor::upload(&device, &gate).unwrap(),
                DeviceTensor::upload(&device, &up).unwrap(),
            );
            let out = DeviceTensor::poisoned(&device, dtype, &[n]).unwrap();
            let args = Args::new()
                .buffer("in0", dg.arg())
                .buffer("in1", du.arg())
                .buffer("out", out.arg())
                .u32("n", n as u32);
            kernel.launch(&args).unwrap();
            assert_close(
                &format!("swiglu map {dtype} n={n}"),
                &out.download().unwrap(),
                &want,
                1e-2,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn rms_norm_matches_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("rms_norm"));
    for dtype in DTYPES {
        for hidden in [128usize, 2048, 4096, 5120, 14336] {
            for residual in [false, true] {
                let spec = RmsNormSpec {
                    dtype,
                    hidden,
                    residual,
                };
                let kernel = device.load(&rms_norm::generate(&spec).unwrap()).unwrap();
                for rows in [1usize, 3, 17] {
                    // Rows of very different scales: a row mixed up with another shows.
                    let mut x = random(dtype, &[rows, hidden], 1.0, &mut rng);
                    for (r, row) in x.data.chunks_mut(hidden).enumerate() {
                        let scale = 10f32.powi(r as i32 % 3 - 1);
                        row.iter_mut().for_each(|v| *v = dtype.round(*v * scale));
                    }
                    let skip = random(dtype, &[rows, hidden], 1.0, &mut rng);
                    let weight = Tensor::new(
                        dtype,
                        &[hidden],
                        (0..hidden).map(|_| rng.random_range(0.5..1.5)).collect(),
                    )
                    .unwrap();
                    let eps = 1e-5f32;
                    let mut g = Graph::new("rms_norm");
                    let xv = input(&mut g, "x", &x);
                    let wv = g
                        .input("weight", InputKind::Weight, dtype, Shape::of(&[hidden]))
                        .unwrap();
                    let normed_input = if residual {
                        let sv = input(&mut g, "residual", &skip);
                        let h = g.add1("add", Op::Add, &[xv, sv]).unwrap();
                        g.output("hidden", h);
                        h
                    } else {
                        xv
                    };
                    let y = g
                        .add1("norm", Op::RmsNorm { eps }, &[normed_input, wv])
                        .unwrap();
                    g.output("out", y);
                    let map: HashMap<String, Tensor> =
                        [("x", &x), ("residual", &skip), ("weight", &weight)]
                            .iter()
                            .map(|(n, t)| (n.to_string(), (*t).clone()))
                            .collect();
                    let mut outputs = interp::run(&g, &map).unwrap();

                    let dx = DeviceTensor::upload(&device, &x).unwrap();
                    let dw = DeviceTensor::upload(&device, &weight).unwrap();
                    let ds = DeviceTensor::upload(&device, &skip).unwrap();
                    let out = DeviceTensor::poisoned(&device, dtype, &[rows, hidden]).unwrap();
                    let hidden_out =
                        DeviceTensor::poisoned(&device, dtype, &[rows, hidden]).unwrap();
                    let mut args = Args::new()
                        .buffer("x", dx.arg())
                        .buffer("weight", dw.arg())
                        .buffer("out", out.arg())
                        .u32("rows", rows as u32)
                        .f32("eps", eps);
                    if residual {
                        args = args
                            .buffer("residual", ds.arg())
                            .buffer("residual_out", hidden_out.arg());
                    }
                    kernel.launch(&args).unwrap();
                    let what =
                        format!("rms_norm {dtype} hidden={hidden} rows={rows} residual={residual}");
                    assert_close(
                        &what,
                        &out.download().unwrap(),
                        &outputs.remove("out").unwrap(),
                        1e-2,
                    );
                    if residual {
                        assert_close(
                            &format!("{what} hidden state"),
                            &hidden_out.download().unwrap(),
                            &outputs.remove("hidden").unwrap(),
                            1e-3,
                        );
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn rope_matches_the_interpreter_at_long_positions() {
    let device = device();
    let mut rng = rng(fresh_seed("rope"));
    for dtype in DTYPES {
        for (heads, head_dim, theta) in [
            (32usize, 128usize, 500_000f32),
            (8, 64, 10_000.0),
            (4, 32, 1e6),
        ] {
            let spec = RopeSpec {
                dtype,
                heads,
                head_dim,
                theta,
            };
            let kernel = device.load(&rope::generate(&spec).unwrap()).unwrap();
            for tokens in [1usize, 5, 33] {
                let x = random(dtype, &[1, tokens, heads, head_dim], 1.0, &mut rng);
                let positions: Vec<i32> = (0..tokens).map(|_| rng.random_range(0..32768)).collect();
                let positions = Tensor::i32(&[1, tokens], &positions);
                let mut g = Graph::new("rope");
                let xv = input(&mut g, "x", &x);
                let pv = input(&mut g, "positions", &positions);
                let y = g.add1("rope", Op::Rope { theta }, &[xv, pv]).unwrap();
                g.output("out", y);
                let want = reference(&g, &[("x", &x), ("positions", &positions)]);
                let dx = DeviceTensor::upload(&device, &x).unwrap();
                let dp = DeviceTensor::upload(&device, &positions).unwrap();
                let out = DeviceTensor::poisoned(&device, dtype, &x.shape).unwrap();
                let args = Args::new()
                    .buffer("x", dx.arg())
                    .buffer("positions", dp.arg())
                    .buffer("out", out.arg())
                    .u32("tokens", tokens as u32);
                kernel.launch(&args).unwrap();
                let what = format!("rope {dtype} heads={heads} d={head_dim} tokens={tokens}");
                assert_close(&what, &out.download().unwrap(), &want, 1e-2);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn identical_kernels_load_once() {
    let device = device();
    let spec = RmsNormSpec {
        dtype: DType::F16,
        hidden: 4096,
        residual: false,
    };
    let before = device.loads();
    let _a = device.load(&rms_norm::generate(&spec).unwrap()).unwrap();
    let _b = device.load(&rms_norm::generate(&spec).unwrap()).unwrap();
    assert_eq!(device.loads() - before, 1);
}
