//! A driver for NVIDIA's `ptxas`, used to validate generated PTX in tests and tools.
//!
//! Owns locating the assembler, running `ptxas -v -arch=<arch>` on a temporary copy of the
//! text, and parsing its resource report (registers, spills, shared memory, stack). It
//! never loads code onto a device (that is `kiln-runtime`), and it is not on any
//! inference path: the runtime JIT-compiles PTX through the driver.
//!
//! ptxas is found at, in order:
//! 1. the path in the environment variable `KILN_PTXAS` (an error if it does not exist);
//! 2. `<workspace root>/.tools/python/nvidia/cuda_nvcc/bin/ptxas`, where `bash
//!    scripts/test.sh` installs it from the `nvidia-cuda-nvcc-cu12` wheel;
//! 3. `ptxas` on `PATH`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable naming the ptxas binary.
pub const PTXAS_ENV: &str = "KILN_PTXAS";

/// How to get ptxas, quoted by every "not found" error.
pub const INSTALL_HINT: &str = "run `bash scripts/test.sh` once (it installs ptxas from the \
     nvidia-cuda-nvcc-cu12 wheel into .tools/), or set KILN_PTXAS to a ptxas binary";

/// What ptxas reports about one assembled kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxasReport {
    /// The kernel entry the figures are for.
    pub entry: String,
    /// The architecture assembled for, such as `sm_80`.
    pub arch: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes stored to local memory by register spills, per thread.
    pub spill_store_bytes: u32,
    /// Bytes loaded back from spills, per thread.
    pub spill_load_bytes: u32,
    /// Static shared memory per block, in bytes (dynamic shared memory is not included).
    pub shared_bytes: u32,
    /// Stack frame per thread, in bytes.
    pub stack_frame_bytes: u32,
    /// Named barriers used.
    pub barriers: u32,
    /// `ptxas warning` lines.
    pub warnings: Vec<String>,
    /// The whole `-v` log.
    pub log: String,
    /// The assembled binary.
    pub cubin: Vec<u8>,
}

