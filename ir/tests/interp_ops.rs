//! Tests of the reference interpreter, op by op.
//!
//! Three kinds of test: hand-computed cases (the arithmetic is in the comments, worked on paper,
//! not copied from a run), properties on fresh random inputs checked against naive formulas
//! written here, and error paths. `every_op_is_exercised` runs every op test in this file and
//! checks that together they executed every op of `Op::NAMES`, so a new op without a test fails.

use kiln_ir::dtype::DType;
use kiln_ir::graph::{Graph, ValueId};
use kiln_ir::interp::{self, InterpError};
use kiln_ir::op::{InputKind, Op, QuantScheme};
use kiln_ir::shape;
use kiln_ir::shape::Shape;
use kiln_ir::tensor::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

thread_local! {
    /// Op names of every graph that `run` executed successfully on this thread.
    static EXERCISED: RefCell<BTreeSet<&'static str>> = const { RefCell::new(BTreeSet::new()) };
}

fn act(g: &mut Graph, name: &str, dtype: DType, dims: &[usize]) -> ValueId {
    g.input(name, InputKind::Activation, dtype, Shape::of(dims))
        .unwrap()
}

fn weight(g: &mut Graph, name: &str, dtype: DType, dims: &[usize]) -> ValueId {
    g.input(name, InputKind::Weight, dtype, Shape::of(dims))
        .unwrap()
}

fn feed(inputs: Vec<(&str, Tensor)>) -> HashMap<String, Tensor> {
    inputs
        .into_iter()
        .map(|(name, t)| (name.to_string(), t))
        .collect()
}

/// Verifies and runs `g`, recording the ops it exercised.
fn run(g: &Graph, inputs: Vec<(&str, Tensor)>) -> BTreeMap<String, Tensor> {
    g.verify()
        .unwrap_or_else(|e| panic!("graph does not verify: {e}\n{g}"));
    let out = interp::run(g, &feed(inputs)).unwrap_or_else(|e| panic!("run failed: {e}\n{g}"));
    for (name, value) in &g.outputs {
        let declared = g.value_type(*value).unwrap();
        assert_eq!(
            out[name].dtype, declared.dtype,
            "output `{name}` has the wrong dtype"
        );
    }
    EXERCISED.with(|set| {
        set.borrow_mut()
            .extend(g.nodes.iter().map(|node| node.op.name()))
    });
    out
}

/// Verifies and runs `g`, expecting an error.
fn run_err(g: &Graph, inputs: Vec<(&str, Tensor)>) -> InterpError {
    g.verify()
        .unwrap_or_else(|e| panic!("graph does not verify: {e}\n{g}"));
    match interp::run(g, &feed(inputs)) {
        Ok(out) => panic!("expected an error, got outputs {:?}", out.keys()),
        Err(e) => e,
    }
}

/// Element-wise comparison with an absolute tolerance; NaN never passes.
#[track_caller]
fn assert_values(got: &Tensor, shape: &[usize], want: &[f32], tol: f32) {
    assert_eq!(got.shape, shape, "shape");
    assert_eq!(got.data.len(), want.len(), "element count");
    for (i, (&a, &b)) in got.data.iter().zip(want).enumerate() {
        let ok = (a - b).abs() <= tol; // false for NaN
        assert!(
            ok,
            "element {i}: got {a}, want {b} (tol {tol}); all: {:?}",
            got.data
        );
    }
}

/// Exact integer comparison (for i32/i8/i4 results).
#[track_caller]
fn assert_ints(got: &Tensor, shape: &[usize], want: &[i32]) {
    assert!(got.dtype.is_int(), "expected an integer tensor, got {got}");
    assert_eq!(got.shape, shape, "shape");
    for &v in &got.data {
        assert!(v.fract() == 0.0, "non-integer value {v} in {:?}", got.data);
    }
    assert_eq!(got.to_i32(), want);
}

