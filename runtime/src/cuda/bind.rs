//! Binding launch arguments to a kernel's declared parameters, and the launch geometry.
//!
//! Owns [`Arg`], [`Args`], [`BufferArg`] and [`bind`]: matching arguments to parameters by
//! name, checking kinds, evaluating the kernel's `LaunchRule` over the `u32` scalars, and
//! checking the geometry against CUDA's limits ([`GeometryError`]). Everything here is pure Rust and needs no
//! GPU, so it is unit-tested on any machine; it must never call the driver.

use super::element::ElemType;
use super::error::CudaError;
use kiln_codegen::kernel::{Access, GpuKernel, ParamKind};
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

/// Identifies one open [`CudaDevice`](super::CudaDevice), so that a buffer from one device is
/// never bound to a launch on another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceId(pub u64);

/// A device buffer handed to a launch: its address, size and element type, borrowed from a
/// [`DeviceBuffer`](super::DeviceBuffer) for `'a`.
#[derive(Clone, Copy, Debug)]
pub struct BufferArg<'a> {
    ptr: u64,
    bytes: usize,
    elem: ElemType,
    device: DeviceId,
    _borrow: PhantomData<&'a ()>,
}

impl BufferArg<'_> {
    /// A buffer argument from raw parts.
    ///
    /// # Safety
    /// `ptr` must address `bytes` bytes of live device memory allocated on the device
    /// `device` for as long as any launch given this argument may run.
    pub unsafe fn from_raw_parts(ptr: u64, bytes: usize, elem: ElemType, device: DeviceId) -> Self {
        BufferArg {
            ptr,
            bytes,
            elem,
            device,
            _borrow: PhantomData,
        }
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The element type.
    pub fn elem(&self) -> ElemType {
        self.elem
    }

    /// The device the memory lives on.
    pub fn device(&self) -> DeviceId {
        self.device
    }
}

/// One launch argument.
#[derive(Clone, Copy, Debug)]
pub enum Arg<'a> {
    /// A device buffer, for a `Pointer` parameter.
    Buffer(BufferArg<'a>),
    /// A `u32` scalar; these are also the values the launch rule is evaluated over.
    U32(u32),
    /// An `f32` scalar.
    F32(f32),
}

impl fmt::Display for Arg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arg::Buffer(b) => write!(f, "a buffer ({}, {} bytes)", b.elem, b.bytes),
            Arg::U32(v) => write!(f, "a u32 scalar ({v})"),
            Arg::F32(v) => write!(f, "an f32 scalar ({v})"),
        }
    }
}

/// Launch arguments by parameter name.
///
/// ```ignore
/// let args = Args::new().buffer("x", &x).buffer("y", &y).u32("n", n).f32("scale", 0.5);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Args<'a> {
    by_name: BTreeMap<String, Arg<'a>>,
}

impl<'a> Args<'a> {
    /// No arguments.
    pub fn new() -> Self {
        Args::default()
    }

    /// Sets the argument for `name`, replacing any earlier one.
    pub fn set(mut self, name: &str, arg: Arg<'a>) -> Self {
        self.by_name.insert(name.to_string(), arg);
        self
    }

    /// Binds a device buffer to `name`.
    pub fn buffer(self, name: &str, buffer: impl Into<BufferArg<'a>>) -> Self {
        self.set(name, Arg::Buffer(buffer.into()))
    }

    /// Binds a `u32` scalar to `name`.
    pub fn u32(self, name: &str, value: u32) -> Self {
        self.set(name, Arg::U32(value))
    }

    /// Binds an `f32` scalar to `name`.
    pub fn f32(self, name: &str, value: f32) -> Self {
        self.set(name, Arg::F32(value))
    }

    /// The argument for `name`.
    pub fn get(&self, name: &str) -> Option<&Arg<'a>> {
        self.by_name.get(name)
    }

    /// Arguments in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arg<'a>)> {
        self.by_name.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// One argument value, ready to be pushed to the driver in declared order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ArgValue {
    /// A device pointer (`.u64`).
    Pointer(u64),
    /// A `.u32` scalar.
    U32(u32),
    /// A `.f32` scalar.
    F32(f32),
}

/// Grid and block sizes and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Blocks along x, y, z.
    pub grid: [u32; 3],
    /// Threads per block along x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
}

impl Geometry {
    /// Threads in one block.
    pub fn threads_per_block(&self) -> u64 {
        self.block.iter().map(|&b| b as u64).product()
    }
}

/// CUDA's limits on any launch (compute capability 7.0 and later).
pub const MAX_THREADS_PER_BLOCK: u64 = 1024;
const MAX_BLOCK: [u32; 3] = [1024, 1024, 64];
const MAX_GRID: [u32; 3] = [i32::MAX as u32, 65535, 65535];

