//! Running a model through its compiled plans: compile the prefill and decode phases, build
//! one `kiln_runtime::exec::Executor` per phase, and hand the generation loop
//! (`crate::generate::generate`) a step function.
//!
//! Owns [`RunDevice`] (`cuda`, `cpu`, `auto`) and [`PlanRunner`]. On `cpu` the plans are
//! compiled with no GPU families, so every kernel runs on the host through the interpreter;
//! on `cuda` the GPU generators take what they can and the rest runs on the host with the
//! plan's transfers. With Quest options both phases compile with the Quest pass (it changes
//! only the decode plan: prefill stays dense).
//!
//! The runner owns the KV cache. When every kernel that touches it runs on the GPU, the
//! caches live in a `DeviceState` shared by both executors and never cross to the host;
//! otherwise they are host tensors passed in and out with each call. Its capacity is the
//! asked one rounded up to a multiple of [`CAPACITY_ALIGNMENT`] tokens, so that every
//! Quest page size divides it. It must not implement kernels or the step loop itself.

use crate::compile::{compile, CompileOptions};
use crate::generate::{kv_cache_state, HostState};
use anyhow::{bail, Context, Result};
use kiln_ir::model::{ModelConfig, Phase};
use kiln_ir::quest::QuestOptions;
use kiln_ir::schedule::BufferKind;
use kiln_ir::schedule::PassReport;
use kiln_ir::schedule::{Device, GpuCapabilities};
use kiln_ir::shape::Bindings;
use kiln_ir::tensor::Tensor;
use kiln_ir::weights::Weights;
use kiln_runtime::cuda::CudaDevice;
use kiln_runtime::exec::{DeviceState, DeviceWeights, ExecStats, Executor};
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

impl FromStr for RunDevice {
    type Err = String;
    fn from_str(s: &str) -> Result<RunDevice, String> {
        match s {
            "cuda" => Ok(RunDevice::Cuda),
            "cpu" => Ok(RunDevice::Cpu),
            "auto" => Ok(RunDevice::Auto),
            other => Err(format!(
                "unknown device `{other}` (devices: cuda, cpu, auto)"
            )),
        }
    }
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
    /// What the Quest pass did to the decode plan, when it ran.
    pub quest: Option<PassReport>,
}

impl PlanRunner {
    /// Compiles `config` for `device` (resolving `auto`), with the memory plan sized for a
    /// `prompt_len`-token prompt and a `capacity`-token KV cache, with the Quest pass when
    /// `quest` is set, and loads `weights`.
    pub fn new(
        config: &ModelConfig,
        weights: &Weights,
        device: RunDevice,
        ordinal: usize,
        prompt_len: usize,
        capacity: usize,
        quest: Option<QuestOptions>,
    ) -> Result<PlanRunner> {
        let capacity = capacity.max(1).next_multiple_of(CAPACITY_ALIGNMENT);
        let cuda = match device {
            RunDevice::Cpu => None,
            RunDevice::Cuda => Some(CudaDevice::open(ordinal)?),
            RunDevice::Auto if CudaDevice::is_available() => Some(CudaDevice::open(ordinal)?),
            RunDevice::Auto => None,
        };
        let mut options = CompileOptions::with_bindings(Bindings::from_pairs(&[
            ("batch", 1),
            ("seq", prompt_len.max(1)),
            ("ctx", capacity.max(1)),
        ]));
        options.quest = quest;
        if cuda.is_none() {
            options.schedule.gpu = GpuCapabilities {
                families: Default::default(),
                dtypes: Default::default(),
            };
        }
        let description = match &cuda {
            Some(d) => d.info().to_string(),
            None => "cpu".to_string(),
        };
        let cuda = cuda.map(Arc::new);
        if device == RunDevice::Cuda && !config.dtype.is_float() {
            bail!("model dtype {} cannot run", config.dtype);
        }
        let shared = DeviceWeights::default();
        let mut executors = Vec::new();
        let mut placement = Vec::new();
        let mut quest_report = None;
        for phase in [Phase::Prefill, Phase::Decode] {
            let compiled = compile(config, phase, &options)
                .with_context(|| format!("compiling the {} plan", phase.name()))?;
            placement.push(compiled.plan.count_on(Device::Gpu));
            placement.push(compiled.plan.count_on(Device::Cpu));
            if phase == Phase::Decode {
                quest_report = compiled.quest.clone();
            }
            let executor = Executor::new(
                compiled.graph,
                compiled.plan,
                weights,
                cuda.clone(),
                &shared,
            )
            .with_context(|| format!("loading the {} plan", phase.name()))?;
            executors.push(executor);
        }
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
            quest: quest_report,
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
}
