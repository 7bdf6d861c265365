//! The compiled artifact: the contract between the compiler and the runtime.
//!
//! An artifact is a directory:
//!
//! ```text
//! DIR/plan.json            the manifest (a [`Manifest`]): schema_version, kiln_version, target,
//!                          model, the shapes it was compiled for, weights by name and type,
//!                          the prefill and decode plans (buffers, steps, transfers, memory),
//!                          each plan's launch tables (every GPU step's launches for the
//!                          compiled sizes: kernel by spec key, parameter → buffer bindings,
//!                          scalars), the host steps' Cranelift kernels, and every GPU kernel
//!                          by spec key (file, sha256, parameters, launch rule)
//! DIR/kernels/<entry>.ptx  one PTX file per distinct GPU kernel
//! DIR/report.txt           the human report of both phases
//! ```
//!
//! [`Artifact::compile`] builds one in memory (both phases, kernels for every prompt length
//! class); [`Artifact::write`] writes it atomically (a temporary directory beside the target,
//! renamed into place once complete); [`Artifact::load`] reads it back and checks it: the
//! schema and kiln versions first, then the JSON, the plans' buffer references, the launch
//! tables against the plans and the kernel list, and every kernel file against its digest. Every failure names the file and the field. The runtime
//! runs an artifact's plans with its kernels and never generates one. This module must not
//! touch a device.
//!
//! ```
//! use kiln_compiler::{Artifact, ArtifactOptions, Target};
//! use kiln_models::{ModelConfig, Phase};
//! let mut config = ModelConfig::preset("tiny-llama").unwrap();
//! config.dtype = kiln_ir::dtype::DType::BF16;
//! let artifact = Artifact::compile(&config, &ArtifactOptions::default()).unwrap();
//! let dir = tempfile::tempdir().unwrap();
//! artifact.write(&dir.path().join("a")).unwrap();
//! let loaded = Artifact::load(&dir.path().join("a")).unwrap();
//! assert_eq!(loaded.manifest, artifact.manifest);
//! assert!(!loaded.plan(Phase::Decode).kernels.is_empty());
//! ```

use crate::driver::{compile, CompileOptions};
use crate::error::{ArtifactError, CompileError};
use crate::target::Target;
use kiln_codegen::kernel::{GpuKernel, LaunchRule, Param};
use kiln_ir::atom::AtomOptions;
use kiln_ir::dtype::DType;
use kiln_ir::quest::QuestOptions;
use kiln_ir::schedule::{BufferKind, Schedule};
use kiln_ir::shape::Bindings;
use kiln_kernels::cpu_step::{cpu_step, CpuStep};
use kiln_kernels::step_launches::{step_launches, LaunchTable, StepBuffer};
use kiln_models::{ModelConfig, Phase};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The manifest format this kiln writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// The kiln that wrote an artifact (kernel spec keys are only meaningful to it).
pub const KILN_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The shapes and passes an artifact is compiled for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArtifactOptions {
    /// Sequences per call.
    pub batch: usize,
    /// Prompt length the prefill memory plan and cost model are sized for (kernels cover
    /// every prompt length).
    pub prompt_len: usize,
    /// KV cache capacity in tokens.
    pub context: usize,
    /// The Quest pass, when on.
    pub quest: Option<QuestOptions>,
    /// The Atom pass (W4A4 linears, on the host), when on: the plans read Atom weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atom: Option<AtomOptions>,
    pub target: Target,
}

impl Default for ArtifactOptions {
    /// Batch 1, a 128-token prompt, a 4096-token cache, no Quest, `sm_90`.
    fn default() -> ArtifactOptions {
        ArtifactOptions {
            batch: 1,
            prompt_len: 128,
            context: 4096,
            quest: None,
            atom: None,
            target: Target::default(),
        }
    }
}

/// A weight the plans read, by its checkpoint name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// The plan of one phase.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhasePlan {
    pub phase: Phase,
    pub plan: Schedule,
    /// The Cranelift kernels of each host step, by kernel index (`None` for GPU steps);
    /// compiled by the runtime at load.
    pub cpu_steps: Vec<Option<CpuStep>>,
    /// The launches of every GPU step (kernel by spec key, argument bindings, scalars), for
    /// the sizes the artifact was compiled for: one table for decode, one per prompt-length
    /// class and the compiled prompt length for prefill. The runtime runs these as recorded
    /// when a call has a table's sizes.
    pub launch_tables: Vec<LaunchTable>,
}

