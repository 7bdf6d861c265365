//! The compiler driver: a model definition in, the plan of one phase and its kernels out.
//!
//! [`compile`] runs the pipeline for one phase: `build_model` → the Atom pass when
//! [`CompileOptions::atom`] is set (`ir::passes::atom`, on the model graph before the rewrites:
//! the decoder's linears become `AtomLinear`, which runs on the host, reading the Atom weights
//! `kiln::atom_model` makes; recorded first in `passes_run`) → `rewrite::optimize` → the
//! Quest pass when [`CompileOptions::quest`] is set (`ir::passes::quest`: decode attention of
//! the later layers becomes Quest attention; recorded first in the plan's `passes_run`, since
//! it ran before scheduling) → `schedule` → one `kiln_kernels` generator per GPU kernel
//! through `kiln_kernels::lower` (GEMV for at most 8 rows, else GEMM; RMSNorm; RoPE;
//! elementwise maps; attention and KV append as programs of several launches, listed in the
//! plan as `entry + entry`). A kernel whose spec a generator rejects moves to the CPU through
//! the `force_cpu` pass, with the reason recorded in the plan. Every kernel is keyed by its
//! spec key, the key the runtime looks it up by; with [`CompileOptions::every_row_class`] a
//! prefill plan's kernels are generated for every prompt length class (each GEMV row count,
//! small and large GEMM), so that an artifact runs any prompt. The [`crate::artifact`]
//! gathers both phases. Everything produced is deterministic (no timings). This module must
//! not touch a device or the file system.

use crate::error::CompileError;
use crate::target::Target;
use kiln_codegen::kernel::GpuKernel;
use kiln_ir::atom::AtomOptions;
use kiln_ir::passes::atom::AtomPass;
use kiln_ir::passes::quest::QuestPass;
use kiln_ir::quest::QuestOptions;
use kiln_ir::rewrite::{optimize, RewriteOptions, RewriteReport};
use kiln_ir::schedule::{
    schedule, Device, Family, ForceCpu, GpuCapabilities, PassReport, PlanMemory, Schedule,
    ScheduleOptions,
};
use kiln_ir::shape::Bindings;
use kiln_kernels::lower::Lowering;
use kiln_models::{build_model, ModelConfig, Phase};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// How to compile.
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    pub rewrite: RewriteOptions,
    pub schedule: ScheduleOptions,
    /// Run the Quest pass with these options (decode attention of layers ≥ `skip_layers`
    /// becomes Quest attention); `None` keeps every attention dense.
    pub quest: Option<QuestOptions>,
    /// Run the Atom pass with these options on the model graph before rewriting (the
    /// decoder's linears become Atom W4A4 linears); `None` keeps the model's precision.
    pub atom: Option<AtomOptions>,
    /// The machine: a CPU target places every kernel on the host; a GPU target's SM count
    /// sizes the attention programs.
    pub target: Target,
    /// Generate a prefill plan's kernels for every prompt length class, not only for the
    /// bound `seq` (an artifact needs them all).
    pub every_row_class: bool,
}

impl CompileOptions {
    /// Options whose rewrite cost model and memory plan use the same `bindings`.
    pub fn with_bindings(bindings: Bindings) -> CompileOptions {
        let mut options = CompileOptions::default();
        options.rewrite.bindings = bindings.clone();
        options.schedule.bindings = bindings;
        options
    }

    /// These options for `target`: a GPU target places what `kiln_kernels` generates
    /// ([`kiln_kernels::lower::gpu_capabilities`]), a CPU target nothing on the GPU.
    pub fn for_target(mut self, target: Target) -> CompileOptions {
        self.schedule.gpu = if target.is_gpu() {
            kiln_kernels::lower::gpu_capabilities()
        } else {
            GpuCapabilities {
                families: Default::default(),
                dtypes: Default::default(),
                family_dtypes: Default::default(),
            }
        };
        self.target = target;
        self
    }
}

