//! The `kiln` command line: a thin layer of argument parsing and printing over the `kiln`
//! library. Everything it does is available from the library; it must not grow logic of its
//! own beyond presentation.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::compiler::{Artifact, ArtifactOptions, Target};
use kiln::generate::{generate, generate_on_graphs, generate_reference, GenerateOptions};
use kiln::inspect::{inspect, render, Workload};
use kiln::model_source::{
    find_tokenizer, load_config, load_expected_weights, load_tokenizer, load_weights,
    weights_source,
};
use kiln::options::{AtomArgs, LayerArgs, QuestArgs};
use kiln::plan_runner::{Passes, PlanRunner, RunDevice};
use kiln::sampling::Sampling;
use kiln::tokenizer::ChatMessage;
use kiln_ir::dtype::DType;
use kiln_models::{build_model, ModelConfig, Phase};
use std::path::PathBuf;
use std::process::ExitCode;

/// kiln compiles LLM model definitions into fused GPU and CPU kernels.
///
/// With no command, `kiln` runs `kiln run`: the tiny-mixtral preset with random weights
/// (seed 0), compiled and run on the GPU when one is present, else on the CPU.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Prefill a prompt and decode tokens (greedy, or sampled with --temperature), printing
    /// the text (--prompt) or the token ids, and tokens/s.
    Run(Box<RunArgs>),
    /// Report a model's layers, parameters, weight bytes and per-op FLOPs and bytes per token.
    Inspect(InspectArgs),
    /// Time generated kernels on the GPU (CUDA events, median of many, L2-busting rotation).
    ///
    /// Needs a CUDA device; without one it exits with an error. Compare with the PyTorch
    /// baseline of the same run: `python3 bench/torch_baselines.py --suite SUITE --out t.json`
    /// then `python3 bench/compare.py kiln.json t.json`.
    Bench(BenchArgs),
    /// Learn a near-isometric linear embedding of a point set (NuMax, FroMax or NILE-Pro) on
    /// the Cranelift CPU backend, writing Φ as CSV and a JSON report.
    Embed(kiln::embed::cli::EmbedArgs),
    /// Compile a model into an artifact directory: plan.json (versioned: target, model,
    /// weights by name, the prefill and decode plans, every kernel by spec key), kernels/*.ptx
    /// and report.txt. `kiln run --compiled DIR` runs it without compiling anything.
    Compile(CompileArgs),
    /// Quantize a model's weights offline (Atom W4A4: --atom) into one safetensors file:
    /// the decoder's linears as Atom tensors (i4 packed two to a byte, f16 scales, INT8
    /// outlier columns, channel permutation), every other weight as loaded. `kiln run
    /// --model M --weights FILE --atom` (same options) reads it without calibrating again.
    Quantize(QuantizeArgs),
}

#[derive(Args, Debug)]
struct QuantizeArgs {
    /// Model: a preset name, a path to a Hugging Face config.json or its directory, or a
    /// llama.cpp .gguf file.
    #[arg(long, short)]
    model: String,
    /// Weights to quantize (as `kiln run --weights`); default: random from --seed, or the
    /// .gguf model's own.
    #[arg(long, short)]
    weights: Option<PathBuf>,
    /// Seed of random weights and of the calibration tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The dtype of the weights kept unquantized (`f16`, `bf16` or `f32`); default: the
    /// model's.
    #[arg(long, value_parser = ["f16", "bf16", "f32"])]
    dtype: Option<String>,
    /// Output safetensors file, written atomically.
    #[arg(short = 'o', long)]
    out: PathBuf,
    #[command(flatten)]
    layers: LayerArgs,
    #[command(flatten)]
    atom: AtomArgs,
}

