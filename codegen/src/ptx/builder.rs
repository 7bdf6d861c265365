//! The kernel builder: one `.entry` under construction.
//!
//! Owns [`KernelBuilder`]'s state and its structural API: parameters, special registers,
//! shared-memory declarations, fresh registers, comments, labels, branches, structured
//! loops and if-blocks, predicate guards and [`KernelBuilder::finish`]. Instruction
//! families live in their own files (`arithmetic.rs`, `memory.rs`, `warp.rs`,
//! `tensor_core.rs`) as further `impl KernelBuilder` blocks; the text layout is
//! `printer.rs`'s. Nothing here knows what a kernel computes.

use std::collections::BTreeSet;

use super::printer;
use super::types::{Guard, Mem, Operand, Pred, Reg, RegClass, RegType, F32, U32, U64};
use super::Target;
use crate::kernel::{Access, GpuKernel, LaunchRule, Param, ParamKind};

/// Builds one PTX kernel (`.entry`) with typed registers, then prints it deterministically.
///
/// Registers are typed ([`Reg<F32>`](super::Reg), [`Reg<U32>`](super::Reg), …) and every
/// instruction method states the types it accepts, so a mistyped instruction does not
/// compile. Each method emits one instruction (or a short, commented sequence) and returns
/// fresh result registers; [`assign`](KernelBuilder::assign) overwrites an existing register
/// where a loop carries a value.
///
/// ```
/// use kiln_codegen::kernel::{Access, Extent, LaunchRule};
/// use kiln_codegen::ptx::{Cmp, KernelBuilder, Target, F32};
///
/// // y[i] = 2 * x[i] + 1 for i < n
/// let mut k = KernelBuilder::new("scale_shift", Target::Sm80);
/// let x = k.param_pointer("x", Access::Read);
/// let y = k.param_pointer("y", Access::Write);
/// let n = k.param_u32("n");
/// k.comment("one element per thread");
/// let i = k.global_index_x();
/// let in_range = k.setp(Cmp::Lt, i, n);
/// k.if_then(in_range, |k| {
///     let offset = k.mul_wide(i, 4u32);
///     let xi = k.add(x, offset);
///     let value = k.ld_global::<F32>(xi);
///     let result = k.mul_add(value, 2.0, 1.0);
///     let yi = k.add(y, offset);
///     k.st_global(yi, result);
/// });
/// let kernel = k.finish(LaunchRule::linear(Extent::ceil_div("n", 256), 256));
/// assert!(kernel.ptx.contains("fma.rn.f32"));
/// assert_eq!(kernel.params.len(), 3);
/// ```
///
/// Types are checked by the Rust compiler: adding an `f32` register to a `u32` register is
/// a compile error, not a ptxas error.
///
/// ```compile_fail
/// use kiln_codegen::ptx::{KernelBuilder, Target};
/// let mut k = KernelBuilder::new("mistyped", Target::Sm80);
/// let n = k.param_u32("n");
/// let eps = k.param_f32("eps");
/// let wrong = k.add(n, eps); // u32 + f32: does not compile
/// ```
///
/// # Panics
///
/// Builder misuse that types cannot express panics with a message naming the instruction:
/// an invalid or duplicate name, a label placed twice, a branch or structured block inside
/// [`guard`](KernelBuilder::guard), an instruction the target does not support.
pub struct KernelBuilder {
    pub(crate) entry: String,
    pub(crate) target: Target,
    pub(crate) ptx_version: (u32, u32),
    pub(crate) params: Vec<Param>,
    pub(crate) shared: Vec<SharedDecl>,
    pub(crate) register_counts: [u32; RegClass::ALL.len()],
    pub(crate) lines: Vec<Line>,
    pub(crate) min_blocks_per_sm: Option<u32>,
    names: BTreeSet<String>,
    depth: usize,
    guard: Option<Guard>,
    label_count: u32,
    placed_labels: BTreeSet<String>,
    used_labels: BTreeSet<String>,
}

