//! The `kiln` command line: a thin layer of argument parsing and printing over the `kiln`
//! library. Everything it does is available from the library; it must not grow logic of its
//! own beyond presentation.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::generate::{generate, generate_reference, GenerateOptions};
use kiln::inspect::{inspect, render, Workload};
use kiln::model_source::{load_config, load_weights};
use kiln::plan_runner::{PlanRunner, RunDevice};
use kiln_ir::dtype::DType;
use kiln_ir::model::{build_model, Phase};
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
    /// Prefill a prompt and greedily decode tokens, printing the tokens and tokens/s.
    Run(RunArgs),
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
    /// Compile a model phase into a plan (plan.json), PTX per GPU kernel and a report.
    Compile(CompileArgs),
}

#[derive(Args, Debug)]
struct CompileArgs {
    /// Model: a preset name or a path to a Hugging Face config.json or its directory.
    #[arg(long, short)]
    model: String,
    /// Phase to compile.
    #[arg(long, value_parser = ["prefill", "decode"], default_value = "decode")]
    phase: String,
    /// What to write: any of plan, ptx, report.
    #[arg(long, value_delimiter = ',', default_value = "plan,ptx,report")]
    emit: Vec<String>,
    /// Output directory (replaced only once everything is written).
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// Sequences per call (for the memory plan, the cost model and GEMV/GEMM choice).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt length (prefill).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// KV cache capacity.
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Quest: tokens of KV cache attended per decode step, the current page included (turns
    /// the Quest pass on: decode attention of layers ≥ --quest-skip-layers reads only the
    /// pages with the highest query-aware scores; a positive multiple of the page size, at
    /// least two pages).
    #[arg(long, value_name = "TOKENS")]
    quest_budget: Option<usize>,
    /// Quest: tokens per KV-cache page, a power of two [default: 16].
    #[arg(long, value_name = "N")]
    quest_page_size: Option<usize>,
    /// Quest: the first N decoder layers keep dense attention [default: 2].
    #[arg(long, value_name = "N")]
    quest_skip_layers: Option<usize>,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// The suite: `gemm` (GEMV/GEMM at K=4096, N=14336 and 4096, M=1..4096, f16 and bf16),
    /// `attention` (rows by kind: dense split-KV paged decode, batch 1 and 16, 32 query heads,
    /// 8 and 32 KV heads, head_dim 128, contexts 4K..64K, f16; causal paged prefill, batch 1,
    /// 4K/8K/16K tokens, 8 KV heads, f16 and bf16) or `quest` (the Quest decode step:
    /// estimate + top-K + sparse decode, budgets 1024/2048/4096 tokens, against the dense
    /// decode of the same shapes as `attention`'s decode rows).
    #[arg(value_parser = ["gemm", "attention", "quest"])]
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
    /// qwen3-30b-a3b) or a path to a Hugging Face config.json or its directory.
    #[arg(long, short, default_value = "tiny-mixtral")]
    model: String,
    /// Weights: a .safetensors file, a model.safetensors.index.json, or a directory holding
    /// them. Without it, weights are random from --seed.
    #[arg(long, short)]
    weights: Option<PathBuf>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prompt token ids, comma-separated (for example 1,15043,3186).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6,7,8")]
    prompt: Vec<i32>,
    /// Instead of --prompt, a prompt of N token ids drawn uniformly from the vocabulary with
    /// --seed (for long-context runs such as 32768).
    #[arg(long, value_name = "N")]
    prompt_len: Option<usize>,
    /// Number of tokens to generate (the first comes from prefill).
    #[arg(long, short = 'n', default_value_t = 16)]
    tokens: usize,
    /// Print the result as JSON on stdout instead of text.
    #[arg(long)]
    json: bool,
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
    /// drawn in it. The GPU generators take f16 and bf16; the tiny presets are f32.
    #[arg(long, value_parser = ["f16", "bf16", "f32"])]
    dtype: Option<String>,
    /// Quest: tokens of KV cache attended per decode step, the current page included (turns
    /// the Quest pass on: decode attention of layers ≥ --quest-skip-layers reads only the
    /// pages with the highest query-aware scores; a positive multiple of the page size, at
    /// least two pages).
    #[arg(long, value_name = "TOKENS")]
    quest_budget: Option<usize>,
    /// Quest: tokens per KV-cache page, a power of two [default: 16].
    #[arg(long, value_name = "N")]
    quest_page_size: Option<usize>,
    /// Quest: the first N decoder layers keep dense attention [default: 2].
    #[arg(long, value_name = "N")]
    quest_skip_layers: Option<usize>,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// Model: a preset name or a path to a Hugging Face config.json or its directory.
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
    let quest = kiln::compile::quest_options_from_flags(
        args.quest_budget,
        args.quest_page_size,
        args.quest_skip_layers,
    )?;
    if quest.is_some() && args.device == "reference" {
        anyhow::bail!(
            "--quest-budget needs compiled plans (--device auto, cuda or cpu); \
             --device reference runs the model graphs without passes"
        );
    }
    let mut config = load_config(&args.model)?;
    if let Some(dtype) = &args.dtype {
        config.dtype = DType::parse(dtype).context("--dtype takes f16, bf16 or f32")?;
    }
    let graph = build_model(&config, Phase::Prefill)?;
    let started = std::time::Instant::now();
    let weights = load_weights(&graph, args.weights.as_deref(), args.seed)?;
    eprintln!(
        "kiln run: {} weights ready in {:.1} s",
        config.name,
        started.elapsed().as_secs_f64()
    );
    let progress = ProgressBar::new(args.tokens as u64);
    progress.set_style(
        ProgressStyle::with_template("{spinner} decoding {pos}/{len} tokens [{elapsed}] {msg}")
            .expect("the template is valid"),
    );
    let prompt = match args.prompt_len {
        Some(0) => anyhow::bail!("--prompt-len must be at least 1"),
        Some(n) => random_prompt(n, config.vocab_size, args.seed),
        None => args.prompt.clone(),
    };
    let options = GenerateOptions {
        prompt: prompt.clone(),
        new_tokens: args.tokens,
        keep_logits: false,
    };
    let device = match args.device.as_str() {
        "reference" => None,
        other => Some(other.parse::<RunDevice>().map_err(anyhow::Error::msg)?),
    };
    let (mut generation, ran_on) = match device {
        None => (
            generate_reference(&config, &weights, &options, |_| progress.inc(1))
                .with_context(|| format!("running {} on the reference interpreter", config.name))?,
            "reference interpreter, cpu".to_string(),
        ),
        Some(device) => {
            let capacity = prompt.len() + args.tokens;
            let mut runner = PlanRunner::new(
                &config,
                &weights,
                device,
                args.ordinal,
                prompt.len(),
                capacity,
                quest,
            )?;
            eprintln!(
                "kiln run: plans compiled and weights loaded on {} in {:.1} s; prefill of {} tokens",
                runner.device,
                started.elapsed().as_secs_f64(),
                prompt.len()
            );
            let generation = generate(
                &config,
                &options,
                |phase, state| runner.step(phase, state),
                |_| progress.inc(1),
            )
            .with_context(|| format!("running {} on {}", config.name, runner.device))?;
            let (p_gpu, p_cpu, d_gpu, d_cpu) = runner.placement;
            let mut ran_on = format!(
                "compiled plans on {}; prefill {p_gpu} gpu + {p_cpu} cpu kernels, decode {d_gpu} gpu + {d_cpu} cpu; KV cache of {} tokens on the {}",
                runner.device,
                runner.capacity,
                if runner.state_on_device { "device" } else { "host" }
            );
            if let (Some(options), Some(report)) = (quest, &runner.quest) {
                ran_on.push_str(&format!(
                    "; quest budget {} tokens, page size {}, skip layers {}: {} decode attention node(s) on Quest",
                    options.budget_tokens, options.page_size, options.skip_layers, report.changed
                ));
            }
            (generation, ran_on)
        }
    };
    progress.finish_and_clear();
    generation.device = ran_on.clone();
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
    let device = kiln_runtime::cuda::CudaDevice::open(args.device)?;
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
        other => anyhow::bail!("unknown suite `{other}` (suites: gemm, attention, quest)"),
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

fn compile_command(args: CompileArgs) -> Result<()> {
    let config = load_config(&args.model)?;
    let phase = if args.phase == "prefill" {
        Phase::Prefill
    } else {
        Phase::Decode
    };
    let emit = kiln::compile::Emit::parse(&args.emit)?;
    let bindings = kiln_ir::shape::Bindings::from_pairs(&[
        ("batch", args.batch),
        ("seq", args.prompt_len),
        ("ctx", args.context),
    ]);
    let mut options = kiln::compile::CompileOptions::with_bindings(bindings);
    options.quest = kiln::compile::quest_options_from_flags(
        args.quest_budget,
        args.quest_page_size,
        args.quest_skip_layers,
    )?;
    let model = kiln::compile::compile(&config, phase, &options)?;
    kiln::compile::write_output(&model, emit, &args.out)?;
    print!("{}", model.report);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli
        .command
        .unwrap_or_else(|| Command::Run(RunArgs::parse_from_defaults()));
    let result = match command {
        Command::Run(args) => run(args),
        Command::Inspect(args) => inspect_command(args),
        Command::Bench(args) => bench_command(args),
        Command::Embed(args) => kiln::embed::cli::embed_command(args),
        Command::Compile(args) => compile_command(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
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
