//! Turns a [`ModelConfig`] into tensor graphs: one decoder layer, or the whole model, in
//! prefill or decode form.
//!
//! Graph conventions (what the runtime and `kiln run` feed and read):
//! - inputs `input_ids` and `positions`, `i32[batch, seq]` (decode: `seq` is 1);
//! - `cache_start`, `i32[batch]`: how many tokens each sequence's KV cache already holds;
//! - per layer, state inputs `model.layers.{i}.k_cache` / `v_cache`,
//!   `[batch, ctx, kv_heads, head_dim]`, returned updated as outputs of the same name;
//! - output `logits`, `[batch, 1, vocab]`, for the last token of each sequence;
//! - weights are inputs named as in Hugging Face checkpoints;
//! - every node added for decoder layer `i` (its weights, KV-cache state inputs and ops) has
//!   `layer: Some(i)`; the shared inputs, embedding, final norm and head have `None`.
//!
//! Prefill runs causal attention over the new tokens and expects `cache_start` = 0; decode
//! appends to the cache and attends over it. This file builds graphs only: no execution, no
//! weights, no rewriting.

use crate::config::{Architecture, ModelConfig};
use kiln_ir::dtype::DType;
use kiln_ir::graph::{Graph, ValueId};
use kiln_ir::op::{InputKind, Op};
use kiln_ir::shape::{Dim, Shape};
use kiln_ir::verify::VerifyError;
use serde::{Deserialize, Serialize};

/// Which graph to build: a whole prompt at once, or one new token per sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Prefill,
    Decode,
}

impl Phase {
    /// The token dimension of the phase: symbolic `seq` for prefill, 1 for decode.
    pub fn seq_dim(self) -> Dim {
        match self {
            Phase::Prefill => Dim::sym("seq"),
            Phase::Decode => Dim::Const(1),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
        }
    }
}

/// Choices about the form of the graphs the builder emits; the default is the form above.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildOptions {
    /// Emit attention as a framework exporter would, in plain ops, instead of `Attention` /
    /// `AttentionDecode`: heads moved forward by `Transpose`, grouped-query K/V heads repeated
    /// (`Reshape` + `Concat` + `Reshape`), `softmax(scale · QKᵀ + mask) · V` with `MatMul`,
    /// `Mul` by a constant, `Add` of a `CausalMask` (with the decode lengths) and `Softmax`,
    /// and the heads moved back. It computes the same values; the rewriter recovers the
    /// attention op from it.
    pub decompose_attention: bool,
}

/// Builds the whole model: embedding, every decoder layer, final norm and LM head.
pub fn build_model(config: &ModelConfig, phase: Phase) -> Result<Graph, VerifyError> {
    build_model_with(config, phase, &BuildOptions::default())
}

/// [`build_model`] with [`BuildOptions`].
pub fn build_model_with(
    config: &ModelConfig,
    phase: Phase,
    options: &BuildOptions,
) -> Result<Graph, VerifyError> {
    let mut b = Builder::new(config, phase, &format!("{}.{}", config.name, phase.name()));
    b.options = options.clone();
    let ids = b.activation("input_ids", DType::I32, b.tokens_shape(&[]))?;
    let table = b.weight(
        "model.embed_tokens.weight",
        &[config.vocab_size, config.hidden_size],
    )?;
    let mut hidden = b.graph.add1("embed", Op::Embedding, &[table, ids])?;
    let common = b.common_inputs()?;
    for layer in 0..config.num_layers {
        hidden = b.decoder_layer(layer, hidden, &common)?;
    }
    let norm = b.weight("model.norm.weight", &[config.hidden_size])?;
    let normed = b.graph.add1(
        "final_norm",
        Op::RmsNorm {
            eps: config.rms_norm_eps,
        },
        &[hidden, norm],
    )?;
    let last = b.graph.add1(
        "last_token",
        Op::Slice {
            axis: 1,
            start: -1,
            end: None,
        },
        &[normed],
    )?;
    let head = if config.tie_word_embeddings {
        table
    } else {
        b.weight("lm_head.weight", &[config.vocab_size, config.hidden_size])?
    };
    let logits = b.graph.add1("lm_head", Op::Linear, &[last, head])?;
    b.graph.output("logits", logits);
    b.finish()
}

