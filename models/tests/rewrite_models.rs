//! Whole-model tests of `ir::rewrite`: the rewritten graphs of the preset models verify and,
//! on the tiny presets with random weights, compute the same outputs as the originals under
//! `ir::interp`; every MoE router takes its linear fused; the builder's typed layers survive
//! rewriting and scheduling; rewriting is deterministic; kernel counts on llama-3-8b decode
//! and the time to optimise mixtral-8x7b decode are printed (run with `--nocapture`).

use kiln_ir::dtype::DType;
use kiln_ir::graph::Graph;
use kiln_ir::interp;
use kiln_ir::op::Op;
use kiln_ir::rewrite::rules::fusion::FUSED_ROUTER_MAX_WEIGHT;
use kiln_ir::rewrite::{kernel_like_nodes, optimize, RewriteOptions, StageStop};
use kiln_ir::schedule::{schedule, ScheduleOptions};
use kiln_ir::tensor::Tensor;
use kiln_models::weights::{Weights, WeightsIo};
use kiln_models::{
    build_layer, build_layer_with, build_model, build_model_with, BuildOptions, ModelConfig, Phase,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

const BATCH: usize = 2;
const CTX: usize = 8;
const PROMPT: usize = 5;

/// Random weights for `graph` and per-call inputs for one step of `phase`: a prompt of
/// `PROMPT` tokens, or one token after caches holding 3 and 5 tokens.
fn inputs(graph: &Graph, config: &ModelConfig, phase: Phase, seed: u64) -> HashMap<String, Tensor> {
    let expected: Vec<_> = graph
        .weights()
        .map(|(name, ty)| (name.to_string(), ty.clone()))
        .collect();
    let mut feed = Weights::random(&expected, seed).unwrap().into_map();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    let (seq, start) = match phase {
        Phase::Prefill => (PROMPT, [0, 0]),
        Phase::Decode => (1, [3, 5]),
    };
    let ids: Vec<i32> = (0..BATCH * seq)
        .map(|_| rng.random_range(0..config.vocab_size as i32))
        .collect();
    let positions: Vec<i32> = (0..BATCH)
        .flat_map(|b| (0..seq).map(move |i| start[b] + i as i32))
        .collect();
    feed.insert("input_ids".into(), Tensor::i32(&[BATCH, seq], &ids));
    feed.insert("positions".into(), Tensor::i32(&[BATCH, seq], &positions));
    feed.insert("cache_start".into(), Tensor::i32(&[BATCH], &start));
    let cache_shape = [BATCH, CTX, config.num_kv_heads, config.head_dim];
    for (_, name, kind, _) in graph.inputs() {
        if kind == kiln_ir::op::InputKind::State {
            let mut cache = Tensor::normal(DType::F32, &cache_shape, 1.0, &mut rng);
            // Rows at and past each sequence's start are not written yet.
            let row = config.num_kv_heads * config.head_dim;
            for (b, &s) in start.iter().enumerate() {
                for r in s as usize..CTX {
                    let base = (b * CTX + r) * row;
                    cache.data[base..base + row].fill(0.0);
                }
            }
            feed.insert(name.to_string(), cache);
        }
    }
    feed
}

fn run(graph: &Graph, feed: &HashMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    interp::run(graph, feed).unwrap_or_else(|e| panic!("{}: {e}", graph.name))
}

#[track_caller]
fn assert_same_outputs(
    what: &str,
    got: &BTreeMap<String, Tensor>,
    want: &BTreeMap<String, Tensor>,
) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: output names"
    );
    for (name, reference) in want {
        let error = got[name].relative_error(reference);
        assert!(
            error <= 1e-4,
            "{what}: output `{name}` has relative error {error:.3e}"
        );
    }
}

fn count(graph: &Graph, name: &str) -> usize {
    graph.nodes.iter().filter(|n| n.op.name() == name).count()
}

