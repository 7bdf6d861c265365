//! Generation: prefill a prompt, then decode token by token with a KV cache, each token
//! chosen by `crate::sampling` (greedy by default) until the limit or a stop token, or
//! forced (teacher forcing: scoring a known text, for perplexity).
//!
//! [`generate`] owns the step loop and the per-call inputs (token ids, positions, cache
//! start), and runs each phase through a step function that owns the KV cache (on the host
//! or on the device): [`generate_reference`] runs the prefill and decode graphs of
//! `kiln_models::builder` with `kiln_ir::interp` (kiln's end-to-end reference, against
//! which compiled plans are checked token for token); `crate::plan_runner` runs compiled plans.

use crate::sampling::{Sampler, Sampling};
use anyhow::{bail, Context, Result};
use kiln_ir::graph::Graph;
use kiln_ir::interp;
use kiln_ir::tensor::Tensor;
use kiln_ir::weights::Weights;
use kiln_models::{build_model, ModelConfig, Phase};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// The result of a generation run.
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub model: String,
    /// Where it ran (the reference interpreter, or the compiled plans and their device).
    pub device: String,
    pub prompt: Vec<i32>,
    /// The generated tokens (not including the prompt).
    pub tokens: Vec<i32>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Prompt tokens per second of prefill.
    pub prefill_tokens_per_second: f64,
    /// Generated tokens per second of decode (the first token comes from prefill).
    pub decode_tokens_per_second: f64,
    /// Wall time of each decode step in milliseconds (step, argmax and bookkeeping).
    pub decode_step_ms: Vec<f64>,
    /// The median of `decode_step_ms` (0 without decode steps).
    pub decode_ms_per_token_median: f64,
    /// Whether generation ended at a stop token (the last of `tokens`) before the limit.
    pub stopped: bool,
    /// The generated text, when the run had a tokenizer (set by the caller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The last token's logits at every step, kept when asked for (for comparisons).
    #[serde(skip)]
    pub step_logits: Vec<Vec<f32>>,
    /// With forced tokens: each forced token's natural-log probability under the model, from
    /// the logits of the step before it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub token_logprobs: Vec<f64>,
}

impl Generation {
    /// With forced tokens: the perplexity of the forced tokens given the prompt, the
    /// exponential of their mean negative log-probability. `None` without forced tokens.
    pub fn perplexity(&self) -> Option<f64> {
        if self.token_logprobs.is_empty() {
            return None;
        }
        let mean = self.token_logprobs.iter().sum::<f64>() / self.token_logprobs.len() as f64;
        Some((-mean).exp())
    }
}

/// The natural-log probability of `token` under the softmax of `logits`, in f64.
pub fn log_probability(logits: &[f32], token: i32) -> Result<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() {
        bail!("the logits are not finite (largest {max})");
    }
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let logit = *logits
        .get(token as usize)
        .with_context(|| format!("token {token} is outside the {} logits", logits.len()))?;
    Ok(logit as f64 - max - sum.ln())
}

/// What to generate.
#[derive(Clone, Debug, Default)]
pub struct GenerateOptions {
    pub prompt: Vec<i32>,
    /// Tokens to generate at most, at least 1.
    pub new_tokens: usize,
    /// Keep each step's logits in [`Generation::step_logits`].
    pub keep_logits: bool,
    /// How each token is chosen (greedy by default).
    pub sampling: Sampling,
    /// Generation ends after any of these tokens (EOS, end of turn); empty: never early.
    pub stop_tokens: Vec<i32>,
    /// Teacher forcing: when not empty, step i's token is `forced[i]` rather than a sampled
    /// one, `new_tokens` must equal its length, and each forced token's log-probability goes
    /// to [`Generation::token_logprobs`] (stop tokens do not end a forced run).
    pub forced: Vec<i32>,
}

/// The index of the largest value; ties go to the lowest index. NaN logits are an error.
pub fn argmax(logits: &[f32]) -> Result<i32> {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            bail!("logit {i} is NaN");
        }
        if v > logits[best] {
            best = i;
        }
    }
    Ok(best as i32)
}

