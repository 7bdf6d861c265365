//! Model configurations.
//!
//! Owns the reading of a Hugging Face `config.json` into a validated [`ModelConfig`] (which
//! model family, how wide, how deep, how the attention heads and mixture-of-experts layers are
//! laid out) and the built-in presets, which are real `config.json` files embedded in the
//! binary and read by the same parser. Every error names the file (or preset) and the JSON
//! field at fault and says what was expected.
//!
//! It must not build graphs or load weights: the graph builder and the weight loader take a
//! [`ModelConfig`] from here and do that work themselves.

use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};

/// A supported model family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    /// Llama 1, 2 and 3 (`LlamaForCausalLM`).
    Llama,
    /// Mistral (`MistralForCausalLM`): Llama layers, optionally with a sliding window.
    Mistral,
    /// Mixtral (`MixtralForCausalLM`): every layer a mixture of experts.
    Mixtral,
    /// Qwen2 (`Qwen2ForCausalLM`): Llama layers with biased q/k/v projections.
    Qwen2,
    /// Qwen2-MoE (`Qwen2MoeForCausalLM`): experts plus a gated shared expert.
    Qwen2Moe,
    /// Qwen3-MoE (`Qwen3MoeForCausalLM`): experts, and RMSNorm on each query and key head.
    Qwen3Moe,
}

impl Architecture {
    /// Every supported architecture, in a fixed order.
    pub const ALL: [Architecture; 6] = [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Mixtral,
        Architecture::Qwen2,
        Architecture::Qwen2Moe,
        Architecture::Qwen3Moe,
    ];

    /// The short name used in plans, reports and error messages (`llama`, `qwen2-moe`, …);
    /// the same spelling serde uses.
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Mixtral => "mixtral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen2Moe => "qwen2-moe",
            Architecture::Qwen3Moe => "qwen3-moe",
        }
    }

    /// The Hugging Face model class named in `architectures` (`LlamaForCausalLM`, …).
    pub fn hf_class_name(&self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Mixtral => "MixtralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// The Hugging Face `model_type` (`llama`, `qwen2_moe`, …).
    pub fn hf_model_type(&self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Mixtral => "mixtral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen2Moe => "qwen2_moe",
            Architecture::Qwen3Moe => "qwen3_moe",
        }
    }

    /// Whether this family has mixture-of-experts layers.
    pub fn is_moe(&self) -> bool {
        matches!(
            self,
            Architecture::Mixtral | Architecture::Qwen2Moe | Architecture::Qwen3Moe
        )
    }

    fn from_hf_class_name(class_name: &str) -> Option<Architecture> {
        Architecture::ALL
            .into_iter()
            .find(|architecture| architecture.hf_class_name() == class_name)
    }

    fn from_hf_model_type(model_type: &str) -> Option<Architecture> {
        Architecture::ALL
            .into_iter()
            .find(|architecture| architecture.hf_model_type() == model_type)
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The mixture-of-experts part of a model: how many experts, how many each token uses, and
/// which layers have them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Number of routed experts in each MoE layer.
    pub num_experts: usize,
    /// Number of experts each token is routed to.
    pub top_k: usize,
    /// Intermediate (hidden) width of one routed expert's MLP.
    pub expert_intermediate_size: usize,
    /// Whether the `top_k` routing weights are renormalised to sum to 1 (Mixtral: always;
    /// Qwen: `norm_topk_prob`).
    pub normalize_top_k: bool,
    /// Intermediate width of the Qwen2-MoE shared expert (applied to every token, scaled by a
    /// sigmoid gate); `None` when the model has no shared expert.
    pub shared_expert_intermediate_size: Option<usize>,
    /// `decoder_sparse_step`: layer `i` is a MoE layer when `(i + 1) % sparse_step == 0` and
    /// `i` is not in `dense_layers`. Always 1 for Mixtral.
    pub sparse_step: usize,
    /// `mlp_only_layers`: layers that use the dense MLP even though the step selects them.
    pub dense_layers: Vec<usize>,
}

/// A validated model configuration, read from a Hugging Face `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The preset name, or the path of the file it was read from.
    pub name: String,
    /// The model family.
    pub architecture: Architecture,
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Intermediate width of the dense MLP (used by the dense layers; for Mixtral, the same
    /// as the expert width).
    pub intermediate_size: usize,
    /// Number of decoder layers (`num_hidden_layers`).
    pub num_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (`num_key_value_heads`); fewer than the query heads for
    /// grouped-query attention.
    pub num_kv_heads: usize,
    /// Width of one attention head: `head_dim` when the config gives it, else
    /// `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Longest sequence the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output projection shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether the q/k/v projections have a bias (Qwen2 and Qwen2-MoE: yes, unless the config
    /// says otherwise with `attention_bias`).
    pub attention_bias: bool,
    /// Whether each query and key head goes through an RMSNorm before RoPE (Qwen3-MoE).
    pub qk_norm: bool,
    /// Sliding attention window, when the model uses one. Recorded only: kiln does not apply it.
    pub sliding_window: Option<usize>,
    /// The dtype the weights are stored in (`torch_dtype`); one of f32, f16 and bf16.
    pub dtype: DType,
    /// The mixture-of-experts layout; `None` for dense models.
    pub moe: Option<MoeConfig>,
}

