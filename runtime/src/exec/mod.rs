//! # runtime::exec — running a compiled plan
//!
//! An [`Executor`] runs one [`Schedule`] (the plan of one graph phase) call after call:
//!
//! 1. **Bindings** come from the shapes of the call's inputs and state (a mismatch names the
//!    tensor and the dimension).
//! 2. **Memory**: GPU intermediates live in one device arena laid out by the plan's memory
//!    plan, re-planned (the `plan_memory` pass) whenever the bindings change, and grown only
//!    when a larger layout needs it. Inputs, state and outputs get buffers of their own;
//!    weights, constants and load-time values are uploaded once ([`DeviceWeights`], shared by
//!    the executors of one model, such as its prefill and decode plans).
//! 3. **Kernels** run in plan order. A GPU step is a list of launches (`gpu_step.rs`): as
//!    recorded in a compiled artifact's launch tables when the call has a table's sizes, or
//!    derived from the step's family by `kiln_kernels::step_launches` (one launch for a
//!    single-kernel family, a program of several for attention and KV append, which writes
//!    its cache in place). Each launch's PTX comes from the executor's [`KernelSource`]:
//!    generated in this process, or taken from a compiled artifact's prebuilt kernels (never
//!    generated: a spec the artifact lacks is an error). Each distinct spec is loaded once,
//!    its operands bound to the kernel's parameters by name. A CPU kernel runs the Cranelift
//!    kernels of its step (`kiln_kernels::cpu_step`, compiled when the executor is made, or
//!    the artifact's) and the runtime's copies (`host.rs`); a host step without CPU kernels
//!    is an error when the executor is made, and nothing is interpreted. The executor never
//!    sees the graph. The plan's transfers move values between host and device before the
//!    kernel that needs them.
//! 4. **Outputs** are copied to the host and returned by name. With a [`DeviceState`]
//!    ([`Executor::keep_state_on_device`]) the state (the KV caches) stays on the device:
//!    a state input the call does not pass is read from the store, and a state output is
//!    stored there instead of being returned.
//!
//! GPU results outside the arena start as NaN (and the arena too, with
//! [`Executor::poison_arena`]), so a kernel that misses elements shows up as NaN logits,
//! never as stale numbers. This module never builds PTX
//! itself: it asks `kiln-kernels` for it.

mod error;
mod gpu_step;
mod host;
mod state;
mod storage;

pub use error::ExecError;

pub use state::DeviceState;
pub use storage::{elem_type, tensor_bytes, tensor_from_bytes, DeviceSlot};

use crate::cuda::{CudaDevice, DeviceBuffer, DeviceTensor, LoadedKernel};
use kiln_codegen::kernel::GpuKernel;
use kiln_ir::graph::TensorType;
use kiln_ir::schedule::memory::MemoryPlan;
use kiln_ir::schedule::{BufferId, BufferKind, Device, Pass, PlanMemory, Schedule};
use kiln_ir::shape::Bindings;
use kiln_ir::tensor::Tensor;
use kiln_ir::weights::Weights;
use kiln_kernels::lower::{LowerError, Lowering};
use kiln_kernels::step_launches::LaunchTable;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Device copies of weights, constants and load-time values, keyed by buffer name, dtype and
/// shape, shared by the executors of one model so that each is uploaded once.
#[derive(Clone, Debug, Default)]
pub struct DeviceWeights {
    tensors: Arc<Mutex<HashMap<String, Arc<DeviceTensor>>>>,
}

impl DeviceWeights {
    /// How many tensors are resident.
    pub fn len(&self) -> usize {
        self.tensors.lock().map(|t| t.len()).unwrap_or(0)
    }

    /// Whether nothing is resident.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get_or_upload(
        &self,
        key: String,
        device: &CudaDevice,
        tensor: &Tensor,
    ) -> Result<Arc<DeviceTensor>, ExecError> {
        let mut tensors = self
            .tensors
            .lock()
            .map_err(|_| ExecError::Internal("the device weight cache was poisoned".into()))?;
        if let Some(t) = tensors.get(&key) {
            return Ok(t.clone());
        }
        let uploaded = Arc::new(DeviceTensor::upload(device, tensor)?);
        tensors.insert(key, uploaded.clone());
        Ok(uploaded)
    }
}

/// GPU kernels built before the run, by spec key ([`KernelSpec::key`] or a program kernel's
/// key): the kernels of a compiled artifact.
#[derive(Clone, Debug, Default)]
pub struct PrebuiltKernels {
    /// Where they came from, for errors (such as the artifact's directory).
    pub origin: String,
    pub kernels: BTreeMap<String, GpuKernel>,
}

