//! Plan execution on the CPU (`kiln_runtime::exec` through `kiln::plan_runner`): the
//! compiled, rewritten prefill and decode plans of the tiny presets, every kernel on the host
//! (Cranelift kernels and the runtime's copies; nothing is interpreted), give the reference
//! interpreter's tokens and logits; so do graphs of the other host steps (decomposed
//! attention, Quest attention, the MoE router with its linear fused) against `ir::interp`.
//! Bad per-call tensors, a GPU plan without a device and a host step without a CPU kernel are
//! clear errors. The GPU side is `tests/gpu_plan.rs`.

mod common;

use kiln::compiler::{compile, CompileOptions};
use kiln::generate::{generate, generate_reference, kv_cache_state, GenerateOptions, Generation};
use kiln::ir::dtype::DType;
use kiln::ir::tensor::Tensor;
use kiln::model_source::load_weights;
use kiln::models::{build_model, ModelConfig, Phase};
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
        ..Default::default()
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
    assert!(
        prefill.cpu_kernels > 0,
        "{model} {dtype}: the prefill ran on the host"
    );
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
/// tiny-llama with Atom W4A4 (calibrated on a random prompt): the compiled CPU plans (the
/// Atom pass run by the compiler, its linears on the int4 dot kernel) decode the tokens the
/// interpreter decodes on the Atom graphs, with logits close to its.
#[test]
fn cpu_plans_of_an_atom_model_match_the_interpreter() {
    use kiln::generate::generate_on_graphs;
    use kiln::ir::atom::AtomOptions;
    use kiln::plan_runner::Passes;
    let config = ModelConfig::preset("tiny-llama").unwrap();
    let graph = build_model(&config, Phase::Prefill).unwrap();
    let weights = load_weights(&graph, None, 11).unwrap();
    let atom = AtomOptions {
        group_size: 32,
        outliers: 32,
        ..AtomOptions::default()
    };
    let calibration: Vec<i32> = (0..24).map(|i| i * 37 % 500).collect();
    let model = kiln::atom_model::prepare(&config, &weights, atom, &calibration).unwrap();
    let options = GenerateOptions {
        prompt: vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3],
        new_tokens: 8,
        keep_logits: true,
        ..Default::default()
    };
    let reference = generate_on_graphs(
        &config,
        &model.prefill,
        &model.decode,
        &model.weights,
        &options,
        |_| {},
    )
    .unwrap();
    let mut runner = PlanRunner::with_passes(
        &config,
        &model.weights,
        RunDevice::Cpu,
        0,
        options.prompt.len(),
        options.prompt.len() + options.new_tokens,
        Passes {
            quest: None,
            atom: Some(atom),
        },
    )
    .unwrap();
    assert_eq!(runner.placement.0 + runner.placement.2, 0, "no GPU kernels");
    let planned = generate(&config, &options, |p, s| runner.step(p, s), |_| {}).unwrap();
    // The int4 dot kernel sums its groups in f32, the interpreter in f64.
    let same = compare_generations(&planned, &reference, 1e-4, "tiny-llama atom");
    assert_eq!(same, options.new_tokens, "the reference's tokens");
}

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

/// Runs `graph`'s schedule (every kernel on the host) on `inputs` and checks each output
/// against the interpreter's within `tolerance`; returns the executor's outputs.
fn host_plan_matches_the_interpreter(
    graph: &kiln::ir::graph::Graph,
    weights: &kiln::ir::weights::Weights,
    inputs: &std::collections::HashMap<String, Tensor>,
    tolerance: f64,
) -> std::collections::BTreeMap<String, Tensor> {
    use kiln::ir::schedule::{schedule, Device, ScheduleOptions};
    let plan = schedule(graph, &ScheduleOptions::default()).unwrap();
    assert!(plan.kernels.iter().all(|k| k.device == Device::Cpu));
    let mut executor = Executor::new(plan, weights, None, &DeviceWeights::default()).unwrap();
    let got = executor.run(inputs).unwrap();
    let want =
        kiln::ir::interp::run_with(graph, |name| inputs.get(name).or_else(|| weights.get(name)))
            .unwrap();
    assert!(executor.stats().cpu_kernels > 0);
    for (name, want) in &want {
        let got = got
            .get(name)
            .unwrap_or_else(|| panic!("no output `{name}`"));
        common::assert_close(name, got, want, tolerance);
    }
    got.into_iter().collect()
}

