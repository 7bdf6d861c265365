//! Running one GPU step of a plan: its launches (`kiln_kernels::step_launches`).
//!
//! Every GPU step is a list of launches, each a kernel (by spec key), the step buffer each
//! pointer parameter binds to and the scalars: one launch for a single-kernel family, a
//! program of several for attention and KV append. The launches come from the artifact's
//! **launch tables** ([`Executor::with_launch_tables`]) when the call's sizes are a table's
//! (run as recorded, nothing derived), or are derived from the step's family by
//! `kiln_kernels::step_launches` otherwise (a plan compiled in memory, or a prompt length the
//! artifact has no table for); [`ExecStats`](super::ExecStats) counts both. Owns the buffers
//! the launches name beyond the step's operands and results: workspaces shared by all steps
//! (they run one after another) and grown when needed, identity page tables and constant
//! length arrays made once per size, Quest page bounds kept per step between calls.
//!
//! **KV append is in place**: the result is the cache operand's own memory (the executor
//! checked at construction that no later kernel reads the operand). It is the same
//! `kv_append` kernel as the paged pool's (`crate::kv`), launched on the contiguous cache
//! viewed as token-major pages under an identity page table, like the attention kernels that
//! read it; the plan has no page allocator (every sequence owns `capacity` rows).
//!
//! **Quest page bounds** belong to the step that reads them. They are refreshed for the
//! pages of this call's new tokens only when the bounds are known to match the cache before
//! this call's append: the cache operand is device-resident state whose version is the one
//! this step expected after its previous call (so nothing but this plan wrote it since).
//! Otherwise (first call, a new prefill, host-held state) every page is rebuilt. This relies
//! on the model graphs' contract that a decode call appends its new tokens as the last
//! rows before `lengths`. It must not generate PTX or decide placement.

use super::{ExecError, Executor};
use crate::cuda::{Arg, Args, BufferArg, DeviceBuffer, LoadedKernel};
use crate::exec::storage::DeviceSlot;
use kiln_ir::schedule::BufferId;
use kiln_ir::shape::Bindings;
use kiln_kernels::lower::Scalar;
use kiln_kernels::step_launches::{step_launches, LaunchKernel, StepBuffer, StepLaunches};
use std::collections::HashMap;
use std::sync::Arc;

/// Quest page bounds of one step.
pub(super) struct QuestBounds {
    max: DeviceBuffer<u8>,
    min: DeviceBuffer<u8>,
    /// The version of the cache state that means "only this step's plan appended since".
    expect_version: Option<u64>,
}

/// The launches of one step for one set of sizes, with their specs when derived in this
/// process (a recorded step names its kernels by key only).
pub(super) struct StepPlan {
    launches: StepLaunches,
    kernels: Option<Vec<LaunchKernel>>,
}

impl Executor {
    /// The launches of GPU step `index` under `bindings`: recorded in a launch table with
    /// exactly these sizes, else derived (once per sizes).
    fn step_plan(&mut self, index: usize, bindings: &Bindings) -> Result<Arc<StepPlan>, ExecError> {
        if let Some(p) = self
            .step_plans
            .get(bindings)
            .and_then(|steps| steps.get(index))
            .and_then(Option::as_ref)
        {
            return Ok(p.clone());
        }
        let kernel = &self.plan.kernels[index];
        let recorded = self
            .launch_tables
            .iter()
            .find(|table| table.bindings == *bindings)
            .map(|table| {
                table
                    .steps
                    .get(index)
                    .cloned()
                    .flatten()
                    .ok_or_else(|| ExecError::Kernel {
                        kernel: kernel.name.clone(),
                        message: format!(
                            "the launch table for {:?} has no launches for this GPU step",
                            table.bindings
                        ),
                    })
            })
            .transpose()?;
        let built = match recorded {
            Some(launches) => StepPlan {
                launches,
                kernels: None,
            },
            None => {
                let sm_count = self
                    .device
                    .as_ref()
                    .map(|d| d.info().sm_count as usize)
                    .unwrap_or(kiln_kernels::attention::decode::H100_SM_COUNT);
                let derived =
                    step_launches(&kernel.family, bindings, sm_count).map_err(|message| {
                        ExecError::Kernel {
                            kernel: kernel.name.clone(),
                            message: message.to_string(),
                        }
                    })?;
                StepPlan {
                    launches: derived.launches,
                    kernels: Some(derived.kernels),
                }
            }
        };
        let built = Arc::new(built);
        let steps = self.plan.kernels.len();
        let cached = self
            .step_plans
            .entry(bindings.clone())
            .or_insert_with(|| vec![None; steps]);
        cached[index] = Some(built.clone());
        Ok(built)
    }

