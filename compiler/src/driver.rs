//! `kiln compile`: a model definition in, a plan and its PTX out.
//!
//! [`compile`] runs the pipeline for one phase: `build_model` → `rewrite::optimize` → the
//! Quest pass when [`CompileOptions::quest`] is set (`ir::passes::quest`: decode attention of
//! the later layers becomes Quest attention; recorded first in the plan's `passes_run`, since
//! it ran before scheduling) → `schedule` → one `kiln_kernels` generator per GPU kernel
//! through `kiln_kernels::lower` (GEMV for at most 8 rows, else GEMM; RMSNorm; RoPE;
//! elementwise maps; attention and KV append as programs of several launches, listed in the
//! plan as `entry + entry`). A kernel whose spec a generator rejects moves to the CPU through the
//! `force_cpu` pass, with the reason recorded in the plan. [`write_output`]
//! writes `plan.json`, one `<entry>.ptx` per distinct GPU kernel and `report.txt` into a
//! temporary directory beside the target and renames it into place only when all succeeded.
//! Everything written is deterministic (no timings in the files).

use anyhow::{Context, Result};
use kiln_ir::graph::Graph;
use kiln_ir::model::{build_model, ModelConfig, Phase};
use kiln_ir::passes::quest::QuestPass;
use kiln_ir::quest::QuestOptions;
use kiln_ir::rewrite::{optimize, RewriteOptions, RewriteReport};
use kiln_ir::schedule::{
    schedule, Device, Family, ForceCpu, PassReport, PlanMemory, Schedule, ScheduleOptions,
};
use kiln_ir::shape::Bindings;
use kiln_kernels::lower::Lowering;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// What to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Emit {
    pub plan: bool,
    pub ptx: bool,
    pub report: bool,
}

impl Default for Emit {
    fn default() -> Emit {
        Emit {
            plan: true,
            ptx: true,
            report: true,
        }
    }
}

impl Emit {
    /// Parses `plan,ptx,report` (any subset).
    pub fn parse(items: &[String]) -> Result<Emit> {
        let mut emit = Emit {
            plan: false,
            ptx: false,
            report: false,
        };
        for item in items {
            match item.trim() {
                "plan" => emit.plan = true,
                "ptx" => emit.ptx = true,
                "report" => emit.report = true,
                other => anyhow::bail!("unknown --emit item `{other}` (items: plan, ptx, report)"),
            }
        }
        Ok(emit)
    }
}

/// How to compile.
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    pub rewrite: RewriteOptions,
    pub schedule: ScheduleOptions,
    /// Run the Quest pass with these options (decode attention of layers ≥ `skip_layers`
    /// becomes Quest attention); `None` keeps every attention dense.
    pub quest: Option<QuestOptions>,
}

impl CompileOptions {
    /// Options whose rewrite cost model and memory plan use the same `bindings`.
    pub fn with_bindings(bindings: Bindings) -> CompileOptions {
        let mut options = CompileOptions::default();
        options.rewrite.bindings = bindings.clone();
        options.schedule.bindings = bindings;
        options
    }
}

/// The Quest options of the command-line flags `--quest-budget`, `--quest-page-size` and
/// `--quest-skip-layers`: `None` without `--quest-budget` (the other two then must be absent),
/// else the options with page size 16 and 2 skipped layers by default. Errors name the flag
/// and what it expects.
pub fn quest_options_from_flags(
    budget: Option<usize>,
    page_size: Option<usize>,
    skip_layers: Option<usize>,
) -> Result<Option<QuestOptions>> {
    let Some(budget) = budget else {
        for (flag, value) in [
            ("--quest-page-size", page_size),
            ("--quest-skip-layers", skip_layers),
        ] {
            if value.is_some() {
                anyhow::bail!("{flag} needs --quest-budget (Quest is on only with a budget)");
            }
        }
        return Ok(None);
    };
    let defaults = QuestOptions::default();
    let options = QuestOptions {
        budget_tokens: budget,
        page_size: page_size.unwrap_or(defaults.page_size),
        skip_layers: skip_layers.unwrap_or(defaults.skip_layers),
    };
    let page = options.page_size;
    let max = kiln_ir::quest::MAX_PAGE_SIZE;
    if page == 0 || page > max || !page.is_power_of_two() {
        anyhow::bail!("--quest-page-size {page}: expected a power of two in 1..={max}");
    }
    if budget == 0 || !budget.is_multiple_of(page) {
        anyhow::bail!(
            "--quest-budget {budget}: expected a positive multiple of the page size \
             (--quest-page-size {page})"
        );
    }
    if budget < 2 * page {
        anyhow::bail!(
            "--quest-budget {budget}: expected at least two pages ({} tokens with \
             --quest-page-size {page}): one chosen by score and the current page",
            2 * page
        );
    }
    options
        .validate()
        .map_err(|e| anyhow::anyhow!("--quest-budget/--quest-page-size: {e}"))?;
    Ok(Some(options))
}

