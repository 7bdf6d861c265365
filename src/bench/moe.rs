//! `kiln bench moe`: one mixture-of-experts layer as a compiled plan, timed inside the
//! executor that runs model plans, for `bench/torch_baselines.py --suite moe` to set beside a
//! naive PyTorch expert loop and a grouped (bmm) PyTorch reference.
//!
//! **The plan.** The MoE layer `kiln_models` builds (`builder.rs`, `fn moe`), without the
//! shared expert, as the rewriter leaves it ([`MoeLayer::plan`]; its `router-linear` rule
//! fuses the router's linear when the router weight is small, as Mixtral's is; Qwen3's keeps
//! `Linear` + `MoeRouter`): `x [tokens, hidden]` → `MoeRouterLinear { top_k, normalize }`
//! (router weight `[experts, hidden]`) → `MoeDispatch` → `MoeExpertFfn` (per expert `gate_e [I, H]`,
//! `up_e [I, H]`, `down_e [H, I]`) → `MoeCombine`, scheduled by
//! `kiln_ir::schedule` and run by `kiln_runtime::exec::Executor` with its kernels lowered by
//! `kiln_kernels`. The plan also outputs the router's `experts` tensor, so the bench knows
//! which experts each call read. Every step must be on the GPU: a step placed on the host
//! (no GPU generator for its family) is an error naming the step, never timed.
//!
//! **Shapes** ([`shapes`]), bf16: Mixtral 8x7B (8 experts, top-2, H = 4096, I = 14336,
//! renormalised) at 1, 4, 16, 64, 512 and 4096 tokens; Qwen3-30B-A3B (128 experts, top-8,
//! H = 2048, I = 768, renormalised) at 1 and 64 tokens.
//!
//! **The figure** is the layer's device time per call: the sum over the plan's steps (router
//! with its linear, dispatch, expert FFN, combine) of each step's CUDA-event time from the
//! executor's step profile, median and best over [`ITERATIONS`] calls after [`WARMUP`]. Each
//! stage's median is reported too. GB/s counts the weights of the distinct experts the call
//! chose (`distinct · 3 · H · I · dtype bytes`, [`expert_bytes`]) over the median time: what
//! an implementation that reads each chosen expert once must move.
//!
//! **L2.** No rotation: the same input is run every call, so the same experts are chosen.
//! The Mixtral layer's experts are 352 MiB each; a shape whose chosen experts weigh less than
//! [`L2_NOTE_BYTES`] (Qwen3 at one token: 8 × 9 MiB) gets a note that part of its weights may
//! be served from the L2 left by the call before.
//!
//! Values come from a cheap hash of the element index (magnitudes in `[1/64, 1)` scaled by
//! `1/√fan-in` for weights, random signs): never zero, never NaN, bf16 sums stay small. The
//! arena is poisoned before every call and the output must be finite. This module measures;
//! it asserts nothing about speed.

use super::SuiteReport;
use anyhow::{bail, ensure, Context, Result};
use kiln_ir::dtype::DType;
use kiln_ir::graph::Graph;
use kiln_ir::op::{InputKind, Op};
use kiln_ir::rewrite::{optimize, RewriteOptions};
use kiln_ir::schedule::{schedule, Device, Schedule, ScheduleOptions};
use kiln_ir::shape::Shape;
use kiln_ir::tensor::Tensor;
use kiln_ir::weights::Weights;
use kiln_runtime::cuda::{CudaDevice, Timing};
use kiln_runtime::exec::{DeviceWeights, Executor};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Untimed calls before the timed ones.
pub const WARMUP: usize = 10;
/// Timed calls.
pub const ITERATIONS: usize = 100;
/// A shape whose chosen experts weigh less than this gets a note about the L2 (the H100's
/// L2 is 50 MB; the other suites rotate through at least this much).
pub const L2_NOTE_BYTES: usize = 256 << 20;

