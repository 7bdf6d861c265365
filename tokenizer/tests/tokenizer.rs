//! Tokenizers built from hand-made vocabularies, with expected ids worked out by hand from
//! the BPE rules (the lowest-ranked merge of adjacent pieces applies first), the byte-level
//! mapping and the pre-tokenizer splits.

use kiln_tokenizer::chat::{render, Builtin};
use kiln_tokenizer::{ChatMessage, Tokenizer, TokenizerData, TokenizerError};
use std::path::Path;

/// GPT-2's byte-to-character map, written out independently of the `tokenizers` crate:
/// printable Latin-1 bytes map to themselves, the rest to U+0100 onward in byte order.
fn byte_char(byte: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(byte) {
        return byte as char;
    }
    let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + rank).unwrap()
}

/// Ids 0-2 are control tokens, 3 + b is byte b, then one token per merge.
const MERGES: &[&str] = &[
    "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "1 2", "3 4",
];

/// The id of byte `b` in [`byte_level_data`].
fn byte(b: u8) -> u32 {
    3 + b as u32
}

fn byte_level_data(pre: Option<&str>) -> TokenizerData {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    tokens.extend((0..=255u8).map(|b| byte_char(b).to_string()));
    tokens.extend(MERGES.iter().map(|m| m.replace(' ', "")));
    let mut token_types = vec![1; tokens.len()];
    token_types[..3].fill(3);
    TokenizerData {
        model: "gpt2".into(),
        pre: pre.map(String::from),
        tokens,
        merges: MERGES.iter().map(|m| m.to_string()).collect(),
        token_types,
        bos: Some(1),
        eos: Some(2),
        unknown: None,
        padding: Some(0),
        ..TokenizerData::default()
    }
}

fn byte_level(pre: Option<&str>) -> Tokenizer {
    Tokenizer::from_gguf_data(&byte_level_data(pre), "tiny.gguf").unwrap()
}

// Merge ids: he 259, ll 260, hell 261, hello 262, Ġw 263, or 264, Ġwor 265, 12 266, 34 267.

#[test]
fn byte_level_bpe_applies_merges_by_rank() {
    let t = byte_level(Some("gpt-2"));
    assert_eq!(t.vocab_size(), 268);
    // "hello" | " world": he, ll, hell, hello; Ġw, or, Ġwor, then l and d stay bytes.
    let ids = t.encode("hello world", true).unwrap();
    assert_eq!(ids, vec![262, 265, byte(b'l'), byte(b'd')]);
    assert_eq!(t.decode(&ids, false).unwrap(), "hello world");
    // A byte that is not printable goes through the byte-level map: "\n" is byte 10.
    assert_eq!(t.encode("\n", true).unwrap(), vec![byte(b'\n')]);
}

#[test]
fn pre_type_picks_the_digit_split() {
    // GPT-2 keeps "1234" in one piece: 1 2 -> 12, 3 4 -> 34.
    assert_eq!(
        byte_level(Some("gpt-2")).encode("1234", true).unwrap(),
        vec![266, 267]
    );
    // SmolLM splits every digit apart first: no merge applies.
    let digits: Vec<u32> = b"1234".iter().map(|&b| byte(b)).collect();
    assert_eq!(
        byte_level(Some("smollm")).encode("1234", true).unwrap(),
        digits
    );
    // Llama 3 splits digits in threes: "123" | "4".
    assert_eq!(
        byte_level(Some("llama-bpe")).encode("1234", true).unwrap(),
        vec![266, byte(b'3'), byte(b'4')]
    );
    // An unknown type, or none, falls back to GPT-2's split.
    assert_eq!(
        byte_level(Some("no-such-pre"))
            .encode("1234", true)
            .unwrap(),
        vec![266, 267]
    );
    assert_eq!(
        byte_level(None).encode("1234", true).unwrap(),
        vec![266, 267]
    );
}