/// The result of [`compile`].
#[derive(Debug)]
pub struct CompiledModel {
    /// The rewritten graph the plan was scheduled from (the executor evaluates its nodes).
    pub graph: Graph,
    pub plan: Schedule,
    /// PTX per distinct entry name.
    pub ptx: BTreeMap<String, String>,
    pub rewrite: RewriteReport,
    /// What the Quest pass did, when it ran.
    pub quest: Option<PassReport>,
    /// Kernels of the schedule of the graph before rewriting (same partition rules).
    pub kernels_before: usize,
    /// The human report (deterministic).
    pub report: String,
}

/// Compiles one phase of `config`.
pub fn compile(
    config: &ModelConfig,
    phase: Phase,
    options: &CompileOptions,
) -> Result<CompiledModel> {
    let graph = build_model(config, phase).context("building the model graph")?;
    let (rewritten, rewrite) = optimize(&graph, &options.rewrite).context("rewriting")?;
    let (rewritten, quest) = match &options.quest {
        None => (rewritten, None),
        Some(quest) => {
            let pass = QuestPass::new(*quest)?;
            let (graph, report) = pass.run(&rewritten).context("running the quest pass")?;
            (graph, Some((pass, report)))
        }
    };
    let before = schedule(&graph, &options.schedule).context("scheduling the unrewritten graph")?;
    let mut plan = schedule(&rewritten, &options.schedule).context("scheduling")?;
    if let Some((pass, _)) = &quest {
        // It ran on the graph before scheduling, so it comes first.
        plan.passes_run.insert(0, pass.record());
    }
    let quest = quest.map(|(pass, report)| (*pass.options(), report));
    let bindings = &options.schedule.bindings;

    let mut ptx = BTreeMap::new();
    let mut lowering = Lowering::default();
    let mut rejected = ForceCpu::default();
    let mut entries = Vec::with_capacity(plan.kernels.len());
    for kernel in &plan.kernels {
        if kernel.device != Device::Gpu {
            entries.push(None);
            continue;
        }
        match lowering.lower_all(&kernel.family, bindings) {
            Ok(generated) => {
                let names: Vec<&str> = generated.iter().map(|g| g.entry.as_str()).collect();
                entries.push(Some(names.join(" + ")));
                for kernel in generated {
                    ptx.insert(kernel.entry, kernel.ptx);
                }
            }
            Err(reason) => {
                rejected.kernels.insert(kernel.name.clone(), reason);
                entries.push(None);
            }
        }
    }
    for (kernel, entry) in plan.kernels.iter_mut().zip(entries) {
        kernel.entry = entry;
    }
    if !rejected.kernels.is_empty() {
        plan.apply(&rejected);
        let memory = plan.memory.clone().unwrap_or_default();
        plan.apply(&PlanMemory {
            bindings: memory.bindings,
            alignment: memory.alignment.max(1),
        });
    }
    let mut report = render_report(
        config,
        phase,
        &plan,
        &rewrite,
        before.kernels.len(),
        &ptx,
        bindings,
    );
    if let Some((options, pass)) = &quest {
        render_quest(&mut report, options, pass);
    }
    Ok(CompiledModel {
        graph: rewritten,
        plan,
        ptx,
        rewrite,
        quest: quest.map(|(_, report)| report),
        kernels_before: before.kernels.len(),
        report,
    })
}

