//! Plan execution on the GPU: `kiln run --device cuda` against `--device cpu` on the tiny
//! presets. Both run the same compiled (rewritten) prefill and decode plans; on `cuda` every
//! step (linear, RMSNorm, RoPE, elementwise, embedding gather, slice, KV append, attention
//! and tiny-mixtral's MoE router, dispatch, expert FFN and combine) is generated PTX: the
//! tests assert that no step of either phase runs on the host. The tiny presets have head_dim 32,
//! which the attention generators take, so their prefill, decode and Quest attention run on
//! the GPU as they are (the `_d32` tests: a 100- or 300-token prompt with the KV cache
//! resident on the device); the `_d64` / `_d128` variants widen the heads. Each is checked
//! against the CPU plan (whose attention, Quest included, runs on the Cranelift host kernels). Every test needs
//! a CUDA device: run with `cargo test --test gpu_plan -- --ignored` on the GPU machine.
//!
//! The tiny presets are f32; the GPU generators take f16 and bf16, so the presets run here
//! in those dtypes (`kiln run --dtype`). Tokens must agree at every step, except at a tie: a
//! divergence is accepted only where the CPU's logits of the two tokens are within two ulps
//! of the dtype, and the comparison stops there (seen: tiny-mixtral bf16 with tokens 113 and
//! 121 tied at 2.5312; tiny-mixtral f16 choosing 126 at 2.3008 against 397 at 2.3027, one
//! f16 ulp apart). Weights are fresh random draws (seed printed;
//! `KILN_TEST_SEED` reproduces), the GPU arena is filled with NaN before every call, and
//! outputs that live outside it start as NaN, so a kernel that skips elements gives NaN
//! logits, which fail.

mod common;

use kiln::generate::{generate, GenerateOptions, Generation};
use kiln::ir::dtype::DType;
use kiln::ir::quest::QuestOptions;
use kiln::ir::tensor::Tensor;
use kiln::model_source::load_weights;
use kiln::models::{build_model, ModelConfig, Phase};
use kiln::plan_runner::{PlanRunner, RunDevice};
use rand::{Rng, SeedableRng};

/// 1 token from prefill + 32 decode steps.
const NEW_TOKENS: usize = 33;

/// A router margin below this many ulps (of the dtype, at the row's largest logit) counts as
/// a tie (see `cuda_matches_cpu_with`): the GPU and CPU router logits differ by about one.
/// Measured 2026-12-07 on the H100 (margins from `router_margins` on the CPU): runs diverged
/// at margins of 1.0 (bf16, decode step 25), 0.34 and 0.22 (f16, a prompt token in prefill);
/// runs whose smallest margins were 2.0, 2.94 and 3.5 agreed at every compared step.
const ROUTER_TIE_ULPS: f64 = 2.0;

/// What one comparison runs.
#[derive(Clone, Copy)]
struct Case {
    /// Prompt tokens (random ids from the seed; 11 fixed ids when 0).
    prompt_len: usize,
    quest: Option<QuestOptions>,
    /// The GPU runner must keep the KV cache on the device.
    cache_on_device: bool,
    /// Steps whose logits and tokens must agree (the rest must be finite). Quest with a
    /// budget below the sequence's pages compares strictly only the prefill step: the GPU
    /// and CPU compute q and K with different roundings, and a page whose score is within
    /// that rounding of the K-th largest can be selected on one and not the other.
    strict_steps: usize,
}

const SHORT: Case = Case {
    prompt_len: 0,
    quest: None,
    cache_on_device: false,
    strict_steps: NEW_TOKENS,
};

fn prompt(config: &ModelConfig, case: Case, seed: u64) -> Vec<i32> {
    if case.prompt_len == 0 {
        return vec![1, 7, 42, 3, 99, 12, 5, 250, 8, 31, 64];
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..case.prompt_len)
        .map(|_| rng.random_range(0..config.vocab_size as i32))
        .collect()
}

fn run(config: &ModelConfig, seed: u64, device: RunDevice, case: Case) -> (Generation, PlanRunner) {
    let graph = build_model(config, Phase::Prefill).unwrap();
    let weights = load_weights(&graph, None, seed).unwrap();
    let options = GenerateOptions {
        prompt: prompt(config, case, seed),
        new_tokens: NEW_TOKENS,
        keep_logits: true,
        ..Default::default()
    };
    let capacity = options.prompt.len() + NEW_TOKENS;
    let mut runner = PlanRunner::new(
        config,
        &weights,
        device,
        0,
        options.prompt.len(),
        capacity,
        case.quest,
    )
    .unwrap();
    runner.poison_arenas(true);
    let generation = generate(config, &options, |p, s| runner.step(p, s), |_| {}).unwrap();
    (generation, runner)
}