#[test]
fn control_tokens_encode_as_single_ids_and_stop_generation() {
    let t = byte_level(Some("smollm"));
    let ids = t.encode("<|im_start|>user<|im_end|>", false).unwrap();
    let user: Vec<u32> = b"user".iter().map(|&b| byte(b)).collect();
    assert_eq!(ids, [vec![1], user, vec![2]].concat());
    assert_eq!(t.decode(&ids, true).unwrap(), "user");
    assert_eq!(t.decode(&ids, false).unwrap(), "<|im_start|>user<|im_end|>");
    // EOS (2) and <|endoftext|> (0), a control token named as an end of turn.
    assert_eq!(t.stop_tokens(), vec![0, 2]);
    assert_eq!((t.bos(), t.eos()), (Some(1), Some(2)));
}

#[test]
fn add_bos_prepends_the_bos_token_to_prompts_only() {
    let mut data = byte_level_data(Some("gpt-2"));
    data.add_bos = true;
    let t = Tokenizer::from_gguf_data(&data, "tiny.gguf").unwrap();
    assert_eq!(t.encode("hello", true).unwrap(), vec![1, 262]);
    assert_eq!(t.encode("hello", false).unwrap(), vec![262]);
}

#[test]
fn stream_holds_back_a_split_character() {
    let t = byte_level(Some("gpt-2"));
    // "é" is C3 A9, two byte tokens; "🦀" is four.
    let mut stream = t.stream();
    assert_eq!(stream.push(262).unwrap(), "hello");
    assert_eq!(stream.push(byte(b' ')).unwrap(), " ");
    assert_eq!(stream.push(byte(0xC3)).unwrap(), "");
    assert_eq!(stream.push(byte(0xA9)).unwrap(), "é");
    let crab = "🦀".as_bytes();
    for &b in &crab[..3] {
        assert_eq!(stream.push(byte(b)).unwrap(), "");
    }
    assert_eq!(stream.push(byte(crab[3])).unwrap(), "🦀");
    assert_eq!(stream.push(2).unwrap(), "", "special tokens print nothing");
    assert_eq!(stream.push(byte(0xE4)).unwrap(), "");
    assert_eq!(
        stream.finish().unwrap(),
        "\u{FFFD}",
        "an unfinished character at the end"
    );
}

#[test]
fn stream_over_many_tokens_matches_a_whole_decode() {
    let t = byte_level(Some("gpt-2"));
    let text = "hello world, naïve 世界 1234 🦀🦀 hello";
    let ids = t.encode(text, false).unwrap();
    assert!(ids.len() > 20);
    let mut stream = t.stream();
    let mut out = String::new();
    for &id in &ids {
        out.push_str(&stream.push(id).unwrap());
    }
    out.push_str(&stream.finish().unwrap());
    assert_eq!(out, text);
}

#[test]
fn bad_gguf_data_is_a_clear_error() {
    let mut data = byte_level_data(Some("gpt-2"));
    data.model = "bert".into();
    let error = Tokenizer::from_gguf_data(&data, "tiny.gguf").unwrap_err();
    assert!(matches!(error, TokenizerError::UnsupportedTokenizer { .. }));
    let message = error.to_string();
    assert!(
        message.contains("tiny.gguf") && message.contains("`bert`"),
        "{message}"
    );

    let mut data = byte_level_data(Some("gpt-2"));
    data.merges[3] = "hello".into();
    let message = Tokenizer::from_gguf_data(&data, "tiny.gguf")
        .unwrap_err()
        .to_string();
    assert!(message.contains("merge 3 `hello`"), "{message}");

    let mut data = byte_level_data(Some("gpt-2"));
    data.merges.push("zz q".into());
    let message = Tokenizer::from_gguf_data(&data, "tiny.gguf")
        .unwrap_err()
        .to_string();
    assert!(message.contains("zz"), "{message}");

    let mut data = byte_level_data(Some("gpt-2"));
    data.eos = Some(5000);
    let message = Tokenizer::from_gguf_data(&data, "tiny.gguf")
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("eos token id 5000") && message.contains("268"),
        "{message}"
    );

    let mut data = byte_level_data(Some("gpt-2"));
    data.token_types.pop();
    assert!(Tokenizer::from_gguf_data(&data, "tiny.gguf").is_err());
    data.merges.clear();
    data.token_types.clear();
    let message = Tokenizer::from_gguf_data(&data, "tiny.gguf")
        .unwrap_err()
        .to_string();
    assert!(message.contains("merges"), "{message}");
}

