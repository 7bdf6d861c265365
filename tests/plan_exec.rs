//! Plan execution on the CPU (`kiln_runtime::exec` through `kiln::plan_runner`): the
//! compiled, rewritten prefill and decode plans of the tiny presets, every kernel on the host
//! (linears and maps on Cranelift kernels, the rest on the interpreter), give the reference
//! interpreter's tokens and logits; bad per-call tensors and a GPU plan without a device are
//! clear errors. The GPU side is `tests/gpu_plan.rs`.

use kiln::compiler::{compile, CompileOptions};
use kiln::generate::{generate, generate_reference, kv_cache_state, GenerateOptions, Generation};
use kiln::ir::dtype::DType;
use kiln::ir::model::{build_model, ModelConfig, Phase};
use kiln::ir::tensor::Tensor;
use kiln::model_source::load_weights;
use kiln::plan_runner::{PlanRunner, RunDevice};
use kiln_runtime::exec::{DeviceWeights, ExecError, Executor};

/// Compares two greedy generations step by step: logits within `tolerance` (relative) while
/// the tokens agree, and where they first differ the step must be a near-tie of the
/// reference's logits (the gap between the two tokens' logits within the tolerance). Returns
/// how many leading tokens agree.
fn compare_generations(got: &Generation, want: &Generation, tolerance: f64, what: &str) -> usize {
    let mut same = 0;
    for (step, (a, b)) in got.step_logits.iter().zip(&want.step_logits).enumerate() {
        assert!(
            a.iter().all(|v| v.is_finite()),
            "{what} step {step}: non-finite logits"
        );
        let ta = Tensor::f32(&[a.len()], a.clone());
        let tb = Tensor::f32(&[b.len()], b.clone());
        let error = ta.relative_error(&tb);
        assert!(
            error < tolerance,
            "{what} step {step}: relative error {error}"
        );
        let (x, y) = (got.tokens[step], want.tokens[step]);
        if x != y {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let gap = (b[y as usize] - b[x as usize]).abs() as f64;
            assert!(
                gap <= tolerance * scale,
                "{what} step {step}: token {x} instead of {y}, but the reference's logits differ by {gap} (scale {scale})"
            );
            eprintln!("{what}: tokens diverge at step {step} on a near-tie (gap {gap:.2e}, scale {scale:.2e})");
            return same;
        }
        same += 1;
    }
    same
}

fn plan_matches_reference(model: &str, dtype: DType, seed: u64) {
    let mut config = ModelConfig::preset(model).unwrap();
    config.dtype = dtype;
    let graph = build_model(&config, Phase::Prefill).unwrap();
    let weights = load_weights(&graph, None, seed).unwrap();
    let options = GenerateOptions {
        prompt: vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3],
        new_tokens: 12,
        keep_logits: true,
    };
    let reference = generate_reference(&config, &weights, &options, |_| {}).unwrap();
    let capacity = options.prompt.len() + options.new_tokens;
    let mut runner = PlanRunner::new(
        &config,
        &weights,
        RunDevice::Cpu,
        0,
        options.prompt.len(),
        capacity,
        None,
    )
    .unwrap();
    assert_eq!(runner.device, "cpu");
    assert_eq!(runner.placement.0 + runner.placement.2, 0, "no GPU kernels");
    let planned = generate(&config, &options, |p, s| runner.step(p, s), |_| {}).unwrap();
    // The rewritten graph fuses ops, so rounding differs slightly from the reference in the
    // half dtypes; in f32 the two agree to accumulation order.
    let tolerance = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
    let same = compare_generations(&planned, &reference, tolerance, &format!("{model} {dtype}"));
    if dtype == DType::F32 {
        assert_eq!(
            same, options.new_tokens,
            "f32 plans give the reference's tokens"
        );
    }
    let (prefill, decode) = runner.stats();
    assert_eq!(prefill.calls, 1);
    assert_eq!(decode.calls, options.new_tokens - 1);
    assert!(decode.cpu_kernels > 0 && decode.gpu_launches == 0);
    // Every host step runs compiled (Cranelift kernels, copies and the MoE routing), none on
    // the interpreter.
    for stats in [prefill, decode] {
        assert_eq!(
            stats.cpu_compiled, stats.cpu_kernels,
            "{model} {dtype}: {} of {} host step runs compiled",
            stats.cpu_compiled, stats.cpu_kernels
        );
    }
}