/// The embedding gather, a slice and decode's i32 `lengths` map in f32: typed `Gather` and
/// `Slice` families (and an i32 map with a scalar operand), all placed on the host, where
/// they run as the runtime's copies and a map kernel and match the interpreter exactly.
#[test]
fn gather_slice_and_lengths_run_as_host_steps_in_f32() {
    use kiln::ir::graph::Graph;
    use kiln::ir::op::{InputKind, Op};
    use kiln::ir::schedule::{schedule, Family, FamilyKind, ScheduleOptions};
    use kiln::ir::shape::Shape;
    let mut rng = common::rng(common::fresh_seed(
        "gather_slice_and_lengths_run_as_host_steps_in_f32",
    ));
    let (vocab, hidden, batch, seq) = (40usize, 12usize, 2usize, 5usize);
    let mut g = Graph::new("movement");
    let table = g
        .input(
            "table",
            InputKind::Weight,
            DType::F32,
            Shape::of(&[vocab, hidden]),
        )
        .unwrap();
    let ids = g
        .input(
            "ids",
            InputKind::Activation,
            DType::I32,
            Shape::of(&[batch, seq]),
        )
        .unwrap();
    let start = g
        .input(
            "cache_start",
            InputKind::Activation,
            DType::I32,
            Shape::of(&[batch]),
        )
        .unwrap();
    let x = g.add1("embed", Op::Embedding, &[table, ids]).unwrap();
    let middle = Op::Slice {
        axis: 1,
        start: 1,
        end: Some(-1),
    };
    let mid = g.add1("middle", middle, &[x]).unwrap();
    let last = Op::Slice {
        axis: 1,
        start: -1,
        end: None,
    };
    let last = g.add1("last_token", last, &[x]).unwrap();
    let one = g.constant("one", 1.0, DType::I32).unwrap();
    let lengths = g.add1("lengths", Op::Add, &[start, one]).unwrap();
    g.output("middle", mid);
    g.output("last", last);
    g.output("lengths", lengths);

    let plan = schedule(&g, &ScheduleOptions::default()).unwrap();
    let kinds: Vec<FamilyKind> = plan.kernels.iter().map(|k| k.family.kind()).collect();
    assert!(kinds.contains(&FamilyKind::Gather) && kinds.contains(&FamilyKind::Slice));
    assert!(plan.kernels.iter().any(|k| matches!(
        &k.family,
        Family::Map { scalar_operands, .. } if scalar_operands == &vec![1]
    )));

    let mut weights = kiln::ir::weights::Weights::new();
    weights.insert(
        "table",
        common::random(DType::F32, &[vocab, hidden], 1.0, &mut rng),
    );
    let ids: Vec<i32> = (0..batch * seq)
        .map(|_| rand::Rng::random_range(&mut rng, 0..vocab as i32))
        .collect();
    let mut inputs = std::collections::HashMap::new();
    inputs.insert("ids".to_string(), Tensor::i32(&[batch, seq], &ids));
    inputs.insert("cache_start".to_string(), Tensor::i32(&[batch], &[0, 4095]));
    let got = host_plan_matches_the_interpreter(&g, &weights, &inputs, 0.0);
    assert_eq!(got["lengths"].data, vec![1.0, 4096.0]);
    assert_eq!(got["last"].shape, vec![batch, 1, hidden]);
}