/// The per-layer KV-cache state inputs of the model graphs (`model.layers.{i}.k_cache` /
/// `v_cache`, batch 1, `capacity` rows), every element `fill`.
pub fn kv_cache_state(config: &ModelConfig, capacity: usize, fill: f32) -> HashMap<String, Tensor> {
    let shape = [1, capacity, config.num_kv_heads, config.head_dim];
    let mut state = HashMap::new();
    for layer in 0..config.num_layers {
        for which in ["k_cache", "v_cache"] {
            let name = format!("model.layers.{layer}.{which}");
            state.insert(name, Tensor::full(config.dtype, &shape, fill));
        }
    }
    state
}

/// The state the model graphs carry between calls: on the host, passed in with each call's
/// inputs, replaced by the graph's outputs of the same names.
#[derive(Clone, Debug, Default)]
pub struct HostState {
    pub tensors: HashMap<String, Tensor>,
}

impl HostState {
    /// The call's inputs with the state added.
    pub fn with_inputs(&self, inputs: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
        let mut all = self.tensors.clone();
        all.extend(inputs.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }

    /// Takes the state outputs out of `outputs` into the state.
    pub fn update(&mut self, outputs: &mut BTreeMap<String, Tensor>) {
        for (name, tensor) in self.tensors.iter_mut() {
            if let Some(new) = outputs.remove(name) {
                *tensor = new;
            }
        }
    }
}

/// Runs prefill then decode on the reference interpreter, calling `on_token` after each
/// generated token.
pub fn generate_reference(
    config: &ModelConfig,
    weights: &Weights,
    options: &GenerateOptions,
    on_token: impl FnMut(i32),
) -> Result<Generation> {
    let prefill = build_model(config, Phase::Prefill)?;
    let decode = build_model(config, Phase::Decode)?;
    generate_on_graphs(config, &prefill, &decode, weights, options, on_token)
}

/// [`generate_reference`] on given prefill and decode graphs of `config` (the model's, or
/// the model's after a pass such as Atom's).
pub fn generate_on_graphs(
    config: &ModelConfig,
    prefill: &Graph,
    decode: &Graph,
    weights: &Weights,
    options: &GenerateOptions,
    on_token: impl FnMut(i32),
) -> Result<Generation> {
    let capacity = options.prompt.len() + options.new_tokens;
    let mut state = HostState {
        tensors: kv_cache_state(config, capacity, 0.0),
    };
    let step = |phase: Phase, inputs: &HashMap<String, Tensor>| {
        let graph = match phase {
            Phase::Prefill => prefill,
            Phase::Decode => decode,
        };
        let all = state.with_inputs(inputs);
        let mut outputs =
            interp::run_with(graph, |name| all.get(name).or_else(|| weights.get(name)))?;
        state.update(&mut outputs);
        Ok(outputs)
    };
    generate(config, options, step, on_token)
}

/// Runs prefill then decode with `step`, which runs one phase's graph on the per-call
/// inputs (`input_ids`, `positions`, `cache_start`; the step keeps the KV-cache state, sized
/// for at least `prompt + new_tokens` tokens) and returns the graph's outputs (`logits`; any
/// others are ignored). Calls `on_token` after each token.
pub fn generate(
    config: &ModelConfig,
    options: &GenerateOptions,
    mut step: impl FnMut(Phase, &HashMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>>,
    mut on_token: impl FnMut(i32),
) -> Result<Generation> {
    let prompt = &options.prompt;
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one token id");
    }
    if options.new_tokens == 0 {
        bail!("the number of tokens to generate must be at least 1");
    }
    if let Some((i, &id)) = prompt
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= config.vocab_size)
    {
        bail!(
            "prompt token {i} is {id}, outside the vocabulary of {} (0..{})",
            config.vocab_size,
            config.vocab_size
        );
    }
    let forced = &options.forced;
    if !forced.is_empty() && forced.len() != options.new_tokens {
        bail!(
            "{} forced tokens for {} new tokens: they must be as many",
            forced.len(),
            options.new_tokens
        );
    }
    if let Some((i, &id)) = forced
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= config.vocab_size)
    {
        bail!(
            "forced token {i} is {id}, outside the vocabulary of {}",
            config.vocab_size
        );
    }
    // The step's token: forced (with its log-probability), else the sampler's.
    let choose = |sampler: &mut Sampler, logits: &[f32], index: usize| -> Result<(i32, f64)> {
        match forced.get(index) {
            Some(&token) => Ok((token, log_probability(logits, token)?)),
            None => Ok((sampler.next(logits)?, 0.0)),
        }
    };
    let mut state: HashMap<String, Tensor> = HashMap::new();

    let mut generation = Generation {
        model: config.name.clone(),
        device: "reference interpreter, cpu".to_string(),
        prompt: prompt.clone(),
        tokens: Vec::new(),
        prefill_seconds: 0.0,
        decode_seconds: 0.0,
        prefill_tokens_per_second: 0.0,
        decode_tokens_per_second: 0.0,
        decode_step_ms: Vec::new(),
        decode_ms_per_token_median: 0.0,
        stopped: false,
        text: None,
        step_logits: Vec::new(),
        token_logprobs: Vec::new(),
    };
    let mut sampler = Sampler::new(options.sampling);
    let started = Instant::now();
    let positions: Vec<i32> = (0..prompt.len() as i32).collect();
    state.insert("input_ids".into(), Tensor::i32(&[1, prompt.len()], prompt));
    state.insert(
        "positions".into(),
        Tensor::i32(&[1, prompt.len()], &positions),
    );
    state.insert("cache_start".into(), Tensor::i32(&[1], &[0]));
    let mut run_step = |phase, state: &mut HashMap<String, Tensor>| -> Result<Vec<f32>> {
        let mut outputs = step(phase, state)?;
        let logits = outputs
            .remove("logits")
            .context("the graph has no `logits` output")?;
        Ok(logits.data)
    };
    let logits = run_step(Phase::Prefill, &mut state)?;
    generation.prefill_seconds = started.elapsed().as_secs_f64();
    let (mut token, logprob) = choose(&mut sampler, &logits, 0).context("after prefill")?;
    if !forced.is_empty() {
        generation.token_logprobs.push(logprob);
    }
    if options.keep_logits {
        generation.step_logits.push(logits);
    }
    generation.tokens.push(token);
    on_token(token);
    generation.stopped = forced.is_empty() && options.stop_tokens.contains(&token);

    let started = Instant::now();
    for index in 1..options.new_tokens {
        if generation.stopped {
            break;
        }
        let step_started = Instant::now();
        let position = (prompt.len() + index - 1) as i32;
        state.insert("input_ids".into(), Tensor::i32(&[1, 1], &[token]));
        state.insert("positions".into(), Tensor::i32(&[1, 1], &[position]));
        state.insert("cache_start".into(), Tensor::i32(&[1], &[position]));
        let logits = run_step(Phase::Decode, &mut state)?;
        let logprob;
        (token, logprob) = choose(&mut sampler, &logits, index)
            .with_context(|| format!("at decode step {index}"))?;
        if !forced.is_empty() {
            generation.token_logprobs.push(logprob);
        }
        if options.keep_logits {
            generation.step_logits.push(logits);
        }
        generation.tokens.push(token);
        generation
            .decode_step_ms
            .push(step_started.elapsed().as_secs_f64() * 1e3);
        on_token(token);
        generation.stopped = forced.is_empty() && options.stop_tokens.contains(&token);
    }
    let mut sorted = generation.decode_step_ms.clone();
    sorted.sort_by(f64::total_cmp);
    generation.decode_ms_per_token_median = match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    };
    generation.decode_seconds = started.elapsed().as_secs_f64();
    generation.prefill_tokens_per_second = prompt.len() as f64 / generation.prefill_seconds;
    let decoded = (generation.tokens.len() - 1) as f64;
    generation.decode_tokens_per_second = if decoded > 0.0 {
        decoded / generation.decode_seconds
    } else {
        0.0
    };
    Ok(generation)
}

