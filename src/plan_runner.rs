//! Running a compiled artifact: one `kiln_runtime::exec::Executor` per phase, with the
//! artifact's kernels (never generated here), handing the generation loop
//! (`crate::generate::generate`) a step function.
//!
//! Owns [`RunDevice`] (`cuda`, `cpu`, `auto`) and [`PlanRunner`]. There is one execution
//! path: [`PlanRunner::from_artifact`] runs a loaded artifact directory, and
//! [`PlanRunner::new`] compiles an artifact in memory (target: the opened device, or `cpu`)
//! and runs it the same way. A `cpu` artifact has no GPU steps (every kernel on the host,
//! on its Cranelift kernels and the runtime's copies); a GPU artifact runs the
//! generated kernels and the rest on the host with the plan's transfers. With Quest options
//! both phases compile with the Quest pass (it changes only the decode plan); with Atom
//! options ([`Passes::atom`], [`PlanRunner::with_passes`]) both compile with the Atom pass, and
//! the weights must be the Atom model's (`crate::atom_model`): its W4A4 linears run on the
//! host (CPU plans; no GPU kernel yet).
//!
//! The runner owns the KV cache. When every kernel that touches it runs on the GPU, the
//! caches live in a `DeviceState` shared by both executors and never cross to the host;
//! otherwise they are host tensors passed in and out with each call. Its capacity is the
//! asked one rounded up to a multiple of [`CAPACITY_ALIGNMENT`] tokens, so that every
//! Quest page size divides it. It must not implement kernels or the step loop itself.

use crate::generate::{kv_cache_state, HostState};
use anyhow::{bail, Context, Result};
use kiln_compiler::{Artifact, ArtifactOptions, Target};
use kiln_ir::atom::AtomOptions;
use kiln_ir::quest::QuestOptions;
use kiln_ir::schedule::BufferKind;
use kiln_ir::schedule::{AttentionKind, Device, Family};
use kiln_ir::shape::Bindings;
use kiln_ir::tensor::Tensor;
use kiln_ir::weights::Weights;
use kiln_models::{ModelConfig, Phase};
use kiln_runtime::cuda::CudaDevice;
use kiln_runtime::exec::{
    DeviceState, DeviceWeights, ExecStats, Executor, KernelSource, PrebuiltKernels, StepTiming,
};
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;

/// Where `kiln run` executes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunDevice {
    /// The GPU generators' kernels on a CUDA device, the rest on the host.
    Cuda,
    /// Every kernel on the host.
    Cpu,
    /// `cuda` when a CUDA device is present, else `cpu`.
    Auto,
}

/// A device name `kiln run` does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown device `{0}` (devices: cuda, cpu, auto)")]
pub struct UnknownDevice(pub String);

impl FromStr for RunDevice {
    type Err = UnknownDevice;
    fn from_str(s: &str) -> Result<RunDevice, UnknownDevice> {
        match s {
            "cuda" => Ok(RunDevice::Cuda),
            "cpu" => Ok(RunDevice::Cpu),
            "auto" => Ok(RunDevice::Auto),
            other => Err(UnknownDevice(other.to_string())),
        }
    }
}

/// Opens the CUDA device that `device` asks for (`None` for the host).
pub fn open_device(device: RunDevice, ordinal: usize) -> Result<Option<CudaDevice>> {
    Ok(match device {
        RunDevice::Cpu => None,
        RunDevice::Cuda => Some(CudaDevice::open(ordinal)?),
        RunDevice::Auto if CudaDevice::is_available() => Some(CudaDevice::open(ordinal)?),
        RunDevice::Auto => None,
    })
}

/// The compile target of an opened device.
pub fn device_target(device: &CudaDevice) -> Result<Target> {
    let info = device.info();
    let (major, minor) = info.compute_capability;
    Ok(Target::of_device(
        &info.name,
        (major as u32, minor as u32),
        info.sm_count,
    )?)
}

/// The graph passes a plan compiled in memory runs with.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Passes {
    /// Quest decode attention (`kiln_ir::passes::quest`).
    pub quest: Option<QuestOptions>,
    /// Atom W4A4 linears (`kiln_ir::passes::atom`); the weights are then the Atom model's.
    pub atom: Option<AtomOptions>,
}

/// KV-cache capacities are rounded up to a multiple of this many tokens.
pub const CAPACITY_ALIGNMENT: usize = 256;