/// Mixtral token counts.
pub const MIXTRAL_TOKENS: [usize; 6] = [1, 4, 16, 64, 512, 4096];
/// Qwen3-30B-A3B token counts.
pub const QWEN_TOKENS: [usize; 2] = [1, 64];

/// One MoE layer to time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeLayer {
    pub model: &'static str,
    pub dtype: DType,
    pub tokens: usize,
    pub experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub normalize: bool,
}

/// The shapes `kiln bench moe` times, in order.
pub fn shapes() -> Vec<MoeLayer> {
    let mixtral = MoeLayer {
        model: "mixtral",
        dtype: DType::BF16,
        tokens: 1,
        experts: 8,
        top_k: 2,
        hidden: 4096,
        intermediate: 14336,
        normalize: true,
    };
    let qwen = MoeLayer {
        model: "qwen3-30b-a3b",
        dtype: DType::BF16,
        tokens: 1,
        experts: 128,
        top_k: 8,
        hidden: 2048,
        intermediate: 768,
        normalize: true,
    };
    let mixtral = MIXTRAL_TOKENS.map(|tokens| MoeLayer { tokens, ..mixtral });
    let qwen = QWEN_TOKENS.map(|tokens| MoeLayer { tokens, ..qwen });
    mixtral.into_iter().chain(qwen).collect()
}

/// Bytes of the weights of `distinct` experts: `distinct · 3 · H · I` elements of `dtype`.
pub fn expert_bytes(layer: &MoeLayer, distinct: usize) -> usize {
    distinct * 3 * layer.dtype.storage_bytes(layer.hidden * layer.intermediate)
}

/// The number of distinct expert ids in a router's `experts` output, checking each is in
/// `0..experts`.
pub fn distinct_experts(chosen: &Tensor, experts: usize) -> Result<usize> {
    let mut seen = BTreeSet::new();
    for &id in &chosen.data {
        ensure!(
            id >= 0.0 && (id as usize) < experts && id.fract() == 0.0,
            "the router chose expert {id}, outside 0..{experts}"
        );
        seen.insert(id as usize);
    }
    Ok(seen.len())
}

/// The name of expert `e`'s weight `which` (`gate`, `up` or `down`).
fn expert_weight(e: usize, which: &str) -> String {
    format!("experts.{e}.{which}.weight")
}

const ROUTER_WEIGHT: &str = "router.weight";

impl MoeLayer {
    /// `mixtral tokens 64 bf16`, for messages.
    pub fn describe(&self) -> String {
        format!("moe {} {} tokens {}", self.model, self.dtype, self.tokens)
    }

    /// The plan the bench times: [`MoeLayer::graph`] through the rewriter (which fuses the
    /// router's linear where it pays), then scheduled.
    pub fn plan(&self) -> Result<Schedule> {
        let what = self.describe();
        let (graph, _) = optimize(&self.graph()?, &RewriteOptions::default())
            .with_context(|| format!("{what}: rewriting"))?;
        schedule(&graph, &ScheduleOptions::default()).with_context(|| format!("{what}: scheduling"))
    }

    /// The one-layer MoE graph as the model builder writes it (router linear, router,
    /// dispatch, expert FFN, combine): outputs `y [tokens, H]` and the router's `experts
    /// [tokens, top_k]`.
    pub fn graph(&self) -> Result<Graph> {
        let mut g = Graph::new("moe_layer");
        let (t, h, i, e) = (self.tokens, self.hidden, self.intermediate, self.experts);
        let mut input = |name: &str, kind, shape: &[usize]| {
            g.input(name, kind, self.dtype, Shape::of(shape))
                .with_context(|| format!("input {name}"))
        };
        let x = input("x", InputKind::Activation, &[t, h])?;
        let router = input(ROUTER_WEIGHT, InputKind::Weight, &[e, h])?;
        let mut ffn_operands = Vec::with_capacity(3 + 3 * e);
        for expert in 0..e {
            for (which, shape) in [("gate", [i, h]), ("up", [i, h]), ("down", [h, i])] {
                ffn_operands.push(input(
                    &expert_weight(expert, which),
                    InputKind::Weight,
                    &shape,
                )?);
            }
        }
        let logits = g.add1("router_logits", Op::Linear, &[x, router])?;
        let routed = g.add(
            "router",
            Op::MoeRouter {
                top_k: self.top_k,
                normalize: self.normalize,
            },
            &[logits],
        )?;
        let (weights, chosen) = (routed[0], routed[1]);
        let dispatched = g.add("dispatch", Op::MoeDispatch { num_experts: e }, &[chosen])?;
        let (order, offsets) = (dispatched[0], dispatched[1]);
        let mut operands = vec![x, order, offsets];
        operands.append(&mut ffn_operands);
        let y = g.add1("experts", Op::MoeExpertFfn { num_experts: e }, &operands)?;
        let out = g.add1("combine", Op::MoeCombine, &[y, order, weights])?;
        g.output("y", out);
        g.output("experts", chosen);
        Ok(g)
    }

