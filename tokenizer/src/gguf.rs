//! Tokenizers from GGUF tokenizer metadata (`tokenizer.ggml.*`), given as plain data.
//!
//! `gpt2` vocabularies are byte-level BPE: the vocabulary and merges as written, the
//! pre-tokenizer split of llama.cpp for the `pre` type (one or more regexes applied in turn,
//! each match and each gap between matches a piece), then the byte-level mapping, and the
//! byte-level decoder. `llama` vocabularies are SentencePiece: a BPE over `▁`-joined text with
//! byte fallback (`<0x41>` tokens), whose merges are the file's or, when it has none, every
//! split of a token into two tokens ranked by the whole token's score (what Hugging Face
//! `transformers` does for these files). Control tokens (type 3) become special tokens in
//! both, so `<|im_start|>` written in a prompt encodes as its one id.

use crate::{Family, Tokenizer, TokenizerError};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, NormalizerWrapper, SplitDelimiterBehavior};

/// The tokenizer metadata of a GGUF file, as plain data (the GGUF reader fills it from the
/// `tokenizer.ggml.*` and `tokenizer.chat_template` keys).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizerData {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece); anything
    /// else is [`TokenizerError::UnsupportedTokenizer`].
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer type of a `gpt2` vocabulary (`smollm`,
    /// `llama-bpe`, `qwen2`, `gpt-2`, ...). Unknown or absent: the GPT-2 split, with a warning.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: the vocabulary, in id order.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`: one per token for `llama` (ranks the merges when there are no
    /// `merges`); may be empty for `gpt2`.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges`: `"left right"` pairs in priority order (required for `gpt2`).
    pub merges: Vec<String>,
    /// `tokenizer.ggml.token_type`: one per token ([`TokenType`] values), or empty (all normal).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unknown: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub padding: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: put the BOS token before an encoded prompt.
    pub add_bos: bool,
    /// `tokenizer.ggml.add_space_prefix` (`llama` only): a `▁` before the text, as
    /// SentencePiece does (llama.cpp's default when the key is absent is `true`).
    pub add_space_prefix: bool,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

/// GGUF token types (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum TokenType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

/// The GPT-2 split (llama.cpp's `gpt-2` pre type, and what `ByteLevel` does by itself).
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's split (llama.cpp's `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's split (llama.cpp's `qwen2`): like Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regexes llama.cpp applies in turn for a `pre` type; `None` for a type kiln does not
/// know.
pub(crate) fn pre_split(pre: &str) -> Option<&'static [&'static str]> {
    Some(match pre {
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" => &[GPT2_SPLIT],
        // Single digits first, then the GPT-2 split.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            &[r"\p{N}", GPT2_SPLIT]
        }
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "pixtral" => &[LLAMA3_SPLIT],
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => &[QWEN2_SPLIT],
        _ => return None,
    })
}

pub(crate) fn build(data: &TokenizerData, origin: String) -> Result<Tokenizer, TokenizerError> {
    let invalid = |what: String| TokenizerError::InvalidData {
        origin: origin.clone(),
        what,
    };
    if data.tokens.is_empty() {
        return Err(invalid(
            "the vocabulary (tokenizer.ggml.tokens) is empty".into(),
        ));
    }
    if !data.token_types.is_empty() && data.token_types.len() != data.tokens.len() {
        return Err(invalid(format!(
            "{} token types for {} tokens",
            data.token_types.len(),
            data.tokens.len()
        )));
    }
    for (name, id) in [
        ("bos", data.bos),
        ("eos", data.eos),
        ("unknown", data.unknown),
        ("padding", data.padding),
    ] {
        if let Some(id) = id.filter(|&id| id as usize >= data.tokens.len()) {
            return Err(invalid(format!(
                "the {name} token id {id} is outside the vocabulary of {} tokens",
                data.tokens.len()
            )));
        }
    }
    let token_type = |id: usize| data.token_types.get(id).copied().unwrap_or(1);
    let mut vocab = Vocab::default();
    for (id, token) in data.tokens.iter().enumerate() {
        // A repeated token keeps its first id (the later ones can never be produced).
        if vocab.insert(token.clone(), id as u32).is_some() {
            vocab.insert(token.clone(), vocab[token].min(id as u32));
            tracing::warn!("{origin}: token {id} `{token}` repeats an earlier token");
        }
    }
    let (inner, family) = match data.model.as_str() {
        "gpt2" => (byte_level_bpe(data, vocab, &origin)?, Family::ByteLevelBpe),
        "llama" => (sentencepiece(data, vocab, &origin)?, Family::SentencePiece),
        other => {
            return Err(TokenizerError::UnsupportedTokenizer {
                origin,
                model: other.to_string(),
            })
        }
    };
    let mut inner: tokenizers::Tokenizer = inner;
    let special: Vec<AddedToken> = data
        .tokens
        .iter()
        .enumerate()
        .filter(|&(id, _)| {
            token_type(id) == TokenType::Control as i32
                || (family == Family::SentencePiece && token_type(id) == TokenType::Unknown as i32)
        })
        .map(|(_, token)| AddedToken::from(token.clone(), true))
        .collect();
    inner.add_special_tokens(&special);
    let mut tokenizer = Tokenizer::new(inner, origin, family);
    tokenizer.bos = data.bos;
    tokenizer.eos = data.eos;
    tokenizer.prepend_bos = data.bos.filter(|_| data.add_bos);
    tokenizer.chat_template = data.chat_template.clone();
    Ok(tokenizer)
}

/// The `(left, right)` pairs of `"left right"` merges; an error names the first bad one.
fn parse_merges(merges: &[String], origin: &str) -> Result<Vec<(String, String)>, TokenizerError> {
    merges
        .iter()
        .enumerate()
        .map(|(i, merge)| match merge.split_once(' ') {
            Some((l, r)) if !l.is_empty() && !r.is_empty() && !r.contains(' ') => {
                Ok((l.to_string(), r.to_string()))
            }
            _ => Err(TokenizerError::InvalidData {
                origin: origin.to_string(),
                what: format!("merge {i} `{merge}` is not two tokens separated by one space"),
            }),
        })
        .collect()
}

fn bpe_error(origin: &str, error: tokenizers::Error) -> TokenizerError {
    TokenizerError::InvalidData {
        origin: origin.to_string(),
        what: format!("the vocabulary and merges do not make a BPE model: {error}"),
    }
}

fn byte_level_bpe(
    data: &TokenizerData,
    vocab: Vocab,
    origin: &str,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    if data.merges.is_empty() {
        return Err(TokenizerError::InvalidData {
            origin: origin.to_string(),
            what: "a gpt2 tokenizer needs merges (tokenizer.ggml.merges), and there are none"
                .into(),
        });
    }
    let merges = parse_merges(&data.merges, origin)?;
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| bpe_error(origin, e))?;
    let split = match data.pre.as_deref().map(|pre| (pre, pre_split(pre))) {
        Some((_, Some(split))) => split,
        Some((pre, None)) => {
            tracing::warn!(
                "{origin}: unknown pre-tokenizer type `{pre}`; splitting text as GPT-2 does"
            );
            &[GPT2_SPLIT]
        }
        None => {
            tracing::warn!("{origin}: no pre-tokenizer type; splitting text as GPT-2 does");
            &[GPT2_SPLIT]
        }
    };
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for regex in split {
        let step = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::InvalidData {
            origin: origin.to_string(),
            what: format!("the split regex `{regex}` does not compile: {e}"),
        })?;
        steps.push(step.into());
    }
    steps.push(ByteLevel::new(false, true, false).into());
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer
        .with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)))
        .with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

fn sentencepiece(
    data: &TokenizerData,
    vocab: Vocab,
    origin: &str,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let invalid = |what: String| TokenizerError::InvalidData {
        origin: origin.to_string(),
        what,
    };
    let merges = if data.merges.is_empty() {
        if data.scores.len() != data.tokens.len() {
            return Err(invalid(format!(
                "a llama tokenizer without merges needs one score per token \
                 (tokenizer.ggml.scores): {} scores for {} tokens",
                data.scores.len(),
                data.tokens.len()
            )));
        }
        merges_from_scores(data, &vocab)
    } else {
        parse_merges(&data.merges, origin)?
    };
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unknown) = data.unknown {
        builder = builder.unk_token(data.tokens[unknown as usize].clone());
    }
    let model = builder.build().map_err(|e| bpe_error(origin, e))?;
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| invalid(format!("replacing `{from}`: {e}")))
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if data.add_space_prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(replace(" ", "▁")?.into());
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if data.add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// SentencePiece merges from scores: every split of a normal token into two tokens, ranked by
/// the whole token's score (highest first; ties by the halves' ids), as `transformers` derives
/// them. Control, byte and unknown tokens are never merge results.
fn merges_from_scores(data: &TokenizerData, vocab: &Vocab) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
    let ids: HashMap<&str, u32> = vocab.iter().map(|(t, &id)| (t.as_str(), id)).collect();
    for (id, token) in data.tokens.iter().enumerate() {
        let kind = data.token_types.get(id).copied().unwrap_or(1);
        if kind != TokenType::Normal as i32 && kind != TokenType::UserDefined as i32 {
            continue;
        }
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                ranked.push((data.scores[id], l, r, left, right));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    ranked
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}