#[derive(Args, Debug)]
struct CompileArgs {
    /// Model: a preset name, a path to a Hugging Face config.json or its directory, or a
    /// llama.cpp .gguf file (its metadata gives the configuration).
    #[arg(long, short)]
    model: String,
    /// Output directory: the artifact (plan.json, kernels/*.ptx, report.txt), replaced only
    /// once everything is written.
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// The machine to compile for: `sm_90` (H100/H200), `sm_80` (A100) or `cpu` (every step
    /// on the host). Default: this machine's CUDA device when it has one, else sm_90 with an
    /// H100's 132 SMs. `kiln run --compiled` refuses a device of another capability or SM
    /// count.
    #[arg(long, value_parser = kiln::compiler::target::TARGET_NAMES)]
    target: Option<String>,
    /// Compile in this dtype instead of the model's (`f16`, `bf16` or `f32`). Default: the
    /// model's, except that an f32 model (the tiny presets) compiles in bf16 for a GPU target.
    #[arg(long, value_parser = ["f16", "bf16", "f32"])]
    dtype: Option<String>,
    /// Sequences per call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt length the prefill memory plan and cost model are sized for (the kernels cover
    /// every prompt length).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// KV cache capacity the memory plan and cost model are sized for.
    #[arg(long, default_value_t = 4096)]
    context: usize,
    #[command(flatten)]
    layers: LayerArgs,
    #[command(flatten)]
    quest: QuestArgs,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// The suite: `gemm` (GEMV/GEMM at K=4096, N=14336 and 4096, M=1..4096, f16 and bf16),
    /// `attention` (rows by kind: dense split-KV paged decode, batch 1 and 16, 32 query heads,
    /// 8 and 32 KV heads, head_dim 128, contexts 4K..64K, f16; causal paged prefill, batch 1,
    /// 4K/8K/16K tokens, 8 KV heads, f16 and bf16), `quest` (the Quest decode step:
    /// estimate + top-K + sparse decode, budgets 1024/2048/4096 tokens, against the dense
    /// decode of the same shapes as `attention`'s decode rows) or `moe` (one MoE layer as a
    /// compiled plan: router linear, router, dispatch, expert FFN, combine; Mixtral 8x7B at
    /// 1..4096 tokens and Qwen3-30B-A3B at 1 and 64 tokens, bf16; every step must be on the
    /// GPU).
    #[arg(value_parser = ["gemm", "attention", "quest", "moe"])]
    suite: String,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Model: a preset (tiny-llama, tiny-mixtral, llama-2-7b, llama-3-8b, mixtral-8x7b,
    /// qwen3-30b-a3b), a path to a Hugging Face config.json or its directory, or a llama.cpp
    /// .gguf file (architectures llama, Mixtral as llama with experts, and qwen2; the
    /// configuration and the weights both come from the file, dequantized from F32, F16,
    /// BF16, Q8_0, Q4_0 or Q4_1 at load, so --weights is refused).
    #[arg(long, short, default_value = "tiny-mixtral")]
    model: String,
    /// Run a compiled artifact (`kiln compile -o DIR`) instead of compiling --model: its
    /// plans and kernels as written, nothing generated (the model, dtype and Quest options
    /// are the artifact's).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["model", "dtype", "layers", "quest_budget", "quest_page_size", "quest_skip_layers"])]
    compiled: Option<PathBuf>,
    /// Weights: a .safetensors file, a model.safetensors.index.json, a directory holding
    /// them, or a .gguf file (for example with --compiled). Without it, weights are random
    /// from --seed, unless --model is a .gguf file.
    #[arg(long, short)]
    weights: Option<PathBuf>,
    /// Seed of the random weights, of --prompt-len's prompt and of sampling (--temperature).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The prompt as text: encoded with the model's tokenizer, prefilled, then decoded with
    /// the generated text streamed to stdout as it comes, until --max-tokens or the end of
    /// turn (EOS, <|im_end|>, <|eot_id|>...); prefill and decode tokens/s go to stderr. Needs
    /// a tokenizer: a Hugging Face model directory (or config.json) with tokenizer.json beside
    /// it, a GGUF file, or --tokenizer; presets with random weights have none (use
    /// --prompt-ids).
    #[arg(long, value_name = "TEXT", conflicts_with_all = ["prompt_ids", "prompt_len"])]
    prompt: Option<String>,
    /// With --prompt: wrap the prompt as a user message in the model's chat template (its
    /// Jinja template, else ChatML, Llama-3 or Llama-2 by the vocabulary) with the assistant's
    /// turn opened.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Score --prompt's text instead of generating: prefill its first token, then feed the
    /// rest one decode step at a time (teacher forcing) and print the perplexity of tokens
    /// 2..n under the model (with --json: each token's log-probability too).
    #[arg(long, requires = "prompt", conflicts_with_all = ["chat", "temperature", "tokens"])]
    perplexity: bool,
    /// A tokenizer.json to use instead of the one beside the model (for --compiled, or a
    /// directory without one).
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// Prompt token ids, comma-separated (for example 1,15043,3186); token ids are printed
    /// back.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6,7,8")]
    prompt_ids: Vec<i32>,
    /// Instead of --prompt-ids, a prompt of N token ids drawn uniformly from the vocabulary
    /// with --seed (for long-context runs such as 32768).
    #[arg(long, value_name = "N", conflicts_with = "prompt_ids")]
    prompt_len: Option<usize>,
    /// Most tokens to generate (the first comes from prefill); with --prompt, generation also
    /// ends at the end of turn.
    #[arg(
        long = "max-tokens",
        short = 'n',
        visible_alias = "tokens",
        default_value_t = 16
    )]
    tokens: usize,
    /// Sampling temperature: 0 (the default) is greedy, above 0 samples from the softmax of
    /// logits / T with --seed (the same seed gives the same tokens).
    #[arg(long, value_name = "T", default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: draw only from the most probable tokens whose probabilities add up
    /// to P (needs --temperature above 0).
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    top_p: f32,
    /// Print the result as JSON on stdout instead of text (with --prompt, the generated text
    /// is its `text`).
    #[arg(long)]
    json: bool,
    /// Time every GPU step of the prefill and decode plans with CUDA events and write each
    /// step's device time (median, best, mean over the calls, in µs) as JSON to FILE; the
    /// slowest decode steps are printed too. Needs a CUDA device.
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Where to run the compiled prefill and decode plans: `cuda` (generated GPU kernels, the
    /// kernels without a GPU generator on the host), `cpu` (every kernel on the host) or
    /// `auto` (`cuda` when a CUDA device is present, else `cpu`). `reference` skips
    /// compilation and runs the model graphs on the reference interpreter.
    #[arg(long, value_parser = ["auto", "cuda", "cpu", "reference"], default_value = "auto")]
    device: String,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    ordinal: usize,
    /// Run in this dtype instead of the model's (`f16`, `bf16` or `f32`); random weights are
    /// drawn in it. Default: the model's, except that an f32 model (the tiny presets) runs in
    /// bf16 on a GPU, where the generators take f16 and bf16.
    #[arg(long, value_parser = ["f16", "bf16", "f32"])]
    dtype: Option<String>,
    #[command(flatten)]
    layers: LayerArgs,
    #[command(flatten)]
    quest: QuestArgs,
    #[command(flatten)]
    atom: AtomArgs,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// Model: a preset name, a path to a Hugging Face config.json or its directory, or a
    /// llama.cpp .gguf file.
    model: String,
    /// Sequences per call for the per-token figures.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt length for the prefill figures.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens already in the KV cache for the decode figures.
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Print the report as JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

fn run(args: RunArgs) -> Result<()> {
    let quest = args.quest.options()?;
    let atom = args.atom.options()?;
    if atom.is_some() && args.compiled.is_some() {
        anyhow::bail!(
            "--atom compiles its plans in memory (--device cpu) or runs the interpreter \
             (--device reference); artifacts (--compiled) do not take Atom weights yet"
        );
    }
    if args.compiled.is_some() && args.device == "reference" {
        anyhow::bail!(
            "--compiled runs the artifact's plans; --device reference runs the model graphs \
             on the interpreter"
        );
    }
    if quest.is_some() && args.device == "reference" {
        anyhow::bail!(
            "--quest-budget needs compiled plans (--device auto, cuda or cpu); \
             --device reference runs the model graphs without passes"
        );
    }
    let device = match args.device.as_str() {
        "reference" => None,
        other => Some(other.parse::<RunDevice>()?),
    };
    let on_gpu = match device {
        Some(RunDevice::Cuda) => true,
        Some(RunDevice::Auto) => kiln_runtime::cuda::CudaDevice::is_available(),
        _ => false,
    };
    if atom.is_some() && on_gpu {
        anyhow::bail!(
            "--atom runs on --device cpu (compiled CPU plans) or --device reference (the \
             interpreter): `atom_linear` has no GPU kernel yet"
        );
    }
    let artifact = match &args.compiled {
        Some(dir) => Some(Artifact::load(dir)?),
        None => None,
    };
    let config = match &artifact {
        Some(artifact) => artifact.manifest.model.clone(),
        None => model_config(&args.model, args.dtype.as_deref(), &args.layers, on_gpu)?,
    };
    let sampling = Sampling::from_flags(args.temperature, args.top_p, args.seed)?;
    // Only text prompts read the tokenizer: token-id runs work as they did without one.
    let tokenizer = match (&args.prompt, &args.tokenizer, &args.compiled) {
        (None, _, _) => None,
        (Some(_), Some(path), _) => Some(load_tokenizer(path, &config)?),
        (Some(_), None, None) => find_tokenizer(&args.model, &config)?,
        (Some(_), None, Some(_)) => None,
    };
    // With --prompt: the tokenizer, and the prompt's ids.
    let text = match &args.prompt {
        None => None,
        Some(prompt) => {
            let Some(tokenizer) = &tokenizer else {
                let what = match &args.compiled {
                    Some(dir) => format!("the artifact {} has no tokenizer", dir.display()),
                    None => format!("`{}` has no tokenizer", args.model),
                };
                anyhow::bail!(
                    "--prompt needs a tokenizer and {what}: give a model that has one (a Hugging \
                     Face directory with tokenizer.json beside config.json, or a GGUF file) or \
                     --tokenizer FILE; without one, give token ids with --prompt-ids"
                );
            };
            let ids = if args.chat {
                let chat = tokenizer.apply_chat_template(&[ChatMessage::user(prompt)], true)?;
                tokenizer.encode(&chat, false)?
            } else {
                tokenizer.encode(prompt, true)?
            };
            anyhow::ensure!(!ids.is_empty(), "--prompt {prompt:?} encodes to no tokens");
            anyhow::ensure!(
                !args.perplexity || ids.len() >= 2,
                "--perplexity needs a text of at least 2 tokens; {prompt:?} encodes to {}",
                ids.len()
            );
            Some((tokenizer, ids))
        }
    };
    let started = std::time::Instant::now();
    // `--atom --weights FILE` of `kiln quantize`: read in the Atom branch below.
    let prequantized = match (&atom, &args.weights) {
        (Some(_), Some(path)) if kiln::atom_model::is_quantized_file(path) => Some(path.clone()),
        _ => None,
    };
    let weights = match &artifact {
        _ if prequantized.is_some() => kiln_ir::weights::Weights::new(),
        Some(artifact) => load_expected_weights(
            &artifact.expected_weights(),
            &config.name,
            args.weights.as_deref(),
            args.seed,
        )?,
        None => load_weights(
            &build_model(&config, Phase::Prefill)?,
            weights_source(&args.model, args.weights.as_deref())?,
            args.seed,
        )?,
    };
    eprintln!(
        "kiln run: {} weights ready in {:.1} s",
        config.name,
        started.elapsed().as_secs_f64()
    );
    // Text streams to stdout: no progress bar beside it.
    let progress = match text {
        Some(_) => ProgressBar::hidden(),
        None => ProgressBar::new(args.tokens as u64),
    };
    progress.set_style(
        ProgressStyle::with_template("{spinner} decoding {pos}/{len} tokens [{elapsed}] {msg}")
            .expect("the template is valid"),
    );
    let prompt: Vec<i32> = match (&text, args.prompt_len) {
        (Some((_, ids)), _) => ids.iter().map(|&id| id as i32).collect(),
        (None, Some(0)) => anyhow::bail!("--prompt-len must be at least 1"),
        (None, Some(n)) => random_prompt(n, config.vocab_size, args.seed),
        (None, None) => args.prompt_ids.clone(),
    };
    // --perplexity: the first token is the prompt, the rest are forced.
    let (prompt, forced) = match args.perplexity {
        true => (prompt[..1].to_vec(), prompt[1..].to_vec()),
        false => (prompt, Vec::new()),
    };
    let new_tokens = match args.perplexity {
        true => forced.len(),
        false => args.tokens,
    };
    let options = GenerateOptions {
        prompt: prompt.clone(),
        new_tokens,
        forced,
        keep_logits: false,
        sampling,
        stop_tokens: match &text {
            Some((tokenizer, _)) => tokenizer
                .stop_tokens()
                .iter()
                .map(|&id| id as i32)
                .collect(),
            None => Vec::new(),
        },
    };
    let mut stream = text.as_ref().map(|(tokenizer, _)| tokenizer.stream());
    let mut stream_error = None;
    let mut on_token = |id: i32| {
        progress.inc(1);
        let Some(stream) = stream
            .as_mut()
            .filter(|_| stream_error.is_none() && !args.perplexity)
        else {
            return;
        };
        match stream.push(id as u32) {
            Ok(piece) if !args.json => {
                print!("{piece}");
                let _ = std::io::Write::flush(&mut std::io::stdout());
            }
            Ok(_) => {}
            Err(error) => stream_error = Some(error),
        }
    };
    // --atom: the rewritten graphs (for the interpreter) and the weights they read (for
    // either), calibrated here or read back from `kiln quantize`.
    let atom_model = match atom {
        None => None,
        Some(atom) => {
            let calibration = random_prompt(
                args.atom.calibration_tokens()?,
                config.vocab_size,
                args.seed,
            );
            let model = match &prequantized {
                Some(path) => kiln::atom_model::prepare_quantized(&config, atom, path)?,
                None => kiln::atom_model::prepare(&config, &weights, atom, &calibration)?,
            };
            let (dense, packed) = model.linear_bytes;
            for note in &model.report.notes {
                eprintln!("kiln run: atom: {note}");
            }
            eprintln!(
                "kiln run: atom: quantized linears {:.1} MB in {} → {:.1} MB packed ({:.2}×); \
                 {}",
                dense as f64 / 1e6,
                config.dtype,
                packed as f64 / 1e6,
                dense as f64 / packed as f64,
                match &prequantized {
                    Some(path) => format!("quantized weights read from {}", path.display()),
                    None => format!("calibrated on {} random tokens", calibration.len()),
                }
            );
            Some((atom, model))
        }
    };
    let atom_description = |atom: &kiln_ir::atom::AtomOptions| {
        format!(
            "Atom W4A4 (group {}, {} INT8 outliers, clip {}, KV cache {} bits)",
            atom.group_size, atom.outliers, atom.weight_clip, atom.kv_bits
        )
    };
    let (mut generation, ran_on) = match (device, &atom_model) {
        (None, Some((atom, model))) => (
            generate_on_graphs(
                &config,
                &model.prefill,
                &model.decode,
                &model.weights,
                &options,
                &mut on_token,
            )
            .with_context(|| format!("running {} with Atom on the interpreter", config.name))?,
            format!("reference interpreter, cpu; {}", atom_description(atom)),
        ),
        (None, None) => (
            generate_reference(&config, &weights, &options, &mut on_token)
                .with_context(|| format!("running {} on the reference interpreter", config.name))?,
            "reference interpreter, cpu".to_string(),
        ),
        (Some(device), _) => {
            let capacity = prompt.len() + new_tokens;
            let mut runner = match (&artifact, &args.compiled) {
                // The artifact's launch tables are recorded for its context: use it when the
                // run fits, so every decode step runs its launches as recorded.
                (Some(artifact), Some(dir)) => PlanRunner::from_artifact(
                    artifact,
                    &weights,
                    args.ordinal,
                    capacity.max(artifact.manifest.options.context),
                    dir.display().to_string(),
                )?,
                _ => PlanRunner::with_passes(
                    &config,
                    atom_model
                        .as_ref()
                        .map_or(&weights, |(_, model)| &model.weights),
                    device,
                    args.ordinal,
                    prompt.len(),
                    capacity,
                    Passes {
                        quest,
                        atom: atom_model.as_ref().map(|(atom, _)| *atom),
                    },
                )?,
            };
            if args.profile.is_some() {
                if runner.device == "cpu" {
                    anyhow::bail!(
                        "--profile times GPU steps, but this run is on the CPU (no CUDA device, \
                         or --device cpu)"
                    );
                }
                runner.profile_steps(true);
            }
            eprintln!(
                "kiln run: plans {} and weights loaded on {} in {:.1} s; prefill of {} tokens",
                match &args.compiled {
                    Some(dir) => format!("loaded from {}", dir.display()),
                    None => "compiled".to_string(),
                },
                runner.device,
                started.elapsed().as_secs_f64(),
                prompt.len()
            );
            let generation = generate(
                &config,
                &options,
                |phase, state| runner.step(phase, state),
                &mut on_token,
            )
            .with_context(|| format!("running {} on {}", config.name, runner.device))?;
            if let Some(path) = &args.profile {
                write_profile(path, &config.name, &runner)?;
            }
            let (p_gpu, p_cpu, d_gpu, d_cpu) = runner.placement;
            let (prefill_stats, decode_stats) = runner.stats();
            let mut ran_on = format!(
                "compiled plans on {}; prefill {p_gpu} gpu + {p_cpu} cpu steps, decode {d_gpu} gpu + {d_cpu} cpu; {} host step runs, all on Cranelift kernels and the runtime's copies; GPU steps bound {} times to the artifact's {} kernels, {} generated at run time; GPU step runs: {} as recorded in the launch tables, {} derived; KV cache of {} tokens on the {}",
                runner.device,
                prefill_stats.cpu_kernels + decode_stats.cpu_kernels,
                prefill_stats.kernels_loaded + decode_stats.kernels_loaded,
                runner.artifact_kernels,
                prefill_stats.kernels_generated + decode_stats.kernels_generated,
                prefill_stats.steps_recorded + decode_stats.steps_recorded,
                prefill_stats.steps_derived + decode_stats.steps_derived,
                runner.capacity,
                if runner.state_on_device { "device" } else { "host" }
            );
            let quest = artifact
                .as_ref()
                .map_or(quest, |a| a.manifest.options.quest);
            if let Some((atom, _)) = &atom_model {
                ran_on.push_str(&format!("; {}", atom_description(atom)));
            }
            if let (Some(options), Some(changed)) = (quest, runner.quest_kernels) {
                ran_on.push_str(&format!(
                    "; quest budget {} tokens, page size {}, skip layers {}: {changed} decode attention kernel(s) on Quest",
                    options.budget_tokens, options.page_size, options.skip_layers
                ));
            }
            (generation, ran_on)
        }
    };
    progress.finish_and_clear();
    generation.device = ran_on.clone();
    if let Some(perplexity) = generation.perplexity() {
        let scored = generation.token_logprobs.len();
        let mean_nll = -generation.token_logprobs.iter().sum::<f64>() / scored as f64;
        if args.json {
            let report = serde_json::json!({
                "model": config.name,
                "dtype": config.dtype.to_string(),
                "device": ran_on,
                "tokens": generation.prompt.iter().chain(&generation.tokens).collect::<Vec<_>>(),
                "scored_tokens": scored,
                "mean_negative_log_likelihood": mean_nll,
                "perplexity": perplexity,
                "token_logprobs": generation.token_logprobs,
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!(
                "perplexity {perplexity:.4} over {scored} tokens (mean negative log-likelihood \
                 {mean_nll:.4} nats); {} {} ({ran_on})",
                config.name, config.dtype
            );
        }
        return Ok(());
    }
    if let (Some((tokenizer, _)), Some(stream)) = (&text, stream) {
        if let Some(error) = stream_error {
            return Err(error.into());
        }
        let rest = stream.finish()?;
        let ids: Vec<u32> = generation.tokens.iter().map(|&id| id as u32).collect();
        generation.text = Some(tokenizer.decode(&ids, true)?);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&generation)?);
        } else {
            println!("{rest}");
        }
        eprintln!("kiln run: {} {} ({ran_on})", config.name, config.dtype);
        eprintln!(
            "prefill {} tokens in {:.1} ms ({:.1} tokens/s); decode {} tokens in {:.1} ms \
             ({:.1} tokens/s){}",
            generation.prompt.len(),
            generation.prefill_seconds * 1e3,
            generation.prefill_tokens_per_second,
            generation.tokens.len() - 1,
            generation.decode_seconds * 1e3,
            generation.decode_tokens_per_second,
            if generation.stopped {
                "; stopped at the end of turn"
            } else {
                ""
            }
        );
        return Ok(());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&generation)?);
        return Ok(());
    }
    let show = |ids: &[i32]| {
        ids.iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("model   {} {} ({ran_on})", config.name, config.dtype);
    if generation.prompt.len() <= 64 {
        println!("prompt  {}", show(&generation.prompt));
    } else {
        println!(
            "prompt  {} tokens: {} …",
            generation.prompt.len(),
            show(&generation.prompt[..16])
        );
    }
    println!("tokens  {}", show(&generation.tokens));
    println!(
        "prefill {} tokens in {:.1} ms ({:.1} tokens/s)",
        generation.prompt.len(),
        generation.prefill_seconds * 1e3,
        generation.prefill_tokens_per_second
    );
    println!(
        "decode  {} tokens in {:.1} ms ({:.1} tokens/s)",
        generation.tokens.len() - 1,
        generation.decode_seconds * 1e3,
        generation.decode_tokens_per_second
    );
    if !generation.decode_step_ms.is_empty() {
        println!(
            "latency {:.3} ms per decode token (median of {} steps)",
            generation.decode_ms_per_token_median,
            generation.decode_step_ms.len()
        );
    }
    Ok(())
}

