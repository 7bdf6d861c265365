//! GGUF tensor names for kiln's (Hugging Face) weight names, and llama.cpp's Q/K row
//! permutation.
//!
//! kiln's graph builder names weights as Hugging Face checkpoints do
//! (`model.layers.3.self_attn.q_proj.weight`); llama.cpp's converter renames them
//! (`blk.3.attn_q.weight`). The map goes from kiln's name to the GGUF one, since the loader
//! starts from the names a graph expects.
//!
//! For llama, `convert_hf_to_gguf.py` permutes the rows of `q_proj` and `k_proj` (weights and
//! biases) so that each head's rotary pairs are adjacent (llama.cpp's "normal" RoPE), where
//! Hugging Face (and kiln) rotate the two halves of each head: HF's
//! `permute(w, n_head) = w.reshape(n_head, 2, rows / n_head / 2, *rest).swapaxes(1, 2)
//! .reshape(w.shape)`, with `n_head` the key/value head count for `k_proj`. The loader applies
//! the inverse, [`unpermute_rope_rows`].

/// Which projection a permuted tensor is: queries use the attention head count, keys the
/// key/value head count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RopePermuted {
    Query,
    Key,
}

/// Where a kiln weight lives in a GGUF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GgufSource {
    /// The GGUF tensor name (for one expert of an older Mixtral file: `blk.N.ffn_gate.E.weight`).
    pub(crate) name: String,
    /// For an expert weight: the stacked 3-D tensor of newer files
    /// (`blk.N.ffn_gate_exps.weight`, shape `[experts, rows, columns]`) and the expert index.
    pub(crate) stacked_expert: Option<(String, usize)>,
    /// Whether llama's converter permuted the rows (queries or keys).
    pub(crate) rope_permuted: Option<RopePermuted>,
}

impl GgufSource {
    fn plain(name: String) -> GgufSource {
        GgufSource {
            name,
            stacked_expert: None,
            rope_permuted: None,
        }
    }
}