/// The strongest test: every tiny preset, both phases, with the builder's attention ops and
/// with attention decomposed into plain ops, gives the same outputs after rewriting.
#[test]
fn tiny_models_compute_the_same_outputs_after_rewriting() {
    for preset in ["tiny-llama", "tiny-mixtral"] {
        let config = ModelConfig::preset(preset).unwrap();
        assert_eq!(
            config.dtype,
            DType::F32,
            "{preset}: the tiny presets are f32"
        );
        for phase in [Phase::Prefill, Phase::Decode] {
            let plain = build_model(&config, phase).unwrap();
            let feed = inputs(&plain, &config, phase, 7);
            let reference = run(&plain, &feed);
            for decompose in [false, true] {
                let options = BuildOptions {
                    decompose_attention: decompose,
                };
                let graph = build_model_with(&config, phase, &options).unwrap();
                let what = format!("{preset} {} decomposed={decompose}", phase.name());
                let (rewritten, report) = optimize(&graph, &RewriteOptions::default())
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                rewritten.verify().unwrap();
                assert!(!report.hit_limit(), "{what}: {report}");
                assert_eq!(rewritten.outputs.len(), graph.outputs.len());
                assert_eq!(
                    rewritten
                        .inputs()
                        .map(|i| i.1)
                        .collect::<std::collections::BTreeSet<_>>(),
                    graph.inputs().map(|i| i.1).collect(),
                    "{what}: the inputs are kept"
                );
                let got = run(&rewritten, &feed);
                // Against the decomposed graph itself and against the builder's plain form.
                assert_same_outputs(&what, &got, &run(&graph, &feed));
                assert_same_outputs(&what, &got, &reference);
                // Attention is recovered; SwiGLU is found in the dense models.
                let attention =
                    count(&rewritten, "attention") + count(&rewritten, "attention_decode");
                assert_eq!(attention, config.num_layers, "{what}:\n{rewritten}");
                assert_eq!(count(&rewritten, "softmax"), 0, "{what}");
                if !config.architecture.is_moe() {
                    assert_eq!(
                        count(&rewritten, "swiglu_linear"),
                        config.num_layers,
                        "{what}"
                    );
                }
                assert!(
                    report.after.launches < report.before.launches,
                    "{what}: {report}"
                );
            }
        }
    }
}

/// The decoder layer a builder label names (`model.layers.{i}.…`): the test's check of the
/// typed `layer` against the labels (the code under test never parses labels).
fn label_layer(label: &str) -> Option<usize> {
    let rest = label.strip_prefix("model.layers.")?;
    rest.split_once('.')?.0.parse().ok()
}

/// The builder's typed layers are carried through rewriting (nodes the rules create take the
/// layer of the node that reads them, as they take its label) and recorded on the kernels.
#[test]
fn layers_survive_rewriting_and_scheduling() {
    for preset in ["tiny-llama", "tiny-mixtral"] {
        let config = ModelConfig::preset(preset).unwrap();
        let layers: Vec<Option<usize>> = (0..config.num_layers).map(Some).collect();
        for phase in [Phase::Prefill, Phase::Decode] {
            for decompose in [false, true] {
                let what = format!("{preset} {} decomposed={decompose}", phase.name());
                let options = BuildOptions {
                    decompose_attention: decompose,
                };
                let graph = build_model_with(&config, phase, &options).unwrap();
                let (rewritten, _) = optimize(&graph, &RewriteOptions::default()).unwrap();
                for node in &rewritten.nodes {
                    assert_eq!(
                        node.layer,
                        label_layer(&node.label),
                        "{what}: `{}`",
                        node.label
                    );
                }
                let attention: Vec<Option<usize>> = rewritten
                    .nodes
                    .iter()
                    .filter(|n| matches!(n.op, Op::Attention { .. } | Op::AttentionDecode { .. }))
                    .map(|n| n.layer)
                    .collect();
                assert_eq!(attention, layers, "{what}");
                let plan = schedule(&rewritten, &ScheduleOptions::default()).unwrap();
                for kernel in &plan.kernels {
                    let node = &rewritten.nodes[kernel.graph_nodes[0]];
                    assert_eq!(kernel.layer, node.layer, "{what}: {}", kernel.name);
                }
                let scheduled: BTreeSet<Option<usize>> =
                    plan.kernels.iter().map(|k| k.layer).collect();
                let mut expected: BTreeSet<Option<usize>> = layers.iter().copied().collect();
                expected.insert(None);
                assert_eq!(scheduled, expected, "{what}");
            }
        }
    }
}

#[test]
fn every_preset_rewrites_to_a_verified_graph() {
    for name in ModelConfig::preset_names() {
        let config = ModelConfig::preset(name).unwrap();
        for phase in [Phase::Prefill, Phase::Decode] {
            let graph = build_model(&config, phase).unwrap();
            let (rewritten, report) = optimize(&graph, &RewriteOptions::default())
                .unwrap_or_else(|e| panic!("{name} {}: {e}", phase.name()));
            rewritten.verify().unwrap();
            println!(
                "{name} {}: {} nodes, launches {} → {}, {:.1} ms",
                phase.name(),
                graph.nodes.len(),
                report.before.launches,
                report.after.launches,
                report.seconds * 1e3
            );
            assert!(!report.hit_limit(), "{name}: {report}");
            assert!(
                report.after.seconds <= report.before.seconds,
                "{name}: {report}"
            );
        }
    }
}

