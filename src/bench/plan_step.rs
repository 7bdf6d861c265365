//! Benchmark figures of plan steps: the decode attention step of a compiled one-layer decode
//! plan, timed inside the executor that runs model plans, for the `attention` and `quest`
//! suites to report beside their hand-built launches.
//!
//! **The plan.** One decoder layer's attention at decode: `KvAppend(k)`, `KvAppend(v)`, then
//! `AttentionDecode` (dense) or `QuestAttentionDecode { budget_tokens, page_size }` over the
//! `[batch, context, kv_heads, head_dim]` caches, scheduled by `kiln_ir::schedule` and run by
//! `kiln_runtime::exec::Executor` with its kernels lowered by `kiln_kernels` — the same
//! placement, programs (split counts from the device's SMs), workspaces and Quest page
//! bounds as a model plan. Every call appends one token at row `context − 1` (overwriting
//! it) and attends `context` tokens, so the shape is the same call after call and Quest
//! refreshes the bounds of one page per call, as in steady decode.
//!
//! **The figure** is the attention step's device time from the executor's step profile
//! (CUDA events around the step's launches; for Quest: bounds refresh, page estimate, top-K
//! and the sparse decode), median and best over [`ITERATIONS`] calls after [`WARMUP`].
//!
//! **L2.** A shape gets as many executors, each with caches of its own, as it takes for the
//! bytes one step reads to add up past [`ROTATE_BYTES`] (at most [`MAX_ROTATIONS`]); calls
//! rotate through them, so a step never finds its K/V in the L2 left by the step before.
//! Shapes whose caches exceed [`MAX_CACHE_BYTES`] per executor are skipped (their caches are
//! filled from the host).
//!
//! Cache values come from a cheap hash of the element index (magnitudes in `[1/64, 1)`,
//! random signs): never zero, never NaN. The arena is poisoned before every call and the
//! result must be finite. This module measures; it asserts nothing about speed.

use anyhow::{ensure, Context, Result};
use kiln_ir::dtype::DType;
use kiln_ir::graph::Graph;
use kiln_ir::op::{InputKind, Op};
use kiln_ir::schedule::{schedule, Device, Family, ScheduleOptions};
use kiln_ir::shape::Shape;
use kiln_ir::tensor::Tensor;
use kiln_ir::weights::Weights;
use kiln_runtime::cuda::{CudaDevice, DeviceTensor, Timing};
use kiln_runtime::exec::{DeviceState, DeviceWeights, Executor};
use std::collections::HashMap;
use std::sync::Arc;

/// Untimed calls before the timed ones.
pub const WARMUP: usize = 10;
/// Timed calls.
pub const ITERATIONS: usize = 100;
/// Bytes the rotated executors of one shape must read in all (the H100's L2 is 50 MB).
pub const ROTATE_BYTES: usize = 256 << 20;
/// At most this many executors per shape.
pub const MAX_ROTATIONS: usize = 16;
/// The largest K plus V cache of one executor (filled from the host).
pub const MAX_CACHE_BYTES: usize = 1200 << 20;

/// One decode attention step to time.
#[derive(Clone, Copy, Debug)]
pub struct DecodeStep {
    pub dtype: DType,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Tokens each sequence attends (the cache capacity too).
    pub context: usize,
    /// `(budget_tokens, page_size)` for Quest; `None` for dense decode.
    pub quest: Option<(usize, usize)>,
}

/// The attention step's device time.
#[derive(Clone, Debug)]
pub struct StepFigure {
    pub median_us: f64,
    pub min_us: f64,
    /// Executors (cache sets) the calls rotated through.
    pub rotations: usize,
}

impl DecodeStep {
    /// Dense decode of `batch` sequences of `context` tokens with the heads and dtype of a
    /// paged-bench `layout`.
    pub fn dense(
        layout: &kiln_kernels::attention::PagedKv,
        batch: usize,
        context: usize,
    ) -> DecodeStep {
        DecodeStep {
            dtype: layout.dtype,
            batch,
            q_heads: layout.q_heads,
            kv_heads: layout.kv_heads,
            head_dim: layout.head_dim,
            context,
            quest: None,
        }
    }

    fn cache_shape(&self) -> [usize; 4] {
        [self.batch, self.context, self.kv_heads, self.head_dim]
    }

