//! End-to-end tests of the `kiln` binary: the default job, `inspect`, and the error messages
//! users see for bad input.

use kiln::models::weights::WeightsIo;
use std::path::Path;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("the kiln binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn no_arguments_runs_tiny_mixtral_and_reports_tokens_per_second() {
    let output = kiln(&[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("tiny-mixtral"), "{text}");
    let tokens_line = text
        .lines()
        .find(|l| l.starts_with("tokens"))
        .expect("a tokens line");
    let tokens: Vec<u32> = tokens_line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().expect("token ids are numbers"))
        .collect();
    assert_eq!(tokens.len(), 16);
    assert!(
        tokens.iter().all(|&t| t < 512),
        "ids inside the vocabulary: {tokens:?}"
    );
    assert!(text.contains("tokens/s"), "{text}");
}

#[test]
fn run_is_deterministic_and_json_matches_text() {
    let a = kiln(&["run", "--json", "-n", "6", "--model", "tiny-llama"]);
    let b = kiln(&["run", "--json", "-n", "6", "--model", "tiny-llama"]);
    assert!(a.status.success(), "{}", stderr(&a));
    let parse = |o: &Output| -> serde_json::Value { serde_json::from_slice(&o.stdout).unwrap() };
    let (ja, jb) = (parse(&a), parse(&b));
    assert_eq!(ja["tokens"], jb["tokens"]);
    assert_eq!(ja["tokens"].as_array().unwrap().len(), 6);
    let other_seed = parse(&kiln(&[
        "run",
        "--json",
        "-n",
        "6",
        "--model",
        "tiny-llama",
        "--seed",
        "1",
    ]));
    assert_ne!(
        ja["tokens"], other_seed["tokens"],
        "the seed changes the weights"
    );
}