#[test]
fn vocab_size_must_fit_the_model() {
    let t = byte_level(Some("gpt-2"));
    t.check_vocab_size(268).unwrap();
    t.check_vocab_size(320).unwrap();
    let error = t.check_vocab_size(200).unwrap_err();
    assert!(matches!(
        error,
        TokenizerError::VocabSizeMismatch {
            tokenizer: 268,
            model: 200,
            ..
        }
    ));
    let message = error.to_string();
    assert!(
        message.contains("268") && message.contains("200"),
        "{message}"
    );
}

/// A SentencePiece vocabulary: <unk>, <s>, </s>, 256 byte tokens, then pieces with scores.
fn sentencepiece_data() -> TokenizerData {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut token_types = vec![2, 3, 3];
    let mut scores = vec![0.0; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        token_types.push(6);
        scores.push(0.0);
    }
    // (piece, score): higher scores merge first.
    let pieces = [
        ("▁", -10.0),
        ("h", -10.0),
        ("e", -10.0),
        ("l", -10.0),
        ("o", -10.0),
        ("w", -10.0),
        ("ll", -1.0),
        ("▁h", -2.0),
        ("▁he", -3.0),
        ("▁hell", -4.0),
        ("▁hello", -5.0),
    ];
    for (piece, score) in pieces {
        tokens.push(piece.into());
        token_types.push(1);
        scores.push(score);
    }
    TokenizerData {
        model: "llama".into(),
        tokens,
        scores,
        token_types,
        bos: Some(1),
        eos: Some(2),
        unknown: Some(0),
        add_bos: true,
        add_space_prefix: true,
        ..TokenizerData::default()
    }
}

#[test]
fn sentencepiece_merges_by_score_with_byte_fallback() {
    let t = Tokenizer::from_gguf_data(&sentencepiece_data(), "spm.gguf").unwrap();
    // Ids: ▁ 259, h 260, e 261, l 262, o 263, w 264, ll 265, ▁h 266, ▁he 267, ▁hell 268,
    // ▁hello 269. "hello" -> "▁hello": ll, ▁h, ▁he, ▁hell, ▁hello.
    assert_eq!(t.encode("hello", true).unwrap(), vec![1, 269]);
    assert_eq!(t.encode("hello w", false).unwrap(), vec![269, 259, 264]);
    // "é" is not a piece: its UTF-8 bytes C3 A9 fall back to byte tokens.
    let ids = t.encode("hello é", false).unwrap();
    assert_eq!(ids, vec![269, 259, 3 + 0xC3, 3 + 0xA9]);
    assert_eq!(t.decode(&ids, true).unwrap(), "hello é");
    assert_eq!(t.decode(&[1, 269, 2], true).unwrap(), "hello");
    assert_eq!(
        t.encode("<s>hello", false).unwrap()[0],
        1,
        "control tokens are special"
    );

    let mut no_scores = sentencepiece_data();
    no_scores.scores.pop();
    let message = Tokenizer::from_gguf_data(&no_scores, "spm.gguf")
        .unwrap_err()
        .to_string();
    assert!(message.contains("scores"), "{message}");
}

