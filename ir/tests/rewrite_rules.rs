//! Rule tests of `ir::rewrite`, one family at a time.
//!
//! Two kinds of check, in the spirit of `egg::test_fn!`: a graph whose outputs `lhs` and `rhs`
//! are two forms of one computation is put in an e-graph, the rules run, and the two outputs
//! must end in one e-class ([`proves`]); and [`optimize`] on a graph must pick the fused form,
//! report the rule's applications, and compute the same values under `ir::interp`. The rules
//! on the model builder's graphs are tested in `kiln-models` (`models/tests/rewrite_builder.rs`).

use kiln_ir::dtype::DType;
use kiln_ir::graph::{Graph, ValueId};
use kiln_ir::interp;
use kiln_ir::op::{InputKind, MapStep, Op, QuantScheme};
use kiln_ir::rewrite::analysis::EGraph;
use kiln_ir::rewrite::language::ENode;
use kiln_ir::rewrite::rules::{self, Found, RuleSet};
use kiln_ir::rewrite::stage::{run_stage, Stage};
use kiln_ir::rewrite::{convert, optimize, RewriteError, RewriteOptions, RewriteReport};
use kiln_ir::shape::Shape;
use kiln_ir::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeSet, HashMap};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn act(g: &mut Graph, name: &str, dtype: DType, dims: &[usize]) -> ValueId {
    g.input(name, InputKind::Activation, dtype, Shape::of(dims))
        .unwrap()
}

fn weight(g: &mut Graph, name: &str, dtype: DType, dims: &[usize]) -> ValueId {
    g.input(name, InputKind::Weight, dtype, Shape::of(dims))
        .unwrap()
}

/// Whether the rules of `sets` put outputs `lhs` and `rhs` of `graph` in one e-class.
fn proves(graph: &Graph, sets: &[RuleSet]) -> bool {
    let converted = convert::to_egraph(graph).unwrap();
    let find = |name: &str| {
        converted
            .outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
            .unwrap()
    };
    let (lhs, rhs) = (find("lhs"), find("rhs"));
    let stage = Stage::new("test", sets);
    let rules = stage.rules(&BTreeSet::new());
    let (egraph, report) = run_stage(converted.egraph, &stage, &rules);
    assert!(
        egraph.analysis.problems.is_empty(),
        "{:?}",
        egraph.analysis.problems
    );
    assert!(!report.stop.hit_limit(), "{report}");
    egraph.find(lhs) == egraph.find(rhs)
}

/// Random values for every input of `graph` (all shapes concrete).
fn random_feed(graph: &Graph, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut feed = HashMap::new();
    for (_, name, _, ty) in graph.inputs() {
        let shape: Vec<usize> = ty
            .shape
            .dims()
            .iter()
            .map(|d| d.as_const().unwrap())
            .collect();
        let tensor = match ty.dtype {
            DType::I4 | DType::I8 | DType::I32 => {
                let count: usize = shape.iter().product();
                let values: Vec<f32> = (0..count)
                    .map(|_| rng.random_range(-8..=7) as f32)
                    .collect();
                Tensor::new(ty.dtype, &shape, values).unwrap()
            }
            DType::F16 => {
                let count: usize = shape.iter().product();
                let values = (0..count).map(|_| rng.random_range(0.01..0.1)).collect();
                Tensor::new(DType::F16, &shape, values).unwrap()
            }
            dtype => Tensor::normal(dtype, &shape, 1.0, &mut rng),
        };
        feed.insert(name.to_string(), tensor);
    }
    feed
}