/// Why a launch geometry cannot be launched: which axis or limit it breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("the grid is empty ({grid:?}): nothing would run")]
    EmptyGrid { grid: [u32; 3] },
    #[error("grid {axis} = {size} exceeds CUDA's limit of {limit}")]
    GridTooLarge {
        axis: &'static str,
        size: u32,
        limit: u32,
    },
    #[error("the block is empty ({block:?})")]
    EmptyBlock { block: [u32; 3] },
    #[error("block {axis} = {size} exceeds CUDA's limit of {limit}")]
    BlockTooLarge {
        axis: &'static str,
        size: u32,
        limit: u32,
    },
    #[error("a block of {block:?} has {threads} threads, more than CUDA's {limit}")]
    TooManyThreads {
        block: [u32; 3],
        threads: u64,
        limit: u64,
    },
    #[error("{bytes} bytes of dynamic shared memory exceed this device's {limit} per block")]
    SharedMemory { bytes: u32, limit: u32 },
}

/// A launch with its arguments bound: values in the kernel's declared parameter order, and
/// the geometry its launch rule gives for these scalars.
#[derive(Clone, Debug, PartialEq)]
pub struct BoundLaunch {
    /// One value per declared parameter, in declaration order.
    pub values: Vec<ArgValue>,
    /// The evaluated launch rule.
    pub geometry: Geometry,
}

/// Binds `args` to `kernel`'s declared parameters and evaluates its launch rule.
///
/// Checks, each failing with an error that names the kernel and the parameter: every
/// declared parameter has an argument of its kind (a buffer for a pointer, `U32` for a
/// `u32`, `F32` for an `f32`); no argument names an undeclared parameter; every buffer lives
/// on `device`; the launch rule evaluates over the `u32` arguments; the grid is not empty and
/// the block is within CUDA's limits (at most 1024 threads).
pub fn bind(
    kernel: &GpuKernel,
    args: &Args<'_>,
    device: DeviceId,
) -> Result<BoundLaunch, CudaError> {
    let name = &kernel.entry;
    let mut values = Vec::with_capacity(kernel.params.len());
    let mut scalars = BTreeMap::new();
    for param in &kernel.params {
        let Some(arg) = args.get(&param.name) else {
            return Err(CudaError::MissingArgument {
                kernel: name.clone(),
                param: param.name.clone(),
                kind: kind_name(param.kind).to_string(),
                declared: declared(kernel),
            });
        };
        let value = match (param.kind, arg) {
            (ParamKind::Pointer(_), Arg::Buffer(buffer)) => {
                if buffer.device != device {
                    return Err(CudaError::WrongDevice {
                        kernel: name.clone(),
                        param: param.name.clone(),
                    });
                }
                ArgValue::Pointer(buffer.ptr)
            }
            (ParamKind::U32, Arg::U32(v)) => {
                scalars.insert(param.name.clone(), *v as u64);
                ArgValue::U32(*v)
            }
            (ParamKind::F32, Arg::F32(v)) => ArgValue::F32(*v),
            (kind, given) => {
                return Err(CudaError::ArgumentKind {
                    kernel: name.clone(),
                    param: param.name.clone(),
                    expected: kind_name(kind).to_string(),
                    given: given.to_string(),
                })
            }
        };
        values.push(value);
    }
    if let Some((extra, _)) = args.iter().find(|(n, _)| kernel.param(n).is_none()) {
        return Err(CudaError::UnexpectedArgument {
            kernel: name.clone(),
            name: extra.to_string(),
            declared: declared(kernel),
        });
    }
    let (grid, block) =
        kernel
            .launch
            .evaluate(&scalars)
            .map_err(|message| CudaError::LaunchRule {
                kernel: name.clone(),
                message,
            })?;
    let geometry = Geometry {
        grid,
        block,
        shared_bytes: kernel.launch.shared_bytes,
    };
    check_geometry(&geometry).map_err(|reason| CudaError::LaunchGeometry {
        kernel: name.clone(),
        reason,
    })?;
    Ok(BoundLaunch { values, geometry })
}

