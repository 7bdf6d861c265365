//! The Atom pass: the linear layers of the decoder become Atom W4A4 linears.
//!
//! [`AtomPass::run`] rewrites every `Linear` node of a decoder layer (typed
//! [`Node::layer`](crate::graph::Node::layer) set) whose weight is a graph weight input into
//! `AtomLinear`, reading five new weight inputs named `{weight}.{suffix}` (suffixes in
//! [`crate::atom`]); the original weight input goes when nothing else reads it. Kept in
//! their own precision, as in the paper: the embedding, the output head (no layer), MoE
//! routers (a linear feeding `MoeRouter`) and the experts (`MoeExpertFfn`, not a `Linear`).
//!
//! Unlike Quest it runs on the model graph **before** the rewrites: it changes which weights
//! exist, and the fusion rules (SwiGLU, residual epilogues) have no Atom forms yet, so they
//! leave `AtomLinear` nodes alone. With `kv_bits` 4, the rows each `KvAppend` of a decoder
//! layer writes go through `Quantize` and `Dequantize` (asymmetric INT4 per token and KV head)
//! first: decode attention reads what a 4-bit cache would hold, prefill attention the exact
//! rows. kiln caches keys after RoPE, so it quantizes post-RoPE keys (Atom quantizes them
//! before RoPE and rotates after dequantizing); both are per token and head. [`quantize_weights`] makes the new weights from the
//! original ones and a calibration (mean square of each linear's input channels, from
//! [`calibration_graph`] run on a prompt). It owns the pass's name, options record, report
//! and weight naming; the math is in `crate::atom`. It must not schedule or touch a device.

use crate::atom::{self, AtomError, AtomOptions};
use crate::dtype::DType;
use crate::graph::{Graph, Node, TensorType, ValueId};
use crate::op::{InputKind, Op};
use crate::schedule::{PassRecord, PassReport};
use crate::shape::Shape;
use crate::tensor::Tensor;
use crate::verify::VerifyError;
use crate::weights::Weights;
use std::collections::{BTreeMap, HashMap, HashSet};

/// The pass's name in plans and reports.
pub const NAME: &str = "atom";

/// Why the Atom pass or its weight quantization could not run.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AtomPassError {
    #[error(transparent)]
    Options(#[from] AtomError),
    #[error("atom pass: the rewritten graph does not verify: {0}")]
    Verify(#[from] VerifyError),
    #[error("atom: weight `{0}` is missing from the weights")]
    MissingWeight(String),
    #[error("atom: no calibration for `{weight}` (expected {k} mean squares, found {found})")]
    Calibration {
        weight: String,
        k: usize,
        found: usize,
    },
}

/// One linear layer the pass quantizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AtomTarget {
    /// The `Linear` node.
    pub node: usize,
    /// Its weight input's name.
    pub weight: String,
    /// Output and input channels.
    pub n: usize,
    pub k: usize,
}

/// The Atom pass with its options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AtomPass {
    options: AtomOptions,
}

impl AtomPass {
    /// The pass with checked options; errors name the offending option.
    pub fn new(options: AtomOptions) -> Result<AtomPass, AtomPassError> {
        options.validate()?;
        Ok(AtomPass { options })
    }

    pub fn options(&self) -> &AtomOptions {
        &self.options
    }

    /// The record to add to a plan's `passes_run`.
    pub fn record(&self) -> PassRecord {
        PassRecord {
            name: NAME.to_string(),
            options: serde_json::to_value(self.options).expect("options serialize"),
        }
    }

