//! Rule tests of `ir::rewrite` on the model builder's graphs: SwiGLU and attention (from the
//! decomposed form) are found in real decoder layers, every rule is counted in the report, and
//! disabled rules do not run. The rule tests on hand-built graphs are `ir/tests/rewrite_rules.rs`.

use kiln_ir::dtype::DType;
use kiln_ir::graph::Graph;
use kiln_ir::interp;
use kiln_ir::op::Op;
use kiln_ir::rewrite::rules::RuleSet;
use kiln_ir::rewrite::{optimize, RewriteOptions};
use kiln_ir::tensor::Tensor;
use kiln_models::{build_layer, build_layer_with, BuildOptions, ModelConfig, Phase};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeSet, HashMap};

/// Op names of the kernel-like nodes (not inputs, constants, reshapes), in order.
fn kernels(graph: &Graph) -> Vec<&'static str> {
    graph
        .nodes
        .iter()
        .map(|n| n.op.name())
        .filter(|n| !["input", "constant", "reshape"].contains(n))
        .collect()
}

#[test]
fn swiglu_is_found_in_builder_graphs() {
    for (name, phase) in [
        ("tiny-llama", Phase::Decode),
        ("tiny-llama", Phase::Prefill),
        ("llama-3-8b", Phase::Decode),
    ] {
        let config = ModelConfig::preset(name).unwrap();
        let layer = build_layer(&config, 0, phase).unwrap();
        assert_eq!(kernels(&layer).iter().filter(|&&k| k == "silu").count(), 1);
        let (rewritten, report) = optimize(&layer, &RewriteOptions::default()).unwrap();
        rewritten.verify().unwrap();
        assert_eq!(report.applied["swiglu"], 1, "{name}: {report}");
        let fused: Vec<_> = rewritten
            .nodes
            .iter()
            .filter(|n| n.op == Op::SwiGluLinear)
            .collect();
        assert_eq!(fused.len(), 1, "{name}");
        // Its weight is [gate; up], concatenated from the two checkpoint tensors.
        let stacked = &rewritten.nodes[fused[0].inputs[1].node];
        assert_eq!(stacked.op, Op::Concat { axis: 0 });
        let weight_names: Vec<&str> = stacked
            .inputs
            .iter()
            .map(|v| match &rewritten.nodes[v.node].op {
                Op::Input { name, .. } => name.as_str(),
                op => panic!("{op:?}"),
            })
            .collect();
        assert_eq!(
            weight_names,
            vec![
                "model.layers.0.mlp.gate_proj.weight",
                "model.layers.0.mlp.up_proj.weight"
            ]
        );
        for gone in ["silu", "mul"] {
            assert!(!kernels(&rewritten).contains(&gone), "{name}: {gone} left");
        }
        // The concatenation depends only on weights: done at load time, not per call.
        assert_eq!(report.after.load_time, 1);
    }
    // And the rewritten tiny layer computes what the builder's does.
    let config = ModelConfig::preset("tiny-llama").unwrap();
    let layer = build_layer(&config, 1, Phase::Prefill).unwrap();
    let (rewritten, _) = optimize(&layer, &RewriteOptions::default()).unwrap();
    let mut feed = HashMap::new();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (b, s, ctx) = (2, 3, 4);
    for (_, name, _, ty) in layer.inputs() {
        let dims: Vec<usize> = ty
            .shape
            .dims()
            .iter()
            .map(|d| match d.as_const() {
                Some(n) => n,
                None => match d.to_string().as_str() {
                    "batch" => b,
                    "seq" => s,
                    _ => ctx,
                },
            })
            .collect();
        let t = match ty.dtype {
            DType::I32 if name == "positions" => Tensor::i32(&dims, &[0, 1, 2, 0, 1, 2]),
            DType::I32 => Tensor::i32(&dims, &vec![0; dims.iter().product()]),
            dtype => Tensor::normal(dtype, &dims, 0.3, &mut rng),
        };
        feed.insert(name.to_string(), t);
    }
    let want = interp::run(&layer, &feed).unwrap();
    let got = interp::run(&rewritten, &feed).unwrap();
    for (name, t) in &want {
        assert!(got[name].relative_error(t) < 1e-5, "{name}");
    }
}