/// Where an executor's GPU kernels come from.
#[derive(Clone, Debug, Default)]
pub enum KernelSource {
    /// Generated in this process by `kiln-kernels` (a plan compiled in memory).
    #[default]
    Generate,
    /// Taken from prebuilt kernels only: a spec they lack is an error, never generated.
    Prebuilt(Arc<PrebuiltKernels>),
}

/// Counters of what an executor did, for reports and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecStats {
    pub calls: usize,
    pub gpu_launches: usize,
    /// Host step runs (all on Cranelift kernels and the runtime's copies).
    pub cpu_kernels: usize,
    pub transfers: usize,
    /// Distinct GPU kernels loaded onto the device.
    pub kernels_loaded: usize,
    /// Of those, how many were generated in this process (0 when running prebuilt kernels).
    pub kernels_generated: usize,
    /// Arena (re)allocations.
    pub arena_allocations: usize,
    /// GPU step runs whose launches were taken as recorded in a launch table.
    pub steps_recorded: usize,
    /// GPU step runs whose launches were derived from the step's family (no table for the
    /// call's sizes).
    pub steps_derived: usize,
}

/// Runs one plan, call after call. See the module documentation.
pub struct Executor {
    plan: Schedule,
    device: Option<Arc<CudaDevice>>,
    /// Host values of weights, constants and load-time results read by CPU kernels.
    host_resident: Vec<Option<Arc<Tensor>>>,
    /// Device values of the same, read by GPU kernels.
    device_resident: Vec<Option<Arc<DeviceTensor>>>,
    lowering: Lowering,
    source: KernelSource,
    /// Cranelift kernels of host steps, by kernel index.
    host_kernels: host::HostKernels,
    /// Spec key → loaded kernel.
    loaded: HashMap<String, Arc<LoadedKernel>>,
    arena: Option<DeviceBuffer<u8>>,
    memory: Option<MemoryPlan>,
    stats: ExecStats,
    /// Fill the arena with NaN bytes before every call (tests).
    poison_arena: bool,
    /// Launch tables recorded by a compiled artifact (see [`Executor::with_launch_tables`]).
    launch_tables: Vec<LaunchTable>,
    /// The launches of GPU steps, by bindings and then kernel index: recorded or derived
    /// (looked up by reference on every call, so a call with known sizes allocates nothing
    /// here).
    step_plans: HashMap<Bindings, Vec<Option<Arc<gpu_step::StepPlan>>>>,
    /// Workspaces by name, shared by all GPU steps (they run one after another).
    workspaces: HashMap<String, DeviceBuffer<u8>>,
    /// Identity page tables and constant length arrays by description.
    derived: HashMap<String, DeviceBuffer<i32>>,
    /// Quest page bounds by kernel index.
    quest_bounds: HashMap<usize, gpu_step::QuestBounds>,
    /// KV append results → the cache operand whose memory they take over.
    in_place: HashMap<BufferId, BufferId>,
    /// State buffers, and the in-place results that alias them, → the state's name.
    state_of: HashMap<BufferId, String>,
    /// Where state lives between calls, when it stays on the device.
    state_store: Option<DeviceState>,
    /// Device time of each GPU step, one sample per call, when profiling.
    profile: Option<Vec<Vec<f64>>>,
}

/// The device time of one GPU step of the plan over the profiled calls.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StepTiming {
    /// The plan kernel's index and name.
    pub index: usize,
    pub kernel: String,
    /// Its family, as the plan's report describes it.
    pub family: String,
    /// Median, best and mean over the calls, in microseconds (every launch of the step,
    /// between two events on the device's stream).
    pub calls: usize,
    pub median_us: f64,
    pub min_us: f64,
    pub mean_us: f64,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("plan", &self.plan.graph)
            .field("kernels", &self.plan.kernels.len())
            .field("stats", &self.stats)
            .finish()
    }
}

fn resident_kind(kind: &BufferKind) -> bool {
    matches!(
        kind,
        BufferKind::Weight | BufferKind::Constant { .. } | BufferKind::LoadTime
    )
}

/// Rounds each result to its dtype, as the interpreter rounds every node's result.
fn rounded(results: Vec<Tensor>, types: &[TensorType]) -> Vec<Tensor> {
    results
        .into_iter()
        .zip(types)
        .map(|(t, ty)| t.cast(ty.dtype))
        .collect()
}

