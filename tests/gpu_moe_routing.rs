//! GPU tests of the MoE routing kernels (`kiln_kernels::moe::{router, dispatch, combine}`),
//! each launched directly with its parameters bound by name and compared with
//! `kiln_ir::interp` on a one-op graph over fresh random inputs. Outputs are poisoned before
//! each launch, so an element never written fails.
//!
//! - router: experts bit for bit, weights within 1e-5 (relative, over the tensor); 8 experts
//!   top 2 and 128 experts top 8, renormalised and not, f16, bf16 and f32 logits, 1, 5 and
//!   300 tokens. Planted rows: two experts tied for the top (the lower index must come
//!   first), `-0` and `+0` tied for the top, and a row of equal logits (the first `k`
//!   experts, in index order).
//! - router with its linear fused (`MoeRouterLinear`): Mixtral-like (8 experts of 4096, top
//!   2) and Qwen3-MoE-like (128 experts of 2048, top 8), renormalised, f16 and bf16, 1, 5
//!   and 300 tokens; experts bit for bit on every token, weights within 1e-5. The inputs are
//!   grid values (`common::grid`), so the kernel's f32 dot products equal the interpreter's
//!   f64 ones exactly and its logits, rounded to the dtype, are the interpreter's bit for
//!   bit: every near-tie is a real tie, which both must break to the lower index. (On
//!   arbitrary values a logit whose exact product lies within an f32 ulp of a dtype rounding
//!   boundary may legitimately round the other way; comparing experts there would test luck,
//!   not the kernel.) bf16 rounding ties many logits; planted as well: experts 1 and E − 2
//!   with equal weight rows aligned with token 0 (tied far above the rest: 1 first) and an
//!   all-zero token 1 (every logit ties: the first `k` experts, equal weights).
//! - dispatch: `order` and `offsets` bit for bit; decode sizes, many slots on one expert,
//!   empty experts, one expert, 8192 slots; slots with an expert outside the table
//!   (placed nowhere, `order`'s tail −1, which the interpreter refuses: the reference is a
//!   host sort that is first checked against the interpreter).
//! - combine: within 1e-2 of the interpreter (half rounding) over a dispatch permutation of
//!   random experts, 1, 5 and 300 tokens, vector and scalar rows; an `order` that misses a
//!   slot gives that token a NaN row and leaves the others exact.
//!
//! Run on a GPU machine with `cargo test --test gpu_moe_routing -- --ignored`.

mod common;
use common::{assert_close, device, fresh_seed, grid, input, random, rng};

use kiln::ir::dtype::DType;
use kiln::ir::graph::Graph;
use kiln::ir::interp;
use kiln::ir::op::Op;
use kiln::ir::tensor::Tensor;
use kiln_kernels::moe::combine::{self, MoeCombineSpec};
use kiln_kernels::moe::dispatch::{self, MoeDispatchSpec};
use kiln_kernels::moe::router::{self, MoeRouterSpec};
use kiln_runtime::cuda::{Args, CudaDevice, DeviceTensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};

/// Runs `graph` in the interpreter on the named inputs; all its outputs by name.
fn interpret(graph: &Graph, inputs: &[(&str, &Tensor)]) -> BTreeMap<String, Tensor> {
    let map: HashMap<String, Tensor> = inputs
        .iter()
        .map(|(n, t)| (n.to_string(), (*t).clone()))
        .collect();
    interp::run(graph, &map).unwrap()
}

/// Asserts `got` equals `want` value for value (NaN only where `want` is NaN).
fn assert_exact(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    for (i, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
        let same = if w.is_nan() { g.is_nan() } else { g == w };
        assert!(same, "{what}: element {i} is {g}, want {w}");
    }
}

fn upload(device: &CudaDevice, t: &Tensor) -> DeviceTensor {
    DeviceTensor::upload(device, t).unwrap()
}

fn poisoned(device: &CudaDevice, dtype: DType, shape: &[usize]) -> DeviceTensor {
    DeviceTensor::poisoned(device, dtype, shape).unwrap()
}

// ----- router ------------------------------------------------------------------------------

