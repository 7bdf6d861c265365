//! Chat templates: a conversation rendered into the prompt text a chat model was trained on.
//!
//! The model's own template (Jinja, from `tokenizer_config.json` or GGUF
//! `tokenizer.chat_template`) is rendered with `minijinja` as Hugging Face `transformers`
//! renders it: `messages`, `add_generation_prompt`, `bos_token` and `eos_token` in scope,
//! blocks trimmed, Python string methods (`.strip()`, `.startswith()`) available and
//! `raise_exception` raising. Without a template, a built-in form is chosen from the
//! vocabulary ([`Builtin`]).

use crate::{Family, Tokenizer, TokenizerError};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// A message from the user.
    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: "system".into(),
            content: content.into(),
        }
    }
}

/// The chat forms used when a model ships no template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (Qwen, SmolLM, many others).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` after the BOS token.
    Llama3,
    /// `<s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] answer </s>`.
    Llama2,
}

impl Builtin {
    /// The form's Jinja template.
    pub fn template(self) -> &'static str {
        match self {
            Builtin::ChatMl => concat!(
                "{% for message in messages %}",
                "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}",
                "{% endfor %}",
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            ),
            Builtin::Llama3 => concat!(
                "{{ bos_token }}",
                "{% for message in messages %}",
                "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}",
                "{% endfor %}",
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
            ),
            Builtin::Llama2 => concat!(
                "{% if messages[0]['role'] == 'system' %}",
                "{% set system = '<<SYS>>\\n' + messages[0]['content'] | trim + '\\n<</SYS>>\\n\\n' %}",
                "{% set messages = messages[1:] %}",
                "{% else %}{% set system = '' %}{% endif %}",
                "{% for message in messages %}",
                "{% if message['role'] == 'user' %}",
                "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}",
                "{% elif message['role'] == 'assistant' %}",
                "{{ ' ' + message['content'] | trim + ' ' + eos_token }}",
                "{% endif %}",
                "{% endfor %}",
            ),
        }
    }

    /// The form that fits a vocabulary with no template: ChatML when it has `<|im_start|>`,
    /// Llama-3 when it has `<|start_header_id|>`, Llama-2 for a SentencePiece vocabulary.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Option<Builtin> {
        if tokenizer.token_to_id("<|im_start|>").is_some() {
            Some(Builtin::ChatMl)
        } else if tokenizer.token_to_id("<|start_header_id|>").is_some() {
            Some(Builtin::Llama3)
        } else if tokenizer.family() == Family::SentencePiece {
            Some(Builtin::Llama2)
        } else {
            None
        }
    }
}

/// Renders a Jinja chat `template` for `messages`; with `add_generation_prompt` the text ends
/// where the assistant's answer begins.
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_template("chat", template)?;
    env.get_template("chat")?.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
}

impl Tokenizer {
    /// Renders `messages` with the model's chat template, or the built-in form that fits the
    /// vocabulary ([`Builtin::for_tokenizer`]) when it has none. Encode the result with
    /// `add_special_tokens: false`: the template writes the BOS token itself where it wants it.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = match (&self.chat_template, Builtin::for_tokenizer(self)) {
            (Some(template), _) => template.as_str(),
            (None, Some(builtin)) => builtin.template(),
            (None, None) => {
                return Err(TokenizerError::NoChatTemplate {
                    origin: self.origin.clone(),
                })
            }
        };
        let name = |id: Option<u32>| id.and_then(|id| self.id_to_token(id)).unwrap_or_default();
        render(
            template,
            messages,
            add_generation_prompt,
            &name(self.bos),
            &name(self.eos),
        )
        .map_err(|e| TokenizerError::ChatTemplate {
            origin: self.origin.clone(),
            message: format!("{e:#}"),
        })
    }
}