impl Executor {
    /// An executor of `plan` with `weights`, generating its GPU kernels (see
    /// [`Executor::with_kernels`]). GPU kernels need `device`; weights read on the GPU are
    /// uploaded now (through `device_weights`).
    pub fn new(
        plan: Schedule,
        weights: &Weights,
        device: Option<Arc<CudaDevice>>,
        device_weights: &DeviceWeights,
    ) -> Result<Executor, ExecError> {
        let gpu_kernels = plan.count_on(Device::Gpu);
        if gpu_kernels > 0 && device.is_none() {
            return Err(ExecError::NoDevice {
                graph: plan.graph.clone(),
                gpu_kernels,
            });
        }
        let buffers = plan.buffers.len();
        let mut read_on: Vec<[bool; 2]> = vec![[false; 2]; buffers];
        for kernel in &plan.kernels {
            for &input in &kernel.inputs {
                read_on[input][(kernel.device == Device::Gpu) as usize] = true;
            }
        }
        // Host values of the resident buffers read on the host (by CPU kernels or load-time
        // ops, in definition order: load-time ops read earlier ones). Weights read only on the
        // GPU are uploaded from `weights` directly, never copied on the host.
        let mut load_time_input = vec![false; buffers];
        for op in &plan.load_time {
            for &input in &op.inputs {
                load_time_input[input] = true;
            }
        }
        let mut host: Vec<Option<Arc<Tensor>>> = vec![None; buffers];
        for buffer in &plan.buffers {
            match &buffer.kind {
                BufferKind::Weight => {
                    let tensor =
                        weights
                            .get(&buffer.name)
                            .ok_or_else(|| ExecError::MissingTensor {
                                name: buffer.name.clone(),
                                kind: "weight",
                            })?;
                    let expected = buffer.shape.resolve(&Bindings::new()).map_err(|m| {
                        ExecError::BadTensor {
                            name: buffer.name.clone(),
                            message: m.to_string(),
                        }
                    })?;
                    if tensor.dtype != buffer.dtype || tensor.shape != expected {
                        return Err(ExecError::BadTensor {
                            name: buffer.name.clone(),
                            message: format!(
                                "expected {} {:?}, got {} {:?}",
                                buffer.dtype, expected, tensor.dtype, tensor.shape
                            ),
                        });
                    }
                    if read_on[buffer.id][0] || load_time_input[buffer.id] {
                        host[buffer.id] = Some(Arc::new(tensor.clone()));
                    }
                }
                BufferKind::Constant { value } => {
                    host[buffer.id] = Some(Arc::new(Tensor::full(buffer.dtype, &[], *value)));
                }
                _ => {}
            }
        }
        for op in &plan.load_time {
            // Operands in the shapes the node reads them (a reshape is a view of its buffer).
            let reshaped: Vec<Tensor> = op
                .inputs
                .iter()
                .zip(&op.computes.inputs)
                .map(|(&id, ty)| {
                    let tensor = host[id].as_deref().ok_or_else(|| {
                        ExecError::Internal(format!("load-time operand {id} has no value"))
                    })?;
                    let shape = ty
                        .shape
                        .resolve(&Bindings::new())
                        .map_err(|e| ExecError::Internal(e.to_string()))?;
                    Ok(Tensor {
                        shape,
                        ..tensor.clone()
                    })
                })
                .collect::<Result<_, ExecError>>()?;
            let refs: Vec<&Tensor> = reshaped.iter().collect();
            // Load-time ops are copies of weights and constants (the concatenated SwiGLU
            // weights, transposes, casts).
            let results = vec![host::load_time(&op.computes.op, &refs).ok_or_else(|| {
                ExecError::NoCpuKernel {
                    kernel: format!("load-time {}", op.name),
                    op: op.computes.op.name().to_string(),
                }
            })??];
            for (&id, tensor) in op
                .outputs
                .iter()
                .zip(rounded(results, &op.computes.outputs))
            {
                host[id] = Some(Arc::new(tensor));
            }
        }
        let mut device_resident: Vec<Option<Arc<DeviceTensor>>> = vec![None; buffers];
        if let Some(device) = &device {
            for buffer in &plan.buffers {
                if resident_kind(&buffer.kind) && read_on[buffer.id][1] {
                    let tensor = match host[buffer.id].as_deref() {
                        Some(t) => t,
                        None if buffer.kind == BufferKind::Weight => {
                            weights.get(&buffer.name).ok_or_else(|| {
                                ExecError::Internal(format!("weight {} vanished", buffer.name))
                            })?
                        }
                        None => {
                            return Err(ExecError::Internal(format!(
                                "resident buffer {} has no value",
                                buffer.name
                            )))
                        }
                    };
                    let key = format!("{} {} {:?}", buffer.name, buffer.dtype, tensor.shape);
                    device_resident[buffer.id] =
                        Some(device_weights.get_or_upload(key, device, tensor)?);
                }
            }
        }
        // Host copies are kept only where a CPU kernel reads them.
        for (id, value) in host.iter_mut().enumerate() {
            if !read_on[id][0] {
                *value = None;
            }
        }
        // KV append writes its cache operand in place: nothing after it may read the
        // operand's old value.
        let mut in_place = HashMap::new();
        let mut state_of = HashMap::new();
        for buffer in &plan.buffers {
            if buffer.kind == BufferKind::State {
                state_of.insert(buffer.id, buffer.name.clone());
            }
        }
        for (index, kernel) in plan.kernels.iter().enumerate() {
            if kernel.device != Device::Gpu
                || !matches!(kernel.family, kiln_ir::schedule::Family::KvAppend { .. })
            {
                continue;
            }
            let cache = kernel.inputs[0];
            if let Some(later) = plan.kernels[index + 1..]
                .iter()
                .find(|k| k.inputs.contains(&cache))
            {
                return Err(ExecError::Internal(format!(
                    "{} appends to `{}` in place, but {} reads its old value afterwards",
                    kernel.name, plan.buffers[cache].name, later.name
                )));
            }
            in_place.insert(kernel.outputs[0], cache);
            if let Some(name) = state_of.get(&cache).cloned() {
                state_of.insert(kernel.outputs[0], name);
            }
        }
        let steps: Vec<Option<kiln_kernels::cpu_step::CpuStep>> = plan
            .kernels
            .iter()
            .map(|k| match k.device {
                Device::Cpu => kiln_kernels::cpu_step::cpu_step(&k.family, &k.computes),
                Device::Gpu => None,
            })
            .collect();
        let host_kernels = host::HostKernels::compile(&plan, &steps, &host)?;
        Ok(Executor {
            plan,
            device,
            host_resident: host,
            device_resident,
            lowering: Lowering::default(),
            source: KernelSource::Generate,
            host_kernels,
            loaded: HashMap::new(),
            arena: None,
            memory: None,
            stats: ExecStats::default(),
            poison_arena: false,
            launch_tables: Vec::new(),
            step_plans: HashMap::new(),
            workspaces: HashMap::new(),
            derived: HashMap::new(),
            quest_bounds: HashMap::new(),
            in_place,
            state_of,
            state_store: None,
            profile: None,
        })
    }