#[test]
fn attention_is_found_in_the_decomposed_builder_layer() {
    let options = BuildOptions {
        decompose_attention: true,
    };
    // tiny-llama is grouped-query (8 query heads over 2 KV heads: the K/V repeat is part of
    // the pattern); llama-2-7b is multi-head (no repeat).
    for name in ["tiny-llama", "llama-2-7b"] {
        let config = ModelConfig::preset(name).unwrap();
        for phase in [Phase::Prefill, Phase::Decode] {
            let layer = build_layer_with(&config, 0, phase, &options).unwrap();
            let decomposed = kernels(&layer);
            assert!(decomposed.contains(&"softmax") && decomposed.contains(&"causal_mask"));
            let (rewritten, report) = optimize(&layer, &RewriteOptions::default()).unwrap();
            rewritten.verify().unwrap();
            let scale = 1.0 / (config.head_dim as f32).sqrt();
            let expected = match phase {
                Phase::Prefill => Op::Attention {
                    causal: true,
                    scale,
                },
                Phase::Decode => Op::AttentionDecode { scale },
            };
            let found: Vec<_> = rewritten
                .nodes
                .iter()
                .filter(|n| n.op == expected)
                .collect();
            assert_eq!(found.len(), 1, "{name} {}: {rewritten}", phase.name());
            // It reads the rotated q and k (prefill) or the appended caches (decode), and the
            // same nodes as the builder's own attention op would.
            let plain = build_layer(&config, 0, phase).unwrap();
            let reference = plain.nodes.iter().find(|n| n.op == expected).unwrap();
            let producer_labels = |graph: &Graph, node: &kiln_ir::graph::Node| -> Vec<String> {
                node.inputs
                    .iter()
                    .map(|v| graph.nodes[v.node].label.clone())
                    .collect()
            };
            assert_eq!(
                producer_labels(&rewritten, found[0]),
                producer_labels(&plain, reference)
            );
            assert_eq!(report.applied["attention"], 1);
            assert!(report.applied["transpose-transpose"] >= 1);
            for gone in ["softmax", "matmul", "causal_mask", "transpose"] {
                assert!(!kernels(&rewritten).contains(&gone), "{name}: {gone} left");
            }
            // The rewritten decomposed layer is the builder's plain layer, op for op.
            assert_eq!(
                kernels(&rewritten),
                kernels(&optimize(&plain, &RewriteOptions::default()).unwrap().0)
            );
        }
    }
}

#[test]
fn every_rule_is_counted_in_the_report() {
    let config = ModelConfig::preset("tiny-llama").unwrap();
    let layer = build_layer(&config, 0, Phase::Decode).unwrap();
    let (_, report) = optimize(&layer, &RewriteOptions::default()).unwrap();
    let mut names: BTreeSet<String> = BTreeSet::new();
    for set in [RuleSet::Simplify, RuleSet::Patterns, RuleSet::Elementwise] {
        names.extend(set.rule_names());
    }
    assert_eq!(
        report.applied.keys().cloned().collect::<BTreeSet<_>>(),
        names
    );
    for (stage, config) in report.stages.iter().zip(RewriteOptions::default().stages) {
        let expected: BTreeSet<String> = config
            .rule_sets
            .iter()
            .flat_map(|s| s.rule_names())
            .collect();
        assert_eq!(
            stage.applied.keys().cloned().collect::<BTreeSet<_>>(),
            expected
        );
    }
    assert_eq!(report.applied["swiglu"], 1);
    assert_eq!(report.applied["linear-add"], 2);
    let text = report.to_string();
    assert!(text.contains("swiglu: 1"), "{text}");
}

#[test]
fn disabled_rules_do_not_run() {
    let config = ModelConfig::preset("tiny-llama").unwrap();
    let layer = build_layer(&config, 0, Phase::Decode).unwrap();
    let mut options = RewriteOptions::default();
    options.disabled_rules.insert("swiglu".to_string());
    let (rewritten, report) = optimize(&layer, &options).unwrap();
    assert!(!report.applied.contains_key("swiglu"));
    assert!(!kernels(&rewritten).contains(&"swiglu_linear"));
    // Without SwiGLU, silu · up is still one fused map.
    assert!(kernels(&rewritten).contains(&"fused_map"), "{rewritten}");
}
