//! The Cranelift JIT: compiles CPU kernel specs for the host (native ISA from
//! cranelift-native, `opt_level = speed`) and caches the compiled functions by spec, counting
//! compilations. Owns compiled code and its lifetime; it must not generate IR (that is
//! `kiln_codegen::cpu`) or run kernels (the safe wrappers in [`map`](super::map),
//! [`dot`](super::dot), [`rms_norm`](super::rms_norm), [`rope`](super::rope) and
//! [`softmax`](super::softmax) do).

use super::dot::DotKernel;
use super::int4_dot::Int4DotKernel;
use super::map::MapKernel;
use super::rms_norm::RmsNormKernel;
use super::rope::RopeKernel;
use super::softmax::SoftmaxKernel;
use super::CpuError;
use cranelift_codegen::ir::UserFuncName;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};
use kiln_codegen::cpu::{
    build_function, CpuKernelSpec, CpuTarget, DotSpec, Int4DotSpec, MapSpec, RmsNormSpec, RopeSpec,
    SoftmaxSpec,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The entry point of a compiled kernel. Valid for as long as the [`CpuJit`] that compiled it
/// (or any kernel handle holding it) lives; the JIT never frees code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompiledFn(*const u8);

// SAFETY: finalized JIT code is immutable and callable from any thread.
unsafe impl Send for CompiledFn {}
unsafe impl Sync for CompiledFn {}

impl CompiledFn {
    pub fn as_ptr(self) -> *const u8 {
        self.0
    }
}

struct State {
    module: JITModule,
    cache: HashMap<String, CompiledFn>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    compilations: AtomicUsize,
    target: CpuTarget,
}

/// A JIT for CPU kernels with a cache of compiled functions keyed by spec.
///
/// Cloning is cheap and shares the cache. Kernel handles ([`MapKernel`], [`DotKernel`],
/// [`RmsNormKernel`], [`RopeKernel`]) keep the JIT's code alive. Compiling is serialised by a
/// lock; running is not.
#[derive(Clone)]
pub struct CpuJit {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CpuJit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuJit")
            .field("target", &self.shared.target)
            .field("compilations", &self.compilations())
            .finish()
    }
}

impl CpuJit {
    /// A JIT for the host CPU with an empty cache.
    pub fn new() -> Result<CpuJit, CpuError> {
        CpuJit::with_fma(true)
    }

