//! Running a plan kernel that lowers to several launches: attention and KV append.
//!
//! Owns the executor's side of `kiln_kernels::attention::program`: the program of a kernel
//! for the call's bindings (built once per bindings), the buffers it names (the node's
//! operands and result, workspaces shared by all such kernels and grown when needed,
//! identity page tables and constant length arrays made once per size, Quest page bounds
//! kept per kernel between calls) and the launches in order.
//!
//! **KV append is in place**: the result is the cache operand's own memory (the executor
//! checked at construction that no later kernel reads the operand). It is the same
//! `kv_append` kernel as the paged pool's (`crate::kv`), launched on the contiguous cache
//! viewed as token-major pages under an identity page table, like the attention kernels that
//! read it; the plan has no page allocator (every sequence owns `capacity` rows).
//!
//! **Quest page bounds** belong to the kernel that reads them. They are refreshed for the
//! pages of this call's new tokens only when the bounds are known to match the cache before
//! this call's append: the cache operand is device-resident state whose version is the one
//! this kernel expected after its previous call (so nothing but this plan wrote it since).
//! Otherwise (first call, a new prefill, host-held state) every page is rebuilt. This relies
//! on the model graphs' contract that a decode call appends its new tokens as the last
//! rows before `lengths`. It must not generate PTX or decide placement.

use super::{ExecError, Executor, Lowered};
use crate::cuda::{Arg, Args, BufferArg, DeviceBuffer};
use crate::exec::storage::DeviceSlot;
use kiln_ir::schedule::{BufferId, Family};
use kiln_ir::shape::Bindings;
use kiln_kernels::attention::program::{program, AttentionProgram, ProgramBuffer};
use kiln_kernels::lower::Scalar;
use std::collections::HashMap;
use std::sync::Arc;

/// Quest page bounds of one kernel.
pub(super) struct QuestBounds {
    max: DeviceBuffer<u8>,
    min: DeviceBuffer<u8>,
    /// The version of the cache state that means "only this kernel's plan appended since".
    expect_version: Option<u64>,
}

/// Whether `family` runs as a program of several launches.
pub(super) fn is_program(family: &Family) -> bool {
    matches!(family, Family::Attention { .. } | Family::KvAppend { .. })
}

impl Executor {
    /// The program of kernel `index` under `bindings` (built once per bindings).
    fn program_for(
        &mut self,
        index: usize,
        bindings: &Bindings,
    ) -> Result<Arc<AttentionProgram>, ExecError> {
        let key = (index, format!("{bindings:?}"));
        if let Some(p) = self.programs.get(&key) {
            return Ok(p.clone());
        }
        let kernel = &self.plan.kernels[index];
        let sm_count = self
            .device
            .as_ref()
            .map(|d| d.info().sm_count as usize)
            .unwrap_or(kiln_kernels::attention::decode::H100_SM_COUNT);
        let built =
            program(&kernel.family, bindings, sm_count).map_err(|message| ExecError::Kernel {
                kernel: kernel.name.clone(),
                message: message.to_string(),
            })?;
        let built = Arc::new(built);
        self.programs.insert(key, built.clone());
        Ok(built)
    }

    /// Loads the kernel of one launch (once per spec).
    fn program_kernel(
        &mut self,
        index: usize,
        launch: usize,
        program: &AttentionProgram,
    ) -> Result<Arc<Lowered>, ExecError> {
        let spec = &program.launches[launch].kernel;
        let key = (usize::MAX, spec.key());
        if let Some(l) = self.loaded.get(&key) {
            return Ok(l.clone());
        }
        let name = self.plan.kernels[index].name.clone();
        let generated =
            self.kernel_code(&name, &key.1, |lowering| Ok(lowering.program_kernel(spec)?))?;
        let device = self.device_or_error()?;
        let loaded = Arc::new(Lowered {
            spec: None,
            kernel: device.load(&generated)?,
        });
        self.stats.kernels_loaded += 1;
        self.loaded.insert(key, loaded.clone());
        Ok(loaded)
    }

