//! The machine an artifact is compiled for.
//!
//! Owns [`Target`]: a GPU architecture (`sm_90`, `sm_80`) with its SM count, or `cpu` (every
//! step on the host). Its facts come from the device when the compiling machine has one
//! ([`Target::of_device`]) or from `--target` ([`Target::from_name`]: an H100 SXM's 132 SMs
//! for `sm_90`, an A100's 108 for `sm_80`), and are recorded in the artifact. At load,
//! [`Target::check_device`] refuses a device of another compute capability or SM count
//! (the decode split count is sized for the SM count). This file must not touch a device:
//! the caller passes what the device reported.
//!
//! ```
//! use kiln_compiler::Target;
//! let target = Target::from_name("sm_90").unwrap();
//! assert_eq!(target.sm_count, Some(132));
//! assert!(target.check_device((9, 0), 132).is_ok());
//! assert!(target.check_device((8, 0), 108).is_err());
//! assert!(Target::from_name("sm_75").is_err());
//! ```

use crate::error::TargetError;
use serde::{Deserialize, Serialize};

/// Where the target's facts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetSource {
    /// Read from the compiling machine's device.
    Device,
    /// Named with `--target` (or the default, `sm_90`).
    Named,
}

/// The machine an artifact is compiled for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// `sm_90`, `sm_80` or `cpu`.
    pub name: String,
    /// `(major, minor)` of a GPU target.
    pub compute_capability: Option<(u32, u32)>,
    /// Streaming multiprocessors of a GPU target.
    pub sm_count: Option<u32>,
    /// The device's name when the facts came from a device.
    pub device: Option<String>,
    pub source: TargetSource,
}

/// The names `--target` accepts.
pub const TARGET_NAMES: [&str; 3] = ["sm_90", "sm_80", "cpu"];

impl Default for Target {
    /// `sm_90` with an H100 SXM's SM count.
    fn default() -> Target {
        Target::from_name("sm_90").expect("sm_90 is a known target")
    }
}

impl Target {
    /// The target named `name` (one of [`TARGET_NAMES`]).
    pub fn from_name(name: &str) -> Result<Target, TargetError> {
        let (compute_capability, sm_count) = match name {
            "sm_90" => (Some((9, 0)), Some(132)),
            "sm_80" => (Some((8, 0)), Some(108)),
            "cpu" => (None, None),
            other => {
                return Err(TargetError::Unknown {
                    name: other.to_string(),
                })
            }
        };
        Ok(Target {
            name: name.to_string(),
            compute_capability,
            sm_count,
            device: None,
            source: TargetSource::Named,
        })
    }

    /// The target of a device with `compute_capability` and `sm_count`, named `device`.
    /// Capabilities 9.x map to `sm_90`, 8.x to `sm_80`; older ones are refused.
    pub fn of_device(
        device: &str,
        compute_capability: (u32, u32),
        sm_count: u32,
    ) -> Result<Target, TargetError> {
        let name = match compute_capability.0 {
            9.. => "sm_90",
            8 => "sm_80",
            _ => {
                return Err(TargetError::UnsupportedDevice {
                    device: device.to_string(),
                    major: compute_capability.0,
                    minor: compute_capability.1,
                })
            }
        };
        Ok(Target {
            name: name.to_string(),
            compute_capability: Some(compute_capability),
            sm_count: Some(sm_count),
            device: Some(device.to_string()),
            source: TargetSource::Device,
        })
    }

    /// Whether steps may run on a GPU.
    pub fn is_gpu(&self) -> bool {
        self.compute_capability.is_some()
    }

    /// The SM count the decode split rule is sized for (an H100's for a CPU target, whose
    /// plans have no GPU steps).
    pub fn sm_count_or_default(&self) -> usize {
        self.sm_count.unwrap_or(132) as usize
    }

    /// Whether a kernel written for PTX target `ptx_target` (such as `sm_80` or `sm_90a`) runs
    /// on this target.
    pub fn accepts_ptx_target(&self, ptx_target: &str) -> bool {
        let Some((major, minor)) = self.compute_capability else {
            return false;
        };
        let digits: String = ptx_target
            .trim_start_matches("sm_")
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        match digits.parse::<u32>() {
            Ok(needed) => needed <= major * 10 + minor,
            Err(_) => false,
        }
    }

    /// Refuses a device that is not the one the artifact was compiled for.
    pub fn check_device(
        &self,
        compute_capability: (u32, u32),
        sm_count: u32,
    ) -> Result<(), TargetError> {
        let Some(expected) = self.compute_capability else {
            return Ok(());
        };
        if expected != compute_capability || self.sm_count != Some(sm_count) {
            return Err(TargetError::DeviceMismatch {
                target: self.name.clone(),
                expected_capability: format!("{}.{}", expected.0, expected.1),
                expected_sms: self.sm_count.unwrap_or(0),
                found_capability: format!("{}.{}", compute_capability.0, compute_capability.1),
                found_sms: sm_count,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_map_to_their_architecture() {
        let h100 = Target::of_device("NVIDIA H100 80GB HBM3", (9, 0), 132).unwrap();
        assert_eq!(h100.name, "sm_90");
        assert_eq!(h100.source, TargetSource::Device);
        let a100 = Target::of_device("A100", (8, 0), 108).unwrap();
        assert_eq!(a100.name, "sm_80");
        assert!(Target::of_device("T4", (7, 5), 40).is_err());
    }

    #[test]
    fn a_device_with_other_sms_is_refused_by_name() {
        let err = Target::from_name("sm_90")
            .unwrap()
            .check_device((9, 0), 114)
            .unwrap_err()
            .to_string();
        assert!(err.contains("132") && err.contains("114"), "{err}");
    }

    #[test]
    fn ptx_targets_are_checked_against_the_capability() {
        let sm80 = Target::from_name("sm_80").unwrap();
        assert!(sm80.accepts_ptx_target("sm_80"));
        assert!(!sm80.accepts_ptx_target("sm_90a"));
        let sm90 = Target::from_name("sm_90").unwrap();
        assert!(sm90.accepts_ptx_target("sm_90a"));
        assert!(!Target::from_name("cpu")
            .unwrap()
            .accepts_ptx_target("sm_80"));
    }
}