/// Builds one decoder layer: input `hidden` `[batch, seq, hidden]` → output `hidden`, with the
/// layer's KV cache in and out.
pub fn build_layer(config: &ModelConfig, layer: usize, phase: Phase) -> Result<Graph, VerifyError> {
    build_layer_with(config, layer, phase, &BuildOptions::default())
}

/// [`build_layer`] with [`BuildOptions`].
pub fn build_layer_with(
    config: &ModelConfig,
    layer: usize,
    phase: Phase,
    options: &BuildOptions,
) -> Result<Graph, VerifyError> {
    let name = format!("{}.layer{layer}.{}", config.name, phase.name());
    let mut b = Builder::new(config, phase, &name);
    b.options = options.clone();
    let hidden = b.activation(
        "hidden",
        b.config.dtype,
        b.tokens_shape(&[config.hidden_size]),
    )?;
    let common = b.common_inputs()?;
    let out = b.decoder_layer(layer, hidden, &common)?;
    b.graph.output("hidden", out);
    b.finish()
}

/// The inputs every layer shares.
struct CommonInputs {
    positions: ValueId,
    cache_start: ValueId,
    /// Decode only: valid cache rows per sequence after the append.
    lengths: Option<ValueId>,
}

struct Builder<'a> {
    config: &'a ModelConfig,
    phase: Phase,
    graph: Graph,
    options: BuildOptions,
}