/// One GPU kernel: its PTX file and everything the runtime needs to launch it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelEntry {
    /// The spec key the runtime looks it up by.
    pub key: String,
    pub entry: String,
    /// Relative to the artifact directory.
    pub file: String,
    /// Hex sha256 of the file.
    pub sha256: String,
    pub params: Vec<Param>,
    pub launch: LaunchRule,
    /// The PTX target it was written for.
    pub ptx_target: String,
}

/// `plan.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub kiln_version: String,
    pub target: Target,
    pub model: ModelConfig,
    pub options: ArtifactOptions,
    pub weights: Vec<WeightEntry>,
    pub phases: Vec<PhasePlan>,
    pub kernels: Vec<KernelEntry>,
}

impl Manifest {
    /// Parses and checks the text of a `plan.json` (`path` is where it came from, for error
    /// messages): the schema and kiln versions first, then the JSON, then what serde cannot
    /// check (both phases present, buffer references, launch tables, kernel files inside the
    /// artifact). [`Artifact::load`] reads the file through this; the kernel files' digests
    /// are checked there.
    pub fn from_json(text: &str, path: &Path) -> Result<Manifest, ArtifactError> {
        let json_error = |source| ArtifactError::Json {
            path: path.to_path_buf(),
            source,
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(json_error)?;
        let version = value.get("schema_version");
        if version.and_then(|v| v.as_u64()) != Some(SCHEMA_VERSION as u64) {
            return Err(ArtifactError::SchemaVersion {
                path: path.to_path_buf(),
                found: version.map_or("missing".to_string(), |v| v.to_string()),
                expected: SCHEMA_VERSION,
            });
        }
        let kiln = value.get("kiln_version");
        if kiln.and_then(|v| v.as_str()) != Some(KILN_VERSION) {
            return Err(ArtifactError::KilnVersion {
                path: path.to_path_buf(),
                found: kiln.map_or("missing".to_string(), |v| v.to_string()),
                expected: KILN_VERSION.to_string(),
            });
        }
        let manifest: Manifest = serde_json::from_str(text).map_err(json_error)?;
        check_manifest(path, &manifest)?;
        Ok(manifest)
    }
}

/// A compiled model: the manifest, the PTX text of its kernels by file, and the report.
#[derive(Clone, Debug, PartialEq)]
pub struct Artifact {
    pub manifest: Manifest,
    /// PTX text by file name (relative to the artifact directory).
    pub ptx: BTreeMap<String, String>,
    pub report: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Artifact {
    /// Compiles both phases of `config` for `options`.
    pub fn compile(
        config: &ModelConfig,
        options: &ArtifactOptions,
    ) -> Result<Artifact, CompileError> {
        let bindings = Bindings::from_pairs(&[
            ("batch", options.batch.max(1)),
            ("seq", options.prompt_len.max(1)),
            ("ctx", options.context.max(1)),
        ]);
        let mut compile_options =
            CompileOptions::with_bindings(bindings).for_target(options.target.clone());
        compile_options.quest = options.quest;
        compile_options.atom = options.atom;
        compile_options.every_row_class = true;
        let mut phases = Vec::new();
        let mut kernels: BTreeMap<String, GpuKernel> = BTreeMap::new();
        let mut report = String::new();
        let mut weights: BTreeMap<String, WeightEntry> = BTreeMap::new();
        for phase in [Phase::Prefill, Phase::Decode] {
            let compiled = compile(config, phase, &compile_options)?;
            for buffer in &compiled.plan.buffers {
                if buffer.kind != BufferKind::Weight {
                    continue;
                }
                let shape = buffer.shape.resolve(&Bindings::new()).map_err(|source| {
                    CompileError::WeightShape {
                        name: buffer.name.clone(),
                        source,
                    }
                })?;
                weights.insert(
                    buffer.name.clone(),
                    WeightEntry {
                        name: buffer.name.clone(),
                        dtype: buffer.dtype,
                        shape,
                    },
                );
            }
            kernels.extend(compiled.kernels);
            report.push_str(&compiled.report);
            let cpu_steps = compiled
                .plan
                .kernels
                .iter()
                .map(|k| match k.device {
                    kiln_ir::schedule::Device::Cpu => cpu_step(&k.family, &k.computes),
                    kiln_ir::schedule::Device::Gpu => None,
                })
                .collect();
            let launch_tables = launch_tables(&compiled.plan, phase, options)?;
            report.push_str(
                "\nlaunch tables (plan.json: every GPU step's launches, run as recorded):\n",
            );
            for table in &launch_tables {
                let launches: usize = table.steps.iter().flatten().map(|s| s.launches.len()).sum();
                let sizes: Vec<String> = table
                    .bindings
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect();
                report.push_str(&format!("  {:<28} {launches} launches\n", sizes.join(", ")));
            }
            report.push('\n');
            phases.push(PhasePlan {
                phase,
                plan: compiled.plan,
                cpu_steps,
                launch_tables,
            });
        }
        let mut ptx: BTreeMap<String, String> = BTreeMap::new();
        let mut entries = Vec::with_capacity(kernels.len());
        for (key, kernel) in kernels {
            let file = format!("kernels/{}.ptx", kernel.entry);
            if let Some(existing) = ptx.get(&file) {
                if *existing != kernel.ptx {
                    return Err(CompileError::Kernel {
                        kernel: kernel.entry.clone(),
                        message: "two different kernels share this entry name".into(),
                    });
                }
            }
            entries.push(KernelEntry {
                key,
                entry: kernel.entry.clone(),
                file: file.clone(),
                sha256: sha256_hex(kernel.ptx.as_bytes()),
                params: kernel.params,
                launch: kernel.launch,
                ptx_target: kernel.target,
            });
            ptx.insert(file, kernel.ptx);
        }
        Ok(Artifact {
            manifest: Manifest {
                schema_version: SCHEMA_VERSION,
                kiln_version: KILN_VERSION.to_string(),
                target: options.target.clone(),
                model: config.clone(),
                options: options.clone(),
                weights: weights.into_values().collect(),
                phases,
                kernels: entries,
            },
            ptx,
            report,
        })
    }

    /// The plan of `phase` with its host steps' kernels.
    pub fn phase(&self, phase: Phase) -> &PhasePlan {
        self.manifest
            .phases
            .iter()
            .find(|p| p.phase == phase)
            .expect("a loaded or compiled artifact has both phases")
    }

    /// The plan of `phase`.
    pub fn plan(&self, phase: Phase) -> &Schedule {
        &self.phase(phase).plan
    }

    /// The Cranelift kernels of the host steps of `phase`, by kernel index.
    pub fn cpu_steps(&self, phase: Phase) -> &[Option<CpuStep>] {
        &self.phase(phase).cpu_steps
    }

    /// Every GPU kernel by spec key, with its PTX.
    pub fn kernels(&self) -> BTreeMap<String, GpuKernel> {
        self.manifest
            .kernels
            .iter()
            .map(|k| {
                (
                    k.key.clone(),
                    GpuKernel {
                        entry: k.entry.clone(),
                        ptx: self.ptx.get(&k.file).cloned().unwrap_or_default(),
                        params: k.params.clone(),
                        launch: k.launch.clone(),
                        target: k.ptx_target.clone(),
                    },
                )
            })
            .collect()
    }

    /// The spec keys that the GPU steps of `phase` launch under `bindings` and the artifact
    /// does not have (the runtime refuses such a call), as `step: reason or key`.
    pub fn missing_kernels(&self, phase: Phase, bindings: &Bindings) -> Vec<String> {
        let have: std::collections::BTreeSet<&str> = self
            .manifest
            .kernels
            .iter()
            .map(|k| k.key.as_str())
            .collect();
        let sm_count = self.manifest.target.sm_count_or_default();
        let mut missing = Vec::new();
        for kernel in &self.plan(phase).kernels {
            if kernel.device != kiln_ir::schedule::Device::Gpu {
                continue;
            }
            let keys = step_launches(&kernel.family, bindings, sm_count).map(|derived| {
                derived
                    .launches
                    .launches
                    .into_iter()
                    .map(|l| l.kernel)
                    .collect::<Vec<_>>()
            });
            match keys {
                Ok(keys) => missing.extend(
                    keys.into_iter()
                        .filter(|key| !have.contains(key.as_str()))
                        .map(|key| format!("{}: {key}", kernel.name)),
                ),
                Err(reason) => missing.push(format!("{}: {reason}", kernel.name)),
            }
        }
        missing
    }

    /// The weights as `(name, type)`, the form weight loading takes.
    pub fn expected_weights(&self) -> Vec<(String, kiln_ir::graph::TensorType)> {
        self.manifest
            .weights
            .iter()
            .map(|w| {
                let shape = kiln_ir::shape::Shape(
                    w.shape
                        .iter()
                        .map(|&d| kiln_ir::shape::Dim::Const(d))
                        .collect(),
                );
                (
                    w.name.clone(),
                    kiln_ir::graph::TensorType::new(w.dtype, shape),
                )
            })
            .collect()
    }

    /// Writes the artifact into `dir`, atomically: everything goes into a temporary
    /// directory beside `dir`, which replaces `dir` only once complete.
    pub fn write(&self, dir: &Path) -> Result<(), ArtifactError> {
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io_error(&parent))?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "artifact".into());
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{name}.tmp"))
            .tempdir_in(&parent)
            .map_err(io_error(&parent))?;
        let kernels = staging.path().join("kernels");
        std::fs::create_dir(&kernels).map_err(io_error(&kernels))?;
        let mut json =
            serde_json::to_string_pretty(&self.manifest).map_err(|source| ArtifactError::Json {
                path: dir.join("plan.json"),
                source,
            })?;
        json.push('\n');
        let mut files: Vec<(&str, &[u8])> = vec![
            ("plan.json", json.as_bytes()),
            ("report.txt", self.report.as_bytes()),
        ];
        files.extend(self.ptx.iter().map(|(f, t)| (f.as_str(), t.as_bytes())));
        for (file, bytes) in files {
            let path = staging.path().join(file);
            std::fs::write(&path, bytes).map_err(io_error(&path))?;
        }
        let staged = staging.keep();
        if dir.exists() {
            let old = tempfile::Builder::new()
                .prefix(&format!(".{name}.old"))
                .tempdir_in(&parent)
                .map_err(io_error(&parent))?
                .keep();
            std::fs::remove_dir(&old).map_err(io_error(&old))?;
            std::fs::rename(dir, &old).map_err(io_error(dir))?;
            if let Err(e) = std::fs::rename(&staged, dir) {
                let _ = std::fs::rename(&old, dir);
                let _ = std::fs::remove_dir_all(&staged);
                return Err(io_error(dir)(e));
            }
            std::fs::remove_dir_all(&old).map_err(io_error(&old))?;
        } else {
            std::fs::rename(&staged, dir).map_err(io_error(dir))?;
        }
        Ok(())
    }

