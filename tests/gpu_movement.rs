//! GPU tests of the last host steps of the dense presets, now generated: the row copy
//! (`kiln_kernels::row_copy`: the embedding gather and slices along one axis) and the
//! elementwise map with single-element operands, with one value per row (Qwen2-MoE's
//! per-token shared-expert gate) and in i32 (decode's `lengths = cache_start + 1`). Each kernel is lowered from the family the scheduler gives a one-op
//! graph (`KernelSpec::for_family`, its scalars and parameter names, as the executor binds
//! them) and compared with `kiln_ir::interp` on fresh random inputs: copies and i32 maps
//! bit for bit, half maps within 1e-2. Outputs are poisoned with NaN before each launch.
//! Planted structure: repeated ids, ids 0 and vocab − 1, out-of-range ids (−1, vocab, a large
//! id) that must give NaN rows over a finite-filled output without reading out of bounds,
//! slices at the start, middle and end of an axis and on every axis, odd row widths for the
//! scalar path. The last test runs a small plan of all three through the `Executor`.
//! Run on a GPU machine with `cargo test --test gpu_movement -- --ignored`.

mod common;
use common::{input, reference};

use common::{assert_close, device, fresh_seed, random, rng};
use kiln::ir::dtype::DType;
use kiln::ir::graph::Graph;
use kiln::ir::interp;
use kiln::ir::op::Op;
use kiln::ir::schedule::{schedule, Device, Family, ScheduleOptions};
use kiln::ir::shape::Bindings;
use kiln::ir::tensor::Tensor;
use kiln_kernels::lower::{KernelSpec, Scalar};
use kiln_runtime::cuda::{Arg, Args, CudaDevice, DeviceTensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

const DTYPES: [DType; 2] = [DType::F16, DType::BF16];

/// Schedules the one-kernel `graph`, checks it is placed on the GPU with family `expect`,
/// lowers it, binds `operands` (the node's operands in order) and an output that starts as
/// `fill` (NaN poison when `None`), launches it and returns the output.
fn launch_one(
    device: &CudaDevice,
    graph: &Graph,
    expect: &str,
    operands: &[&Tensor],
    fill: Option<f32>,
) -> Tensor {
    let plan = schedule(graph, &ScheduleOptions::default()).unwrap();
    assert_eq!(plan.kernels.len(), 1, "{}", plan.to_json());
    let kernel = &plan.kernels[0];
    assert_eq!(kernel.device, Device::Gpu, "{}", kernel.family.describe());
    assert_eq!(kernel.family.name(), expect, "{}", kernel.family.describe());
    let bindings = Bindings::new();
    let spec = KernelSpec::for_family(&kernel.family, &bindings).unwrap();
    let loaded = device.load(&spec.generate().unwrap()).unwrap();
    let (input_params, output_params) = spec.operand_params();
    assert_eq!(input_params.len(), operands.len());
    assert_eq!(output_params, ["out"]);
    let uploaded: Vec<DeviceTensor> = operands
        .iter()
        .map(|t| DeviceTensor::upload(device, t).unwrap())
        .collect();
    let out_type = &kernel.computes.outputs[0];
    let out_shape = out_type.shape.resolve(&bindings).unwrap();
    let out = match fill {
        None => DeviceTensor::poisoned(device, out_type.dtype, &out_shape).unwrap(),
        Some(value) => {
            let filled = Tensor::full(out_type.dtype, &out_shape, value);
            DeviceTensor::upload(device, &filled).unwrap()
        }
    };
    let mut args = Args::new();
    for (name, tensor) in input_params.iter().zip(&uploaded) {
        args = args.buffer(name, tensor.arg());
    }
    args = args.buffer("out", out.arg());
    for (name, value) in spec.scalars(&kernel.family, &bindings).unwrap() {
        args = args.set(
            name,
            match value {
                Scalar::U32(v) => Arg::U32(v),
                Scalar::F32(v) => Arg::F32(v),
            },
        );
    }
    loaded.launch(&args).unwrap();
    out.download().unwrap()
}

/// Asserts `got` equals `want` bit for bit as values (NaN where `want` is NaN, and nowhere
/// else: an unwritten poisoned element fails).
fn assert_exact(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    for (i, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
        let same = if w.is_nan() { g.is_nan() } else { g == w };
        assert!(same, "{what}: element {i} is {g}, want {w}");
    }
}

/// `rows` ids in `0..vocab` with planted repeats and both ends of the table.
fn planted_ids(rows: usize, vocab: usize, rng: &mut ChaCha8Rng) -> Vec<i32> {
    let mut ids: Vec<i32> = (0..rows)
        .map(|_| rng.random_range(0..vocab as i32))
        .collect();
    if rows >= 4 {
        ids[0] = 0;
        ids[rows - 1] = vocab as i32 - 1;
        ids[rows / 2] = ids[1];
        ids[rows / 2 + 1] = ids[1];
    }
    ids
}

fn gather_graph(table: &Tensor, ids: &Tensor) -> Graph {
    let mut g = Graph::new("embedding");
    let t = input(&mut g, "table", table);
    let i = input(&mut g, "ids", ids);
    let out = g.add1("embed", Op::Embedding, &[t, i]).unwrap();
    g.output("out", out);
    g
}

#[test]
#[ignore = "needs a CUDA device"]
fn gather_matches_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("gather"));
    let vocab = 300;
    for dtype in DTYPES {
        // Vector rows (8, 256, 4096 elements) and scalar rows (1, 13, 12, 4100).
        for hidden in [8usize, 256, 4096, 1, 13, 12, 4100] {
            let table = random(dtype, &[vocab, hidden], 1.0, &mut rng);
            for (batch, seq) in [(1usize, 1usize), (1, 7), (3, 100)] {
                let ids = planted_ids(batch * seq, vocab, &mut rng);
                let ids = Tensor::i32(&[batch, seq], &ids);
                let graph = gather_graph(&table, &ids);
                let want = reference(&graph, &[("table", &table), ("ids", &ids)]);
                let got = launch_one(&device, &graph, "gather", &[&table, &ids], None);
                assert_exact(
                    &format!("gather {dtype} hidden={hidden} ids={batch}x{seq}"),
                    &got,
                    &want,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gather_writes_nan_rows_for_ids_outside_the_table() {
    let device = device();
    let mut rng = rng(fresh_seed("gather_bad_ids"));
    let vocab = 50;
    for dtype in DTYPES {
        for hidden in [64usize, 13] {
            let table = random(dtype, &[vocab, hidden], 1.0, &mut rng);
            let mut ids = planted_ids(16, vocab, &mut rng);
            let bad = [(3usize, -1i32), (7, vocab as i32), (11, i32::MAX)];
            for &(row, id) in &bad {
                ids[row] = id;
            }
            let ids_tensor = Tensor::i32(&[2, 8], &ids);
            let graph = gather_graph(&table, &ids_tensor);
            let map: HashMap<String, Tensor> = [
                ("table".to_string(), table.clone()),
                ("ids".to_string(), ids_tensor.clone()),
            ]
            .into_iter()
            .collect();
            assert!(
                interp::run(&graph, &map).is_err(),
                "the interpreter refuses an id outside the table"
            );
            // The reference: the bad rows gathered from id 0, then set to NaN.
            let mut good = ids.clone();
            for &(row, _) in &bad {
                good[row] = 0;
            }
            let good = Tensor::i32(&[2, 8], &good);
            let mut want = reference(&graph, &[("table", &table), ("ids", &good)]);
            for &(row, _) in &bad {
                want.data[row * hidden..(row + 1) * hidden].fill(f32::NAN);
            }
            // A finite-filled output: a NaN row was written, not left over.
            let got = launch_one(&device, &graph, "gather", &[&table, &ids_tensor], Some(1.0));
            assert_exact(
                &format!("gather {dtype} hidden={hidden} bad ids"),
                &got,
                &want,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn slices_match_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("slice"));
    // (shape, axis, start, end): the last token, the first, a middle range, negative and
    // open bounds, every axis (the last one copies rows of one element), odd widths.
    let cases: &[(&[usize], usize, i64, Option<i64>)] = &[
        (&[1, 128, 256], 1, -1, None),
        (&[3, 17, 256], 1, -1, None),
        (&[3, 17, 256], 1, 0, Some(1)),
        (&[3, 17, 64], 1, 5, Some(-4)),
        (&[3, 17, 64], 1, 0, None),
        (&[4, 9, 13], 1, 2, Some(5)),
        (&[6, 5, 24], 0, 1, Some(4)),
        (&[2, 7, 40], 2, 8, Some(-8)),
        (&[2, 7, 40], 2, -3, None),
        (&[5, 4100], 0, -2, None),
    ];
    for dtype in DTYPES {
        for &(shape, axis, start, end) in cases {
            let x = random(dtype, shape, 1.0, &mut rng);
            let mut g = Graph::new("slice");
            let xv = input(&mut g, "x", &x);
            let out = g
                .add1("last_token", Op::Slice { axis, start, end }, &[xv])
                .unwrap();
            g.output("out", out);
            let want = reference(&g, &[("x", &x)]);
            let got = launch_one(&device, &g, "slice", &[&x], None);
            assert_exact(
                &format!("slice {dtype} {shape:?} axis {axis} {start}..{end:?}"),
                &got,
                &want,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn i32_maps_with_a_scalar_operand_match_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("i32_map"));
    for n in [1usize, 3, 4, 5, 8, 17, 1000, 4099] {
        let start: Vec<i32> = (0..n).map(|_| rng.random_range(0..1 << 20)).collect();
        let start = Tensor::i32(&[n], &start);
        let one = Tensor::i32(&[], &[1]);
        // `lengths = cache_start + 1`, as the decode graph builds it.
        let mut g = Graph::new("lengths");
        let s = input(&mut g, "cache_start", &start);
        let o = input(&mut g, "one", &one);
        let out = g.add1("lengths", Op::Add, &[s, o]).unwrap();
        g.output("out", out);
        let want = reference(&g, &[("cache_start", &start), ("one", &one)]);
        let got = launch_one(&device, &g, "map", &[&start, &one], None);
        assert_exact(&format!("cache_start + 1, n={n}"), &got, &want);

        // The scalar first, a [1]-shaped operand, and a product.
        let scale = Tensor::i32(&[1], &[rng.random_range(-9..10)]);
        let mut g = Graph::new("scaled");
        let k = input(&mut g, "k", &scale);
        let s = input(&mut g, "x", &start);
        let out = g.add1("scaled", Op::Mul, &[k, s]).unwrap();
        g.output("out", out);
        let small: Vec<i32> = (0..n).map(|_| rng.random_range(-1000..1000)).collect();
        let small = Tensor::i32(&[n], &small);
        let want = reference(&g, &[("k", &scale), ("x", &small)]);
        let got = launch_one(&device, &g, "map", &[&scale, &small], None);
        assert_exact(&format!("k * x, n={n}"), &got, &want);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn half_maps_with_a_scalar_operand_match_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("half_scalar_map"));
    for dtype in DTYPES {
        for n in [1usize, 7, 8, 9, 1000, 3 * 4096 + 5] {
            let x = random(dtype, &[n], 1.0, &mut rng);
            let s = random(dtype, &[], 2.0, &mut rng);
            let mut g = Graph::new("scale");
            let xv = input(&mut g, "x", &x);
            let sv = input(&mut g, "s", &s);
            let m = g.add1("mul", Op::Mul, &[xv, sv]).unwrap();
            let out = g.add1("silu", Op::Silu, &[m]).unwrap();
            g.output("out", out);
            // Fused into one map by the rewriter in a compiled model; here the plain graph
            // schedules two kernels, so fuse by hand with the FusedMap it would produce.
            let mut fused = Graph::new("scale_fused");
            let xv = input(&mut fused, "x", &x);
            let sv = input(&mut fused, "s", &s);
            let steps = vec![
                kiln::ir::op::MapStep::Operand { index: 0 },
                kiln::ir::op::MapStep::Operand { index: 1 },
                kiln::ir::op::MapStep::Mul { a: 0, b: 1 },
                kiln::ir::op::MapStep::Silu { x: 2 },
            ];
            let y = fused
                .add1("map", Op::FusedMap { steps }, &[xv, sv])
                .unwrap();
            fused.output("out", y);
            let want = reference(&g, &[("x", &x), ("s", &s)]);
            let got = launch_one(&device, &fused, "map", &[&x, &s], None);
            assert_close(&format!("silu(x * s) {dtype} n={n}"), &got, &want, 1e-2);
        }
    }
}

/// Qwen2-MoE's gated shared expert, `out + sigmoid(gate) · shared` with the gate `[rows, 1]`
/// (one value per row, a row operand) and the others `[rows, width]`, as the rewriter fuses
/// it: widths of whole chunks (64, 4096) and of chunks straddling rows (100); per-row gates
/// planted far apart (logits ±6 and random in between) so that a gate read from the wrong
/// row is an error of about one `shared` element, caught element by element.
#[test]
#[ignore = "needs a CUDA device"]
fn half_maps_with_a_row_operand_match_the_interpreter() {
    use kiln::ir::op::MapStep;
    let device = device();
    let mut rng = rng(fresh_seed("half_row_map"));
    for dtype in DTYPES {
        for width in [64usize, 100, 4096] {
            for rows in [1usize, 3, 37] {
                let out = random(dtype, &[rows, width], 0.5, &mut rng);
                let shared = random(dtype, &[rows, width], 1.0, &mut rng);
                let logits: Vec<f32> = (0..rows)
                    .map(|r| match r % 3 {
                        0 => 6.0,
                        1 => -6.0,
                        _ => rng.random_range(-2.0..2.0),
                    })
                    .collect();
                let gate = Tensor::new(dtype, &[rows, 1], logits).unwrap();
                let mut g = Graph::new("gated_shared_expert");
                let o = input(&mut g, "out", &out);
                let gv = input(&mut g, "gate", &gate);
                let sv = input(&mut g, "shared", &shared);
                let steps = vec![
                    MapStep::Operand { index: 0 },
                    MapStep::Operand { index: 1 },
                    MapStep::Operand { index: 2 },
                    MapStep::Sigmoid { x: 1 },
                    MapStep::Mul { a: 3, b: 2 },
                    MapStep::Add { a: 0, b: 4 },
                ];
                let y = g
                    .add1("gated", Op::FusedMap { steps }, &[o, gv, sv])
                    .unwrap();
                g.output("y", y);
                let plan = schedule(&g, &ScheduleOptions::default()).unwrap();
                assert!(
                    matches!(
                        &plan.kernels[0].family,
                        Family::Map { row_operands, row_width, broadcast: false, .. }
                            if row_operands == &vec![1] && *row_width == width
                    ),
                    "{}",
                    plan.kernels[0].family.describe()
                );
                let want = reference(&g, &[("out", &out), ("gate", &gate), ("shared", &shared)]);
                let got = launch_one(&device, &g, "map", &[&out, &gate, &shared], None);
                let what = format!("out + sigmoid(gate) * shared {dtype} {rows}x{width}");
                assert_close(&what, &got, &want, 1e-2);
                for (i, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
                    assert!(
                        (g - w).abs() <= 2e-2 * w.abs().max(1.0),
                        "{what}: element {i} (row {}) is {g}, want {w}",
                        i / width
                    );
                }
            }
        }
    }
}

/// The embedding, the last-token slice and decode's lengths map as one plan through the
/// executor: every kernel on the GPU, operands bound by name with no special case, the i32
/// constant resident on the device; results bit for bit as the interpreter's.
#[test]
#[ignore = "needs a CUDA device"]
fn a_movement_plan_runs_on_the_gpu_through_the_executor() {
    use kiln::ir::weights::Weights;
    use kiln_runtime::exec::{DeviceWeights, Executor};
    use std::sync::Arc;

    let device = Arc::new(device());
    let mut rng = rng(fresh_seed("movement_plan"));
    let (vocab, hidden, batch, seq) = (1000usize, 256usize, 2usize, 9usize);
    for dtype in DTYPES {
        let table = random(dtype, &[vocab, hidden], 1.0, &mut rng);
        let ids = Tensor::i32(&[batch, seq], &planted_ids(batch * seq, vocab, &mut rng));
        let start = Tensor::i32(&[batch], &[17, 4000]);
        let mut g = Graph::new("movement");
        let t = input(&mut g, "table", &table);
        let i = input(&mut g, "ids", &ids);
        let s = input(&mut g, "cache_start", &start);
        let x = g.add1("embed", Op::Embedding, &[t, i]).unwrap();
        let last = g
            .add1(
                "last_token",
                Op::Slice {
                    axis: 1,
                    start: -1,
                    end: None,
                },
                &[x],
            )
            .unwrap();
        let one = g.constant("one", 1.0, DType::I32).unwrap();
        let lengths = g.add1("lengths", Op::Add, &[s, one]).unwrap();
        g.output("last", last);
        g.output("lengths", lengths);
        let plan = schedule(&g, &ScheduleOptions::default()).unwrap();
        for kernel in &plan.kernels {
            assert_eq!(kernel.device, Device::Gpu, "{}", kernel.name);
            assert!(!matches!(kernel.family, Family::HostOnly { .. }));
        }
        let mut executor = Executor::new(
            plan,
            &Weights::new(),
            Some(device.clone()),
            &DeviceWeights::default(),
        )
        .unwrap();
        executor.poison_arena(true);
        let inputs: HashMap<String, Tensor> = [
            ("table".to_string(), table.clone()),
            ("ids".to_string(), ids.clone()),
            ("cache_start".to_string(), start.clone()),
        ]
        .into_iter()
        .collect();
        for call in 0..2 {
            let got = executor.run(&inputs).unwrap();
            let want = interp::run(&g, &inputs).unwrap();
            for name in ["last", "lengths"] {
                assert_exact(
                    &format!("{dtype} call {call}: {name}"),
                    &got[name],
                    &want[name],
                );
            }
        }
        assert_eq!(executor.stats().cpu_kernels, 0, "{:?}", executor.stats());
    }
}
