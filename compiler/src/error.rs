//! The compiler's errors: one enum per concern, each naming the file, field, flag or kernel
//! involved. The CLI prints them as one line (with their sources).

use kiln_ir::passes::atom::AtomPassError;
use kiln_ir::passes::quest::QuestPassError;
use kiln_ir::rewrite::RewriteError;
use kiln_ir::schedule::ScheduleError;
use kiln_ir::shape::ShapeError;
use kiln_ir::verify::VerifyError;
use kiln_kernels::lower::LowerError;
use std::path::PathBuf;

/// Why a target could not be chosen or does not match a device.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("unknown target `{name}` (targets: sm_90, sm_80, cpu)")]
    Unknown { name: String },
    #[error(
        "device {device} has compute capability {major}.{minor}; kiln generates kernels for \
         sm_80 and newer"
    )]
    UnsupportedDevice {
        device: String,
        major: u32,
        minor: u32,
    },
    #[error(
        "the artifact was compiled for {target} (compute capability {expected_capability}, \
         {expected_sms} SMs) but this device has compute capability {found_capability} and \
         {found_sms} SMs; recompile it on this machine or with the matching --target"
    )]
    DeviceMismatch {
        target: String,
        expected_capability: String,
        expected_sms: u32,
        found_capability: String,
        found_sms: u32,
    },
}

/// Why a model could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("building the {phase} graph: {source}")]
    Build {
        phase: &'static str,
        #[source]
        source: VerifyError,
    },
    #[error("rewriting the {phase} graph: {source}")]
    Rewrite {
        phase: &'static str,
        #[source]
        source: RewriteError,
    },
    #[error("the atom pass on the {phase} graph: {source}")]
    Atom {
        phase: &'static str,
        #[source]
        source: AtomPassError,
    },
    #[error("the quest pass on the {phase} graph: {source}")]
    Quest {
        phase: &'static str,
        #[source]
        source: QuestPassError,
    },
    #[error("scheduling the {phase} graph: {source}")]
    Schedule {
        phase: &'static str,
        #[source]
        source: ScheduleError,
    },
    #[error("kernel {kernel}: {message}")]
    Kernel { kernel: String, message: String },
    /// A step placed on the host (by placement, or because its GPU kernel did not lower)
    /// whose op has no CPU kernel.
    #[error(
        "kernel {kernel}: `{op}` runs on the CPU here{}, but kiln has no CPU kernel for it",
        gpu_rejected.as_ref().map(|r| format!(" (its GPU kernel was rejected: {r})")).unwrap_or_default()
    )]
    NoCpuKernel {
        kernel: String,
        op: String,
        gpu_rejected: Option<String>,
    },
    /// A GPU kernel that does not lower at one of the row counts every plan must cover.
    #[error("kernel {kernel}: at seq = {rows}: {source}")]
    Lower {
        kernel: String,
        rows: usize,
        #[source]
        source: LowerError,
    },
    /// A weight buffer whose shape has a symbolic dimension.
    #[error("kernel {name}: a weight's shape must be concrete: {source}")]
    WeightShape {
        name: String,
        #[source]
        source: ShapeError,
    },
    #[error(transparent)]
    Target(#[from] TargetError),
}

/// Why an artifact could not be written or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a kiln plan: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{}: field `schema_version` is {found}, this kiln reads version {expected}; recompile \
         the model with this kiln",
        path.display()
    )]
    SchemaVersion {
        path: PathBuf,
        found: String,
        expected: u32,
    },
    #[error(
        "{}: field `kiln_version` is {found}, this is kiln {expected}; recompile the model with \
         this kiln",
        path.display()
    )]
    KilnVersion {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "{}: its sha256 is {found}, plan.json lists {expected} for kernel `{entry}`: the file \
         was edited or truncated",
        path.display()
    )]
    KernelDigest {
        path: PathBuf,
        entry: String,
        expected: String,
        found: String,
    },
    #[error("{}: field `{field}`: {message}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error(transparent)]
    Target(#[from] TargetError),
}
