//! # kiln-tokenizer — text in, text out
//!
//! Turns prompts into token ids and generated ids back into text, on the Hugging Face
//! `tokenizers` crate (built without C or C++ dependencies: its `fancy-regex` backend).
//!
//! A [`Tokenizer`] comes from one of two places:
//! - [`Tokenizer::from_file`]: a Hugging Face `tokenizer.json`, with the `tokenizer_config.json`
//!   (chat template, BOS and EOS tokens) and `generation_config.json` (EOS ids) beside it when
//!   present;
//! - [`Tokenizer::from_gguf_data`]: the tokenizer metadata of a GGUF file given as plain data
//!   ([`TokenizerData`]; reading the file is the GGUF reader's job, not this crate's). Byte-level
//!   BPE (`gpt2`) vocabularies get the pre-tokenizer split of llama.cpp for their `pre` type;
//!   SentencePiece (`llama`) vocabularies become a BPE with byte fallback, their merges derived
//!   from the token scores when the file has none.
//!
//! It also renders chat templates ([`chat`]: the model's Jinja template through `minijinja`, or
//! a built-in ChatML, Llama-3 or Llama-2 form) and decodes generated ids incrementally
//! ([`TextStream`]) so that a multi-byte character split across tokens is never printed in
//! halves. It must not know about model graphs, weights or devices.

pub mod chat;
mod gguf;
mod stream;

pub use chat::ChatMessage;
pub use gguf::{TokenType, TokenizerData};
pub use stream::TextStream;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What can go wrong reading a tokenizer or using it. Every message names where the tokenizer
/// came from (a file path, or a description of the GGUF file).
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("reading {path}: {error}")]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    /// A `tokenizer.json` the `tokenizers` library cannot load.
    #[error("{path} is not a tokenizer.json that can be loaded: {message}")]
    Parse { path: PathBuf, message: String },
    /// A `tokenizer_config.json` or `generation_config.json` that is not the expected JSON.
    #[error("{path} is not valid JSON: {error}")]
    Config {
        path: PathBuf,
        #[source]
        error: serde_json::Error,
    },
    /// A tokenizer model kiln does not build (GGUF `tokenizer.ggml.model`).
    #[error(
        "{origin}: unsupported tokenizer model `{model}` (kiln builds `gpt2`, byte-level BPE, \
         and `llama`, SentencePiece)"
    )]
    UnsupportedTokenizer { origin: String, model: String },
    /// Tokenizer data that does not describe a usable tokenizer.
    #[error("{origin}: {what}")]
    InvalidData { origin: String, what: String },
    /// The tokenizer has ids the model has no embedding for.
    #[error(
        "{origin}: the tokenizer has {tokenizer} tokens but the model's vocab_size is {model}; \
         they must belong to the same model"
    )]
    VocabSizeMismatch {
        origin: String,
        tokenizer: usize,
        model: usize,
    },
    /// Encoding or decoding failed inside the `tokenizers` library.
    #[error("{origin}: {action}: {message}")]
    Tokenize {
        origin: String,
        action: &'static str,
        message: String,
    },
    /// A chat template that does not render.
    #[error("{origin}: the chat template does not render: {message}")]
    ChatTemplate { origin: String, message: String },
    /// No chat template, and no built-in form fits the vocabulary.
    #[error(
        "{origin} has no chat template and its vocabulary fits none of the built-in forms \
         (ChatML, Llama-3, Llama-2)"
    )]
    NoChatTemplate { origin: String },
}

/// The names of end-of-turn tokens that stop generation when the vocabulary has them as
/// special tokens (besides the EOS token).
pub const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
];

/// Which tokenizer family a [`Tokenizer`] is, for choosing a built-in chat template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// A Hugging Face `tokenizer.json`.
    HuggingFace,
    /// GGUF `gpt2`: byte-level BPE.
    ByteLevelBpe,
    /// GGUF `llama`: SentencePiece.
    SentencePiece,
}