#[test]
fn chat_templates_render_the_model_template_or_a_builtin() {
    let user = [ChatMessage::user("Hi")];
    // No template, <|im_start|> in the vocabulary: ChatML.
    let t = byte_level(Some("smollm"));
    assert_eq!(
        t.apply_chat_template(&user, true).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // The model's template wins, with Python string methods and the BOS token in scope.
    let mut data = byte_level_data(Some("smollm"));
    data.chat_template = Some(
        "{{ bos_token }}{% for m in messages %}{{ m.role.upper() }}: {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}BOT:{% endif %}".into(),
    );
    let t = Tokenizer::from_gguf_data(&data, "tiny.gguf").unwrap();
    let rendered = t
        .apply_chat_template(&[ChatMessage::user("  Hi  ")], true)
        .unwrap();
    assert_eq!(rendered, "<|im_start|>USER: Hi\nBOT:");
    assert_eq!(
        t.apply_chat_template(&user, false).unwrap(),
        "<|im_start|>USER: Hi\n"
    );

    let llama3 = render(
        Builtin::Llama3.template(),
        &user,
        true,
        "<|begin_of_text|>",
        "",
    )
    .unwrap();
    assert_eq!(
        llama3,
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let llama2 = render(
        Builtin::Llama2.template(),
        &[ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
        true,
        "<s>",
        "</s>",
    )
    .unwrap();
    assert_eq!(
        llama2,
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    );
    let spm = Tokenizer::from_gguf_data(&sentencepiece_data(), "spm.gguf").unwrap();
    assert_eq!(
        spm.apply_chat_template(&user, true).unwrap(),
        "<s>[INST] Hi [/INST]"
    );
}

#[test]
fn chat_template_errors_name_the_problem() {
    let mut data = byte_level_data(Some("smollm"));
    data.chat_template = Some("{{ raise_exception('only user turns') }}".into());
    let t = Tokenizer::from_gguf_data(&data, "tiny.gguf").unwrap();
    let error = t
        .apply_chat_template(&[ChatMessage::user("Hi")], true)
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("tiny.gguf") && message.contains("only user turns"),
        "{message}"
    );

    data.chat_template = Some("{% for %}".into());
    let t = Tokenizer::from_gguf_data(&data, "tiny.gguf").unwrap();
    assert!(matches!(
        t.apply_chat_template(&[ChatMessage::user("Hi")], true),
        Err(TokenizerError::ChatTemplate { .. })
    ));

    // No template and no ChatML or Llama-3 tokens in a byte-level vocabulary.
    let mut data = byte_level_data(Some("gpt-2"));
    data.tokens[1] = "<|start|>".into();
    let t = Tokenizer::from_gguf_data(&data, "plain.gguf").unwrap();
    let error = t
        .apply_chat_template(&[ChatMessage::user("Hi")], true)
        .unwrap_err();
    assert!(
        matches!(error, TokenizerError::NoChatTemplate { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("plain.gguf"));
}

const WORD_LEVEL_JSON: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [
    {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 5, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4, "<|im_end|>": 5}, "unk_token": "[UNK]"}
}"#;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn tokenizer_json_with_its_config_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "tokenizer.json", WORD_LEVEL_JSON);
    let alone = Tokenizer::from_file(&path).unwrap();
    assert_eq!(
        alone.encode("hello world there", true).unwrap(),
        vec![2, 3, 4]
    );
    assert_eq!(alone.vocab_size(), 6);
    assert_eq!(alone.eos(), None);
    assert_eq!(
        alone.stop_tokens(),
        vec![5],
        "<|im_end|> is a special end of turn"
    );
    assert!(alone.chat_template().is_none());

    write(
        dir.path(),
        "tokenizer_config.json",
        r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"}"#,
    );
    write(
        dir.path(),
        "generation_config.json",
        r#"{"eos_token_id": [1, 7]}"#,
    );
    let t = Tokenizer::from_file(&path).unwrap();
    assert_eq!((t.bos(), t.eos()), (Some(0), Some(1)));
    assert_eq!(t.stop_tokens(), vec![1, 5, 7]);
    assert_eq!(
        t.apply_chat_template(&[ChatMessage::user("hello")], true)
            .unwrap(),
        "<s>hello</s>"
    );
}

#[test]
fn bad_tokenizer_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("tokenizer.json");
    let error = Tokenizer::from_file(&missing).unwrap_err();
    assert!(matches!(error, TokenizerError::Io { .. }));
    assert!(error.to_string().contains(&missing.display().to_string()));

    let path = write(dir.path(), "tokenizer.json", "{\"model\": 3");
    let error = Tokenizer::from_file(&path).unwrap_err();
    assert!(matches!(error, TokenizerError::Parse { .. }), "{error}");
    assert!(error.to_string().contains("tokenizer.json"), "{error}");

    let path = write(dir.path(), "tokenizer.json", WORD_LEVEL_JSON);
    let config = write(dir.path(), "tokenizer_config.json", "{ nope");
    let error = Tokenizer::from_file(&path).unwrap_err();
    assert!(matches!(error, TokenizerError::Config { .. }), "{error}");
    assert!(
        error.to_string().contains(&config.display().to_string()),
        "{error}"
    );
}