/// The GGUF tensor holding the kiln weight `name`, or `None` when GGUF has no equivalent.
pub(crate) fn gguf_source(name: &str) -> Option<GgufSource> {
    match name {
        "model.embed_tokens.weight" => return Some(GgufSource::plain("token_embd.weight".into())),
        "model.norm.weight" => return Some(GgufSource::plain("output_norm.weight".into())),
        "lm_head.weight" => return Some(GgufSource::plain("output.weight".into())),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let block = format!("blk.{layer}");
    let plain = |gguf: &str| Some(GgufSource::plain(format!("{block}.{gguf}")));
    match rest {
        "input_layernorm.weight" => return plain("attn_norm.weight"),
        "post_attention_layernorm.weight" => return plain("ffn_norm.weight"),
        "self_attn.q_norm.weight" => return plain("attn_q_norm.weight"),
        "self_attn.k_norm.weight" => return plain("attn_k_norm.weight"),
        "mlp.gate_proj.weight" => return plain("ffn_gate.weight"),
        "mlp.up_proj.weight" => return plain("ffn_up.weight"),
        "mlp.down_proj.weight" => return plain("ffn_down.weight"),
        "block_sparse_moe.gate.weight" => return plain("ffn_gate_inp.weight"),
        _ => {}
    }
    if let Some(projection) = rest.strip_prefix("self_attn.") {
        let (projection, suffix) = projection.split_once('.')?;
        if suffix != "weight" && suffix != "bias" {
            return None;
        }
        let (gguf, rope_permuted) = match projection {
            "q_proj" => ("attn_q", Some(RopePermuted::Query)),
            "k_proj" => ("attn_k", Some(RopePermuted::Key)),
            "v_proj" => ("attn_v", None),
            "o_proj" => ("attn_output", None),
            _ => return None,
        };
        return Some(GgufSource {
            name: format!("{block}.{gguf}.{suffix}"),
            stacked_expert: None,
            rope_permuted,
        });
    }
    // Mixtral experts: `block_sparse_moe.experts.E.w1.weight` (w1 gate, w3 up, w2 down).
    let expert = rest.strip_prefix("block_sparse_moe.experts.")?;
    let (index, matrix) = expert.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let gguf = match matrix {
        "w1.weight" => "ffn_gate",
        "w3.weight" => "ffn_up",
        "w2.weight" => "ffn_down",
        _ => return None,
    };
    Some(GgufSource {
        name: format!("{block}.{gguf}.{index}.weight"),
        stacked_expert: Some((format!("{block}.{gguf}_exps.weight"), index)),
        rope_permuted: None,
    })
}

/// The file row (llama.cpp's interleaved order) that holds Hugging Face row `row` of a
/// projection with heads of `head_rows` rows: HF row `h·hd + t·hd/2 + j` (head `h`, half `t`,
/// pair `j`) is file row `h·hd + 2j + t`.
fn interleaved_row(row: usize, head_rows: usize) -> usize {
    let half = head_rows / 2;
    let (head, within) = (row / head_rows, row % head_rows);
    let (t, j) = (within / half, within % half);
    head * head_rows + 2 * j + t
}

/// Undoes llama.cpp's Q/K permutation: `data` is a row-major `[rows, columns]` matrix (a bias
/// is `columns = 1`) in the file's interleaved row order, with `heads` heads of `rows /
/// heads` rows (`rows` a multiple of `2·heads`); the result is in Hugging Face's order.
pub(crate) fn unpermute_rope_rows(
    data: &[f32],
    rows: usize,
    columns: usize,
    heads: usize,
) -> Vec<f32> {
    let head_rows = rows / heads;
    let mut out = Vec::with_capacity(data.len());
    for row in 0..rows {
        let from = interleaved_row(row, head_rows) * columns;
        out.extend_from_slice(&data[from..from + columns]);
    }
    out
}

/// llama.cpp's Q/K permutation, the inverse of [`unpermute_rope_rows`] (used by tests).
#[cfg(test)]
pub(crate) fn permute_rope_rows(
    data: &[f32],
    rows: usize,
    columns: usize,
    heads: usize,
) -> Vec<f32> {
    let head_rows = rows / heads;
    let mut out = vec![0.0; data.len()];
    for row in 0..rows {
        let to = interleaved_row(row, head_rows) * columns;
        out[to..to + columns].copy_from_slice(&data[row * columns..(row + 1) * columns]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HF's `permute` written as its reshape/swapaxes: `[heads, 2, half, columns]` →
    /// `[heads, half, 2, columns]`.
    fn hf_permute(data: &[f32], rows: usize, columns: usize, heads: usize) -> Vec<f32> {
        let half = rows / heads / 2;
        let mut out = Vec::with_capacity(data.len());
        for h in 0..heads {
            for j in 0..half {
                for t in 0..2 {
                    let source_row = ((h * 2) + t) * half + j;
                    out.extend_from_slice(&data[source_row * columns..(source_row + 1) * columns]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_the_converters_permutation() {
        for (rows, columns, heads) in [(8, 3, 2), (64, 5, 1), (576, 2, 9), (192, 1, 3), (4, 1, 2)] {
            let data: Vec<f32> = (0..rows * columns).map(|i| i as f32).collect();
            let permuted = hf_permute(&data, rows, columns, heads);
            assert_eq!(permute_rope_rows(&data, rows, columns, heads), permuted);
            assert_eq!(unpermute_rope_rows(&permuted, rows, columns, heads), data);
            assert_eq!(
                permute_rope_rows(
                    &unpermute_rope_rows(&data, rows, columns, heads),
                    rows,
                    columns,
                    heads
                ),
                data
            );
        }
        // One head of 4 rows: HF rows [a0 a1 | b0 b1] are stored as [a0 b0 a1 b1].
        assert_eq!(
            unpermute_rope_rows(&[0.0, 2.0, 1.0, 3.0], 4, 1, 1),
            vec![0.0, 1.0, 2.0, 3.0]
        );
    }

    #[test]
    fn names_map_to_gguf() {
        let name = |n: &str| gguf_source(n).map(|s| s.name);
        assert_eq!(
            name("model.embed_tokens.weight").unwrap(),
            "token_embd.weight"
        );
        assert_eq!(name("lm_head.weight").unwrap(), "output.weight");
        assert_eq!(name("model.norm.weight").unwrap(), "output_norm.weight");
        assert_eq!(
            name("model.layers.12.post_attention_layernorm.weight").unwrap(),
            "blk.12.ffn_norm.weight"
        );
        assert_eq!(
            name("model.layers.0.self_attn.o_proj.weight").unwrap(),
            "blk.0.attn_output.weight"
        );
        assert_eq!(
            name("model.layers.0.mlp.down_proj.weight").unwrap(),
            "blk.0.ffn_down.weight"
        );
        let q = gguf_source("model.layers.1.self_attn.q_proj.bias").unwrap();
        assert_eq!(q.name, "blk.1.attn_q.bias");
        assert_eq!(q.rope_permuted, Some(RopePermuted::Query));
        let expert = gguf_source("model.layers.2.block_sparse_moe.experts.7.w2.weight").unwrap();
        assert_eq!(expert.name, "blk.2.ffn_down.7.weight");
        assert_eq!(
            expert.stacked_expert,
            Some(("blk.2.ffn_down_exps.weight".to_string(), 7))
        );
        assert!(gguf_source("model.layers.x.mlp.up_proj.weight").is_none());
        assert!(gguf_source("model.layers.0.mlp.shared_expert.up_proj.weight").is_none());
    }
}