    /// The router and expert weights, hash-filled, scaled by `1/√fan-in`.
    pub fn weights(&self) -> Weights {
        let (h, i) = (self.hidden, self.intermediate);
        let mut weights = Weights::new();
        let by_h = 1.0 / (h as f32).sqrt();
        let by_i = 1.0 / (i as f32).sqrt();
        weights.insert(
            ROUTER_WEIGHT,
            super::hash_values(self.dtype, &[self.experts, h], 0x726f_7574, by_h),
        );
        for e in 0..self.experts {
            let seed = 0x6578_7000 + 4 * e as u64;
            for (n, (which, shape, scale)) in [
                ("gate", [i, h], by_h),
                ("up", [i, h], by_h),
                ("down", [h, i], by_i),
            ]
            .into_iter()
            .enumerate()
            {
                let tensor = super::hash_values(self.dtype, &shape, seed + n as u64, scale);
                weights.insert(&expert_weight(e, which), tensor);
            }
        }
        weights
    }

    /// The input activations.
    pub fn x(&self) -> Tensor {
        super::hash_values(self.dtype, &[self.tokens, self.hidden], 0x78, 1.0)
    }
}

/// Fails, naming the step, when any step of `plan` is placed on the host: the bench times
/// GPU steps only.
pub fn check_on_gpu(plan: &Schedule, what: &str) -> Result<()> {
    for kernel in &plan.kernels {
        if kernel.device != Device::Gpu {
            bail!(
                "{what}: step {} ({}, family {}) is placed on the CPU (no GPU generator for it \
                 in this build); `kiln bench moe` times GPU steps only",
                kernel.name,
                kernel.computes.op.name(),
                kernel.family.kind().name()
            );
        }
    }
    Ok(())
}

/// Which stage column a plan step's time goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// The router with its linear (one step when fused, two otherwise).
    Router,
    Dispatch,
    ExpertFfn,
    Combine,
    Other,
}

fn stage_of(op: &Op) -> Stage {
    match op {
        // The router's linear (the only linear of the layer), fused or not.
        Op::MoeRouterLinear { .. } | Op::MoeRouter { .. } | Op::Linear => Stage::Router,
        Op::MoeDispatch { .. } => Stage::Dispatch,
        Op::MoeExpertFfn { .. } => Stage::ExpertFfn,
        Op::MoeCombine => Stage::Combine,
        _ => Stage::Other,
    }
}

/// One timed MoE layer.
#[derive(Clone, Debug, Serialize)]
pub struct MoeRow {
    pub suite: String,
    #[serde(rename = "impl")]
    pub implementation: String,
    pub model: String,
    pub dtype: String,
    pub tokens: usize,
    pub experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub intermediate: usize,
    /// Distinct experts the router chose in the timed calls.
    pub distinct_experts: usize,
    /// Their weight bytes ([`expert_bytes`]).
    pub expert_bytes: usize,
    /// The layer (sum of its steps per call), median and best of [`ITERATIONS`] calls.
    pub median_us: f64,
    pub min_us: f64,
    /// `expert_bytes` over the median time.
    pub gb_per_s: f64,
    /// Each stage's median step time (the router's includes its fused linear).
    pub router_us: f64,
    pub dispatch_us: f64,
    pub expert_ffn_us: f64,
    pub combine_us: f64,
    /// Steps of the plan that are none of the four stages (0 when there are none).
    pub other_us: f64,
}