/// Optimises `graph`, checks the result verifies and computes the same outputs as `graph`
/// (within `tolerance`, relative), and returns it with its report.
#[track_caller]
fn optimize_checked(graph: &Graph, tolerance: f64) -> (Graph, RewriteReport) {
    let (rewritten, report) = optimize(graph, &RewriteOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", graph.name));
    rewritten.verify().unwrap();
    let feed = random_feed(graph, 5);
    let want = interp::run(graph, &feed).unwrap();
    let got = interp::run(&rewritten, &feed).unwrap_or_else(|e| panic!("{e}\n{rewritten}"));
    for (name, reference) in &want {
        let error = got[name].relative_error(reference);
        assert!(
            error <= tolerance,
            "{}: output `{name}` differs by {error:.3e}\n{rewritten}",
            graph.name
        );
    }
    (rewritten, report)
}

/// Op names of the kernel-like nodes (not inputs, constants, reshapes), in order.
fn kernels(graph: &Graph) -> Vec<&'static str> {
    graph
        .nodes
        .iter()
        .map(|n| n.op.name())
        .filter(|n| !["input", "constant", "reshape"].contains(n))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Simplification
// ---------------------------------------------------------------------------------------------

#[test]
fn transposes_cancel_and_compose() {
    let mut g = Graph::new("transposes");
    let x = act(&mut g, "x", DType::F32, &[2, 3, 4]);
    let swap = |perm: &[usize]| Op::Transpose {
        perm: perm.to_vec(),
    };
    let a = g.add1("a", swap(&[1, 0, 2]), &[x]).unwrap();
    let back = g.add1("back", swap(&[1, 0, 2]), &[a]).unwrap();
    let b = g.add1("b", swap(&[0, 2, 1]), &[x]).unwrap();
    let both = g.add1("both", swap(&[2, 1, 0]), &[b]).unwrap();
    let identity = g.add1("identity", swap(&[0, 1, 2]), &[x]).unwrap();
    g.output("back", back);
    g.output("both", both);
    g.output("identity", identity);
    let (rewritten, report) = optimize_checked(&g, 0.0);
    // `back` and `identity` are x itself; `both` is one transpose: output axis i reads
    // b's axis [2,1,0][i], which is x's axis [0,2,1][[2,1,0][i]] = [1, 2, 0][i].
    let x_value = rewritten
        .nodes
        .iter()
        .position(|n| matches!(&n.op, Op::Input { name, .. } if name == "x"))
        .unwrap();
    let value = |name: &str| rewritten.outputs.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(value("back").node, x_value);
    assert_eq!(value("identity").node, x_value);
    assert_eq!(kernels(&rewritten), vec!["transpose"]);
    assert_eq!(rewritten.nodes[value("both").node].op, swap(&[1, 2, 0]));
    assert!(report.applied["transpose-transpose"] >= 2, "{report}");
    assert!(report.applied["transpose-identity"] >= 1, "{report}");
}

#[test]
fn reshapes_cancel_and_merge() {
    let mut g = Graph::new("reshapes");
    let x = act(&mut g, "x", DType::F32, &[2, 3, 4]);
    let reshape = |dims: &[usize]| Op::Reshape {
        shape: Shape::of(dims),
    };
    let flat = g.add1("flat", reshape(&[6, 4]), &[x]).unwrap();
    let back = g.add1("back", reshape(&[2, 3, 4]), &[flat]).unwrap();
    let line = g.add1("line", reshape(&[24]), &[flat]).unwrap();
    g.output("lhs", back);
    g.output("rhs", x);
    g.output("line", line);
    assert!(proves(&g, &[RuleSet::Simplify]));
    let (rewritten, report) = optimize_checked(&g, 0.0);
    // `line` reads x directly: one reshape, no chain.
    let line = rewritten
        .outputs
        .iter()
        .find(|(n, _)| n == "line")
        .unwrap()
        .1;
    let node = &rewritten.nodes[line.node];
    assert_eq!(node.op, reshape(&[24]));
    assert!(matches!(
        rewritten.nodes[node.inputs[0].node].op,
        Op::Input { .. }
    ));
    assert!(report.applied["reshape-reshape"] >= 1);
}

#[test]
fn identities_and_constants_fold() {
    let mut g = Graph::new("identities");
    let x = act(&mut g, "x", DType::F32, &[4]);
    let one = g.constant("one", 1.0, DType::F32).unwrap();
    let zero = g.constant("zero", 0.0, DType::F32).unwrap();
    let two = g.constant("two", 2.0, DType::F32).unwrap();
    let three = g.constant("three", 3.0, DType::F32).unwrap();
    let times_one = g.add1("times_one", Op::Mul, &[x, one]).unwrap();
    let plus_zero = g.add1("plus_zero", Op::Add, &[zero, times_one]).unwrap();
    let six = g.add1("six", Op::Mul, &[two, three]).unwrap();
    let scaled = g.add1("scaled", Op::Mul, &[x, six]).unwrap();
    let x2 = g.add1("x2", Op::Mul, &[x, two]).unwrap();
    let x2x3 = g.add1("x2x3", Op::Mul, &[x2, three]).unwrap();
    g.output("lhs", plus_zero);
    g.output("rhs", x);
    g.output("scaled", scaled);
    g.output("x2x3", x2x3);
    assert!(proves(&g, &[RuleSet::Simplify]));
    let (rewritten, report) = optimize_checked(&g, 0.0);
    // x · (2 · 3) folds to x · 6, and (x · 2) · 3 to the same node.
    assert_eq!(kernels(&rewritten), vec!["mul"]);
    let mul = rewritten.nodes.iter().find(|n| n.op == Op::Mul).unwrap();
    assert_eq!(
        rewritten.nodes[mul.inputs[1].node].op,
        Op::Constant {
            value: 6.0,
            dtype: DType::F32
        }
    );
    for rule in [
        "mul-one",
        "add-zero",
        "fold-constants",
        "fold-constant-factors",
    ] {
        assert!(report.applied[rule] >= 1, "{rule}: {report}");
    }
}

#[test]
fn constant_folding_rounds_to_the_dtype() {
    let mut g = Graph::new("fold");
    let a = g.constant("a", 1.0, DType::BF16).unwrap();
    let b = g.constant("b", 2f32.powi(-9), DType::BF16).unwrap();
    let sum = g.add1("sum", Op::Add, &[a, b]).unwrap();
    let activated = g.add1("silu", Op::Silu, &[a]).unwrap();
    g.output("sum", sum);
    g.output("silu", activated);
    let (rewritten, _) = optimize_checked(&g, 0.0);
    assert!(kernels(&rewritten).is_empty(), "{rewritten}");
    let value = |name: &str| {
        let v = rewritten.outputs.iter().find(|(n, _)| n == name).unwrap().1;
        match rewritten.nodes[v.node].op {
            Op::Constant { value, dtype } => (value, dtype),
            ref op => panic!("{op:?}"),
        }
    };
    // 1 + 2⁻⁹ rounds to 1 in bf16 (7 fraction bits); silu(1) = 0.7310586 → 0.73046875.
    assert_eq!(value("sum"), (1.0, DType::BF16));
    assert_eq!(value("silu"), (DType::BF16.round(0.731_058_6), DType::BF16));
}

#[test]
fn cast_chains_collapse_only_when_exact() {
    let mut g = Graph::new("casts");
    let x = act(&mut g, "x", DType::F16, &[4]);
    let y = act(&mut g, "y", DType::F32, &[4]);
    let cast = |to| Op::Cast { to };
    let wide = g.add1("wide", cast(DType::F32), &[x]).unwrap();
    let round_trip = g.add1("round_trip", cast(DType::F16), &[wide]).unwrap();
    let to_bf16 = g.add1("to_bf16", cast(DType::BF16), &[wide]).unwrap();
    let narrow = g.add1("narrow", cast(DType::F16), &[y]).unwrap();
    let lossy = g.add1("lossy", cast(DType::F32), &[narrow]).unwrap();
    let same = g.add1("same", cast(DType::F32), &[y]).unwrap();
    g.output("lhs", round_trip);
    g.output("rhs", x);
    g.output("to_bf16", to_bf16);
    g.output("lossy", lossy);
    g.output("same", same);
    assert!(proves(&g, &[RuleSet::Simplify]));
    let (rewritten, report) = optimize_checked(&g, 0.0);
    // f16 → f32 → bf16 becomes one cast; f32 → f16 → f32 loses bits and stays.
    let producer = |name: &str| {
        let v = rewritten.outputs.iter().find(|(n, _)| n == name).unwrap().1;
        &rewritten.nodes[v.node]
    };
    let to_bf16 = producer("to_bf16");
    assert_eq!(to_bf16.op, cast(DType::BF16));
    assert_eq!(rewritten.nodes[to_bf16.inputs[0].node].op.name(), "input");
    let lossy = producer("lossy");
    assert_eq!(lossy.op, cast(DType::F32));
    assert_eq!(rewritten.nodes[lossy.inputs[0].node].op, cast(DType::F16));
    assert_eq!(producer("same").op.name(), "input");
    assert!(report.applied["cast-cast"] >= 2);
    assert!(report.applied["cast-identity"] >= 1);
}

#[test]
fn whole_slices_disappear() {
    let mut g = Graph::new("slices");
    let x = act(&mut g, "x", DType::F32, &[3, 1]);
    let last = Op::Slice {
        axis: 1,
        start: -1,
        end: None,
    };
    let part = Op::Slice {
        axis: 0,
        start: 1,
        end: None,
    };
    let whole = g.add1("whole", last, &[x]).unwrap();
    let tail = g.add1("tail", part, &[x]).unwrap();
    g.output("lhs", whole);
    g.output("rhs", x);
    g.output("tail", tail);
    assert!(proves(&g, &[RuleSet::Simplify]));
    let (rewritten, _) = optimize_checked(&g, 0.0);
    assert_eq!(kernels(&rewritten), vec!["slice"]);
}

// ---------------------------------------------------------------------------------------------
// Fusion
// ---------------------------------------------------------------------------------------------

#[test]
fn bias_and_residual_adds_become_linear_epilogues() {
    let mut g = Graph::new("epilogues");
    let x = act(&mut g, "x", DType::F32, &[2, 8]);
    let w = weight(&mut g, "w", DType::F32, &[4, 8]);
    let bias = weight(&mut g, "bias", DType::F32, &[4]);
    let residual = act(&mut g, "residual", DType::F32, &[2, 4]);
    let wide = act(&mut g, "wide", DType::F32, &[3, 2, 4]);
    let y = g.add1("y", Op::Linear, &[x, w]).unwrap();
    let with_bias = g.add1("with_bias", Op::Add, &[bias, y]).unwrap();
    let fused = g.add1("fused", Op::LinearAdd, &[x, w, bias]).unwrap();
    let x2 = act(&mut g, "x2", DType::F32, &[2, 8]);
    let y2 = g.add1("y2", Op::Linear, &[x2, w]).unwrap();
    let with_residual = g.add1("with_residual", Op::Add, &[y2, residual]).unwrap();
    // An addend that would enlarge the product is not an epilogue.
    let x3 = act(&mut g, "x3", DType::F32, &[2, 8]);
    let y3 = g.add1("y3", Op::Linear, &[x3, w]).unwrap();
    let enlarged = g.add1("enlarged", Op::Add, &[y3, wide]).unwrap();
    g.output("lhs", with_bias);
    g.output("rhs", fused);
    g.output("with_residual", with_residual);
    g.output("enlarged", enlarged);
    assert!(proves(&g, &[RuleSet::Patterns]));
    let (rewritten, report) = optimize_checked(&g, 1e-6);
    assert_eq!(
        kernels(&rewritten),
        vec!["linear_add", "linear_add", "linear", "add"],
        "{rewritten}"
    );
    assert!(report.applied["linear-add"] >= 2);
}

#[test]
fn residual_add_and_rms_norm_fuse_without_computing_the_sum_twice() {
    // Both the sum and the normed value are outputs: DAG-aware extraction must take both from
    // the one fused node, where a tree cost would keep the add for the sum.
    let mut g = Graph::new("add_rms_norm");
    let h = act(&mut g, "h", DType::F32, &[2, 1, 16]);
    let a = act(&mut g, "a", DType::F32, &[2, 1, 16]);
    let w = weight(&mut g, "w", DType::F32, &[16]);
    let sum = g.add1("sum", Op::Add, &[h, a]).unwrap();
    let normed = g
        .add1("norm", Op::RmsNorm { eps: 1e-5 }, &[sum, w])
        .unwrap();
    g.output("sum", sum);
    g.output("normed", normed);
    let fused = g
        .add("fused", Op::AddRmsNorm { eps: 1e-5 }, &[h, a, w])
        .unwrap();
    g.output("lhs", normed);
    g.output("rhs", fused[1]);
    assert!(proves(&g, &[RuleSet::Patterns]));
    let mut g2 = g.clone();
    g2.outputs
        .retain(|(name, _)| name == "sum" || name == "normed");
    g2.nodes.truncate(g2.nodes.len() - 1);
    let (rewritten, report) = optimize_checked(&g2, 1e-6);
    assert_eq!(kernels(&rewritten), vec!["add_rms_norm"], "{rewritten}");
    let outputs: Vec<ValueId> = rewritten.outputs.iter().map(|(_, v)| *v).collect();
    assert_eq!(outputs[0].node, outputs[1].node);
    assert_eq!((outputs[0].output, outputs[1].output), (0, 1));
    assert!(report.applied["add-rms-norm"] >= 1);
    assert_eq!(report.after.launches, 1);
}

#[test]
fn dequantize_and_linear_become_a_quantized_linear() {
    for symmetric in [true, false] {
        let scheme = QuantScheme {
            bits: 4,
            group_size: 16,
            symmetric,
            clip: 1.0,
        };
        let mut g = Graph::new("qlinear");
        let x = act(&mut g, "x", DType::F32, &[3, 32]);
        let q = weight(&mut g, "q", DType::I4, &[8, 32]);
        let scale = weight(&mut g, "scale", DType::F16, &[8, 2]);
        let mut operands = vec![q, scale];
        if !symmetric {
            operands.push(weight(&mut g, "zero", DType::F16, &[8, 2]));
        }
        let w = g
            .add1(
                "dequantize",
                Op::Dequantize {
                    scheme,
                    to: DType::F32,
                },
                &operands,
            )
            .unwrap();
        let y = g.add1("y", Op::Linear, &[x, w]).unwrap();
        g.output("y", y);
        let (rewritten, report) = optimize_checked(&g, 0.0);
        assert_eq!(kernels(&rewritten), vec!["quantized_linear"]);
        assert_eq!(report.applied["dequantize-linear"], 1);
        // A dequantize to another dtype than the activations' is left alone.
        let mut g = Graph::new("mismatch");
        let x = act(&mut g, "x", DType::BF16, &[3, 32]);
        let q = weight(&mut g, "q", DType::I4, &[8, 32]);
        let scale = weight(&mut g, "scale", DType::F16, &[8, 2]);
        let mut operands = vec![q, scale];
        if !symmetric {
            operands.push(weight(&mut g, "zero", DType::F16, &[8, 2]));
        }
        let w = g
            .add1(
                "dequantize",
                Op::Dequantize {
                    scheme,
                    to: DType::F32,
                },
                &operands,
            )
            .unwrap();
        let w = g.add1("w", Op::Cast { to: DType::BF16 }, &[w]).unwrap();
        let y = g.add1("y", Op::Linear, &[x, w]).unwrap();
        g.output("y", y);
        let (rewritten, _) = optimize(&g, &RewriteOptions::default()).unwrap();
        assert!(kernels(&rewritten).contains(&"linear"));
    }
}

#[test]
fn the_router_linear_fuses_into_the_router() {
    // An MoE router over the logits of its linear, as the model builder writes it: both
    // results come from one fused node, and the logits are never stored.
    for dtype in [DType::F32, DType::BF16] {
        let mut g = Graph::new("router");
        let x = act(&mut g, "x", dtype, &[2, 3, 32]);
        let w = weight(&mut g, "gate.weight", dtype, &[8, 32]);
        let logits = g.add1("gate", Op::Linear, &[x, w]).unwrap();
        let router = Op::MoeRouter {
            top_k: 2,
            normalize: true,
        };
        let routed = g.add("router", router, &[logits]).unwrap();
        g.output("weights", routed[0]);
        g.output("experts", routed[1]);
        let fused = g
            .add(
                "fused",
                Op::MoeRouterLinear {
                    top_k: 2,
                    normalize: true,
                },
                &[x, w],
            )
            .unwrap();
        let mut proof = g.clone();
        proof.output("lhs", routed[1]);
        proof.output("rhs", fused[1]);
        assert!(proves(&proof, &[RuleSet::Patterns]));

        g.nodes.truncate(g.nodes.len() - 1);
        let (rewritten, report) = optimize_checked(&g, 0.0);
        assert_eq!(
            kernels(&rewritten),
            vec!["moe_router_linear"],
            "{rewritten}"
        );
        let outputs: Vec<ValueId> = rewritten.outputs.iter().map(|(_, v)| *v).collect();
        assert_eq!(outputs[0].node, outputs[1].node);
        assert_eq!((outputs[0].output, outputs[1].output), (0, 1));
        assert_eq!(report.applied["router-linear"], 1);
        assert_eq!(report.after.launches, 1);
        // The fused node keeps the router's label.
        assert_eq!(rewritten.nodes[outputs[0].node].label, "router");
    }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

#[test]
fn unmasked_attention_is_found_in_an_exported_graph() {
    // softmax(QKᵀ · s) · V without a mask, written by hand as an exporter would, for
    // q [B, S, H, D] and k, v [B, T, H, D].
    let (b, s, t, h, d) = (1, 3, 5, 2, 4);
    let mut g = Graph::new("exported");
    let q = act(&mut g, "q", DType::F32, &[b, s, h, d]);
    let k = act(&mut g, "k", DType::F32, &[b, t, h, d]);
    let v = act(&mut g, "v", DType::F32, &[b, t, h, d]);
    let heads_first = Op::Transpose {
        perm: vec![0, 2, 1, 3],
    };
    let qh = g.add1("qh", heads_first.clone(), &[q]).unwrap();
    let kh = g.add1("kh", heads_first.clone(), &[k]).unwrap();
    let vh = g.add1("vh", heads_first.clone(), &[v]).unwrap();
    let kt = g
        .add1(
            "kt",
            Op::Transpose {
                perm: vec![0, 1, 3, 2],
            },
            &[kh],
        )
        .unwrap();
    let scores = g.add1("scores", Op::MatMul, &[qh, kt]).unwrap();
    let scale = g.constant("scale", 0.5, DType::F32).unwrap();
    let scaled = g.add1("scaled", Op::Mul, &[scale, scores]).unwrap();
    let p = g.add1("p", Op::Softmax, &[scaled]).unwrap();
    let o = g.add1("o", Op::MatMul, &[p, vh]).unwrap();
    let out = g.add1("out", heads_first, &[o]).unwrap();
    g.output("out", out);
    let (rewritten, _) = optimize_checked(&g, 1e-5);
    assert_eq!(kernels(&rewritten), vec!["attention"]);
    assert!(rewritten.nodes.iter().any(|n| n.op
        == Op::Attention {
            causal: false,
            scale: 0.5
        }));
}

// ---------------------------------------------------------------------------------------------
// Elementwise fusion
// ---------------------------------------------------------------------------------------------

#[test]
fn elementwise_chains_become_one_fused_map() {
    let mut g = Graph::new("chain");
    let x = act(&mut g, "x", DType::F32, &[4, 8]);
    let y = act(&mut g, "y", DType::F32, &[8]);
    let z = act(&mut g, "z", DType::F32, &[4, 1]);
    let half = g.constant("half", 0.5, DType::F32).unwrap();
    // (sigmoid(x) · y + z) · 0.5, then silu.
    let a = g.add1("a", Op::Sigmoid, &[x]).unwrap();
    let b = g.add1("b", Op::Mul, &[a, y]).unwrap();
    let c = g.add1("c", Op::Add, &[b, z]).unwrap();
    let d = g.add1("d", Op::Mul, &[c, half]).unwrap();
    let e = g.add1("e", Op::Silu, &[d]).unwrap();
    g.output("e", e);
    let (rewritten, report) = optimize_checked(&g, 0.0);
    assert_eq!(kernels(&rewritten), vec!["fused_map"], "{rewritten}");
    let map = rewritten
        .nodes
        .iter()
        .find(|n| n.op.name() == "fused_map")
        .unwrap();
    let Op::FusedMap { steps } = &map.op else {
        unreachable!()
    };
    use MapStep::*;
    assert_eq!(
        steps,
        &vec![
            Operand { index: 0 },
            Sigmoid { x: 0 },
            Operand { index: 1 },
            Mul { a: 1, b: 2 },
            Operand { index: 2 },
            Add { a: 3, b: 4 },
            Constant { value: 0.5 },
            Mul { a: 5, b: 6 },
            Silu { x: 7 },
        ]
    );
    assert!(report.applied["fuse-elementwise"] >= 4);
}

#[test]
fn a_shared_intermediate_is_not_recomputed_when_that_costs_more() {
    // `b` is an output and feeds the rest of the chain: fusing through it would read x and y
    // again to recompute it. On big tensors that costs more than reading b once.
    let mut g = Graph::new("shared");
    let x = act(&mut g, "x", DType::F32, &[1024, 1024]);
    let y = act(&mut g, "y", DType::F32, &[1024, 1024]);
    let b = g.add1("b", Op::Mul, &[x, y]).unwrap();
    let c = g.add1("c", Op::Silu, &[b]).unwrap();
    g.output("b", b);
    g.output("c", c);
    let (rewritten, _) = optimize(&g, &RewriteOptions::default()).unwrap();
    assert_eq!(kernels(&rewritten), vec!["mul", "silu"], "{rewritten}");
}

// ---------------------------------------------------------------------------------------------
// Framework: type agreement, counts
// ---------------------------------------------------------------------------------------------

/// A wrong rule: says `a + b` equals `a` even when `b` broadcasts `a` to a larger shape.
fn drop_the_addend(egraph: &mut EGraph, class: egg::Id, node: &ENode) -> Found {
    use egg::Language;
    vec![(class, egraph.find(node.children()[0]))]
}

#[test]
fn a_rule_that_merges_different_types_is_reported() {
    let mut g = Graph::new("broadcast");
    let x = act(&mut g, "x", DType::F32, &[4]);
    let m = act(&mut g, "m", DType::F32, &[3, 4]);
    let sum = g.add1("sum", Op::Add, &[x, m]).unwrap();
    g.output("sum", sum);
    let converted = convert::to_egraph(&g).unwrap();
    let stage = Stage::new("wrong", &[]);
    let wrong = vec![rules::rule("drop-the-addend", &["add"], drop_the_addend)];
    let (egraph, _) = run_stage(converted.egraph, &stage, &wrong);
    let problem = &egraph.analysis.problems[0];
    assert!(problem.contains("drop-the-addend"), "{problem}");
    assert!(
        problem.contains("f32[3, 4]") && problem.contains("f32[4]"),
        "{problem}"
    );
    // Merging directly (bypassing the rule check) is caught by the analysis' merge.
    let mut converted = convert::to_egraph(&g).unwrap();
    let (x_class, sum_class) = (converted.inputs[0], converted.outputs[0].1);
    converted.egraph.union(x_class, sum_class);
    converted.egraph.rebuild();
    let problem = &converted.egraph.analysis.problems[0];
    assert!(problem.contains("disagree"), "{problem}");
    assert!(
        problem.contains("(f32[4])") && problem.contains("(f32[3, 4])"),
        "{problem}"
    );
}

#[test]
fn an_invalid_graph_is_refused() {
    let mut g = Graph::new("bad");
    let x = act(&mut g, "x", DType::F32, &[4]);
    g.output("x", x);
    g.nodes[0].outputs[0].dtype = DType::F16;
    let err = optimize(&g, &RewriteOptions::default()).unwrap_err();
    assert!(matches!(err, RewriteError::InvalidInput(_)), "{err}");
}