/// Qwen2-MoE's gated shared expert, `out + sigmoid(gate) · shared` with the gate `[t, 1]`, in
/// f32: a map with a row operand, placed on the host, where the operand is expanded to the
/// result's shape before the map kernel runs; it matches the interpreter.
#[test]
fn a_row_gated_map_runs_as_a_host_step_in_f32() {
    use kiln::ir::graph::Graph;
    use kiln::ir::op::{InputKind, MapStep, Op};
    use kiln::ir::schedule::{schedule, Family, ScheduleOptions};
    use kiln::ir::shape::Shape;
    let mut rng = common::rng(common::fresh_seed(
        "a_row_gated_map_runs_as_a_host_step_in_f32",
    ));
    let (tokens, hidden) = (5usize, 12usize);
    let mut g = Graph::new("gated");
    let activation = |g: &mut Graph, name: &str, dims: &[usize]| {
        g.input(name, InputKind::Activation, DType::F32, Shape::of(dims))
            .unwrap()
    };
    let out = activation(&mut g, "out", &[tokens, hidden]);
    let gate = activation(&mut g, "gate", &[tokens, 1]);
    let shared = activation(&mut g, "shared", &[tokens, hidden]);
    let steps = vec![
        MapStep::Operand { index: 0 },
        MapStep::Operand { index: 1 },
        MapStep::Operand { index: 2 },
        MapStep::Sigmoid { x: 1 },
        MapStep::Mul { a: 3, b: 2 },
        MapStep::Add { a: 0, b: 4 },
    ];
    let y = g
        .add1("gated", Op::FusedMap { steps }, &[out, gate, shared])
        .unwrap();
    g.output("y", y);
    let plan = schedule(&g, &ScheduleOptions::default()).unwrap();
    assert!(matches!(
        &plan.kernels[0].family,
        Family::Map { row_operands, row_width: 12, .. } if row_operands == &vec![1]
    ));
    let mut inputs = std::collections::HashMap::new();
    for (name, dims) in [
        ("out", vec![tokens, hidden]),
        ("gate", vec![tokens, 1]),
        ("shared", vec![tokens, hidden]),
    ] {
        inputs.insert(
            name.to_string(),
            common::random(DType::F32, &dims, 2.0, &mut rng),
        );
    }
    let weights = kiln::ir::weights::Weights::new();
    host_plan_matches_the_interpreter(&g, &weights, &inputs, common::tolerance(DType::F32));
}

/// A prefill graph as a framework exporter writes attention (transposes, repeated KV heads,
/// `MatMul`, causal mask, `Softmax`), not rewritten: every one of those ops runs on its host
/// step (dot and softmax kernels, the runtime's copies) and the logits match the
/// interpreter's.
#[test]
fn decomposed_attention_runs_on_host_kernels() {
    use kiln::models::{build_model_with, BuildOptions};
    let config = ModelConfig::preset("tiny-llama").unwrap();
    assert!(
        config.num_attention_heads > config.num_kv_heads,
        "GQA repeats KV heads"
    );
    let options = BuildOptions {
        decompose_attention: true,
    };
    let graph = build_model_with(&config, Phase::Prefill, &options).unwrap();
    let ops: std::collections::BTreeSet<&str> = graph.nodes.iter().map(|n| n.op.name()).collect();
    for op in ["transpose", "matmul", "softmax", "causal_mask", "concat"] {
        assert!(ops.contains(op), "the decomposed graph has {op}: {ops:?}");
    }
    let mut rng = common::rng(common::fresh_seed(
        "decomposed_attention_runs_on_host_kernels",
    ));
    let weights = load_weights(&graph, None, rand::Rng::random(&mut rng)).unwrap();
    let prompt: Vec<i32> = (0..9)
        .map(|_| rand::Rng::random_range(&mut rng, 0..512))
        .collect();
    let mut inputs = kv_cache_state(&config, 16, 0.0);
    inputs.insert("input_ids".into(), Tensor::i32(&[1, 9], &prompt));
    let positions: Vec<i32> = (0..9).collect();
    inputs.insert("positions".into(), Tensor::i32(&[1, 9], &positions));
    inputs.insert("cache_start".into(), Tensor::i32(&[1], &[0]));
    host_plan_matches_the_interpreter(&graph, &weights, &inputs, 1e-4);
}

