//! A compiled artifact on the GPU: `kiln compile` into a directory, then the runner loads
//! the plans and PTX from it and generates nothing. Needs a CUDA device: run with
//! `cargo test --test gpu_artifact -- --ignored` on the GPU machine.
//!
//! The artifact's tokens must equal those of the same model compiled in memory (same
//! seed, same prompt), every GPU kernel must come from the artifact (`kernels_generated`
//! is 0, `kernels_loaded` is not), and the logits must be finite (the arenas are poisoned
//! with NaN before every call, so a kernel that skips elements fails). With step profiling
//! on, every GPU step has a device time for every call.

use kiln::compiler::{Artifact, ArtifactOptions};
use kiln::generate::{generate, GenerateOptions, Generation};
use kiln::ir::dtype::DType;
use kiln::model_source::load_expected_weights;
use kiln::models::ModelConfig;
use kiln::plan_runner::{device_target, open_device, PlanRunner, RunDevice};

fn generate_with(runner: &mut PlanRunner, config: &ModelConfig, prompt: &[i32]) -> Generation {
    runner.poison_arenas(true);
    let options = GenerateOptions {
        prompt: prompt.to_vec(),
        new_tokens: 17,
        keep_logits: true,
        ..Default::default()
    };
    generate(config, &options, |p, s| runner.step(p, s), |_| {}).unwrap()
}

#[test]
#[ignore = "needs a CUDA device"]
fn an_artifact_runs_its_own_kernels_and_matches_the_in_memory_compile() {
    let device = open_device(RunDevice::Cuda, 0).unwrap().unwrap();
    let target = device_target(&device).unwrap();
    drop(device);
    for (preset, prompt_len) in [("tiny-llama", 5), ("tiny-mixtral", 37)] {
        let mut config = ModelConfig::preset(preset).unwrap();
        config.dtype = DType::BF16;
        let prompt: Vec<i32> = (0..prompt_len).map(|i| (i * 37 + 5) % 500).collect();
        let capacity = prompt.len() + 17;
        // Compiled for the run's sizes (the runner rounds the capacity up to 256 tokens), so
        // every GPU step runs its launches as recorded in plan.json.
        let options = ArtifactOptions {
            target: target.clone(),
            prompt_len: prompt.len(),
            context: capacity.next_multiple_of(kiln::plan_runner::CAPACITY_ALIGNMENT),
            ..ArtifactOptions::default()
        };
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(preset);
        Artifact::compile(&config, &options)
            .unwrap()
            .write(&dir)
            .unwrap();
        let artifact = Artifact::load(&dir).unwrap();
        let weights =
            load_expected_weights(&artifact.expected_weights(), preset, None, 11).unwrap();

        let mut loaded =
            PlanRunner::from_artifact(&artifact, &weights, 0, capacity, dir.display().to_string())
                .unwrap();
        loaded.profile_steps(true);
        let from_artifact = generate_with(&mut loaded, &config, &prompt);
        let (prefill, decode) = loaded.stats();
        assert_eq!(prefill.kernels_generated + decode.kernels_generated, 0);
        assert!(prefill.kernels_loaded > 0 && decode.kernels_loaded > 0);
        assert!(prefill.gpu_launches > 0 && decode.gpu_launches > 0);
        assert_eq!(prefill.steps_derived + decode.steps_derived, 0, "{preset}");
        assert!(prefill.steps_recorded > 0 && decode.steps_recorded > 0);

        // Profiling was on for the artifact's run: every GPU step of each plan has one
        // positive device time per call.
        let (prefill_steps, decode_steps) = loaded.step_timings();
        let gpu_steps = |phase: kiln::models::Phase| {
            artifact
                .plan(phase)
                .kernels
                .iter()
                .filter(|k| k.device == kiln::ir::schedule::Device::Gpu)
                .count()
        };
        assert_eq!(prefill_steps.len(), gpu_steps(kiln::models::Phase::Prefill));
        assert_eq!(decode_steps.len(), gpu_steps(kiln::models::Phase::Decode));
        for step in prefill_steps.iter().chain(&decode_steps) {
            assert!(
                step.min_us > 0.0 && step.median_us.is_finite(),
                "{preset}: {step:?}"
            );
        }
        assert!(prefill_steps.iter().all(|s| s.calls == prefill.calls));
        assert!(decode_steps.iter().all(|s| s.calls == decode.calls));

        let mut in_memory = PlanRunner::new(
            &config,
            &weights,
            RunDevice::Cuda,
            0,
            prompt.len(),
            capacity,
            None,
        )
        .unwrap();
        let compiled_here = generate_with(&mut in_memory, &config, &prompt);
        assert_eq!(from_artifact.tokens, compiled_here.tokens, "{preset}");
        let (prefill_here, decode_here) = in_memory.stats();
        assert_eq!(prefill_here.steps_derived + decode_here.steps_derived, 0);

        // A cache the artifact has no launch table for: the launches are derived from the
        // plan (same kernels, other sizes: the decode splits follow the cache), and the
        // logits agree (not bit for bit: the splits sum in another order).
        let mut larger = PlanRunner::from_artifact(
            &artifact,
            &weights,
            0,
            capacity + 300,
            dir.display().to_string(),
        )
        .unwrap();
        let other_capacity = generate_with(&mut larger, &config, &prompt);
        let (_, decode_larger) = larger.stats();
        assert!(decode_larger.steps_derived > 0 && decode_larger.steps_recorded == 0);
        for (a, b) in other_capacity.step_logits[0]
            .iter()
            .zip(&from_artifact.step_logits[0])
        {
            assert!(
                a.is_finite() && (a - b).abs() <= 2e-2 * (1.0 + b.abs()),
                "{preset}: {a} vs {b}"
            );
        }
        for logits in &from_artifact.step_logits {
            assert!(logits.iter().all(|x| x.is_finite()), "{preset}");
        }
        eprintln!(
            "{preset}: {} tokens {:?}, {} kernels loaded from {}",
            from_artifact.tokens.len(),
            from_artifact.tokens,
            prefill.kernels_loaded + decode.kernels_loaded,
            dir.display()
        );
    }
}