/// Why a model configuration could not be read.
///
/// Every message starts with where the configuration came from (a file path, or
/// `preset <name>`), names the JSON field at fault and says what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be read.
    #[error("{}: cannot read model config: {error}", path.display())]
    Io {
        /// The file that was read.
        path: PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// The text is not valid JSON.
    #[error("{origin}: invalid JSON: {message}")]
    InvalidJson {
        /// Where the text came from.
        origin: String,
        /// Line of the error (1-based).
        line: usize,
        /// Column of the error (1-based).
        column: usize,
        /// serde_json's description, which includes the line and column.
        message: String,
    },
    /// The JSON document is not an object.
    #[error("{origin}: expected a JSON object with model settings, found {found}")]
    NotAnObject {
        /// Where the text came from.
        origin: String,
        /// What was found instead.
        found: String,
    },
    /// A field this architecture needs is absent.
    #[error("{origin}: missing field `{field}` ({requirement})")]
    MissingField {
        /// Where the text came from.
        origin: String,
        /// The JSON field.
        field: String,
        /// Why it is needed, e.g. `required for architecture mixtral`.
        requirement: String,
    },
    /// A field has the wrong type or an unusable value, or disagrees with another field.
    #[error("{origin}: invalid field `{field}`: {message}")]
    InvalidField {
        /// Where the text came from.
        origin: String,
        /// The JSON field.
        field: String,
        /// What is wrong and what was expected.
        message: String,
    },
    /// The config names a model family kiln does not support.
    #[error("{origin}: unsupported architecture {found} in `{field}` (supported: {supported})")]
    UnknownArchitecture {
        /// Where the text came from.
        origin: String,
        /// `architectures` or `model_type`.
        field: String,
        /// The value found, quoted.
        found: String,
        /// The values kiln accepts in that field.
        supported: String,
    },
    /// A model spec that is neither a preset nor an existing path.
    #[error(
        "unknown model `{name}`: not a preset and not an existing file or directory \
         (presets: {presets})"
    )]
    UnknownPreset {
        /// The spec given.
        name: String,
        /// The preset names, comma separated.
        presets: String,
    },
}

/// Built-in presets: names, in the order [`ModelConfig::preset_names`] lists them.
const PRESET_NAMES: [&str; 6] = [
    "tiny-llama",
    "tiny-mixtral",
    "llama-2-7b",
    "llama-3-8b",
    "mixtral-8x7b",
    "qwen3-30b-a3b",
];