impl MoeRow {
    /// One line for progress output.
    pub fn describe(&self) -> String {
        format!(
            "moe {} {} tokens {}: {:.1} µs",
            self.model, self.dtype, self.tokens, self.median_us
        )
    }
}

/// GB/s of `bytes` moved in `us` microseconds.
pub fn gb_per_s(bytes: usize, us: f64) -> f64 {
    bytes as f64 / us / 1e3
}

/// Per-call layer times (ms): the sum over steps of each step's sample of that call.
fn per_call_sums(steps: &[&[f64]]) -> Result<Vec<f64>> {
    let calls = steps.first().map_or(0, |s| s.len());
    ensure!(
        steps.iter().all(|s| s.len() == calls),
        "the plan's steps were timed over different numbers of calls"
    );
    Ok((0..calls)
        .map(|c| steps.iter().map(|s| s[c]).sum())
        .collect())
}

/// Times every shape of [`shapes`], calling `on_row` after each.
pub fn bench_moe(
    device: &Arc<CudaDevice>,
    mut on_row: impl FnMut(&MoeRow),
) -> Result<SuiteReport<MoeRow>> {
    let mut report = SuiteReport::new(device);
    // Every plan first: a step on the host fails the suite before gigabytes of weights are made.
    let mut layers = Vec::new();
    for layer in shapes() {
        let what = layer.describe();
        let plan = layer.plan()?;
        check_on_gpu(&plan, &what)?;
        layers.push((layer, plan));
    }
    let mut models: Vec<&str> = layers.iter().map(|(l, _)| l.model).collect();
    models.dedup();
    for model in models {
        let of_model: Vec<&(MoeLayer, Schedule)> =
            layers.iter().filter(|(l, _)| l.model == model).collect();
        // Every token count of a model shares its weights (uploaded once).
        let weights = of_model[0].0.weights();
        let device_weights = DeviceWeights::default();
        for (layer, plan) in of_model {
            let row = time_layer(
                device,
                layer,
                plan.clone(),
                &weights,
                &device_weights,
                &mut report.notes,
            )?;
            on_row(&row);
            report.records.push(row);
        }
    }
    Ok(report)
}