    /// Reads and checks the artifact in `dir`.
    pub fn load(dir: &Path) -> Result<Artifact, ArtifactError> {
        let path = dir.join("plan.json");
        let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
        let manifest = Manifest::from_json(&text, &path)?;
        let mut ptx = BTreeMap::new();
        for kernel in &manifest.kernels {
            let file = dir.join(&kernel.file);
            let bytes = std::fs::read(&file).map_err(io_error(&file))?;
            let found = sha256_hex(&bytes);
            if found != kernel.sha256 {
                return Err(ArtifactError::KernelDigest {
                    path: file,
                    entry: kernel.entry.clone(),
                    expected: kernel.sha256.clone(),
                    found,
                });
            }
            let text = String::from_utf8(bytes).map_err(|e| ArtifactError::Invalid {
                path: file.clone(),
                field: "(file)".into(),
                message: format!("not UTF-8 text: {e}"),
            })?;
            ptx.insert(kernel.file.clone(), text);
        }
        let report = std::fs::read_to_string(dir.join("report.txt")).unwrap_or_default();
        Ok(Artifact {
            manifest,
            ptx,
            report,
        })
    }
}

/// The sizes a phase's launch tables are recorded for: decode at the compiled batch and
/// context; prefill at the compiled prompt length and at each prompt length where the
/// linear kernels change (`Lowering::linear_row_classes`), which are the lengths the
/// artifact's kernels were generated for. Only the symbols the plan's buffers use are bound,
/// as the runtime binds them from a call's tensors.
fn table_bindings(plan: &Schedule, phase: Phase, options: &ArtifactOptions) -> Vec<Bindings> {
    let mut symbols = std::collections::BTreeSet::new();
    for buffer in &plan.buffers {
        for dim in buffer.shape.dims() {
            if let kiln_ir::shape::Dim::Sym(name) = dim {
                symbols.insert(name.clone());
            }
        }
    }
    let base = |seq: usize| {
        let mut bindings = Bindings::new();
        for (name, value) in [
            ("batch", options.batch.max(1)),
            ("seq", seq),
            ("ctx", options.context.max(1)),
        ] {
            if symbols.contains(name) {
                bindings.set(name, value);
            }
        }
        bindings
    };
    let mut lengths = vec![options.prompt_len.max(1)];
    if phase == Phase::Prefill && symbols.contains("seq") {
        lengths.extend(kiln_kernels::lower::Lowering::linear_row_classes());
        lengths.sort_unstable();
        lengths.dedup();
    }
    lengths.into_iter().map(base).collect()
}