/// Plants ties in the first rows of `logits [tokens, experts]`: row 0 has experts 1 and
/// `experts − 2` tied above every other, row 1 has `-0` (expert 2) and `+0` (expert 4)
/// tied above the rest (all negative), row 2 is all equal. Returns the expected leading
/// picks of each planted row.
fn plant_router_ties(logits: &mut Tensor, experts: usize, top_k: usize) -> Vec<(usize, Vec<i32>)> {
    let tokens = logits.shape[0];
    let mut expected = Vec::new();
    let row = |r: usize| r * experts..(r + 1) * experts;
    if tokens > 0 && experts >= 4 {
        let range = row(0);
        let top = logits.data[range.clone()]
            .iter()
            .cloned()
            .fold(f32::MIN, f32::max)
            + 1.0;
        let top = logits.dtype.round(top);
        logits.data[range.start + experts - 2] = top;
        logits.data[range.start + 1] = top;
        expected.push((0, vec![1, experts as i32 - 2]));
    }
    if tokens > 1 && experts >= 5 {
        let range = row(1);
        for v in &mut logits.data[range.clone()] {
            *v = -v.abs() - 0.5;
            *v = logits.dtype.round(*v);
        }
        logits.data[range.start + 4] = 0.0;
        logits.data[range.start + 2] = -0.0;
        expected.push((1, vec![2, 4]));
    }
    if tokens > 2 {
        let range = row(2);
        logits.data[range].fill(0.75);
        expected.push((2, (0..top_k as i32).collect()));
    }
    for (_, picks) in &mut expected {
        picks.truncate(top_k);
    }
    expected
}

fn router_graph(logits: &Tensor, top_k: usize, normalize: bool) -> Graph {
    let mut g = Graph::new("router");
    let l = input(&mut g, "logits", logits);
    let outs = g
        .add("route", Op::MoeRouter { top_k, normalize }, &[l])
        .unwrap();
    g.output("weights", outs[0]);
    g.output("experts", outs[1]);
    g
}

#[test]
#[ignore = "needs a CUDA device"]
fn router_matches_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("moe_router"));
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for (experts, top_k) in [(8usize, 2usize), (128, 8), (60, 4)] {
            for normalize in [true, false] {
                let spec = MoeRouterSpec {
                    dtype,
                    experts,
                    top_k,
                    normalize,
                    hidden: None,
                };
                let loaded = device.load(&router::generate(&spec).unwrap()).unwrap();
                for tokens in [1usize, 5, 300] {
                    let what = format!("{} tokens={tokens}", spec.entry());
                    let mut logits = random(dtype, &[tokens, experts], 2.0, &mut rng);
                    let planted = plant_router_ties(&mut logits, experts, top_k);
                    let want = interpret(
                        &router_graph(&logits, top_k, normalize),
                        &[("logits", &logits)],
                    );

                    let logits_dev = upload(&device, &logits);
                    let weights = poisoned(&device, DType::F32, &[tokens, top_k]);
                    let chosen = poisoned(&device, DType::I32, &[tokens, top_k]);
                    let args = Args::new()
                        .buffer("logits", logits_dev.arg())
                        .buffer("weights", weights.arg())
                        .buffer("experts", chosen.arg())
                        .u32("tokens", tokens as u32);
                    loaded.launch(&args).unwrap();
                    let got_experts = chosen.download().unwrap();
                    let got_weights = weights.download().unwrap();

                    assert_exact(&format!("{what} experts"), &got_experts, &want["experts"]);
                    for (r, picks) in &planted {
                        let row = &got_experts.to_i32()[r * top_k..r * top_k + picks.len()];
                        assert_eq!(row, &picks[..], "{what}: planted row {r}");
                    }
                    assert_close(
                        &format!("{what} weights"),
                        &got_weights,
                        &want["weights"],
                        1e-5,
                    );
                    if normalize {
                        for (r, row) in got_weights.data.chunks(top_k).enumerate() {
                            let sum: f32 = row.iter().sum();
                            assert!((sum - 1.0).abs() < 1e-5, "{what}: row {r} sums to {sum}");
                        }
                    }
                }
            }
        }
    }
}

// ----- router with its linear fused ----------------------------------------------------------

fn fused_router_graph(x: &Tensor, w: &Tensor, top_k: usize, normalize: bool) -> Graph {
    let mut g = Graph::new("router_linear");
    let x = input(&mut g, "x", x);
    let w = input(&mut g, "w", w);
    let outs = g
        .add("route", Op::MoeRouterLinear { top_k, normalize }, &[x, w])
        .unwrap();
    g.output("weights", outs[0]);
    g.output("experts", outs[1]);
    g
}

