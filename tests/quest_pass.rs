//! The Quest pass through `kiln::compile` and `kiln::plan_runner`: the plan records the pass
//! first in `passes_run` with its options, the report lists it, prefill plans are unchanged,
//! and CPU generation through the compiled plans with Quest gives the dense tokens when the
//! budget covers the cache (dense fallback) and runs, selecting pages, when it does not.

use kiln::compiler::{compile, CompileOptions};
use kiln::generate::{generate, GenerateOptions};
use kiln::ir::op::Op;
use kiln::ir::quest::QuestOptions;
use kiln::model_source::load_weights;
use kiln::models::{build_model, ModelConfig, Phase};
use kiln::plan_runner::{PlanRunner, RunDevice};

fn options(quest: Option<QuestOptions>) -> CompileOptions {
    CompileOptions {
        quest,
        ..CompileOptions::default()
    }
}

fn quest(budget_tokens: usize, page_size: usize, skip_layers: usize) -> Option<QuestOptions> {
    Some(QuestOptions {
        budget_tokens,
        page_size,
        skip_layers,
    })
}

#[test]
fn the_plan_records_the_quest_pass_and_its_options() {
    let config = ModelConfig::preset("tiny-llama").unwrap();
    let model = compile(&config, Phase::Decode, &options(quest(64, 16, 1))).unwrap();
    let names: Vec<&str> = model
        .plan
        .passes_run
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["quest", "plan_memory"]);
    assert_eq!(
        model.plan.passes_run[0].options,
        serde_json::json!({"budget": 64, "page_size": 16, "skip_layers": 1})
    );
    let quest_nodes = model
        .plan
        .kernels
        .iter()
        .filter(|k| matches!(k.computes.op, Op::QuestAttentionDecode { .. }))
        .count();
    assert_eq!(quest_nodes, 1);
    assert_eq!(model.quest.as_ref().unwrap().changed, 1);
    // The Quest node is a kernel of the plan, of the attention family (tiny-llama is f32,
    // which the GPU generators do not take, so it runs on its CPU step).
    assert!(model.plan.kernels.iter().any(|k| k
        .family
        .describe()
        .starts_with("attention quest budget=64 page=16")));
    let report = &model.report;
    assert!(
        report.contains("passes run:\n  quest\n  plan_memory\n"),
        "{report}"
    );
    assert!(
        report.contains("quest pass (budget 64 tokens, page size 16, skip layers 1):\n  1 of 2 decode attention nodes use Quest"),
        "{report}"
    );
    assert!(
        report.contains("  dense layers: 0 (skip_layers 1)\n"),
        "{report}"
    );
}

#[test]
fn without_quest_nothing_changes_and_prefill_stays_dense() {
    let config = ModelConfig::preset("tiny-llama").unwrap();
    let dense = compile(&config, Phase::Decode, &CompileOptions::default()).unwrap();
    assert!(dense.quest.is_none());
    assert!(!dense.report.contains("quest"), "{}", dense.report);
    let prefill = compile(&config, Phase::Prefill, &CompileOptions::default()).unwrap();
    let prefill_quest = compile(&config, Phase::Prefill, &options(quest(64, 16, 0))).unwrap();
    // The kernels carry their ops (`computes`), so equal kernels mean equal graphs.
    assert_eq!(prefill_quest.plan.kernels, prefill.plan.kernels);
    assert_eq!(prefill_quest.quest.as_ref().unwrap().changed, 0);
    assert_eq!(prefill_quest.plan.passes_run[0].name, "quest");
}

#[test]
fn bad_quest_options_are_rejected_by_compile() {
    let config = ModelConfig::preset("tiny-llama").unwrap();
    let error = compile(&config, Phase::Decode, &options(quest(40, 16, 2))).unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("budget_tokens") && message.contains("multiple"),
        "{message}"
    );
}

/// Greedy generation on the CPU through the compiled plans, with `quest`.
fn generate_on_cpu(quest: Option<QuestOptions>, new_tokens: usize) -> (Vec<i32>, PlanRunner) {
    let config = ModelConfig::preset("tiny-llama").unwrap();
    let graph = build_model(&config, Phase::Prefill).unwrap();
    let weights = load_weights(&graph, None, 5).unwrap();
    let options = GenerateOptions {
        prompt: vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3],
        new_tokens,
        keep_logits: false,
        ..Default::default()
    };
    let capacity = options.prompt.len() + new_tokens;
    let mut runner = PlanRunner::new(
        &config,
        &weights,
        RunDevice::Cpu,
        0,
        options.prompt.len(),
        capacity,
        quest,
    )
    .unwrap();
    let generation = generate(&config, &options, |p, s| runner.step(p, s), |_| {}).unwrap();
    (generation.tokens, runner)
}

#[test]
fn cpu_generation_with_a_covering_budget_gives_the_dense_tokens() {
    // A 22-token cache in pages of 4 never exceeds the 8-page budget: dense fallback.
    let (dense, runner) = generate_on_cpu(None, 12);
    assert!(runner.quest_kernels.is_none());
    let (sparse, runner) = generate_on_cpu(quest(32, 4, 0), 12);
    assert_eq!(runner.quest_kernels.unwrap(), 2);
    assert_eq!(sparse, dense);
}

#[test]
fn cpu_generation_with_a_small_budget_runs() {
    // Up to 26 tokens in pages of 4 against a 2-page budget: layer 1 attends to at most 8.
    let (tokens, runner) = generate_on_cpu(quest(8, 4, 1), 16);
    assert_eq!(runner.quest_kernels.unwrap(), 1);
    assert_eq!(tokens.len(), 16);
    assert!(tokens.iter().all(|&t| (0..512).contains(&t)), "{tokens:?}");
}