    /// Bytes of the K and V caches of one executor.
    pub fn cache_bytes(&self) -> usize {
        2 * self
            .dtype
            .storage_bytes(self.cache_shape().iter().product::<usize>())
    }

    /// Bytes one step reads: the attended K/V (the budget's tokens for Quest, plus the page
    /// bounds it scores).
    fn step_bytes(&self) -> usize {
        let row = self
            .dtype
            .storage_bytes(self.batch * self.kv_heads * self.head_dim);
        match self.quest {
            None => 2 * row * self.context,
            Some((budget, page)) => {
                2 * row * budget.min(self.context) + 2 * row * self.context / page
            }
        }
    }

    /// The one-layer decode graph.
    fn graph(&self) -> Result<Graph> {
        let mut g = Graph::new("decode_attention_step");
        let (b, hq, hkv, d) = (self.batch, self.q_heads, self.kv_heads, self.head_dim);
        let mut input = |name: &str, kind, dtype, shape: &[usize]| {
            g.input(name, kind, dtype, Shape::of(shape))
                .with_context(|| format!("input {name}"))
        };
        let q = input("q", InputKind::Activation, self.dtype, &[b, 1, hq, d])?;
        let new_k = input("new_k", InputKind::Activation, self.dtype, &[b, 1, hkv, d])?;
        let new_v = input("new_v", InputKind::Activation, self.dtype, &[b, 1, hkv, d])?;
        let start = input("start", InputKind::Activation, DType::I32, &[b])?;
        let lengths = input("lengths", InputKind::Activation, DType::I32, &[b])?;
        let k_cache = input("k_cache", InputKind::State, self.dtype, &self.cache_shape())?;
        let v_cache = input("v_cache", InputKind::State, self.dtype, &self.cache_shape())?;
        let k = g.add1("k_append", Op::KvAppend, &[k_cache, new_k, start])?;
        let v = g.add1("v_append", Op::KvAppend, &[v_cache, new_v, start])?;
        let scale = 1.0 / (d as f32).sqrt();
        let op = match self.quest {
            None => Op::AttentionDecode { scale },
            Some((budget_tokens, page_size)) => Op::QuestAttentionDecode {
                scale,
                budget_tokens,
                page_size,
            },
        };
        let y = g.add1("attention", op, &[q, k, v, lengths])?;
        g.output("y", y);
        g.output("k_cache", k);
        g.output("v_cache", v);
        Ok(g)
    }
}

/// Hash-derived values: magnitude in `[1/64, 1)`, random sign, never zero.
fn cache_values(dtype: DType, shape: &[usize], seed: u64) -> Tensor {
    super::hash_values(dtype, shape, seed, 1.0)
}

