//! `kiln inspect`: what a model is and what it costs per token.
//!
//! Builds the model's prefill and decode graphs and reports layers, parameters, weight bytes
//! and per-op FLOPs and bytes per token, from `kiln_ir::cost`. It reports; it must not
//! compile or run anything.

use anyhow::Result;
use kiln_ir::cost::{op_costs, parameter_count, OpCost, ParameterCount};
use kiln_ir::shape::Bindings;
use kiln_models::{build_model, ModelConfig, Phase};
use serde::Serialize;
use std::fmt::Write;

/// The shape of the workload the per-token figures are computed for.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Workload {
    pub batch: usize,
    /// Prompt length of the prefill figures.
    pub prompt_len: usize,
    /// Tokens already in the KV cache for the decode figures.
    pub context: usize,
}

/// Per-token costs of one phase.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    pub phase: Phase,
    /// Tokens processed by one call of the phase's graph.
    pub tokens_per_call: usize,
    pub kernel_nodes: usize,
    /// Per op kind, FLOPs and bytes divided by `tokens_per_call`.
    pub per_token: Vec<OpCost>,
    pub total_flops_per_token: f64,
    pub total_bytes_per_token: f64,
}

/// Everything `kiln inspect` prints.
#[derive(Clone, Debug, Serialize)]
pub struct ModelReport {
    pub config: ModelConfig,
    pub moe_layers: usize,
    pub parameters: ParameterCount,
    pub workload: Workload,
    pub phases: Vec<PhaseReport>,
}

/// Builds the report of `config` for `workload`.
pub fn inspect(config: &ModelConfig, workload: Workload) -> Result<ModelReport> {
    let mut phases = Vec::new();
    let mut parameters = None;
    for phase in [Phase::Prefill, Phase::Decode] {
        let graph = build_model(config, phase)?;
        if parameters.is_none() {
            parameters = Some(parameter_count(&graph)?);
        }
        let (seq, ctx) = match phase {
            Phase::Prefill => (workload.prompt_len, workload.prompt_len),
            Phase::Decode => (1, workload.context + 1),
        };
        let bindings =
            Bindings::from_pairs(&[("batch", workload.batch), ("seq", seq), ("ctx", ctx)]);
        let tokens = workload.batch * seq;
        let mut per_token = op_costs(&graph, &bindings)?;
        for cost in &mut per_token {
            cost.flops /= tokens as f64;
            cost.bytes /= tokens as f64;
        }
        phases.push(PhaseReport {
            phase,
            tokens_per_call: tokens,
            kernel_nodes: per_token.iter().map(|c| c.count).sum(),
            total_flops_per_token: per_token.iter().map(|c| c.flops).sum(),
            total_bytes_per_token: per_token.iter().map(|c| c.bytes).sum(),
            per_token,
        });
    }
    Ok(ModelReport {
        moe_layers: (0..config.num_layers)
            .filter(|&l| config.is_moe_layer(l))
            .count(),
        config: config.clone(),
        parameters: parameters.expect("two phases were built"),
        workload,
        phases,
    })
}

fn si(value: f64, unit: &str) -> String {
    let (scaled, prefix) = if value >= 1e12 {
        (value / 1e12, "T")
    } else if value >= 1e9 {
        (value / 1e9, "G")
    } else if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e3 {
        (value / 1e3, "k")
    } else {
        (value, "")
    };
    format!("{scaled:.2} {prefix}{unit}")
}

/// The report as a human-readable table.
pub fn render(report: &ModelReport) -> String {
    let c = &report.config;
    let p = &report.parameters;
    let mut out = String::new();
    let _ = writeln!(out, "model        {} ({})", c.name, c.architecture);
    let _ = writeln!(
        out,
        "layers       {} ({} MoE)",
        c.num_layers, report.moe_layers
    );
    let _ = writeln!(
        out,
        "attention    {} heads, {} KV heads, head_dim {} (GQA group {})",
        c.num_attention_heads,
        c.num_kv_heads,
        c.head_dim,
        c.kv_group_size()
    );
    let _ = writeln!(
        out,
        "hidden       {}, MLP {}, vocab {}",
        c.hidden_size, c.intermediate_size, c.vocab_size
    );
    if let Some(moe) = &c.moe {
        let _ = writeln!(
            out,
            "experts      {} routed, top-{}, width {}{}",
            moe.num_experts,
            moe.top_k,
            moe.expert_intermediate_size,
            moe.shared_expert_intermediate_size
                .map_or(String::new(), |w| format!(", shared expert width {w}"))
        );
    }
    let _ = writeln!(
        out,
        "parameters   {:.2} B ({:.2} B active per token)",
        p.total as f64 / 1e9,
        p.active_per_token as f64 / 1e9
    );
    let _ = writeln!(
        out,
        "weights      {} ({})",
        si(p.bytes as f64, "B"),
        c.dtype
    );
    let w = &report.workload;
    for phase in &report.phases {
        let shape = match phase.phase {
            Phase::Prefill => format!("batch {}, prompt {}", w.batch, w.prompt_len),
            Phase::Decode => format!("batch {}, context {}", w.batch, w.context),
        };
        let _ = writeln!(out, "\n{} ({shape}), per token:", phase.phase.name());
        let _ = writeln!(
            out,
            "  {:<18} {:>7} {:>14} {:>14}",
            "op", "nodes", "FLOP", "bytes"
        );
        for cost in &phase.per_token {
            let _ = writeln!(
                out,
                "  {:<18} {:>7} {:>14} {:>14}",
                cost.op,
                cost.count,
                si(cost.flops, ""),
                si(cost.bytes, "B")
            );
        }
        let _ = writeln!(
            out,
            "  {:<18} {:>7} {:>14} {:>14}",
            "total",
            phase.kernel_nodes,
            si(phase.total_flops_per_token, ""),
            si(phase.total_bytes_per_token, "B")
        );
    }
    out
}