/// Quest decode attention on its host step (page selection, then the attention kernel over
/// the selected tokens) against the interpreter, with structure planted so that selection
/// matters: a few pages hold keys aligned with the query (they must be chosen, and they
/// dominate the result), the rest random; lengths differ per sequence and end mid-page;
/// cache rows past each length are NaN and must never be read. The result must also differ
/// from dense attention over the same cache (pages were really dropped).
#[test]
fn quest_attention_on_the_host_matches_the_interpreter() {
    use kiln::ir::graph::Graph;
    use kiln::ir::op::{InputKind, Op};
    use kiln::ir::shape::Shape;
    use std::collections::HashMap;

    let (batch, capacity, q_heads, kv_heads, d) = (2usize, 96usize, 8usize, 2usize, 32usize);
    let (page, budget) = (8usize, 24usize);
    let scale = 1.0 / (d as f32).sqrt();
    let graph_of = |op: Op| {
        let mut g = Graph::new("quest_layer");
        let q = g
            .input(
                "q",
                InputKind::Activation,
                DType::F32,
                Shape::of(&[batch, 1, q_heads, d]),
            )
            .unwrap();
        let lengths = g
            .input(
                "lengths",
                InputKind::Activation,
                DType::I32,
                Shape::of(&[batch]),
            )
            .unwrap();
        let cache = Shape::of(&[batch, capacity, kv_heads, d]);
        let k = g
            .input("k_cache", InputKind::State, DType::F32, cache.clone())
            .unwrap();
        let v = g
            .input("v_cache", InputKind::State, DType::F32, cache)
            .unwrap();
        let y = g.add1("attention", op, &[q, k, v, lengths]).unwrap();
        g.output("y", y);
        g
    };
    let quest = graph_of(Op::QuestAttentionDecode {
        scale,
        budget_tokens: budget,
        page_size: page,
    });
    let dense = graph_of(Op::AttentionDecode { scale });

    let mut rng = common::rng(common::fresh_seed("quest_attention_on_the_host"));
    let lens = [77usize, 90];
    let q = common::random(DType::F32, &[batch, 1, q_heads, d], 1.0, &mut rng);
    let mut caches = HashMap::new();
    for name in ["k_cache", "v_cache"] {
        let mut cache = common::random(DType::F32, &[batch, capacity, kv_heads, d], 0.3, &mut rng);
        let row = kv_heads * d;
        for (b, &len) in lens.iter().enumerate() {
            if name == "k_cache" {
                // Plant: pages 2 and 5 of every KV head hold keys along the group's query sum.
                for kv in 0..kv_heads {
                    let group = q_heads / kv_heads;
                    let mut direction = vec![0.0f32; d];
                    for h in kv * group..(kv + 1) * group {
                        for (e, x) in direction.iter_mut().enumerate() {
                            *x += q.data[(b * q_heads + h) * d + e];
                        }
                    }
                    for token in (2 * page..3 * page).chain(5 * page..6 * page) {
                        let at = (b * capacity + token) * row + kv * d;
                        for (x, &y) in cache.data[at..at + d].iter_mut().zip(&direction) {
                            *x = 0.5 * y;
                        }
                    }
                }
            }
            for x in &mut cache.data[(b * capacity + len) * row..(b + 1) * capacity * row] {
                *x = f32::NAN;
            }
        }
        caches.insert(name.to_string(), cache);
    }
    let mut inputs = caches;
    inputs.insert("q".into(), q);
    let lengths: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    inputs.insert("lengths".into(), Tensor::i32(&[batch], &lengths));
    let weights = kiln::ir::weights::Weights::new();
    let sparse = host_plan_matches_the_interpreter(&quest, &weights, &inputs, 1e-5);
    let dense = host_plan_matches_the_interpreter(&dense, &weights, &inputs, 1e-5);
    let difference = sparse["y"].relative_error(&dense["y"]);
    assert!(
        difference > 1e-3 && difference.is_finite(),
        "Quest dropped pages, so it differs from dense attention ({difference:.2e})"
    );
}