    /// Takes GPU kernels from `source` instead of generating them.
    pub fn with_kernels(mut self, source: KernelSource) -> Executor {
        self.source = source;
        self
    }

    /// Runs the GPU steps as recorded in `tables` (a compiled artifact's launch tables for
    /// this plan) whenever a call's sizes are a table's; other sizes derive their launches
    /// from the steps' families. A table that does not have one entry per plan kernel, with
    /// launches exactly for the GPU steps, is an error.
    pub fn with_launch_tables(mut self, tables: Vec<LaunchTable>) -> Result<Executor, ExecError> {
        for table in &tables {
            if table.steps.len() != self.plan.kernels.len() {
                return Err(ExecError::Internal(format!(
                    "a launch table for {:?} has {} steps for a plan of {} kernels",
                    table.bindings,
                    table.steps.len(),
                    self.plan.kernels.len()
                )));
            }
            if let Some((kernel, _)) = self
                .plan
                .kernels
                .iter()
                .zip(&table.steps)
                .find(|(k, s)| s.is_some() != (k.device == Device::Gpu))
            {
                return Err(ExecError::Kernel {
                    kernel: kernel.name.clone(),
                    message: format!(
                        "the launch table for {:?} disagrees with its placement",
                        table.bindings
                    ),
                });
            }
        }
        self.launch_tables = tables;
        self.step_plans.clear();
        Ok(self)
    }

    /// Runs the host steps on the CPU kernels `steps` (one entry per plan kernel, as a
    /// compiled artifact stores them), compiled now with Cranelift, instead of those
    /// `kiln_kernels::cpu_step` chooses. A step listed for a GPU kernel, a CPU kernel without
    /// a step, or a list of another length is an error.
    pub fn with_cpu_steps(
        mut self,
        steps: &[Option<kiln_kernels::cpu_step::CpuStep>],
    ) -> Result<Executor, ExecError> {
        if steps.len() != self.plan.kernels.len() {
            return Err(ExecError::Internal(format!(
                "{} CPU steps for a plan of {} kernels",
                steps.len(),
                self.plan.kernels.len()
            )));
        }
        if let Some(kernel) = self
            .plan
            .kernels
            .iter()
            .zip(steps)
            .find(|(k, s)| s.is_some() && k.device != Device::Cpu)
        {
            return Err(ExecError::Kernel {
                kernel: kernel.0.name.clone(),
                message: "a CPU step is listed for a kernel placed on the GPU".into(),
            });
        }
        self.host_kernels = host::HostKernels::compile(&self.plan, steps, &self.host_resident)?;
        Ok(self)
    }