/// The result of [`compile`].
#[derive(Debug)]
pub struct CompiledModel {
    pub plan: Schedule,
    /// Every GPU kernel the plan can launch, by spec key.
    pub kernels: BTreeMap<String, GpuKernel>,
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
) -> Result<CompiledModel, CompileError> {
    let name = phase.name();
    let mut graph = build_model(config, phase).map_err(|source| CompileError::Build {
        phase: name,
        source,
    })?;
    let atom = match &options.atom {
        None => None,
        Some(atom) => {
            let atom_error = |source| CompileError::Atom {
                phase: name,
                source,
            };
            let pass = AtomPass::new(*atom).map_err(atom_error)?;
            let (rewritten, _) = pass.run(&graph).map_err(atom_error)?;
            graph = rewritten;
            Some(pass)
        }
    };
    let (rewritten, rewrite) =
        optimize(&graph, &options.rewrite).map_err(|source| CompileError::Rewrite {
            phase: name,
            source,
        })?;
    let quest_error = |source| CompileError::Quest {
        phase: name,
        source,
    };
    let (rewritten, quest) = match &options.quest {
        None => (rewritten, None),
        Some(quest) => {
            let pass = QuestPass::new(*quest).map_err(quest_error)?;
            let (graph, report) = pass.run(&rewritten).map_err(quest_error)?;
            (graph, Some((pass, report)))
        }
    };
    let schedule_error = |source| CompileError::Schedule {
        phase: name,
        source,
    };
    let before = schedule(&graph, &options.schedule).map_err(schedule_error)?;
    let mut plan = schedule(&rewritten, &options.schedule).map_err(schedule_error)?;
    if let Some((pass, _)) = &quest {
        // It ran on the graph before scheduling, so it comes first.
        plan.passes_run.insert(0, pass.record());
    }
    if let Some(pass) = &atom {
        // It ran on the model graph, before the rewrites and Quest.
        plan.passes_run.insert(0, pass.record());
    }
    let quest = quest.map(|(pass, report)| (*pass.options(), report));
    let bindings = &options.schedule.bindings;
    let sm_count = options.target.sm_count_or_default();

    let mut kernels = BTreeMap::new();
    let mut lowering = Lowering::default();
    let mut rejected = ForceCpu::default();
    let mut entries = Vec::with_capacity(plan.kernels.len());
    for kernel in &plan.kernels {
        if kernel.device != Device::Gpu {
            entries.push(None);
            continue;
        }
        match lowering.lower_all(&kernel.family, bindings, sm_count) {
            Ok(generated) => {
                let names: Vec<&str> = generated.iter().map(|(_, g)| g.entry.as_str()).collect();
                entries.push(Some(names.join(" + ")));
                kernels.extend(generated);
            }
            Err(reason) => {
                rejected
                    .kernels
                    .insert(kernel.name.clone(), reason.to_string());
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
    // Every host step must have CPU kernels: nothing is interpreted at run time.
    for kernel in plan.kernels.iter().filter(|k| k.device == Device::Cpu) {
        if let Some(message) = kiln_kernels::cpu_step::unsupported(&kernel.family) {
            return Err(CompileError::Kernel {
                kernel: kernel.name.clone(),
                message,
            });
        }
        if kiln_kernels::cpu_step::cpu_step(&kernel.family, &kernel.computes).is_none() {
            return Err(CompileError::NoCpuKernel {
                kernel: kernel.name.clone(),
                op: kernel.computes.op.name().to_string(),
                gpu_rejected: rejected.kernels.get(&kernel.name).cloned(),
            });
        }
    }
    if options.every_row_class && phase == Phase::Prefill {
        for rows in kiln_kernels::lower::Lowering::linear_row_classes() {
            let mut class = bindings.clone();
            class.set("seq", rows);
            for kernel in plan.kernels.iter().filter(|k| k.device == Device::Gpu) {
                let generated = lowering
                    .lower_all(&kernel.family, &class, sm_count)
                    .map_err(|source| CompileError::Lower {
                        kernel: kernel.name.clone(),
                        rows,
                        source,
                    })?;
                kernels.extend(generated);
            }
        }
    }
    for (key, kernel) in &kernels {
        if !options.target.accepts_ptx_target(&kernel.target) {
            return Err(CompileError::Kernel {
                kernel: kernel.entry.clone(),
                message: format!(
                    "written for {} but the target is {} (spec {key})",
                    kernel.target, options.target.name
                ),
            });
        }
    }
    let mut report = render_report(
        config,
        phase,
        &plan,
        &rewrite,
        before.kernels.len(),
        &kernels,
        bindings,
    );
    if let Some((options, pass)) = &quest {
        render_quest(&mut report, options, pass);
    }
    Ok(CompiledModel {
        plan,
        kernels,
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
    kernels: &BTreeMap<String, GpuKernel>,
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
            Family::HostOnly { op } => format!("host_only {op}"),
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
    let entries: std::collections::BTreeSet<&str> =
        kernels.values().map(|k| k.entry.as_str()).collect();
    let _ = writeln!(out, "distinct GPU kernels (ptx): {}", entries.len());
    for entry in entries {
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