/// Every MoE preset whose router weight is small enough (`FUSED_ROUTER_MAX_WEIGHT`: tiny-mixtral,
/// Mixtral) reads its logits' linear through the fused `moe_router_linear`: one per MoE layer,
/// no plain router left, and no plain linear reading a router weight (`….gate.weight`,
/// `[experts, hidden]`). A larger router (Qwen3-30B-A3B's 128 × 2048) keeps its linear and
/// plain router.
#[test]
fn every_small_moe_router_takes_its_linear_fused() {
    for name in ModelConfig::preset_names() {
        let config = ModelConfig::preset(name).unwrap();
        let Some(moe) = &config.moe else { continue };
        let weight = (moe.num_experts * config.hidden_size) as u64;
        for phase in [Phase::Prefill, Phase::Decode] {
            if weight > FUSED_ROUTER_MAX_WEIGHT {
                let graph = build_model(&config, phase).unwrap();
                let routers = count(&graph, "moe_router");
                let (rewritten, report) = optimize(&graph, &RewriteOptions::default()).unwrap();
                assert_eq!(count(&rewritten, "moe_router"), routers, "{name}");
                assert_eq!(count(&rewritten, "moe_router_linear"), 0, "{name}");
                assert_eq!(
                    report.applied.get("router-linear").copied().unwrap_or(0),
                    0,
                    "{name}"
                );
                continue;
            }
            let what = format!("{name} {}", phase.name());
            let graph = build_model(&config, phase).unwrap();
            let routers = count(&graph, "moe_router");
            assert!(routers > 0, "{what}");
            let (rewritten, report) = optimize(&graph, &RewriteOptions::default()).unwrap();
            assert_eq!(count(&rewritten, "moe_router_linear"), routers, "{what}");
            assert_eq!(count(&rewritten, "moe_router"), 0, "{what}");
            assert_eq!(report.applied["router-linear"], routers, "{what}");
            for node in &rewritten.nodes {
                let reads_router_weight = node.inputs.iter().any(|v| {
                    matches!(
                        &rewritten.nodes[v.node].op,
                        Op::Input { name, shape, .. }
                            if name.ends_with(".gate.weight")
                                && shape.dims().first().and_then(|d| d.as_const())
                                    == Some(moe.num_experts)
                    )
                });
                if reads_router_weight {
                    assert!(
                        matches!(node.op, Op::MoeRouterLinear { .. }),
                        "{what}: `{}` ({}) reads a router weight",
                        node.label,
                        node.op.name()
                    );
                }
            }
        }
    }
}

#[test]
fn optimizing_twice_gives_identical_graphs() {
    for (name, decompose) in [
        ("tiny-mixtral", true),
        ("llama-3-8b", false),
        ("mixtral-8x7b", false),
    ] {
        let config = ModelConfig::preset(name).unwrap();
        let options = BuildOptions {
            decompose_attention: decompose,
        };
        let graph = build_model_with(&config, Phase::Decode, &options).unwrap();
        let (a, report_a) = optimize(&graph, &RewriteOptions::default()).unwrap();
        let (b, report_b) = optimize(&graph, &RewriteOptions::default()).unwrap();
        assert_eq!(a, b, "{name}");
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        assert_eq!(report_a.applied, report_b.applied, "{name}");
        assert_eq!(report_a.after, report_b.after, "{name}");
    }
}

/// Kernel-like nodes (everything but inputs, constants and reshapes) before and after
/// rewriting the llama-3-8b decode graph.
#[test]
fn llama_3_8b_decode_kernel_counts() {
    let config = ModelConfig::preset("llama-3-8b").unwrap();
    let graph = build_model(&config, Phase::Decode).unwrap();
    let started = Instant::now();
    let (rewritten, report) = optimize(&graph, &RewriteOptions::default()).unwrap();
    let elapsed = started.elapsed();
    let (before, after) = (kernel_like_nodes(&graph), kernel_like_nodes(&rewritten));
    println!("{report}");
    println!(
        "llama-3-8b decode: {before} kernel-like nodes before, {after} after \
         ({} of them weight concatenations done at load time); launches per step {} → {}; \
         {:.1} ms",
        report.after.load_time,
        report.before.launches,
        report.after.launches,
        elapsed.as_secs_f64() * 1e3
    );
    println!("ops before: {:?}", report.before.ops);
    println!("ops after:  {:?}", report.after.ops);
    assert_eq!(before, report.before.kernel_like);
    assert_eq!(after, report.after.kernel_like);
    assert!(report.after.launches < report.before.launches);
    let layers = config.num_layers;
    assert_eq!(count(&rewritten, "swiglu_linear"), layers);
    // o_proj and down_proj take their residual adds as epilogues.
    assert_eq!(count(&rewritten, "linear_add"), 2 * layers);
    assert_eq!(
        count(&rewritten, "add"),
        1,
        "only `lengths = cache_start + 1` stays"
    );
}

