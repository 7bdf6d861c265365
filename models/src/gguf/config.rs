//! GGUF metadata → [`ModelConfig`].
//!
//! Keys read (`{arch}` is `general.architecture`): `{arch}.embedding_length`,
//! `{arch}.block_count`, `{arch}.feed_forward_length`, `{arch}.attention.head_count`,
//! `{arch}.attention.layer_norm_rms_epsilon` (all required); `{arch}.attention.head_count_kv`
//! (default: the head count), `{arch}.attention.key_length` / `value_length` (default:
//! embedding / heads), `{arch}.rope.dimension_count` (must equal the head width when given),
//! `{arch}.rope.freq_base` (default 10000), `{arch}.context_length` (default 4096),
//! `{arch}.vocab_size` (must agree with `token_embd.weight` when given), and for experts
//! `{arch}.expert_count`, `{arch}.expert_used_count`, `{arch}.expert_feed_forward_length`.
//!
//! Rules the metadata does not state directly:
//! - the vocabulary size is the row count of `token_embd.weight`;
//! - embeddings are tied when there is no `output.weight`;
//! - `llama` with `expert_count > 0` is Mixtral (every layer MoE, top-k renormalised);
//! - q/k/v biases: always for `qwen2`, for `llama` when `blk.0.attn_q.bias` exists;
//! - the dtype is f32 when the embedding and the layer-0 matrices are all F32, bf16 when
//!   any is BF16, else f16 (F16 and the quantized types, whose scales are f16);
//! - RoPE scaling (`{arch}.rope.scaling.type` other than `none`, or a `rope_freqs.weight`
//!   tensor) is unsupported, as it is for `config.json`.

use super::reader::bad_metadata;
use super::{GgmlType, GgufError, GgufFile, MetadataValue};
use crate::config::{Architecture, ModelConfig, MoeConfig};
use kiln_ir::dtype::DType;

/// `general.architecture`.
pub(crate) fn architecture_name(file: &GgufFile) -> Result<&str, GgufError> {
    let key = "general.architecture";
    match file.metadata_value(key) {
        Some(MetadataValue::String(name)) => Ok(name),
        Some(other) => Err(wrong_type(file, key, "a string", other)),
        None => Err(missing(file, key, "names the model family")),
    }
}

/// A required non-negative integer.
pub(crate) fn required_count(file: &GgufFile, key: &str) -> Result<usize, GgufError> {
    optional_count(file, key)?.ok_or_else(|| missing(file, key, "required for the model's shape"))
}

/// An optional non-negative integer.
pub(crate) fn optional_count(file: &GgufFile, key: &str) -> Result<Option<usize>, GgufError> {
    match file.metadata_value(key) {
        None => Ok(None),
        Some(value) => value
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| wrong_type(file, key, "a non-negative integer", value)),
    }
}

fn optional_float(file: &GgufFile, key: &str) -> Result<Option<f32>, GgufError> {
    match file.metadata_value(key) {
        None => Ok(None),
        Some(value) => value
            .as_f64()
            .map(|v| Some(v as f32))
            .ok_or_else(|| wrong_type(file, key, "a number", value)),
    }
}

fn wrong_type(file: &GgufFile, key: &str, expected: &str, found: &MetadataValue) -> GgufError {
    let shown = match found {
        MetadataValue::Array(items) => format!("an array of {} elements", items.len()),
        MetadataValue::String(s) => format!("string {s:?}"),
        other => format!("{} {other:?}", other.type_name()),
    };
    bad_metadata(
        file.path(),
        key,
        format!("expected {expected}, found {shown}"),
    )
}

fn missing(file: &GgufFile, key: &str, requirement: &str) -> GgufError {
    GgufError::MissingKey {
        path: file.path().to_path_buf(),
        key: key.to_string(),
        requirement: requirement.to_string(),
    }
}

fn unsupported(file: &GgufFile, message: String) -> GgufError {
    GgufError::Unsupported {
        path: file.path().to_path_buf(),
        message,
    }
}