/// Relative error against a reference; NaN or a shape mismatch gives infinity and fails.
#[track_caller]
fn assert_close(got: &Tensor, reference: &Tensor, tol: f64) {
    let err = got.relative_error(reference);
    assert!(
        err <= tol,
        "relative error {err} > {tol} (got {got}, reference {reference})"
    );
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

const LN3: f32 = 1.098_612_3; // ln 3
const TOL: f32 = 1e-5;

fn scheme(bits: u8, group_size: usize, symmetric: bool, clip: f32) -> QuantScheme {
    QuantScheme {
        bits,
        group_size,
        symmetric,
        clip,
    }
}

/// `Quantize` of `x` (node `{name}`) and the `Dequantize` of all its results to `to` (node
/// `d{name}`): the quantize results and the dequantized value.
fn quantize_round_trip(
    g: &mut Graph,
    name: &str,
    x: ValueId,
    scheme: QuantScheme,
    to: DType,
) -> (Vec<ValueId>, ValueId) {
    let q = g.add(name, Op::Quantize { scheme }, &[x]).unwrap();
    let dq = g
        .add1(&format!("d{name}"), Op::Dequantize { scheme, to }, &q)
        .unwrap();
    (q, dq)
}

// ---------------------------------------------------------------------------------------------
// Coverage
// ---------------------------------------------------------------------------------------------

/// Every op test of this file. `every_op_is_exercised` runs them all on one thread and checks
/// that they executed every op in `Op::NAMES`.
const OP_TESTS: &[(&str, fn())] = &[
    (
        "constant_broadcasts_as_a_scalar",
        constant_broadcasts_as_a_scalar,
    ),
    ("add_and_mul_broadcast", add_and_mul_broadcast),
    ("embedding_looks_up_rows", embedding_looks_up_rows),
    ("rms_norm_by_hand", rms_norm_by_hand),
    ("linear_by_hand", linear_by_hand),
    (
        "results_are_rounded_to_the_node_dtype",
        results_are_rounded_to_the_node_dtype,
    ),
    ("matmul_by_hand", matmul_by_hand),
    (
        "matmul_equals_linear_with_transposed_weight",
        matmul_equals_linear_with_transposed_weight,
    ),
    ("rope_by_hand", rope_by_hand),
    ("rope_preserves_norms", rope_preserves_norms),
    ("attention_by_hand", attention_by_hand),
    (
        "attention_matches_naive_formula",
        attention_matches_naive_formula,
    ),
    ("attention_decode_by_hand", attention_decode_by_hand),
    (
        "attention_decode_matches_prefix_attention",
        attention_decode_matches_prefix_attention,
    ),
    (
        "quest_attention_decode_with_every_page_is_dense",
        quest_attention_decode_with_every_page_is_dense,
    ),
    (
        "quest_attention_decode_is_select_then_sparse_decode",
        quest_attention_decode_is_select_then_sparse_decode,
    ),
    (
        "kv_append_writes_rows_at_start",
        kv_append_writes_rows_at_start,
    ),
    ("silu_and_sigmoid_by_hand", silu_and_sigmoid_by_hand),
    ("softmax_by_hand", softmax_by_hand),
    (
        "softmax_rows_are_distributions",
        softmax_rows_are_distributions,
    ),
    ("top_k_by_hand", top_k_by_hand),
    (
        "top_k_agrees_with_a_full_sort",
        top_k_agrees_with_a_full_sort,
    ),
    ("moe_router_by_hand", moe_router_by_hand),
    ("moe_dispatch_by_hand", moe_dispatch_by_hand),
    (
        "moe_expert_ffn_and_combine_by_hand",
        moe_expert_ffn_and_combine_by_hand,
    ),
    (
        "moe_expert_ffn_rounds_products_to_the_dtype",
        moe_expert_ffn_rounds_products_to_the_dtype,
    ),
    ("moe_combine_by_hand", moe_combine_by_hand),
    (
        "moe_with_one_expert_equals_dense_swiglu",
        moe_with_one_expert_equals_dense_swiglu,
    ),
    ("moe_matches_per_token_loop", moe_matches_per_token_loop),
    ("reshape_keeps_data", reshape_keeps_data),
    ("transpose_by_hand", transpose_by_hand),
    ("slice_by_hand", slice_by_hand),
    ("concat_by_hand", concat_by_hand),
    ("cast_rounds_and_saturates", cast_rounds_and_saturates),
    ("quantize_symmetric_by_hand", quantize_symmetric_by_hand),
    ("quantize_asymmetric_by_hand", quantize_asymmetric_by_hand),
    (
        "quantize_round_trip_error_is_bounded",
        quantize_round_trip_error_is_bounded,
    ),
    ("fused_map_by_hand", fused_map_by_hand),
    (
        "fused_map_matches_the_unfused_chain",
        fused_map_matches_the_unfused_chain,
    ),
    ("swiglu_linear_by_hand", swiglu_linear_by_hand),
    (
        "swiglu_linear_matches_gate_and_up",
        swiglu_linear_matches_gate_and_up,
    ),
    ("linear_add_by_hand", linear_add_by_hand),
    ("add_rms_norm_by_hand", add_rms_norm_by_hand),
    (
        "quantized_linear_matches_dequantize_then_linear",
        quantized_linear_matches_dequantize_then_linear,
    ),
    (
        "moe_router_linear_matches_linear_then_router",
        moe_router_linear_matches_linear_then_router,
    ),
    ("causal_mask_by_hand", causal_mask_by_hand),
];

#[test]
fn every_op_is_exercised() {
    EXERCISED.with(|set| set.borrow_mut().clear());
    for (_, test) in OP_TESTS {
        test();
    }
    let exercised = EXERCISED.with(|set| set.borrow().clone());
    let all: BTreeSet<&str> = Op::NAMES.iter().copied().collect();
    let missing: Vec<_> = all.difference(&exercised).collect();
    assert!(
        missing.is_empty(),
        "ops without an interpreter test: {missing:?}"
    );
    let unknown: Vec<_> = exercised.difference(&all).collect();
    assert!(
        unknown.is_empty(),
        "ops missing from Op::NAMES: {unknown:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------------------------

#[test]
fn constant_broadcasts_as_a_scalar() {
    let mut g = Graph::new("constant");
    let x = act(&mut g, "x", DType::F32, &[2]);
    let c = g.constant("half", 0.5, DType::F32).unwrap();
    let y = g.add1("y", Op::Add, &[x, c]).unwrap();
    let z = g.add1("z", Op::Mul, &[c, x]).unwrap();
    g.output("c", c);
    g.output("y", y);
    g.output("z", z);
    let out = run(&g, vec![("x", Tensor::f32(&[2], vec![1.0, 2.0]))]);
    assert_values(&out["c"], &[], &[0.5], 0.0);
    // [1, 2] + 0.5 = [1.5, 2.5]; 0.5 · [1, 2] = [0.5, 1]
    assert_values(&out["y"], &[2], &[1.5, 2.5], 0.0);
    assert_values(&out["z"], &[2], &[0.5, 1.0], 0.0);
}

#[test]
fn add_and_mul_broadcast() {
    let mut g = Graph::new("broadcast");
    let a = act(&mut g, "a", DType::F32, &[2, 3]);
    let b = act(&mut g, "b", DType::F32, &[3]);
    let c = act(&mut g, "c", DType::F32, &[2, 1]);
    let ab = g.add1("a+b", Op::Add, &[a, b]).unwrap();
    let ac = g.add1("a*c", Op::Mul, &[a, c]).unwrap();
    let cb = g.add1("c+b", Op::Add, &[c, b]).unwrap();
    let bc = g.add1("b*c", Op::Mul, &[b, c]).unwrap();
    g.output("ab", ab);
    g.output("ac", ac);
    g.output("cb", cb);
    g.output("bc", bc);
    let out = run(
        &g,
        vec![
            ("a", Tensor::f32(&[2, 3], vec![1., 2., 3., 4., 5., 6.])),
            ("b", Tensor::f32(&[3], vec![10., 20., 30.])),
            ("c", Tensor::f32(&[2, 1], vec![2., 3.])),
        ],
    );
    // [[1,2,3],[4,5,6]] + [10,20,30] = [[11,22,33],[14,25,36]]
    assert_values(&out["ab"], &[2, 3], &[11., 22., 33., 14., 25., 36.], 0.0);
    // [[1,2,3],[4,5,6]] · [[2],[3]] = [[2,4,6],[12,15,18]]
    assert_values(&out["ac"], &[2, 3], &[2., 4., 6., 12., 15., 18.], 0.0);
    // [[2],[3]] + [10,20,30] = [[12,22,32],[13,23,33]]
    assert_values(&out["cb"], &[2, 3], &[12., 22., 32., 13., 23., 33.], 0.0);
    // [10,20,30] · [[2],[3]] = [[20,40,60],[30,60,90]]
    assert_values(&out["bc"], &[2, 3], &[20., 40., 60., 30., 60., 90.], 0.0);
}

#[test]
fn silu_and_sigmoid_by_hand() {
    let mut g = Graph::new("act");
    let x = act(&mut g, "x", DType::F32, &[5]);
    let s = g.add1("sigmoid", Op::Sigmoid, &[x]).unwrap();
    let y = g.add1("silu", Op::Silu, &[x]).unwrap();
    g.output("s", s);
    g.output("y", y);
    let out = run(
        &g,
        vec![("x", Tensor::f32(&[5], vec![0.0, LN3, -LN3, -100.0, 100.0]))],
    );
    // sigmoid(0) = 1/2; sigmoid(ln 3) = 1/(1 + 1/3) = 3/4; sigmoid(−ln 3) = 1/(1 + 3) = 1/4;
    // sigmoid(−100) = e^−100/(1 + e^−100) ≈ 3.7e−44 ≈ 0; sigmoid(100) ≈ 1.
    assert_values(&out["s"], &[5], &[0.5, 0.75, 0.25, 0.0, 1.0], 1e-6);
    // silu(x) = x · sigmoid(x): 0; (3/4)·ln 3 = 0.8239592; −(1/4)·ln 3 = −0.2746531;
    // −100 · 3.7e−44 ≈ −0 (must not be NaN); 100.
    assert_values(
        &out["y"],
        &[5],
        &[0.0, 0.823_959_2, -0.274_653_1, 0.0, 100.0],
        1e-5,
    );
}

// ---------------------------------------------------------------------------------------------
// Embedding, norms, products
// ---------------------------------------------------------------------------------------------

#[test]
fn embedding_looks_up_rows() {
    let mut g = Graph::new("embed");
    let table = weight(&mut g, "table", DType::F32, &[4, 2]);
    let ids = act(&mut g, "ids", DType::I32, &[2, 2]);
    let y = g.add1("tok_embed", Op::Embedding, &[table, ids]).unwrap();
    g.output("y", y);
    let out = run(
        &g,
        vec![
            (
                "table",
                Tensor::f32(&[4, 2], vec![0., 1., 10., 11., 20., 21., 30., 31.]),
            ),
            ("ids", Tensor::i32(&[2, 2], &[3, 0, 1, 3])),
        ],
    );
    // ids [[3, 0], [1, 3]] → rows 3, 0, 1, 3 of the table.
    assert_values(
        &out["y"],
        &[2, 2, 2],
        &[30., 31., 0., 1., 10., 11., 30., 31.],
        0.0,
    );
}

#[test]
fn rms_norm_by_hand() {
    let mut g = Graph::new("rms");
    let x = act(&mut g, "x", DType::F32, &[2, 2]);
    let w = weight(&mut g, "w", DType::F32, &[2]);
    let small = g.add1("norm", Op::RmsNorm { eps: 1e-6 }, &[x, w]).unwrap();
    let big = g
        .add1("norm_eps5", Op::RmsNorm { eps: 5.0 }, &[x, w])
        .unwrap();
    g.output("small", small);
    g.output("big", big);
    let out = run(
        &g,
        vec![
            ("x", Tensor::f32(&[2, 2], vec![3., 4., 2., 2.])),
            ("w", Tensor::f32(&[2], vec![1., 2.])),
        ],
    );
    // Row [3, 4]: mean(x²) = (9 + 16)/2 = 12.5, rms = √12.5 = 5/√2; x/rms = [3√2/5, 4√2/5]
    // = [0.8485281, 1.1313708]; · [1, 2] = [0.8485281, 2.2627417].
    // Row [2, 2]: mean(x²) = 4, rms = 2; x/rms = [1, 1]; · w = [1, 2].
    assert_values(
        &out["small"],
        &[2, 2],
        &[0.848_528_1, 2.262_741_7, 1.0, 2.0],
        TOL,
    );
    // eps = 5: row 1: √(12.5 + 5) = √17.5 = 4.1833001; [3, 8]/4.1833 = [0.7171372, 1.9123657].
    // Row 2: √(4 + 5) = 3; [2, 4]/3 = [0.6666667, 1.3333333].
    assert_values(
        &out["big"],
        &[2, 2],
        &[0.717_137_2, 1.912_365_7, 0.666_666_7, 1.333_333_3],
        TOL,
    );
}

#[test]
fn linear_by_hand() {
    let mut g = Graph::new("linear");
    let x = act(&mut g, "x", DType::F32, &[2, 3]);
    let w = weight(&mut g, "w", DType::F32, &[2, 3]);
    let y = g.add1("proj", Op::Linear, &[x, w]).unwrap();
    g.output("y", y);
    let out = run(
        &g,
        vec![
            ("x", Tensor::f32(&[2, 3], vec![1., 2., 3., 4., 5., 6.])),
            ("w", Tensor::f32(&[2, 3], vec![1., 0., -1., 2., 1., 0.])),
        ],
    );
    // y = x · wᵀ. Row [1,2,3]: w0 = [1,0,−1] → 1 − 3 = −2; w1 = [2,1,0] → 2 + 2 = 4.
    // Row [4,5,6]: 4 − 6 = −2; 8 + 5 = 13.
    assert_values(&out["y"], &[2, 2], &[-2., 4., -2., 13.], 0.0);
}

#[test]
fn results_are_rounded_to_the_node_dtype() {
    let mut g = Graph::new("bf16");
    let x = act(&mut g, "x", DType::BF16, &[1, 2]);
    let w = weight(&mut g, "w", DType::BF16, &[1, 2]);
    let y = g.add1("proj", Op::Linear, &[x, w]).unwrap();
    let tiny = g.constant("tiny", 2f32.powi(-9), DType::BF16).unwrap();
    let one = g.constant("one", 1.0, DType::BF16).unwrap();
    let sum = g.add1("sum", Op::Add, &[one, tiny]).unwrap();
    let gain = weight(&mut g, "gain", DType::BF16, &[2]);
    let rms = g
        .add1("norm", Op::RmsNorm { eps: 1e-6 }, &[x, gain])
        .unwrap();
    g.output("y", y);
    g.output("sum", sum);
    g.output("rms", rms);
    let out = run(
        &g,
        vec![
            (
                "x",
                Tensor::new(DType::BF16, &[1, 2], vec![1.0, 2f32.powi(-9)]).unwrap(),
            ),
            (
                "w",
                Tensor::new(DType::BF16, &[1, 2], vec![1.0, 1.0]).unwrap(),
            ),
            ("gain", Tensor::full(DType::BF16, &[2], 1.0)),
        ],
    );
    // 1·1 + 2⁻⁹·1 = 1 + 2⁻⁹ is a quarter of a bf16 ulp at 1 (ulp 2⁻⁷): rounds to 1 in bf16.
    assert_eq!(out["y"].dtype, DType::BF16);
    assert_values(&out["y"], &[1, 1], &[1.0], 0.0);
    assert_values(&out["sum"], &[], &[1.0], 0.0);
    // rms_norm of [1, 2⁻⁹]: mean(x²) ≈ 1/2, so x/rms ≈ [√2, 2⁻⁹·√2] = [1.4142136, 0.0027621];
    // in bf16 (8 significant bits) √2 is 1.4140625 and 2⁻⁹·√2 is 0.0027618408.
    assert_values(&out["rms"], &[1, 2], &[1.414_062_5, 0.002_761_840_8], 0.0);
}

#[test]
fn matmul_by_hand() {
    let mut g = Graph::new("matmul");
    let a = act(&mut g, "a", DType::F32, &[2, 2, 3]);
    let b = act(&mut g, "b", DType::F32, &[2, 3, 2]);
    let y = g.add1("mm", Op::MatMul, &[a, b]).unwrap();
    g.output("y", y);
    let out = run(
        &g,
        vec![
            (
                "a",
                Tensor::f32(
                    &[2, 2, 3],
                    vec![1., 2., 3., 4., 5., 6., 1., 0., 0., 0., 0., 1.],
                ),
            ),
            (
                "b",
                Tensor::f32(
                    &[2, 3, 2],
                    vec![1., 0., 0., 1., 1., 1., 1., 2., 3., 4., 5., 6.],
                ),
            ),
        ],
    );
    // Batch 0: [[1,2,3],[4,5,6]] · [[1,0],[0,1],[1,1]] = [[1+3, 2+3], [4+6, 5+6]]
    //        = [[4, 5], [10, 11]].
    // Batch 1: [[1,0,0],[0,0,1]] · [[1,2],[3,4],[5,6]] = [[1, 2], [5, 6]] (rows 0 and 2).
    assert_values(
        &out["y"],
        &[2, 2, 2],
        &[4., 5., 10., 11., 1., 2., 5., 6.],
        0.0,
    );
}

#[test]
fn matmul_equals_linear_with_transposed_weight() {
    for seed in [1, 2, 3] {
        let mut r = rng(seed);
        let (m, k, n) = (5, 7, 4);
        let mut g = Graph::new("mm_vs_linear");
        let a = act(&mut g, "a", DType::F32, &[m, k]);
        let b = act(&mut g, "b", DType::F32, &[k, n]);
        let mm = g.add1("mm", Op::MatMul, &[a, b]).unwrap();
        let bt = g
            .add1("bt", Op::Transpose { perm: vec![1, 0] }, &[b])
            .unwrap();
        let lin = g.add1("lin", Op::Linear, &[a, bt]).unwrap();
        g.output("mm", mm);
        g.output("lin", lin);
        let at = Tensor::normal(DType::F32, &[m, k], 1.0, &mut r);
        let bt_ = Tensor::normal(DType::F32, &[k, n], 1.0, &mut r);
        // Naive reference in f64.
        let mut reference = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                reference[i * n + j] = (0..k)
                    .map(|l| at.data[i * k + l] as f64 * bt_.data[l * n + j] as f64)
                    .sum::<f64>() as f32;
            }
        }
        let out = run(&g, vec![("a", at), ("b", bt_)]);
        let reference = Tensor::f32(&[m, n], reference);
        assert_close(&out["mm"], &reference, 1e-6);
        assert_close(&out["lin"], &out["mm"], 1e-6);
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------------

#[test]
fn rope_by_hand() {
    // D = 4, so pair i ∈ {0, 1} rotates elements (i, i + 2) by position · θ^(−2i/4).
    // Pair 0: angle = position. Pair 1: angle = position/√θ; with θ = 16/π² and position 2,
    // that is 2 · π/4 = π/2.
    let theta = 16.0 / (std::f32::consts::PI * std::f32::consts::PI);
    let mut g = Graph::new("rope");
    let x = act(&mut g, "x", DType::F32, &[1, 2, 2, 4]);
    let pos = act(&mut g, "pos", DType::I32, &[1, 2]);
    let y = g.add1("rope", Op::Rope { theta }, &[x, pos]).unwrap();
    g.output("y", y);
    let x_data = vec![
        1., 2., 3., 4., // token 0 head 0
        5., 6., 7., 8., // token 0 head 1
        1., 2., 3., 4., // token 1 head 0
        0., 1., 0., 0., // token 1 head 1
    ];
    let out = run(
        &g,
        vec![
            ("x", Tensor::f32(&[1, 2, 2, 4], x_data)),
            ("pos", Tensor::i32(&[1, 2], &[0, 2])),
        ],
    );
    // Token 0 is at position 0: identity.
    // Token 1, head 0, x = [1, 2, 3, 4]:
    //   pair 0 (x0 = 1, x2 = 3), angle 2: cos 2 = −0.4161468, sin 2 = 0.9092974;
    //     x0' = 1·cos 2 − 3·sin 2 = −0.4161468 − 2.7278923 = −3.1440391
    //     x2' = 3·cos 2 + 1·sin 2 = −1.2484405 + 0.9092974 = −0.3391431
    //   pair 1 (x1 = 2, x3 = 4), angle π/2: x1' = −x3 = −4, x3' = x1 = 2.
    // Token 1, head 1, x = [0, 1, 0, 0]: pair 0 is zero; pair 1 (1, 0) → (0, 1).
    assert_values(
        &out["y"],
        &[1, 2, 2, 4],
        &[
            1.,
            2.,
            3.,
            4.,
            5.,
            6.,
            7.,
            8., //
            -3.144_039_1,
            -4.0,
            -0.339_143_1,
            2.0, //
            0.,
            0.,
            0.,
            1.,
        ],
        1e-5,
    );
}

#[test]
fn rope_preserves_norms() {
    for seed in [11, 12, 13] {
        let mut r = rng(seed);
        let (b, s, h, d) = (2, 5, 3, 16);
        let mut g = Graph::new("rope_norm");
        let x = act(&mut g, "x", DType::F32, &[b, s, h, d]);
        let pos = act(&mut g, "pos", DType::I32, &[b, s]);
        let y = g
            .add1("rope", Op::Rope { theta: 10000.0 }, &[x, pos])
            .unwrap();
        g.output("y", y);
        let xt = Tensor::normal(DType::F32, &[b, s, h, d], 1.0, &mut r);
        let positions: Vec<i32> = Tensor::uniform(DType::F32, &[b * s], 5000.0, &mut r)
            .data
            .iter()
            .map(|v| v.abs() as i32)
            .collect();
        let out = run(
            &g,
            vec![("x", xt.clone()), ("pos", Tensor::i32(&[b, s], &positions))],
        );
        let y = &out["y"];
        let mut changed = false;
        for (vin, vout) in xt.data.chunks(d).zip(y.data.chunks(d)) {
            let norm = |v: &[f32]| v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            let (a, b) = (norm(vin), norm(vout));
            assert!((a - b).abs() <= 1e-5 * a, "norm {a} became {b}");
            changed |= vin != vout;
        }
        assert!(changed, "rope at nonzero positions changed nothing");
    }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// Naive attention in f64: explicit score matrix per (batch, head), masked entries set to −∞
/// (the masked keys are never read), softmax, weighted sum of values.
fn naive_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    visible: impl Fn(usize, usize, usize) -> bool,
) -> Tensor {
    let [bs, s, hq, d] = [q.shape[0], q.shape[1], q.shape[2], q.shape[3]];
    let [t, hkv] = [k.shape[1], k.shape[2]];
    let q_at = |b: usize, i: usize, h: usize, e: usize| q.data[((b * s + i) * hq + h) * d + e];
    let kv_at = |x: &Tensor, b: usize, j: usize, h: usize, e: usize| {
        x.data[((b * t + j) * hkv + h) * d + e]
    };
    let mut out = vec![0f32; q.len()];
    for b in 0..bs {
        for h in 0..hq {
            let kvh = h * hkv / hq; // = h / (hq / hkv)
            for i in 0..s {
                let mut scores = vec![f64::NEG_INFINITY; t];
                for (j, score) in scores.iter_mut().enumerate() {
                    if visible(b, i, j) {
                        *score = scale
                            * (0..d)
                                .map(|e| q_at(b, i, h, e) as f64 * kv_at(k, b, j, kvh, e) as f64)
                                .sum::<f64>();
                    }
                }
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = scores.iter().map(|&x| (x - max).exp()).collect();
                let total: f64 = p.iter().sum();
                for e in 0..d {
                    let mut acc = 0.0;
                    for (j, &pj) in p.iter().enumerate() {
                        if pj > 0.0 {
                            acc += pj / total * kv_at(v, b, j, kvh, e) as f64;
                        }
                    }
                    out[((b * s + i) * hq + h) * d + e] = acc as f32;
                }
            }
        }
    }
    Tensor::f32(&q.shape, out)
}

#[test]
fn attention_by_hand() {
    // One head, D = 1, q = 1, keys [0, ln 3], values [4, 8], scale 1.
    // Scores [0, ln 3] → softmax [1/4, 3/4] → 4/4 + 3·8/4 = 1 + 6 = 7.
    let mut g = Graph::new("attn");
    let q = act(&mut g, "q", DType::F32, &[1, 2, 1, 1]);
    let k = act(&mut g, "k", DType::F32, &[1, 2, 1, 1]);
    let v = act(&mut g, "v", DType::F32, &[1, 2, 1, 1]);
    let causal = g
        .add1(
            "causal",
            Op::Attention {
                causal: true,
                scale: 1.0,
            },
            &[q, k, v],
        )
        .unwrap();
    let full = g
        .add1(
            "full",
            Op::Attention {
                causal: false,
                scale: 1.0,
            },
            &[q, k, v],
        )
        .unwrap();
    g.output("causal", causal);
    g.output("full", full);
    let out = run(
        &g,
        vec![
            ("q", Tensor::f32(&[1, 2, 1, 1], vec![1., 1.])),
            ("k", Tensor::f32(&[1, 2, 1, 1], vec![0., LN3])),
            ("v", Tensor::f32(&[1, 2, 1, 1], vec![4., 8.])),
        ],
    );
    // Causal: query 0 sees key 0 only → 4; query 1 sees both → 7.
    assert_values(&out["causal"], &[1, 2, 1, 1], &[4., 7.], 1e-5);
    assert_values(&out["full"], &[1, 2, 1, 1], &[7., 7.], 1e-5);

    // S = 1 < T = 2, causal: the query is the last of the two tokens and sees both → 7.
    let mut g = Graph::new("attn_last");
    let q = act(&mut g, "q", DType::F32, &[1, 1, 1, 1]);
    let k = act(&mut g, "k", DType::F32, &[1, 2, 1, 1]);
    let v = act(&mut g, "v", DType::F32, &[1, 2, 1, 1]);
    let y = g
        .add1(
            "causal",
            Op::Attention {
                causal: true,
                scale: 0.5,
            },
            &[q, k, v],
        )
        .unwrap();
    g.output("y", y);
    let out = run(
        &g,
        vec![
            // scale 0.5 and q = 2 give scores 0.5 · 2 · [0, ln 3] = [0, ln 3] again.
            ("q", Tensor::f32(&[1, 1, 1, 1], vec![2.])),
            ("k", Tensor::f32(&[1, 2, 1, 1], vec![0., LN3])),
            ("v", Tensor::f32(&[1, 2, 1, 1], vec![4., 8.])),
        ],
    );
    assert_values(&out["y"], &[1, 1, 1, 1], &[7.], 1e-5);
}

#[test]
fn attention_matches_naive_formula() {
    // Grouped-query (8 query heads on 2 KV heads), S < T, S = T and S = 1.
    for (seed, s, t) in [(21, 3, 7), (22, 5, 5), (23, 1, 9)] {
        for causal in [true, false] {
            let mut r = rng(seed);
            let (b, hq, hkv, d) = (2, 8, 2, 16);
            let scale = 1.0 / (d as f32).sqrt();
            let mut g = Graph::new("attn");
            let q = act(&mut g, "q", DType::F32, &[b, s, hq, d]);
            let k = act(&mut g, "k", DType::F32, &[b, t, hkv, d]);
            let v = act(&mut g, "v", DType::F32, &[b, t, hkv, d]);
            let y = g
                .add1("attn", Op::Attention { causal, scale }, &[q, k, v])
                .unwrap();
            g.output("y", y);
            let qt = Tensor::normal(DType::F32, &[b, s, hq, d], 2.0, &mut r);
            let kt = Tensor::normal(DType::F32, &[b, t, hkv, d], 2.0, &mut r);
            let vt = Tensor::normal(DType::F32, &[b, t, hkv, d], 1.0, &mut r);
            // Query i is token i + T − S of the sequence and sees keys j ≤ i + T − S.
            let reference = naive_attention(&qt, &kt, &vt, scale as f64, |_, i, j| {
                !causal || j <= i + t - s
            });
            let out = run(&g, vec![("q", qt), ("k", kt), ("v", vt)]);
            assert_close(&out["y"], &reference, 1e-5);
        }
    }
}

#[test]
fn attention_decode_by_hand() {
    // Cache capacity 3, one new token (S = 1), D = 1, scale 1, q = 1.
    // Keys [0, ln 3, 100], values [4, 8, 1000]. Length 2: the third row is stale and must be
    // ignored: softmax([0, ln 3]) = [1/4, 3/4] → 1 + 6 = 7. Length 1: only row 0 → 4.
    let mut g = Graph::new("decode");
    let q = act(&mut g, "q", DType::F32, &[2, 1, 1, 1]);
    let k = act(&mut g, "k", DType::F32, &[2, 3, 1, 1]);
    let v = act(&mut g, "v", DType::F32, &[2, 3, 1, 1]);
    let len = act(&mut g, "len", DType::I32, &[2]);
    let y = g
        .add1(
            "decode",
            Op::AttentionDecode { scale: 1.0 },
            &[q, k, v, len],
        )
        .unwrap();
    g.output("y", y);
    let out = run(
        &g,
        vec![
            ("q", Tensor::f32(&[2, 1, 1, 1], vec![1., 1.])),
            (
                "k",
                Tensor::f32(&[2, 3, 1, 1], vec![0., LN3, 100., 0., LN3, 100.]),
            ),
            (
                "v",
                Tensor::f32(&[2, 3, 1, 1], vec![4., 8., 1000., 4., 8., 1000.]),
            ),
            ("len", Tensor::i32(&[2], &[2, 1])),
        ],
    );
    assert_values(&out["y"], &[2, 1, 1, 1], &[7., 4.], 1e-5);
}

#[test]
fn attention_decode_matches_prefix_attention() {
    for (seed, s, lengths) in [(31, 2, [2, 8, 5]), (32, 1, [1, 4, 8]), (33, 3, [8, 3, 6])] {
        let mut r = rng(seed);
        let (b, c, hq, hkv, d) = (3, 8, 8, 2, 8);
        let scale = 0.3;
        let mut g = Graph::new("decode");
        let q = act(&mut g, "q", DType::F32, &[b, s, hq, d]);
        let k = act(&mut g, "k", DType::F32, &[b, c, hkv, d]);
        let v = act(&mut g, "v", DType::F32, &[b, c, hkv, d]);
        let len = act(&mut g, "len", DType::I32, &[b]);
        let y = g
            .add1("decode", Op::AttentionDecode { scale }, &[q, k, v, len])
            .unwrap();
        g.output("y", y);
        let qt = Tensor::normal(DType::F32, &[b, s, hq, d], 1.0, &mut r);
        let mut kt = Tensor::normal(DType::F32, &[b, c, hkv, d], 1.0, &mut r);
        let mut vt = Tensor::normal(DType::F32, &[b, c, hkv, d], 1.0, &mut r);
        // Poison every row at or beyond the sequence length: huge keys, NaN values.
        let row = hkv * d;
        for (batch, &length) in lengths.iter().enumerate() {
            for j in length..c {
                let base = (batch * c + j) * row;
                kt.data[base..base + row].fill(1e30);
                vt.data[base..base + row].fill(f32::NAN);
            }
        }
        let out = run(
            &g,
            vec![
                ("q", qt.clone()),
                ("k", kt.clone()),
                ("v", vt.clone()),
                ("len", Tensor::i32(&[b], &lengths.map(|l| l as i32))),
            ],
        );
        let y = &out["y"];
        // Sequence b against causal attention over its first lengths[b] rows (its queries are
        // the last S of them).
        let per_query = s * hq * d;
        for (batch, &length) in lengths.iter().enumerate() {
            let mut g = Graph::new("prefix");
            let q = act(&mut g, "q", DType::F32, &[1, s, hq, d]);
            let k = act(&mut g, "k", DType::F32, &[1, length, hkv, d]);
            let v = act(&mut g, "v", DType::F32, &[1, length, hkv, d]);
            let p = g
                .add1(
                    "attn",
                    Op::Attention {
                        causal: true,
                        scale,
                    },
                    &[q, k, v],
                )
                .unwrap();
            g.output("y", p);
            let take = |x: &Tensor| {
                let base = batch * c * row;
                Tensor::f32(
                    &[1, length, hkv, d],
                    x.data[base..base + length * row].to_vec(),
                )
            };
            let q_b = Tensor::f32(
                &[1, s, hq, d],
                qt.data[batch * per_query..(batch + 1) * per_query].to_vec(),
            );
            let reference =
                naive_attention(&q_b, &take(&kt), &take(&vt), scale as f64, |_, i, j| {
                    j <= i + length - s
                });
            let prefix = run(&g, vec![("q", q_b), ("k", take(&kt)), ("v", take(&vt))]);
            let got = Tensor::f32(
                &[1, s, hq, d],
                y.data[batch * per_query..(batch + 1) * per_query].to_vec(),
            );
            assert_close(&got, &prefix["y"], 1e-6);
            assert_close(&got, &reference, 1e-5);
        }
    }
}

/// One decode attention node `op` over `q [B, 1, Hq, D]`, `k, v [B, C, Hkv, D]`, `len [B]`.
fn decode_graph(op: Op, [b, c, hq, hkv, d]: [usize; 5]) -> Graph {
    let mut g = Graph::new("decode");
    let q = act(&mut g, "q", DType::F32, &[b, 1, hq, d]);
    let k = act(&mut g, "k", DType::F32, &[b, c, hkv, d]);
    let v = act(&mut g, "v", DType::F32, &[b, c, hkv, d]);
    let len = act(&mut g, "len", DType::I32, &[b]);
    let y = g.add1("decode", op, &[q, k, v, len]).unwrap();
    g.output("y", y);
    g
}

/// Random decode operands; cache rows at or beyond each length poisoned (huge keys, NaN
/// values), so reading one shows.
fn decode_operands(
    [b, c, hq, hkv, d]: [usize; 5],
    lengths: &[usize],
    seed: u64,
) -> (Tensor, Tensor, Tensor) {
    let mut r = rng(seed);
    let q = Tensor::normal(DType::F32, &[b, 1, hq, d], 1.0, &mut r);
    let mut k = Tensor::normal(DType::F32, &[b, c, hkv, d], 1.0, &mut r);
    let mut v = Tensor::normal(DType::F32, &[b, c, hkv, d], 1.0, &mut r);
    let row = hkv * d;
    for (batch, &length) in lengths.iter().enumerate() {
        for j in length..c {
            let base = (batch * c + j) * row;
            k.data[base..base + row].fill(1e30);
            v.data[base..base + row].fill(f32::NAN);
        }
    }
    (q, k, v)
}

#[test]
fn quest_attention_decode_with_every_page_is_dense() {
    // Budgets of at least every page of the longest sequence (24 tokens = 6 pages of 4):
    // the dense fallback, bit for bit AttentionDecode. Lengths not a multiple of the page.
    let dims = [2, 24, 4, 2, 8];
    let lengths = [24, 13];
    let (q, k, v) = decode_operands(dims, &lengths, 41);
    let feed = || {
        vec![
            ("q", q.clone()),
            ("k", k.clone()),
            ("v", v.clone()),
            ("len", Tensor::i32(&[2], &lengths.map(|l| l as i32))),
        ]
    };
    let dense = run(
        &decode_graph(Op::AttentionDecode { scale: 0.35 }, dims),
        feed(),
    );
    for (budget_tokens, page_size) in [(24, 4), (64, 4), (32, 16), (32, 8)] {
        let op = Op::QuestAttentionDecode {
            scale: 0.35,
            budget_tokens,
            page_size,
        };
        let quest = run(&decode_graph(op, dims), feed());
        assert!(quest["y"].data.iter().all(|x| x.is_finite()));
        assert_eq!(
            quest["y"], dense["y"],
            "budget {budget_tokens}, page {page_size}"
        );
    }
}

#[test]
fn quest_attention_decode_is_select_then_sparse_decode() {
    // 16 and 10 pages of 4 tokens, a budget of 2 pages (the best earlier page + the current
    // one), GQA groups of 2. A needle key k = 4·q (of the group's first query head) is
    // planted in page 5 of sequence 0 and page 2 of sequence 1: Quest must pick it.
    use kiln_ir::quest::{self, QuestOptions};
    let dims @ [b, c, hq, hkv, d] = [2, 64, 4, 2, 8];
    let lengths = [64usize, 37];
    let (q, mut k, v) = decode_operands(dims, &lengths, 42);
    let needles = [21usize, 9];
    let group = hq / hkv;
    for (batch, &length) in lengths.iter().enumerate() {
        for j in 0..length {
            for kv in 0..hkv {
                let base = ((batch * c + j) * hkv + kv) * d;
                for e in 0..d {
                    k.data[base + e] *= 0.3;
                    if j == needles[batch] {
                        k.data[base + e] = 4.0 * q.data[(batch * hq + kv * group) * d + e];
                    }
                }
            }
        }
    }
    let options = QuestOptions {
        budget_tokens: 8,
        page_size: 4,
        skip_layers: 0,
    };
    let op = Op::QuestAttentionDecode {
        scale: 0.35,
        budget_tokens: 8,
        page_size: 4,
    };
    let feed = vec![
        ("q", q.clone()),
        ("k", k.clone()),
        ("v", v.clone()),
        ("len", Tensor::i32(&[b], &lengths.map(|l| l as i32))),
    ];
    let got = run(&decode_graph(op, dims), feed.clone());
    let selection = quest::select(&q, &k, &lengths, &options).unwrap();
    for (batch, per_kv) in selection.pages.iter().enumerate() {
        let last = lengths[batch].div_ceil(4) - 1;
        for pages in per_kv {
            assert_eq!(pages, &vec![needles[batch] / 4, last], "sequence {batch}");
        }
    }
    let want = quest::sparse_decode(&q, &k, &v, &lengths, 0.35, &selection).unwrap();
    assert_eq!(got["y"].data, want.data);
    assert!(got["y"].data.iter().all(|x| x.is_finite()));
    // Sparse: not the dense result.
    let dense = run(
        &decode_graph(Op::AttentionDecode { scale: 0.35 }, dims),
        feed,
    );
    assert_ne!(got["y"].data, dense["y"].data);
}

#[test]
fn quest_attention_decode_rejects_bad_lengths() {
    let dims = [1, 8, 2, 1, 4];
    let (q, k, v) = decode_operands(dims, &[8], 43);
    let op = Op::QuestAttentionDecode {
        scale: 1.0,
        budget_tokens: 4,
        page_size: 2,
    };
    for length in [0, 9] {
        let e = run_err(
            &decode_graph(op.clone(), dims),
            vec![
                ("q", q.clone()),
                ("k", k.clone()),
                ("v", v.clone()),
                ("len", Tensor::i32(&[1], &[length])),
            ],
        );
        assert!(e.to_string().contains("length"), "{e}");
    }
}

#[test]
fn kv_append_writes_rows_at_start() {
    let mut g = Graph::new("append");
    let cache = act(&mut g, "cache", DType::F32, &[2, 4, 1, 2]);
    let new = act(&mut g, "new", DType::F32, &[2, 2, 1, 2]);
    let start = act(&mut g, "start", DType::I32, &[2]);
    let y = g
        .add1("append", Op::KvAppend, &[cache, new, start])
        .unwrap();
    g.output("y", y);
    // Cache row j of sequence b holds [10b + j, −(10b + j)].
    let cache_data: Vec<f32> = (0..2)
        .flat_map(|b| (0..4).flat_map(move |j| [(10 * b + j) as f32, -((10 * b + j) as f32)]))
        .collect();
    let out = run(
        &g,
        vec![
            ("cache", Tensor::f32(&[2, 4, 1, 2], cache_data)),
            (
                "new",
                Tensor::f32(
                    &[2, 2, 1, 2],
                    vec![100., 101., 102., 103., 200., 201., 202., 203.],
                ),
            ),
            ("start", Tensor::i32(&[2], &[1, 2])),
        ],
    );
    // Sequence 0, start 1: rows 1, 2 replaced; rows 0 and 3 kept.
    // Sequence 1, start 2: rows 2, 3 (the last two) replaced; rows 0, 1 kept.
    assert_values(
        &out["y"],
        &[2, 4, 1, 2],
        &[
            0., -0., 100., 101., 102., 103., 3., -3., //
            10., -10., 11., -11., 200., 201., 202., 203.,
        ],
        0.0,
    );
}

// ---------------------------------------------------------------------------------------------
// Softmax and top-k
// ---------------------------------------------------------------------------------------------

#[test]
fn softmax_by_hand() {
    let mut g = Graph::new("softmax");
    let x = act(&mut g, "x", DType::F32, &[3, 2]);
    let y = g.add1("softmax", Op::Softmax, &[x]).unwrap();
    g.output("y", y);
    let out = run(
        &g,
        vec![(
            "x",
            Tensor::f32(&[3, 2], vec![0., LN3, 1000., 1000., -1000., 0.]),
        )],
    );
    // [0, ln 3] → [1, 3]/4 = [1/4, 3/4]. [1000, 1000] → [1/2, 1/2] (e^1000 overflows unless
    // the maximum is subtracted). [−1000, 0] → [e^−1000/(1 + e^−1000), 1/(1 + e^−1000)] = [0, 1].
    assert_values(&out["y"], &[3, 2], &[0.25, 0.75, 0.5, 0.5, 0.0, 1.0], 1e-6);
}

#[test]
fn softmax_rows_are_distributions() {
    for seed in [41, 42, 43] {
        let mut r = rng(seed);
        let shape = [4, 7, 33];
        let mut g = Graph::new("softmax");
        let x = act(&mut g, "x", DType::F32, &shape);
        let y = g.add1("softmax", Op::Softmax, &[x]).unwrap();
        g.output("y", y);
        let xt = Tensor::normal(DType::F32, &shape, 5.0, &mut r);
        let out = run(&g, vec![("x", xt.clone())]);
        for (row_in, row) in xt.data.chunks(33).zip(out["y"].data.chunks(33)) {
            let sum: f64 = row.iter().map(|&p| p as f64).sum();
            assert!((sum - 1.0).abs() < 1e-5, "row sums to {sum}");
            assert!(row.iter().all(|&p| p > 0.0 && p <= 1.0), "{row:?}");
            // Monotone: a larger logit gets a larger probability, and p_i/p_j = e^(x_i − x_j).
            let (a, b) = (0, 1);
            let ratio = row[a] as f64 / row[b] as f64;
            let expected = ((row_in[a] - row_in[b]) as f64).exp();
            assert!(
                (ratio / expected - 1.0).abs() < 1e-5,
                "{ratio} vs {expected}"
            );
        }
    }
}

#[test]
fn top_k_by_hand() {
    let mut g = Graph::new("topk");
    let x = act(&mut g, "x", DType::F32, &[3, 5]);
    let vi = g.add("topk", Op::TopK { k: 3 }, &[x]).unwrap();
    g.output("values", vi[0]);
    g.output("indices", vi[1]);
    let out = run(
        &g,
        vec![(
            "x",
            Tensor::f32(
                &[3, 5],
                vec![
                    3., 1., 4., 1., 5., // distinct maximum values
                    2., 7., 7., 1., 7., // three-way tie
                    -0.0, 0.0, -1., -0.0, -2., // signed zeros are equal
                ],
            ),
        )],
    );
    // Row 0: 5 (index 4), 4 (2), 3 (0).
    // Row 1: 7 at 1, 2, 4: ties go to the lower index → 1, 2, 4.
    // Row 2: −0 = 0 = −0 at 0, 1, 3, all larger than −1 and −2 → 0, 1, 3.
    assert_values(
        &out["values"],
        &[3, 3],
        &[5., 4., 3., 7., 7., 7., 0., 0., 0.],
        0.0,
    );
    assert_ints(&out["indices"], &[3, 3], &[4, 2, 0, 1, 2, 4, 0, 1, 3]);
}

#[test]
fn top_k_agrees_with_a_full_sort() {
    for seed in [51, 52, 53] {
        let mut r = rng(seed);
        let (rows, n, k) = (16, 10, 4);
        let mut g = Graph::new("topk");
        let x = act(&mut g, "x", DType::F32, &[rows, n]);
        let vi = g.add("topk", Op::TopK { k }, &[x]).unwrap();
        g.output("values", vi[0]);
        g.output("indices", vi[1]);
        // Small integers (from rounding, so −0 appears too) make ties common.
        let mut xt = Tensor::uniform(DType::F32, &[rows, n], 3.0, &mut r);
        for v in &mut xt.data {
            *v = v.round();
        }
        let out = run(&g, vec![("x", xt.clone())]);
        for (row_index, row) in xt.data.chunks(n).enumerate() {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
            let want_idx: Vec<i32> = order[..k].iter().map(|&i| i as i32).collect();
            let got_idx = out["indices"].to_i32()[row_index * k..(row_index + 1) * k].to_vec();
            assert_eq!(got_idx, want_idx, "row {row:?}");
            for (j, &i) in order[..k].iter().enumerate() {
                assert_eq!(out["values"].data[row_index * k + j], row[i]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mixture of experts
// ---------------------------------------------------------------------------------------------

#[test]
fn moe_router_by_hand() {
    let mut g = Graph::new("router");
    let logits = act(&mut g, "logits", DType::F32, &[1, 4]);
    let norm = g
        .add(
            "router",
            Op::MoeRouter {
                top_k: 2,
                normalize: true,
            },
            &[logits],
        )
        .unwrap();
    let raw = g
        .add(
            "router_raw",
            Op::MoeRouter {
                top_k: 2,
                normalize: false,
            },
            &[logits],
        )
        .unwrap();
    g.output("w", norm[0]);
    g.output("e", norm[1]);
    g.output("w_raw", raw[0]);
    g.output("e_raw", raw[1]);
    let ln2 = std::f32::consts::LN_2;
    let out = run(
        &g,
        vec![("logits", Tensor::f32(&[1, 4], vec![0., LN3, ln2, ln2]))],
    );
    // e^logits = [1, 3, 2, 2], total 8 → p = [1/8, 3/8, 2/8, 2/8]. Top 2: expert 1 (3/8),
    // then experts 2 and 3 tie at 2/8 → the lower index, 2. Renormalised: 3/5, 2/5.
    assert_ints(&out["e"], &[1, 2], &[1, 2]);
    assert_values(&out["w"], &[1, 2], &[0.6, 0.4], 1e-6);
    assert_ints(&out["e_raw"], &[1, 2], &[1, 2]);
    assert_values(&out["w_raw"], &[1, 2], &[0.375, 0.25], 1e-6);
}

#[test]
fn moe_dispatch_by_hand() {
    let mut g = Graph::new("dispatch");
    let experts = act(&mut g, "experts", DType::I32, &[3, 2]);
    let d = g
        .add("dispatch", Op::MoeDispatch { num_experts: 4 }, &[experts])
        .unwrap();
    g.output("order", d[0]);
    g.output("offsets", d[1]);
    let out = run(
        &g,
        vec![("experts", Tensor::i32(&[3, 2], &[2, 0, 1, 2, 0, 2]))],
    );
    // Slots (t·k + j) → expert: 0→2, 1→0, 2→1, 3→2, 4→0, 5→2. Stable sort by expert:
    // expert 0: slots 1, 4; expert 1: slot 2; expert 2: slots 0, 3, 5; expert 3: none.
    assert_ints(&out["order"], &[3, 2], &[1, 4, 2, 0, 3, 5]);
    assert_ints(&out["offsets"], &[5], &[0, 2, 3, 6, 6]);
}

#[test]
fn moe_expert_ffn_and_combine_by_hand() {
    // T = 2 tokens, k = 1, H = 2, I = 1, two experts.
    // Expert 0: gate [1, 0], up [0, 1], down [[1], [2]]: g = x₀, u = x₁, y = a·[1, 2].
    // Expert 1: gate [1, 0], up [1, 1], down [[1], [−1]]: g = x₀, u = x₀ + x₁, y = a·[1, −1].
    // a = silu(g)·u, and silu(ln 3) = (3/4)·ln 3 = 0.8239592.
    let mut g = Graph::new("moe");
    let x = act(&mut g, "x", DType::F32, &[2, 2]);
    let experts = act(&mut g, "experts", DType::I32, &[2, 1]);
    let weights = act(&mut g, "weights", DType::F32, &[2, 1]);
    let d = g
        .add("dispatch", Op::MoeDispatch { num_experts: 2 }, &[experts])
        .unwrap();
    let mut operands = vec![x, d[0], d[1]];
    for e in 0..2 {
        for (name, dims) in [("gate", [1, 2]), ("up", [1, 2]), ("down", [2, 1])] {
            operands.push(weight(&mut g, &format!("{name}{e}"), DType::F32, &dims));
        }
    }
    let y = g
        .add1("experts", Op::MoeExpertFfn { num_experts: 2 }, &operands)
        .unwrap();
    let out_v = g
        .add1("combine", Op::MoeCombine, &[y, d[0], weights])
        .unwrap();
    g.output("order", d[0]);
    g.output("y", y);
    g.output("out", out_v);
    let out = run(
        &g,
        vec![
            ("x", Tensor::f32(&[2, 2], vec![LN3, 2., LN3, 4.])),
            // Token 0 → expert 1, token 1 → expert 0.
            ("experts", Tensor::i32(&[2, 1], &[1, 0])),
            ("weights", Tensor::f32(&[2, 1], vec![0.25, 0.5])),
            ("gate0", Tensor::f32(&[1, 2], vec![1., 0.])),
            ("up0", Tensor::f32(&[1, 2], vec![0., 1.])),
            ("down0", Tensor::f32(&[2, 1], vec![1., 2.])),
            ("gate1", Tensor::f32(&[1, 2], vec![1., 0.])),
            ("up1", Tensor::f32(&[1, 2], vec![1., 1.])),
            ("down1", Tensor::f32(&[2, 1], vec![1., -1.])),
        ],
    );
    // Dispatch: expert 0 gets slot 1 (token 1), expert 1 gets slot 0 (token 0): order [1, 0].
    assert_ints(&out["order"], &[2, 1], &[1, 0]);
    // Row 0: expert 0 on token 1 = [ln 3, 4]: a = 0.8239592 · 4 = 3.2958369 = 3 ln 3;
    //   y = [3.2958369, 6.5916737].
    // Row 1: expert 1 on token 0 = [ln 3, 2]: a = 0.8239592 · (ln 3 + 2) = 0.8239592 · 3.0986123
    //   = 2.5531301; y = [2.5531301, −2.5531301].
    assert_values(
        &out["y"],
        &[2, 1, 2],
        &[3.295_837, 6.591_674, 2.553_130_1, -2.553_130_1],
        1e-5,
    );
    // Combine: token 0 = 0.25 · row 1 = [0.6382825, −0.6382825];
    //          token 1 = 0.5 · row 0 = [1.6479184, 3.2958369].
    assert_values(
        &out["out"],
        &[2, 2],
        &[0.638_282_5, -0.638_282_5, 1.647_918_4, 3.295_837],
        1e-5,
    );
}

#[test]
fn moe_expert_ffn_rounds_products_to_the_dtype() {
    // bf16 keeps 7 fraction bits. One token x = [1, 1], one expert with I = 1:
    //   gate = [24, 0] → g = 24 (exact);
    //   up = [1, 2⁻⁸ + 2⁻¹⁴] → u = 1 + 2⁻⁸ + 2⁻¹⁴, just above the midpoint between 1 and
    //   1 + 2⁻⁷, so in bf16 u = 1 + 2⁻⁷ = 1.0078125.
    //   silu(24) = 24/(1 + e⁻²⁴) = 24 in f32 (e⁻²⁴ ≈ 3.8e−11 is lost next to 1).
    //   a = 24 · 1.0078125 = 24.1875, halfway between the bf16 values 24.125 and 24.25 (ulp
    //   0.125) → ties to even → 24.25. (Without rounding u: 24 · 1.0039673 = 24.0952 → 24.125.)
    //   down = [[1], [0]] → y = [24.25, 0].
    let mut g = Graph::new("moe_bf16");
    let x = act(&mut g, "x", DType::BF16, &[1, 2]);
    let order = act(&mut g, "order", DType::I32, &[1, 1]);
    let offsets = act(&mut g, "offsets", DType::I32, &[2]);
    let gate = weight(&mut g, "gate", DType::BF16, &[1, 2]);
    let up = weight(&mut g, "up", DType::BF16, &[1, 2]);
    let down = weight(&mut g, "down", DType::BF16, &[2, 1]);
    let y = g
        .add1(
            "experts",
            Op::MoeExpertFfn { num_experts: 1 },
            &[x, order, offsets, gate, up, down],
        )
        .unwrap();
    g.output("y", y);
    let bf16 = |shape: &[usize], data: Vec<f32>| Tensor::new(DType::BF16, shape, data).unwrap();
    let small = 2f32.powi(-8) + 2f32.powi(-14);
    assert_eq!(
        DType::BF16.round(small),
        small,
        "test input must be exact in bf16"
    );
    let out = run(
        &g,
        vec![
            ("x", bf16(&[1, 2], vec![1.0, 1.0])),
            ("order", Tensor::i32(&[1, 1], &[0])),
            ("offsets", Tensor::i32(&[2], &[0, 1])),
            ("gate", bf16(&[1, 2], vec![24.0, 0.0])),
            ("up", bf16(&[1, 2], vec![1.0, small])),
            ("down", bf16(&[2, 1], vec![1.0, 0.0])),
        ],
    );
    assert_eq!(out["y"].dtype, DType::BF16);
    assert_values(&out["y"], &[1, 1, 2], &[24.25, 0.0], 0.0);
}

#[test]
fn moe_combine_by_hand() {
    let mut g = Graph::new("combine");
    let y = act(&mut g, "y", DType::F32, &[2, 2, 1]);
    let order = act(&mut g, "order", DType::I32, &[2, 2]);
    let w = act(&mut g, "w", DType::F32, &[2, 2]);
    let c = g.add1("combine", Op::MoeCombine, &[y, order, w]).unwrap();
    g.output("out", c);
    let out = run(
        &g,
        vec![
            ("y", Tensor::f32(&[2, 2, 1], vec![10., 20., 30., 40.])),
            ("order", Tensor::i32(&[2, 2], &[2, 0, 3, 1])),
            ("w", Tensor::f32(&[2, 2], vec![0.5, 0.25, 1., 2.])),
        ],
    );
    // Slot 0 (t0, j0) is at p = 1 → 20; slot 1 (t0, j1) at p = 3 → 40; slot 2 (t1, j0) at p = 0
    // → 10; slot 3 (t1, j1) at p = 2 → 30.
    // out[t0] = 0.5·20 + 0.25·40 = 20; out[t1] = 1·10 + 2·30 = 70.
    assert_values(&out["out"], &[2, 1], &[20., 70.], 0.0);
}

/// Adds router → dispatch → expert FFN → combine on `x` with router logits `logits`.
fn moe_block(
    g: &mut Graph,
    x: ValueId,
    logits: ValueId,
    num_experts: usize,
    top_k: usize,
    hidden: usize,
    inter: usize,
) -> (ValueId, ValueId, Vec<ValueId>) {
    let weights: Vec<[ValueId; 3]> = (0..num_experts)
        .map(|e| {
            [
                weight(g, &format!("gate{e}"), DType::F32, &[inter, hidden]),
                weight(g, &format!("up{e}"), DType::F32, &[inter, hidden]),
                weight(g, &format!("down{e}"), DType::F32, &[hidden, inter]),
            ]
        })
        .collect();
    let moe = g.add_moe("moe", x, logits, &weights, top_k, true).unwrap();
    (
        moe.out,
        moe.rows,
        vec![moe.weights, moe.experts, moe.order, moe.offsets],
    )
}

/// `down · (silu(gate · x) ⊙ (up · x))` in f64.
fn swiglu_reference(x: &[f32], gate: &Tensor, up: &Tensor, down: &Tensor) -> Vec<f64> {
    let (inter, hidden) = (gate.shape[0], gate.shape[1]);
    let dot = |w: &Tensor, row: usize, v: &[f64]| -> f64 {
        (0..v.len())
            .map(|c| w.data[row * v.len() + c] as f64 * v[c])
            .sum()
    };
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let a: Vec<f64> = (0..inter)
        .map(|i| {
            let g = dot(gate, i, &x64);
            let u = dot(up, i, &x64);
            g / (1.0 + (-g).exp()) * u
        })
        .collect();
    (0..hidden).map(|h| dot(down, h, &a)).collect()
}

#[test]
fn moe_with_one_expert_equals_dense_swiglu() {
    for seed in [61, 62, 63] {
        let mut r = rng(seed);
        let (t, h, i) = (5, 8, 12);
        let mut g = Graph::new("moe1");
        let x = act(&mut g, "x", DType::F32, &[t, h]);
        let router = weight(&mut g, "router", DType::F32, &[1, h]);
        let logits = g.add1("logits", Op::Linear, &[x, router]).unwrap();
        let (moe, _, routing) = moe_block(&mut g, x, logits, 1, 1, h, i);
        // Dense SwiGLU from linear, silu, mul, linear on the same weights.
        let gate = g
            .add1("dense_gate", Op::Linear, &[x, routing_weight(&g, "gate0")])
            .unwrap();
        let up = g
            .add1("dense_up", Op::Linear, &[x, routing_weight(&g, "up0")])
            .unwrap();
        let act_v = g.add1("dense_silu", Op::Silu, &[gate]).unwrap();
        let prod = g.add1("dense_mul", Op::Mul, &[act_v, up]).unwrap();
        let dense = g
            .add1(
                "dense_down",
                Op::Linear,
                &[prod, routing_weight(&g, "down0")],
            )
            .unwrap();
        g.output("moe", moe);
        g.output("dense", dense);
        g.output("router_weights", routing[0]);
        let out = run(
            &g,
            vec![
                ("x", Tensor::normal(DType::F32, &[t, h], 1.0, &mut r)),
                ("router", Tensor::normal(DType::F32, &[1, h], 1.0, &mut r)),
                ("gate0", Tensor::normal(DType::F32, &[i, h], 0.5, &mut r)),
                ("up0", Tensor::normal(DType::F32, &[i, h], 0.5, &mut r)),
                ("down0", Tensor::normal(DType::F32, &[h, i], 0.5, &mut r)),
            ],
        );
        // One expert: softmax of a single logit is 1, so every token has weight exactly 1.
        assert_values(&out["router_weights"], &[t, 1], &[1.0; 5], 0.0);
        assert_close(&out["moe"], &out["dense"], 1e-6);
    }
}

/// The value of the weight input named `name`.
fn routing_weight(g: &Graph, name: &str) -> ValueId {
    let (index, ..) = g.inputs().find(|(_, n, ..)| *n == name).unwrap();
    ValueId {
        node: index,
        output: 0,
    }
}

#[test]
fn moe_matches_per_token_loop() {
    for seed in [71, 72, 73] {
        let mut r = rng(seed);
        let (t, h, i, e_count, k) = (6, 8, 12, 4, 2);
        let mut g = Graph::new("moe");
        let x = act(&mut g, "x", DType::F32, &[t, h]);
        let logits = act(&mut g, "logits", DType::F32, &[t, e_count]);
        let (moe, y, routing) = moe_block(&mut g, x, logits, e_count, k, h, i);
        g.output("out", moe);
        g.output("y", y);
        g.output("weights", routing[0]);
        g.output("experts", routing[1]);
        g.output("order", routing[2]);
        g.output("offsets", routing[3]);
        let xt = Tensor::normal(DType::F32, &[t, h], 1.0, &mut r);
        let lt = Tensor::normal(DType::F32, &[t, e_count], 2.0, &mut r);
        let mut inputs = vec![("x", xt.clone()), ("logits", lt.clone())];
        let mut ffn = Vec::new();
        let names: Vec<[String; 3]> = (0..e_count)
            .map(|e| [format!("gate{e}"), format!("up{e}"), format!("down{e}")])
            .collect();
        for _ in 0..e_count {
            ffn.push([
                Tensor::normal(DType::F32, &[i, h], 0.5, &mut r),
                Tensor::normal(DType::F32, &[i, h], 0.5, &mut r),
                Tensor::normal(DType::F32, &[h, i], 0.5, &mut r),
            ]);
        }
        for (e, [gt, ut, dt]) in ffn.iter().enumerate() {
            inputs.push((names[e][0].as_str(), gt.clone()));
            inputs.push((names[e][1].as_str(), ut.clone()));
            inputs.push((names[e][2].as_str(), dt.clone()));
        }
        let out = run(&g, inputs);

        // Reference: per token, softmax over experts, the top k (ties to the lower index),
        // weights renormalised, and the weighted sum of the chosen experts' SwiGLU.
        let mut reference = vec![0f32; t * h];
        let mut chosen_all = Vec::new();
        for token in 0..t {
            let row = &lt.data[token * e_count..(token + 1) * e_count];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let exps: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            let p: Vec<f64> = exps.iter().map(|e| e / total).collect();
            let mut experts: Vec<usize> = (0..e_count).collect();
            experts.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
            let chosen = &experts[..k];
            let mass: f64 = chosen.iter().map(|&e| p[e]).sum();
            let x_t = &xt.data[token * h..(token + 1) * h];
            let mut acc = vec![0f64; h];
            for &e in chosen {
                let [gt, ut, dt] = &ffn[e];
                for (a, v) in acc.iter_mut().zip(swiglu_reference(x_t, gt, ut, dt)) {
                    *a += p[e] / mass * v;
                }
            }
            for (o, a) in reference[token * h..(token + 1) * h].iter_mut().zip(acc) {
                *o = a as f32;
            }
            chosen_all.extend(chosen.iter().map(|&e| e as i32));
        }
        assert_ints(&out["experts"], &[t, k], &chosen_all);
        let weight_sums: Vec<f32> = out["weights"]
            .data
            .chunks(k)
            .map(|w| w.iter().sum())
            .collect();
        assert_values(&Tensor::f32(&[t], weight_sums), &[t], &[1.0; 6], 1e-6);
        assert_close(&out["out"], &Tensor::f32(&[t, h], reference), 1e-5);

        // Row p of y is the SwiGLU of expert e (offsets[e] ≤ p < offsets[e + 1]) on token
        // order[p] / k, and that expert is the one the router chose for slot order[p].
        let order = out["order"].to_i32();
        let offsets = out["offsets"].to_i32();
        for (p, &slot) in order.iter().enumerate() {
            let e = (0..e_count).find(|&e| (p as i32) < offsets[e + 1]).unwrap();
            assert!(offsets[e] <= p as i32);
            assert_eq!(chosen_all[slot as usize], e as i32, "slot {slot} at p {p}");
            let token = slot as usize / k;
            let [gt, ut, dt] = &ffn[e];
            let want: Vec<f32> = swiglu_reference(&xt.data[token * h..(token + 1) * h], gt, ut, dt)
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let got = Tensor::f32(&[h], out["y"].data[p * h..(p + 1) * h].to_vec());
            assert_close(&got, &Tensor::f32(&[h], want), 1e-5);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shape ops
// ---------------------------------------------------------------------------------------------

#[test]
fn reshape_keeps_data() {
    let mut g = Graph::new("reshape");
    let x = g
        .input("x", InputKind::Activation, DType::F32, shape!["n", 3])
        .unwrap();
    let y = g
        .add1(
            "r",
            Op::Reshape {
                shape: shape![3, "n"],
            },
            &[x],
        )
        .unwrap();
    let z = g
        .add1(
            "split",
            Op::Reshape {
                shape: shape!["n", 1, 3],
            },
            &[y],
        )
        .unwrap();
    g.output("y", y);
    g.output("z", z);
    let data = vec![1., 2., 3., 4., 5., 6.];
    let out = run(&g, vec![("x", Tensor::f32(&[2, 3], data.clone()))]);
    // n = 2: [2, 3] → [3, 2] → [2, 1, 3], row-major order unchanged.
    assert_values(&out["y"], &[3, 2], &data, 0.0);
    assert_values(&out["z"], &[2, 1, 3], &data, 0.0);
}

#[test]
fn transpose_by_hand() {
    let mut g = Graph::new("transpose");
    let x = act(&mut g, "x", DType::F32, &[2, 3]);
    let y = g
        .add1("t", Op::Transpose { perm: vec![1, 0] }, &[x])
        .unwrap();
    let x3 = act(&mut g, "x3", DType::F32, &[2, 3, 4]);
    let y3 = g
        .add1(
            "t3",
            Op::Transpose {
                perm: vec![2, 0, 1],
            },
            &[x3],
        )
        .unwrap();
    g.output("y", y);
    g.output("y3", y3);
    // x3[a, b, c] = 100a + 10b + c.
    let x3_data: Vec<f32> = (0..2)
        .flat_map(|a| (0..3).flat_map(move |b| (0..4).map(move |c| (100 * a + 10 * b + c) as f32)))
        .collect();
    let out = run(
        &g,
        vec![
            ("x", Tensor::f32(&[2, 3], vec![1., 2., 3., 4., 5., 6.])),
            ("x3", Tensor::f32(&[2, 3, 4], x3_data)),
        ],
    );
    // [[1,2,3],[4,5,6]]ᵀ = [[1,4],[2,5],[3,6]].
    assert_values(&out["y"], &[3, 2], &[1., 4., 2., 5., 3., 6.], 0.0);
    // Output axis i is input axis perm[i]: y3[c, a, b] = x3[a, b, c] = 100a + 10b + c, shape
    // [4, 2, 3]. Row-major over (c, a, b): c = 0 gives 0, 10, 20, 100, 110, 120; and so on.
    let want: Vec<f32> = (0..4)
        .flat_map(|c| (0..2).flat_map(move |a| (0..3).map(move |b| (100 * a + 10 * b + c) as f32)))
        .collect();
    assert_eq!(
        &want[..6],
        &[0., 10., 20., 100., 110., 120.],
        "test's own expectation"
    );
    assert_values(&out["y3"], &[4, 2, 3], &want, 0.0);
}

#[test]
fn slice_by_hand() {
    let mut g = Graph::new("slice");
    let x = act(&mut g, "x", DType::F32, &[2, 5]);
    let tail = g
        .add1(
            "tail",
            Op::Slice {
                axis: 1,
                start: -3,
                end: None,
            },
            &[x],
        )
        .unwrap();
    let mid = g
        .add1(
            "mid",
            Op::Slice {
                axis: 1,
                start: 1,
                end: Some(-1),
            },
            &[x],
        )
        .unwrap();
    let last_row = g
        .add1(
            "last_row",
            Op::Slice {
                axis: 0,
                start: -1,
                end: None,
            },
            &[x],
        )
        .unwrap();
    g.output("tail", tail);
    g.output("mid", mid);
    g.output("last_row", last_row);
    let out = run(
        &g,
        vec![(
            "x",
            Tensor::f32(&[2, 5], vec![0., 1., 2., 3., 4., 10., 11., 12., 13., 14.]),
        )],
    );
    // Axis 1 of size 5: −3.. = 2..5; 1..−1 = 1..4. Axis 0 of size 2: −1.. = 1..2.
    assert_values(&out["tail"], &[2, 3], &[2., 3., 4., 12., 13., 14.], 0.0);
    assert_values(&out["mid"], &[2, 3], &[1., 2., 3., 11., 12., 13.], 0.0);
    assert_values(&out["last_row"], &[1, 5], &[10., 11., 12., 13., 14.], 0.0);
}

#[test]
fn concat_by_hand() {
    let mut g = Graph::new("concat");
    let a = act(&mut g, "a", DType::F32, &[2, 1]);
    let b = act(&mut g, "b", DType::F32, &[2, 2]);
    let c = act(&mut g, "c", DType::F32, &[1, 2]);
    let along1 = g.add1("cat1", Op::Concat { axis: 1 }, &[a, b, a]).unwrap();
    let along0 = g.add1("cat0", Op::Concat { axis: 0 }, &[b, c]).unwrap();
    g.output("along1", along1);
    g.output("along0", along0);
    let out = run(
        &g,
        vec![
            ("a", Tensor::f32(&[2, 1], vec![1., 2.])),
            ("b", Tensor::f32(&[2, 2], vec![3., 4., 5., 6.])),
            ("c", Tensor::f32(&[1, 2], vec![7., 8.])),
        ],
    );
    // Axis 1: [[1],[2]] ‖ [[3,4],[5,6]] ‖ [[1],[2]] = [[1,3,4,1],[2,5,6,2]].
    assert_values(
        &out["along1"],
        &[2, 4],
        &[1., 3., 4., 1., 2., 5., 6., 2.],
        0.0,
    );
    // Axis 0: [[3,4],[5,6]] then [[7,8]].
    assert_values(&out["along0"], &[3, 2], &[3., 4., 5., 6., 7., 8.], 0.0);
}

#[test]
fn cast_rounds_and_saturates() {
    let mut g = Graph::new("cast");
    let x = act(&mut g, "x", DType::F32, &[4]);
    let ints = act(&mut g, "ints", DType::F32, &[7]);
    let ids = act(&mut g, "ids", DType::I32, &[2]);
    let bf = g
        .add1("to_bf16", Op::Cast { to: DType::BF16 }, &[x])
        .unwrap();
    let f16 = g.add1("to_f16", Op::Cast { to: DType::F16 }, &[x]).unwrap();
    let i8_ = g
        .add1("to_i8", Op::Cast { to: DType::I8 }, &[ints])
        .unwrap();
    let i4 = g
        .add1("to_i4", Op::Cast { to: DType::I4 }, &[ints])
        .unwrap();
    let back = g
        .add1("to_f32", Op::Cast { to: DType::F32 }, &[ids])
        .unwrap();
    g.output("bf", bf);
    g.output("f16", f16);
    g.output("i8", i8_);
    g.output("i4", i4);
    g.output("back", back);
    let e = |p: i32| 2f32.powi(p);
    let out = run(
        &g,
        vec![
            (
                "x",
                Tensor::f32(
                    &[4],
                    vec![
                        1.0 + e(-8),
                        1.0 + 3.0 * e(-8),
                        1.0 + e(-8) + e(-12),
                        1.0 + e(-11),
                    ],
                ),
            ),
            (
                "ints",
                Tensor::f32(&[7], vec![127.5, -200.0, 2.5, -2.5, 3.5, 9.3, -8.6]),
            ),
            ("ids", Tensor::i32(&[2], &[-5, 16_000_000])),
        ],
    );
    // bf16 keeps 7 fraction bits: ulp at 1 is 2⁻⁷.
    //   1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷ → ties to even → 1.
    //   1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶ (even) → 1 + 2⁻⁶ = 1.015625.
    //   1 + 2⁻⁸ + 2⁻¹² is above halfway → 1 + 2⁻⁷ = 1.0078125.
    //   1 + 2⁻¹¹ → 1.
    assert_values(&out["bf"], &[4], &[1.0, 1.015_625, 1.007_812_5, 1.0], 0.0);
    // f16 keeps 10 fraction bits (ulp 2⁻¹⁰ at 1): the first two are exact; in the third,
    // 2⁻¹² is a quarter ulp and is dropped → 1 + 2⁻⁸; 1 + 2⁻¹¹ is halfway between 1 and
    // 1 + 2⁻¹⁰ → ties to even → 1.
    assert_values(
        &out["f16"],
        &[4],
        &[1.0 + e(-8), 1.0 + 3.0 * e(-8), 1.0 + e(-8), 1.0],
        0.0,
    );
    // i8: 127.5 → 128 (even) → saturates to 127; −200 → −128; 2.5 → 2; −2.5 → −2; 3.5 → 4;
    // 9.3 → 9; −8.6 → −9.
    assert_ints(&out["i8"], &[7], &[127, -128, 2, -2, 4, 9, -9]);
    // i4 saturates to [−8, 7]: 7, −8, 2, −2, 4, 7, −8.
    assert_ints(&out["i4"], &[7], &[7, -8, 2, -2, 4, 7, -8]);
    assert_eq!(out["back"].dtype, DType::F32);
    assert_values(&out["back"], &[2], &[-5.0, 16_000_000.0], 0.0);
}

// ---------------------------------------------------------------------------------------------
// Quantisation
// ---------------------------------------------------------------------------------------------

#[test]
fn quantize_symmetric_by_hand() {
    let mut g = Graph::new("quant");
    let x = act(&mut g, "x", DType::F32, &[1, 12]);
    let x8 = act(&mut g, "x8", DType::F32, &[1, 4]);
    let s4 = scheme(4, 4, true, 1.0);
    let s4_clip = scheme(4, 4, true, 0.5);
    let s8 = scheme(8, 4, true, 1.0);
    let (q, dq) = quantize_round_trip(&mut g, "q4", x, s4, DType::F32);
    let (qc, dqc) = quantize_round_trip(&mut g, "q4_clip", x, s4_clip, DType::F32);
    let q8 = g.add("q8", Op::Quantize { scheme: s8 }, &[x8]).unwrap();
    assert_eq!(q.len(), 2, "symmetric quantize has no zero point");
    for (name, v) in [
        ("q", q[0]),
        ("scale", q[1]),
        ("dq", dq),
        ("qc", qc[0]),
        ("scale_c", qc[1]),
        ("dqc", dqc),
        ("q8", q8[0]),
        ("scale8", q8[1]),
    ] {
        g.output(name, v);
    }
    let out = run(
        &g,
        vec![
            (
                "x",
                Tensor::f32(
                    &[1, 12],
                    vec![
                        3.5, -1.0, 0.25, 0.75, // group 0
                        -7.0, 1.0, 2.0, 3.0, // group 1
                        0.0, 0.0, 0.0, 0.0, // group 2: all zero
                    ],
                ),
            ),
            ("x8", Tensor::f32(&[1, 4], vec![127.0, -63.5, 0.5, 1.5])),
        ],
    );
    // 4-bit, qmax = 7. Group 0: absmax 3.5, scale 3.5/7 = 0.5; x/scale = [7, −2, 0.5, 1.5] →
    // round half to even → [7, −2, 0, 2]; back: [3.5, −1, 0, 1].
    // Group 1: absmax 7, scale 1; q = [−7, 1, 2, 3]; back exact.
    // Group 2: scale would be 0 → 1; q = 0; back 0.
    assert_eq!(out["q"].dtype, DType::I4);
    assert_eq!(out["scale"].dtype, DType::F16);
    assert_ints(&out["q"], &[1, 12], &[7, -2, 0, 2, -7, 1, 2, 3, 0, 0, 0, 0]);
    assert_values(&out["scale"], &[1, 3], &[0.5, 1.0, 1.0], 0.0);
    assert_values(
        &out["dq"],
        &[1, 12],
        &[3.5, -1., 0., 1., -7., 1., 2., 3., 0., 0., 0., 0.],
        0.0,
    );
    // clip 0.5: group 0 scale 0.5·3.5/7 = 0.25, x/scale = [14, −4, 1, 3] → q = [7 (clamped),
    // −4, 1, 3] → [1.75, −1, 0.25, 0.75]. Group 1 scale 0.5·7/7 = 0.5, x/scale = [−14, 2, 4, 6]
    // → q = [−8 (clamped to −qmax − 1), 2, 4, 6] → [−4, 1, 2, 3].
    assert_ints(
        &out["qc"],
        &[1, 12],
        &[7, -4, 1, 3, -8, 2, 4, 6, 0, 0, 0, 0],
    );
    assert_values(&out["scale_c"], &[1, 3], &[0.25, 0.5, 1.0], 0.0);
    assert_values(
        &out["dqc"],
        &[1, 12],
        &[1.75, -1., 0.25, 0.75, -4., 1., 2., 3., 0., 0., 0., 0.],
        0.0,
    );
    // 8-bit, qmax = 127: absmax 127 → scale 1; [127, −63.5, 0.5, 1.5] → [127, −64, 0, 2].
    assert_eq!(out["q8"].dtype, DType::I8);
    assert_ints(&out["q8"], &[1, 4], &[127, -64, 0, 2]);
    assert_values(&out["scale8"], &[1, 1], &[1.0], 0.0);
}

#[test]
fn quantize_asymmetric_by_hand() {
    let mut g = Graph::new("quant_asym");
    let x = act(&mut g, "x", DType::F32, &[1, 12]);
    let s = scheme(4, 4, false, 1.0);
    let q = g.add("q", Op::Quantize { scheme: s }, &[x]).unwrap();
    assert_eq!(q.len(), 3, "asymmetric quantize returns a zero point");
    let dq = g
        .add1(
            "dq",
            Op::Dequantize {
                scheme: s,
                to: DType::F16,
            },
            &[q[0], q[1], q[2]],
        )
        .unwrap();
    g.output("q", q[0]);
    g.output("scale", q[1]);
    g.output("zero", q[2]);
    g.output("dq", dq);
    let out = run(
        &g,
        vec![(
            "x",
            Tensor::f32(
                &[1, 12],
                vec![
                    1.0, 2.5, 4.0, 8.5, // group 0
                    -3.0, -3.0, -3.0, -3.0, // group 1: constant
                    -1.0, -0.6, 0.9, 2.75, // group 2
                ],
            ),
        )],
    );
    // 4 bits: 16 levels, stored q = level − 8.
    // Group 0: min 1, max 8.5, scale 7.5/15 = 0.5; (x − 1)/0.5 = [0, 3, 6, 15] → q = [−8, −5,
    // −2, 7]; back (q + 8)·0.5 + 1 = [1, 2.5, 4, 8.5].
    // Group 1: max − min = 0 → scale 1; zero −3; level 0 → q = −8; back −3.
    // Group 2: min −1, max 2.75, scale 3.75/15 = 0.25; (x + 1)/0.25 = [0, 1.6, 7.6, 15] →
    // levels [0, 2, 8, 15] → q = [−8, −6, 0, 7]; back [−1, −0.5, 1, 2.75].
    assert_ints(
        &out["q"],
        &[1, 12],
        &[-8, -5, -2, 7, -8, -8, -8, -8, -8, -6, 0, 7],
    );
    assert_values(&out["scale"], &[1, 3], &[0.5, 1.0, 0.25], 0.0);
    assert_values(&out["zero"], &[1, 3], &[1.0, -3.0, -1.0], 0.0);
    assert_eq!(out["dq"].dtype, DType::F16);
    assert_values(
        &out["dq"],
        &[1, 12],
        &[1., 2.5, 4., 8.5, -3., -3., -3., -3., -1., -0.5, 1., 2.75],
        0.0,
    );
}

#[test]
fn quantize_round_trip_error_is_bounded() {
    for seed in [81, 82, 83] {
        let mut r = rng(seed);
        let (rows, cols, group) = (16, 64, 32);
        let xt = Tensor::normal(DType::F32, &[rows, cols], 1.0, &mut r);
        let mut relative = BTreeMap::new();
        for (bits, symmetric) in [(4, true), (8, true), (4, false), (8, false)] {
            let s = scheme(bits, group, symmetric, 1.0);
            let mut g = Graph::new("round_trip");
            let x = act(&mut g, "x", DType::F32, &[rows, cols]);
            let (q, dq) = quantize_round_trip(&mut g, "q", x, s, DType::F32);
            g.output("dq", dq);
            g.output("scale", q[1]);
            if !symmetric {
                g.output("zero", q[2]);
            }
            let out = run(&g, vec![("x", xt.clone())]);
            let (scale, dq) = (&out["scale"], &out["dq"]);
            for (index, (&a, &b)) in xt.data.iter().zip(&dq.data).enumerate() {
                let g_index = index / group;
                let step = scale.data[g_index];
                // Symmetric: rounding to the nearest multiple of the scale, never clamped (the
                // absmax maps to ±qmax): |error| ≤ scale/2. Asymmetric: the same, plus the f16
                // rounding of the group minimum (relative 2⁻¹¹) that becomes the zero point.
                let zero_slack = if symmetric {
                    0.0
                } else {
                    out["zero"].data[g_index].abs() * 2f32.powi(-11)
                };
                let bound = step / 2.0 * (1.0 + 1e-5) + zero_slack + 1e-6;
                let ok = (a - b).abs() <= bound;
                assert!(ok, "{bits}-bit sym={symmetric}: {a} → {b}, bound {bound}");
            }
            relative.insert((bits, symmetric), dq.relative_error(&xt));
        }
        for symmetric in [true, false] {
            let (e4, e8) = (relative[&(4, symmetric)], relative[&(8, symmetric)]);
            // The step shrinks by (2⁸ − 1)/(2⁴ − 1) = 17 (about 18 symmetric).
            assert!(e4 > 0.01, "4-bit error {e4} suspiciously small");
            assert!(e8 * 8.0 < e4, "8-bit error {e8} vs 4-bit {e4}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fused forms (produced by `rewrite`)
// ---------------------------------------------------------------------------------------------

#[test]
fn fused_map_by_hand() {
    use kiln_ir::op::MapStep::*;
    let mut g = Graph::new("fused_map");
    let x = act(&mut g, "x", DType::F32, &[2, 2]);
    let y = act(&mut g, "y", DType::F32, &[2]);
    // (x · y + 1) · y, with y broadcast along rows.
    let steps = vec![
        Operand { index: 0 },
        Operand { index: 1 },
        Mul { a: 0, b: 1 },
        Constant { value: 1.0 },
        Add { a: 2, b: 3 },
        Mul { a: 4, b: 1 },
    ];
    let z = g.add1("z", Op::FusedMap { steps }, &[x, y]).unwrap();
    g.output("z", z);
    let out = run(
        &g,
        vec![
            ("x", Tensor::f32(&[2, 2], vec![1., 2., 3., 4.])),
            ("y", Tensor::f32(&[2], vec![0.5, -1.])),
        ],
    );
    // x · y = [[0.5, −2], [1.5, −4]]; + 1 = [[1.5, −1], [2.5, −3]]; · y = [[0.75, 1], [1.25, 3]].
    assert_values(&out["z"], &[2, 2], &[0.75, 1.0, 1.25, 3.0], 0.0);
}

#[test]
fn fused_map_matches_the_unfused_chain() {
    use kiln_ir::op::MapStep::*;
    let mut r = rng(91);
    let xt = Tensor::normal(DType::F32, &[3, 4], 2.0, &mut r);
    let yt = Tensor::normal(DType::F32, &[4], 2.0, &mut r);
    let zt = Tensor::normal(DType::F32, &[3, 1], 2.0, &mut r);
    let mut g = Graph::new("chain");
    let x = act(&mut g, "x", DType::F32, &[3, 4]);
    let y = act(&mut g, "y", DType::F32, &[4]);
    let z = act(&mut g, "z", DType::F32, &[3, 1]);
    // silu(x) · y + sigmoid(z), as plain ops and as one map.
    let a = g.add1("silu", Op::Silu, &[x]).unwrap();
    let b = g.add1("mul", Op::Mul, &[a, y]).unwrap();
    let c = g.add1("sigmoid", Op::Sigmoid, &[z]).unwrap();
    let plain = g.add1("add", Op::Add, &[b, c]).unwrap();
    let steps = vec![
        Operand { index: 0 },
        Silu { x: 0 },
        Operand { index: 1 },
        Mul { a: 1, b: 2 },
        Operand { index: 2 },
        Sigmoid { x: 4 },
        Add { a: 3, b: 5 },
    ];
    let fused = g.add1("fused", Op::FusedMap { steps }, &[x, y, z]).unwrap();
    g.output("plain", plain);
    g.output("fused", fused);
    let out = run(&g, vec![("x", xt), ("y", yt), ("z", zt)]);
    // In f32 the map does the plain ops' arithmetic in the same order: bit for bit equal.
    assert_eq!(out["fused"], out["plain"]);
}

#[test]
fn swiglu_linear_by_hand() {
    let mut g = Graph::new("swiglu");
    let x = act(&mut g, "x", DType::F32, &[1, 2]);
    let w = weight(&mut g, "w", DType::F32, &[2, 2]);
    let y = g.add1("y", Op::SwiGluLinear, &[x, w]).unwrap();
    g.output("y", y);
    let out = run(
        &g,
        vec![
            ("x", Tensor::f32(&[1, 2], vec![1., 2.])),
            ("w", Tensor::f32(&[2, 2], vec![1., 0., 0., 1.])),
        ],
    );
    // gate row [1, 0] gives g = 1, up row [0, 1] gives u = 2:
    // silu(1) · 2 = 2 / (1 + e⁻¹) = 1.4621172.
    assert_values(&out["y"], &[1, 1], &[1.462_117_2], TOL);
}

#[test]
fn swiglu_linear_matches_gate_and_up() {
    let mut r = rng(92);
    let (hidden, width) = (8, 6);
    let xt = Tensor::normal(DType::F32, &[2, 3, hidden], 1.0, &mut r);
    let gate_t = Tensor::normal(DType::F32, &[width, hidden], 0.5, &mut r);
    let up_t = Tensor::normal(DType::F32, &[width, hidden], 0.5, &mut r);
    let mut g = Graph::new("swiglu");
    let x = act(&mut g, "x", DType::F32, &[2, 3, hidden]);
    let gate = weight(&mut g, "gate", DType::F32, &[width, hidden]);
    let up = weight(&mut g, "up", DType::F32, &[width, hidden]);
    let gx = g.add1("gate_x", Op::Linear, &[x, gate]).unwrap();
    let ux = g.add1("up_x", Op::Linear, &[x, up]).unwrap();
    let act_ = g.add1("silu", Op::Silu, &[gx]).unwrap();
    let plain = g.add1("mul", Op::Mul, &[act_, ux]).unwrap();
    let stacked = g
        .add1("stack", Op::Concat { axis: 0 }, &[gate, up])
        .unwrap();
    let fused = g.add1("fused", Op::SwiGluLinear, &[x, stacked]).unwrap();
    g.output("plain", plain);
    g.output("fused", fused);
    let out = run(&g, vec![("x", xt), ("gate", gate_t), ("up", up_t)]);
    assert_eq!(out["fused"].shape, vec![2, 3, width]);
    assert_eq!(out["fused"], out["plain"]);
}

#[test]
fn linear_add_by_hand() {
    let mut g = Graph::new("linear_add");
    let x = act(&mut g, "x", DType::F32, &[2, 2]);
    let w = weight(&mut g, "w", DType::F32, &[2, 2]);
    let bias = weight(&mut g, "bias", DType::F32, &[2]);
    let residual = act(&mut g, "residual", DType::F32, &[2, 2]);
    let with_bias = g.add1("bias", Op::LinearAdd, &[x, w, bias]).unwrap();
    let with_residual = g
        .add1("residual", Op::LinearAdd, &[x, w, residual])
        .unwrap();
    g.output("with_bias", with_bias);
    g.output("with_residual", with_residual);
    let out = run(
        &g,
        vec![
            ("x", Tensor::f32(&[2, 2], vec![1., 2., 3., 4.])),
            ("w", Tensor::f32(&[2, 2], vec![1., 1., 2., 0.])),
            ("bias", Tensor::f32(&[2], vec![10., 20.])),
            ("residual", Tensor::f32(&[2, 2], vec![-1., -2., -3., -4.])),
        ],
    );
    // x · wᵀ = [[1+2, 2], [3+4, 6]] = [[3, 2], [7, 6]].
    assert_values(&out["with_bias"], &[2, 2], &[13., 22., 17., 26.], 0.0);
    assert_values(&out["with_residual"], &[2, 2], &[2., 0., 4., 2.], 0.0);
}

#[test]
fn add_rms_norm_by_hand() {
    let mut g = Graph::new("add_rms_norm");
    let x = act(&mut g, "x", DType::F32, &[1, 2]);
    let residual = act(&mut g, "residual", DType::F32, &[1, 2]);
    let w = weight(&mut g, "w", DType::F32, &[2]);
    let both = g
        .add("fused", Op::AddRmsNorm { eps: 1e-6 }, &[x, residual, w])
        .unwrap();
    g.output("sum", both[0]);
    g.output("normed", both[1]);
    let out = run(
        &g,
        vec![
            ("x", Tensor::f32(&[1, 2], vec![1., 2.])),
            ("residual", Tensor::f32(&[1, 2], vec![2., 2.])),
            ("w", Tensor::f32(&[2], vec![1., 0.5])),
        ],
    );
    // sum = [3, 4]; rms = sqrt((9 + 16) / 2) = sqrt(12.5) = 3.5355339;
    // normed = [3, 4] / 3.5355339 · [1, 0.5] = [0.8485281, 0.5656854].
    assert_values(&out["sum"], &[1, 2], &[3., 4.], 0.0);
    assert_values(&out["normed"], &[1, 2], &[0.848_528_1, 0.565_685_4], TOL);
}

#[test]
fn moe_router_linear_matches_linear_then_router() {
    // In bf16 the logits are rounded to the dtype before routing, as the `Linear` node's
    // result is; the fused op must choose the same experts with the same weights. Small
    // integer activations and weights give exact, often tied logits.
    let mut r = rng(94);
    let (tokens, experts, hidden) = (6, 8, 16);
    for (dtype, normalize) in [(DType::BF16, true), (DType::F32, false)] {
        let mut g = Graph::new("router_linear");
        let x = act(&mut g, "x", dtype, &[2, tokens / 2, hidden]);
        let w = weight(&mut g, "w", dtype, &[experts, hidden]);
        let logits = g.add1("logits", Op::Linear, &[x, w]).unwrap();
        let router = Op::MoeRouter {
            top_k: 3,
            normalize,
        };
        let plain = g.add("plain", router, &[logits]).unwrap();
        let fused = g
            .add(
                "fused",
                Op::MoeRouterLinear {
                    top_k: 3,
                    normalize,
                },
                &[x, w],
            )
            .unwrap();
        for (name, value) in [
            ("plain_w", plain[0]),
            ("plain_e", plain[1]),
            ("fused_w", fused[0]),
            ("fused_e", fused[1]),
        ] {
            g.output(name, value);
        }
        let mut integers = |shape: &[usize], scale: f32| {
            let mut t = Tensor::uniform(dtype, shape, 2.5, &mut r);
            for v in &mut t.data {
                *v = v.round() * scale;
            }
            t
        };
        let out = run(
            &g,
            vec![
                ("x", integers(&[2, tokens / 2, hidden], 0.5)),
                ("w", integers(&[experts, hidden], 0.25)),
            ],
        );
        assert_eq!(out["fused_e"].shape, vec![2, tokens / 2, 3]);
        assert_eq!(out["fused_e"], out["plain_e"], "{dtype}");
        assert_eq!(out["fused_w"], out["plain_w"], "{dtype}");
    }
}

#[test]
fn quantized_linear_matches_dequantize_then_linear() {
    let mut r = rng(93);
    let (n, k) = (5, 64);
    for (bits, symmetric) in [(4, true), (8, false)] {
        let s = scheme(bits, 32, symmetric, 1.0);
        let mut g = Graph::new("qlinear");
        let x = act(&mut g, "x", DType::F32, &[3, k]);
        let w = weight(&mut g, "w", DType::F32, &[n, k]);
        let (q, dq) = quantize_round_trip(&mut g, "q", w, s, DType::F32);
        let plain = g.add1("plain", Op::Linear, &[x, dq]).unwrap();
        let mut operands = vec![x];
        operands.extend(&q);
        let fused = g
            .add1("fused", Op::QuantizedLinear { scheme: s }, &operands)
            .unwrap();
        g.output("plain", plain);
        g.output("fused", fused);
        let out = run(
            &g,
            vec![
                ("x", Tensor::normal(DType::F32, &[3, k], 1.0, &mut r)),
                ("w", Tensor::normal(DType::F32, &[n, k], 0.2, &mut r)),
            ],
        );
        assert_eq!(out["fused"].shape, vec![3, n]);
        assert_eq!(out["fused"], out["plain"], "{bits}-bit sym={symmetric}");
    }
}

#[test]
fn causal_mask_by_hand() {
    let mut g = Graph::new("mask");
    let prefill = act(&mut g, "prefill", DType::F32, &[1, 3, 2, 3]);
    let decode = act(&mut g, "decode", DType::F32, &[2, 1, 1, 4]);
    let lengths = act(&mut g, "lengths", DType::I32, &[2]);
    let causal = g.add1("causal", Op::CausalMask, &[prefill]).unwrap();
    let by_length = g
        .add1("by_length", Op::CausalMask, &[decode, lengths])
        .unwrap();
    g.output("causal", causal);
    g.output("by_length", by_length);
    let out = run(
        &g,
        vec![
            ("prefill", Tensor::zeros(DType::F32, &[1, 3, 2, 3])),
            ("decode", Tensor::zeros(DType::F32, &[2, 1, 1, 4])),
            ("lengths", Tensor::i32(&[2], &[2, 4])),
        ],
    );
    let inf = f32::NEG_INFINITY;
    // S = 2 queries, T = 3 keys: query i sees j ≤ i + T − S = i + 1.
    assert_eq!(out["causal"].shape, vec![1, 1, 2, 3]);
    assert_eq!(out["causal"].data, vec![0., 0., inf, 0., 0., 0.]);
    // One query per sequence sees j < length: 2 and 4 keys.
    assert_eq!(out["by_length"].shape, vec![2, 1, 1, 4]);
    assert_eq!(
        out["by_length"].data,
        vec![0., 0., inf, inf, 0., 0., 0., 0.]
    );
    // A length below the query count is an error that names the node.
    let err = run_err(
        &g,
        vec![
            ("prefill", Tensor::zeros(DType::F32, &[1, 3, 2, 3])),
            ("decode", Tensor::zeros(DType::F32, &[2, 1, 1, 4])),
            ("lengths", Tensor::i32(&[2], &[0, 4])),
        ],
    );
    assert!(err.to_string().contains("by_length"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn embedding_out_of_range_names_node_and_id() {
    let mut g = Graph::new("embed");
    let table = weight(&mut g, "table", DType::F32, &[4, 2]);
    let ids = act(&mut g, "ids", DType::I32, &[3]);
    let y = g.add1("tok_embed", Op::Embedding, &[table, ids]).unwrap();
    g.output("y", y);
    for (bad, id) in [([1, 7, 0], "7"), ([0, 1, -1], "-1")] {
        let err = run_err(
            &g,
            vec![
                ("table", Tensor::zeros(DType::F32, &[4, 2])),
                ("ids", Tensor::i32(&[3], &bad)),
            ],
        );
        match &err {
            InterpError::Node {
                node, label, op, ..
            } => {
                assert_eq!((*node, label.as_str(), *op), (2, "tok_embed", "embedding"));
            }
            other => panic!("expected a node error, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("%2") && text.contains("`tok_embed`"),
            "{text}"
        );
        assert!(text.contains(&format!("token id {id} ")), "{text}");
        assert!(text.contains("vocabulary of 4"), "{text}");
    }
}

#[test]
fn kv_append_past_capacity_errors() {
    let mut g = Graph::new("append");
    let cache = act(&mut g, "cache", DType::F32, &[2, 4, 1, 2]);
    let new = act(&mut g, "new", DType::F32, &[2, 2, 1, 2]);
    let start = act(&mut g, "start", DType::I32, &[2]);
    let y = g
        .add1("layers.0.k_append", Op::KvAppend, &[cache, new, start])
        .unwrap();
    g.output("y", y);
    // Sequence 1 at 3: rows 3..5 of a 4-row cache. Also a negative start.
    for bad in [[2, 3], [-1, 0]] {
        let err = run_err(
            &g,
            vec![
                ("cache", Tensor::zeros(DType::F32, &[2, 4, 1, 2])),
                ("new", Tensor::zeros(DType::F32, &[2, 2, 1, 2])),
                ("start", Tensor::i32(&[2], &bad)),
            ],
        );
        let text = err.to_string();
        assert!(matches!(err, InterpError::Node { node: 3, .. }), "{err:?}");
        assert!(text.contains("`layers.0.k_append`"), "{text}");
        assert!(text.contains("capacity 4"), "{text}");
    }
    // Exactly filling the cache (start 2, two rows) is fine.
    let out = interp::run(
        &g,
        &feed(vec![
            ("cache", Tensor::zeros(DType::F32, &[2, 4, 1, 2])),
            ("new", Tensor::full(DType::F32, &[2, 2, 1, 2], 1.0)),
            ("start", Tensor::i32(&[2], &[2, 2])),
        ]),
    )
    .unwrap();
    assert_eq!(out["y"].data.iter().sum::<f32>(), 8.0);
}

#[test]
fn attention_errors_name_the_node() {
    // Causal attention with fewer keys than queries.
    let mut g = Graph::new("attn");
    let q = g
        .input("q", InputKind::Activation, DType::F32, shape![1, "s", 2, 4])
        .unwrap();
    let k = g
        .input("k", InputKind::Activation, DType::F32, shape![1, "t", 1, 4])
        .unwrap();
    let v = g
        .input("v", InputKind::Activation, DType::F32, shape![1, "t", 1, 4])
        .unwrap();
    let y = g
        .add1(
            "self_attn",
            Op::Attention {
                causal: true,
                scale: 0.5,
            },
            &[q, k, v],
        )
        .unwrap();
    g.output("y", y);
    let err = run_err(
        &g,
        vec![
            ("q", Tensor::zeros(DType::F32, &[1, 3, 2, 4])),
            ("k", Tensor::zeros(DType::F32, &[1, 2, 1, 4])),
            ("v", Tensor::zeros(DType::F32, &[1, 2, 1, 4])),
        ],
    );
    let text = err.to_string();
    assert!(
        text.contains("`self_attn`") && text.contains("attention"),
        "{text}"
    );

    // Decode lengths beyond the capacity or shorter than the new tokens.
    let mut g = Graph::new("decode");
    let q = act(&mut g, "q", DType::F32, &[2, 2, 2, 4]);
    let k = act(&mut g, "k", DType::F32, &[2, 4, 1, 4]);
    let v = act(&mut g, "v", DType::F32, &[2, 4, 1, 4]);
    let len = act(&mut g, "len", DType::I32, &[2]);
    let y = g
        .add1(
            "decode",
            Op::AttentionDecode { scale: 0.5 },
            &[q, k, v, len],
        )
        .unwrap();
    g.output("y", y);
    for bad in [[2, 5], [1, 4]] {
        let err = run_err(
            &g,
            vec![
                ("q", Tensor::zeros(DType::F32, &[2, 2, 2, 4])),
                ("k", Tensor::zeros(DType::F32, &[2, 4, 1, 4])),
                ("v", Tensor::zeros(DType::F32, &[2, 4, 1, 4])),
                ("len", Tensor::i32(&[2], &bad)),
            ],
        );
        let text = err.to_string();
        assert!(text.contains("%4") && text.contains("`decode`"), "{text}");
    }
}

#[test]
fn moe_errors_name_the_node() {
    // An expert id outside 0..E.
    let mut g = Graph::new("dispatch");
    let experts = act(&mut g, "experts", DType::I32, &[2, 1]);
    let d = g
        .add(
            "moe.dispatch",
            Op::MoeDispatch { num_experts: 2 },
            &[experts],
        )
        .unwrap();
    g.output("order", d[0]);
    let err = run_err(&g, vec![("experts", Tensor::i32(&[2, 1], &[0, 2]))]);
    let text = err.to_string();
    assert!(
        text.contains("`moe.dispatch`") && text.contains("expert 2"),
        "{text}"
    );

    // An order that is not a permutation.
    let mut g = Graph::new("combine");
    let y = act(&mut g, "y", DType::F32, &[2, 1, 1]);
    let order = act(&mut g, "order", DType::I32, &[2, 1]);
    let w = act(&mut g, "w", DType::F32, &[2, 1]);
    let c = g
        .add1("moe.combine", Op::MoeCombine, &[y, order, w])
        .unwrap();
    g.output("out", c);
    let err = run_err(
        &g,
        vec![
            ("y", Tensor::zeros(DType::F32, &[2, 1, 1])),
            ("order", Tensor::i32(&[2, 1], &[1, 1])),
            ("w", Tensor::zeros(DType::F32, &[2, 1])),
        ],
    );
    let text = err.to_string();
    assert!(
        text.contains("`moe.combine`") && text.contains("permutation"),
        "{text}"
    );
}

#[test]
fn missing_input_names_the_input() {
    let mut g = Graph::new("g");
    let x = act(&mut g, "x", DType::F32, &[2]);
    let w = weight(&mut g, "layers.0.weight", DType::F32, &[2]);
    let y = g.add1("y", Op::Mul, &[x, w]).unwrap();
    g.output("y", y);
    let err = run_err(&g, vec![("x", Tensor::zeros(DType::F32, &[2]))]);
    assert_eq!(
        err,
        InterpError::MissingInput {
            graph: "g".to_string(),
            name: "layers.0.weight".to_string(),
            kind: InputKind::Weight,
        }
    );
    assert!(err.to_string().contains("`layers.0.weight`"), "{err}");
}

#[test]
fn bad_input_names_the_input() {
    let mut g = Graph::new("g");
    let x = g
        .input("x", InputKind::Activation, DType::F32, shape!["n", 4])
        .unwrap();
    let ids = g
        .input("ids", InputKind::Activation, DType::I32, shape!["n"])
        .unwrap();
    let table = weight(&mut g, "table", DType::F32, &[3, 4]);
    let e = g.add1("embed", Op::Embedding, &[table, ids]).unwrap();
    let y = g.add1("y", Op::Add, &[x, e]).unwrap();
    g.output("y", y);
    let good = || {
        vec![
            ("x", Tensor::zeros(DType::F32, &[2, 4])),
            ("ids", Tensor::i32(&[2], &[0, 1])),
            ("table", Tensor::zeros(DType::F32, &[3, 4])),
        ]
    };
    // The good inputs run, so each failure below is due to the one change.
    assert!(interp::run(&g, &feed(good())).is_ok());
    let cases: Vec<(usize, Tensor, &str, &str)> = vec![
        // (which input, replacement, input name, part of the message)
        (0, Tensor::zeros(DType::BF16, &[2, 4]), "x", "dtype"),
        (1, Tensor::zeros(DType::F32, &[2]), "ids", "dtype"),
        (
            2,
            Tensor::zeros(DType::F32, &[3, 5]),
            "table",
            "dimension 1 is 5",
        ),
        (0, Tensor::zeros(DType::F32, &[2, 4, 1]), "x", "rank"),
        // `n` is bound to 2 by x, and ids has 3 elements.
        (1, Tensor::i32(&[3], &[0, 0, 0]), "ids", "`n` is already 2"),
    ];
    for (which, tensor, name, part) in cases {
        let mut inputs = good();
        inputs[which].1 = tensor;
        let err = interp::run(&g, &feed(inputs)).unwrap_err();
        match &err {
            InterpError::BadInput {
                name: n, message, ..
            } => {
                assert_eq!(n, name);
                assert!(message.to_string().contains(part), "{message}");
            }
            other => panic!("expected a bad-input error for `{name}`, got {other:?}"),
        }
        assert!(err.to_string().contains(&format!("`{name}`")), "{err}");
    }
}