    /// The linears of `graph` the pass rewrites, in node order; every one is checked
    /// against the options (an error names the first layer that does not fit).
    pub fn targets(&self, graph: &Graph) -> Result<Vec<AtomTarget>, AtomPassError> {
        let feeds_router: HashSet<usize> = graph
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::MoeRouter { .. }))
            .map(|n| n.inputs[0].node)
            .collect();
        let mut targets = Vec::new();
        for (index, node) in graph.nodes.iter().enumerate() {
            if node.op != Op::Linear || node.layer.is_none() || feeds_router.contains(&index) {
                continue;
            }
            let Op::Input {
                name,
                kind: InputKind::Weight,
                shape,
                ..
            } = &graph.nodes[node.inputs[1].node].op
            else {
                continue;
            };
            let (Some(n), Some(k)) = (shape.dims()[0].as_const(), shape.dims()[1].as_const())
            else {
                continue;
            };
            self.options.check_layer(name, k)?;
            targets.push(AtomTarget {
                node: index,
                weight: name.clone(),
                n,
                k,
            });
        }
        Ok(targets)
    }

    /// Rewrites `graph` (see the module doc) and reports how many linears became Atom's.
    /// The result is verified.
    pub fn run(&self, graph: &Graph) -> Result<(Graph, PassReport), AtomPassError> {
        let targets = self.targets(graph)?;
        let by_node: HashMap<usize, &AtomTarget> = targets.iter().map(|t| (t.node, t)).collect();
        // Original weights that only the rewritten linears read are dropped.
        let mut readers: HashMap<usize, usize> = HashMap::new();
        for node in &graph.nodes {
            for value in &node.inputs {
                *readers.entry(value.node).or_default() += 1;
            }
        }
        for (_, value) in &graph.outputs {
            *readers.entry(value.node).or_default() += 1;
        }
        let mut replaced: HashMap<usize, usize> = HashMap::new();
        for target in &targets {
            *replaced
                .entry(graph.nodes[target.node].inputs[1].node)
                .or_default() += 1;
        }
        let dropped: HashSet<usize> = replaced
            .iter()
            .filter(|(node, count)| readers.get(node) == Some(count))
            .map(|(&node, _)| node)
            .collect();

        let mut out = Graph::new(&graph.name);
        let mut map: HashMap<usize, usize> = HashMap::new();
        let remap = |map: &HashMap<usize, usize>, v: &ValueId| ValueId {
            node: map[&v.node],
            output: v.output,
        };
        let mut kv_appends = 0;
        for (index, node) in graph.nodes.iter().enumerate() {
            if dropped.contains(&index) {
                continue;
            }
            if self.options.kv_bits == 4 && node.op == Op::KvAppend && node.layer.is_some() {
                let rows = remap(&map, &node.inputs[1]);
                // The cache's type: the rows' dtype and head_dim (KvAppend checks they match).
                let ty = &node.outputs[0];
                let head_dim = ty.shape.last().and_then(|d| d.as_const()).unwrap_or(0);
                let scheme = self.options.kv_scheme(head_dim);
                let parts = out.add(
                    &format!("{}.kv4_quantize", node.label),
                    Op::Quantize { scheme },
                    &[rows],
                )?;
                let rows = out.add1(
                    &format!("{}.kv4_dequantize", node.label),
                    Op::Dequantize {
                        scheme,
                        to: ty.dtype,
                    },
                    &parts,
                )?;
                let first = out.nodes.len() - 2;
                for added in &mut out.nodes[first..] {
                    added.layer = node.layer;
                }
                let mut inputs: Vec<ValueId> = node.inputs.iter().map(|v| remap(&map, v)).collect();
                inputs[1] = rows;
                map.insert(index, out.nodes.len());
                out.nodes.push(Node {
                    inputs,
                    ..node.clone()
                });
                kv_appends += 1;
                continue;
            }
            let Some(target) = by_node.get(&index) else {
                let inputs = node.inputs.iter().map(|v| remap(&map, v)).collect();
                map.insert(index, out.nodes.len());
                out.nodes.push(Node {
                    inputs,
                    ..node.clone()
                });
                continue;
            };
            let mut inputs = vec![remap(&map, &node.inputs[0])];
            for (suffix, ty) in self.weight_types(target) {
                inputs.push(ValueId {
                    node: out.nodes.len(),
                    output: 0,
                });
                let name = format!("{}.{suffix}", target.weight);
                out.nodes.push(Node {
                    op: Op::Input {
                        name: name.clone(),
                        kind: InputKind::Weight,
                        dtype: ty.dtype,
                        shape: ty.shape.clone(),
                    },
                    inputs: Vec::new(),
                    outputs: vec![ty],
                    label: name,
                    layer: node.layer,
                });
            }
            map.insert(index, out.nodes.len());
            out.nodes.push(Node {
                op: Op::AtomLinear {
                    group_size: self.options.group_size,
                    outliers: self.options.outliers,
                    activation_clip: self.options.activation_clip,
                },
                inputs,
                ..node.clone()
            });
        }
        out.outputs = graph
            .outputs
            .iter()
            .map(|(name, v)| (name.clone(), remap(&map, v)))
            .collect();
        out.verify()?;
        let o = &self.options;
        let mut notes = vec![format!(
            "{} linear layers in W4A4: INT4 groups of {}, {} INT8 outlier channels, clip \
             weights {} activations {}; embedding, head, routers and experts unchanged",
            targets.len(),
            o.group_size,
            o.outliers,
            o.weight_clip,
            o.activation_clip
        )];
        if o.kv_bits == 4 {
            notes.push(format!(
                "{kv_appends} KV-cache appends write 4-bit rows (asymmetric per token and head)"
            ));
        }
        let report = PassReport {
            name: NAME.to_string(),
            changed: targets.len() + kv_appends,
            notes,
        };
        Ok((out, report))
    }

    /// The five weight inputs of a target, by suffix.
    fn weight_types(&self, target: &AtomTarget) -> [(&'static str, TensorType); 5] {
        let (n, k, o) = (target.n, target.k, self.options.outliers);
        let groups = (k - o) / self.options.group_size;
        let ty = |dtype, dims: &[usize]| TensorType::new(dtype, Shape::of(dims));
        [
            (atom::PERMUTATION, ty(DType::I32, &[k])),
            (atom::INT4, ty(DType::I4, &[n, k - o])),
            (atom::INT4_SCALES, ty(DType::F16, &[n, groups])),
            (atom::INT8, ty(DType::I8, &[n, o])),
            (atom::INT8_SCALES, ty(DType::F16, &[n, 1])),
        ]
    }
}