fn parameters(model: &str) -> f64 {
    let output = kiln(&["inspect", model, "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    report["parameters"]["total"].as_f64().unwrap()
}

#[test]
fn inspect_reports_published_parameter_counts() {
    let mixtral = parameters("mixtral-8x7b") / 1e9;
    assert!(
        (mixtral / 46.7 - 1.0).abs() < 0.01,
        "mixtral-8x7b: {mixtral} B"
    );
    let llama = parameters("llama-3-8b") / 1e9;
    assert!((llama / 8.0 - 1.0).abs() < 0.01, "llama-3-8b: {llama} B");
}

#[test]
fn inspect_table_lists_per_op_costs_for_both_phases() {
    let output = kiln(&["inspect", "tiny-mixtral"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    for needle in [
        "parameters",
        "prefill (",
        "decode (",
        "moe_expert_ffn",
        "attention_decode",
        "total",
    ] {
        assert!(text.contains(needle), "missing {needle}:\n{text}");
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn bad_config_errors_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    // 5 heads do not divide a hidden size of 64.
    let inconsistent = write(
        dir.path(),
        "inconsistent.json",
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 5,
            "num_key_value_heads": 5, "vocab_size": 32}"#,
    );
    let output = kiln(&["inspect", &inconsistent]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("inconsistent.json"), "{message}");
    assert!(message.contains("num_attention_heads"), "{message}");

    let missing = write(
        dir.path(),
        "missing.json",
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}"#,
    );
    let output = kiln(&["inspect", &missing]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("missing.json") && message.contains("missing field"),
        "{message}"
    );

    let unknown = write(
        dir.path(),
        "unknown.json",
        r#"{"architectures": ["GPT2LMHeadModel"]}"#,
    );
    let message = stderr(&kiln(&["inspect", &unknown]));
    assert!(message.contains("GPT2LMHeadModel"), "{message}");

    let output = kiln(&["inspect", "no-such-model"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("tiny-mixtral"),
        "lists the presets: {}",
        stderr(&output)
    );
}

/// Saves random weights of `model` (built for `phase` prefill) into `path`.
fn save_weights(model: &str, path: &Path) {
    use kiln::models::{build_model, ModelConfig, Phase};
    let config = ModelConfig::preset(model).unwrap();
    let graph = build_model(&config, Phase::Prefill).unwrap();
    let weights = kiln::model_source::load_weights(&graph, None, 3).unwrap();
    weights.save(path).unwrap();
}

#[test]
fn bad_weights_errors_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "model.safetensors",
        "not a safetensors file at all",
    );
    let output = kiln(&[
        "run",
        "--model",
        "tiny-llama",
        "--weights",
        &path,
        "-n",
        "1",
    ]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("model.safetensors"),
        "{}",
        stderr(&output)
    );

    // tiny-llama's weights lack tiny-mixtral's experts.
    let llama = dir.path().join("llama.safetensors");
    save_weights("tiny-llama", &llama);
    let llama = llama.to_string_lossy().into_owned();
    let output = kiln(&[
        "run",
        "--model",
        "tiny-mixtral",
        "--weights",
        &llama,
        "-n",
        "1",
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("model.embed_tokens.weight") || message.contains("block_sparse_moe"),
        "{message}"
    );
    assert!(message.contains("llama.safetensors"), "{message}");

    // The right weights load and run.
    let output = kiln(&[
        "run",
        "--model",
        "tiny-llama",
        "--weights",
        &llama,
        "-n",
        "2",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn bad_prompt_is_a_clear_error() {
    let output = kiln(&[
        "run",
        "--model",
        "tiny-llama",
        "--prompt-ids",
        "1,99999",
        "-n",
        "1",
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("99999") && message.contains("vocabulary"),
        "{message}"
    );
}

#[test]
fn bench_without_a_gpu_is_a_clear_error() {
    let output = kiln(&["bench", "gemm"]);
    if kiln_runtime::cuda::driver_present() {
        // On a GPU machine the suite runs; its numbers belong in bench/RESULTS.md.
        return;
    }
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("no CUDA driver found"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
}

#[test]
fn run_with_quest_on_the_cpu_reports_tokens() {
    // 8 prompt tokens + 16 generated in pages of 4 against a 4-page budget: layer 1 selects.
    let output = kiln(&[
        "run",
        "--model",
        "tiny-llama",
        "--device",
        "cpu",
        "--quest-budget",
        "16",
        "--quest-page-size",
        "4",
        "--quest-skip-layers",
        "1",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains(
            "quest budget 16 tokens, page size 4, skip layers 1: 1 decode attention kernel(s) on Quest"
        ),
        "{text}"
    );
    let tokens_line = text
        .lines()
        .find(|l| l.starts_with("tokens"))
        .expect("a tokens line");
    assert_eq!(tokens_line.split_whitespace().count(), 17, "{text}");
    assert!(text.contains("tokens/s"), "{text}");
}

#[test]
fn bad_quest_flags_are_clear_errors() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["--quest-budget", "60"],
            "--quest-budget 60: expected a positive multiple of the page size (--quest-page-size 16)",
        ),
        (
            &["--quest-budget", "0"],
            "--quest-budget 0: expected a positive multiple",
        ),
        (
            &["--quest-budget", "64", "--quest-page-size", "12"],
            "--quest-page-size 12: expected a power of two",
        ),
        (
            &["--quest-budget", "16"],
            "--quest-budget 16: expected at least two pages (32 tokens",
        ),
        (
            &["--quest-page-size", "8"],
            "--quest-page-size needs --quest-budget",
        ),
    ];
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("plan");
    for (flags, part) in cases {
        for command in ["run", "compile"] {
            let mut args = vec![command, "--model", "tiny-llama"];
            if command == "compile" {
                args.extend(["-o", dir.to_str().unwrap()]);
            } else {
                args.extend(["--device", "cpu", "-n", "1"]);
            }
            args.extend(flags);
            let output = kiln(&args);
            assert!(!output.status.success(), "kiln {args:?} succeeded");
            let message = stderr(&output);
            assert!(
                message.contains(part),
                "kiln {args:?}: expected `{part}` in: {message}"
            );
            assert!(!message.contains("panicked"), "{message}");
        }
    }
    assert!(!dir.exists(), "nothing is written on a bad flag");
    let output = kiln(&[
        "run",
        "--device",
        "reference",
        "--quest-budget",
        "64",
        "-n",
        "1",
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("--quest-budget needs compiled plans"),
        "{message}"
    );
}

#[test]
fn bad_numbers_name_their_flag() {
    let output = kiln(&[
        "embed",
        "--data",
        "translating-squares",
        "--time-limit",
        "0",
    ]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--time-limit"),
        "{}",
        stderr(&output)
    );
    let output = kiln(&[
        "run",
        "--model",
        "tiny-llama",
        "--prompt-len",
        "0",
        "--device",
        "cpu",
    ]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--prompt-len"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_random_prompt_of_the_asked_length_runs() {
    let output = kiln(&[
        "run",
        "--model",
        "tiny-llama",
        "--prompt-len",
        "70",
        "-n",
        "3",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(json["prompt"].as_array().unwrap().len(), 70);
    assert_eq!(json["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(json["decode_step_ms"].as_array().unwrap().len(), 2);
    assert!(json["decode_ms_per_token_median"].as_f64().unwrap() > 0.0);
}

#[test]
fn embed_report_counts_the_threads_it_ran_on() {
    let dir = tempfile::tempdir().unwrap();
    for threads in ["1", "3"] {
        let report = dir.path().join(format!("report{threads}.json"));
        let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .env("RAYON_NUM_THREADS", threads)
            .args([
                "embed",
                "--quiet",
                "--data",
                "translating-squares",
                "--method",
                "numax",
            ])
            .args(["--delta", "0.4", "--max-iter", "3", "-o"])
            .arg(dir.path().join("phi.csv"))
            .arg("--report")
            .arg(&report)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(json["threads"].as_u64().unwrap().to_string(), threads);
    }
}

/// `kiln compile --model tiny-llama [--target TARGET] -o ROOT/NAME`, which must succeed; the
/// artifact's directory.
fn compile_tiny(root: &std::path::Path, name: &str, target: Option<&str>) -> String {
    let dir = root.join(name).to_str().unwrap().to_string();
    let mut args = vec!["compile", "--model", "tiny-llama", "-o", &dir];
    if let Some(target) = target {
        args.extend(["--target", target]);
    }
    let output = kiln(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    dir
}

#[test]
fn a_compiled_artifact_runs_like_the_model() {
    let root = tempfile::tempdir().unwrap();
    let dir = compile_tiny(root.path(), "tiny", Some("cpu"));
    let dir = dir.as_str();
    let plan = std::fs::read_to_string(std::path::Path::new(dir).join("plan.json")).unwrap();
    assert!(plan.contains("\"schema_version\": 1") && plan.contains("\"name\": \"cpu\""));
    let run = |args: &[&str]| {
        let mut all = vec!["run", "--json", "-n", "6", "--seed", "4"];
        all.extend(args);
        let output = kiln(&all);
        assert!(output.status.success(), "{}", stderr(&output));
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        json
    };
    let compiled = run(&["--compiled", dir]);
    let direct = run(&["--model", "tiny-llama", "--device", "cpu"]);
    assert_eq!(compiled["tokens"], direct["tokens"]);
    assert_eq!(compiled["tokens"].as_array().unwrap().len(), 6);
    let device = compiled["device"].as_str().unwrap();
    assert!(device.contains("0 generated at run time"), "{device}");
}

#[test]
fn bad_artifacts_are_one_clear_line() {
    let root = tempfile::tempdir().unwrap();
    let dir_text = &compile_tiny(root.path(), "tiny", None);
    let dir = std::path::Path::new(dir_text);
    // A GPU artifact on a machine without one (CI) or with one, after each corruption.
    let plan = dir.join("plan.json");
    let text = std::fs::read_to_string(&plan).unwrap();
    let cases: Vec<(String, &str)> = vec![
        (text[..text.len() / 3].to_string(), "is not a kiln plan"),
        (
            text.replacen("\"schema_version\": 1", "\"schema_version\": 7", 1),
            "`schema_version` is 7",
        ),
    ];
    for (contents, part) in cases {
        std::fs::write(&plan, contents).unwrap();
        let output = kiln(&["run", "--compiled", dir_text, "-n", "1"]);
        assert!(!output.status.success());
        let message = stderr(&output);
        assert!(
            message.contains(part) && message.contains("plan.json"),
            "{message}"
        );
        assert!(!message.contains("panicked"), "{message}");
    }
    let output = kiln(&[
        "run",
        "--compiled",
        root.path().join("none").to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("none/plan.json"),
        "{}",
        stderr(&output)
    );
    // --compiled takes the model from the artifact.
    let output = kiln(&["run", "--compiled", dir_text, "--model", "tiny-llama"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("cannot be used with"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn weights_that_do_not_match_the_artifact_are_named() {
    let root = tempfile::tempdir().unwrap();
    let dir_text = &compile_tiny(root.path(), "tiny", Some("cpu"));
    // tiny-mixtral's checkpoint: other shapes, and none of tiny-llama's MLP weights.
    let config = kiln::models::ModelConfig::preset("tiny-mixtral").unwrap();
    let graph = kiln::models::build_model(&config, kiln::models::Phase::Prefill).unwrap();
    let weights = kiln::model_source::load_weights(&graph, None, 1).unwrap();
    let file = root.path().join("mixtral.safetensors");
    weights.save(&file).unwrap();
    let output = kiln(&[
        "run",
        "--compiled",
        dir_text,
        "--weights",
        file.to_str().unwrap(),
        "-n",
        "1",
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("mixtral.safetensors") && message.contains("expected"),
        "{message}"
    );
    assert!(message.contains("weight `"), "names the tensor: {message}");
    assert!(!message.contains("panicked"), "{message}");
}

#[test]
fn an_artifact_for_another_machine_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = &compile_tiny(root.path(), "a100", Some("sm_80"));
    // Without a GPU (CI) it needs one; on an H100/H200 it is the wrong device.
    let output = kiln(&["run", "--compiled", dir, "-n", "2"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        (message.contains("compiled for sm_80 and needs a CUDA device")
            && message.contains("--target cpu"))
            || (message.contains("compiled for sm_80 (compute capability 8.0, 108 SMs)")
                && message.contains("recompile")),
        "{message}"
    );
    assert!(!message.contains("panicked"), "{message}");
}

/// `--layers N` keeps the first N decoder layers: two layers of Mixtral 8x7B compile for an
/// H100 with every step of both phases on the GPU (its MoE layers included), and the
/// artifact says which layers it holds.
#[test]
fn a_two_layer_mixtral_compiles_with_every_step_on_the_gpu() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("mixtral2");
    let output = kiln(&[
        "compile",
        "--model",
        "mixtral-8x7b",
        "--layers",
        "2",
        "--target",
        "sm_90",
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = stdout(&output);
    let placements: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("after rewriting"))
        .collect();
    assert_eq!(placements.len(), 2, "{report}");
    for line in placements {
        assert!(line.contains(" 0 cpu)"), "{line}");
    }
    assert!(
        report.contains("moe_gate_up_bf16_e8_h4096_i14336_k2"),
        "{report}"
    );
    let plan = std::fs::read_to_string(dir.join("plan.json")).unwrap();
    assert!(plan.contains("first 2 of 32 layers"));
}

#[test]
fn bad_layer_counts_name_the_flag() {
    for layers in ["0", "3"] {
        let output = kiln(&["run", "--model", "tiny-llama", "--layers", layers]);
        assert!(!output.status.success());
        let text = stderr(&output);
        assert!(text.contains(&format!("--layers {layers}")), "{text}");
        assert!(text.contains("expected 1..=2"), "{text}");
        assert_eq!(text.trim().lines().count(), 1, "{text}");
    }
    let output = kiln(&["run", "--compiled", "/nonexistent", "--layers", "1"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("--layers"), "{}", stderr(&output));
}

/// Writes `weights` of a llama `config` as an all-F32 GGUF v3 file (llama.cpp's names and
/// metadata, q/k rows permuted as `convert_hf_to_gguf.py` does): a test-only writer.
fn write_llama_gguf(
    path: &Path,
    config: &kiln::models::ModelConfig,
    weights: &kiln::ir::weights::Weights,
) {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let u32_keys = [
        ("llama.block_count", config.num_layers),
        ("llama.context_length", config.max_position_embeddings),
        ("llama.embedding_length", config.hidden_size),
        ("llama.feed_forward_length", config.intermediate_size),
        ("llama.attention.head_count", config.num_attention_heads),
        ("llama.attention.head_count_kv", config.num_kv_heads),
    ];
    let f32_keys = [
        ("llama.rope.freq_base", config.rope_theta),
        (
            "llama.attention.layer_norm_rms_epsilon",
            config.rms_norm_eps,
        ),
    ];
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (name, tensor) in weights.iter() {
        let gguf = match name {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            "lm_head.weight" => "output.weight".to_string(),
            _ => {
                let rest = name.strip_prefix("model.layers.").unwrap();
                let (layer, rest) = rest.split_once('.').unwrap();
                let part = match rest {
                    "input_layernorm.weight" => "attn_norm",
                    "post_attention_layernorm.weight" => "ffn_norm",
                    "self_attn.q_proj.weight" => "attn_q",
                    "self_attn.k_proj.weight" => "attn_k",
                    "self_attn.v_proj.weight" => "attn_v",
                    "self_attn.o_proj.weight" => "attn_output",
                    "mlp.gate_proj.weight" => "ffn_gate",
                    "mlp.up_proj.weight" => "ffn_up",
                    "mlp.down_proj.weight" => "ffn_down",
                    other => panic!("no GGUF name for {other}"),
                };
                format!("blk.{layer}.{part}.weight")
            }
        };
        let mut data = tensor.data.clone();
        let heads = if gguf.ends_with("attn_q.weight") {
            Some(config.num_attention_heads)
        } else if gguf.ends_with("attn_k.weight") {
            Some(config.num_kv_heads)
        } else {
            None
        };
        if let Some(heads) = heads {
            // HF permute: reshape(heads, 2, rows/heads/2, cols).swapaxes(1, 2).
            let (rows, columns) = (tensor.shape[0], tensor.shape[1]);
            let half = rows / heads / 2;
            data.clear();
            for h in 0..heads {
                for j in 0..half {
                    for t in 0..2 {
                        let row = (h * 2 + t) * half + j;
                        data.extend_from_slice(&tensor.data[row * columns..(row + 1) * columns]);
                    }
                }
            }
        }
        tensors.push((gguf, tensor.shape.clone(), data));
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend(((1 + u32_keys.len() + f32_keys.len()) as u64).to_le_bytes());
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    string(&mut out, "llama");
    for (key, value) in u32_keys {
        string(&mut out, key);
        out.extend(4u32.to_le_bytes());
        out.extend((value as u32).to_le_bytes());
    }
    for (key, value) in f32_keys {
        string(&mut out, key);
        out.extend(6u32.to_le_bytes());
        out.extend(value.to_le_bytes());
    }
    let mut offset = 0u64;
    for (name, shape, data) in &tensors {
        string(&mut out, name);
        out.extend((shape.len() as u32).to_le_bytes());
        for &n in shape.iter().rev() {
            out.extend((n as u64).to_le_bytes());
        }
        out.extend(0u32.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (data.len() as u64 * 4).div_ceil(32) * 32;
    }
    for (_, _, data) in &tensors {
        out.resize(out.len().div_ceil(32) * 32, 0);
        out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn a_gguf_model_runs_like_its_safetensors_twin() {
    use kiln::models::{build_model, ModelConfig, Phase};
    let dir = tempfile::tempdir().unwrap();
    let config = ModelConfig::preset("tiny-llama").unwrap();
    let graph = build_model(&config, Phase::Prefill).unwrap();
    let weights = kiln::model_source::load_weights(&graph, None, 3).unwrap();
    let safetensors = dir.path().join("tiny.safetensors");
    weights.save(&safetensors).unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_llama_gguf(&gguf, &config, &weights);
    let (safetensors, gguf) = (safetensors.to_str().unwrap(), gguf.to_str().unwrap());

    let run = |args: &[&str]| {
        let mut all = vec!["run", "--json", "-n", "5", "--device", "reference"];
        all.extend(args);
        let output = kiln(&all);
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let twin = run(&["--model", "tiny-llama", "--weights", safetensors]);
    let from_gguf = run(&["--model", gguf]);
    assert_eq!(from_gguf["tokens"], twin["tokens"]);
    assert_eq!(from_gguf["tokens"].as_array().unwrap().len(), 5);

    // --weights beside a GGUF model is refused; inspect and compile read its metadata.
    let output = kiln(&["run", "--model", gguf, "--weights", safetensors, "-n", "1"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("--weights") && message.contains("tiny.gguf"),
        "{message}"
    );
    let output = kiln(&["inspect", gguf, "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let artifact = dir.path().join("artifact");
    let artifact = artifact.to_str().unwrap();
    let output = kiln(&[
        "compile", "--model", gguf, "--target", "cpu", "-o", artifact,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    // The artifact runs with the GGUF file as its weights, as with the safetensors twin.
    let compiled = |weights: &str| {
        let args = [
            "run",
            "--json",
            "-n",
            "5",
            "--compiled",
            artifact,
            "--weights",
            weights,
        ];
        let output = kiln(&args);
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()["tokens"].clone()
    };
    assert_eq!(compiled(gguf), compiled(safetensors));

    // A bad GGUF file is one line naming it.
    std::fs::write(dir.path().join("bad.gguf"), b"GGUF\x09\0\0\0").unwrap();
    let bad = dir.path().join("bad.gguf");
    let output = kiln(&["inspect", bad.to_str().unwrap()]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("bad.gguf") && message.contains("unsupported GGUF version 9"),
        "{message}"
    );
}

/// A word-level tokenizer.json: `<s>` 0, `</s>` 1 (special), then `w2`..`w{n-1}`, split on
/// whitespace, decoded joined by spaces.
fn word_tokenizer(n: usize) -> String {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<s>".into(), 0.into());
    vocab.insert("</s>".into(), 1.into());
    for i in 2..n {
        vocab.insert(format!("w{i}"), i.into());
    }
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<s>"), special(1, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<s>"}
    })
    .to_string()
}

/// A Hugging Face model directory: tiny-llama's config.json (vocab_size 512) and a
/// tokenizer.json of `tokens` words.
fn model_dir(tokens: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = include_str!("../models/src/presets/tiny-llama.json");
    write(dir.path(), "config.json", config);
    write(dir.path(), "tokenizer.json", &word_tokenizer(tokens));
    dir
}

/// The text of generated ids under [`word_tokenizer`]: special tokens dropped, words joined
/// by spaces.
fn words(ids: &[u64]) -> String {
    ids.iter()
        .filter(|&&id| id > 1)
        .map(|id| format!("w{id}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn prompt_text_is_encoded_and_the_text_streamed() {
    let dir = model_dir(512);
    let model = dir.path().to_string_lossy().into_owned();
    let args = [
        "run",
        "--model",
        &model,
        "--device",
        "reference",
        "--prompt",
        "w7 w300 w9",
    ];
    let json = kiln(&[&args[..], &["--json", "--max-tokens", "6"]].concat());
    assert!(json.status.success(), "{}", stderr(&json));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["prompt"], serde_json::json!([7, 300, 9]));
    let tokens: Vec<u64> = report["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert!(!tokens.is_empty() && tokens.len() <= 6, "{tokens:?}");
    assert_eq!(report["text"].as_str().unwrap(), words(&tokens));

    // Without --json the same text is on stdout, and the speeds on stderr.
    let plain = kiln(&[&args[..], &["--max-tokens", "6"]].concat());
    assert!(plain.status.success(), "{}", stderr(&plain));
    assert_eq!(stdout(&plain), format!("{}\n", words(&tokens)));
    let message = stderr(&plain);
    assert!(
        message.contains("prefill 3 tokens") && message.contains("tokens/s"),
        "{message}"
    );
}

#[test]
fn generation_stops_at_eos_and_chat_wraps_the_prompt() {
    let dir = model_dir(512);
    // Every id is an EOS id: generation ends after the first token.
    let all: Vec<usize> = (0..512).collect();
    write(
        dir.path(),
        "generation_config.json",
        &serde_json::json!({ "eos_token_id": all }).to_string(),
    );
    write(
        dir.path(),
        "tokenizer_config.json",
        r#"{"bos_token": "<s>", "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{% for m in messages %}w5 {{ m.content }}{% endfor %}{% if add_generation_prompt %} w6{% endif %}"}"#,
    );
    let model = dir.path().to_string_lossy().into_owned();
    let output = kiln(&[
        "run",
        "--model",
        &model,
        "--device",
        "reference",
        "--prompt",
        "w42",
        "--chat",
        "--max-tokens",
        "8",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["prompt"], serde_json::json!([0, 5, 42, 6]));
    assert_eq!(report["tokens"].as_array().unwrap().len(), 1);
    assert_eq!(report["stopped"], true);
}

#[test]
fn prompt_text_errors_are_clear() {
    // A preset has no tokenizer.
    let output = kiln(&["run", "--model", "tiny-llama", "--prompt", "Hello"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("--prompt") && message.contains("tokenizer.json"),
        "{message}"
    );
    assert!(message.contains("--prompt-ids"), "{message}");

    // More tokens than the model has embeddings.
    let dir = model_dir(600);
    let model = dir.path().to_string_lossy().into_owned();
    let message = stderr(&kiln(&["run", "--model", &model, "--prompt", "w3"]));
    assert!(
        message.contains("600") && message.contains("512") && message.contains("tokenizer.json"),
        "{message}"
    );

    // A tokenizer.json that does not parse.
    let dir = model_dir(10);
    let path = write(dir.path(), "tokenizer.json", "{\"model\": {}}");
    let model = dir.path().to_string_lossy().into_owned();
    let message = stderr(&kiln(&["run", "--model", &model, "--prompt", "w3"]));
    assert!(message.contains(&path), "{message}");

    // --chat without --prompt, and sampling flags out of range.
    assert!(!kiln(&["run", "--chat"]).status.success());
    let message = stderr(&kiln(&["run", "--top-p", "2", "--temperature", "1"]));
    assert!(message.contains("--top-p"), "{message}");
}

#[test]
fn sampling_with_a_seed_replays() {
    let args = [
        "run",
        "--model",
        "tiny-llama",
        "--device",
        "reference",
        "--json",
        "-n",
        "8",
        "--temperature",
        "1.5",
        "--top-p",
        "0.9",
        "--seed",
    ];
    let tokens = |seed: &str| {
        let output = kiln(&[&args[..], &[seed]].concat());
        assert!(output.status.success(), "{}", stderr(&output));
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        report["tokens"].clone()
    };
    let two = tokens("2");
    assert_eq!(two, tokens("2"), "a seed replays");
    assert_ne!(two, tokens("3"), "another seed samples other tokens");
}

#[test]
fn run_help_explains_the_text_flags() {
    let help = stdout(&kiln(&["run", "--help"]));
    for flag in [
        "--prompt <TEXT>",
        "--chat",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--prompt-ids",
        "--tokenizer",
    ] {
        assert!(help.contains(flag), "missing {flag}:\n{help}");
    }
}

/// `--atom` runs on the interpreter, says what it quantized, and refuses what it cannot do
/// (GPU plans, a 4-bit KV cache on CPU plans, misfit layers) with errors that name the flag
/// or the layer.
#[test]
fn atom_runs_on_the_reference_and_refuses_gpu_plans_and_misfit_layers() {
    // `kiln run --model tiny-llama --atom` with `extra` flags.
    let atom = |extra: &[&str]| {
        let mut args = vec!["run", "--model", "tiny-llama", "--atom"];
        args.extend_from_slice(extra);
        kiln(&args)
    };
    // The run failed and its stderr says `needle`.
    let fails_saying = |output: Output, needle: &str| {
        assert!(!output.status.success(), "{needle}: the run succeeded");
        let message = stderr(&output);
        assert!(message.contains(needle), "{message}");
        message
    };

    let ok = atom(&["--device", "reference", "-n", "3"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let log = stderr(&ok);
    assert!(log.contains("linear layers in W4A4"), "{log}");
    assert!(
        stdout(&ok).contains("Atom W4A4 (group 128, 128 INT8 outliers"),
        "{}",
        stdout(&ok)
    );

    let kv4 = atom(&["--device", "reference", "--atom-kv-bits", "4", "-n", "3"]);
    assert!(kv4.status.success(), "{}", stderr(&kv4));
    assert!(
        stderr(&kv4).contains("4 KV-cache appends write 4-bit rows"),
        "{}",
        stderr(&kv4)
    );

    fails_saying(
        atom(&["--device", "cuda"]),
        "`atom_linear` has no GPU kernel yet",
    );
    fails_saying(
        atom(&["--device", "cpu", "--atom-kv-bits", "4"]),
        "--atom-kv-bits 4",
    );
    let message = fails_saying(
        atom(&["--device", "reference", "--atom-outliers", "100"]),
        "atom: `model.layers.0.",
    );
    assert!(
        message.contains("not a multiple of group_size 128"),
        "{message}"
    );

    let without = kiln(&["run", "--model", "tiny-llama", "--atom-outliers", "4"]);
    fails_saying(without, "--atom");
}

/// `kiln run --atom --device cpu` compiles the Atom graphs into CPU plans (the W4A4 linears
/// on the int4 dot kernel) and decodes the interpreter's tokens; a group size the kernel does
/// not take is a compile error that says why.
#[test]
fn atom_cpu_plans_decode_the_reference_tokens() {
    let run = |device: &str, extra: &[&str]| {
        let mut args = vec!["run", "--model", "tiny-llama", "--device", device, "--atom"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-n", "6", "--json"]);
        kiln(&args)
    };
    let json = |o: &Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", stderr(o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let reference = json(&run("reference", &[]));
    let cpu = json(&run("cpu", &[]));
    assert_eq!(cpu["tokens"], reference["tokens"]);
    let device = cpu["device"].as_str().unwrap();
    assert!(
        device.contains("compiled plans on cpu") && device.contains("Atom W4A4 (group 128"),
        "{device}"
    );
    // Smaller groups and fewer outliers (every layer of tiny-llama still fits).
    let small = ["--atom-group-size", "32", "--atom-outliers", "32"];
    assert_eq!(
        json(&run("cpu", &small))["tokens"],
        json(&run("reference", &small))["tokens"]
    );
    let odd = run("cpu", &["--atom-group-size", "8", "--atom-outliers", "32"]);
    assert!(!odd.status.success());
    assert!(
        stderr(&odd).contains("group size 8 is not a multiple of 16"),
        "{}",
        stderr(&odd)
    );
}

/// `kiln quantize --atom` writes the Atom weights once; `kiln run --atom --weights FILE`
/// reads them without calibrating and decodes the same tokens as quantizing on the fly
/// (same seed, so the same calibration); other options than the file's are refused.
#[test]
fn quantize_atom_writes_weights_that_run_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiny-llama-atom.safetensors");
    let path = file.to_str().unwrap();
    let quantized = kiln(&["quantize", "--model", "tiny-llama", "--atom", "-o", path]);
    assert!(quantized.status.success(), "{}", stderr(&quantized));
    assert!(
        stdout(&quantized).contains("packed"),
        "{}",
        stdout(&quantized)
    );
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--model",
            "tiny-llama",
            "--device",
            "reference",
            "--atom",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-n", "6", "--json"]);
        kiln(&args)
    };
    let on_the_fly = run(&[]);
    let from_file = run(&["--weights", path]);
    assert!(from_file.status.success(), "{}", stderr(&from_file));
    assert!(
        stderr(&from_file).contains("quantized weights read from"),
        "{}",
        stderr(&from_file)
    );
    let tokens = |o: &Output| -> serde_json::Value {
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["tokens"].clone()
    };
    assert_eq!(tokens(&from_file), tokens(&on_the_fly));
    let other = run(&["--weights", path, "--atom-group-size", "64"]);
    assert!(!other.status.success());
    assert!(
        stderr(&other).contains("quantized with other --atom options?"),
        "{}",
        stderr(&other)
    );
    let no_scheme = kiln(&["quantize", "--model", "tiny-llama", "-o", path]);
    assert!(!no_scheme.status.success());
    assert!(
        stderr(&no_scheme).contains("--atom"),
        "{}",
        stderr(&no_scheme)
    );
}