/// Atom's W4A4 linear (`AtomLinear`) on its host step — the activations permuted and
/// quantized per token, the int4 dot kernel over the ordinary channels (the weight packed once,
/// at load), the INT8 outlier block — against the interpreter, in f32 and bf16, over two calls
/// of one executor on fresh random inputs with heavy outlier channels. The step's output
/// starts as NaN, so an element the kernels miss fails the comparison.
#[test]
fn atom_linear_runs_as_a_host_step_and_matches_the_interpreter() {
    use kiln::ir::atom::{outlier_permutation, quantize_weight, AtomOptions};
    use kiln::ir::graph::Graph;
    use kiln::ir::op::{InputKind, Op};
    use kiln::ir::schedule::{schedule, Device, Family, ScheduleOptions};
    use kiln::ir::shape::Shape;
    use std::collections::HashMap;
    // 5 tokens: a tile of 4 rows and one of 1; 72 columns: a block of 64 and a tail.
    let (tokens, n, k) = (5, 72, 160);
    let options = AtomOptions {
        group_size: 32,
        outliers: 32,
        activation_clip: 0.9,
        ..AtomOptions::default()
    };
    let op = Op::AtomLinear {
        group_size: options.group_size,
        outliers: options.outliers,
        activation_clip: options.activation_clip,
    };
    let mut rng = common::rng(common::fresh_seed("atom_linear_on_the_host"));
    let w = common::random(DType::F32, &[n, k], 0.5, &mut rng);
    let mean_square: Vec<f64> = common::random(DType::F32, &[k], 1.0, &mut rng)
        .data
        .iter()
        .map(|&v| (v as f64).abs())
        .collect();
    let permutation = outlier_permutation(&mean_square, options.outliers);
    let weight = quantize_weight("w", &w, &permutation, &options).unwrap();
    let mut weights = kiln::ir::weights::Weights::new();
    for (suffix, tensor) in weight.parts() {
        weights.insert(&format!("w.{suffix}"), tensor.clone());
    }
    for dtype in [DType::F32, DType::BF16] {
        let mut g = Graph::new("atom_linear");
        let x = g
            .input("x", InputKind::Activation, dtype, Shape::of(&[tokens, k]))
            .unwrap();
        let mut operands = vec![x];
        for (suffix, tensor) in weight.parts() {
            let shape = Shape::of(&tensor.shape);
            let name = format!("w.{suffix}");
            operands.push(
                g.input(&name, InputKind::Weight, tensor.dtype, shape)
                    .unwrap(),
            );
        }
        let y = g.add1("atom", op.clone(), &operands).unwrap();
        g.output("y", y);
        let plan = schedule(&g, &ScheduleOptions::default()).unwrap();
        assert!(
            plan.kernels.iter().any(|k| k.device == Device::Cpu
                && matches!(k.family, Family::AtomLinear { n: 72, k: 160, .. })),
            "{:?}",
            plan.kernels
                .iter()
                .map(|k| k.family.describe())
                .collect::<Vec<_>>()
        );
        let mut executor = Executor::new(plan, &weights, None, &DeviceWeights::default()).unwrap();
        executor.poison_arena(true);
        for call in 0..2 {
            let mut x = common::random(DType::F32, &[tokens, k], 1.0, &mut rng);
            for row in x.data.chunks_mut(k) {
                for &c in &permutation[k - options.outliers..] {
                    row[c] *= 30.0;
                }
            }
            let inputs: HashMap<String, Tensor> = [("x".to_string(), x.cast(dtype))].into();
            let got = executor.run(&inputs).unwrap();
            let want = kiln::ir::interp::run_with(&g, |name| {
                inputs.get(name).or_else(|| weights.get(name))
            })
            .unwrap();
            let what = format!("atom_linear {dtype} call {call}");
            common::assert_close(&what, &got["y"], &want["y"], common::tolerance(dtype));
        }
        assert_eq!(executor.stats().cpu_kernels, 2);
    }
}