    /// Loads the kernel of launch `launch` of `step` (once per spec key).
    fn launch_kernel(
        &mut self,
        index: usize,
        step: &StepPlan,
        launch: usize,
    ) -> Result<Arc<LoadedKernel>, ExecError> {
        let key = &step.launches.launches[launch].kernel;
        if let Some(l) = self.loaded.get(key.as_str()) {
            return Ok(l.clone());
        }
        let key = key.clone();
        let name = self.plan.kernels[index].name.clone();
        let spec = step.kernels.as_ref().and_then(|k| k.get(launch)).cloned();
        let code = self.kernel_code(&name, &key, |_| match spec {
            Some(spec) => Ok(spec.generate()?),
            None => Err(kiln_kernels::lower::LowerError::NoGenerator {
                op: format!("{key} (a recorded launch: its kernel must be prebuilt)"),
            }),
        })?;
        let device = self.device_or_error()?;
        let loaded = Arc::new(device.load(&code)?);
        self.stats.kernels_loaded += 1;
        self.loaded.insert(key, loaded.clone());
        Ok(loaded)
    }

    /// Makes sure the workspaces, derived tables and Quest bounds of `step` exist at their
    /// sizes.
    fn prepare_step_buffers(&mut self, index: usize, step: &StepLaunches) -> Result<(), ExecError> {
        let device = self.device_or_error()?.clone();
        for (name, buffer) in &step.buffers {
            match buffer {
                StepBuffer::Workspace { bytes } => {
                    let have = self.workspaces.get(name).map(|b| b.len()).unwrap_or(0);
                    if *bytes > have {
                        self.workspaces.insert(
                            name.clone(),
                            DeviceBuffer::zeros(&device, (*bytes).max(16))?,
                        );
                    }
                }
                StepBuffer::IdentityPageTable { batch, max_pages } => {
                    let key = format!("page_table {batch}x{max_pages}");
                    if let std::collections::hash_map::Entry::Vacant(slot) = self.derived.entry(key)
                    {
                        let table: Vec<i32> = (0..batch * max_pages).map(|i| i as i32).collect();
                        slot.insert(DeviceBuffer::from_host(&device, &table)?);
                    }
                }
                StepBuffer::Lengths { batch, value } => {
                    let key = format!("lengths {batch}x{value}");
                    if let std::collections::hash_map::Entry::Vacant(slot) = self.derived.entry(key)
                    {
                        slot.insert(DeviceBuffer::from_host(
                            &device,
                            &vec![*value as i32; *batch],
                        )?);
                    }
                }
                StepBuffer::QuestBounds { elements, .. } => {
                    let dtype = self.plan.buffers[self.plan.kernels[index].inputs[1]].dtype;
                    let bytes = dtype.storage_bytes(*elements);
                    let fits = self
                        .quest_bounds
                        .get(&index)
                        .is_some_and(|b| b.max.len() >= bytes);
                    if !fits {
                        self.quest_bounds.insert(
                            index,
                            QuestBounds {
                                max: DeviceBuffer::poisoned(&device, bytes)?,
                                min: DeviceBuffer::poisoned(&device, bytes)?,
                                expect_version: None,
                            },
                        );
                    }
                }
                StepBuffer::Operand { .. } | StepBuffer::Result { .. } => {}
            }
        }
        Ok(())
    }

    /// Gives every result of GPU step `index` a slot: a KV append's result takes over its
    /// cache operand's memory, any other result gets a fresh slot.
    fn result_slots(
        &mut self,
        index: usize,
        bindings: &Bindings,
        arena_slots: &HashMap<BufferId, (u64, u64)>,
        slots: &mut [Option<DeviceSlot>],
    ) -> Result<(), ExecError> {
        let kernel = &self.plan.kernels[index];
        let name = kernel.name.clone();
        for output in kernel.outputs.clone() {
            let Some(&cache) = self.in_place.get(&output) else {
                slots[output] = Some(self.fresh_slot(output, bindings, arena_slots)?);
                continue;
            };
            let shared = match slots[cache].take() {
                Some(DeviceSlot::Owned(t)) => Arc::new(t),
                Some(DeviceSlot::Resident(t)) => t,
                Some(arena @ DeviceSlot::Arena { .. }) => {
                    slots[cache] = Some(arena);
                    return Err(ExecError::Internal(format!(
                        "{name}: the KV cache operand lives in the arena; it must be a buffer of its own"
                    )));
                }
                None => {
                    return Err(ExecError::Internal(format!(
                        "{name}: the KV cache `{}` is not on the GPU",
                        self.plan.buffers[cache].name
                    )))
                }
            };
            slots[cache] = Some(DeviceSlot::Resident(shared.clone()));
            slots[output] = Some(DeviceSlot::Resident(shared));
        }
        Ok(())
    }