/// Grid inputs `x [tokens, hidden]` (steps of 1/8) and `w [experts, hidden]` (1/16) with the
/// planted rows of the module docs; returns them and the expected leading picks of the
/// planted tokens.
fn fused_router_inputs(
    dtype: DType,
    tokens: usize,
    experts: usize,
    hidden: usize,
    top_k: usize,
    rng: &mut ChaCha8Rng,
) -> (Tensor, Tensor, Vec<(usize, Vec<i32>)>) {
    let mut x = grid(dtype, &[tokens, hidden], 0.125, rng);
    let mut w = grid(dtype, &[experts, hidden], 0.0625, rng);
    let mut planted = Vec::new();
    // Token 0's row, halved (exact): experts 1 and E - 2 score |x₀|² / 2, about 64, far
    // above every other logit (about 1.4 apart on average).
    for e in [1, experts - 2] {
        for i in 0..hidden {
            w.data[e * hidden + i] = x.data[i] * 0.5;
        }
    }
    planted.push((0, vec![1, experts as i32 - 2]));
    if tokens > 1 {
        x.data[hidden..2 * hidden].fill(0.0);
        planted.push((1, (0..top_k as i32).collect()));
    }
    (x, w, planted)
}

#[test]
#[ignore = "needs a CUDA device"]
fn fused_router_matches_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("moe_router_linear"));
    // (experts, top_k, hidden): Mixtral, Qwen3-MoE.
    for (experts, top_k, hidden) in [(8usize, 2usize, 4096usize), (128, 8, 2048)] {
        for dtype in [DType::F16, DType::BF16] {
            let spec = MoeRouterSpec {
                dtype,
                experts,
                top_k,
                normalize: true,
                hidden: Some(hidden),
            };
            let loaded = device.load(&router::generate(&spec).unwrap()).unwrap();
            for tokens in [1usize, 5, 300] {
                let what = format!("{} tokens={tokens}", spec.entry());
                let (x, w, planted) =
                    fused_router_inputs(dtype, tokens, experts, hidden, top_k, &mut rng);
                let want = interpret(
                    &fused_router_graph(&x, &w, top_k, true),
                    &[("x", &x), ("w", &w)],
                );

                let (x_dev, w_dev) = (upload(&device, &x), upload(&device, &w));
                let weights = poisoned(&device, DType::F32, &[tokens, top_k]);
                let chosen = poisoned(&device, DType::I32, &[tokens, top_k]);
                let args = Args::new()
                    .buffer("x", x_dev.arg())
                    .buffer("w", w_dev.arg())
                    .buffer("weights", weights.arg())
                    .buffer("experts", chosen.arg())
                    .u32("tokens", tokens as u32);
                loaded.launch(&args).unwrap();
                let got_experts = chosen.download().unwrap();
                let got_weights = weights.download().unwrap();

                assert_exact(&format!("{what} experts"), &got_experts, &want["experts"]);
                for (r, picks) in &planted {
                    let row = &got_experts.to_i32()[r * top_k..r * top_k + picks.len()];
                    assert_eq!(row, &picks[..], "{what}: planted row {r}");
                }
                assert_close(
                    &format!("{what} weights"),
                    &got_weights,
                    &want["weights"],
                    1e-5,
                );
                for (r, row) in got_weights.data.chunks(top_k).enumerate() {
                    let sum: f32 = row.iter().sum();
                    assert!((sum - 1.0).abs() < 1e-5, "{what}: row {r} sums to {sum}");
                }
                if tokens > 1 {
                    let zero_row = &got_weights.data[top_k..2 * top_k];
                    let even = 1.0 / top_k as f32;
                    assert!(
                        zero_row.iter().all(|&v| (v - even).abs() < 1e-6),
                        "{what}: the all-tied row's weights {zero_row:?}"
                    );
                }
            }
        }
    }
}

// ----- dispatch ----------------------------------------------------------------------------

/// The documented dispatch: valid slots (expert in `0..experts`) sorted by expert, stably,
/// then −1 for each invalid slot; offsets over the valid slots.
fn host_dispatch(chosen: &[i32], experts: usize) -> (Vec<i32>, Vec<i32>) {
    let mut order: Vec<i32> = (0..chosen.len() as i32)
        .filter(|&s| (0..experts as i32).contains(&chosen[s as usize]))
        .collect();
    order.sort_by_key(|&s| chosen[s as usize]);
    let mut offsets = vec![0i32; experts + 1];
    for &s in &order {
        offsets[chosen[s as usize] as usize + 1] += 1;
    }
    for e in 0..experts {
        offsets[e + 1] += offsets[e];
    }
    order.resize(chosen.len(), -1);
    (order, offsets)
}

fn dispatch_graph(chosen: &Tensor, experts: usize) -> Graph {
    let mut g = Graph::new("dispatch");
    let c = input(&mut g, "experts", chosen);
    let outs = g
        .add(
            "dispatch",
            Op::MoeDispatch {
                num_experts: experts,
            },
            &[c],
        )
        .unwrap();
    g.output("order", outs[0]);
    g.output("offsets", outs[1]);
    g
}