/// The `config.json` text of a built-in preset.
fn preset_text(name: &str) -> Option<&'static str> {
    Some(match name {
        "tiny-llama" => include_str!("presets/tiny-llama.json"),
        "tiny-mixtral" => include_str!("presets/tiny-mixtral.json"),
        "llama-2-7b" => include_str!("presets/llama-2-7b.json"),
        "llama-3-8b" => include_str!("presets/llama-3-8b.json"),
        "mixtral-8x7b" => include_str!("presets/mixtral-8x7b.json"),
        "qwen3-30b-a3b" => include_str!("presets/qwen3-30b-a3b.json"),
        _ => return None,
    })
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` text and validates it. `source` names the text in
    /// errors (a file path, or `preset <name>`) and becomes the config's `name`.
    pub fn from_hf_json(text: &str, source: &str) -> Result<ModelConfig, ModelError> {
        let document: Value =
            serde_json::from_str(text).map_err(|error| ModelError::InvalidJson {
                origin: source.to_string(),
                line: error.line(),
                column: error.column(),
                message: error.to_string(),
            })?;
        let Value::Object(object) = &document else {
            return Err(ModelError::NotAnObject {
                origin: source.to_string(),
                found: describe(&document),
            });
        };
        let fields = Fields {
            origin: source,
            object,
        };
        let config = parse_config(&fields)?;
        config.validate_as(source)?;
        Ok(config)
    }

    /// Reads a `config.json` file, or the `config.json` inside a directory (a Hugging Face
    /// model folder). The config's `name` is the path of the file read.
    pub fn from_file(path: &Path) -> Result<ModelConfig, ModelError> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|error| ModelError::Io {
            path: file.clone(),
            error,
        })?;
        ModelConfig::from_hf_json(&text, &file.display().to_string())
    }

    /// The built-in preset `name` (see [`ModelConfig::preset_names`]).
    pub fn preset(name: &str) -> Result<ModelConfig, ModelError> {
        let text = preset_text(name).ok_or_else(|| unknown_preset(name))?;
        let mut config = ModelConfig::from_hf_json(text, &format!("preset {name}"))?;
        config.name = name.to_string();
        Ok(config)
    }

    /// The names of the built-in presets, smallest models first.
    pub fn preset_names() -> &'static [&'static str] {
        &PRESET_NAMES
    }

    /// Loads a model by spec: a preset name, else a path to a `config.json` file or to a
    /// directory that holds one.
    pub fn load(spec: &str) -> Result<ModelConfig, ModelError> {
        if preset_text(spec).is_some() {
            return ModelConfig::preset(spec);
        }
        let path = Path::new(spec);
        if path.exists() {
            return ModelConfig::from_file(path);
        }
        Err(unknown_preset(spec))
    }

    /// Checks that the sizes are positive and consistent with each other. Errors name the
    /// config by its `name` and the fields by their Hugging Face spelling.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.validate_as(&self.name)
    }

    /// Keeps only the first `layers` decoder layers (`1..=num_hidden_layers`), so that a model
    /// too large for a machine runs end to end (random weights, or the matching tensors of a
    /// checkpoint): `num_layers` becomes `layers`, MoE `mlp_only_layers` past it are dropped
    /// and the name says which layers are kept. Other counts are an error naming the field.
    ///
    /// ```
    /// let mut config = kiln_models::ModelConfig::preset("mixtral-8x7b").unwrap();
    /// config.keep_first_layers(2).unwrap();
    /// assert_eq!(config.num_layers, 2);
    /// assert!(config.keep_first_layers(3).is_err());
    /// ```
    pub fn keep_first_layers(&mut self, layers: usize) -> Result<(), ModelError> {
        if layers == 0 || layers > self.num_layers {
            return Err(ModelError::InvalidField {
                origin: self.name.clone(),
                field: "num_hidden_layers".to_string(),
                message: format!(
                    "cannot keep the first {layers} layers of {}: expected 1..={}",
                    self.num_layers, self.num_layers
                ),
            });
        }
        if layers < self.num_layers {
            self.name = format!(
                "{} (first {layers} of {} layers)",
                self.name, self.num_layers
            );
            self.num_layers = layers;
            if let Some(moe) = &mut self.moe {
                moe.dense_layers.retain(|&layer| layer < layers);
            }
        }
        self.validate()
    }

    /// Whether decoder layer `layer` has a mixture-of-experts block instead of a dense MLP.
    /// Always false for dense models and for layers past the last one.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        let Some(moe) = &self.moe else {
            return false;
        };
        layer < self.num_layers
            && (layer + 1).checked_rem(moe.sparse_step) == Some(0)
            && !moe.dense_layers.contains(&layer)
    }

    /// How many query heads share one key/value head (1 without grouped-query attention).
    /// Zero only for an invalid config with no key/value heads.
    pub fn kv_group_size(&self) -> usize {
        self.num_attention_heads
            .checked_div(self.num_kv_heads)
            .unwrap_or(0)
    }

    /// [`ModelConfig::validate`], naming the config `origin` in errors.
    fn validate_as(&self, origin: &str) -> Result<(), ModelError> {
        let invalid = |field: &str, message: String| ModelError::InvalidField {
            origin: origin.to_string(),
            field: field.to_string(),
            message,
        };
        let positive = |field: &str, value: usize| {
            if value == 0 {
                Err(invalid(
                    field,
                    "expected a positive integer, found 0".into(),
                ))
            } else {
                Ok(())
            }
        };
        positive("vocab_size", self.vocab_size)?;
        positive("hidden_size", self.hidden_size)?;
        positive("intermediate_size", self.intermediate_size)?;
        positive("num_hidden_layers", self.num_layers)?;
        positive("num_attention_heads", self.num_attention_heads)?;
        positive("num_key_value_heads", self.num_kv_heads)?;
        positive("head_dim", self.head_dim)?;
        positive("max_position_embeddings", self.max_position_embeddings)?;
        if self.num_attention_heads.checked_rem(self.num_kv_heads) != Some(0) {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "`num_attention_heads` ({}) is not a multiple of `num_key_value_heads` ({})",
                    self.num_attention_heads, self.num_kv_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid(
                "head_dim",
                format!(
                    "expected an even head width (RoPE rotates pairs of values), found {}",
                    self.head_dim
                ),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(invalid(
                "rms_norm_eps",
                format!(
                    "expected a positive finite number, found {}",
                    self.rms_norm_eps
                ),
            ));
        }
        // RoPE's frequencies are theta^(-2i/d): a base of 1 or less does not rotate.
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(invalid(
                "rope_theta",
                format!(
                    "expected a finite number greater than 1, found {}",
                    self.rope_theta
                ),
            ));
        }
        if !self.dtype.is_float() {
            return Err(invalid(
                "torch_dtype",
                format!(
                    "expected float32, float16 or bfloat16, found {}",
                    self.dtype
                ),
            ));
        }
        if self.sliding_window == Some(0) {
            return Err(invalid(
                "sliding_window",
                "expected a positive integer or null, found 0".into(),
            ));
        }
        let architecture = self.architecture;
        let moe = match (&self.moe, architecture.is_moe()) {
            (None, false) => return Ok(()),
            (Some(moe), true) => moe,
            (None, true) => {
                return Err(invalid(
                    "architectures",
                    format!("architecture {architecture} needs a mixture-of-experts configuration"),
                ))
            }
            (Some(_), false) => {
                return Err(invalid(
                    "architectures",
                    format!(
                        "architecture {architecture} is dense but the config has a \
                         mixture-of-experts configuration"
                    ),
                ))
            }
        };
        let experts_field = experts_field(architecture);
        positive(experts_field, moe.num_experts)?;
        positive("num_experts_per_tok", moe.top_k)?;
        if moe.top_k > moe.num_experts {
            return Err(invalid(
                "num_experts_per_tok",
                format!(
                    "`num_experts_per_tok` ({}) is more than the number of experts, \
                     `{experts_field}` ({})",
                    moe.top_k, moe.num_experts
                ),
            ));
        }
        positive(
            expert_width_field(architecture),
            moe.expert_intermediate_size,
        )?;
        if let Some(width) = moe.shared_expert_intermediate_size {
            if architecture != Architecture::Qwen2Moe {
                return Err(invalid(
                    "shared_expert_intermediate_size",
                    format!("architecture {architecture} has no shared expert"),
                ));
            }
            positive("shared_expert_intermediate_size", width)?;
        }
        positive("decoder_sparse_step", moe.sparse_step)?;
        if let Some(&layer) = moe
            .dense_layers
            .iter()
            .find(|&&layer| layer >= self.num_layers)
        {
            return Err(invalid(
                "mlp_only_layers",
                format!(
                    "layer {layer} does not exist: `num_hidden_layers` is {}",
                    self.num_layers
                ),
            ));
        }
        Ok(())
    }
}

/// The JSON field holding the number of routed experts.
fn experts_field(architecture: Architecture) -> &'static str {
    match architecture {
        Architecture::Mixtral => "num_local_experts",
        _ => "num_experts",
    }
}

/// The JSON field holding the width of one routed expert.
fn expert_width_field(architecture: Architecture) -> &'static str {
    match architecture {
        Architecture::Mixtral => "intermediate_size",
        _ => "moe_intermediate_size",
    }
}

fn unknown_preset(name: &str) -> ModelError {
    ModelError::UnknownPreset {
        name: name.to_string(),
        presets: PRESET_NAMES.join(", "),
    }
}