/// The compiled plans of a model's two phases and their executors.
#[derive(Debug)]
pub struct PlanRunner {
    prefill: Executor,
    decode: Executor,
    /// The KV caches when they live on the host (`None`: on the device).
    host_state: Option<HostState>,
    /// Tokens the KV cache holds.
    pub capacity: usize,
    /// Whether the KV caches stay on the device between calls.
    pub state_on_device: bool,
    /// `cpu`, or the CUDA device's description.
    pub device: String,
    /// Kernels per phase and device: `(prefill gpu, prefill cpu, decode gpu, decode cpu)`.
    pub placement: (usize, usize, usize, usize),
    /// Distinct GPU kernels the artifact holds (every one the plans can launch).
    pub artifact_kernels: usize,
    /// When the Quest pass ran: how many decode attention kernels it put on Quest.
    pub quest_kernels: Option<usize>,
}

impl PlanRunner {
    /// Compiles `config` in memory for `device` (resolving `auto`; the target is the opened
    /// device's, or `cpu`), with the memory plan sized for a `prompt_len`-token prompt and a
    /// `capacity`-token KV cache, with the Quest pass when `quest` is set, and runs the
    /// artifact through [`PlanRunner::from_artifact`]: the same path as a compiled directory.
    pub fn new(
        config: &ModelConfig,
        weights: &Weights,
        device: RunDevice,
        ordinal: usize,
        prompt_len: usize,
        capacity: usize,
        quest: Option<QuestOptions>,
    ) -> Result<PlanRunner> {
        let passes = Passes { quest, atom: None };
        PlanRunner::with_passes(
            config, weights, device, ordinal, prompt_len, capacity, passes,
        )
    }

    /// [`PlanRunner::new`] with any of the [`Passes`]. With Atom, `weights` are the Atom
    /// model's (`crate::atom_model::AtomModel::weights`) and the device must be the host:
    /// `atom_linear` has no GPU kernel yet.
    pub fn with_passes(
        config: &ModelConfig,
        weights: &Weights,
        device: RunDevice,
        ordinal: usize,
        prompt_len: usize,
        capacity: usize,
        passes: Passes,
    ) -> Result<PlanRunner> {
        let Passes { quest, atom } = passes;
        if atom.is_some() && device == RunDevice::Cuda {
            bail!(
                "--atom runs on the CPU (--device cpu) or the interpreter (--device reference): \
                 `atom_linear` has no GPU kernel yet"
            );
        }
        if atom.is_some_and(|atom| atom.kv_bits != 16) {
            bail!(
                "--atom-kv-bits 4 runs on --device reference only for now: compiled plans have \
                 no CPU kernel of the KV cache's `quantize`/`dequantize`"
            );
        }
        let device = match device {
            // Atom's linears run on the host: do not open a GPU for the rest.
            RunDevice::Auto if atom.is_some() => RunDevice::Cpu,
            other => other,
        };
        let capacity = capacity.max(1).next_multiple_of(CAPACITY_ALIGNMENT);
        let cuda = open_device(device, ordinal)?;
        if device == RunDevice::Cuda && !config.dtype.is_float() {
            bail!("model dtype {} cannot run", config.dtype);
        }
        let target = match &cuda {
            Some(device) => device_target(device)?,
            None => Target::from_name("cpu")?,
        };
        let options = ArtifactOptions {
            batch: 1,
            prompt_len: prompt_len.max(1),
            context: capacity,
            quest,
            atom,
            target,
        };
        let artifact = Artifact::compile(config, &options).context("compiling the model")?;
        PlanRunner::with_device(&artifact, weights, cuda, capacity, "in memory".into())
    }

    /// Runs a compiled artifact (from [`Artifact::load`] or [`Artifact::compile`]) with
    /// `weights`, on CUDA device `ordinal` when the artifact's target is a GPU (the device
    /// must match the target), with a `capacity`-token KV cache. GPU kernels come from the
    /// artifact only: nothing is generated.
    pub fn from_artifact(
        artifact: &Artifact,
        weights: &Weights,
        ordinal: usize,
        capacity: usize,
        origin: String,
    ) -> Result<PlanRunner> {
        let capacity = capacity.max(1).next_multiple_of(CAPACITY_ALIGNMENT);
        let target = &artifact.manifest.target;
        let cuda = if target.is_gpu() {
            if !CudaDevice::is_available() {
                bail!(
                    "{origin} was compiled for {} and needs a CUDA device, but none is present; \
                     compile it with --target cpu to run on the host",
                    target.name
                );
            }
            let device = CudaDevice::open(ordinal)?;
            let info = device.info();
            let (major, minor) = info.compute_capability;
            target
                .check_device((major as u32, minor as u32), info.sm_count)
                .with_context(|| format!("loading {origin} on {}", info.name))?;
            Some(device)
        } else {
            None
        };
        PlanRunner::with_device(artifact, weights, cuda, capacity, origin)
    }