/// How close the MoE routing of a greedy reference run came to a tie, step by step.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterMargins {
    /// The reference's greedy tokens (the path the margins were measured along).
    pub tokens: Vec<i32>,
    /// Per step (prefill first): over every token and MoE layer of the step, the smallest
    /// gap between the `top_k`-th and the next router logit, in ulps of the model's dtype
    /// at the magnitude of the row's largest logit. Empty for a dense model.
    pub ulps: Vec<f64>,
}

/// The spacing of `dtype` values at magnitude `v`.
fn ulp(dtype: kiln_ir::dtype::DType, v: f32) -> f64 {
    let mantissa_bits = match dtype {
        kiln_ir::dtype::DType::F16 => 10,
        kiln_ir::dtype::DType::BF16 => 7,
        _ => 23,
    };
    let exponent = (v.abs().max(f32::MIN_POSITIVE) as f64).log2().floor();
    2f64.powf(exponent - mantissa_bits as f64)
}

/// Runs [`generate_reference`] with the router logits of every MoE layer as extra outputs
/// and measures how close each step's expert choice came to a tie ([`RouterMargins`]).
///
/// Two correct implementations that round differently (a GPU plan and a CPU plan) may pick
/// different experts for a token whose `top_k`-th and next router logits are within a few
/// ulps; from that step on their results legitimately differ. Tests that compare MoE runs
/// use this to tell such a tie from a bug.
pub fn router_margins(
    config: &ModelConfig,
    weights: &Weights,
    options: &GenerateOptions,
) -> Result<RouterMargins> {
    let top_k = match &config.moe {
        Some(moe) => moe.top_k,
        None => {
            let generation = generate_reference(config, weights, options, |_| {})?;
            return Ok(RouterMargins {
                tokens: generation.tokens,
                ulps: Vec::new(),
            });
        }
    };
    let mut graphs = HashMap::new();
    for phase in [Phase::Prefill, Phase::Decode] {
        let mut graph = build_model(config, phase)?;
        let routers: Vec<kiln_ir::graph::ValueId> = graph
            .nodes
            .iter()
            .filter(|n| matches!(n.op, kiln_ir::op::Op::MoeRouter { .. }))
            .map(|n| n.inputs[0])
            .collect();
        for (i, logits) in routers.into_iter().enumerate() {
            graph.output(&format!("router_logits.{i}"), logits);
        }
        graphs.insert(phase, graph);
    }
    let capacity = options.prompt.len() + options.new_tokens;
    let mut state = HostState {
        tensors: kv_cache_state(config, capacity, 0.0),
    };
    let mut ulps = Vec::new();
    let step = |phase: Phase, inputs: &HashMap<String, Tensor>| {
        let all = state.with_inputs(inputs);
        let mut outputs = interp::run_with(&graphs[&phase], |name| {
            all.get(name).or_else(|| weights.get(name))
        })?;
        let mut smallest = f64::INFINITY;
        for (name, logits) in &outputs {
            if !name.starts_with("router_logits.") {
                continue;
            }
            let experts = logits.shape.last().copied().unwrap_or(0);
            if experts <= top_k {
                continue;
            }
            for row in logits.data.chunks(experts) {
                let mut sorted = row.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let gap = (sorted[top_k - 1] - sorted[top_k]) as f64;
                // Rounding differences of a logit scale with the row's largest logits (the
                // products they sum), not with the logit itself.
                let scale = sorted[0].abs().max(sorted[experts - 1].abs());
                smallest = smallest.min(gap / ulp(config.dtype, scale));
            }
        }
        ulps.push(smallest);
        state.update(&mut outputs);
        Ok(outputs)
    };
    let generation = generate(config, options, step, |_| {})?;
    Ok(RouterMargins {
        tokens: generation.tokens,
        ulps,
    })
}
