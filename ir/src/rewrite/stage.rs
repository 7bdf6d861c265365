//! Staged, bounded rule application.
//!
//! A [`Stage`] runs some rule families ([`RuleSet`]) with egg's runner until the e-graph
//! saturates or a limit stops it: a node limit (e-nodes in the e-graph), an iteration limit
//! and a time limit. Every stage reports why it stopped, its size, its time and how many times
//! each of its rules applied (an application is a union that changed the e-graph). A limit
//! that stops a stage is not an error: the e-graph still holds every form found so far, all of
//! them correct, and extraction proceeds from it; the report says so.
//!
//! Time limits make results depend on the machine's speed, so the defaults are far above what
//! the stages need (they are a safety net); node and iteration limits are deterministic.

use super::analysis::{EGraph, TypeAnalysis};
use super::rules::{Rule, RuleSet};
use egg::{Runner, SimpleScheduler, StopReason};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

/// The bounds of one stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageLimits {
    /// Stop when the e-graph holds more e-nodes than this.
    pub node_limit: usize,
    /// Stop after this many iterations (each applies every rule once to all its matches).
    pub iter_limit: usize,
    /// Stop after this much time, in milliseconds.
    pub time_limit_ms: u64,
}

/// One stage: a name, rule families and limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    pub rule_sets: Vec<RuleSet>,
    pub limits: StageLimits,
}

impl Stage {
    /// A stage with the default limits (see [`default_stages`]).
    pub fn new(name: &str, rule_sets: &[RuleSet]) -> Stage {
        Stage {
            name: name.to_string(),
            rule_sets: rule_sets.to_vec(),
            limits: StageLimits {
                node_limit: 200_000,
                iter_limit: 12,
                time_limit_ms: 5_000,
            },
        }
    }

    /// The stage's rules in a fixed order, without those named in `disabled`.
    pub fn rules(&self, disabled: &BTreeSet<String>) -> Vec<Rule> {
        self.rule_sets
            .iter()
            .flat_map(|set| set.rules())
            .filter(|rule| !disabled.contains(rule.name.as_str()))
            .collect()
    }
}

/// The default pipeline: simplify, then fixed-pattern fusion (with simplification, which
/// cancels the layout ops around recovered attention), then elementwise fusion.
pub fn default_stages() -> Vec<Stage> {
    let mut elementwise = Stage::new(
        "fuse-elementwise",
        &[RuleSet::Elementwise, RuleSet::Simplify],
    );
    // Each iteration can lengthen a chain by one op; a few are enough for real graphs.
    elementwise.limits.iter_limit = 4;
    vec![
        Stage::new("simplify", &[RuleSet::Simplify]),
        Stage::new("fuse-patterns", &[RuleSet::Patterns, RuleSet::Simplify]),
        elementwise,
    ]
}

/// Why a stage stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StageStop {
    /// No rule found anything new.
    Saturated,
    /// The iteration limit was reached.
    IterationLimit { limit: usize },
    /// The e-graph grew past the node limit (it had `nodes` e-nodes).
    NodeLimit { limit: usize, nodes: usize },
    /// The time limit was reached.
    TimeLimit { limit_ms: u64 },
    /// Something else stopped it.
    Other { message: String },
}

impl StageStop {
    /// Whether a limit (rather than saturation) stopped the stage.
    pub fn hit_limit(&self) -> bool {
        !matches!(self, StageStop::Saturated)
    }
}

impl fmt::Display for StageStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StageStop::Saturated => f.write_str("saturated"),
            StageStop::IterationLimit { limit } => {
                write!(f, "stopped by the iteration limit ({limit})")
            }
            StageStop::NodeLimit { limit, nodes } => write!(
                f,
                "stopped by the node limit ({limit} e-nodes; the e-graph had {nodes})"
            ),
            StageStop::TimeLimit { limit_ms } => {
                write!(f, "stopped by the time limit ({limit_ms} ms)")
            }
            StageStop::Other { message } => write!(f, "stopped: {message}"),
        }
    }
}

/// What one stage did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    pub name: String,
    pub limits: StageLimits,
    pub stop: StageStop,
    /// Iterations run (including one cut short by a limit).
    pub iterations: usize,
    /// E-nodes and e-classes before and after.
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub classes_before: usize,
    pub classes_after: usize,
    /// Applications per rule of the stage (zero included), by rule name.
    pub applied: BTreeMap<String, usize>,
    pub seconds: f64,
}

impl fmt::Display for StageReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "stage {}: {} after {} iteration(s), {} → {} e-nodes, {} → {} e-classes, {:.1} ms",
            self.name,
            self.stop,
            self.iterations,
            self.nodes_before,
            self.nodes_after,
            self.classes_before,
            self.classes_after,
            self.seconds * 1e3
        )?;
        for (rule, count) in &self.applied {
            if *count > 0 {
                writeln!(f, "  {rule}: {count}")?;
            }
        }
        Ok(())
    }
}

/// Runs `stage`'s `rules` on `egraph` within the stage's limits.
pub fn run_stage(egraph: EGraph, stage: &Stage, rules: &[Rule]) -> (EGraph, StageReport) {
    let started = Instant::now();
    let nodes_before = egraph.total_size();
    let classes_before = egraph.number_of_classes();
    let limits = &stage.limits;
    let runner = Runner::<_, TypeAnalysis, ()>::new(TypeAnalysis::default())
        .with_egraph(egraph)
        .with_scheduler(SimpleScheduler)
        .with_node_limit(limits.node_limit)
        .with_iter_limit(limits.iter_limit)
        .with_time_limit(Duration::from_millis(limits.time_limit_ms))
        .run(rules);
    let mut applied: BTreeMap<String, usize> =
        rules.iter().map(|r| (r.name.to_string(), 0)).collect();
    for iteration in &runner.iterations {
        for (name, count) in &iteration.applied {
            *applied.entry(name.to_string()).or_default() += count;
        }
    }
    let stop = match runner.stop_reason.clone() {
        Some(StopReason::Saturated) => StageStop::Saturated,
        Some(StopReason::IterationLimit(_)) => StageStop::IterationLimit {
            limit: limits.iter_limit,
        },
        Some(StopReason::NodeLimit(nodes)) => StageStop::NodeLimit {
            limit: limits.node_limit,
            nodes,
        },
        Some(StopReason::TimeLimit(_)) => StageStop::TimeLimit {
            limit_ms: limits.time_limit_ms,
        },
        Some(StopReason::Other(message)) => StageStop::Other { message },
        None => StageStop::Other {
            message: "the runner did not say why it stopped".to_string(),
        },
    };
    let iterations = runner.iterations.len();
    let egraph = runner.egraph;
    let report = StageReport {
        name: stage.name.clone(),
        limits: limits.clone(),
        stop,
        iterations,
        nodes_before,
        nodes_after: egraph.total_size(),
        classes_before,
        classes_after: egraph.number_of_classes(),
        applied,
        seconds: started.elapsed().as_secs_f64(),
    };
    (egraph, report)
}