/// Optimising mixtral-8x7b's decode graph; its time is printed (measure with `--release`).
#[test]
fn mixtral_8x7b_decode_time() {
    let config = ModelConfig::preset("mixtral-8x7b").unwrap();
    let graph = build_model(&config, Phase::Decode).unwrap();
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..3 {
        let started = Instant::now();
        let result = optimize(&graph, &RewriteOptions::default()).unwrap();
        times.push(started.elapsed().as_secs_f64());
        last = Some(result);
    }
    let (rewritten, report) = last.unwrap();
    times.sort_by(f64::total_cmp);
    println!("{report}");
    println!(
        "mixtral-8x7b decode: optimize took {:.1} ms (median of 3; {} graph nodes, {} e-nodes); \
         kernel-like {} → {}, launches {} → {}",
        times[1] * 1e3,
        graph.nodes.len(),
        report.egraph_nodes,
        kernel_like_nodes(&graph),
        kernel_like_nodes(&rewritten),
        report.before.launches,
        report.after.launches
    );
    assert!(count(&rewritten, "add_rms_norm") >= config.num_layers);
}

#[test]
fn a_tiny_node_limit_stops_a_stage_and_says_so() {
    let config = ModelConfig::preset("tiny-llama").unwrap();
    let graph = build_model(&config, Phase::Decode).unwrap();
    let mut options = RewriteOptions::default();
    options.stages[1].limits.node_limit = 10;
    let (rewritten, report) = optimize(&graph, &options).unwrap();
    let stage = &report.stages[1];
    assert!(
        matches!(stage.stop, StageStop::NodeLimit { limit: 10, .. }),
        "{report}"
    );
    assert!(report.hit_limit());
    let text = report.to_string();
    assert!(
        text.contains("stage fuse-patterns: stopped by the node limit (10 e-nodes"),
        "{text}"
    );
    // The stage did nothing, so nothing it would have fused is there; the graph still verifies
    // and computes the same outputs.
    assert_eq!(stage.applied.values().sum::<usize>(), 0);
    assert_eq!(count(&rewritten, "swiglu_linear"), 0);
    let feed = inputs(&graph, &config, Phase::Decode, 3);
    assert_same_outputs("node limit", &run(&rewritten, &feed), &run(&graph, &feed));

    // An iteration limit of 1 lets the stage apply its rules once, then stops it.
    let mut options = RewriteOptions::default();
    options.stages[2].limits.iter_limit = 1;
    let (_, report) = optimize(&graph, &options).unwrap();
    assert_eq!(
        report.stages[2].stop,
        StageStop::IterationLimit { limit: 1 },
        "{report}"
    );
}

/// One layer of every preset (first and last layer; the whole tiny models are run above).
#[test]
fn attention_is_recovered_from_the_decomposed_builder_layer_of_every_preset() {
    for name in ModelConfig::preset_names() {
        let config = ModelConfig::preset(name).unwrap();
        for phase in [Phase::Prefill, Phase::Decode] {
            let options = BuildOptions {
                decompose_attention: true,
            };
            for layer in [0, config.num_layers - 1] {
                let graph = build_layer_with(&config, layer, phase, &options).unwrap();
                assert_eq!(
                    count(&graph, "attention") + count(&graph, "attention_decode"),
                    0
                );
                let (rewritten, report) = optimize(&graph, &RewriteOptions::default()).unwrap();
                let expected = match phase {
                    Phase::Prefill => "attention",
                    Phase::Decode => "attention_decode",
                };
                let what = format!("{name} {} layer {layer}", phase.name());
                assert_eq!(count(&rewritten, expected), 1, "{what}: {report}");
                for gone in ["softmax", "matmul", "causal_mask", "transpose"] {
                    assert_eq!(count(&rewritten, gone), 0, "{what}: {gone} left");
                }
                // SwiGLU's weight concatenation is the only concat left.
                assert_eq!(
                    count(&rewritten, "concat"),
                    count(&rewritten, "swiglu_linear"),
                    "{what}"
                );
                assert_eq!(report.applied["attention"], 1, "{what}");
                let plain = build_layer(&config, layer, phase).unwrap();
                let (plain_rewritten, _) = optimize(&plain, &RewriteOptions::default()).unwrap();
                assert_eq!(
                    kernel_like_nodes(&rewritten),
                    kernel_like_nodes(&plain_rewritten),
                    "{what}: the decomposed layer rewrites to the plain one"
                );
            }
        }
    }
}