impl PtxasReport {
    /// Whether the kernel spills registers to local memory.
    pub fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// A failure to find or run ptxas, or a kernel it rejected.
#[derive(Debug, thiserror::Error)]
pub enum PtxasError {
    /// No ptxas binary was found.
    #[error("ptxas not found (looked at: {looked_at}); {hint}", looked_at = looked_at.join(", "), hint = INSTALL_HINT)]
    NotFound { looked_at: Vec<String> },
    /// `KILN_PTXAS` names a file that does not exist.
    #[error("{PTXAS_ENV}={path} does not exist; {INSTALL_HINT}")]
    BadEnvironmentPath { path: String },
    /// The architecture is not of the form `sm_NN` or `sm_NNa`.
    #[error("`{arch}` is not a ptxas architecture (expected sm_80, sm_90, sm_90a, …)")]
    BadArch { arch: String },
    /// Writing the temporary files or starting ptxas failed.
    #[error("running ptxas on kernel `{entry}`: {message}")]
    Io { entry: String, message: String },
    /// ptxas rejected the kernel; `stderr` is its diagnostic.
    #[error("ptxas rejected kernel `{entry}` for {arch} ({status}):\n{stderr}")]
    Rejected {
        entry: String,
        arch: String,
        status: String,
        stderr: String,
    },
    /// ptxas succeeded but its report has no resource figures for the entry.
    #[error("ptxas printed no resource report for kernel `{entry}` on {arch}:\n{log}")]
    NoReport {
        entry: String,
        arch: String,
        log: String,
    },
}

/// The workspace root: the parent of this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Finds ptxas from explicit inputs: the value of `KILN_PTXAS`, the workspace root and the
/// value of `PATH`. [`require_ptxas`] calls it with the process environment.
pub fn locate_ptxas(
    env_value: Option<OsString>,
    workspace_root: &Path,
    path_value: Option<OsString>,
) -> Result<PathBuf, PtxasError> {
    if let Some(value) = env_value.filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&value);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(PtxasError::BadEnvironmentPath {
                path: path.display().to_string(),
            })
        };
    }
    let bundled = workspace_root.join(".tools/python/nvidia/cuda_nvcc/bin/ptxas");
    if bundled.is_file() {
        return Ok(bundled);
    }
    let mut looked_at = vec![
        format!("${PTXAS_ENV} (unset)"),
        bundled.display().to_string(),
    ];
    if let Some(path_value) = path_value {
        for dir in std::env::split_paths(&path_value) {
            let candidate = dir.join("ptxas");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    looked_at.push("ptxas on PATH".to_string());
    Err(PtxasError::NotFound { looked_at })
}

/// The ptxas binary, or an error saying how to install it. Tests call this and fail (never
/// skip) when ptxas is missing.
pub fn require_ptxas() -> Result<PathBuf, PtxasError> {
    locate_ptxas(
        std::env::var_os(PTXAS_ENV),
        &workspace_root(),
        std::env::var_os("PATH"),
    )
}

/// Assembles `ptx` for `arch` (`sm_80`, `sm_90`, `sm_90a`) with the ptxas of
/// [`require_ptxas`] and returns its resource report for the module's first `.entry`.
pub fn assemble(ptx: &str, arch: &str) -> Result<PtxasReport, PtxasError> {
    let ptxas = require_ptxas()?;
    assemble_with(&ptxas, ptx, arch)
}

/// [`assemble`] with an explicit ptxas binary.
pub fn assemble_with(ptxas: &Path, ptx: &str, arch: &str) -> Result<PtxasReport, PtxasError> {
    if !is_arch(arch) {
        return Err(PtxasError::BadArch {
            arch: arch.to_string(),
        });
    }
    let entry = entry_name(ptx).unwrap_or_else(|| "<no .entry>".to_string());
    let io_error = |message: String| PtxasError::Io {
        entry: entry.clone(),
        message,
    };
    let dir =
        TempDir::create().map_err(|e| io_error(format!("creating a temporary directory: {e}")))?;
    let ptx_path = dir.path.join("kernel.ptx");
    let cubin_path = dir.path.join("kernel.cubin");
    std::fs::write(&ptx_path, ptx)
        .map_err(|e| io_error(format!("writing {}: {e}", ptx_path.display())))?;
    let output = Command::new(ptxas)
        .arg("-v")
        .arg(format!("-arch={arch}"))
        .arg("-o")
        .arg(&cubin_path)
        .arg(&ptx_path)
        .output()
        .map_err(|e| io_error(format!("starting {}: {e}", ptxas.display())))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(PtxasError::Rejected {
            entry,
            arch: arch.to_string(),
            status: output.status.to_string(),
            stderr: format!("{stderr}{stdout}").trim_end().to_string(),
        });
    }
    let log = format!("{stderr}{stdout}");
    let cubin = std::fs::read(&cubin_path)
        .map_err(|e| io_error(format!("reading {}: {e}", cubin_path.display())))?;
    let mut report = parse_report(&log, &entry, arch).ok_or_else(|| PtxasError::NoReport {
        entry: entry.clone(),
        arch: arch.to_string(),
        log: log.clone(),
    })?;
    report.cubin = cubin;
    Ok(report)
}

/// Whether `arch` looks like `sm_<digits>` with an optional `a` suffix.
fn is_arch(arch: &str) -> bool {
    let Some(rest) = arch.strip_prefix("sm_") else {
        return false;
    };
    let digits = rest.strip_suffix('a').unwrap_or(rest);
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
}

/// The name of the first `.entry` in `ptx`.
pub fn entry_name(ptx: &str) -> Option<String> {
    let after = &ptx[ptx.find(".entry")? + ".entry".len()..];
    let name: String = after
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$'))
        .collect();
    (!name.is_empty()).then_some(name)
}