/// The configuration the file's metadata describes (see the module docs).
pub(crate) fn model_config(file: &GgufFile) -> Result<ModelConfig, GgufError> {
    let arch = architecture_name(file)?.to_string();
    let key = |suffix: &str| format!("{arch}.{suffix}");
    let expert_count = optional_count(file, &key("expert_count"))?.unwrap_or(0);
    let architecture = match (arch.as_str(), expert_count) {
        ("llama", 0) => Architecture::Llama,
        ("llama", _) => Architecture::Mixtral,
        ("qwen2", 0) => Architecture::Qwen2,
        ("qwen2", _) => {
            return Err(unsupported(
                file,
                format!(
                    "architecture qwen2 with `{}` = {expert_count}",
                    key("expert_count")
                ),
            ))
        }
        _ => {
            return Err(GgufError::UnsupportedArchitecture {
                path: file.path().to_path_buf(),
                architecture: arch,
            })
        }
    };

    let hidden_size = required_count(file, &key("embedding_length"))?;
    let num_layers = required_count(file, &key("block_count"))?;
    let intermediate_size = required_count(file, &key("feed_forward_length"))?;
    let heads_key = key("attention.head_count");
    let num_attention_heads = required_count(file, &heads_key)?;
    if num_attention_heads == 0 {
        return Err(bad_metadata(
            file.path(),
            &heads_key,
            "expected a positive integer, found 0".into(),
        ));
    }
    let num_kv_heads =
        optional_count(file, &key("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
    let head_dim = match optional_count(file, &key("attention.key_length"))? {
        Some(width) => width,
        None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
        None => {
            return Err(bad_metadata(
                file.path(),
                &heads_key,
                format!(
                    "{num_attention_heads} heads do not divide `{}` ({hidden_size}) and there \
                     is no `{}` to give the head width",
                    key("embedding_length"),
                    key("attention.key_length")
                ),
            ))
        }
    };
    if let Some(value_width) = optional_count(file, &key("attention.value_length"))? {
        if value_width != head_dim {
            return Err(unsupported(
                file,
                format!(
                    "value heads of width {value_width} (`{}`) differ from key heads of width \
                     {head_dim}",
                    key("attention.value_length")
                ),
            ));
        }
    }
    if let Some(rotary) = optional_count(file, &key("rope.dimension_count"))? {
        if rotary != head_dim {
            return Err(unsupported(
                file,
                format!(
                    "partial rotary embedding: `{}` is {rotary}, the head width is {head_dim}",
                    key("rope.dimension_count")
                ),
            ));
        }
    }
    check_plain_rope(file, &arch)?;

    let eps_key = key("attention.layer_norm_rms_epsilon");
    let rms_norm_eps = optional_float(file, &eps_key)?
        .ok_or_else(|| missing(file, &eps_key, "the RMSNorm epsilon"))?;
    let rope_theta = optional_float(file, &key("rope.freq_base"))?.unwrap_or(10000.0);
    let max_position_embeddings = optional_count(file, &key("context_length"))?.unwrap_or(4096);

    let embedding = file
        .tensor("token_embd.weight")
        .ok_or_else(|| GgufError::MissingTensor {
            path: file.path().to_path_buf(),
            name: "model.embed_tokens.weight".into(),
            message: "looked for GGUF tensor `token_embd.weight` (the vocabulary size is its row \
                  count)"
                .into(),
        })?;
    if embedding.shape.len() != 2 {
        return Err(GgufError::ShapeMismatch {
            path: file.path().to_path_buf(),
            name: "model.embed_tokens.weight".into(),
            gguf_name: embedding.name.clone(),
            expected: vec![0, hidden_size],
            found: embedding.shape.clone(),
        });
    }
    let vocab_size = embedding.shape[0];
    if let Some(listed) = optional_count(file, &key("vocab_size"))? {
        if listed != vocab_size {
            return Err(bad_metadata(
                file.path(),
                &key("vocab_size"),
                format!("is {listed}, but `token_embd.weight` has {vocab_size} rows"),
            ));
        }
    }
    let tie_word_embeddings = file.tensor("output.weight").is_none();
    let attention_bias =
        architecture == Architecture::Qwen2 || file.tensor("blk.0.attn_q.bias").is_some();

    let moe = if architecture == Architecture::Mixtral {
        let top_k = required_count(file, &key("expert_used_count"))?;
        let expert_intermediate_size =
            optional_count(file, &key("expert_feed_forward_length"))?.unwrap_or(intermediate_size);
        Some(MoeConfig {
            num_experts: expert_count,
            top_k,
            expert_intermediate_size,
            normalize_top_k: true,
            shared_expert_intermediate_size: None,
            sparse_step: 1,
            dense_layers: Vec::new(),
        })
    } else {
        None
    };

    let config = ModelConfig {
        name: file.path().display().to_string(),
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_attention_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        max_position_embeddings,
        tie_word_embeddings,
        attention_bias,
        qk_norm: false,
        sliding_window: None,
        dtype: weights_dtype(file),
        moe,
    };
    config.validate()?;
    Ok(config)
}

/// Refuses RoPE scaling, which kiln does not implement.
fn check_plain_rope(file: &GgufFile, arch: &str) -> Result<(), GgufError> {
    let key = format!("{arch}.rope.scaling.type");
    match file.metadata_value(&key) {
        None => {}
        Some(MetadataValue::String(kind)) if kind == "none" => {}
        Some(MetadataValue::String(kind)) => {
            return Err(unsupported(
                file,
                format!("RoPE scaling `{key}` = {kind:?} (kiln implements plain RoPE)"),
            ))
        }
        Some(other) => return Err(wrong_type(file, &key, "a string", other)),
    }
    if file.tensor("rope_freqs.weight").is_some() {
        return Err(unsupported(
            file,
            "RoPE frequency scaling (tensor `rope_freqs.weight`, as in Llama 3.1) (kiln \
             implements plain RoPE)"
                .into(),
        ));
    }
    Ok(())
}

/// The dtype the model runs in by default (see the module docs).
fn weights_dtype(file: &GgufFile) -> DType {
    let matrices = file.tensors().iter().filter(|info| {
        info.name == "token_embd.weight"
            || (info.name.starts_with("blk.0.") && info.shape.len() >= 2)
    });
    let mut all_f32 = true;
    for info in matrices {
        match info.ggml_type() {
            GgmlType::BF16 => return DType::BF16,
            GgmlType::F32 => {}
            _ => all_f32 = false,
        }
    }
    if all_f32 {
        DType::F32
    } else {
        DType::F16
    }
}
