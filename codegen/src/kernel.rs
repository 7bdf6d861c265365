//! The kernel ABI shared by generators and the runtime: what a generated GPU kernel carries
//! besides its PTX text.
//!
//! A [`GpuKernel`] names its entry point, lists its parameters in order with their roles
//! (device pointers first, then `u32`/`f32` scalars), and carries a [`LaunchRule`]: grid and
//! block sizes as rules over the scalar parameters, evaluated by the runtime at launch time.
//! The runtime binds arguments by parameter name, never by a position guessed at the call
//! site; a rule that cannot be evaluated is a [`LaunchRuleError`]. Everything here is
//! serialisable so plans can store it. No PTX is built here.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a kernel uses a device buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

/// The kind of one kernel parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// A `.u64` device pointer.
    Pointer(Access),
    /// A `.u32` scalar (a dynamic dimension such as a row count or a sequence length).
    U32,
    /// A `.f32` scalar (such as a scale or an epsilon).
    F32,
}

/// One kernel parameter, in declaration order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Param {
    pub name: String,
    pub kind: ParamKind,
}

/// Why a launch rule could not be evaluated for the scalars given, naming the scalar.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LaunchRuleError {
    #[error("launch rule divides `{name}` by zero")]
    ZeroDivisor { name: String },
    #[error("launch rule needs scalar `{name}`, which was not given")]
    MissingScalar { name: String },
    #[error("launch extent {value} does not fit in u32")]
    TooLarge { value: u64 },
}

/// One launch dimension: `constant × Π ceil(scalar / divisor)` over named `u32` parameters.
///
/// ```
/// use kiln_codegen::kernel::Extent;
/// use std::collections::BTreeMap;
/// let blocks = Extent::ceil_div("rows", 4);
/// let scalars = BTreeMap::from([("rows".to_string(), 10u64)]);
/// assert_eq!(blocks.evaluate(&scalars).unwrap(), 3);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Extent {
    pub constant: u32,
    pub terms: Vec<(String, u32)>,
}

impl Extent {
    /// A fixed extent.
    pub fn fixed(n: u32) -> Extent {
        Extent {
            constant: n,
            terms: Vec::new(),
        }
    }

    /// `ceil(scalar / divisor)`.
    pub fn ceil_div(scalar: &str, divisor: u32) -> Extent {
        Extent {
            constant: 1,
            terms: vec![(scalar.to_string(), divisor)],
        }
    }

    /// This extent multiplied by `ceil(scalar / divisor)`.
    pub fn times(mut self, scalar: &str, divisor: u32) -> Extent {
        self.terms.push((scalar.to_string(), divisor));
        self
    }

    /// The extent for the given scalar values; an error names a missing scalar, a zero
    /// divisor or an extent too large for a launch.
    pub fn evaluate(&self, scalars: &BTreeMap<String, u64>) -> Result<u32, LaunchRuleError> {
        let mut value = self.constant as u64;
        for (name, divisor) in &self.terms {
            if *divisor == 0 {
                return Err(LaunchRuleError::ZeroDivisor { name: name.clone() });
            }
            let scalar = scalars
                .get(name)
                .ok_or_else(|| LaunchRuleError::MissingScalar { name: name.clone() })?;
            value = value.saturating_mul(scalar.div_ceil(*divisor as u64));
        }
        u32::try_from(value).map_err(|_| LaunchRuleError::TooLarge { value })
    }
}

/// Grid and block geometry of a launch.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LaunchRule {
    pub grid: [Extent; 3],
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
}

impl LaunchRule {
    /// A one-dimensional block of `threads` with a grid `x` and no dynamic shared memory.
    pub fn linear(grid_x: Extent, threads: u32) -> LaunchRule {
        LaunchRule {
            grid: [grid_x, Extent::fixed(1), Extent::fixed(1)],
            block: [threads, 1, 1],
            shared_bytes: 0,
        }
    }

    /// `(grid, block)` for the given scalar values.
    pub fn evaluate(
        &self,
        scalars: &BTreeMap<String, u64>,
    ) -> Result<([u32; 3], [u32; 3]), LaunchRuleError> {
        let mut grid = [0u32; 3];
        for (slot, extent) in grid.iter_mut().zip(&self.grid) {
            *slot = extent.evaluate(scalars)?;
        }
        Ok((grid, self.block))
    }
}

/// A generated GPU kernel, ready to be loaded by the runtime.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuKernel {
    /// The `.entry` name in the PTX.
    pub entry: String,
    pub ptx: String,
    pub params: Vec<Param>,
    pub launch: LaunchRule,
    /// The PTX target the text was written for, such as `sm_80` or `sm_90a`.
    pub target: String,
}

impl GpuKernel {
    /// The parameter named `name`, with its position.
    pub fn param(&self, name: &str) -> Option<(usize, &Param)> {
        self.params.iter().enumerate().find(|(_, p)| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_rules_evaluate_over_named_scalars() {
        let rule = LaunchRule::linear(Extent::ceil_div("rows", 8).times("batch", 1), 256);
        let scalars = BTreeMap::from([("rows".to_string(), 17u64), ("batch".to_string(), 3)]);
        assert_eq!(rule.evaluate(&scalars).unwrap(), ([9, 1, 1], [256, 1, 1]));
        let err = rule.evaluate(&BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("`rows`"), "{err}");
        let huge = BTreeMap::from([("rows".to_string(), u64::MAX), ("batch".to_string(), 2)]);
        assert!(rule.evaluate(&huge).is_err());
    }
}