#[test]
fn cpu_plans_of_tiny_llama_match_the_reference() {
    plan_matches_reference("tiny-llama", DType::F32, 21);
}

#[test]
fn cpu_plans_of_tiny_mixtral_match_the_reference() {
    plan_matches_reference("tiny-mixtral", DType::F32, 22);
}

#[test]
fn cpu_plans_in_f16_match_the_reference() {
    plan_matches_reference("tiny-llama", DType::F16, 23);
}

/// The decode plan of tiny-llama (f32, so every kernel is on the CPU) and its inputs.
fn decode_executor() -> (Executor, std::collections::HashMap<String, Tensor>) {
    let config = ModelConfig::preset("tiny-llama").unwrap();
    let graph = build_model(&config, Phase::Decode).unwrap();
    let weights = load_weights(&graph, None, 5).unwrap();
    let compiled = compile(&config, Phase::Decode, &CompileOptions::default()).unwrap();
    let executor = Executor::new(compiled.plan, &weights, None, &DeviceWeights::default()).unwrap();
    let mut inputs = kv_cache_state(&config, 8, 0.0);
    inputs.insert("input_ids".into(), Tensor::i32(&[1, 1], &[7]));
    inputs.insert("positions".into(), Tensor::i32(&[1, 1], &[0]));
    inputs.insert("cache_start".into(), Tensor::i32(&[1], &[0]));
    (executor, inputs)
}

#[test]
fn bad_call_tensors_are_named() {
    let (mut executor, inputs) = decode_executor();
    assert!(executor.run(&inputs).is_ok());

    let mut missing = inputs.clone();
    missing.remove("positions");
    let err = executor.run(&missing).unwrap_err();
    assert!(matches!(err, ExecError::MissingTensor { .. }), "{err}");
    assert!(err.to_string().contains("`positions`"), "{err}");

    let mut wrong_shape = inputs.clone();
    wrong_shape.insert("positions".into(), Tensor::i32(&[1, 2], &[0, 1]));
    let err = executor.run(&wrong_shape).unwrap_err().to_string();
    assert!(
        err.contains("`positions`") && err.contains("dimension 1"),
        "{err}"
    );

    let mut wrong_dtype = inputs.clone();
    wrong_dtype.insert("input_ids".into(), Tensor::f32(&[1, 1], vec![7.0]));
    let err = executor.run(&wrong_dtype).unwrap_err().to_string();
    assert!(
        err.contains("`input_ids`") && err.contains("dtype"),
        "{err}"
    );
}

#[test]
fn a_plan_with_gpu_kernels_needs_a_device() {
    let mut config = ModelConfig::preset("tiny-llama").unwrap();
    config.dtype = DType::F16;
    let graph = build_model(&config, Phase::Decode).unwrap();
    let weights = load_weights(&graph, None, 5).unwrap();
    let compiled = compile(&config, Phase::Decode, &CompileOptions::default()).unwrap();
    let gpu = compiled.plan.count_on(kiln::ir::schedule::Device::Gpu);
    assert!(gpu > 0, "an f16 plan places kernels on the GPU");
    let err = Executor::new(compiled.plan, &weights, None, &DeviceWeights::default()).unwrap_err();
    assert!(matches!(err, ExecError::NoDevice { gpu_kernels, .. } if gpu_kernels == gpu));
    assert!(err.to_string().contains("--device cpu"), "{err}");
}

#[test]
fn missing_weights_are_named() {
    let config = ModelConfig::preset("tiny-llama").unwrap();
    let compiled = compile(&config, Phase::Decode, &CompileOptions::default()).unwrap();
    let err = Executor::new(
        compiled.plan,
        &kiln::ir::weights::Weights::new(),
        None,
        &DeviceWeights::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("weight tensor `model."), "{err}");
}