/// A host step whose op has no CPU kernel (a stand-alone quantization) is refused when the
/// executor is made, naming the kernel and the op; nothing falls back to an interpreter.
/// The MoE router with its linear fused (`MoeRouterLinear`) on its host step — the dot
/// kernel's logits rounded to the dtype, then the softmax kernel and the top-k — in f32 and
/// in bf16 (forced onto the host), against the interpreter: experts exactly, weights within
/// the f32 tolerance. Grid values make the logits exact and ties common; planted: experts 1
/// and 6 have equal weight rows aligned with token 0 (tied above the rest there: 1 first),
/// and token 1 is all zeros (every logit ties: experts 0, 1, 2 in order, equal weights).
#[test]
fn the_fused_router_runs_as_a_host_step_and_matches_the_interpreter() {
    use kiln::ir::graph::Graph;
    use kiln::ir::op::{InputKind, Op};
    use kiln::ir::schedule::ScheduleOptions;
    use kiln::ir::schedule::{schedule, Device, Family, ForceCpu, MoeStage, Pass};
    use kiln::ir::shape::Shape;
    let mut rng = common::rng(common::fresh_seed(
        "the_fused_router_runs_as_a_host_step_and_matches_the_interpreter",
    ));
    let (tokens, experts, hidden, top_k) = (9usize, 8usize, 64usize, 3usize);
    for dtype in [DType::F32, DType::BF16] {
        let mut g = Graph::new("router_linear");
        let x = g
            .input(
                "x",
                InputKind::Activation,
                dtype,
                Shape::of(&[1, tokens, hidden]),
            )
            .unwrap();
        let w = g
            .input(
                "router.weight",
                InputKind::Weight,
                dtype,
                Shape::of(&[experts, hidden]),
            )
            .unwrap();
        let router = Op::MoeRouterLinear {
            top_k,
            normalize: true,
        };
        let routed = g.add("router", router, &[x, w]).unwrap();
        g.output("weights", routed[0]);
        g.output("experts", routed[1]);

        let mut plan = schedule(&g, &ScheduleOptions::default()).unwrap();
        assert!(matches!(
            plan.kernels[0].family,
            Family::Moe {
                stage: MoeStage::Router {
                    hidden: Some(64),
                    ..
                },
                ..
            }
        ));
        ForceCpu {
            kernels: plan
                .kernels
                .iter()
                .map(|k| (k.name.clone(), "this test runs the host step".to_string()))
                .collect(),
        }
        .run(&mut plan);
        assert!(plan.kernels.iter().all(|k| k.device == Device::Cpu));

        let mut x_value = common::grid(dtype, &[1, tokens, hidden], 0.25, &mut rng);
        let mut w_value = common::grid(dtype, &[experts, hidden], 0.125, &mut rng);
        x_value.data[hidden..2 * hidden].fill(0.0);
        for e in [1, 6] {
            for (i, v) in w_value.data[e * hidden..(e + 1) * hidden]
                .iter_mut()
                .enumerate()
            {
                *v = x_value.data[i] * 0.5;
            }
        }
        let mut weights = kiln::ir::weights::Weights::new();
        weights.insert("router.weight", w_value);
        let mut inputs = std::collections::HashMap::new();
        inputs.insert("x".to_string(), x_value);

        let mut executor = Executor::new(plan, &weights, None, &DeviceWeights::default()).unwrap();
        let got = executor.run(&inputs).unwrap();
        assert!(executor.stats().cpu_kernels > 0);
        let want =
            kiln::ir::interp::run_with(&g, |name| inputs.get(name).or_else(|| weights.get(name)))
                .unwrap();
        assert_eq!(got["experts"], want["experts"], "{dtype}: experts");
        common::assert_close(
            &format!("{dtype}: weights"),
            &got["weights"],
            &want["weights"],
            common::tolerance(DType::F32),
        );
        let chosen = got["experts"].to_i32();
        assert_eq!(
            &chosen[..2],
            &[1, 6],
            "{dtype}: the planted tie, lower index first"
        );
        assert_eq!(
            &chosen[top_k..2 * top_k],
            &[0, 1, 2],
            "{dtype}: a row of ties"
        );
        let zero_row = &got["weights"].data[top_k..2 * top_k];
        assert!(
            zero_row.iter().all(|&v| (v - 1.0 / 3.0).abs() < 1e-6),
            "{zero_row:?}"
        );
    }
}

#[test]
fn a_host_step_without_a_cpu_kernel_is_refused() {
    use kiln::ir::graph::Graph;
    use kiln::ir::op::{InputKind, Op, QuantScheme};
    use kiln::ir::schedule::{schedule, ScheduleOptions};
    use kiln::ir::shape::Shape;
    let mut g = Graph::new("quantize_only");
    let x = g
        .input("x", InputKind::Activation, DType::F32, Shape::of(&[4, 64]))
        .unwrap();
    let scheme = QuantScheme {
        bits: 4,
        group_size: 32,
        symmetric: true,
        clip: 1.0,
    };
    let outputs = g.add("quantize", Op::Quantize { scheme }, &[x]).unwrap();
    for (i, &y) in outputs.iter().enumerate() {
        g.output(&format!("y{i}"), y);
    }
    let plan = schedule(&g, &ScheduleOptions::default()).unwrap();
    let err = Executor::new(
        plan,
        &kiln::ir::weights::Weights::new(),
        None,
        &DeviceWeights::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, ExecError::NoCpuKernel { op, .. } if op == "quantize"),
        "{err}"
    );
    assert!(err.to_string().contains("quantize"), "{err}");
}