/// Times one MoE layer's `plan` (every step on the GPU: [`check_on_gpu`]).
fn time_layer(
    device: &Arc<CudaDevice>,
    layer: &MoeLayer,
    plan: Schedule,
    weights: &Weights,
    device_weights: &DeviceWeights,
    notes: &mut Vec<String>,
) -> Result<MoeRow> {
    let what = layer.describe();
    check_on_gpu(&plan, &what)?;
    let stages: Vec<Stage> = plan
        .kernels
        .iter()
        .map(|k| stage_of(&k.computes.op))
        .collect();
    ensure!(
        stages.iter().filter(|s| **s == Stage::ExpertFfn).count() == 1,
        "{what}: the plan has no single expert FFN step"
    );
    let mut executor = Executor::new(plan, weights, Some(device.clone()), device_weights)
        .with_context(|| format!("{what}: executor"))?;
    executor.poison_arena(true);
    let mut inputs = HashMap::new();
    inputs.insert("x".to_string(), layer.x());
    let mut distinct = BTreeSet::new();
    for call in 0..WARMUP + ITERATIONS {
        if call == WARMUP {
            executor.profile_steps(true);
        }
        let outputs = executor
            .run(&inputs)
            .with_context(|| format!("{what}: call {call}"))?;
        let chosen = outputs.get("experts").context("no output experts")?;
        if call >= WARMUP {
            distinct.insert(distinct_experts(chosen, layer.experts)?);
        }
        if call + 1 == WARMUP + ITERATIONS {
            let y = outputs.get("y").context("no output y")?;
            ensure!(
                y.data.iter().all(|v| v.is_finite()),
                "{what}: the MoE output has non-finite elements"
            );
        }
    }
    let distinct_count = *distinct.last().context("no timed calls")?;
    if distinct.len() > 1 {
        notes.push(format!(
            "{what}: the router chose {distinct:?} distinct experts over the timed calls of one \
             input; GB/s counts the most"
        ));
    }
    let samples: Vec<&[f64]> = (0..stages.len())
        .map(|i| executor.step_samples(i))
        .collect();
    let layer_timing = Timing::from_samples(per_call_sums(&samples)?).context("no timed calls")?;
    let mut stage_us = [0.0f64; 5];
    for (index, stage) in stages.iter().enumerate() {
        let median = Timing::from_samples(samples[index].to_vec())
            .with_context(|| format!("{what}: step {index} was not timed"))?
            .median_ms;
        stage_us[*stage as usize] += median * 1e3;
    }
    let bytes = expert_bytes(layer, distinct_count);
    if bytes < L2_NOTE_BYTES {
        notes.push(format!(
            "{what}: the {distinct_count} chosen experts weigh {} MiB, read by every call (no \
             rotation): part of them may be served from the L2 left by the call before",
            bytes >> 20
        ));
    }
    let median_us = layer_timing.median_ms * 1e3;
    Ok(MoeRow {
        suite: "moe".into(),
        implementation: "kiln.moe_layer".into(),
        model: layer.model.into(),
        dtype: layer.dtype.name().into(),
        tokens: layer.tokens,
        experts: layer.experts,
        top_k: layer.top_k,
        hidden: layer.hidden,
        intermediate: layer.intermediate,
        distinct_experts: distinct_count,
        expert_bytes: bytes,
        median_us,
        min_us: layer_timing.min_ms * 1e3,
        gb_per_s: gb_per_s(bytes, median_us),
        router_us: stage_us[Stage::Router as usize],
        dispatch_us: stage_us[Stage::Dispatch as usize],
        expert_ffn_us: stage_us[Stage::ExpertFfn as usize],
        combine_us: stage_us[Stage::Combine as usize],
        other_us: stage_us[Stage::Other as usize],
    })
}