/// Times the attention step of `step`'s plan; `None` when its caches exceed
/// [`MAX_CACHE_BYTES`] (the reason is pushed to `notes`).
pub fn time_decode_step(
    device: &Arc<CudaDevice>,
    step: &DecodeStep,
    notes: &mut Vec<String>,
) -> Result<Option<StepFigure>> {
    let what = format!(
        "plan step {} batch {} kv {} context {}{}",
        step.dtype,
        step.batch,
        step.kv_heads,
        step.context,
        step.quest
            .map(|(b, p)| format!(" quest budget {b} page {p}"))
            .unwrap_or_default()
    );
    if step.cache_bytes() > MAX_CACHE_BYTES {
        notes.push(format!(
            "{what}: skipped, its caches ({} MiB) exceed the {} MiB a plan-step executor fills \
             from the host",
            step.cache_bytes() >> 20,
            MAX_CACHE_BYTES >> 20
        ));
        return Ok(None);
    }
    let graph = step.graph()?;
    let plan = schedule(&graph, &ScheduleOptions::default())
        .with_context(|| format!("{what}: scheduling"))?;
    let attention = plan
        .kernels
        .iter()
        .position(|k| matches!(k.family, Family::Attention { .. }))
        .context("the plan has no attention kernel")?;
    ensure!(
        plan.kernels.iter().all(|k| k.device == Device::Gpu),
        "{what}: every step of the plan must be on the GPU"
    );
    let rotations = ROTATE_BYTES
        .div_ceil(step.step_bytes())
        .clamp(1, MAX_ROTATIONS)
        .min((MAX_CACHE_BYTES * 8 / step.cache_bytes()).max(1));
    let caches = cache_values(step.dtype, &step.cache_shape(), 0x6b69_6c6e);
    let mut executors = Vec::with_capacity(rotations);
    for _ in 0..rotations {
        let mut executor = Executor::new(
            plan.clone(),
            &Weights::new(),
            Some(device.clone()),
            &DeviceWeights::default(),
        )
        .with_context(|| format!("{what}: executor"))?;
        executor.poison_arena(true);
        let store = DeviceState::default();
        for name in ["k_cache", "v_cache"] {
            store.insert(name, Arc::new(DeviceTensor::upload(device, &caches)?));
        }
        executor.keep_state_on_device(store)?;
        executors.push(executor);
    }
    drop(caches);
    let (b, hq, hkv, d) = (step.batch, step.q_heads, step.kv_heads, step.head_dim);
    let mut inputs = HashMap::new();
    inputs.insert("q".to_string(), cache_values(step.dtype, &[b, 1, hq, d], 1));
    inputs.insert(
        "new_k".to_string(),
        cache_values(step.dtype, &[b, 1, hkv, d], 2),
    );
    inputs.insert(
        "new_v".to_string(),
        cache_values(step.dtype, &[b, 1, hkv, d], 3),
    );
    let last = vec![step.context as i32 - 1; b];
    let lengths = vec![step.context as i32; b];
    inputs.insert("start".to_string(), Tensor::i32(&[b], &last));
    inputs.insert("lengths".to_string(), Tensor::i32(&[b], &lengths));
    for call in 0..WARMUP + ITERATIONS {
        if call == WARMUP {
            for executor in &mut executors {
                executor.profile_steps(true);
            }
        }
        let outputs = executors[call % rotations]
            .run(&inputs)
            .with_context(|| format!("{what}: call {call}"))?;
        if call + 1 == WARMUP + ITERATIONS {
            let y = outputs.get("y").context("no output y")?;
            ensure!(
                y.data.iter().all(|v| v.is_finite()),
                "{what}: the attention output has non-finite elements"
            );
        }
    }
    let samples: Vec<f64> = executors
        .iter()
        .flat_map(|e| e.step_samples(attention).iter().copied())
        .collect();
    let timing = Timing::from_samples(samples).context("no timed calls")?;
    Ok(Some(StepFigure {
        median_us: timing.median_ms * 1e3,
        min_us: timing.min_ms * 1e3,
        rotations,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(quest: Option<(usize, usize)>) -> DecodeStep {
        DecodeStep {
            dtype: DType::F16,
            batch: 2,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            context: 4096,
            quest,
        }
    }

    #[test]
    fn the_step_plan_is_kv_append_and_attention_on_the_gpu() {
        for quest in [None, Some((1024, 16))] {
            let plan =
                schedule(&step(quest).graph().unwrap(), &ScheduleOptions::default()).unwrap();
            let families: Vec<&str> = plan
                .kernels
                .iter()
                .map(|k| k.family.kind().name())
                .collect();
            assert_eq!(
                families,
                ["kv_append", "kv_append", "attention"],
                "{quest:?}"
            );
            assert!(plan.kernels.iter().all(|k| k.device == Device::Gpu));
            let quest_op = matches!(plan.kernels[2].computes.op, Op::QuestAttentionDecode { .. });
            assert_eq!(quest_op, quest.is_some());
        }
    }

    #[test]
    fn quest_reads_the_budget_and_the_bounds_not_the_context() {
        let dense = step(None);
        // 2 sequences × 8 KV heads × 128 × 2 bytes per token row, K and V.
        assert_eq!(dense.step_bytes(), 2 * 2 * 8 * 128 * 2 * 4096);
        assert_eq!(dense.cache_bytes(), dense.step_bytes());
        let quest = step(Some((1024, 16)));
        assert_eq!(quest.step_bytes(), 2 * 2 * 8 * 128 * 2 * (1024 + 4096 / 16));
    }

    #[test]
    fn cache_values_are_nonzero_finite_and_signed() {
        let t = cache_values(DType::F16, &[4, 1000], 7);
        assert!(t
            .data
            .iter()
            .all(|v| v.is_finite() && *v != 0.0 && v.abs() < 1.0));
        let negative = t.data.iter().filter(|v| **v < 0.0).count();
        assert!(
            (1500..2500).contains(&negative),
            "{negative} of 4000 negative"
        );
    }
}