/// Launches the dispatch kernel on `chosen [tokens, k]`; returns `(order, offsets)`.
fn launch_dispatch(device: &CudaDevice, experts: usize, chosen: &Tensor) -> (Tensor, Tensor) {
    let loaded = device
        .load(&dispatch::generate(&MoeDispatchSpec { experts }).unwrap())
        .unwrap();
    let chosen_dev = upload(device, chosen);
    let order = poisoned(device, DType::I32, &chosen.shape);
    let offsets = poisoned(device, DType::I32, &[experts + 1]);
    let args = Args::new()
        .buffer("experts", chosen_dev.arg())
        .buffer("order", order.arg())
        .buffer("offsets", offsets.arg())
        .u32("slots", chosen.len() as u32);
    loaded.launch(&args).unwrap();
    (order.download().unwrap(), offsets.download().unwrap())
}

/// Random experts for `tokens · k` slots, drawn by `pick`.
fn chosen_experts(
    tokens: usize,
    k: usize,
    rng: &mut ChaCha8Rng,
    mut pick: impl FnMut(&mut ChaCha8Rng) -> i32,
) -> Tensor {
    let values: Vec<i32> = (0..tokens * k).map(|_| pick(rng)).collect();
    Tensor::i32(&[tokens, k], &values)
}