    /// A JIT that uses fused multiply-add only if `fma` is set *and* the host has it (turning
    /// it off tests and measures the `fmul` + `fadd` path that FMA-less hosts get).
    pub fn with_fma(fma: bool) -> Result<CpuJit, CpuError> {
        let host = |e: &dyn std::fmt::Display| CpuError::Host(e.to_string());
        let mut flags = settings::builder();
        for (name, value) in [
            ("opt_level", "speed"),
            ("use_colocated_libcalls", "false"),
            ("is_pic", "false"),
        ] {
            flags.set(name, value).map_err(|e| host(&e))?;
        }
        let isa = cranelift_native::builder()
            .map_err(|e| host(&e))?
            .finish(settings::Flags::new(flags))
            .map_err(|e| host(&e))?;
        let mut target = CpuTarget::from_isa(&*isa);
        target.fma &= fma;
        let module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
        Ok(CpuJit {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    module,
                    cache: HashMap::new(),
                }),
                compilations: AtomicUsize::new(0),
                target,
            }),
        })
    }

    /// The process-wide JIT (created on first use).
    pub fn global() -> Result<&'static CpuJit, CpuError> {
        static GLOBAL: OnceLock<Result<CpuJit, CpuError>> = OnceLock::new();
        GLOBAL
            .get_or_init(CpuJit::new)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// What the host offers the generators (FMA, pointer width).
    pub fn target(&self) -> &CpuTarget {
        &self.shared.target
    }

    /// How many functions this JIT (and its clones) has compiled; a cache hit does not count.
    pub fn compilations(&self) -> usize {
        self.shared.compilations.load(Ordering::SeqCst)
    }

    /// The compiled function of `spec`, compiling it on first request.
    pub fn compile(&self, spec: &CpuKernelSpec) -> Result<CompiledFn, CpuError> {
        let key = spec.cache_key();
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&function) = state.cache.get(&key) {
            return Ok(function);
        }
        let function = build_function(spec, &self.shared.target)?;
        let failed = |e: &dyn std::fmt::Debug| CpuError::Compile {
            spec: key.clone(),
            message: format!("{e:?}"),
        };
        let name = format!("kiln_cpu_{}", state.cache.len());
        let module = &mut state.module;
        let id = module
            .declare_function(&name, Linkage::Local, &function.signature)
            .map_err(|e| failed(&e))?;
        let mut context = module.make_context();
        context.func = function;
        context.func.name = UserFuncName::user(0, id.as_u32());
        module
            .define_function(id, &mut context)
            .map_err(|e| failed(&e))?;
        module.clear_context(&mut context);
        module.finalize_definitions().map_err(|e| failed(&e))?;
        let compiled = CompiledFn(module.get_finalized_function(id));
        state.cache.insert(key, compiled);
        self.shared.compilations.fetch_add(1, Ordering::SeqCst);
        Ok(compiled)
    }

    /// The compiled elementwise map of `spec`.
    pub fn map(&self, spec: MapSpec) -> Result<MapKernel, CpuError> {
        let function = self.compile(&CpuKernelSpec::Map(spec.clone()))?;
        // SAFETY: `function` was compiled from a map spec, so it has the map ABI.
        Ok(unsafe { MapKernel::from_compiled(spec, function, self.shared.clone()) })
    }

    /// The compiled dot-product kernel of `spec`.
    pub fn dot(&self, spec: DotSpec) -> Result<DotKernel, CpuError> {
        let function = self.compile(&CpuKernelSpec::Dot(spec))?;
        // SAFETY: `function` was compiled from a dot spec, so it has the dot ABI.
        Ok(unsafe { DotKernel::from_compiled(spec, function, self.shared.clone()) })
    }

    /// The compiled 4-bit grouped dot kernel of `spec`.
    pub fn int4_dot(&self, spec: Int4DotSpec) -> Result<Int4DotKernel, CpuError> {
        let function = self.compile(&CpuKernelSpec::Int4Dot(spec))?;
        // SAFETY: `function` was compiled from an int4 dot spec, so it has its ABI.
        Ok(unsafe { Int4DotKernel::from_compiled(spec, function, self.shared.clone()) })
    }

    /// The compiled row RMSNorm of `spec` (plain, or with the residual add fused).
    pub fn rms_norm(&self, spec: RmsNormSpec) -> Result<RmsNormKernel, CpuError> {
        let function = self.compile(&CpuKernelSpec::RmsNorm(spec))?;
        // SAFETY: `function` was compiled from an rms_norm spec, so it has the rms_norm ABI.
        Ok(unsafe { RmsNormKernel::from_compiled(spec, function, self.shared.clone()) })
    }

    /// The compiled rotary position embedding of `spec`.
    pub fn rope(&self, spec: RopeSpec) -> Result<RopeKernel, CpuError> {
        let function = self.compile(&CpuKernelSpec::Rope(spec))?;
        // SAFETY: `function` was compiled from a rope spec, so it has the rope ABI.
        Ok(unsafe { RopeKernel::from_compiled(spec, function, self.shared.clone()) })
    }

    /// The compiled row softmax kernel of `spec`.
    pub fn softmax(&self, spec: SoftmaxSpec) -> Result<SoftmaxKernel, CpuError> {
        let function = self.compile(&CpuKernelSpec::Softmax(spec))?;
        // SAFETY: `function` was compiled from a softmax spec, so it has the softmax ABI.
        Ok(unsafe { SoftmaxKernel::from_compiled(spec, function, self.shared.clone()) })
    }
}