/// The report as text: one line per layer, then any notes.
pub fn render(report: &SuiteReport<MoeRow>) -> String {
    let mut out = format!("device: {}\n", report.device);
    out.push_str(&format!(
        "{:<14} {:<5} {:>6} {:>4} {:>3} {:>8} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9}\n",
        "model",
        "dtype",
        "tokens",
        "E",
        "k",
        "distinct",
        "median µs",
        "min µs",
        "GB/s",
        "router µs",
        "dispatch",
        "ffn µs",
        "combine"
    ));
    for r in &report.records {
        out.push_str(&format!(
            "{:<14} {:<5} {:>6} {:>4} {:>3} {:>8} {:>10.1} {:>10.1} {:>7.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n",
            r.model,
            r.dtype,
            r.tokens,
            r.experts,
            r.top_k,
            r.distinct_experts,
            r.median_us,
            r.min_us,
            r.gb_per_s,
            r.router_us,
            r.dispatch_us,
            r.expert_ffn_us,
            r.combine_us
        ));
    }
    out.push_str(&report.render_notes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::schedule::{ForceCpu, Pass};

    fn small() -> MoeLayer {
        MoeLayer {
            model: "test",
            dtype: DType::BF16,
            tokens: 5,
            experts: 4,
            top_k: 2,
            hidden: 16,
            intermediate: 8,
            normalize: true,
        }
    }

    #[test]
    fn the_shapes_are_mixtral_then_qwen3() {
        let layers = shapes();
        assert_eq!(layers.len(), MIXTRAL_TOKENS.len() + QWEN_TOKENS.len());
        let mixtral: Vec<usize> = layers
            .iter()
            .filter(|l| l.model == "mixtral")
            .map(|l| l.tokens)
            .collect();
        assert_eq!(mixtral, [1, 4, 16, 64, 512, 4096]);
        let qwen = layers.last().unwrap();
        assert_eq!(
            (qwen.experts, qwen.top_k, qwen.hidden, qwen.intermediate),
            (128, 8, 2048, 768)
        );
        assert!(layers.iter().all(|l| l.dtype == DType::BF16 && l.normalize));
    }

    #[test]
    fn the_layer_graph_verifies_and_schedules_one_step_per_stage() {
        // A real Mixtral shape: the graph is shapes only, no weights are made.
        // Mixtral's small router fuses its linear; Qwen3's 128 × 2048 one does not.
        let qwen = *shapes().last().unwrap();
        for (layer, fused) in [(shapes()[3], true), (small(), true), (qwen, false)] {
            let graph = layer.graph().unwrap();
            graph.verify().unwrap();
            let plan = layer.plan().unwrap();
            let ops: Vec<&str> = plan.kernels.iter().map(|k| k.computes.op.name()).collect();
            let router: &[&str] = if fused {
                &["moe_router_linear"]
            } else {
                &["linear", "moe_router"]
            };
            let expected: Vec<&str> = router
                .iter()
                .copied()
                .chain(["moe_dispatch", "moe_expert_ffn", "moe_combine"])
                .collect();
            assert_eq!(ops, expected, "{}", layer.describe());
            let stages: Vec<Stage> = plan
                .kernels
                .iter()
                .map(|k| stage_of(&k.computes.op))
                .collect();
            let mut expected = vec![Stage::Router; router.len()];
            expected.extend([Stage::Dispatch, Stage::ExpertFfn, Stage::Combine]);
            assert_eq!(stages, expected);
            let outputs: Vec<&str> = graph.outputs.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(outputs, ["y", "experts"]);
        }
    }

    #[test]
    fn a_host_step_is_an_error_naming_it() {
        let layer = small();
        let mut plan = layer.plan().unwrap();
        // Every step on the GPU passes (whatever this build's placement says)…
        for kernel in &mut plan.kernels {
            kernel.device = Device::Gpu;
        }
        check_on_gpu(&plan, "moe test").unwrap();
        // …and one step on the host fails, naming it.
        let ffn = plan
            .kernels
            .iter()
            .find(|k| matches!(k.computes.op, Op::MoeExpertFfn { .. }))
            .unwrap()
            .name
            .clone();
        ForceCpu {
            kernels: [(ffn.clone(), "test".to_string())].into(),
        }
        .run(&mut plan);
        let error = check_on_gpu(&plan, "moe test").unwrap_err().to_string();
        assert!(error.contains(&ffn), "{error}");
        assert!(error.contains("moe_expert_ffn"), "{error}");
    }

    #[test]
    fn the_interpreter_runs_the_layer_and_its_experts_output_counts() {
        let layer = small();
        let graph = layer.graph().unwrap();
        let mut inputs = layer.weights().into_map();
        inputs.insert("x".into(), layer.x());
        let outputs = kiln_ir::interp::run(&graph, &inputs).unwrap();
        let y = &outputs["y"];
        assert_eq!(y.shape, [5, 16]);
        assert!(y.data.iter().all(|v| v.is_finite() && v.abs() < 10.0));
        assert!(y.data.iter().any(|v| *v != 0.0));
        let chosen = &outputs["experts"];
        assert_eq!(chosen.shape, [5, 2]);
        let distinct = distinct_experts(chosen, 4).unwrap();
        assert!((2..=4).contains(&distinct), "{distinct}");
    }

    #[test]
    fn distinct_experts_and_their_bytes_on_a_planted_choice() {
        // Mixtral, 3 tokens choosing {0, 5}, {5, 7}, {0, 7}: 3 distinct experts.
        let mixtral = shapes()[0];
        let chosen = Tensor::i32(&[3, 2], &[0, 5, 5, 7, 0, 7]);
        let distinct = distinct_experts(&chosen, 8).unwrap();
        assert_eq!(distinct, 3);
        // 3 experts × (gate + up + down) × 4096 × 14336 × 2 bytes.
        let bytes = expert_bytes(&mixtral, distinct);
        assert_eq!(bytes, 3 * 3 * 4096 * 14336 * 2);
        assert_eq!(bytes, 1_056_964_608);
        // 1 056 964 608 bytes in 1000 µs is 1057 GB/s.
        assert!((gb_per_s(bytes, 1000.0) - 1056.964608).abs() < 1e-6);
        // Qwen3: one expert is 3 × 2048 × 768 × 2 bytes.
        let qwen = *shapes().last().unwrap();
        assert_eq!(expert_bytes(&qwen, 1), 9_437_184);
        assert!(expert_bytes(&qwen, 8) < L2_NOTE_BYTES);
        // Ids outside the experts are errors, not counted.
        assert!(distinct_experts(&Tensor::i32(&[1, 2], &[0, 8]), 8).is_err());
        assert!(distinct_experts(&Tensor::i32(&[1, 2], &[-1, 0]), 8).is_err());
    }

    #[test]
    fn the_layer_time_sums_each_calls_steps() {
        let a = [1.0, 2.0, 3.0];
        let b = [0.5, 0.5, 4.0];
        assert_eq!(per_call_sums(&[&a, &b]).unwrap(), [1.5, 2.5, 7.0]);
        assert!(per_call_sums(&[&a, &b[..2]]).is_err());
    }

    #[test]
    fn weights_are_finite_nonzero_and_scaled() {
        let layer = small();
        let weights = layer.weights();
        assert_eq!(weights.len(), 1 + 3 * layer.experts);
        let gate = weights.get(&expert_weight(3, "gate")).unwrap();
        assert_eq!(gate.shape, [8, 16]);
        assert_eq!(gate.dtype, DType::BF16);
        let down = weights.get(&expert_weight(3, "down")).unwrap();
        assert_eq!(down.shape, [16, 8]);
        for (_, t) in weights.iter() {
            assert!(t
                .data
                .iter()
                .all(|v| v.is_finite() && *v != 0.0 && v.abs() < 1.0 / 2.0));
        }
        // Experts get different values.
        let other = weights.get(&expert_weight(2, "gate")).unwrap();
        assert_ne!(gate.data, other.data);
    }

    #[test]
    fn rows_serialize_flat_with_the_compare_keys() {
        let row = MoeRow {
            suite: "moe".into(),
            implementation: "kiln.moe_layer".into(),
            model: "mixtral".into(),
            dtype: "bf16".into(),
            tokens: 64,
            experts: 8,
            top_k: 2,
            hidden: 4096,
            intermediate: 14336,
            distinct_experts: 8,
            expert_bytes: expert_bytes(&shapes()[3], 8),
            median_us: 1000.0,
            min_us: 900.0,
            gb_per_s: 2818.6,
            router_us: 8.0,
            dispatch_us: 4.0,
            expert_ffn_us: 980.0,
            combine_us: 8.0,
            other_us: 0.0,
        };
        let json = serde_json::to_value(&row).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        for key in [
            "suite",
            "impl",
            "model",
            "dtype",
            "tokens",
            "experts",
            "top_k",
            "hidden",
            "intermediate",
            "distinct_experts",
            "expert_bytes",
            "median_us",
            "min_us",
            "gb_per_s",
            "router_us",
            "dispatch_us",
            "expert_ffn_us",
            "combine_us",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        assert!(!keys.contains(&"implementation"));
        assert_eq!(json["impl"], "kiln.moe_layer");
        assert_eq!(json["suite"], "moe");
        assert_eq!(json["tokens"], 64);
        let report = SuiteReport {
            device: "test".into(),
            records: vec![row],
            notes: vec!["a note".into()],
        };
        let text = render(&report);
        assert!(text.contains("mixtral"), "{text}");
        assert!(text.contains("note: a note"), "{text}");
    }
}