/// `n` token ids in `0..vocab`, uniform, from `seed`.
fn random_prompt(n: usize, vocab: usize, seed: u64) -> Vec<i32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x70726f6d7074);
    (0..n).map(|_| rng.random_range(0..vocab as i32)).collect()
}

fn inspect_command(args: InspectArgs) -> Result<()> {
    let config = load_config(&args.model)?;
    for (name, value) in [("--batch", args.batch), ("--prompt-len", args.prompt_len)] {
        anyhow::ensure!(value > 0, "{name} must be at least 1");
    }
    let workload = Workload {
        batch: args.batch,
        prompt_len: args.prompt_len,
        context: args.context,
    };
    let report = inspect(&config, workload)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

fn bench_command(args: BenchArgs) -> Result<()> {
    let device = std::sync::Arc::new(kiln_runtime::cuda::CudaDevice::open(args.device)?);
    eprintln!("{}", device.info());
    let progress = ProgressBar::new_spinner();
    progress.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("valid template"),
    );
    let report = match args.suite.as_str() {
        "gemm" => kiln::bench::bench_gemm(&device, |r| {
            progress.set_message(format!(
                "{} {} M={} N={}: {:.1} µs",
                r.implementation,
                r.dtype,
                r.m,
                r.n,
                r.median_ms * 1e3
            ));
            progress.tick();
        })?,
        "attention" => {
            let report = kiln::bench::attention::bench_attention(&device, |r| {
                progress.set_message(r.describe());
                progress.tick();
            })?;
            progress.finish_and_clear();
            let text = kiln::bench::attention::render(&report);
            return print_and_save(&text, &report, args.json.as_deref());
        }
        "quest" => {
            let report = kiln::bench::quest::bench_quest(&device, |r| {
                progress.set_message(r.describe());
                progress.tick();
            })?;
            progress.finish_and_clear();
            let text = kiln::bench::quest::render(&report);
            return print_and_save(&text, &report, args.json.as_deref());
        }
        "moe" => {
            let report = kiln::bench::moe::bench_moe(&device, |r| {
                progress.set_message(r.describe());
                progress.tick();
            })?;
            progress.finish_and_clear();
            let text = kiln::bench::moe::render(&report);
            return print_and_save(&text, &report, args.json.as_deref());
        }
        other => anyhow::bail!("unknown suite `{other}` (suites: gemm, attention, quest, moe)"),
    };
    progress.finish_and_clear();
    print!("{}", kiln::bench::render(&report));
    if let Some(path) = args.json {
        kiln::write_atomically(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(())
}

/// Prints a bench suite's table and writes its JSON (atomically) when asked.
fn print_and_save(
    text: &str,
    report: &impl serde::Serialize,
    json: Option<&std::path::Path>,
) -> Result<()> {
    print!("{text}");
    if let Some(path) = json {
        kiln::write_atomically(path, serde_json::to_string_pretty(report)?.as_bytes())?;
    }
    Ok(())
}

fn quantize_command(args: QuantizeArgs) -> Result<()> {
    use kiln::models::weights::WeightsIo;
    let Some(atom) = args.atom.options()? else {
        anyhow::bail!("kiln quantize needs a scheme: --atom (the only one so far)");
    };
    let config = model_config(&args.model, args.dtype.as_deref(), &args.layers, false)?;
    let weights = load_weights(
        &build_model(&config, Phase::Prefill)?,
        weights_source(&args.model, args.weights.as_deref())?,
        args.seed,
    )?;
    let calibration = random_prompt(
        args.atom.calibration_tokens()?,
        config.vocab_size,
        args.seed,
    );
    let model = kiln::atom_model::prepare(&config, &weights, atom, &calibration)?;
    model
        .weights
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let (dense, packed) = model.linear_bytes;
    for note in &model.report.notes {
        println!("{note}");
    }
    println!(
        "{}: linears {:.1} MB in {} → {:.1} MB packed ({:.2}×); wrote {}",
        config.name,
        dense as f64 / 1e6,
        config.dtype,
        packed as f64 / 1e6,
        dense as f64 / packed as f64,
        args.out.display()
    );
    Ok(())
}

fn compile_command(args: CompileArgs) -> Result<()> {
    for (name, value) in [("--batch", args.batch), ("--prompt-len", args.prompt_len)] {
        anyhow::ensure!(value > 0, "{name} must be at least 1");
    }
    let target = match &args.target {
        Some(name) => Target::from_name(name)?,
        None if kiln_runtime::cuda::CudaDevice::is_available() => {
            kiln::plan_runner::device_target(&kiln_runtime::cuda::CudaDevice::open(0)?)?
        }
        None => Target::default(),
    };
    let config = model_config(
        &args.model,
        args.dtype.as_deref(),
        &args.layers,
        target.is_gpu(),
    )?;
    let options = ArtifactOptions {
        batch: args.batch,
        prompt_len: args.prompt_len,
        context: args.context,
        quest: args.quest.options()?,
        atom: None,
        target,
    };
    let artifact = Artifact::compile(&config, &options)?;
    artifact.write(&args.out)?;
    print!("{}", artifact.report);
    println!(
        "artifact: {} (schema {}, target {}, {} kernels)",
        args.out.display(),
        artifact.manifest.schema_version,
        artifact.manifest.target.name,
        artifact.manifest.kernels.len()
    );
    Ok(())
}

/// The model named on the command line, with the layers `--layers` keeps, in `dtype` when
/// given; otherwise in its own dtype, except that an f32 model runs in bf16 on a GPU (the
/// GPU generators take f16 and bf16).
fn model_config(
    model: &str,
    dtype: Option<&str>,
    layers: &LayerArgs,
    on_gpu: bool,
) -> Result<ModelConfig> {
    let mut config = load_config(model)?;
    layers.apply(&mut config)?;
    match dtype {
        Some(dtype) => {
            config.dtype = DType::parse(dtype).context("--dtype takes f16, bf16 or f32")?;
        }
        None if on_gpu && config.dtype == DType::F32 => config.dtype = DType::BF16,
        None => {}
    }
    Ok(config)
}

/// Writes the step timings of `runner`'s plans as JSON to `path` and prints the slowest
/// decode steps.
fn write_profile(path: &std::path::Path, model: &str, runner: &PlanRunner) -> Result<()> {
    let (prefill, decode) = runner.step_timings();
    let report = serde_json::json!({
        "model": model,
        "device": runner.device,
        "prefill": prefill,
        "decode": decode,
    });
    kiln::write_atomically(path, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing the profile {}", path.display()))?;
    let mut slowest = decode.clone();
    slowest.sort_by(|a, b| b.median_us.total_cmp(&a.median_us));
    let total: f64 = decode.iter().map(|t| t.median_us).sum();
    eprintln!(
        "profile: {} decode GPU steps, {total:.1} µs per call (sum of medians); slowest:",
        decode.len()
    );
    for step in slowest.iter().take(5) {
        eprintln!(
            "  {:>9.1} µs  {}  ({})",
            step.median_us, step.kernel, step.family
        );
    }
    eprintln!("profile written to {}", path.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli
        .command
        .unwrap_or_else(|| Command::Run(Box::new(RunArgs::parse_from_defaults())));
    let result = match command {
        Command::Run(args) => run(*args),
        Command::Inspect(args) => inspect_command(args),
        Command::Bench(args) => bench_command(args),
        Command::Embed(args) => kiln::embed::cli::embed_command(args),
        Command::Compile(args) => compile_command(args),
        Command::Quantize(args) => quantize_command(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: a cause whose text the line
/// already holds (many errors print their source in their own message) is not repeated.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

impl RunArgs {
    /// The `run` arguments with every default, for `kiln` without a command.
    fn parse_from_defaults() -> RunArgs {
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            run: RunArgs,
        }
        Defaults::parse_from(["kiln"]).run
    }
}