/// `graph` with the input of every Atom target added as an output named `atom.{weight}`:
/// run on a calibration prompt, [`calibration`] turns them into mean squares.
pub fn calibration_graph(graph: &Graph, targets: &[AtomTarget]) -> Graph {
    let mut calibrated = graph.clone();
    for target in targets {
        let x = graph.nodes[target.node].inputs[0];
        calibrated.output(&format!("atom.{}", target.weight), x);
    }
    calibrated
}

/// The mean square of each input channel of each target, from the outputs of
/// [`calibration_graph`], by weight name.
pub fn calibration(
    outputs: &BTreeMap<String, Tensor>,
    targets: &[AtomTarget],
) -> BTreeMap<String, Vec<f64>> {
    targets
        .iter()
        .filter_map(|t| {
            let x = outputs.get(&format!("atom.{}", t.weight))?;
            Some((t.weight.clone(), atom::channel_mean_square(x)))
        })
        .collect()
}

/// The Atom weights of every target, quantized from `weights` with the outlier channels
/// chosen by `calibration` (mean squares by weight name), under the names the rewritten
/// graph reads. The original weights stay in `weights`.
pub fn quantize_weights(
    pass: &AtomPass,
    targets: &[AtomTarget],
    weights: &Weights,
    calibration: &BTreeMap<String, Vec<f64>>,
) -> Result<Weights, AtomPassError> {
    let mut quantized = Weights::new();
    for target in targets {
        let weight = weights
            .get(&target.weight)
            .ok_or_else(|| AtomPassError::MissingWeight(target.weight.clone()))?;
        let mean_square = calibration
            .get(&target.weight)
            .filter(|m| m.len() == target.k)
            .ok_or_else(|| AtomPassError::Calibration {
                weight: target.weight.clone(),
                k: target.k,
                found: calibration.get(&target.weight).map_or(0, Vec::len),
            })?;
        let permutation = atom::outlier_permutation(mean_square, pass.options.outliers);
        let atom_weight =
            atom::quantize_weight(&target.weight, weight, &permutation, &pass.options)?;
        for (suffix, tensor) in atom_weight.parts() {
            quantized.insert(&format!("{}.{suffix}", target.weight), tensor.clone());
        }
    }
    Ok(quantized)
}