    /// The kernel of spec `key` for plan kernel `kernel`: prebuilt, or generated by
    /// `generate` when the source allows it.
    fn kernel_code(
        &mut self,
        kernel: &str,
        key: &str,
        generate: impl FnOnce(&mut Lowering) -> Result<GpuKernel, LowerError>,
    ) -> Result<GpuKernel, ExecError> {
        match &self.source {
            KernelSource::Generate => {
                let generated = generate(&mut self.lowering).map_err(|e| ExecError::Kernel {
                    kernel: kernel.to_string(),
                    message: e.to_string(),
                })?;
                self.stats.kernels_generated += 1;
                Ok(generated)
            }
            KernelSource::Prebuilt(prebuilt) => {
                prebuilt
                    .kernels
                    .get(key)
                    .cloned()
                    .ok_or_else(|| ExecError::NotPrebuilt {
                        kernel: kernel.to_string(),
                        spec: key.to_string(),
                        origin: prebuilt.origin.clone(),
                    })
            }
        }
    }

    /// Keeps the state (KV caches) in `store` between calls instead of passing it through the
    /// host: a call may then leave state inputs out (they are read from the store), and the
    /// state outputs are stored there, not returned. Every kernel that reads a state input
    /// and every kernel that produces a state output must run on the GPU; otherwise this is
    /// an error naming the kernel, and the executor keeps passing state through the host.
    pub fn keep_state_on_device(&mut self, store: DeviceState) -> Result<(), ExecError> {
        self.check_state_can_stay_on_device()?;
        self.state_store = Some(store);
        Ok(())
    }

    /// Why the state cannot stay on the device (a kernel that touches it runs on the CPU),
    /// or `Ok`.
    pub fn check_state_can_stay_on_device(&self) -> Result<(), ExecError> {
        if self.device.is_none() {
            return Err(ExecError::NoDevice {
                graph: self.plan.graph.clone(),
                gpu_kernels: self.plan.count_on(Device::Gpu),
            });
        }
        let state_names = self.state_names();
        for kernel in &self.plan.kernels {
            let reads_state = kernel
                .inputs
                .iter()
                .any(|&i| self.plan.buffers[i].kind == BufferKind::State);
            let writes_state = self.plan.outputs.iter().any(|named| {
                state_names.contains(named.name.as_str()) && kernel.outputs.contains(&named.buffer)
            });
            if (reads_state || writes_state) && kernel.device != Device::Gpu {
                return Err(ExecError::Kernel {
                    kernel: kernel.name.clone(),
                    message: "it reads or writes the KV cache on the CPU, so the cache cannot stay on the device".into(),
                });
            }
        }
        Ok(())
    }

    /// The names of the plan's state inputs.
    fn state_names(&self) -> HashSet<&str> {
        self.plan
            .buffers
            .iter()
            .filter(|b| b.kind == BufferKind::State)
            .map(|b| b.name.as_str())
            .collect()
    }

    fn device_or_error(&self) -> Result<&Arc<CudaDevice>, ExecError> {
        self.device.as_ref().ok_or_else(|| ExecError::NoDevice {
            graph: self.plan.graph.clone(),
            gpu_kernels: self.plan.count_on(Device::Gpu),
        })
    }

    /// Fills the GPU arena with `0xFF` bytes (NaN in every float dtype) before each call, so
    /// that a kernel reading an intermediate nobody wrote this call produces NaN (for tests;
    /// it costs a host-to-device copy of the arena per call).
    pub fn poison_arena(&mut self, poison: bool) {
        self.poison_arena = poison;
    }

    /// The plan this executor runs.
    pub fn plan(&self) -> &Schedule {
        &self.plan
    }

    /// What it did so far.
    pub fn stats(&self) -> ExecStats {
        self.stats
    }

    /// Starts (or, with `false`, stops and clears) timing every GPU step of each call with
    /// CUDA events around its launches: [`Executor::step_timings`] then gives each step's
    /// device time, which is what a benchmark of a plan step reports. The events add a
    /// record before and after each step, nothing else.
    pub fn profile_steps(&mut self, on: bool) {
        self.profile = on.then(|| vec![Vec::new(); self.plan.kernels.len()]);
    }

    /// The device times (ms, one per profiled call) of plan kernel `index`; empty when not
    /// profiling or for a host step.
    pub fn step_samples(&self, index: usize) -> &[f64] {
        self.profile
            .as_ref()
            .and_then(|p| p.get(index))
            .map_or(&[], |s| s.as_slice())
    }

