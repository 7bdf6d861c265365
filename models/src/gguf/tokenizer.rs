//! The tokenizer metadata of a GGUF file as plain data.
//!
//! llama.cpp stores the tokenizer under `tokenizer.ggml.*` (and the chat template under
//! `tokenizer.chat_template`). This file only reads and checks those keys into
//! [`GgufTokenizerData`]; building a tokenizer from them is someone else's job.

use super::reader::bad_metadata;
use super::{GgufError, GgufFile, MetadataValue};

/// The tokenizer as a GGUF file describes it. Token ids index `vocab`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct GgufTokenizerData {
    /// `tokenizer.ggml.model`: the tokenizer kind, `gpt2` (byte-level BPE), `llama`
    /// (SentencePiece), …
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer name (`llama-bpe`, `qwen2`, `smollm`, …).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: every token's text, by id.
    pub vocab: Vec<String>,
    /// `tokenizer.ggml.scores`: SentencePiece scores by id, when present.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: llama.cpp's token types by id (1 normal, 2 unknown,
    /// 3 control, 4 user-defined, 5 unused, 6 byte), when present.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: BPE merges, each `"left right"`, highest priority first;
    /// empty when absent.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unknown_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub padding_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: whether to prepend BOS.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`: whether to append EOS.
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`: whether SentencePiece adds a leading space.
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`: the Jinja chat template.
    pub chat_template: Option<String>,
}

/// Reads the tokenizer keys; `tokenizer.ggml.model` and `tokenizer.ggml.tokens` are required,
/// list lengths must match the vocabulary and special ids must be in it.
pub(crate) fn tokenizer_data(file: &GgufFile) -> Result<GgufTokenizerData, GgufError> {
    let get = |key: &str| file.metadata_value(key);
    let wrong = |key: &str, expected: &str, found: &MetadataValue| {
        bad_metadata(
            file.path(),
            key,
            format!("expected {expected}, found {}", found.type_name()),
        )
    };
    let missing = |key: &str| GgufError::MissingKey {
        path: file.path().to_path_buf(),
        key: key.to_string(),
        requirement: "required for the tokenizer".to_string(),
    };
    let string = |key: &str| -> Result<Option<String>, GgufError> {
        match get(key) {
            None => Ok(None),
            Some(MetadataValue::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(wrong(key, "a string", other)),
        }
    };
    let boolean = |key: &str| -> Result<Option<bool>, GgufError> {
        match get(key) {
            None => Ok(None),
            Some(MetadataValue::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong(key, "a bool", other)),
        }
    };
    let strings = |key: &str| -> Result<Option<Vec<String>>, GgufError> {
        let Some(value) = get(key) else {
            return Ok(None);
        };
        let items = value
            .as_array()
            .ok_or_else(|| wrong(key, "an array of strings", value))?;
        items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| wrong(key, "an array of strings", item))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    };

    let model = string("tokenizer.ggml.model")?.ok_or_else(|| missing("tokenizer.ggml.model"))?;
    let vocab =
        strings("tokenizer.ggml.tokens")?.ok_or_else(|| missing("tokenizer.ggml.tokens"))?;
    let by_token = |key: &str, items: &[MetadataValue]| -> Result<(), GgufError> {
        if items.len() != vocab.len() {
            return Err(bad_metadata(
                file.path(),
                key,
                format!(
                    "has {} entries, but `tokenizer.ggml.tokens` has {}",
                    items.len(),
                    vocab.len()
                ),
            ));
        }
        Ok(())
    };
    let scores = match get("tokenizer.ggml.scores") {
        None => None,
        Some(value) => {
            let items = value
                .as_array()
                .ok_or_else(|| wrong("tokenizer.ggml.scores", "an array of f32", value))?;
            by_token("tokenizer.ggml.scores", items)?;
            Some(
                items
                    .iter()
                    .map(|item| match item {
                        MetadataValue::F32(v) => Ok(*v),
                        other => Err(wrong("tokenizer.ggml.scores", "an array of f32", other)),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            )
        }
    };
    let token_types = match get("tokenizer.ggml.token_type") {
        None => None,
        Some(value) => {
            let key = "tokenizer.ggml.token_type";
            let items = value
                .as_array()
                .ok_or_else(|| wrong(key, "an array of i32", value))?;
            by_token(key, items)?;
            Some(
                items
                    .iter()
                    .map(|item| match item {
                        MetadataValue::I32(v) => Ok(*v),
                        other => Err(wrong(key, "an array of i32", other)),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            )
        }
    };
    let merges = strings("tokenizer.ggml.merges")?.unwrap_or_default();
    let token_id = |key: &str| -> Result<Option<u32>, GgufError> {
        let Some(value) = get(key) else {
            return Ok(None);
        };
        let id = value
            .as_u64()
            .ok_or_else(|| wrong(key, "a token id", value))?;
        if id >= vocab.len() as u64 {
            return Err(bad_metadata(
                file.path(),
                key,
                format!("token id {id} is outside the vocabulary of {}", vocab.len()),
            ));
        }
        Ok(Some(id as u32))
    };
    Ok(GgufTokenizerData {
        pre: string("tokenizer.ggml.pre")?,
        scores,
        token_types,
        merges,
        bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: token_id("tokenizer.ggml.eos_token_id")?,
        unknown_token_id: token_id("tokenizer.ggml.unknown_token_id")?,
        padding_token_id: token_id("tokenizer.ggml.padding_token_id")?,
        add_bos: boolean("tokenizer.ggml.add_bos_token")?,
        add_eos: boolean("tokenizer.ggml.add_eos_token")?,
        add_space_prefix: boolean("tokenizer.ggml.add_space_prefix")?,
        chat_template: string("tokenizer.chat_template")?,
        model,
        vocab,
    })
}