    /// Runs GPU step `index`: its launches in order.
    pub(super) fn run_gpu(
        &mut self,
        index: usize,
        bindings: &Bindings,
        arena_slots: &HashMap<BufferId, (u64, u64)>,
        slots: &mut [Option<DeviceSlot>],
    ) -> Result<(), ExecError> {
        let step = self.step_plan(index, bindings)?;
        if step.kernels.is_none() {
            self.stats.steps_recorded += 1;
        } else {
            self.stats.steps_derived += 1;
        }
        self.prepare_step_buffers(index, &step.launches)?;
        self.result_slots(index, bindings, arena_slots, slots)?;
        let kernel = self.plan.kernels[index].clone();

        // Quest: refresh only the new tokens' pages when the bounds match the cache.
        let mut rebuild = true;
        let mut next_version = None;
        if step.launches.bounds_refresh.is_some() {
            let cache = kernel.inputs[1];
            if let (Some(store), Some(name)) = (&self.state_store, self.state_of.get(&cache)) {
                let now = store.version(name);
                let expected = self.quest_bounds.get(&index).and_then(|b| b.expect_version);
                rebuild = expected != Some(now);
                next_version = Some(now + 1);
            }
        }

        let device = self.device_or_error()?.clone();
        for launch_index in 0..step.launches.launches.len() {
            let loaded = self.launch_kernel(index, &step, launch_index)?;
            let launch = &step.launches.launches[launch_index];
            let mut args = Args::new();
            for binding in &launch.buffers {
                let buffer = step.launches.buffers.get(&binding.buffer).ok_or_else(|| {
                    ExecError::Kernel {
                        kernel: kernel.name.clone(),
                        message: format!(
                            "launch {launch_index} binds `{}` to `{}`, which the step does not declare",
                            binding.param, binding.buffer
                        ),
                    }
                })?;
                let plan_buffer = |ids: &[BufferId], i: usize| {
                    ids.get(i).copied().ok_or_else(|| ExecError::Kernel {
                        kernel: kernel.name.clone(),
                        message: format!(
                            "`{}` binds to {buffer:?}, which the step lacks",
                            binding.param
                        ),
                    })
                };
                let arg: BufferArg<'_> = match buffer {
                    StepBuffer::Operand { index: i } | StepBuffer::Result { index: i } => {
                        let id = match buffer {
                            StepBuffer::Operand { .. } => plan_buffer(&kernel.inputs, *i)?,
                            _ => plan_buffer(&kernel.outputs, *i)?,
                        };
                        let slot = slots[id].as_ref().ok_or_else(|| {
                            ExecError::Internal(format!(
                                "{}: `{}` is not on the GPU",
                                kernel.name, self.plan.buffers[id].name
                            ))
                        })?;
                        slot.arg(self.arena.as_ref(), self.plan.buffers[id].dtype, &device)?
                    }
                    StepBuffer::Workspace { .. } => self
                        .workspaces
                        .get(&binding.buffer)
                        .ok_or_else(|| {
                            ExecError::Internal(format!("workspace `{}`", binding.buffer))
                        })?
                        .arg(),
                    StepBuffer::IdentityPageTable { batch, max_pages } => self
                        .derived
                        .get(&format!("page_table {batch}x{max_pages}"))
                        .ok_or_else(|| ExecError::Internal("page table".into()))?
                        .arg(),
                    StepBuffer::Lengths { batch, value } => self
                        .derived
                        .get(&format!("lengths {batch}x{value}"))
                        .ok_or_else(|| ExecError::Internal("lengths".into()))?
                        .arg(),
                    StepBuffer::QuestBounds { min, .. } => {
                        let bounds = self
                            .quest_bounds
                            .get(&index)
                            .ok_or_else(|| ExecError::Internal("quest bounds".into()))?;
                        if *min {
                            bounds.min.arg()
                        } else {
                            bounds.max.arg()
                        }
                    }
                };
                args = args.buffer(&binding.param, arg);
            }
            for (name, value) in &launch.scalars {
                let value = match (step.launches.bounds_refresh, value) {
                    (Some(refresh), Scalar::U32(_))
                        if refresh.launch == launch_index && name == "new_tokens" && rebuild =>
                    {
                        Scalar::U32(refresh.rebuild_new_tokens)
                    }
                    _ => *value,
                };
                args = args.set(
                    name,
                    match value {
                        Scalar::U32(v) => Arg::U32(v),
                        Scalar::F32(v) => Arg::F32(v),
                    },
                );
            }
            loaded.launch(&args).map_err(|e| ExecError::Launch {
                kernel: format!("{} ({})", kernel.name, loaded.kernel.entry),
                source: Box::new(e),
            })?;
            self.stats.gpu_launches += 1;
        }
        if let Some(bounds) = self.quest_bounds.get_mut(&index) {
            bounds.expect_version = next_version;
        }
        Ok(())
    }
}