    /// The device time of each GPU step over the calls since profiling started, in plan
    /// order; empty when not profiling.
    pub fn step_timings(&self) -> Vec<StepTiming> {
        let Some(profile) = &self.profile else {
            return Vec::new();
        };
        profile
            .iter()
            .enumerate()
            .filter_map(|(index, samples)| {
                let timing = crate::cuda::Timing::from_samples(samples.clone())?;
                let kernel = &self.plan.kernels[index];
                Some(StepTiming {
                    index,
                    kernel: kernel.name.clone(),
                    family: kernel.family.describe(),
                    calls: samples.len(),
                    median_us: timing.median_ms * 1e3,
                    min_us: timing.min_ms * 1e3,
                    mean_us: timing.mean_ms * 1e3,
                })
            })
            .collect()
    }

    /// Binds the symbolic dimensions from the per-call tensors.
    fn bindings(&self, inputs: &HashMap<String, Tensor>) -> Result<Bindings, ExecError> {
        let mut bindings = Bindings::new();
        for buffer in &self.plan.buffers {
            if !matches!(buffer.kind, BufferKind::Input | BufferKind::State) {
                continue;
            }
            let stored = match (&self.state_store, inputs.get(&buffer.name)) {
                (Some(store), None) if buffer.kind == BufferKind::State => store
                    .get(&buffer.name)
                    .map(|(t, _)| (t.dtype, t.shape.clone())),
                _ => None,
            };
            let (dtype, shape) = match (inputs.get(&buffer.name), stored) {
                (Some(tensor), _) => (tensor.dtype, tensor.shape.clone()),
                (None, Some(stored)) => stored,
                (None, None) => {
                    return Err(ExecError::MissingTensor {
                        name: buffer.name.clone(),
                        kind: if buffer.kind == BufferKind::State {
                            "state"
                        } else {
                            "input"
                        },
                    })
                }
            };
            if dtype != buffer.dtype {
                return Err(ExecError::BadTensor {
                    name: buffer.name.clone(),
                    message: format!("expected dtype {}, got {}", buffer.dtype, dtype),
                });
            }
            bindings
                .unify(&buffer.shape, &shape)
                .map_err(|m| ExecError::BadTensor {
                    name: buffer.name.clone(),
                    message: format!("expected shape {}: {m}", buffer.shape),
                })?;
        }
        Ok(bindings)
    }

    /// Re-plans memory for `bindings` when they changed, and grows the arena when needed.
    fn prepare_memory(&mut self, bindings: &Bindings) -> Result<(), ExecError> {
        if self
            .memory
            .as_ref()
            .is_some_and(|m| &m.bindings == bindings)
        {
            return Ok(());
        }
        let alignment = self
            .plan
            .memory
            .as_ref()
            .map(|m| m.alignment.max(1))
            .unwrap_or(256);
        let mut plan = self.plan.clone();
        let mut full = bindings.clone();
        for buffer in &plan.buffers {
            for name in &buffer.bytes.symbols {
                if full.get(name).is_none() {
                    full.set(name, 1);
                }
            }
        }
        PlanMemory {
            bindings: full,
            alignment,
        }
        .run(&mut plan);
        let memory = plan.memory.unwrap_or_default();
        let gpu_bytes = memory
            .arenas
            .iter()
            .find(|a| a.device == Device::Gpu)
            .map(|a| a.bytes)
            .unwrap_or(0) as usize;
        if let Some(device) = &self.device {
            let have = self.arena.as_ref().map(|a| a.len()).unwrap_or(0);
            if gpu_bytes > have {
                self.arena = Some(DeviceBuffer::zeros(device, gpu_bytes)?);
                self.stats.arena_allocations += 1;
            }
        }
        self.memory = Some(memory);
        Ok(())
    }