fn render_report(
    config: &ModelConfig,
    phase: Phase,
    plan: &Schedule,
    rewrite: &RewriteReport,
    kernels_before: usize,
    ptx: &BTreeMap<String, String>,
    bindings: &Bindings,
) -> String {
    let mut out = String::new();
    let b: Vec<String> = bindings.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(
        out,
        "kiln compile: {} ({}), target {}",
        config.name,
        phase.name(),
        rewrite.target
    );
    let _ = writeln!(out, "bindings: {}", b.join(", "));
    let _ = writeln!(out);
    let _ = writeln!(out, "launches per {} step:", phase.name());
    let _ = writeln!(
        out,
        "  before rewriting: {} (cost model), {} scheduled kernels",
        rewrite.before.launches, kernels_before
    );
    let _ = writeln!(
        out,
        "  after rewriting:  {} (cost model), {} scheduled kernels ({} gpu, {} cpu), {} at load time",
        rewrite.after.launches,
        plan.kernels.len(),
        plan.count_on(Device::Gpu),
        plan.count_on(Device::Cpu),
        plan.load_time.len()
    );
    let _ = writeln!(out, "  host<->device transfers: {}", plan.transfers.len());
    let _ = writeln!(out);
    let _ = writeln!(out, "fusions applied (rule: applications):");
    for (rule, count) in &rewrite.applied {
        if *count > 0 {
            let _ = writeln!(out, "  {rule}: {count}");
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "kernels per family (device):");
    let mut families: BTreeMap<(String, String), usize> = BTreeMap::new();
    for k in &plan.kernels {
        let name = match &k.family {
            Family::Interpreted { op } => format!("interpreted {op}"),
            f => f.name().to_string(),
        };
        *families
            .entry((name, format!("{:?}", k.device).to_lowercase()))
            .or_default() += 1;
    }
    for ((family, device), count) in &families {
        let _ = writeln!(out, "  {family:<28} {device:<4} {count}");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "distinct GPU kernels (ptx): {}", ptx.len());
    for entry in ptx.keys() {
        let _ = writeln!(out, "  {entry}");
    }
    let tokens = bindings.get("batch").unwrap_or(1)
        * match phase {
            Phase::Prefill => bindings.get("seq").unwrap_or(1),
            Phase::Decode => 1,
        };
    let _ = writeln!(out);
    let _ = writeln!(out, "cost model ({} tokens per call):", tokens);
    for (name, s) in [("before", &rewrite.before), ("after", &rewrite.after)] {
        let _ = writeln!(
            out,
            "  {name:<6} {:>10.3} MB/token {:>10.3} GFLOP/token  est. {:.1} µs per call",
            s.bytes / 1e6 / tokens as f64,
            s.flops / 1e9 / tokens as f64,
            s.seconds * 1e6
        );
    }
    if let Some(memory) = &plan.memory {
        let _ = writeln!(out);
        let _ = writeln!(out, "memory plan:");
        for arena in &memory.arenas {
            let _ = writeln!(
                out,
                "  {:?} arena: {} bytes ({} without reuse, {} buffers)",
                arena.device,
                arena.bytes,
                arena.naive_bytes,
                arena.slots.len()
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "passes run:");
    for pass in &plan.passes_run {
        let _ = writeln!(out, "  {}", pass.name);
    }
    out
}

/// The report's Quest section: the options and what the pass did.
fn render_quest(out: &mut String, options: &QuestOptions, report: &PassReport) {
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "quest pass (budget {} tokens, page size {}, skip layers {}):",
        options.budget_tokens, options.page_size, options.skip_layers
    );
    for note in &report.notes {
        let _ = writeln!(out, "  {note}");
    }
}

/// Writes the emitted files of `model` into `dir`, atomically: everything goes into a
/// temporary directory beside `dir`, which replaces `dir` only once complete.
pub fn write_output(model: &CompiledModel, emit: Emit, dir: &Path) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp"))
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    let write = |file: &str, bytes: &[u8]| -> Result<()> {
        let path = staging.path().join(file);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    if emit.plan {
        write("plan.json", model.plan.to_json().as_bytes())?;
    }
    if emit.ptx {
        for (entry, text) in &model.ptx {
            write(&format!("{entry}.ptx"), text.as_bytes())?;
        }
    }
    if emit.report {
        write("report.txt", model.report.as_bytes())?;
    }
    let staged = staging.keep();
    if dir.exists() {
        let old = tempfile::Builder::new()
            .prefix(&format!(".{name}.old"))
            .tempdir_in(&parent)?
            .keep();
        std::fs::remove_dir(&old)?;
        std::fs::rename(dir, &old).with_context(|| format!("moving {} aside", dir.display()))?;
        if let Err(e) = std::fs::rename(&staged, dir) {
            let _ = std::fs::rename(&old, dir);
            let _ = std::fs::remove_dir_all(&staged);
            return Err(e).with_context(|| format!("replacing {}", dir.display()));
        }
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        std::fs::rename(&staged, dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}