    /// Makes sure the derived and scratch buffers of `program` exist at their sizes.
    fn prepare_program_buffers(
        &mut self,
        index: usize,
        program: &AttentionProgram,
    ) -> Result<(), ExecError> {
        let device = self.device_or_error()?.clone();
        for (name, buffer) in &program.buffers {
            match buffer {
                ProgramBuffer::Workspace { bytes } => {
                    let have = self.workspaces.get(*name).map(|b| b.len()).unwrap_or(0);
                    if *bytes > have {
                        self.workspaces
                            .insert(name, DeviceBuffer::zeros(&device, (*bytes).max(16))?);
                    }
                }
                ProgramBuffer::IdentityPageTable { batch, max_pages } => {
                    let key = format!("page_table {batch}x{max_pages}");
                    if let std::collections::hash_map::Entry::Vacant(slot) = self.derived.entry(key)
                    {
                        let table: Vec<i32> = (0..batch * max_pages).map(|i| i as i32).collect();
                        slot.insert(DeviceBuffer::from_host(&device, &table)?);
                    }
                }
                ProgramBuffer::Lengths { batch, value } => {
                    let key = format!("lengths {batch}x{value}");
                    if let std::collections::hash_map::Entry::Vacant(slot) = self.derived.entry(key)
                    {
                        slot.insert(DeviceBuffer::from_host(
                            &device,
                            &vec![*value as i32; *batch],
                        )?);
                    }
                }
                ProgramBuffer::QuestBounds { elements, .. } => {
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
                ProgramBuffer::Operand(_) | ProgramBuffer::Output => {}
            }
        }
        Ok(())
    }

    /// Runs GPU kernel `index` as its program of launches.
    pub(super) fn run_program(
        &mut self,
        index: usize,
        bindings: &Bindings,
        arena_slots: &HashMap<BufferId, (u64, u64)>,
        slots: &mut [Option<DeviceSlot>],
    ) -> Result<(), ExecError> {
        let program = self.program_for(index, bindings)?;
        self.prepare_program_buffers(index, &program)?;
        let kernel = self.plan.kernels[index].clone();
        let output = kernel.outputs[0];
        if let Some(&cache) = self.in_place.get(&output) {
            // KV append: the result is the cache operand's memory.
            let shared = match slots[cache].take() {
                Some(DeviceSlot::Owned(t)) => Arc::new(t),
                Some(DeviceSlot::Resident(t)) => t,
                Some(arena @ DeviceSlot::Arena { .. }) => {
                    slots[cache] = Some(arena);
                    return Err(ExecError::Internal(format!(
                        "{}: the KV cache operand lives in the arena; it must be a buffer of its own",
                        kernel.name
                    )));
                }
                None => {
                    return Err(ExecError::Internal(format!(
                        "{}: the KV cache `{}` is not on the GPU",
                        kernel.name, self.plan.buffers[cache].name
                    )))
                }
            };
            slots[cache] = Some(DeviceSlot::Resident(shared.clone()));
            slots[output] = Some(DeviceSlot::Resident(shared));
        } else {
            slots[output] = Some(self.fresh_slot(output, bindings, arena_slots)?);
        }

        // Quest: refresh only the new tokens' pages when the bounds match the cache.
        let mut rebuild = true;
        let mut next_version = None;
        if program.bounds_refresh.is_some() {
            let cache = kernel.inputs[1];
            if let (Some(store), Some(name)) = (&self.state_store, self.state_of.get(&cache)) {
                let now = store.version(name);
                let expected = self.quest_bounds.get(&index).and_then(|b| b.expect_version);
                rebuild = expected != Some(now);
                next_version = Some(now + 1);
            }
        }

        let device = self.device_or_error()?.clone();
        for launch_index in 0..program.launches.len() {
            let loaded = self.program_kernel(index, launch_index, &program)?;
            let launch = &program.launches[launch_index];
            let mut args = Args::new();
            for (param, buffer_name) in &launch.buffers {
                let buffer = program.buffers.get(buffer_name).ok_or_else(|| {
                    ExecError::Internal(format!(
                        "{}: program buffer `{buffer_name}` is not declared",
                        kernel.name
                    ))
                })?;
                let arg: BufferArg<'_> = match buffer {
                    ProgramBuffer::Operand(i) => {
                        let id = *kernel.inputs.get(*i).ok_or_else(|| {
                            ExecError::Internal(format!("{}: no operand {i}", kernel.name))
                        })?;
                        let slot = slots[id].as_ref().ok_or_else(|| {
                            ExecError::Internal(format!(
                                "{}: operand `{}` is not on the GPU",
                                kernel.name, self.plan.buffers[id].name
                            ))
                        })?;
                        slot.arg(self.arena.as_ref(), self.plan.buffers[id].dtype, &device)?
                    }
                    ProgramBuffer::Output => {
                        let slot = slots[output].as_ref().ok_or_else(|| {
                            ExecError::Internal(format!("{}: no output slot", kernel.name))
                        })?;
                        slot.arg(
                            self.arena.as_ref(),
                            self.plan.buffers[output].dtype,
                            &device,
                        )?
                    }
                    ProgramBuffer::Workspace { .. } => self
                        .workspaces
                        .get(buffer_name)
                        .ok_or_else(|| ExecError::Internal(format!("workspace `{buffer_name}`")))?
                        .arg(),
                    ProgramBuffer::IdentityPageTable { batch, max_pages } => self
                        .derived
                        .get(&format!("page_table {batch}x{max_pages}"))
                        .ok_or_else(|| ExecError::Internal("page table".into()))?
                        .arg(),
                    ProgramBuffer::Lengths { batch, value } => self
                        .derived
                        .get(&format!("lengths {batch}x{value}"))
                        .ok_or_else(|| ExecError::Internal("lengths".into()))?
                        .arg(),
                    ProgramBuffer::QuestBounds { min, .. } => {
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
                args = args.buffer(param, arg);
            }
            for (name, value) in &launch.scalars {
                let value = match (program.bounds_refresh, value) {
                    (Some((at, full)), Scalar::U32(_))
                        if at == launch_index && *name == "new_tokens" && rebuild =>
                    {
                        Scalar::U32(full)
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
            loaded.kernel.launch(&args).map_err(|e| ExecError::Launch {
                kernel: format!("{} ({})", kernel.name, loaded.kernel.kernel.entry),
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