    fn with_device(
        artifact: &Artifact,
        weights: &Weights,
        cuda: Option<CudaDevice>,
        capacity: usize,
        origin: String,
    ) -> Result<PlanRunner> {
        let config = &artifact.manifest.model;
        let description = match &cuda {
            Some(d) => d.info().to_string(),
            None => "cpu".to_string(),
        };
        let cuda = cuda.map(Arc::new);
        let kernels = KernelSource::Prebuilt(Arc::new(PrebuiltKernels {
            origin: origin.clone(),
            kernels: artifact.kernels(),
        }));
        let shared = DeviceWeights::default();
        let mut executors = Vec::new();
        let mut placement = Vec::new();
        for phase in [Phase::Prefill, Phase::Decode] {
            let plan = artifact.plan(phase).clone();
            placement.push(plan.count_on(Device::Gpu));
            placement.push(plan.count_on(Device::Cpu));
            let executor = Executor::new(plan, weights, cuda.clone(), &shared)
                .with_context(|| format!("loading the {} plan of {origin}", phase.name()))?
                .with_kernels(kernels.clone())
                .with_cpu_steps(artifact.cpu_steps(phase))
                .with_context(|| format!("compiling the CPU kernels of the {} plan", phase.name()))?
                .with_launch_tables(artifact.phase(phase).launch_tables.clone())
                .with_context(|| {
                    format!("taking the launch tables of the {} plan", phase.name())
                })?;
            executors.push(executor);
        }
        let decode_plan = artifact.plan(Phase::Decode);
        let quest_kernels = decode_plan
            .passes_run
            .iter()
            .any(|p| p.name == "quest")
            .then(|| {
                decode_plan
                    .kernels
                    .iter()
                    .filter(|k| {
                        matches!(
                            k.family,
                            Family::Attention {
                                kind: AttentionKind::Quest { .. },
                                ..
                            }
                        )
                    })
                    .count()
            });
        let mut decode = executors.pop().expect("two phases");
        let mut prefill = executors.pop().expect("two phases");
        let store = DeviceState::default();
        let mut state_on_device = false;
        if let Some(device) = &cuda {
            let on_device = prefill.check_state_can_stay_on_device().is_ok()
                && decode.check_state_can_stay_on_device().is_ok();
            if on_device {
                prefill.keep_state_on_device(store.clone())?;
                decode.keep_state_on_device(store.clone())?;
                let bindings = Bindings::from_pairs(&[("batch", 1), ("ctx", capacity)]);
                for buffer in &decode.plan().buffers {
                    if buffer.kind != BufferKind::State {
                        continue;
                    }
                    let shape = buffer
                        .shape
                        .resolve(&bindings)
                        .map_err(anyhow::Error::msg)?;
                    store
                        .insert_zeros(device, &buffer.name, buffer.dtype, &shape)
                        .with_context(|| format!("allocating the KV cache `{}`", buffer.name))?;
                }
                state_on_device = true;
            }
        }
        Ok(PlanRunner {
            prefill,
            decode,
            host_state: (!state_on_device).then(|| HostState {
                tensors: kv_cache_state(config, capacity, 0.0),
            }),
            capacity,
            state_on_device,
            device: description,
            placement: (placement[0], placement[1], placement[2], placement[3]),
            artifact_kernels: artifact.manifest.kernels.len(),
            quest_kernels,
        })
    }

    /// Runs one phase on the per-call inputs (the runner adds the KV caches) and returns the
    /// graph's other outputs.
    pub fn step(
        &mut self,
        phase: Phase,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let executor = match phase {
            Phase::Prefill => &mut self.prefill,
            Phase::Decode => &mut self.decode,
        };
        let run = |executor: &mut Executor, inputs: &HashMap<String, Tensor>| {
            executor
                .run(inputs)
                .with_context(|| format!("running the {} plan", phase.name()))
        };
        match &mut self.host_state {
            None => run(executor, inputs),
            Some(state) => {
                let mut outputs = run(executor, &state.with_inputs(inputs))?;
                state.update(&mut outputs);
                Ok(outputs)
            }
        }
    }

    /// Fills the GPU arenas with NaN before every call (see `Executor::poison_arena`).
    pub fn poison_arenas(&mut self, poison: bool) {
        self.prefill.poison_arena(poison);
        self.decode.poison_arena(poison);
    }

    /// What the prefill and decode executors did.
    pub fn stats(&self) -> (ExecStats, ExecStats) {
        (self.prefill.stats(), self.decode.stats())
    }

    /// Times every GPU step of both plans from now on (see `Executor::profile_steps`).
    pub fn profile_steps(&mut self, on: bool) {
        self.prefill.profile_steps(on);
        self.decode.profile_steps(on);
    }

    /// The prefill and decode plans' GPU step timings since profiling started.
    pub fn step_timings(&self) -> (Vec<StepTiming>, Vec<StepTiming>) {
        (self.prefill.step_timings(), self.decode.step_timings())
    }
}