/// A tokenizer: encoding, decoding, special tokens and the chat template.
#[derive(Clone)]
pub struct Tokenizer {
    pub(crate) inner: tokenizers::Tokenizer,
    /// Where it came from (a path, or the GGUF file's description), for messages.
    pub(crate) origin: String,
    pub(crate) family: Family,
    /// The BOS token to put before an encoded prompt (GGUF `add_bos`); a Hugging Face
    /// tokenizer's post-processor adds its own.
    pub(crate) prepend_bos: Option<u32>,
    pub(crate) bos: Option<u32>,
    pub(crate) eos: Option<u32>,
    pub(crate) extra_eos: Vec<u32>,
    pub(crate) chat_template: Option<String>,
    /// One more than the largest id.
    pub(crate) id_count: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("family", &self.family)
            .field("tokens", &self.id_count)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`. When the directory holding it has a
    /// `tokenizer_config.json`, its `chat_template`, `bos_token` and `eos_token` are read too,
    /// and a `generation_config.json`'s `eos_token_id` (one id or a list) adds stop tokens.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| TokenizerError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        let inner: tokenizers::Tokenizer =
            text.parse()
                .map_err(|e: tokenizers::Error| TokenizerError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
        let directory = path.parent().unwrap_or(Path::new("."));
        let config = read_json(&directory.join("tokenizer_config.json"))?;
        let generation = read_json(&directory.join("generation_config.json"))?;
        let mut tokenizer = Tokenizer::new(inner, path.display().to_string(), Family::HuggingFace);
        if let Some(config) = &config {
            let token = |key: &str| special_token_name(config.get(key)?);
            tokenizer.bos = token("bos_token").and_then(|t| tokenizer.inner.token_to_id(&t));
            tokenizer.eos = token("eos_token").and_then(|t| tokenizer.inner.token_to_id(&t));
            tokenizer.chat_template = config.get("chat_template").and_then(chat_template_text);
        }
        if let Some(ids) = generation.as_ref().and_then(|g| g.get("eos_token_id")) {
            let ids: Vec<u32> = match ids {
                serde_json::Value::Array(list) => list.iter().filter_map(json_id).collect(),
                one => json_id(one).into_iter().collect(),
            };
            if tokenizer.eos.is_none() {
                tokenizer.eos = ids.first().copied();
            }
            tokenizer.extra_eos.extend(ids);
        }
        Ok(tokenizer)
    }

    /// Builds a tokenizer from a GGUF file's tokenizer metadata; `origin` names the file in
    /// messages. See [`TokenizerData`] for what each field means and what is supported.
    pub fn from_gguf_data(
        data: &TokenizerData,
        origin: impl Into<String>,
    ) -> Result<Tokenizer, TokenizerError> {
        gguf::build(data, origin.into())
    }

    pub(crate) fn new(inner: tokenizers::Tokenizer, origin: String, family: Family) -> Tokenizer {
        let id_count = inner
            .get_vocab(true)
            .values()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0);
        Tokenizer {
            inner,
            origin,
            family,
            prepend_bos: None,
            bos: None,
            eos: None,
            extra_eos: Vec::new(),
            chat_template: None,
            id_count,
        }
    }

    /// Where the tokenizer came from, for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The tokenizer's family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// How many ids the tokenizer uses: one more than its largest id, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.id_count
    }

    /// Checks the tokenizer against a model's `vocab_size`: every id the tokenizer produces
    /// must have an embedding row. A model may have more rows than tokens (checkpoints pad
    /// their embeddings to a multiple of 64 or 128), never fewer.
    pub fn check_vocab_size(&self, model_vocab_size: usize) -> Result<(), TokenizerError> {
        if self.id_count > model_vocab_size {
            return Err(TokenizerError::VocabSizeMismatch {
                origin: self.origin.clone(),
                tokenizer: self.id_count,
                model: model_vocab_size,
            });
        }
        Ok(())
    }

    /// The BOS token id, when the tokenizer names one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The EOS token id, when the tokenizer names one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The text of token `id` as the vocabulary spells it (`None` outside the vocabulary).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token as the vocabulary spells it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The ids that end generation: the EOS token, the `eos_token_id`s of a
    /// `generation_config.json`, and the special tokens among [`END_OF_TURN_TOKENS`]
    /// (`<|im_end|>`, `<|eot_id|>`, ...). Sorted, without repeats.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut stop: BTreeSet<u32> = self.eos.into_iter().collect();
        stop.extend(&self.extra_eos);
        let special = self.inner.get_added_tokens_decoder();
        for (&id, token) in &special {
            if token.special && END_OF_TURN_TOKENS.contains(&token.content.as_str()) {
                stop.insert(id);
            }
        }
        stop.into_iter().collect()
    }

    /// Encodes `text`. With `add_special_tokens` the tokenizer adds what it adds to a whole
    /// prompt (a BOS token, for most); a rendered chat template already holds its own, so it
    /// is encoded without. Special tokens written in the text (`<|im_start|>`) encode as their
    /// single ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.error("encoding text", e))?;
        let mut ids = encoding.get_ids().to_vec();
        if let (true, Some(bos)) = (add_special_tokens, self.prepend_bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Decodes `ids` to text, leaving special tokens out when `skip_special_tokens`. Ids
    /// outside the vocabulary decode to nothing.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error("decoding ids", e))
    }

    /// A decoder for ids arriving one by one (see [`TextStream`]).
    pub fn stream(&self) -> TextStream<'_> {
        TextStream::new(self)
    }

    /// The chat template the model ships (Jinja), when it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Sets the chat template (for a template read from elsewhere).
    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }

    pub(crate) fn error(&self, action: &'static str, error: tokenizers::Error) -> TokenizerError {
        TokenizerError::Tokenize {
            origin: self.origin.clone(),
            action,
            message: error.to_string(),
        }
    }
}

/// Reads a JSON file if it exists.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                error,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|error| TokenizerError::Config {
            path: path.to_path_buf(),
            error,
        })
}

/// A `tokenizer_config.json` special token: a string, or an object with its `content`.
fn special_token_name(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A `chat_template` entry: the template text, or a list of named templates (the `default`
/// one, else the first).
fn chat_template_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => {
            let named = |want: Option<&str>| {
                list.iter().find_map(|entry| {
                    let name = entry.get("name")?.as_str()?;
                    if want.is_some_and(|w| w != name) {
                        return None;
                    }
                    Some(entry.get("template")?.as_str()?.to_string())
                })
            };
            named(Some("default")).or_else(|| named(None))
        }
        _ => None,
    }
}

fn json_id(value: &serde_json::Value) -> Option<u32> {
    value.as_u64().and_then(|id| u32::try_from(id).ok())
}