    /// Runs the plan once on `inputs` (activations and state by name) and returns the graph's
    /// outputs by name.
    pub fn run(
        &mut self,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>, ExecError> {
        let bindings = self.bindings(inputs)?;
        self.prepare_memory(&bindings)?;
        if self.poison_arena {
            if let Some(arena) = &mut self.arena {
                arena.fill(0xFF)?;
            }
        }
        let buffers = self.plan.buffers.len();
        let mut host: Vec<Option<Arc<Tensor>>> = self.host_resident.clone();
        for buffer in &self.plan.buffers {
            if matches!(buffer.kind, BufferKind::Input | BufferKind::State) {
                host[buffer.id] = inputs.get(&buffer.name).cloned().map(Arc::new);
            }
        }
        let mut slots: Vec<Option<DeviceSlot>> = (0..buffers).map(|_| None).collect();
        for (id, resident) in self.device_resident.iter().enumerate() {
            if let Some(t) = resident {
                slots[id] = Some(DeviceSlot::Resident(t.clone()));
            }
        }
        // State kept on the device: read from the store unless the call passes it; state
        // outputs go back to the store instead of the host.
        let mut kept: HashMap<BufferId, String> = HashMap::new();
        if let Some(store) = &self.state_store {
            for buffer in &self.plan.buffers {
                if buffer.kind == BufferKind::State && host[buffer.id].is_none() {
                    if let Some((tensor, _)) = store.get(&buffer.name) {
                        slots[buffer.id] = Some(DeviceSlot::Resident(tensor));
                    }
                }
            }
            let state_names = self.state_names();
            for named in &self.plan.outputs {
                if state_names.contains(named.name.as_str()) {
                    kept.insert(named.buffer, named.name.clone());
                }
            }
        }
        let arena_slots: HashMap<BufferId, (u64, u64)> = self
            .memory
            .iter()
            .flat_map(|m| &m.arenas)
            .filter(|a| a.device == Device::Gpu)
            .flat_map(|a| &a.slots)
            .map(|s| (s.buffer, (s.offset, s.bytes)))
            .collect();

        let mut transfers = self.plan.transfers.clone();
        transfers.sort_by_key(|t| t.before_kernel);
        let mut next_transfer = 0;
        // (kernel index, start, end) events of the profiled GPU steps.
        let mut step_events = Vec::new();
        for index in 0..=self.plan.kernels.len() {
            while next_transfer < transfers.len() && transfers[next_transfer].before_kernel == index
            {
                let transfer = transfers[next_transfer].clone();
                next_transfer += 1;
                let already_there = transfer.to == Device::Gpu
                    && host[transfer.buffer].is_none()
                    && slots[transfer.buffer].is_some();
                let stays = transfer.to == Device::Cpu
                    && index == self.plan.kernels.len()
                    && kept.contains_key(&transfer.buffer);
                if already_there || stays {
                    continue;
                }
                self.transfer(
                    transfer.buffer,
                    transfer.to,
                    &bindings,
                    &arena_slots,
                    &mut host,
                    &mut slots,
                )?;
            }
            if index == self.plan.kernels.len() {
                break;
            }
            match self.plan.kernels[index].device {
                Device::Cpu => self.run_cpu(index, &bindings, &mut host)?,
                Device::Gpu => {
                    let events = match (&self.profile, &self.device) {
                        (Some(_), Some(device)) => {
                            let pair = (device.event()?, device.event()?);
                            pair.0.record()?;
                            Some(pair)
                        }
                        _ => None,
                    };
                    self.run_gpu(index, &bindings, &arena_slots, &mut slots)?;
                    if let Some((start, end)) = events {
                        end.record()?;
                        step_events.push((index, start, end));
                    }
                }
            }
        }
        if let Some(device) = &self.device {
            device.synchronize()?;
        }
        if let Some(profile) = &mut self.profile {
            for (index, start, end) in step_events {
                profile[index].push(f64::from(start.elapsed_ms(&end)?));
            }
        }
        self.stats.calls += 1;
        if let Some(store) = &self.state_store {
            for (&id, name) in &kept {
                let tensor = match slots[id].take() {
                    Some(DeviceSlot::Resident(t)) => t,
                    Some(DeviceSlot::Owned(t)) => Arc::new(t),
                    _ => {
                        return Err(ExecError::Internal(format!(
                            "state output `{name}` is not in a device buffer of its own"
                        )))
                    }
                };
                store.insert(name, tensor);
            }
        }
        let mut outputs = BTreeMap::new();
        for named in &self.plan.outputs {
            if kept.contains_key(&named.buffer) {
                continue;
            }
            let name = &named.name;
            let tensor = host[named.buffer]
                .as_deref()
                .ok_or_else(|| ExecError::Internal(format!("output `{name}` was not computed")))?;
            let shape = named
                .shape
                .resolve(&bindings)
                .map_err(|e| ExecError::Internal(e.to_string()))?;
            outputs.insert(
                name.clone(),
                Tensor {
                    shape,
                    ..tensor.clone()
                },
            );
        }
        Ok(outputs)
    }

    /// The concrete shape of buffer `id`.
    fn shape_of(&self, id: BufferId, bindings: &Bindings) -> Result<Vec<usize>, ExecError> {
        self.plan.buffers[id]
            .shape
            .resolve(bindings)
            .map_err(|e| ExecError::Internal(e.to_string()))
    }

    /// A device slot for buffer `id` that a kernel is about to write (or a transfer fill):
    /// its arena slot, or a NaN-poisoned tensor of its own.
    fn fresh_slot(
        &self,
        id: BufferId,
        bindings: &Bindings,
        arena_slots: &HashMap<BufferId, (u64, u64)>,
    ) -> Result<DeviceSlot, ExecError> {
        if let Some(&(offset, bytes)) = arena_slots.get(&id) {
            return Ok(DeviceSlot::Arena { offset, bytes });
        }
        let device = self.device.as_ref().ok_or_else(|| ExecError::NoDevice {
            graph: self.plan.graph.clone(),
            gpu_kernels: self.plan.count_on(Device::Gpu),
        })?;
        let buffer = &self.plan.buffers[id];
        let shape = self.shape_of(id, bindings)?;
        Ok(DeviceSlot::Owned(DeviceTensor::poisoned(
            device,
            buffer.dtype,
            &shape,
        )?))
    }

    fn transfer(
        &mut self,
        id: BufferId,
        to: Device,
        bindings: &Bindings,
        arena_slots: &HashMap<BufferId, (u64, u64)>,
        host: &mut [Option<Arc<Tensor>>],
        slots: &mut [Option<DeviceSlot>],
    ) -> Result<(), ExecError> {
        self.stats.transfers += 1;
        let buffer = &self.plan.buffers[id];
        match to {
            Device::Gpu => {
                let tensor = host[id].clone().ok_or_else(|| {
                    ExecError::Internal(format!(
                        "`{}` moves to the GPU before it exists",
                        buffer.name
                    ))
                })?;
                let device = self.device.as_ref().ok_or_else(|| ExecError::NoDevice {
                    graph: self.plan.graph.clone(),
                    gpu_kernels: self.plan.count_on(Device::Gpu),
                })?;
                let slot = match arena_slots.get(&id) {
                    Some(&(offset, bytes)) => {
                        let mut slot = DeviceSlot::Arena { offset, bytes };
                        slot.upload(self.arena.as_mut(), &tensor)?;
                        slot
                    }
                    None => DeviceSlot::Owned(DeviceTensor::upload(device, &tensor)?),
                };
                slots[id] = Some(slot);
            }
            Device::Cpu => {
                let shape = self.shape_of(id, bindings)?;
                let slot = slots[id].as_ref().ok_or_else(|| {
                    ExecError::Internal(format!(
                        "`{}` moves to the host before it exists",
                        buffer.name
                    ))
                })?;
                host[id] = Some(Arc::new(slot.download(
                    self.arena.as_ref(),
                    buffer.dtype,
                    &shape,
                )?));
            }
        }
        Ok(())
    }

    fn run_cpu(
        &mut self,
        index: usize,
        bindings: &Bindings,
        host: &mut [Option<Arc<Tensor>>],
    ) -> Result<(), ExecError> {
        let kernel = &self.plan.kernels[index];
        let mut operands = Vec::with_capacity(kernel.inputs.len());
        for (&id, ty) in kernel.inputs.iter().zip(&kernel.computes.inputs) {
            let tensor = host[id].clone().ok_or_else(|| {
                ExecError::Internal(format!(
                    "{}: operand `{}` is not on the host",
                    kernel.name, self.plan.buffers[id].name
                ))
            })?;
            let shape = ty
                .shape
                .resolve(bindings)
                .map_err(|e| ExecError::Internal(e.to_string()))?;
            operands.push(if shape == tensor.shape {
                tensor
            } else {
                Arc::new(Tensor {
                    shape,
                    ..(*tensor).clone()
                })
            });
        }
        let refs: Vec<&Tensor> = operands.iter().map(|t| t.as_ref()).collect();
        if let Some(Some(compiled)) = self.host_kernels.steps.get(index) {
            let shapes = kernel
                .computes
                .outputs
                .iter()
                .map(|ty| {
                    ty.shape
                        .resolve(bindings)
                        .map_err(|e| ExecError::Internal(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let results = compiled.run(&kernel.name, &refs, &shapes)?;
            if results.len() != kernel.outputs.len() {
                return Err(ExecError::Internal(format!(
                    "{}: {} results for {} outputs",
                    kernel.name,
                    results.len(),
                    kernel.outputs.len()
                )));
            }
            for (((&id, ty), shape), data) in kernel
                .outputs
                .iter()
                .zip(&kernel.computes.outputs)
                .zip(shapes)
                .zip(results)
            {
                let result = Tensor {
                    dtype: kiln_ir::dtype::DType::F32,
                    shape,
                    data,
                };
                host[id] = Some(Arc::new(result.cast(ty.dtype)));
            }
            self.stats.cpu_kernels += 1;
            return Ok(());
        }
        Err(ExecError::NoCpuKernel {
            kernel: kernel.name.clone(),
            op: kernel.computes.op.name().to_string(),
        })
    }
}