impl<'a> Builder<'a> {
    fn new(config: &'a ModelConfig, phase: Phase, name: &str) -> Builder<'a> {
        Builder {
            config,
            phase,
            graph: Graph::new(name),
            options: BuildOptions::default(),
        }
    }

    fn finish(self) -> Result<Graph, VerifyError> {
        self.graph.verify()?;
        Ok(self.graph)
    }

    /// `[batch, seq, extra…]`.
    fn tokens_shape(&self, extra: &[usize]) -> Shape {
        let mut dims = vec![Dim::sym("batch"), self.phase.seq_dim()];
        dims.extend(extra.iter().map(|&d| Dim::Const(d)));
        Shape(dims)
    }

    fn activation(
        &mut self,
        name: &str,
        dtype: DType,
        shape: Shape,
    ) -> Result<ValueId, VerifyError> {
        self.graph.input(name, InputKind::Activation, dtype, shape)
    }

    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<ValueId, VerifyError> {
        self.graph
            .input(name, InputKind::Weight, self.config.dtype, Shape::of(shape))
    }

    fn common_inputs(&mut self) -> Result<CommonInputs, VerifyError> {
        let positions = self.activation("positions", DType::I32, self.tokens_shape(&[]))?;
        let cache_start = self.activation("cache_start", DType::I32, kiln_ir::shape!["batch"])?;
        let lengths = match self.phase {
            Phase::Prefill => None,
            Phase::Decode => {
                let one = self.graph.constant("one", 1.0, DType::I32)?;
                Some(self.graph.add1("lengths", Op::Add, &[cache_start, one])?)
            }
        };
        Ok(CommonInputs {
            positions,
            cache_start,
            lengths,
        })
    }

    /// `x · weightᵀ (+ bias)` with weights named `{prefix}.weight` / `{prefix}.bias`.
    fn linear(
        &mut self,
        prefix: &str,
        x: ValueId,
        out: usize,
        input: usize,
        bias: bool,
    ) -> Result<ValueId, VerifyError> {
        let weight = self.weight(&format!("{prefix}.weight"), &[out, input])?;
        let mut y = self.graph.add1(prefix, Op::Linear, &[x, weight])?;
        if bias {
            let b = self.weight(&format!("{prefix}.bias"), &[out])?;
            y = self
                .graph
                .add1(&format!("{prefix}.add_bias"), Op::Add, &[y, b])?;
        }
        Ok(y)
    }

    fn rms_norm(
        &mut self,
        weight_name: &str,
        x: ValueId,
        size: usize,
    ) -> Result<ValueId, VerifyError> {
        let weight = self.weight(weight_name, &[size])?;
        let label = weight_name.trim_end_matches(".weight");
        self.graph.add1(
            label,
            Op::RmsNorm {
                eps: self.config.rms_norm_eps,
            },
            &[x, weight],
        )
    }

    fn decoder_layer(
        &mut self,
        layer: usize,
        hidden: ValueId,
        common: &CommonInputs,
    ) -> Result<ValueId, VerifyError> {
        let c = self.config;
        let first_node = self.graph.nodes.len();
        let prefix = format!("model.layers.{layer}");
        let x = self.rms_norm(
            &format!("{prefix}.input_layernorm.weight"),
            hidden,
            c.hidden_size,
        )?;
        let attention = self.self_attention(&prefix, x, common)?;
        let hidden = self.graph.add1(
            &format!("{prefix}.attn_residual"),
            Op::Add,
            &[hidden, attention],
        )?;
        let x = self.rms_norm(
            &format!("{prefix}.post_attention_layernorm.weight"),
            hidden,
            c.hidden_size,
        )?;
        let mlp = if c.is_moe_layer(layer) {
            self.moe(&prefix, x)?
        } else {
            self.dense_mlp(&format!("{prefix}.mlp"), x, c.intermediate_size)?
        };
        let out = self
            .graph
            .add1(&format!("{prefix}.mlp_residual"), Op::Add, &[hidden, mlp])?;
        // Every node added for this layer (its weights, KV-cache inputs and ops) carries the
        // layer as a typed fact: passes read `Node::layer`, never the labels.
        for node in &mut self.graph.nodes[first_node..] {
            node.layer = Some(layer);
        }
        Ok(out)
    }

    fn self_attention(
        &mut self,
        layer: &str,
        x: ValueId,
        common: &CommonInputs,
    ) -> Result<ValueId, VerifyError> {
        let c = self.config;
        let (heads, kv_heads, head_dim) = (c.num_attention_heads, c.num_kv_heads, c.head_dim);
        let p = format!("{layer}.self_attn");
        let bias = c.attention_bias;
        let q = self.linear(
            &format!("{p}.q_proj"),
            x,
            heads * head_dim,
            c.hidden_size,
            bias,
        )?;
        let k = self.linear(
            &format!("{p}.k_proj"),
            x,
            kv_heads * head_dim,
            c.hidden_size,
            bias,
        )?;
        let v = self.linear(
            &format!("{p}.v_proj"),
            x,
            kv_heads * head_dim,
            c.hidden_size,
            bias,
        )?;
        let mut q = self.split_heads(&format!("{p}.q_heads"), q, heads)?;
        let mut k = self.split_heads(&format!("{p}.k_heads"), k, kv_heads)?;
        let v = self.split_heads(&format!("{p}.v_heads"), v, kv_heads)?;
        if c.qk_norm {
            q = self.rms_norm(&format!("{p}.q_norm.weight"), q, head_dim)?;
            k = self.rms_norm(&format!("{p}.k_norm.weight"), k, head_dim)?;
        }
        let rope = Op::Rope {
            theta: c.rope_theta,
        };
        let q = self
            .graph
            .add1(&format!("{p}.q_rope"), rope.clone(), &[q, common.positions])?;
        let k = self
            .graph
            .add1(&format!("{p}.k_rope"), rope, &[k, common.positions])?;

        let cache_shape = Shape(vec![
            Dim::sym("batch"),
            Dim::sym("ctx"),
            Dim::Const(kv_heads),
            Dim::Const(head_dim),
        ]);
        let k_name = format!("{layer}.k_cache");
        let v_name = format!("{layer}.v_cache");
        let k_cache = self
            .graph
            .input(&k_name, InputKind::State, c.dtype, cache_shape.clone())?;
        let v_cache = self
            .graph
            .input(&v_name, InputKind::State, c.dtype, cache_shape)?;
        let k_cache = self.graph.add1(
            &format!("{k_name}.append"),
            Op::KvAppend,
            &[k_cache, k, common.cache_start],
        )?;
        let v_cache = self.graph.add1(
            &format!("{v_name}.append"),
            Op::KvAppend,
            &[v_cache, v, common.cache_start],
        )?;
        self.graph.output(&k_name, k_cache);
        self.graph.output(&v_name, v_cache);

        let scale = 1.0 / (head_dim as f32).sqrt();
        let attended = match common.lengths {
            _ if self.options.decompose_attention => {
                let (k, v) = match common.lengths {
                    None => (k, v),
                    Some(_) => (k_cache, v_cache),
                };
                self.decomposed_attention(&p, [q, k, v], common.lengths, scale)?
            }
            None => self.graph.add1(
                &format!("{p}.attention"),
                Op::Attention {
                    causal: true,
                    scale,
                },
                &[q, k, v],
            )?,
            Some(lengths) => self.graph.add1(
                &format!("{p}.attention"),
                Op::AttentionDecode { scale },
                &[q, k_cache, v_cache, lengths],
            )?,
        };
        let merged = self.graph.add1(
            &format!("{p}.merge_heads"),
            Op::Reshape {
                shape: self.tokens_shape(&[heads * head_dim]),
            },
            &[attended],
        )?;
        self.linear(
            &format!("{p}.o_proj"),
            merged,
            c.hidden_size,
            heads * head_dim,
            false,
        )
    }

    /// `softmax(scale · QKᵀ + mask) · V` in plain ops (see [`BuildOptions`]); `q`, `k`, `v`
    /// and the result are `[B, tokens, heads, D]`.
    fn decomposed_attention(
        &mut self,
        p: &str,
        [q, k, v]: [ValueId; 3],
        lengths: Option<ValueId>,
        scale: f32,
    ) -> Result<ValueId, VerifyError> {
        let c = self.config;
        let heads_first = Op::Transpose {
            perm: vec![0, 2, 1, 3],
        };
        let g = &mut self.graph;
        let q = g.add1(&format!("{p}.q_t"), heads_first.clone(), &[q])?;
        let mut kv = Vec::new();
        for (name, x) in [("k", k), ("v", v)] {
            let mut x = g.add1(&format!("{p}.{name}_t"), heads_first.clone(), &[x])?;
            let group = c.num_attention_heads / c.num_kv_heads;
            if group > 1 {
                // repeat_kv: [B, Hkv, T, D] → [B, Hkv, 1, T, D] → G copies → [B, Hq, T, D].
                let dims = g.value_type(x).expect("added above").shape.0.clone();
                let mut unsqueezed = dims.clone();
                unsqueezed.insert(2, Dim::Const(1));
                let one = g.add1(
                    &format!("{p}.{name}_unsqueeze"),
                    Op::Reshape {
                        shape: Shape(unsqueezed),
                    },
                    &[x],
                )?;
                let copies = g.add1(
                    &format!("{p}.{name}_repeat"),
                    Op::Concat { axis: 2 },
                    &vec![one; group],
                )?;
                let mut repeated = dims;
                repeated[1] = Dim::Const(c.num_attention_heads);
                x = g.add1(
                    &format!("{p}.{name}_repeat_kv"),
                    Op::Reshape {
                        shape: Shape(repeated),
                    },
                    &[copies],
                )?;
            }
            kv.push(x);
        }
        let k_t = g.add1(
            &format!("{p}.k_transposed"),
            Op::Transpose {
                perm: vec![0, 1, 3, 2],
            },
            &[kv[0]],
        )?;
        let scores = g.add1(&format!("{p}.scores"), Op::MatMul, &[q, k_t])?;
        let scale = g.constant(&format!("{p}.scale"), scale, c.dtype)?;
        let scaled = g.add1(&format!("{p}.scaled"), Op::Mul, &[scores, scale])?;
        let mut mask_operands = vec![scaled];
        mask_operands.extend(lengths);
        let mask = g.add1(&format!("{p}.mask"), Op::CausalMask, &mask_operands)?;
        let masked = g.add1(&format!("{p}.masked"), Op::Add, &[scaled, mask])?;
        let probs = g.add1(&format!("{p}.probs"), Op::Softmax, &[masked])?;
        let out = g.add1(&format!("{p}.context"), Op::MatMul, &[probs, kv[1]])?;
        g.add1(&format!("{p}.context_t"), heads_first, &[out])
    }

    fn split_heads(
        &mut self,
        label: &str,
        x: ValueId,
        heads: usize,
    ) -> Result<ValueId, VerifyError> {
        let shape = self.tokens_shape(&[heads, self.config.head_dim]);
        self.graph.add1(label, Op::Reshape { shape }, &[x])
    }

    /// SwiGLU MLP: `down(silu(gate(x)) ⊙ up(x))`, weights `{prefix}.{gate,up,down}_proj`.
    fn dense_mlp(
        &mut self,
        prefix: &str,
        x: ValueId,
        width: usize,
    ) -> Result<ValueId, VerifyError> {
        let hidden = self.config.hidden_size;
        let gate = self.linear(&format!("{prefix}.gate_proj"), x, width, hidden, false)?;
        let up = self.linear(&format!("{prefix}.up_proj"), x, width, hidden, false)?;
        let activated = self
            .graph
            .add1(&format!("{prefix}.silu"), Op::Silu, &[gate])?;
        let product =
            self.graph
                .add1(&format!("{prefix}.gate_mul_up"), Op::Mul, &[activated, up])?;
        self.linear(
            &format!("{prefix}.down_proj"),
            product,
            hidden,
            width,
            false,
        )
    }

    /// Routed experts (plus Qwen2-MoE's gated shared expert).
    fn moe(&mut self, layer: &str, x: ValueId) -> Result<ValueId, VerifyError> {
        let c = self.config;
        let moe = c.moe.as_ref().expect("is_moe_layer implies a MoE config");
        let hidden = c.hidden_size;
        let width = moe.expert_intermediate_size;
        let (block, [gate_name, up_name, down_name]) = match c.architecture {
            Architecture::Mixtral => (format!("{layer}.block_sparse_moe"), ["w1", "w3", "w2"]),
            _ => (
                format!("{layer}.mlp"),
                ["gate_proj", "up_proj", "down_proj"],
            ),
        };
        let logits = self.linear(&format!("{block}.gate"), x, moe.num_experts, hidden, false)?;
        let mut expert_weights = Vec::with_capacity(moe.num_experts);
        for e in 0..moe.num_experts {
            let p = format!("{block}.experts.{e}");
            expert_weights.push([
                self.weight(&format!("{p}.{gate_name}.weight"), &[width, hidden])?,
                self.weight(&format!("{p}.{up_name}.weight"), &[width, hidden])?,
                self.weight(&format!("{p}.{down_name}.weight"), &[hidden, width])?,
            ]);
        }
        let mut out = self
            .graph
            .add_moe(
                &block,
                x,
                logits,
                &expert_weights,
                moe.top_k,
                moe.normalize_top_k,
            )?
            .out;
        if let Some(shared_width) = moe.shared_expert_intermediate_size {
            let shared = self.dense_mlp(&format!("{block}.shared_expert"), x, shared_width)?;
            let gate_logit =
                self.linear(&format!("{block}.shared_expert_gate"), x, 1, hidden, false)?;
            let gate = self.graph.add1(
                &format!("{block}.shared_expert_gate.sigmoid"),
                Op::Sigmoid,
                &[gate_logit],
            )?;
            let gated = self.graph.add1(
                &format!("{block}.shared_expert.gated"),
                Op::Mul,
                &[gate, shared],
            )?;
            out = self
                .graph
                .add1(&format!("{block}.add_shared"), Op::Add, &[out, gated])?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::cost::parameter_count;

    #[test]
    fn every_preset_builds_verified_graphs() {
        for name in ModelConfig::preset_names() {
            let config = ModelConfig::preset(name).unwrap();
            for phase in [Phase::Prefill, Phase::Decode] {
                let model = build_model(&config, phase).unwrap_or_else(|e| panic!("{name}: {e}"));
                model.verify().unwrap();
                let layer = build_layer(&config, config.num_layers - 1, phase).unwrap();
                layer.verify().unwrap();
                assert_eq!(model.outputs.len(), 1 + 2 * config.num_layers, "{name}");
            }
        }
    }

    #[test]
    fn every_node_of_a_decoder_layer_carries_its_layer() {
        let prefix = |layer: usize| format!("model.layers.{layer}.");
        for name in ["tiny-llama", "tiny-mixtral", "qwen3-30b-a3b"] {
            let config = ModelConfig::preset(name).unwrap();
            for phase in [Phase::Prefill, Phase::Decode] {
                for decompose_attention in [false, true] {
                    let options = BuildOptions {
                        decompose_attention,
                    };
                    let model = build_model_with(&config, phase, &options).unwrap();
                    let mut count = vec![0; config.num_layers];
                    for node in &model.nodes {
                        match node.layer {
                            Some(layer) => {
                                assert!(node.label.starts_with(&prefix(layer)), "{}", node.label);
                                count[layer] += 1;
                            }
                            None => {
                                assert!(!node.label.starts_with("model.layers."), "{}", node.label)
                            }
                        }
                    }
                    assert!(count.iter().all(|&c| c > 0), "{name}: {count:?}");
                    // One layer alone: its nodes carry its index, the shared inputs none.
                    let last = config.num_layers - 1;
                    let layer = build_layer_with(&config, last, phase, &options).unwrap();
                    for node in &layer.nodes {
                        let expected = node.label.starts_with(&prefix(last)).then_some(last);
                        assert_eq!(node.layer, expected, "{}", node.label);
                    }
                }
            }
        }
    }

    fn billions(name: &str) -> f64 {
        let graph = build_model(&ModelConfig::preset(name).unwrap(), Phase::Decode).unwrap();
        parameter_count(&graph).unwrap().total as f64 / 1e9
    }

    #[test]
    fn published_parameter_counts() {
        // Published sizes: Llama-3-8B 8.03B, Mixtral-8x7B 46.7B, Llama-2-7B 6.74B,
        // Qwen3-30B-A3B 30.5B.
        for (name, expected) in [
            ("llama-3-8b", 8.03),
            ("mixtral-8x7b", 46.7),
            ("llama-2-7b", 6.74),
            ("qwen3-30b-a3b", 30.5),
        ] {
            let found = billions(name);
            assert!(
                (found / expected - 1.0).abs() < 0.01,
                "{name}: {found:.3}B, expected {expected}B"
            );
        }
    }

    #[test]
    fn active_parameters_count_only_routed_experts() {
        // Mixtral routes 2 of 8 experts: about 12.9B parameters are active per token.
        let graph =
            build_model(&ModelConfig::preset("mixtral-8x7b").unwrap(), Phase::Decode).unwrap();
        let count = parameter_count(&graph).unwrap();
        let active = count.active_per_token as f64 / 1e9;
        assert!((active / 12.9 - 1.0).abs() < 0.01, "{active}");
        assert_eq!(count.bytes, count.total * 2, "bf16 weights");
    }

    #[test]
    fn decode_reads_the_cache_and_prefill_is_causal() {
        let config = ModelConfig::preset("tiny-llama").unwrap();
        let decode = build_model(&config, Phase::Decode).unwrap();
        assert!(decode
            .nodes
            .iter()
            .any(|n| matches!(n.op, Op::AttentionDecode { .. })));
        assert!(!decode
            .nodes
            .iter()
            .any(|n| matches!(n.op, Op::Attention { .. })));
        let prefill = build_model(&config, Phase::Prefill).unwrap();
        assert!(prefill
            .nodes
            .iter()
            .any(|n| matches!(n.op, Op::Attention { causal: true, .. })));
    }
}