/// Reads the fields of a config after the architecture is known.
fn parse_config(fields: &Fields<'_>) -> Result<ModelConfig, ModelError> {
    let architecture = detect_architecture(fields)?;
    let requirement = format!("required for architecture {architecture}");
    let required = |field: &str| -> Result<usize, ModelError> {
        fields
            .integer(field)?
            .ok_or_else(|| fields.missing(field, &requirement))
    };

    if let Some(activation) = fields.string("hidden_act")? {
        if activation != "silu" {
            return Err(fields.invalid(
                "hidden_act",
                format!("only \"silu\" is supported, found {activation:?}"),
            ));
        }
    }
    check_plain_rope(fields)?;

    let vocab_size = required("vocab_size")?;
    let hidden_size = required("hidden_size")?;
    let intermediate_size = required("intermediate_size")?;
    let num_layers = required("num_hidden_layers")?;
    let num_attention_heads = required("num_attention_heads")?;
    if num_attention_heads == 0 {
        return Err(fields.invalid(
            "num_attention_heads",
            "expected a positive integer, found 0".into(),
        ));
    }
    let num_kv_heads = match fields.integer("num_key_value_heads")? {
        Some(heads) => heads,
        // Configs written before grouped-query attention omit the field.
        None if matches!(architecture, Architecture::Llama | Architecture::Mistral) => {
            num_attention_heads
        }
        None => return Err(fields.missing("num_key_value_heads", &requirement)),
    };
    let head_dim = match fields.integer("head_dim")? {
        Some(width) => width,
        None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
        None => {
            return Err(fields.invalid(
                "num_attention_heads",
                format!(
                    "`num_attention_heads` ({num_attention_heads}) does not divide \
                     `hidden_size` ({hidden_size}), and there is no `head_dim` to give \
                     the head width"
                ),
            ))
        }
    };

    let rms_norm_eps = fields.float("rms_norm_eps")?.unwrap_or(1e-6);
    let rope_theta = match fields.float("rope_theta")? {
        Some(theta) => theta,
        None => rope_parameters_theta(fields)?.unwrap_or(10000.0),
    };
    let max_position_embeddings = fields.integer("max_position_embeddings")?.unwrap_or(4096);
    let tie_word_embeddings = fields.boolean("tie_word_embeddings")?.unwrap_or(false);
    let attention_bias = fields.boolean("attention_bias")?.unwrap_or(matches!(
        architecture,
        Architecture::Qwen2 | Architecture::Qwen2Moe
    ));
    let qk_norm = architecture == Architecture::Qwen3Moe;
    // Qwen configs carry a `sliding_window` value even when `use_sliding_window` is false.
    let sliding_window = match fields.boolean("use_sliding_window")? {
        Some(false) => None,
        _ => fields.integer("sliding_window")?,
    };
    let dtype = parse_dtype(fields)?;
    let moe = parse_moe(fields, architecture, intermediate_size, &requirement)?;

    Ok(ModelConfig {
        name: fields.origin.to_string(),
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
        qk_norm,
        sliding_window,
        dtype,
        moe,
    })
}

/// The architecture from `architectures[0]`, or from `model_type` when there is no
/// `architectures` list.
fn detect_architecture(fields: &Fields<'_>) -> Result<Architecture, ModelError> {
    if let Some(value) = fields.get("architectures") {
        let Value::Array(classes) = value else {
            return Err(fields.invalid(
                "architectures",
                format!(
                    "expected a list of model class names, found {}",
                    describe(value)
                ),
            ));
        };
        if let Some(first) = classes.first() {
            let Value::String(class_name) = first else {
                return Err(fields.invalid(
                    "architectures",
                    format!("expected a model class name, found {}", describe(first)),
                ));
            };
            return Architecture::from_hf_class_name(class_name).ok_or_else(|| {
                ModelError::UnknownArchitecture {
                    origin: fields.origin.to_string(),
                    field: "architectures".into(),
                    found: format!("{class_name:?}"),
                    supported: supported_list(|architecture| architecture.hf_class_name()),
                }
            });
        }
    }
    match fields.string("model_type")? {
        Some(model_type) => Architecture::from_hf_model_type(model_type).ok_or_else(|| {
            ModelError::UnknownArchitecture {
                origin: fields.origin.to_string(),
                field: "model_type".into(),
                found: format!("{model_type:?}"),
                supported: supported_list(|architecture| architecture.hf_model_type()),
            }
        }),
        None => Err(fields.missing(
            "architectures",
            "a model config names its class in `architectures` or its family in `model_type`",
        )),
    }
}