/// Checks a geometry against CUDA's launch limits.
fn check_geometry(g: &Geometry) -> Result<(), GeometryError> {
    const AXES: [&str; 3] = ["x", "y", "z"];
    for axis in 0..3 {
        if g.grid[axis] == 0 {
            return Err(GeometryError::EmptyGrid { grid: g.grid });
        }
        if g.grid[axis] > MAX_GRID[axis] {
            return Err(GeometryError::GridTooLarge {
                axis: AXES[axis],
                size: g.grid[axis],
                limit: MAX_GRID[axis],
            });
        }
        if g.block[axis] == 0 {
            return Err(GeometryError::EmptyBlock { block: g.block });
        }
        if g.block[axis] > MAX_BLOCK[axis] {
            return Err(GeometryError::BlockTooLarge {
                axis: AXES[axis],
                size: g.block[axis],
                limit: MAX_BLOCK[axis],
            });
        }
    }
    if g.threads_per_block() > MAX_THREADS_PER_BLOCK {
        return Err(GeometryError::TooManyThreads {
            block: g.block,
            threads: g.threads_per_block(),
            limit: MAX_THREADS_PER_BLOCK,
        });
    }
    Ok(())
}

fn kind_name(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Pointer(Access::Read) => "a buffer (read)",
        ParamKind::Pointer(Access::Write) => "a buffer (written)",
        ParamKind::Pointer(Access::ReadWrite) => "a buffer (read and written)",
        ParamKind::U32 => "a u32 scalar",
        ParamKind::F32 => "an f32 scalar",
    }
}

/// The declared parameters as `name: kind, …`, for error messages.
fn declared(kernel: &GpuKernel) -> String {
    let parts: Vec<String> = kernel
        .params
        .iter()
        .map(|p| {
            let kind = match p.kind {
                ParamKind::Pointer(_) => "buffer",
                ParamKind::U32 => "u32",
                ParamKind::F32 => "f32",
            };
            format!("{}: {kind}", p.name)
        })
        .collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_codegen::kernel::{Extent, LaunchRule, Param};

    const DEV: DeviceId = DeviceId(7);

    fn kernel() -> GpuKernel {
        let param = |name: &str, kind| Param {
            name: name.to_string(),
            kind,
        };
        GpuKernel {
            entry: "scale_rows".to_string(),
            ptx: String::new(),
            params: vec![
                param("x", ParamKind::Pointer(Access::Read)),
                param("y", ParamKind::Pointer(Access::Write)),
                param("rows", ParamKind::U32),
                param("scale", ParamKind::F32),
            ],
            launch: LaunchRule::linear(Extent::ceil_div("rows", 4), 128),
            target: "sm_80".to_string(),
        }
    }

    fn buffer(ptr: u64, device: DeviceId) -> BufferArg<'static> {
        unsafe { BufferArg::from_raw_parts(ptr, 64, ElemType::F32, device) }
    }

    fn good() -> Args<'static> {
        Args::new()
            .f32("scale", 0.5)
            .u32("rows", 10)
            .buffer("y", buffer(0x2000, DEV))
            .buffer("x", buffer(0x1000, DEV))
    }

    #[test]
    fn binds_in_declared_order_and_evaluates_the_rule() {
        let bound = bind(&kernel(), &good(), DEV).unwrap();
        assert_eq!(
            bound.values,
            vec![
                ArgValue::Pointer(0x1000),
                ArgValue::Pointer(0x2000),
                ArgValue::U32(10),
                ArgValue::F32(0.5)
            ]
        );
        assert_eq!(bound.geometry.grid, [3, 1, 1]);
        assert_eq!(bound.geometry.block, [128, 1, 1]);
    }

    #[test]
    fn argument_errors_name_kernel_and_parameter() {
        let k = kernel();
        let err = bind(&k, &good().set("rows", Arg::F32(1.0)), DEV).unwrap_err();
        assert!(matches!(err, CudaError::ArgumentKind { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("scale_rows") && msg.contains("`rows`"),
            "{msg}"
        );

        let mut missing = good();
        missing.by_name.remove("y");
        let msg = bind(&k, &missing, DEV).unwrap_err().to_string();
        assert!(msg.contains("`y`") && msg.contains("no argument"), "{msg}");

        let msg = bind(&k, &good().u32("cols", 3), DEV)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no parameter `cols`"), "{msg}");

        let other = good().buffer("x", buffer(0x1000, DeviceId(8)));
        let msg = bind(&k, &other, DEV).unwrap_err().to_string();
        assert!(
            msg.contains("`x`") && msg.contains("another CudaDevice"),
            "{msg}"
        );
    }

    #[test]
    fn geometry_limits() {
        let mut k = kernel();
        let err = bind(&k, &good().u32("rows", 0), DEV).unwrap_err();
        assert!(err.to_string().contains("grid is empty"), "{err}");

        k.launch.block = [32, 33, 1];
        let err = bind(&k, &good(), DEV).unwrap_err();
        assert!(err.to_string().contains("1056 threads"), "{err}");

        k.launch.block = [1, 1, 65];
        assert!(bind(&k, &good(), DEV).is_err());

        k.launch.block = [256, 4, 1];
        assert!(bind(&k, &good(), DEV).is_ok());
    }
}