/// One line of the kernel body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Line {
    Instruction { depth: usize, text: String },
    Label(String),
    Comment { depth: usize, text: String },
    Blank,
}

/// A `.shared` declaration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SharedDecl {
    pub name: String,
    pub align: u32,
    /// `None` for the dynamic `.extern .shared` array sized at launch.
    pub bytes: Option<u32>,
}

/// A shared-memory array declared with [`KernelBuilder::shared_array`] or
/// [`KernelBuilder::dynamic_shared`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SharedArray {
    name: String,
    bytes: Option<u32>,
}

impl SharedArray {
    /// The PTX name of the array.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The array's size in bytes; `None` for the dynamic array sized at launch.
    pub fn bytes(&self) -> Option<u32> {
        self.bytes
    }

    /// The address `[name + bytes]`.
    pub fn at(&self, bytes: i64) -> Mem {
        Mem::new(self.name.clone(), bytes)
    }
}

impl From<&SharedArray> for Mem {
    fn from(array: &SharedArray) -> Mem {
        array.at(0)
    }
}

/// A branch target with a deterministic, unique name (`$L_retry_3`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Label {
    name: String,
}

impl Label {
    /// The label's PTX name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A launch axis of the special registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Axis {
    X,
    Y,
    Z,
}

impl Axis {
    fn suffix(self) -> &'static str {
        match self {
            Axis::X => "x",
            Axis::Y => "y",
            Axis::Z => "z",
        }
    }
}

/// A special register, read with [`KernelBuilder::special`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Special {
    /// `%tid`: the thread's index in its block.
    Tid(Axis),
    /// `%ntid`: the block size.
    Ntid(Axis),
    /// `%ctaid`: the block's index in the grid.
    Ctaid(Axis),
    /// `%nctaid`: the grid size.
    Nctaid(Axis),
    /// `%laneid`: the thread's lane in its warp (0..32).
    LaneId,
    /// `%warpid`: the *physical* warp slot, which may change during execution; use
    /// `tid / 32` for the warp's index in the block.
    WarpId,
}

impl Special {
    fn ptx(self) -> String {
        match self {
            Special::Tid(a) => format!("%tid.{}", a.suffix()),
            Special::Ntid(a) => format!("%ntid.{}", a.suffix()),
            Special::Ctaid(a) => format!("%ctaid.{}", a.suffix()),
            Special::Nctaid(a) => format!("%nctaid.{}", a.suffix()),
            Special::LaneId => "%laneid".to_string(),
            Special::WarpId => "%warpid".to_string(),
        }
    }
}

