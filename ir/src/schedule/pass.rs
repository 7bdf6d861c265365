//! Scheduling passes: the [`Pass`] trait, so that later passes (`quest`, `atom`, `fiddler`)
//! plug in after partitioning, and the record of which passes ran with which options.
//!
//! A pass mutates a [`Schedule`] and reports what it changed; [`Schedule::apply`] runs it
//! and appends its name and options to `Schedule::passes_run`, so a plan says how it was made.

use super::Schedule;
use serde::{Deserialize, Serialize};

/// A transformation of a schedule.
pub trait Pass {
    /// A stable name, recorded in the plan.
    fn name(&self) -> &str;
    /// The pass's options, recorded in the plan (must serialise deterministically).
    fn options(&self) -> serde_json::Value;
    /// Runs the pass.
    fn run(&self, schedule: &mut Schedule) -> PassReport;
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PassReport {
    pub name: String,
    /// How many kernels or buffers it changed.
    pub changed: usize,
    /// Human-readable notes (deterministic: no timings).
    pub notes: Vec<String>,
}

/// A pass that ran, as recorded in the plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PassRecord {
    pub name: String,
    pub options: serde_json::Value,
}

impl Schedule {
    /// Runs `pass` and records it in `passes_run`.
    pub fn apply(&mut self, pass: &dyn Pass) -> PassReport {
        let mut report = pass.run(self);
        report.name = pass.name().to_string();
        self.passes_run.push(PassRecord {
            name: pass.name().to_string(),
            options: pass.options(),
        });
        report
    }
}
