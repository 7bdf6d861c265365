//! The Quest pass: decode attention of the later layers becomes Quest attention.
//!
//! [`QuestPass::run`] rewrites every `AttentionDecode` node of a decoder layer
//! `≥ skip_layers` (one new token per sequence) into `QuestAttentionDecode` with the same
//! operands, scale and result, and the pass's budget and page size. The layer of a node comes
//! from its label (`model.layers.{i}.…`, as the model builder names it) or, failing that,
//! from the name of the KV-cache state input its keys come from (`model.layers.{i}.k_cache`).
//! Prefill graphs hold no `AttentionDecode` and come back unchanged: prefill stays dense.
//!
//! It owns the pass's name, options record and report; the op's meaning is in `op` and
//! `interp`, the selection logic in `crate::quest`. It must not schedule or touch a device.

use crate::graph::{Graph, ValueId};
use crate::op::{InputKind, Op};
use crate::quest::{QuestError, QuestOptions};
use crate::schedule::{PassRecord, PassReport};
use crate::shape::Dim;
use crate::verify::VerifyError;
use std::collections::BTreeSet;

/// The pass's name in plans and reports.
pub const NAME: &str = "quest";

/// Why the Quest pass could not run.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum QuestPassError {
    #[error("quest pass: {0}")]
    Options(#[from] QuestError),
    /// A decode attention node whose layer could be told neither from its label nor from its
    /// KV cache's input name.
    #[error(
        "quest pass: node %{node} `{label}`: cannot tell its decoder layer (expected a label \
         `model.layers.{{i}}.…` or keys from the state input `model.layers.{{i}}.k_cache`)"
    )]
    UnknownLayer { node: usize, label: String },
    #[error("quest pass: the rewritten graph does not verify: {0}")]
    Verify(#[from] VerifyError),
}

/// The Quest pass with its options (`budget_tokens`, `page_size`, `skip_layers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuestPass {
    options: QuestOptions,
}

impl QuestPass {
    /// The pass with checked options; errors name the offending option.
    pub fn new(options: QuestOptions) -> Result<QuestPass, QuestPassError> {
        options.validate()?;
        Ok(QuestPass { options })
    }

    pub fn options(&self) -> &QuestOptions {
        &self.options
    }

    /// The options as recorded in the plan: `{"budget": tokens, "page_size", "skip_layers"}`.
    pub fn options_json(&self) -> serde_json::Value {
        serde_json::json!({
            "budget": self.options.budget_tokens,
            "page_size": self.options.page_size,
            "skip_layers": self.options.skip_layers,
        })
    }

    /// The record to add to a plan's `passes_run`.
    pub fn record(&self) -> PassRecord {
        PassRecord {
            name: NAME.to_string(),
            options: self.options_json(),
        }
    }

    /// Rewrites `graph` (see the module doc) and reports how many attention nodes became
    /// Quest and which layers stayed dense. The result is verified.
    pub fn run(&self, graph: &Graph) -> Result<(Graph, PassReport), QuestPassError> {
        let mut rewritten = graph.clone();
        let mut quest_layers = BTreeSet::new();
        let mut dense_layers = BTreeSet::new();
        let mut multi_token = Vec::new();
        let (mut decode_nodes, mut changed) = (0, 0);
        for (index, node) in graph.nodes.iter().enumerate() {
            let Op::AttentionDecode { scale } = node.op else {
                continue;
            };
            decode_nodes += 1;
            let layer = layer_of(graph, index).ok_or_else(|| QuestPassError::UnknownLayer {
                node: index,
                label: node.label.clone(),
            })?;
            let one_token = graph
                .value_type(node.inputs[0])
                .is_ok_and(|q| q.shape.dims().get(1) == Some(&Dim::Const(1)));
            if !one_token {
                multi_token.push(node.label.clone());
                dense_layers.insert(layer);
            } else if self.options.applies_to_layer(layer) {
                rewritten.nodes[index].op = Op::QuestAttentionDecode {
                    scale,
                    budget_tokens: self.options.budget_tokens,
                    page_size: self.options.page_size,
                };
                quest_layers.insert(layer);
                changed += 1;
            } else {
                dense_layers.insert(layer);
            }
        }
        rewritten.verify()?;
        let mut notes = Vec::new();
        if decode_nodes == 0 {
            notes.push("no decode attention in the graph: unchanged (prefill stays dense)".into());
        } else {
            let o = &self.options;
            notes.push(format!(
                "{changed} of {decode_nodes} decode attention nodes use Quest: budget {} tokens \
                 ({} pages of {}), dense when a sequence has at most {} pages",
                o.budget_tokens,
                o.budget_pages(),
                o.page_size,
                o.budget_pages()
            ));
            notes.push(format!("quest layers: {}", list(&quest_layers)));
            notes.push(format!(
                "dense layers: {} (skip_layers {})",
                list(&dense_layers),
                o.skip_layers
            ));
            for label in multi_token {
                notes.push(format!(
                    "`{label}` stays dense: more than one new token per sequence"
                ));
            }
        }
        let report = PassReport {
            name: NAME.to_string(),
            changed,
            notes,
        };
        Ok((rewritten, report))
    }
}

/// `0, 1, 2` or `none`.
fn list(layers: &BTreeSet<usize>) -> String {
    if layers.is_empty() {
        return "none".to_string();
    }
    layers
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The decoder layer of attention node `index`: from its label, else from the name of the
/// state input its key cache (operand 1) comes from, through any `KvAppend`.
fn layer_of(graph: &Graph, index: usize) -> Option<usize> {
    let node = &graph.nodes[index];
    if let Some(layer) = layer_in_label(&node.label) {
        return Some(layer);
    }
    let mut value: ValueId = *node.inputs.get(1)?;
    loop {
        let source = graph.nodes.get(value.node)?;
        match &source.op {
            Op::KvAppend => value = *source.inputs.first()?,
            Op::Input {
                name,
                kind: InputKind::State,
                ..
            } => return layer_in_label(name),
            _ => return None,
        }
    }
}

/// `i` of the first `layers.{i}.` in `label`.
fn layer_in_label(label: &str) -> Option<usize> {
    label.match_indices("layers.").find_map(|(at, m)| {
        let rest = &label[at + m.len()..];
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 || !rest[digits..].starts_with('.') {
            return None;
        }
        rest[..digits].parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_from_label() {
        assert_eq!(
            layer_in_label("model.layers.12.self_attn.attention"),
            Some(12)
        );
        assert_eq!(layer_in_label("model.layers.3.k_cache"), Some(3));
        assert_eq!(layer_in_label("model.layers.x.attention"), None);
        assert_eq!(layer_in_label("layers.7"), None);
        assert_eq!(layer_in_label("attention"), None);
    }

    #[test]
    fn options_are_checked_and_recorded() {
        let bad = QuestOptions {
            budget_tokens: 40,
            ..QuestOptions::default()
        };
        let error = QuestPass::new(bad).unwrap_err().to_string();
        assert!(error.contains("budget_tokens"), "{error}");
        let pass = QuestPass::new(QuestOptions::default()).unwrap();
        let record = pass.record();
        assert_eq!(record.name, "quest");
        assert_eq!(
            record.options,
            serde_json::json!({"budget": 2048, "page_size": 16, "skip_layers": 2})
        );
    }
}
