//! Tests of the Quest pass (`ir::passes::quest`) on the tiny-llama preset: which layers
//! become Quest, that the rewritten graph verifies, that a budget covering the context gives
//! the original outputs bit for bit (dense fallback) under `ir::interp`, that a small budget
//! changes them (it selects), that prefill is left alone, and that the layer the pass uses is
//! the one the builder records on every node (`Node::layer`), whatever the labels say. The
//! pass on hand-built graphs (with and without layers) is tested in `ir::passes::quest`.

use kiln_ir::dtype::DType;
use kiln_ir::graph::Graph;
use kiln_ir::interp;
use kiln_ir::op::{InputKind, Op};
use kiln_ir::passes::quest::{QuestPass, QuestPassError};
use kiln_ir::quest::QuestOptions;
use kiln_ir::rewrite::{optimize, RewriteOptions};
use kiln_ir::tensor::Tensor;
use kiln_models::weights::{Weights, WeightsIo};
use kiln_models::{build_model, ModelConfig, Phase};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

fn tiny_llama() -> ModelConfig {
    ModelConfig::preset("tiny-llama").unwrap()
}

fn quest(budget_tokens: usize, page_size: usize, skip_layers: usize) -> QuestPass {
    QuestPass::new(QuestOptions {
        budget_tokens,
        page_size,
        skip_layers,
    })
    .unwrap()
}

/// `(layer, is_quest)` of every decode attention node, from its typed layer.
fn attention_layers(graph: &Graph) -> Vec<(usize, bool)> {
    graph
        .nodes
        .iter()
        .filter_map(|n| {
            let quest = match n.op {
                Op::AttentionDecode { .. } => false,
                Op::QuestAttentionDecode { .. } => true,
                _ => return None,
            };
            Some((n.layer.expect("the builder sets the layer"), quest))
        })
        .collect()
}

/// Random weights and one decode step of two sequences whose caches (capacity `ctx`) hold
/// `start` tokens; rows from `start` on are zero (not written yet).
fn decode_inputs(
    graph: &Graph,
    config: &ModelConfig,
    ctx: usize,
    start: [i32; 2],
) -> HashMap<String, Tensor> {
    let expected: Vec<_> = graph
        .weights()
        .map(|(name, ty)| (name.to_string(), ty.clone()))
        .collect();
    let mut feed = Weights::random(&expected, 7).unwrap().into_map();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    feed.insert("input_ids".into(), Tensor::i32(&[2, 1], &[17, 301]));
    feed.insert("positions".into(), Tensor::i32(&[2, 1], &start));
    feed.insert("cache_start".into(), Tensor::i32(&[2], &start));
    let row = config.num_kv_heads * config.head_dim;
    for (_, name, kind, _) in graph.inputs() {
        if kind == InputKind::State {
            let mut cache = Tensor::normal(
                DType::F32,
                &[2, ctx, config.num_kv_heads, config.head_dim],
                1.0,
                &mut rng,
            );
            for (b, &s) in start.iter().enumerate() {
                let from = (b * ctx + s as usize) * row;
                cache.data[from..(b + 1) * ctx * row].fill(0.0);
            }
            feed.insert(name.to_string(), cache);
        }
    }
    feed
}

#[test]
fn layers_from_skip_layers_become_quest() {
    let config = tiny_llama();
    assert_eq!(config.num_layers, 2);
    let graph = build_model(&config, Phase::Decode).unwrap();
    assert_eq!(attention_layers(&graph), vec![(0, false), (1, false)]);
    for (skip, want, dense, quest_layers) in [
        (0, vec![(0, true), (1, true)], "none", "0, 1"),
        (1, vec![(0, false), (1, true)], "0", "1"),
        (2, vec![(0, false), (1, false)], "0, 1", "none"),
        (7, vec![(0, false), (1, false)], "0, 1", "none"),
    ] {
        let (rewritten, report) = quest(64, 16, skip).run(&graph).unwrap();
        rewritten.verify().unwrap();
        assert_eq!(attention_layers(&rewritten), want, "skip_layers {skip}");
        assert_eq!(report.name, "quest");
        assert_eq!(report.changed, want.iter().filter(|(_, q)| *q).count());
        assert!(
            report.notes[0].starts_with(&format!(
                "{} of 2 decode attention nodes use Quest",
                report.changed
            )),
            "{:?}",
            report.notes
        );
        assert!(
            report
                .notes
                .contains(&format!("quest layers: {quest_layers}")),
            "{:?}",
            report.notes
        );
        assert!(
            report
                .notes
                .contains(&format!("dense layers: {dense} (skip_layers {skip})")),
            "{:?}",
            report.notes
        );
        // Only the attention ops changed; operands, results, labels and layers are the same.
        assert_eq!(rewritten.nodes.len(), graph.nodes.len());
        for (a, b) in rewritten.nodes.iter().zip(&graph.nodes) {
            assert_eq!(
                (&a.inputs, &a.outputs, &a.label, a.layer),
                (&b.inputs, &b.outputs, &b.label, b.layer)
            );
            if a.op != b.op {
                assert_eq!(
                    b.op,
                    Op::AttentionDecode {
                        scale: 1.0 / (32f32).sqrt()
                    }
                );
                assert_eq!(
                    a.op,
                    Op::QuestAttentionDecode {
                        scale: 1.0 / (32f32).sqrt(),
                        budget_tokens: 64,
                        page_size: 16
                    }
                );
            }
        }
    }
}