#[test]
#[ignore = "needs a CUDA device"]
fn dispatch_matches_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("moe_dispatch"));
    // (experts, tokens, k, distribution): 0 uniform, 1 mostly expert 3, 2 even experts only.
    let cases = [
        (8usize, 1usize, 2usize, 0u8),
        (8, 5, 2, 0),
        (8, 32, 2, 1),
        (8, 300, 2, 2),
        (1, 7, 1, 0),
        (128, 300, 8, 0),
        (128, 300, 8, 2),
        (64, 1024, 8, 0),
        (64, 1024, 8, 1),
        (300, 40, 8, 2),
        (1024, 5, 8, 0),
        (1024, 1024, 8, 0),
    ];
    for (experts, tokens, k, distribution) in cases {
        let what = format!("dispatch experts={experts} tokens={tokens} k={k} d={distribution}");
        let chosen = chosen_experts(tokens, k, &mut rng, |rng| match distribution {
            1 if rng.random_bool(0.8) => 3 % experts as i32,
            2 => 2 * rng.random_range(0..experts.div_ceil(2) as i32),
            _ => rng.random_range(0..experts as i32),
        });
        let want = interpret(&dispatch_graph(&chosen, experts), &[("experts", &chosen)]);
        let (host_order, host_offsets) = host_dispatch(&chosen.to_i32(), experts);
        assert_eq!(want["order"].to_i32(), host_order, "{what}: host sort");
        assert_eq!(
            want["offsets"].to_i32(),
            host_offsets,
            "{what}: host offsets"
        );
        let (order, offsets) = launch_dispatch(&device, experts, &chosen);
        assert_exact(&format!("{what} order"), &order, &want["order"]);
        assert_exact(&format!("{what} offsets"), &offsets, &want["offsets"]);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn dispatch_places_out_of_range_experts_nowhere() {
    let device = device();
    let mut rng = rng(fresh_seed("moe_dispatch_bad"));
    for (experts, tokens, k) in [(8usize, 5usize, 2usize), (128, 300, 8)] {
        let mut values: Vec<i32> = (0..tokens * k)
            .map(|_| rng.random_range(0..experts as i32))
            .collect();
        for (slot, bad) in [(1usize, -1i32), (3, experts as i32), (7, i32::MAX)] {
            values[slot] = bad;
        }
        let chosen = Tensor::i32(&[tokens, k], &values);
        let map: HashMap<String, Tensor> = [("experts".to_string(), chosen.clone())].into();
        assert!(
            interp::run(&dispatch_graph(&chosen, experts), &map).is_err(),
            "the interpreter refuses an expert outside the table"
        );
        let (want_order, want_offsets) = host_dispatch(&values, experts);
        assert_eq!(want_order[want_order.len() - 3..], [-1, -1, -1]);
        let (order, offsets) = launch_dispatch(&device, experts, &chosen);
        let what = format!("dispatch experts={experts} bad slots");
        assert_eq!(order.to_i32(), want_order, "{what}: order");
        assert_eq!(offsets.to_i32(), want_offsets, "{what}: offsets");
    }
}

// ----- combine -----------------------------------------------------------------------------

/// `order = dispatch(experts)` and `out = combine(y, order, weights)`, both interpreted.
fn combine_graph(chosen: &Tensor, y: &Tensor, weights: &Tensor, experts: usize) -> Graph {
    let mut g = Graph::new("combine");
    let c = input(&mut g, "experts", chosen);
    let yv = input(&mut g, "y", y);
    let w = input(&mut g, "weights", weights);
    let outs = g
        .add(
            "dispatch",
            Op::MoeDispatch {
                num_experts: experts,
            },
            &[c],
        )
        .unwrap();
    let out = g
        .add1("combine", Op::MoeCombine, &[yv, outs[0], w])
        .unwrap();
    g.output("order", outs[0]);
    g.output("out", out);
    g
}

/// Launches the combine kernel; returns `out [tokens, hidden]`.
fn launch_combine(
    device: &CudaDevice,
    spec: &MoeCombineSpec,
    y: &Tensor,
    order: &Tensor,
    weights: &Tensor,
) -> Tensor {
    let tokens = weights.shape[0];
    let loaded = device.load(&combine::generate(spec).unwrap()).unwrap();
    let (y_dev, order_dev, weights_dev) = (
        upload(device, y),
        upload(device, order),
        upload(device, weights),
    );
    let out = poisoned(device, spec.dtype, &[tokens, spec.hidden]);
    let args = Args::new()
        .buffer("y", y_dev.arg())
        .buffer("order", order_dev.arg())
        .buffer("weights", weights_dev.arg())
        .buffer("out", out.arg())
        .u32("tokens", tokens as u32);
    loaded.launch(&args).unwrap();
    out.download().unwrap()
}

/// Random inputs of a combine: routed experts, expert rows `y [tokens, k, hidden]` and f32
/// weights.
fn combine_inputs(
    dtype: DType,
    experts: usize,
    tokens: usize,
    k: usize,
    hidden: usize,
    rng: &mut ChaCha8Rng,
) -> (Tensor, Tensor, Tensor) {
    let chosen = chosen_experts(tokens, k, rng, |rng| rng.random_range(0..experts as i32));
    let y = random(dtype, &[tokens, k, hidden], 1.0, rng);
    let weights = Tensor::uniform(DType::F32, &[tokens, k], 1.0, rng);
    (chosen, y, weights)
}

#[test]
#[ignore = "needs a CUDA device"]
fn combine_matches_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("moe_combine"));
    for dtype in [DType::F16, DType::BF16] {
        for (experts, k) in [(8usize, 2usize), (128, 8)] {
            for hidden in [256usize, 13, 4096] {
                let spec = MoeCombineSpec {
                    dtype,
                    hidden,
                    top_k: k,
                };
                for tokens in [1usize, 5, 300] {
                    let what = format!("{} tokens={tokens}", spec.entry());
                    let (chosen, y, weights) =
                        combine_inputs(dtype, experts, tokens, k, hidden, &mut rng);
                    let want = interpret(
                        &combine_graph(&chosen, &y, &weights, experts),
                        &[("experts", &chosen), ("y", &y), ("weights", &weights)],
                    );
                    let order = &want["order"];
                    let got = launch_combine(&device, &spec, &y, order, &weights);
                    assert_close(&what, &got, &want["out"], 1e-2);
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn combine_gives_nan_for_a_token_whose_slot_is_missing() {
    let device = device();
    let mut rng = rng(fresh_seed("moe_combine_missing"));
    let (experts, tokens, k, hidden) = (8usize, 6usize, 2usize, 64usize);
    let spec = MoeCombineSpec {
        dtype: DType::BF16,
        hidden,
        top_k: k,
    };
    let (chosen, y, weights) = combine_inputs(spec.dtype, experts, tokens, k, hidden, &mut rng);
    let mut want = interpret(
        &combine_graph(&chosen, &y, &weights, experts),
        &[("experts", &chosen), ("y", &y), ("weights", &weights)],
    );
    // Position 9 repeats position 2's slot: position 9's own slot is nowhere, and position
    // 2's slot keeps its lowest position (2), so its token is unchanged.
    let mut order = want["order"].to_i32();
    let lost = order[9] as usize;
    order[9] = order[2];
    let order = Tensor::i32(&[tokens, k], &order);
    let mut got = launch_combine(&device, &spec, &y, &order, &weights);
    let nan_token = lost / k;
    let row = nan_token * hidden..(nan_token + 1) * hidden;
    assert!(
        got.data[row.clone()].iter().all(|v| v.is_nan()),
        "token {nan_token}, whose slot {lost} is missing, is NaN"
    );
    got.data[row.clone()].fill(0.0);
    let out = want.get_mut("out").unwrap();
    out.data[row].fill(0.0);
    assert_close("combine with a missing slot", &got, out, 1e-2);
}