fn cuda_matches_cpu(model: &str, dtype: DType) {
    cuda_matches_cpu_with(model, dtype, None, SHORT);
}

/// The spacing of `dtype` values at magnitude `v` (f16: 10 mantissa bits, bf16: 7).
fn ulp(dtype: DType, v: f32) -> f64 {
    let mantissa_bits = match dtype {
        DType::F16 => 10,
        DType::BF16 => 7,
        _ => 23,
    };
    let exponent = (v.max(f32::MIN_POSITIVE) as f64).log2().floor();
    2f64.powf(exponent - mantissa_bits as f64)
}

/// `model` in `dtype`, with `head_dim` when given, on `case`: the GPU plans against the CPU
/// plans.
fn cuda_matches_cpu_with(model: &str, dtype: DType, head_dim: Option<usize>, case: Case) {
    let mut config = ModelConfig::preset(model).unwrap();
    config.dtype = dtype;
    if let Some(d) = head_dim {
        config.head_dim = d;
    }
    cuda_matches_cpu_config(&config, case);
}

/// `config` run by the GPU runner and by the CPU runner on the same weights and prompt.
fn cuda_matches_cpu_config(config: &ModelConfig, case: Case) {
    let (model, dtype) = (config.name.as_str(), config.dtype);
    let model = format!("{model} d{}", config.head_dim);
    let seed = common::fresh_seed(&format!("{model}-{dtype}-{}", case.prompt_len));
    // MoE: the reference's router margins along its greedy path; a seed whose prefill has a
    // router near-tie would leave no step to compare strictly, so the next seed is taken.
    let (seed, margins) = match config.moe {
        None => (seed, None),
        Some(_) => {
            let (seed, margins) = seed_without_prefill_router_tie(config, case, seed);
            (seed, Some(margins))
        }
    };
    let (gpu, gpu_runner) = run(config, seed, RunDevice::Cuda, case);
    let (cpu, _) = run(config, seed, RunDevice::Cpu, case);
    let (prefill_gpu, prefill_cpu, decode_gpu, decode_cpu) = gpu_runner.placement;
    eprintln!(
        "{model} {dtype}: {} on the GPU runner; prefill {prefill_gpu} gpu + {prefill_cpu} cpu, decode {decode_gpu} gpu + {decode_cpu} cpu kernels; KV cache on the {}",
        gpu_runner.device,
        if gpu_runner.state_on_device { "device" } else { "host" }
    );
    assert!(
        !case.cache_on_device || gpu_runner.state_on_device,
        "{model}: the KV cache should stay on the device"
    );
    assert!(
        prefill_gpu > 0 && decode_gpu > 0,
        "kernels were placed on the GPU"
    );
    assert_eq!(
        (prefill_cpu, decode_cpu),
        (0, 0),
        "{model} {dtype}: every step of a half-precision plan of these models has a GPU generator"
    );
    let (prefill_stats, decode_stats) = gpu_runner.stats();
    assert!(prefill_stats.gpu_launches > 0 && decode_stats.gpu_launches > 0);

    // Logits are compared while both runs have fed the same tokens. Half-precision logits
    // are coarse (an ulp at 2.5 is 0.016 in bf16, 0.002 in f16), so two tokens can tie; a
    // divergence is accepted only where the CPU's logits of the two tokens are within two
    // ulps (a tie), and the comparison stops there, since the runs then feed different
    // tokens.
    //
    // MoE models: a token whose `top_k`-th and next router logits are within a few ulps may
    // be routed to different experts by two correct runs that round differently, and from
    // that step on their logits legitimately differ. The reference's router margins along
    // the same tokens (`router_margins`) find the first such step; comparison is strict
    // before it only (a tie in prefill leaves nothing strict: the runs then differ in the
    // cache of one prompt token, so such seeds are skipped above). (Measured on the H100, 2026-12-07: tiny-mixtral bf16, seed
    // 1796659148311025474, a 1-ulp router tie at step 25 where the logits error jumped from
    // 6e-3 to 0.37.)
    let mut strict_steps = case.strict_steps;
    if let Some(margins) = &margins {
        let same_path = margins
            .tokens
            .iter()
            .zip(&cpu.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let tie = margins.ulps.iter().position(|&u| u < ROUTER_TIE_ULPS);
        if let Some(step) = tie.filter(|&step| step <= same_path) {
            eprintln!(
                "{model} {dtype}: router near-tie ({:.2} ulps) at step {step}: strict comparison stops there",
                margins.ulps[step]
            );
            strict_steps = strict_steps.min(step);
        }
    }
    let tolerance = common::tolerance(dtype);
    let mut worst = 0f64;
    let mut agreed = 0;
    for (step, (a, b)) in gpu.step_logits.iter().zip(&cpu.step_logits).enumerate() {
        assert!(
            a.iter().all(|v| v.is_finite()),
            "{model} {dtype} step {step}: non-finite GPU logits"
        );
        if step >= strict_steps {
            let error = Tensor::f32(&[a.len()], a.clone())
                .relative_error(&Tensor::f32(&[b.len()], b.clone()));
            eprintln!(
                "{model} {dtype} step {step}: logits relative error {error:.3e} (not compared)"
            );
            continue;
        }
        let error =
            Tensor::f32(&[a.len()], a.clone()).relative_error(&Tensor::f32(&[b.len()], b.clone()));
        worst = worst.max(error);
        eprintln!("{model} {dtype} step {step}: logits relative error {error:.3e}");
        assert!(
            error <= tolerance,
            "{model} {dtype} step {step}: logits differ by {error:.3e} (tolerance {tolerance:.0e})"
        );
        let (x, y) = (gpu.tokens[step], cpu.tokens[step]);
        if x != y {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let gap = (b[y as usize] - b[x as usize]).abs() as f64;
            eprintln!(
                "{model} {dtype}: step {step} chose {x} on the GPU, {y} on the CPU; CPU logits {:.4} vs {:.4}",
                b[x as usize], b[y as usize]
            );
            let tie = 2.0 * ulp(dtype, b[x as usize].abs().max(b[y as usize].abs()));
            assert!(
                gap <= tie,
                "{model} {dtype} step {step}: token {x} instead of {y}, CPU logit gap {gap:.3e} is more than two {dtype} ulps ({tie:.3e}, scale {scale:.3e})"
            );
            break;
        }
        agreed += 1;
    }
    eprintln!(
        "{model} {dtype}: {agreed} of {NEW_TOKENS} tokens agree; worst per-step logits relative error {worst:.3e}"
    );
    assert!(
        agreed >= 1,
        "{model} {dtype}: no step was compared strictly (seed {seed})"
    );
    assert_eq!(gpu.tokens.len(), NEW_TOKENS);
}

/// The first seed from `seed` on (at most 32 tries) whose reference run has no router
/// near-tie in prefill, with its router margins: a tie there would leave the GPU and CPU
/// runs legitimately different from the first token, so nothing could be compared.
fn seed_without_prefill_router_tie(
    config: &ModelConfig,
    case: Case,
    seed: u64,
) -> (u64, kiln::generate::RouterMargins) {
    let graph = build_model(config, Phase::Prefill).unwrap();
    for seed in seed..seed + 32 {
        let weights = load_weights(&graph, None, seed).unwrap();
        let options = GenerateOptions {
            prompt: prompt(config, case, seed),
            new_tokens: NEW_TOKENS,
            keep_logits: false,
            ..Default::default()
        };
        let margins = kiln::generate::router_margins(config, &weights, &options).unwrap();
        if margins.ulps.first().is_some_and(|&u| u >= ROUTER_TIE_ULPS) {
            return (seed, margins);
        }
        eprintln!(
            "{}: seed {seed} has a router near-tie in prefill; trying the next",
            config.name
        );
    }
    panic!("{}: 32 seeds from {seed} all tie in prefill", config.name)
}

#[test]
#[ignore = "needs a CUDA device"]
fn tiny_llama_f16_cuda_matches_cpu() {
    cuda_matches_cpu("tiny-llama", DType::F16);
}

#[test]
#[ignore = "needs a CUDA device"]
fn tiny_llama_bf16_cuda_matches_cpu() {
    cuda_matches_cpu("tiny-llama", DType::BF16);
}

#[test]
#[ignore = "needs a CUDA device"]
fn tiny_mixtral_f16_cuda_matches_cpu() {
    cuda_matches_cpu("tiny-mixtral", DType::F16);
}

#[test]
#[ignore = "needs a CUDA device"]
fn tiny_mixtral_bf16_cuda_matches_cpu() {
    cuda_matches_cpu("tiny-mixtral", DType::BF16);
}

/// Attention, KV append and the KV cache on the GPU: prefill of a 100-token prompt (not a
/// multiple of any page size), then decode.
const LONG: Case = Case {
    prompt_len: 100,
    quest: None,
    cache_on_device: true,
    strict_steps: NEW_TOKENS,
};

/// Two layers of Mixtral 8x7B at its real sizes (`--layers 2`): every step on the GPU, the
/// MoE layers' router, dispatch, grouped expert FFN and combine included, against the CPU
/// plan.
#[test]
#[ignore = "needs a CUDA device"]
fn mixtral_8x7b_two_layers_bf16_cuda_matches_cpu() {
    let mut config = ModelConfig::preset("mixtral-8x7b").unwrap();
    config.keep_first_layers(2).unwrap();
    config.dtype = DType::BF16;
    cuda_matches_cpu_config(&config, SHORT);
}

#[test]
#[ignore = "needs a CUDA device"]
fn tiny_llama_d32_f16_attention_on_the_gpu_matches_cpu() {
    cuda_matches_cpu_with("tiny-llama", DType::F16, None, LONG);
}

#[test]
#[ignore = "needs a CUDA device"]
fn tiny_llama_d32_bf16_attention_on_the_gpu_matches_cpu() {
    cuda_matches_cpu_with("tiny-llama", DType::BF16, None, LONG);
}

#[test]
#[ignore = "needs a CUDA device"]
fn tiny_mixtral_d32_f16_attention_on_the_gpu_matches_cpu() {
    cuda_matches_cpu_with("tiny-mixtral", DType::F16, None, LONG);
}

#[test]
#[ignore = "needs a CUDA device"]
fn tiny_llama_d128_f16_attention_on_the_gpu_matches_cpu() {
    cuda_matches_cpu_with("tiny-llama", DType::F16, Some(128), LONG);
}

#[test]
#[ignore = "needs a CUDA device"]
fn tiny_llama_d64_bf16_attention_on_the_gpu_matches_cpu() {
    cuda_matches_cpu_with("tiny-llama", DType::BF16, Some(64), LONG);
}

#[test]
#[ignore = "needs a CUDA device"]
fn tiny_mixtral_d128_f16_attention_on_the_gpu_matches_cpu() {
    cuda_matches_cpu_with("tiny-mixtral", DType::F16, Some(128), LONG);
}

/// A 300-token prompt under a 512-token Quest budget: every page is selected, so the runs
/// must agree at every step.
fn quest_covering_case() -> Case {
    Case {
        prompt_len: 300,
        quest: Some(QuestOptions {
            budget_tokens: 512,
            page_size: 16,
            skip_layers: 1,
        }),
        cache_on_device: true,
        strict_steps: NEW_TOKENS,
    }
}

/// Quest on the GPU (page bounds, estimate, top-K, sparse decode) in a model plan against
/// the CPU plan's Quest host step, with a budget (512 tokens) above the sequence's 21
/// pages: every page is selected (the op's dense fallback), so the runs must agree at every
/// step. `quest_attention_program_matches_the_interpreter_call_after_call` checks a sparse
/// selection on identical inputs.
#[test]
#[ignore = "needs a CUDA device"]
fn tiny_llama_d128_f16_quest_covering_budget_matches_cpu() {
    let case = quest_covering_case();
    cuda_matches_cpu_with("tiny-llama", DType::F16, Some(128), case);
}

/// The same at the preset's head_dim 32.
#[test]
#[ignore = "needs a CUDA device"]
fn tiny_llama_d32_f16_quest_covering_budget_matches_cpu() {
    let case = quest_covering_case();
    cuda_matches_cpu_with("tiny-llama", DType::F16, None, case);
}

/// Quest with a 64-token budget (4 of about 20 pages) in a model plan: the prefill logits
/// must agree with the CPU plan and every decode step must give finite logits; the per-step
/// differences are printed (see [`Case::strict_steps`] for why they are not asserted).
#[test]
#[ignore = "needs a CUDA device"]
fn tiny_llama_d128_f16_quest_sparse_runs_on_the_gpu() {
    let case = Case {
        prompt_len: 300,
        quest: Some(QuestOptions {
            budget_tokens: 64,
            page_size: 16,
            skip_layers: 1,
        }),
        cache_on_device: true,
        strict_steps: 1,
    };
    cuda_matches_cpu_with("tiny-llama", DType::F16, Some(128), case);
}

/// Quest with a 64-token budget at the preset's head_dim 32: as
/// `tiny_llama_d128_f16_quest_sparse_runs_on_the_gpu`, prefill logits compared strictly.
#[test]
#[ignore = "needs a CUDA device"]
fn tiny_llama_d32_f16_quest_sparse_runs_on_the_gpu() {
    let case = Case {
        prompt_len: 300,
        quest: Some(QuestOptions {
            budget_tokens: 64,
            page_size: 16,
            skip_layers: 1,
        }),
        cache_on_device: true,
        strict_steps: 1,
    };
    cuda_matches_cpu_with("tiny-llama", DType::F16, None, case);
}

/// The Quest attention program on its own, call after call, against `ir::interp` on the
/// same inputs: a one-layer graph `KvAppend(k), KvAppend(v), QuestAttentionDecode` with the
/// KV cache kept on the device. With identical inputs the page selection is bit-identical
/// (estimate and top-K are exact), so any error beyond rounding is a plumbing bug: page
/// bounds rebuilt on the first call and refreshed for the new token's page after that
/// (one sequence crosses into a new page), the identity page table over the contiguous
/// cache, the token-major sparse decode. Batch 2 with unequal lengths, GQA 4, head_dim 128;
/// rows past each sequence's length hold NaN and must never be read.
#[test]
#[ignore = "needs a CUDA device"]
fn quest_attention_program_matches_the_interpreter_call_after_call() {
    quest_program_call_after_call(128);
}

/// The same at the tiny presets' head_dim 32.
#[test]
#[ignore = "needs a CUDA device"]
fn quest_attention_program_d32_matches_the_interpreter_call_after_call() {
    quest_program_call_after_call(32);
}

fn quest_program_call_after_call(d: usize) {
    use kiln::ir::graph::Graph;
    use kiln::ir::interp;
    use kiln::ir::op::{InputKind, Op};
    use kiln::ir::schedule::{schedule, Device, Family, ScheduleOptions};
    use kiln::ir::shape::Shape;
    use kiln::ir::weights::Weights;
    use kiln_runtime::cuda::DeviceTensor;
    use kiln_runtime::exec::{DeviceState, DeviceWeights, Executor};
    use std::collections::HashMap;
    use std::sync::Arc;

    let (batch, capacity, q_heads, kv_heads) = (2usize, 256usize, 8usize, 2usize);
    let dtype = DType::F16;
    let scale = 1.0 / (d as f32).sqrt();
    let mut g = Graph::new("quest_layer");
    let activation = |g: &mut Graph, name: &str, dtype: DType, shape: &[usize]| {
        g.input(name, InputKind::Activation, dtype, Shape::of(shape))
            .unwrap()
    };
    let q = activation(&mut g, "q", dtype, &[batch, 1, q_heads, d]);
    let new_k = activation(&mut g, "new_k", dtype, &[batch, 1, kv_heads, d]);
    let new_v = activation(&mut g, "new_v", dtype, &[batch, 1, kv_heads, d]);
    let start = activation(&mut g, "start", DType::I32, &[batch]);
    let lengths = activation(&mut g, "lengths", DType::I32, &[batch]);
    let cache_shape = [batch, capacity, kv_heads, d];
    let k_cache = g
        .input("k_cache", InputKind::State, dtype, Shape::of(&cache_shape))
        .unwrap();
    let v_cache = g
        .input("v_cache", InputKind::State, dtype, Shape::of(&cache_shape))
        .unwrap();
    let k = g
        .add1("k_append", Op::KvAppend, &[k_cache, new_k, start])
        .unwrap();
    let v = g
        .add1("v_append", Op::KvAppend, &[v_cache, new_v, start])
        .unwrap();
    let op = Op::QuestAttentionDecode {
        scale,
        budget_tokens: 64,
        page_size: 16,
    };
    let y = g.add1("quest", op, &[q, k, v, lengths]).unwrap();
    g.output("y", y);
    g.output("k_cache", k);
    g.output("v_cache", v);

    let plan = schedule(&g, &ScheduleOptions::default()).unwrap();
    assert!(
        plan.kernels.iter().all(|k| k.device == Device::Gpu
            && matches!(k.family, Family::Attention { .. } | Family::KvAppend { .. })),
        "every kernel on the GPU as an attention program"
    );
    let device = Arc::new(common::device());
    let mut executor = Executor::new(
        plan,
        &Weights::new(),
        Some(device.clone()),
        &DeviceWeights::default(),
    )
    .unwrap();
    executor.poison_arena(true);
    let store = DeviceState::default();
    executor.keep_state_on_device(store.clone()).unwrap();

    let mut rng = common::rng(common::fresh_seed(&format!("quest_attention_program_d{d}")));
    let mut lens = [157usize, 200];
    let mut caches = HashMap::new();
    for name in ["k_cache", "v_cache"] {
        let mut cache = common::random(dtype, &cache_shape, 1.0, &mut rng);
        let row = kv_heads * d;
        for (b, &len) in lens.iter().enumerate() {
            for v in &mut cache.data[(b * capacity + len) * row..(b + 1) * capacity * row] {
                *v = f32::NAN;
            }
        }
        store.insert(
            name,
            Arc::new(DeviceTensor::upload(&device, &cache).unwrap()),
        );
        caches.insert(name.to_string(), cache);
    }
    for call in 0..6 {
        let mut inputs = HashMap::new();
        inputs.insert(
            "q".to_string(),
            common::random(dtype, &[batch, 1, q_heads, d], 1.0, &mut rng),
        );
        inputs.insert(
            "new_k".to_string(),
            common::random(dtype, &[batch, 1, kv_heads, d], 1.0, &mut rng),
        );
        inputs.insert(
            "new_v".to_string(),
            common::random(dtype, &[batch, 1, kv_heads, d], 1.0, &mut rng),
        );
        let starts: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let ends: Vec<i32> = lens.iter().map(|&l| l as i32 + 1).collect();
        inputs.insert("start".to_string(), Tensor::i32(&[batch], &starts));
        inputs.insert("lengths".to_string(), Tensor::i32(&[batch], &ends));

        let got = executor.run(&inputs).unwrap();
        assert!(
            !got.contains_key("k_cache"),
            "the cache stays on the device"
        );
        let mut all = inputs.clone();
        all.extend(caches.clone());
        let mut want = interp::run_with(&g, |name| all.get(name)).unwrap();
        for name in ["k_cache", "v_cache"] {
            caches.insert(name.to_string(), want.remove(name).unwrap());
        }
        common::assert_close(
            &format!("quest program call {call} lens {ends:?}"),
            &got["y"],
            &want["y"],
            5e-3,
        );
        for len in &mut lens {
            *len += 1;
        }
    }
    // The device cache holds exactly the reference's valid rows.
    for name in ["k_cache", "v_cache"] {
        let (tensor, _) = store.get(name).unwrap();
        let got = tensor.download().unwrap();
        let row = kv_heads * d;
        for (b, &len) in lens.iter().enumerate() {
            let rows = b * capacity * row..(b * capacity + len) * row;
            assert_eq!(
                got.data[rows.clone()],
                caches[name].data[rows],
                "{name}: sequence {b}'s rows"
            );
        }
    }
    eprintln!("stats {:?}", executor.stats());
}

/// `kiln bench`'s plan-step figures (`bench::plan_step`): the decode attention step of a
/// one-layer plan, dense and Quest, runs call after call on rotated caches with a finite
/// result and gives a positive device time; a shape whose caches exceed the limit is
/// skipped with a note instead of failing.
#[test]
#[ignore = "needs a CUDA device"]
fn plan_step_bench_times_the_attention_step() {
    use kiln::bench::plan_step::{time_decode_step, DecodeStep, MAX_CACHE_BYTES};
    let device = std::sync::Arc::new(common::device());
    let mut notes = Vec::new();
    for quest in [None, Some((1024, 16))] {
        let step = DecodeStep {
            dtype: DType::F16,
            batch: 1,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            context: 4096,
            quest,
        };
        let figure = time_decode_step(&device, &step, &mut notes)
            .unwrap()
            .expect("a small shape is timed");
        assert!(
            figure.min_us > 0.0 && figure.median_us >= figure.min_us,
            "{figure:?}"
        );
        assert!(
            figure.rotations > 1,
            "16 MB of KV rotates through several caches"
        );
        eprintln!("plan step {quest:?}: {figure:?}");
    }
    let huge = DecodeStep {
        dtype: DType::F16,
        batch: 16,
        q_heads: 32,
        kv_heads: 32,
        head_dim: 128,
        context: 65536,
        quest: None,
    };
    assert!(huge.cache_bytes() > MAX_CACHE_BYTES);
    assert!(time_decode_step(&device, &huge, &mut notes)
        .unwrap()
        .is_none());
    assert_eq!(notes.len(), 1, "{notes:?}");
}