/// Whether `name` is an identifier the builder accepts for entries, parameters, shared
/// arrays and label hints: an ASCII letter or `_`, then letters, digits or `_`.
pub(crate) fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl KernelBuilder {
    /// A new kernel named `entry` for `target`, at PTX ISA version 8.0.
    ///
    /// # Panics
    ///
    /// If `entry` is not an identifier (`[A-Za-z_][A-Za-z0-9_]*`).
    pub fn new(entry: &str, target: Target) -> KernelBuilder {
        assert!(
            is_identifier(entry),
            "kernel entry name `{entry}` is not a PTX identifier ([A-Za-z_][A-Za-z0-9_]*)"
        );
        KernelBuilder {
            entry: entry.to_string(),
            target,
            ptx_version: (8, 0),
            params: Vec::new(),
            shared: Vec::new(),
            register_counts: [0; RegClass::ALL.len()],
            lines: Vec::new(),
            min_blocks_per_sm: None,
            names: BTreeSet::from([entry.to_string()]),
            depth: 0,
            guard: None,
            label_count: 0,
            placed_labels: BTreeSet::new(),
            used_labels: BTreeSet::new(),
        }
    }

    /// The entry name.
    pub fn entry(&self) -> &str {
        &self.entry
    }

    /// The target the kernel is written for.
    pub fn target(&self) -> Target {
        self.target
    }

    /// Raises the `.version` directive to at least `major.minor` (for instructions newer
    /// than PTX ISA 8.0). Never lowers it.
    pub fn require_ptx_version(&mut self, major: u32, minor: u32) {
        self.ptx_version = self.ptx_version.max((major, minor));
    }

    /// Asks ptxas, through `.minnctapersm`, to fit at least `blocks` blocks per SM (it
    /// limits registers accordingly).
    pub fn min_blocks_per_sm(&mut self, blocks: u32) {
        self.min_blocks_per_sm = Some(blocks);
    }

    /// Panics unless the target is at least `sm_<minimum>`; `instruction` names the caller.
    pub(crate) fn require_sm(&self, minimum: u32, instruction: &str) {
        assert!(
            self.target.sm() >= minimum,
            "`{instruction}` needs sm_{minimum} or newer; the kernel `{}` targets {}",
            self.entry,
            self.target.as_str()
        );
    }

    fn claim_name(&mut self, name: &str, what: &str) {
        assert!(
            is_identifier(name),
            "{what} name `{name}` is not a PTX identifier ([A-Za-z_][A-Za-z0-9_]*)"
        );
        assert!(
            self.names.insert(name.to_string()),
            "{what} name `{name}` is already used in kernel `{}`",
            self.entry
        );
    }

    // ----- registers and emission ---------------------------------------------------------

    /// A fresh, uninitialised register of type `T`. Most instructions create their result
    /// register themselves; this is for values assigned later with
    /// [`assign`](KernelBuilder::assign) or written by [`raw_instruction`](KernelBuilder::raw_instruction).
    pub fn reg<T: RegType>(&mut self) -> Reg<T> {
        let count = &mut self.register_counts[T::CLASS.index()];
        let reg = Reg::new(*count);
        *count += 1;
        reg
    }

    /// `n` fresh registers.
    pub(crate) fn regs<T: RegType, const N: usize>(&mut self) -> [Reg<T>; N] {
        std::array::from_fn(|_| self.reg::<T>())
    }

    /// Emits one instruction; `text` has no trailing `;`. The active guard, if any, is
    /// prefixed.
    pub(crate) fn emit(&mut self, text: String) {
        let text = match self.guard {
            Some(guard) => format!("{guard} {text};"),
            None => format!("{text};"),
        };
        self.lines.push(Line::Instruction {
            depth: self.depth,
            text,
        });
    }

    /// Emits an instruction written by hand, such as a fence the builder has no method for
    /// yet. `text` is one instruction without the trailing `;`; registers print with `{}`
    /// (`format!("membar.gl")`). Prefer a typed method: this one checks nothing.
    pub fn raw_instruction(&mut self, text: impl Into<String>) {
        self.emit(text.into());
    }

    /// Emits a `// text` line (one per line of `text`) naming the stage that follows.
    pub fn comment(&mut self, text: &str) {
        assert!(
            text.is_ascii(),
            "PTX comments must be ASCII (ptxas rejects other characters): {text:?}"
        );
        if matches!(
            self.lines.last(),
            Some(Line::Instruction { .. } | Line::Label(_))
        ) {
            self.lines.push(Line::Blank);
        }
        for line in text.lines() {
            self.lines.push(Line::Comment {
                depth: self.depth,
                text: line.to_string(),
            });
        }
    }

    // ----- parameters ---------------------------------------------------------------------

    /// Declares a device-pointer parameter (`.param .u64 name`) and returns its global
    /// address (`ld.param.u64` then `cvta.to.global.u64`).
    ///
    /// Parameters are printed pointers first, then scalars, each group in declaration
    /// order; [`GpuKernel::params`](crate::kernel::GpuKernel) lists them in that same
    /// order so the runtime binds them by name.
    pub fn param_pointer(&mut self, name: &str, access: Access) -> Reg<U64> {
        self.claim_name(name, "parameter");
        self.params.push(Param {
            name: name.to_string(),
            kind: ParamKind::Pointer(access),
        });
        let generic = self.reg::<U64>();
        self.emit(format!("ld.param.u64 {generic}, [{name}]"));
        let global = self.reg::<U64>();
        self.emit(format!("cvta.to.global.u64 {global}, {generic}"));
        global
    }

    /// Declares a `.u32` scalar parameter (a dynamic dimension) and loads it.
    pub fn param_u32(&mut self, name: &str) -> Reg<U32> {
        self.claim_name(name, "parameter");
        self.params.push(Param {
            name: name.to_string(),
            kind: ParamKind::U32,
        });
        let value = self.reg::<U32>();
        self.emit(format!("ld.param.u32 {value}, [{name}]"));
        value
    }

    /// Declares a `.f32` scalar parameter (a scale, an epsilon) and loads it.
    pub fn param_f32(&mut self, name: &str) -> Reg<F32> {
        self.claim_name(name, "parameter");
        self.params.push(Param {
            name: name.to_string(),
            kind: ParamKind::F32,
        });
        let value = self.reg::<F32>();
        self.emit(format!("ld.param.f32 {value}, [{name}]"));
        value
    }

    /// The parameters in their final (printed) order: pointers first, then scalars.
    pub fn params(&self) -> Vec<Param> {
        let (pointers, scalars): (Vec<&Param>, Vec<&Param>) = self
            .params
            .iter()
            .partition(|p| matches!(p.kind, ParamKind::Pointer(_)));
        pointers.into_iter().chain(scalars).cloned().collect()
    }

    // ----- special registers --------------------------------------------------------------

    /// Reads a special register (`mov.u32 %r, %tid.x`).
    pub fn special(&mut self, special: Special) -> Reg<U32> {
        let value = self.reg::<U32>();
        self.emit(format!("mov.u32 {value}, {}", special.ptx()));
        value
    }

    /// `%tid.x`.
    pub fn tid_x(&mut self) -> Reg<U32> {
        self.special(Special::Tid(Axis::X))
    }

    /// `%ntid.x`.
    pub fn ntid_x(&mut self) -> Reg<U32> {
        self.special(Special::Ntid(Axis::X))
    }

    /// `%ctaid.x`.
    pub fn ctaid_x(&mut self) -> Reg<U32> {
        self.special(Special::Ctaid(Axis::X))
    }

    /// `%laneid`.
    pub fn lane_id(&mut self) -> Reg<U32> {
        self.special(Special::LaneId)
    }

    /// `%ctaid.x * %ntid.x + %tid.x`: the thread's index in a one-dimensional grid.
    pub fn global_index_x(&mut self) -> Reg<U32> {
        let block = self.ctaid_x();
        let size = self.ntid_x();
        let thread = self.tid_x();
        self.mul_add(block, size, thread)
    }

    // ----- shared memory ------------------------------------------------------------------

    /// Declares a static shared array `.shared .align <align> .b8 name[bytes]`.
    ///
    /// # Panics
    ///
    /// If `align` is not a power of two, `bytes` is zero, or the name is taken.
    pub fn shared_array(&mut self, name: &str, bytes: u32, align: u32) -> SharedArray {
        assert!(
            align.is_power_of_two(),
            "shared array `{name}`: alignment {align} is not a power of two"
        );
        assert!(bytes > 0, "shared array `{name}` has zero bytes");
        self.claim_name(name, "shared array");
        self.shared.push(SharedDecl {
            name: name.to_string(),
            align,
            bytes: Some(bytes),
        });
        SharedArray {
            name: name.to_string(),
            bytes: Some(bytes),
        }
    }

    /// Declares the dynamic shared array `.extern .shared .align <align> .b8 name[]`, sized
    /// at launch by [`LaunchRule::shared_bytes`].
    ///
    /// # Panics
    ///
    /// If `align` is not a power of two, the name is taken, or a dynamic array was already
    /// declared.
    pub fn dynamic_shared(&mut self, name: &str, align: u32) -> SharedArray {
        assert!(
            align.is_power_of_two(),
            "dynamic shared array `{name}`: alignment {align} is not a power of two"
        );
        assert!(
            self.shared.iter().all(|s| s.bytes.is_some()),
            "kernel `{}` declares a second dynamic shared array `{name}`",
            self.entry
        );
        self.claim_name(name, "shared array");
        self.shared.push(SharedDecl {
            name: name.to_string(),
            align,
            bytes: None,
        });
        SharedArray {
            name: name.to_string(),
            bytes: None,
        }
    }

    /// The 32-bit shared-window address of `array` (`mov.u32 %r, name`), for address
    /// arithmetic; `array.at(offset)` is enough for a constant offset.
    pub fn shared_address(&mut self, array: &SharedArray) -> Reg<U32> {
        let address = self.reg::<U32>();
        self.emit(format!("mov.u32 {address}, {}", array.name));
        address
    }

    // ----- guards, labels and branches ----------------------------------------------------

    /// Emits every instruction of `body` under `guard` (`@%p` or, for `!p`, `@!%p`).
    ///
    /// Registers first written inside keep their old (possibly undefined) value where the
    /// guard is false. For longer or nested conditional code use
    /// [`if_then`](KernelBuilder::if_then).
    ///
    /// # Panics
    ///
    /// If guards are nested, or `body` places a label or opens a structured block.
    pub fn guard<R>(
        &mut self,
        guard: impl Into<Guard>,
        body: impl FnOnce(&mut KernelBuilder) -> R,
    ) -> R {
        assert!(
            self.guard.is_none(),
            "guard: guarded regions cannot be nested (kernel `{}`)",
            self.entry
        );
        self.guard = Some(guard.into());
        let result = body(self);
        self.guard = None;
        result
    }

    fn assert_unguarded(&self, what: &str) {
        assert!(
            self.guard.is_none(),
            "{what} inside a guarded region; use if_then for structured conditional code \
             (kernel `{}`)",
            self.entry
        );
    }

    /// A new label named `$L_<hint>_<n>`, `n` counting every label of the kernel. Place it
    /// with [`place_label`](KernelBuilder::place_label).
    pub fn new_label(&mut self, hint: &str) -> Label {
        assert!(
            is_identifier(hint),
            "label hint `{hint}` is not an identifier ([A-Za-z_][A-Za-z0-9_]*)"
        );
        let label = Label {
            name: format!("$L_{hint}_{}", self.label_count),
        };
        self.label_count += 1;
        label
    }

    /// Places `label` here.
    ///
    /// # Panics
    ///
    /// If the label was already placed, or inside a guarded region.
    pub fn place_label(&mut self, label: &Label) {
        self.assert_unguarded("place_label");
        assert!(
            self.placed_labels.insert(label.name.clone()),
            "label `{}` placed twice in kernel `{}`",
            label.name,
            self.entry
        );
        self.lines.push(Line::Label(label.name.clone()));
    }

    /// `bra label` (unconditional).
    pub fn branch(&mut self, label: &Label) {
        self.used_labels.insert(label.name.clone());
        self.emit(format!("bra {}", label.name));
    }

    /// `@p bra label`: branches where `condition` holds.
    pub fn branch_if(&mut self, condition: impl Into<Guard>, label: &Label) {
        self.assert_unguarded("branch_if");
        let guard = condition.into();
        self.used_labels.insert(label.name.clone());
        self.emit(format!("{guard} bra {}", label.name));
    }

    /// `ret`: ends the thread (under a guard, only the threads where it holds).
    pub fn ret(&mut self) {
        self.emit("ret".to_string());
    }

    /// Runs `body` only where `condition` holds: `@!p bra end; body; end:`.
    pub fn if_then(&mut self, condition: impl Into<Guard>, body: impl FnOnce(&mut KernelBuilder)) {
        self.assert_unguarded("if_then");
        let condition = condition.into();
        let end = self.new_label("endif");
        self.branch_if(!condition, &end);
        self.depth += 1;
        body(self);
        self.depth -= 1;
        self.place_label(&end);
    }

    /// Runs `then` where `condition` holds and `otherwise` elsewhere.
    pub fn if_else(
        &mut self,
        condition: impl Into<Guard>,
        then: impl FnOnce(&mut KernelBuilder),
        otherwise: impl FnOnce(&mut KernelBuilder),
    ) {
        self.assert_unguarded("if_else");
        let condition = condition.into();
        let else_label = self.new_label("else");
        let end = self.new_label("endif");
        self.branch_if(!condition, &else_label);
        self.depth += 1;
        then(self);
        self.branch(&end);
        self.depth -= 1;
        self.place_label(&else_label);
        self.depth += 1;
        otherwise(self);
        self.depth -= 1;
        self.place_label(&end);
    }

    /// A run-time loop `for i in (start..end).step_by(step)` over `u32` (unsigned
    /// comparison), testing `i < end` before each iteration:
    ///
    /// ```text
    ///     mov.u32 i, start;
    /// $L_for_N:
    ///     setp.ge.u32 p, i, end;
    ///     @p bra $L_for_N_end;
    ///         body
    ///     add.u32 i, i, step;
    ///     bra $L_for_N;
    /// $L_for_N_end:
    /// ```
    ///
    /// `body` must not write `i`. A loop unrolled at generation time is a plain Rust loop.
    pub fn for_range(
        &mut self,
        start: impl Into<Operand<U32>>,
        end: impl Into<Operand<U32>>,
        step: impl Into<Operand<U32>>,
        body: impl FnOnce(&mut KernelBuilder, Reg<U32>),
    ) {
        self.for_range_with(start, end, step, false, body);
    }

    /// [`for_range`](KernelBuilder::for_range) with `.pragma "nounroll";` in the loop
    /// header, so ptxas keeps the loop rolled: a loop with a small constant trip count is
    /// otherwise unrolled completely, and the hoisted loads of a register-heavy body can
    /// then spill.
    pub fn for_range_no_unroll(
        &mut self,
        start: impl Into<Operand<U32>>,
        end: impl Into<Operand<U32>>,
        step: impl Into<Operand<U32>>,
        body: impl FnOnce(&mut KernelBuilder, Reg<U32>),
    ) {
        self.for_range_with(start, end, step, true, body);
    }

    fn for_range_with(
        &mut self,
        start: impl Into<Operand<U32>>,
        end: impl Into<Operand<U32>>,
        step: impl Into<Operand<U32>>,
        no_unroll: bool,
        body: impl FnOnce(&mut KernelBuilder, Reg<U32>),
    ) {
        self.assert_unguarded("for_range");
        let (start, end, step) = (start.into(), end.into(), step.into());
        let index = self.label_count;
        self.label_count += 1;
        let head = Label {
            name: format!("$L_for_{index}"),
        };
        let exit = Label {
            name: format!("$L_for_{index}_end"),
        };
        let i = self.reg::<U32>();
        self.emit(format!("mov.u32 {i}, {start}"));
        self.place_label(&head);
        if no_unroll {
            self.raw_instruction(".pragma \"nounroll\"");
        }
        let done = self.reg::<Pred>();
        self.emit(format!("setp.ge.u32 {done}, {i}, {end}"));
        self.branch_if(done, &exit);
        self.depth += 1;
        body(self, i);
        self.depth -= 1;
        self.emit(format!("add.u32 {i}, {i}, {step}"));
        self.branch(&head);
        self.place_label(&exit);
    }

    /// Finishes the kernel: appends `ret`, prints the module and pairs it with its
    /// parameters and launch rule. The block size of `launch` is also written as
    /// `.maxntid`, so ptxas budgets registers for it.
    ///
    /// # Panics
    ///
    /// If a branch targets a label that was never placed, or a guard is still open.
    pub fn finish(mut self, launch: LaunchRule) -> GpuKernel {
        self.assert_unguarded("finish");
        if let Some(missing) = self.used_labels.difference(&self.placed_labels).next() {
            panic!(
                "kernel `{}` branches to label `{missing}`, which is never placed",
                self.entry
            );
        }
        self.depth = 0;
        self.emit("ret".to_string());
        let ptx = printer::print_kernel(&self, &launch);
        GpuKernel {
            entry: self.entry.clone(),
            ptx,
            params: self.params(),
            launch,
            target: self.target.as_str().to_string(),
        }
    }
}
