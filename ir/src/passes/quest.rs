//! The Quest pass: decode attention of the later layers becomes Quest attention.
//!
//! [`QuestPass::run`] rewrites every `AttentionDecode` node of a decoder layer
//! `≥ skip_layers` (one new token per sequence) into `QuestAttentionDecode` with the same
//! operands, scale and result, and the pass's budget and page size. The layer of a node is its
//! typed [`Node::layer`](crate::graph::Node::layer), which the model builder sets and rewriting
//! carries; labels and input names are never parsed. Prefill graphs hold no `AttentionDecode`
//! and come back unchanged: prefill stays dense.
//!
//! It owns the pass's name, options record and report; the op's meaning is in `op` and
//! `interp`, the selection logic in `crate::quest`. It must not schedule or touch a device.

use crate::graph::Graph;
use crate::op::Op;
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
    /// A decode attention node without a decoder layer (`Node::layer` is `None`).
    #[error(
        "quest pass: node %{node} `{label}`: decode attention without a decoder layer (its \
         `layer` is not set; the model builder sets it on every node of a decoder layer)"
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
            let layer = node.layer.ok_or_else(|| QuestPassError::UnknownLayer {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::op::InputKind;
    use crate::shape::Shape;

    /// One decode step with a decode attention node per `(label, key-cache input name,
    /// layer)`, each over its own KV-cache state input; the attention node and its cache
    /// input get `layer`.
    fn decode_graph(attention: &[(&str, &str, Option<usize>)]) -> Graph {
        let mut g = Graph::new("decode");
        let act = InputKind::Activation;
        let q = g
            .input("q", act, DType::F32, Shape::of(&[1, 1, 2, 4]))
            .unwrap();
        let lengths = g
            .input("lengths", act, DType::I32, Shape::of(&[1]))
            .unwrap();
        for &(label, cache, layer) in attention {
            let first = g.nodes.len();
            let kv = Shape::of(&[1, 8, 1, 4]);
            let k = g.input(cache, InputKind::State, DType::F32, kv).unwrap();
            let op = Op::AttentionDecode { scale: 0.5 };
            let y = g.add1(label, op, &[q, k, k, lengths]).unwrap();
            for node in &mut g.nodes[first..] {
                node.layer = layer;
            }
            g.output(label, y);
        }
        g
    }

    fn pass(skip_layers: usize) -> QuestPass {
        QuestPass::new(QuestOptions {
            budget_tokens: 8,
            page_size: 4,
            skip_layers,
        })
        .unwrap()
    }

    #[test]
    fn the_layer_is_the_typed_field_whatever_the_labels_say() {
        // Labels and input names say nothing about layers (or something misleading); the
        // typed layers 0 and 3 decide: with skip_layers 2 only layer 3 becomes Quest.
        let graph = decode_graph(&[
            ("first", "keys_a", Some(0)),
            ("model.layers.7.self_attn.attention", "keys_b", Some(3)),
        ]);
        let (rewritten, report) = pass(2).run(&graph).unwrap();
        let ops: Vec<(&str, Option<usize>)> = rewritten
            .nodes
            .iter()
            .filter(|n| n.inputs.len() == 4)
            .map(|n| (n.op.name(), n.layer))
            .collect();
        assert_eq!(
            ops,
            vec![
                ("attention_decode", Some(0)),
                ("quest_attention_decode", Some(3))
            ]
        );
        assert_eq!(report.changed, 1);
        assert!(
            report.notes.contains(&"quest layers: 3".to_string()),
            "{report:?}"
        );
        assert!(
            report
                .notes
                .contains(&"dense layers: 0 (skip_layers 2)".to_string()),
            "{report:?}"
        );
        // Everything but the rewritten op is as it was, layers included.
        for (before, after) in graph.nodes.iter().zip(&rewritten.nodes) {
            assert_eq!((&before.label, before.layer), (&after.label, after.layer));
        }
    }

    #[test]
    fn a_decode_attention_without_a_layer_is_an_error() {
        // A label and a cache name in the builder's naming do not stand in for the field.
        let graph = decode_graph(&[(
            "model.layers.5.self_attn.attention",
            "model.layers.5.k_cache",
            None,
        )]);
        let error = pass(0).run(&graph).unwrap_err();
        assert_eq!(
            error,
            QuestPassError::UnknownLayer {
                node: 3,
                label: "model.layers.5.self_attn.attention".to_string()
            }
        );
        let message = error.to_string();
        assert!(
            message.contains("%3 `model.layers.5.self_attn.attention`")
                && message.contains("without a decoder layer"),
            "{message}"
        );
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