fn supported_list(name: impl Fn(&Architecture) -> &'static str) -> String {
    Architecture::ALL
        .iter()
        .map(name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rejects RoPE scaling (linear, dynamic, YaRN, Llama 3, …): kiln implements plain RoPE
/// only, and ignoring the scaling would silently compute a different model.
fn check_plain_rope(fields: &Fields<'_>) -> Result<(), ModelError> {
    for field in ["rope_scaling", "rope_parameters"] {
        let Some(settings) = fields.get(field) else {
            continue;
        };
        // `rope_parameters` also carries the plain RoPE base, so only its type matters.
        let kind = ["rope_type", "type"]
            .into_iter()
            .find_map(|key| settings.get(key));
        match kind {
            Some(Value::String(kind)) if kind == "default" => {}
            None if field == "rope_parameters" => {}
            Some(kind) => {
                return Err(fields.invalid(
                    field,
                    format!(
                        "RoPE scaling is not supported: found type {}, expected plain RoPE",
                        describe(kind)
                    ),
                ))
            }
            None => {
                return Err(fields.invalid(
                    field,
                    format!(
                        "RoPE scaling is not supported: expected null, found {}",
                        describe(settings)
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// `rope_parameters.rope_theta`, where newer transformers versions write the RoPE base.
fn rope_parameters_theta(fields: &Fields<'_>) -> Result<Option<f32>, ModelError> {
    let Some(parameters) = fields.get("rope_parameters") else {
        return Ok(None);
    };
    match parameters.get("rope_theta") {
        None | Some(Value::Null) => Ok(None),
        Some(value) => number_as_f32(value).map(Some).ok_or_else(|| {
            fields.invalid(
                "rope_parameters",
                format!("`rope_theta`: expected a number, found {}", describe(value)),
            )
        }),
    }
}

/// `torch_dtype` (or `dtype`, its name in newer transformers versions); bf16 when absent.
fn parse_dtype(fields: &Fields<'_>) -> Result<DType, ModelError> {
    let field = if fields.get("torch_dtype").is_some() {
        "torch_dtype"
    } else {
        "dtype"
    };
    let Some(name) = fields.string(field)? else {
        return Ok(DType::BF16);
    };
    match DType::parse(name) {
        Some(dtype) if dtype.is_float() => Ok(dtype),
        _ => Err(fields.invalid(
            field,
            format!("expected \"float32\", \"float16\" or \"bfloat16\", found {name:?}"),
        )),
    }
}

/// The mixture-of-experts fields of the MoE families; `None` for dense families.
fn parse_moe(
    fields: &Fields<'_>,
    architecture: Architecture,
    intermediate_size: usize,
    requirement: &str,
) -> Result<Option<MoeConfig>, ModelError> {
    let required = |field: &str| -> Result<usize, ModelError> {
        fields
            .integer(field)?
            .ok_or_else(|| fields.missing(field, requirement))
    };
    let moe = match architecture {
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => return Ok(None),
        Architecture::Mixtral => MoeConfig {
            num_experts: required("num_local_experts")?,
            top_k: required("num_experts_per_tok")?,
            expert_intermediate_size: intermediate_size,
            normalize_top_k: true,
            shared_expert_intermediate_size: None,
            sparse_step: 1,
            dense_layers: Vec::new(),
        },
        Architecture::Qwen2Moe | Architecture::Qwen3Moe => MoeConfig {
            num_experts: required("num_experts")?,
            top_k: required("num_experts_per_tok")?,
            expert_intermediate_size: required("moe_intermediate_size")?,
            normalize_top_k: fields.boolean("norm_topk_prob")?.unwrap_or(false),
            shared_expert_intermediate_size: if architecture == Architecture::Qwen2Moe {
                fields
                    .integer("shared_expert_intermediate_size")?
                    .filter(|&width| width > 0)
            } else {
                None
            },
            sparse_step: fields.integer("decoder_sparse_step")?.unwrap_or(1),
            dense_layers: fields.integer_list("mlp_only_layers")?.unwrap_or_default(),
        },
    };
    Ok(Some(moe))
}

/// The top-level object of a config, with typed readers whose errors name the field.
/// Every reader treats `null` like an absent field.
struct Fields<'a> {
    origin: &'a str,
    object: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        self.object.get(field).filter(|value| !value.is_null())
    }

    fn missing(&self, field: &str, requirement: &str) -> ModelError {
        ModelError::MissingField {
            origin: self.origin.to_string(),
            field: field.to_string(),
            requirement: requirement.to_string(),
        }
    }

    fn invalid(&self, field: &str, message: String) -> ModelError {
        ModelError::InvalidField {
            origin: self.origin.to_string(),
            field: field.to_string(),
            message,
        }
    }

    fn integer(&self, field: &str) -> Result<Option<usize>, ModelError> {
        self.get(field)
            .map(|value| {
                number_as_usize(value).ok_or_else(|| {
                    self.invalid(
                        field,
                        format!("expected a non-negative integer, found {}", describe(value)),
                    )
                })
            })
            .transpose()
    }

    fn float(&self, field: &str) -> Result<Option<f32>, ModelError> {
        self.get(field)
            .map(|value| {
                number_as_f32(value).ok_or_else(|| {
                    self.invalid(
                        field,
                        format!("expected a number, found {}", describe(value)),
                    )
                })
            })
            .transpose()
    }

    fn boolean(&self, field: &str) -> Result<Option<bool>, ModelError> {
        self.get(field)
            .map(|value| {
                value.as_bool().ok_or_else(|| {
                    self.invalid(
                        field,
                        format!("expected true or false, found {}", describe(value)),
                    )
                })
            })
            .transpose()
    }

    fn string(&self, field: &str) -> Result<Option<&str>, ModelError> {
        self.get(field)
            .map(|value| {
                value.as_str().ok_or_else(|| {
                    self.invalid(
                        field,
                        format!("expected a string, found {}", describe(value)),
                    )
                })
            })
            .transpose()
    }

    fn integer_list(&self, field: &str) -> Result<Option<Vec<usize>>, ModelError> {
        let Some(value) = self.get(field) else {
            return Ok(None);
        };
        let Value::Array(items) = value else {
            return Err(self.invalid(
                field,
                format!(
                    "expected a list of non-negative integers, found {}",
                    describe(value)
                ),
            ));
        };
        items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                number_as_usize(item).ok_or_else(|| {
                    self.invalid(
                        field,
                        format!(
                            "item {index}: expected a non-negative integer, found {}",
                            describe(item)
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

fn number_as_usize(value: &Value) -> Option<usize> {
    value
        .as_u64()
        .and_then(|number| usize::try_from(number).ok())
}

fn number_as_f32(value: &Value) -> Option<f32> {
    value.as_f64().map(|number| number as f32)
}

/// A short description of a JSON value for error messages: its type, and its value when small.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(flag) => format!("boolean {flag}"),
        Value::Number(number) => format!("number {number}"),
        Value::String(text) if text.chars().count() > 40 => {
            let start: String = text.chars().take(40).collect();
            format!("string {start:?}…")
        }
        Value::String(text) => format!("string {text:?}"),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SOURCE: &str = "models/test/config.json";

    /// A preset's JSON text with some fields changed by `edit`.
    fn edited_preset(name: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        let text = preset_text(name).expect("preset exists");
        let mut document: Value = serde_json::from_str(text).expect("preset is valid JSON");
        edit(document.as_object_mut().expect("preset is an object"));
        document.to_string()
    }

    /// Parses an edited preset and returns the error message it must produce.
    fn error_of(name: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        match ModelConfig::from_hf_json(&edited_preset(name, edit), SOURCE) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => {
                let message = error.to_string();
                assert!(message.contains(SOURCE), "no source in: {message}");
                message
            }
        }
    }

    const QWEN2_MOE: &str = r#"{
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 176,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 128,
        "num_experts": 6,
        "num_experts_per_tok": 2,
        "norm_topk_prob": false,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 300,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 8192,
        "sliding_window": 32768,
        "use_sliding_window": false,
        "torch_dtype": "bfloat16"
    }"#;

    #[test]
    fn every_preset_parses_and_validates() {
        assert_eq!(
            ModelConfig::preset_names(),
            [
                "tiny-llama",
                "tiny-mixtral",
                "llama-2-7b",
                "llama-3-8b",
                "mixtral-8x7b",
                "qwen3-30b-a3b"
            ]
        );
        for &name in ModelConfig::preset_names() {
            let config = ModelConfig::preset(name).unwrap_or_else(|error| panic!("{error}"));
            assert_eq!(config.name, name);
            config.validate().unwrap_or_else(|error| panic!("{error}"));
            assert_eq!(ModelConfig::load(name).expect("load by name"), config);
        }
    }

    #[test]
    fn llama_presets_have_the_published_numbers() {
        let llama2 = ModelConfig::preset("llama-2-7b").expect("preset");
        assert_eq!(llama2.architecture, Architecture::Llama);
        assert_eq!(
            (
                llama2.hidden_size,
                llama2.intermediate_size,
                llama2.num_layers
            ),
            (4096, 11008, 32)
        );
        assert_eq!((llama2.head_dim, llama2.kv_group_size()), (128, 1));
        assert_eq!(llama2.vocab_size, 32000);
        assert_eq!(llama2.rms_norm_eps, 1e-5);
        assert_eq!(llama2.dtype, DType::F16);
        assert!(!llama2.attention_bias && !llama2.qk_norm && llama2.moe.is_none());
        assert!(!llama2.is_moe_layer(0));

        let llama3 = ModelConfig::preset("llama-3-8b").expect("preset");
        assert_eq!((llama3.num_kv_heads, llama3.kv_group_size()), (8, 4));
        assert_eq!(llama3.vocab_size, 128256);
        assert_eq!(llama3.rope_theta, 500000.0);
        assert_eq!(llama3.max_position_embeddings, 8192);
        assert_eq!(llama3.dtype, DType::BF16);
    }

    #[test]
    fn mixtral_preset_has_the_published_numbers() {
        let config = ModelConfig::preset("mixtral-8x7b").expect("preset");
        assert_eq!(config.architecture, Architecture::Mixtral);
        assert_eq!((config.head_dim, config.kv_group_size()), (128, 4));
        assert_eq!(config.rope_theta, 1e6);
        assert_eq!(config.max_position_embeddings, 32768);
        assert_eq!(config.sliding_window, None);
        let moe = config.moe.as_ref().expect("mixtral is MoE");
        assert_eq!((moe.num_experts, moe.top_k), (8, 2));
        assert_eq!(moe.expert_intermediate_size, 14336);
        assert!(moe.normalize_top_k);
        assert_eq!(moe.shared_expert_intermediate_size, None);
        assert!((0..32).all(|layer| config.is_moe_layer(layer)));
        assert!(!config.is_moe_layer(32));
    }

    #[test]
    fn qwen3_preset_has_the_published_numbers() {
        let config = ModelConfig::preset("qwen3-30b-a3b").expect("preset");
        assert_eq!(config.architecture, Architecture::Qwen3Moe);
        assert!(config.qk_norm);
        assert!(!config.attention_bias);
        // head_dim is given explicitly and differs from hidden / heads = 64.
        assert_eq!(config.head_dim, 128);
        assert_eq!(config.kv_group_size(), 8);
        assert_eq!(config.rms_norm_eps, 1e-6);
        assert_eq!(config.max_position_embeddings, 40960);
        assert!(!config.tie_word_embeddings);
        let moe = config.moe.as_ref().expect("qwen3-moe is MoE");
        assert_eq!((moe.num_experts, moe.top_k), (128, 8));
        assert_eq!(moe.expert_intermediate_size, 768);
        assert_eq!(config.intermediate_size, 6144);
        assert!(moe.normalize_top_k);
        assert!((0..48).all(|layer| config.is_moe_layer(layer)));
    }

    #[test]
    fn tiny_presets_use_grouped_query_attention() {
        let llama = ModelConfig::preset("tiny-llama").expect("preset");
        assert_eq!((llama.head_dim, llama.kv_group_size()), (32, 4));
        assert_eq!((llama.hidden_size, llama.vocab_size), (256, 512));
        let mixtral = ModelConfig::preset("tiny-mixtral").expect("preset");
        assert_eq!((mixtral.head_dim, mixtral.kv_group_size()), (32, 2));
        let moe = mixtral.moe.expect("tiny-mixtral is MoE");
        assert_eq!(
            (moe.num_experts, moe.top_k, moe.expert_intermediate_size),
            (4, 2, 256)
        );
    }

    #[test]
    fn qwen2_moe_sparse_step_and_dense_layers_choose_the_moe_layers() {
        let config = ModelConfig::from_hf_json(QWEN2_MOE, SOURCE).expect("valid config");
        assert_eq!(config.name, SOURCE);
        assert_eq!(config.architecture, Architecture::Qwen2Moe);
        assert!(
            config.attention_bias,
            "Qwen2-MoE has q/k/v biases by default"
        );
        assert!(!config.qk_norm);
        assert_eq!(config.sliding_window, None, "use_sliding_window is false");
        let moe = config.moe.as_ref().expect("MoE");
        assert_eq!(moe.shared_expert_intermediate_size, Some(128));
        assert!(!moe.normalize_top_k);
        let moe_layers: Vec<usize> = (0..8).filter(|&layer| config.is_moe_layer(layer)).collect();
        // Step 2 selects layers 1, 3 and 5; layer 3 is listed in mlp_only_layers.
        assert_eq!(moe_layers, [1, 5]);
    }

    #[test]
    fn qwen2_moe_zero_shared_expert_means_none() {
        let text = QWEN2_MOE.replace(
            r#""shared_expert_intermediate_size": 128"#,
            r#""shared_expert_intermediate_size": 0"#,
        );
        let config = ModelConfig::from_hf_json(&text, SOURCE).expect("valid config");
        assert_eq!(
            config.moe.expect("MoE").shared_expert_intermediate_size,
            None
        );
    }

    #[test]
    fn old_llama_configs_default_the_kv_heads_and_head_dim() {
        let text = edited_preset("llama-2-7b", |object| {
            object.remove("num_key_value_heads");
            object.remove("rope_theta");
            object.remove("torch_dtype");
        });
        let config = ModelConfig::from_hf_json(&text, SOURCE).expect("valid config");
        assert_eq!(config.num_kv_heads, 32);
        assert_eq!(config.head_dim, 4096 / 32);
        assert_eq!(config.rope_theta, 10000.0);
        assert_eq!(config.dtype, DType::BF16);
    }

    #[test]
    fn mistral_records_its_sliding_window() {
        let text = edited_preset("tiny-llama", |object| {
            object.insert("architectures".into(), json!(["MistralForCausalLM"]));
            object.insert("sliding_window".into(), json!(4096));
        });
        let config = ModelConfig::from_hf_json(&text, SOURCE).expect("valid config");
        assert_eq!(config.architecture, Architecture::Mistral);
        assert_eq!(config.sliding_window, Some(4096));
    }

    #[test]
    fn model_type_is_used_without_architectures() {
        let text = edited_preset("tiny-mixtral", |object| {
            object.remove("architectures");
        });
        let config = ModelConfig::from_hf_json(&text, SOURCE).expect("valid config");
        assert_eq!(config.architecture, Architecture::Mixtral);
    }

    #[test]
    fn missing_kv_heads_is_an_error_for_mixtral() {
        let message = error_of("tiny-mixtral", |object| {
            object.remove("num_key_value_heads");
        });
        assert!(
            message.contains("missing field `num_key_value_heads`"),
            "{message}"
        );
        assert!(message.contains("mixtral"), "{message}");
    }

    #[test]
    fn missing_vocab_size_is_an_error() {
        let message = error_of("tiny-llama", |object| {
            object.remove("vocab_size");
        });
        assert!(message.contains("missing field `vocab_size`"), "{message}");
    }

    #[test]
    fn a_string_where_a_number_belongs_is_an_error() {
        let message = error_of("tiny-llama", |object| {
            object.insert("hidden_size".into(), json!("256"));
        });
        assert!(message.contains("`hidden_size`"), "{message}");
        assert!(message.contains("string \"256\""), "{message}");
        let message = error_of("tiny-llama", |object| {
            object.insert("rms_norm_eps".into(), json!("1e-5"));
        });
        assert!(message.contains("`rms_norm_eps`"), "{message}");
    }

    #[test]
    fn heads_must_divide_hidden_size_without_head_dim() {
        let message = error_of("llama-2-7b", |object| {
            object.insert("hidden_size".into(), json!(4100));
        });
        assert!(message.contains("`num_attention_heads` (32)"), "{message}");
        assert!(message.contains("`hidden_size` (4100)"), "{message}");
    }

    /// Found by the `config_json` fuzz target: an odd head width passed validation and then
    /// failed in the graph verifier with a message about a RoPE node instead of the field.
    #[test]
    fn head_width_must_be_even() {
        let message = error_of("tiny-llama", |object| {
            object.insert("head_dim".into(), json!(7));
        });
        assert!(message.contains("invalid field `head_dim`"), "{message}");
        assert!(message.contains("found 7"), "{message}");
        let derived = error_of("tiny-llama", |object| {
            object.remove("head_dim");
            object.insert("hidden_size".into(), json!(56));
        });
        assert!(derived.contains("invalid field `head_dim`"), "{derived}");
    }

    /// Found by the `gguf_metadata` fuzz target (`llama.rope.freq_base` = 0.038): a RoPE
    /// base of 1 or less passed validation and then failed in the graph verifier.
    #[test]
    fn rope_theta_must_exceed_one() {
        for theta in [0.5, 1.0] {
            let message = error_of("tiny-llama", |object| {
                object.insert("rope_theta".into(), json!(theta));
            });
            assert!(message.contains("invalid field `rope_theta`"), "{message}");
            assert!(message.contains("greater than 1"), "{message}");
        }
    }

    #[test]
    fn kv_heads_must_divide_heads() {
        let message = error_of("tiny-llama", |object| {
            object.insert("num_key_value_heads".into(), json!(3));
        });
        assert!(
            message.contains("invalid field `num_key_value_heads`"),
            "{message}"
        );
        assert!(
            message.contains("(8)") && message.contains("(3)"),
            "{message}"
        );
    }

    #[test]
    fn top_k_cannot_exceed_the_experts() {
        let message = error_of("tiny-mixtral", |object| {
            object.insert("num_experts_per_tok".into(), json!(5));
        });
        assert!(message.contains("`num_experts_per_tok` (5)"), "{message}");
        assert!(message.contains("`num_local_experts` (4)"), "{message}");
    }

    #[test]
    fn zero_sizes_are_errors() {
        let message = error_of("tiny-llama", |object| {
            object.insert("vocab_size".into(), json!(0));
        });
        assert!(message.contains("`vocab_size`"), "{message}");
        let message = error_of("tiny-llama", |object| {
            object.remove("head_dim");
            object.insert("num_attention_heads".into(), json!(0));
        });
        assert!(message.contains("`num_attention_heads`"), "{message}");
        let message = error_of("qwen3-30b-a3b", |object| {
            object.insert("decoder_sparse_step".into(), json!(0));
        });
        assert!(message.contains("`decoder_sparse_step`"), "{message}");
    }

    #[test]
    fn negative_numbers_are_errors() {
        let message = error_of("tiny-llama", |object| {
            object.insert("num_hidden_layers".into(), json!(-2));
        });
        assert!(message.contains("`num_hidden_layers`"), "{message}");
        assert!(message.contains("non-negative integer"), "{message}");
    }

    #[test]
    fn integer_and_unknown_dtypes_are_rejected() {
        for dtype in ["int8", "float64"] {
            let message = error_of("tiny-llama", |object| {
                object.insert("torch_dtype".into(), json!(dtype));
            });
            assert!(message.contains("`torch_dtype`"), "{message}");
            assert!(message.contains(dtype), "{message}");
        }
    }

    #[test]
    fn unknown_architectures_name_the_value_and_the_supported_ones() {
        let message = error_of("tiny-llama", |object| {
            object.insert("architectures".into(), json!(["GPT2LMHeadModel"]));
        });
        assert!(message.contains("GPT2LMHeadModel"), "{message}");
        assert!(message.contains("`architectures`"), "{message}");
        assert!(message.contains("Qwen3MoeForCausalLM"), "{message}");

        let message = error_of("tiny-llama", |object| {
            object.remove("architectures");
            object.insert("model_type".into(), json!("gpt2"));
        });
        assert!(message.contains("\"gpt2\""), "{message}");
        assert!(message.contains("`model_type`"), "{message}");
        assert!(message.contains("qwen2_moe"), "{message}");

        let message = error_of("tiny-llama", |object| {
            object.remove("architectures");
            object.remove("model_type");
        });
        assert!(
            message.contains("missing field `architectures`"),
            "{message}"
        );
    }

    #[test]
    fn unsupported_features_are_rejected() {
        let message = error_of("llama-3-8b", |object| {
            object.insert(
                "rope_scaling".into(),
                json!({"rope_type": "llama3", "factor": 8.0}),
            );
        });
        assert!(message.contains("`rope_scaling`"), "{message}");
        assert!(message.contains("llama3"), "{message}");
        let message = error_of("tiny-llama", |object| {
            object.insert("hidden_act".into(), json!("gelu"));
        });
        assert!(message.contains("`hidden_act`"), "{message}");
    }

    #[test]
    fn newer_transformers_field_spellings_are_read() {
        let text = edited_preset("tiny-llama", |object| {
            object.remove("rope_theta");
            object.remove("torch_dtype");
            object.insert(
                "rope_parameters".into(),
                json!({"rope_type": "default", "rope_theta": 500000.0}),
            );
            object.insert("dtype".into(), json!("float16"));
        });
        let config = ModelConfig::from_hf_json(&text, SOURCE).expect("valid config");
        assert_eq!(config.rope_theta, 500000.0);
        assert_eq!(config.dtype, DType::F16);
    }

    #[test]
    fn dense_layers_must_exist() {
        let message = error_of("qwen3-30b-a3b", |object| {
            object.insert("mlp_only_layers".into(), json!([0, 48]));
        });
        assert!(message.contains("`mlp_only_layers`"), "{message}");
        assert!(message.contains("48"), "{message}");
    }

    #[test]
    fn invalid_json_names_the_source_and_position() {
        let error = ModelConfig::from_hf_json("{\n  \"hidden_size\": 4096,\n}", SOURCE)
            .expect_err("trailing comma");
        let message = error.to_string();
        assert!(message.contains(SOURCE), "{message}");
        assert!(message.contains("line 3"), "{message}");
        assert!(matches!(error, ModelError::InvalidJson { line: 3, .. }));

        let message = ModelConfig::from_hf_json("[1, 2]", SOURCE)
            .expect_err("not an object")
            .to_string();
        assert!(
            message.contains(SOURCE) && message.contains("a list"),
            "{message}"
        );
    }

    #[test]
    fn validate_names_the_config_and_field() {
        let mut config = ModelConfig::preset("tiny-mixtral").expect("preset");
        if let Some(moe) = config.moe.as_mut() {
            moe.top_k = 0;
        }
        let message = config.validate().expect_err("top_k 0").to_string();
        assert!(message.starts_with("tiny-mixtral:"), "{message}");
        assert!(message.contains("`num_experts_per_tok`"), "{message}");

        let mut config = ModelConfig::preset("tiny-llama").expect("preset");
        config.dtype = DType::I4;
        let message = config.validate().expect_err("integer dtype").to_string();
        assert!(message.contains("`torch_dtype`"), "{message}");
    }

    #[test]
    fn unknown_preset_lists_the_presets() {
        let error = ModelConfig::load("no-such-model").expect_err("unknown");
        let message = error.to_string();
        assert!(message.contains("no-such-model"), "{message}");
        assert!(message.contains("tiny-mixtral"), "{message}");
        assert!(matches!(error, ModelError::UnknownPreset { .. }));
        let message = ModelConfig::preset("llama-9")
            .expect_err("unknown")
            .to_string();
        assert!(message.contains("qwen3-30b-a3b"), "{message}");
    }

    #[test]
    fn from_file_reads_a_file_or_a_model_directory() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let file = directory.path().join("config.json");
        std::fs::write(&file, QWEN2_MOE).expect("write config");

        let from_directory = ModelConfig::from_file(directory.path()).expect("directory");
        let from_file = ModelConfig::from_file(&file).expect("file");
        assert_eq!(from_directory, from_file);
        assert_eq!(from_file.name, file.display().to_string());
        assert_eq!(from_file.architecture, Architecture::Qwen2Moe);

        let spec = directory.path().to_str().expect("UTF-8 temporary path");
        assert_eq!(ModelConfig::load(spec).expect("load by path"), from_file);
    }

    #[test]
    fn from_file_errors_name_the_path() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let missing = directory.path().join("absent").join("config.json");
        let error = ModelConfig::from_file(&missing).expect_err("missing file");
        assert!(matches!(error, ModelError::Io { .. }));
        let message = error.to_string();
        assert!(
            message.contains(&missing.display().to_string()),
            "{message}"
        );

        // A directory without a config.json names the file it looked for.
        let message = ModelConfig::from_file(directory.path())
            .expect_err("empty directory")
            .to_string();
        assert!(message.contains("config.json"), "{message}");

        let broken = directory.path().join("broken.json");
        std::fs::write(&broken, "{ \"hidden_size\": ").expect("write config");
        let message = ModelConfig::from_file(&broken)
            .expect_err("truncated JSON")
            .to_string();
        assert!(message.contains(&broken.display().to_string()), "{message}");
    }

    #[test]
    fn configs_round_trip_through_serde() {
        let config = ModelConfig::preset("qwen3-30b-a3b").expect("preset");
        let text = serde_json::to_string(&config).expect("serialize");
        assert!(text.contains("\"qwen3-moe\""), "{text}");
        let back: ModelConfig = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, config);
        assert_eq!(Architecture::Qwen2Moe.to_string(), "qwen2-moe");
    }
}