/// The number before `unit` in `text` (`"24 registers"` → 24 for unit `registers`).
fn number_before(text: &str, unit: &str) -> Option<u32> {
    let position = text.find(unit)?;
    text[..position].split_whitespace().last()?.parse().ok()
}

/// Parses the `-v` log for `entry`: the lines from `Compiling entry function '<entry>'` to
/// the next function. Returns `None` when the entry has no `Used N registers` line.
pub fn parse_report(log: &str, entry: &str, arch: &str) -> Option<PtxasReport> {
    let mut report = PtxasReport {
        entry: entry.to_string(),
        arch: arch.to_string(),
        registers: 0,
        spill_store_bytes: 0,
        spill_load_bytes: 0,
        shared_bytes: 0,
        stack_frame_bytes: 0,
        barriers: 0,
        warnings: Vec::new(),
        log: log.to_string(),
        cubin: Vec::new(),
    };
    let mut in_entry = false;
    let mut found = false;
    for line in log.lines() {
        if line.contains("ptxas warning") {
            report.warnings.push(line.trim().to_string());
        }
        if line.contains("Compiling entry function") || line.contains("Function properties for") {
            let quoted = line.contains(&format!("'{entry}'"));
            let named = line.trim_end().ends_with(&format!(" {entry}"));
            in_entry = quoted || named;
            continue;
        }
        if !in_entry {
            continue;
        }
        if line.contains("bytes stack frame") {
            report.stack_frame_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            report.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
            report.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            found = true;
            report.registers = number_before(line, "registers")?;
            report.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            report.barriers = number_before(line, "barriers").unwrap_or(0);
        }
    }
    found.then_some(report)
}

/// A private temporary directory, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create() -> std::io::Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "kiln-ptxas-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'first' for 'sm_80'
ptxas info    : Function properties for first
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'tile' for 'sm_80'
ptxas info    : Function properties for tile
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 26 registers, used 1 barriers, 4096 bytes smem, 364 bytes cmem[0]
ptxas info    : Compile time = 16.673 ms
";

    #[test]
    fn parses_the_figures_of_the_named_entry() {
        let first = parse_report(LOG, "first", "sm_80").unwrap();
        assert_eq!(first.registers, 10);
        assert_eq!(first.shared_bytes, 0);
        assert!(!first.spills());
        let tile = parse_report(LOG, "tile", "sm_80").unwrap();
        assert_eq!(
            (tile.registers, tile.shared_bytes, tile.barriers),
            (26, 4096, 1)
        );
        assert_eq!(
            (
                tile.stack_frame_bytes,
                tile.spill_store_bytes,
                tile.spill_load_bytes
            ),
            (16, 8, 4)
        );
        assert!(tile.spills());
        assert!(parse_report(LOG, "absent", "sm_80").is_none());
    }

    #[test]
    fn entry_names_and_architectures() {
        assert_eq!(
            entry_name(".visible .entry vec_add(\n.param .u64 a)").as_deref(),
            Some("vec_add")
        );
        assert_eq!(entry_name(".version 8.0"), None);
        assert!(is_arch("sm_80") && is_arch("sm_90a") && is_arch("sm_100"));
        assert!(!is_arch("sm_") && !is_arch("compute_80") && !is_arch("sm_9x"));
    }

    #[test]
    fn locating_reports_what_was_tried() {
        let nowhere = Path::new("/nonexistent-kiln-root");
        let err =
            locate_ptxas(None, nowhere, Some(OsString::from("/nonexistent-bin"))).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("scripts/test.sh"), "{message}");
        assert!(message.contains("nvidia-cuda-nvcc-cu12"), "{message}");
        assert!(
            message.contains("/nonexistent-kiln-root/.tools"),
            "{message}"
        );
        let err = locate_ptxas(Some(OsString::from("/no/such/ptxas")), nowhere, None).unwrap_err();
        assert!(
            matches!(err, PtxasError::BadEnvironmentPath { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("/no/such/ptxas"));
    }
}