/// The launch tables of one phase (see [`PhasePlan::launch_tables`]).
fn launch_tables(
    plan: &Schedule,
    phase: Phase,
    options: &ArtifactOptions,
) -> Result<Vec<LaunchTable>, CompileError> {
    let sm_count = options.target.sm_count_or_default();
    table_bindings(plan, phase, options)
        .into_iter()
        .map(|bindings| {
            let steps = plan
                .kernels
                .iter()
                .map(|kernel| match kernel.device {
                    kiln_ir::schedule::Device::Cpu => Ok(None),
                    kiln_ir::schedule::Device::Gpu => {
                        step_launches(&kernel.family, &bindings, sm_count)
                            .map(|derived| Some(derived.launches))
                            .map_err(|source| CompileError::Kernel {
                                kernel: kernel.name.clone(),
                                message: format!("no launches for {bindings:?}: {source}"),
                            })
                    }
                })
                .collect::<Result<_, _>>()?;
            Ok(LaunchTable { bindings, steps })
        })
        .collect()
}

/// The launch tables of phase `p` against its plan and the artifact's kernels: one entry per
/// step, launches exactly for the GPU steps, every kernel key listed, every parameter bound
/// to a declared buffer, operand and result indices in range.
fn check_launch_tables(
    p: usize,
    phase: &PhasePlan,
    kernel_keys: &std::collections::BTreeSet<&str>,
    invalid: &dyn Fn(String, String) -> ArtifactError,
) -> Result<(), ArtifactError> {
    let plan = &phase.plan;
    for (t, table) in phase.launch_tables.iter().enumerate() {
        let at = format!("phases[{p}].launch_tables[{t}]");
        if table.steps.len() != plan.kernels.len() {
            return Err(invalid(
                format!("{at}.steps"),
                format!(
                    "{} entries for {} kernels",
                    table.steps.len(),
                    plan.kernels.len()
                ),
            ));
        }
        for (k, (kernel, step)) in plan.kernels.iter().zip(&table.steps).enumerate() {
            let at = format!("{at}.steps[{k}]");
            let on_gpu = kernel.device == kiln_ir::schedule::Device::Gpu;
            let step = match (step, on_gpu) {
                (None, false) => continue,
                (Some(step), true) => step,
                (None, true) => {
                    return Err(invalid(
                        at,
                        format!("no launches for {}, which runs on the GPU", kernel.name),
                    ))
                }
                (Some(_), false) => {
                    return Err(invalid(
                        at,
                        format!("launches for {}, which runs on the host", kernel.name),
                    ))
                }
            };
            for (name, buffer) in &step.buffers {
                let (index, count, list) = match buffer {
                    StepBuffer::Operand { index } => (*index, kernel.inputs.len(), "operands"),
                    StepBuffer::Result { index } => (*index, kernel.outputs.len(), "results"),
                    _ => continue,
                };
                if index >= count {
                    return Err(invalid(
                        format!("{at}.buffers.{name}"),
                        format!("{list} index {index}, but {} has {count}", kernel.name),
                    ));
                }
            }
            for (l, launch) in step.launches.iter().enumerate() {
                if !kernel_keys.contains(launch.kernel.as_str()) {
                    return Err(invalid(
                        format!("{at}.launches[{l}].kernel"),
                        format!("`{}` is not in the artifact's kernels", launch.kernel),
                    ));
                }
                if let Some(bad) = launch
                    .buffers
                    .iter()
                    .find(|b| !step.buffers.contains_key(&b.buffer))
                {
                    return Err(invalid(
                        format!("{at}.launches[{l}].buffers.{}", bad.param),
                        format!("buffer `{}` is not declared by the step", bad.buffer),
                    ));
                }
            }
            if let Some(refresh) = step.bounds_refresh {
                if refresh.launch >= step.launches.len() {
                    return Err(invalid(
                        format!("{at}.bounds_refresh.launch"),
                        format!("launch {} of {}", refresh.launch, step.launches.len()),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// What serde cannot check: both phases present once, buffer references in range, kernel
/// files inside the artifact and every GPU step's kernels listed.
fn check_manifest(path: &Path, manifest: &Manifest) -> Result<(), ArtifactError> {
    let invalid = |field: String, message: String| ArtifactError::Invalid {
        path: path.to_path_buf(),
        field,
        message,
    };
    for phase in [Phase::Prefill, Phase::Decode] {
        let count = manifest.phases.iter().filter(|p| p.phase == phase).count();
        if count != 1 {
            return Err(invalid(
                "phases".into(),
                format!("expected one {} plan, found {count}", phase.name()),
            ));
        }
    }
    let kernel_keys: std::collections::BTreeSet<&str> =
        manifest.kernels.iter().map(|k| k.key.as_str()).collect();
    for (p, phase) in manifest.phases.iter().enumerate() {
        let plan = &phase.plan;
        let buffers = plan.buffers.len();
        for (index, buffer) in plan.buffers.iter().enumerate() {
            if buffer.id != index {
                return Err(invalid(
                    format!("phases[{p}].plan.buffers[{index}].id"),
                    format!("expected {index}, found {}", buffer.id),
                ));
            }
        }
        for (k, kernel) in plan.kernels.iter().enumerate() {
            for (list, ids) in [("inputs", &kernel.inputs), ("outputs", &kernel.outputs)] {
                if let Some(bad) = ids.iter().find(|&&id| id >= buffers) {
                    return Err(invalid(
                        format!("phases[{p}].plan.kernels[{k}].{list}"),
                        format!("buffer {bad} does not exist (the plan has {buffers})"),
                    ));
                }
            }
            let expected = (kernel.inputs.len(), kernel.outputs.len());
            let found = (kernel.computes.inputs.len(), kernel.computes.outputs.len());
            if expected != found {
                return Err(invalid(
                    format!("phases[{p}].plan.kernels[{k}].computes"),
                    format!(
                        "{} operands and {} results, but the step binds {} and {}",
                        found.0, found.1, expected.0, expected.1
                    ),
                ));
            }
            if kernel.device == kiln_ir::schedule::Device::Gpu && !manifest.target.is_gpu() {
                return Err(invalid(
                    format!("phases[{p}].plan.kernels[{k}].device"),
                    format!(
                        "a GPU step in an artifact for target {}",
                        manifest.target.name
                    ),
                ));
            }
        }
        if phase.cpu_steps.len() != plan.kernels.len() {
            return Err(invalid(
                format!("phases[{p}].cpu_steps"),
                format!(
                    "{} entries for {} kernels",
                    phase.cpu_steps.len(),
                    plan.kernels.len()
                ),
            ));
        }
        for (k, (kernel, step)) in plan.kernels.iter().zip(&phase.cpu_steps).enumerate() {
            if step.is_some() && kernel.device != kiln_ir::schedule::Device::Cpu {
                return Err(invalid(
                    format!("phases[{p}].cpu_steps[{k}]"),
                    format!("a CPU step for {}, which runs on the GPU", kernel.name),
                ));
            }
        }
        check_launch_tables(p, phase, &kernel_keys, &invalid)?;
        for (index, named) in plan.outputs.iter().enumerate() {
            if named.buffer >= buffers {
                return Err(invalid(
                    format!("phases[{p}].plan.outputs[{index}].buffer"),
                    format!("buffer {} does not exist", named.buffer),
                ));
            }
        }
        for (index, transfer) in plan.transfers.iter().enumerate() {
            if transfer.buffer >= buffers || transfer.before_kernel > plan.kernels.len() {
                return Err(invalid(
                    format!("phases[{p}].plan.transfers[{index}]"),
                    "refers to a buffer or kernel that does not exist".into(),
                ));
            }
        }
    }
    for (index, kernel) in manifest.kernels.iter().enumerate() {
        let relative = Path::new(&kernel.file);
        let inside = relative.starts_with("kernels")
            && relative
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside {
            return Err(invalid(
                format!("kernels[{index}].file"),
                format!("`{}` is not a file under kernels/", kernel.file),
            ));
        }
    }
    Ok(())
}