#[test]
fn the_rewritten_graph_keeps_its_layers_for_the_pass() {
    // compile runs the pass after rewrite::optimize: the attention nodes' layers survive it.
    let config = tiny_llama();
    let graph = build_model(&config, Phase::Decode).unwrap();
    let (optimized, _) = optimize(&graph, &RewriteOptions::default()).unwrap();
    let (rewritten, report) = quest(64, 16, 1).run(&optimized).unwrap();
    rewritten.verify().unwrap();
    assert_eq!(report.changed, 1);
    assert_eq!(attention_layers(&rewritten), vec![(0, false), (1, true)]);
}

#[test]
fn a_budget_covering_the_context_gives_the_dense_outputs_exactly() {
    // Caches of 16 rows, sequences of 4 and 12 tokens after the append: at most 4 pages of 4,
    // within a 16-token budget, so every Quest layer falls back to dense.
    let config = tiny_llama();
    let graph = build_model(&config, Phase::Decode).unwrap();
    let feed = decode_inputs(&graph, &config, 16, [3, 11]);
    let dense = interp::run(&graph, &feed).unwrap();
    for (budget, page) in [(16, 4), (32, 16), (64, 8)] {
        let (rewritten, _) = quest(budget, page, 0).run(&graph).unwrap();
        let sparse = interp::run(&rewritten, &feed).unwrap();
        assert_eq!(sparse, dense, "budget {budget}, page {page}");
    }
}

#[test]
fn a_small_budget_selects_pages() {
    // 30 and 21 tokens after the append, pages of 4, a budget of 2 pages: layer 1 attends to
    // 8 of them at most, so the logits move (and stay finite); layer 0 stays dense, so the
    // caches (appended before attention) are unchanged.
    let config = tiny_llama();
    let graph = build_model(&config, Phase::Decode).unwrap();
    let feed = decode_inputs(&graph, &config, 32, [29, 20]);
    let dense = interp::run(&graph, &feed).unwrap();
    let (rewritten, _) = quest(8, 4, 1).run(&graph).unwrap();
    let sparse = interp::run(&rewritten, &feed).unwrap();
    assert!(sparse["logits"].data.iter().all(|x| x.is_finite()));
    assert_ne!(sparse["logits"], dense["logits"]);
    for name in ["model.layers.0.k_cache", "model.layers.1.v_cache"] {
        assert_eq!(sparse[name], dense[name]);
    }
}

#[test]
fn prefill_stays_dense() {
    let config = tiny_llama();
    let graph = build_model(&config, Phase::Prefill).unwrap();
    let (rewritten, report) = quest(64, 16, 0).run(&graph).unwrap();
    assert_eq!(rewritten, graph);
    assert_eq!(report.changed, 0);
    assert!(
        report.notes[0].contains("prefill stays dense"),
        "{:?}",
        report.notes
    );
}

#[test]
fn the_layer_comes_from_the_builder_not_the_labels() {
    // Labels that say nothing about layers: the rewrite is the same, because the pass reads
    // the layer the builder recorded on each node.
    let config = tiny_llama();
    let graph = build_model(&config, Phase::Decode).unwrap();
    let mut anonymous = graph.clone();
    for (index, node) in anonymous.nodes.iter_mut().enumerate() {
        node.label = format!("n{index}");
    }
    let (expected, _) = quest(64, 16, 1).run(&graph).unwrap();
    let (rewritten, report) = quest(64, 16, 1).run(&anonymous).unwrap();
    assert_eq!(report.changed, 1);
    assert_eq!(attention_layers(&rewritten), vec![(0, false), (1, true)]);
    for (a, b) in expected.nodes.iter().zip(&rewritten.nodes) {
        assert_eq!((&a.op, a.layer), (&b.op, b.layer));
    }
    // Without the layers, the pass refuses rather than guess from labels or cache names.
    let mut unlayered = graph.clone();
    for node in &mut unlayered.nodes {
        node.layer = None;
    }
    let error = quest(64, 16, 1).run(&unlayered).unwrap_err();
    assert!(
        matches!(error, QuestPassError::UnknownLayer { ref label, .. }
            if label == "model.layers.0.self_attn.attention"),
        "{error}"
    );
}
