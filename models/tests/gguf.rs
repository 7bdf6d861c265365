//! GGUF loading: round trips of tiny models written as GGUF in every supported tensor type,
//! and one test per kind of bad input. The files are made by a small GGUF writer and
//! reference quantizers here in the test (llama.cpp's block definitions), independent of the
//! reader under test.

use kiln_ir::dtype::DType;
use kiln_ir::graph::TensorType;
use kiln_ir::weights::Weights;
use kiln_models::gguf::{GgufError, GgufFile, MetadataValue};
use kiln_models::weights::WeightsIo;
use kiln_models::{build_model, Architecture, ModelConfig, Phase};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------
// A minimal GGUF writer.

/// A metadata value to write.
#[derive(Clone, Debug)]
enum Meta {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type id and elements (all of that type).
    Array(u32, Vec<Meta>),
    /// A value type id with raw bytes, for malformed values.
    Raw(u32, Vec<u8>),
}

impl Meta {
    fn type_id(&self) -> u32 {
        match self {
            Meta::U32(_) => 4,
            Meta::I32(_) => 5,
            Meta::F32(_) => 6,
            Meta::Bool(_) => 7,
            Meta::Str(_) => 8,
            Meta::Array(..) => 9,
            Meta::Raw(id, _) => *id,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Meta::U32(v) => out.extend(v.to_le_bytes()),
            Meta::I32(v) => out.extend(v.to_le_bytes()),
            Meta::F32(v) => out.extend(v.to_le_bytes()),
            Meta::Bool(v) => out.push(*v as u8),
            Meta::Str(s) => put_string(out, s),
            Meta::Array(element, items) => {
                out.extend(element.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    item.encode(out);
                }
            }
            Meta::Raw(_, bytes) => out.extend(bytes),
        }
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn strings(items: &[&str]) -> Meta {
    Meta::Array(8, items.iter().map(|s| Meta::Str(s.to_string())).collect())
}

/// One tensor to write: `ne` innermost first, as GGUF lists it.
#[derive(Clone, Debug)]
struct Entry {
    name: String,
    ne: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
    /// Write this offset instead of the computed one.
    offset: Option<u64>,
}

#[derive(Clone, Debug)]
struct GgufWriter {
    version: u32,
    alignment: usize,
    metadata: Vec<(String, Meta)>,
    tensors: Vec<Entry>,
}

impl GgufWriter {
    fn new() -> GgufWriter {
        GgufWriter {
            version: 3,
            alignment: 32,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn meta(&mut self, key: &str, value: Meta) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value));
        self
    }

    fn remove_meta(&mut self, key: &str) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self
    }

    /// A row-major tensor of `shape` (outermost first) stored as `format`.
    fn tensor(&mut self, name: &str, shape: &[usize], values: &[f32], format: Format) -> &mut Self {
        let data = format.encode(values, *shape.last().unwrap());
        self.raw_tensor(name, shape, format.type_id(), data)
    }

    fn raw_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        type_id: u32,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors.retain(|t| t.name != name);
        self.tensors.push(Entry {
            name: name.to_string(),
            ne: shape.iter().rev().map(|&n| n as u64).collect(),
            type_id,
            data,
            offset: None,
        });
        self
    }

    fn entry(&mut self, name: &str) -> &mut Entry {
        self.tensors.iter_mut().find(|t| t.name == name).unwrap()
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut out, key);
            out.extend(value.type_id().to_le_bytes());
            value.encode(&mut out);
        }
        let align = |n: usize| n.div_ceil(self.alignment) * self.alignment;
        let mut offset = 0;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            offsets.push(offset);
            offset = align(offset + t.data.len());
        }
        for (t, &computed) in self.tensors.iter().zip(&offsets) {
            put_string(&mut out, &t.name);
            out.extend((t.ne.len() as u32).to_le_bytes());
            for n in &t.ne {
                out.extend(n.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(t.offset.unwrap_or(computed as u64).to_le_bytes());
        }
        out.resize(align(out.len()), 0);
        let start = out.len();
        for (t, &computed) in self.tensors.iter().zip(&offsets) {
            out.resize(start + computed, 0);
            out.extend(&t.data);
        }
        out
    }

    fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, self.bytes()).unwrap();
        path
    }
}

// ---------------------------------------------------------------------------------------
// Reference tensor formats (llama.cpp's `quantize_row_*_ref`).

#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

impl Format {
    const ALL: [Format; 6] = [
        Format::F32,
        Format::F16,
        Format::Bf16,
        Format::Q8_0,
        Format::Q4_0,
        Format::Q4_1,
    ];

    fn type_id(self) -> u32 {
        match self {
            Format::F32 => 0,
            Format::F16 => 1,
            Format::Q4_0 => 2,
            Format::Q4_1 => 3,
            Format::Q8_0 => 8,
            Format::Bf16 => 30,
        }
    }

    fn encode(self, values: &[f32], row: usize) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Format::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Format::F16 => values.iter().for_each(|&v| out.extend(f16_bytes(v))),
            Format::Bf16 => values
                .iter()
                .for_each(|&v| out.extend(half::bf16::from_f32(v).to_le_bytes())),
            _ => {
                assert_eq!(row % 32, 0, "quantized rows are whole blocks");
                for block in values.chunks(32) {
                    self.encode_block(block, &mut out);
                }
            }
        }
        out
    }

    fn encode_block(self, x: &[f32], out: &mut Vec<u8>) {
        match self {
            Format::Q8_0 => {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
            }
            Format::Q4_0 => {
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in x {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
            }
            Format::Q4_1 => {
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                out.extend(f16_bytes(min));
                let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
            }
            _ => unreachable!("float formats have no blocks"),
        }
    }

    /// The largest dequantization error this format allows for `value` in the 32-block
    /// `block` (llama.cpp's quantizers; f16-rounded scales).
    fn bound(self, value: f32, block: &[f32]) -> f32 {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale_rounding = 2f32.powi(-10);
        match self {
            Format::F32 => 0.0,
            Format::F16 => value.abs() * 2f32.powi(-11) + 1e-7,
            Format::Bf16 => value.abs() * 2f32.powi(-8),
            Format::Q8_0 => {
                let d = amax / 127.0;
                d * 0.5 + 127.0 * d * scale_rounding
            }
            // The value of largest magnitude's opposite clamps at q = 15: a whole step.
            Format::Q4_0 => {
                let d = amax / 8.0;
                d + 8.0 * d * scale_rounding
            }
            Format::Q4_1 => {
                let min = block.iter().copied().fold(f32::INFINITY, f32::min);
                let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                d * 0.5 + 15.0 * d * scale_rounding + min.abs() * scale_rounding
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tiny models as GGUF.

fn tiny_config(architecture: &str, extra: &str) -> ModelConfig {
    let text = format!(
        r#"{{"architectures": ["{architecture}"], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 128, "rms_norm_eps": 1e-5, "rope_theta": 50000.0,
        "max_position_embeddings": 1024, "torch_dtype": "float32"{extra}}}"#
    );
    ModelConfig::from_hf_json(&text, "test config").unwrap()
}

fn expected_f32(config: &ModelConfig) -> Vec<(String, TensorType)> {
    let mut config = config.clone();
    config.dtype = DType::F32;
    build_model(&config, Phase::Decode)
        .unwrap()
        .weights()
        .map(|(name, ty)| (name.to_string(), ty.clone()))
        .collect()
}

/// The GGUF name of a kiln weight, written out independently of the loader's map.
fn gguf_name(name: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(hf, _)| *hf == name) {
        return g.to_string();
    }
    let rest = name.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let parts = [
        ("input_layernorm.weight", "attn_norm.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.q_proj.bias", "attn_q.bias"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.k_proj.bias", "attn_k.bias"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.v_proj.bias", "attn_v.bias"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
        ("block_sparse_moe.gate.weight", "ffn_gate_inp.weight"),
    ];
    let (_, g) = parts
        .iter()
        .find(|(hf, _)| *hf == rest)
        .unwrap_or_else(|| panic!("no GGUF name for {name}"));
    format!("blk.{layer}.{g}")
}

/// HF's `permute(w, n_head)`: `w.reshape(n_head, 2, rows / n_head / 2, columns)
/// .swapaxes(1, 2).reshape(w.shape)`.
fn hf_permute(w: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
    let columns = w.len() / rows;
    let half = rows / n_head / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for j in 0..half {
            for t in 0..2 {
                let row = (h * 2 + t) * half + j;
                out.extend_from_slice(&w[row * columns..(row + 1) * columns]);
            }
        }
    }
    out
}

/// The metadata llama.cpp writes for `config`.
fn write_metadata(writer: &mut GgufWriter, config: &ModelConfig, arch: &str) {
    let key = |suffix: &str| format!("{arch}.{suffix}");
    writer
        .meta("general.architecture", Meta::Str(arch.into()))
        .meta("general.name", Meta::Str("tiny".into()))
        .meta(&key("block_count"), Meta::U32(config.num_layers as u32))
        .meta(
            &key("context_length"),
            Meta::U32(config.max_position_embeddings as u32),
        )
        .meta(
            &key("embedding_length"),
            Meta::U32(config.hidden_size as u32),
        )
        .meta(
            &key("feed_forward_length"),
            Meta::U32(config.intermediate_size as u32),
        )
        .meta(
            &key("attention.head_count"),
            Meta::U32(config.num_attention_heads as u32),
        )
        .meta(
            &key("attention.head_count_kv"),
            Meta::U32(config.num_kv_heads as u32),
        )
        .meta(&key("rope.freq_base"), Meta::F32(config.rope_theta))
        .meta(
            &key("rope.dimension_count"),
            Meta::U32(config.head_dim as u32),
        )
        .meta(
            &key("attention.layer_norm_rms_epsilon"),
            Meta::F32(config.rms_norm_eps),
        )
        .meta(&key("vocab_size"), Meta::U32(config.vocab_size as u32));
    if let Some(moe) = &config.moe {
        writer
            .meta(&key("expert_count"), Meta::U32(moe.num_experts as u32))
            .meta(&key("expert_used_count"), Meta::U32(moe.top_k as u32));
    }
}

/// Writes `weights` of a llama/qwen2 `config` as a GGUF file: 1-D tensors as F32 (as
/// llama.cpp does), matrices as `format`; q/k rows permuted for llama.
fn model_writer(config: &ModelConfig, arch: &str, weights: &Weights, format: Format) -> GgufWriter {
    let mut writer = GgufWriter::new();
    write_metadata(&mut writer, config, arch);
    let mut names: Vec<&str> = weights.iter().map(|(n, _)| n).collect();
    names.sort();
    for name in names {
        let tensor = weights.get(name).unwrap();
        let mut values = tensor.data.clone();
        if arch == "llama" {
            if name.contains("q_proj") {
                values = hf_permute(&values, tensor.shape[0], config.num_attention_heads);
            } else if name.contains("k_proj") {
                values = hf_permute(&values, tensor.shape[0], config.num_kv_heads);
            }
        }
        let format = if tensor.shape.len() == 1 {
            Format::F32
        } else {
            format
        };
        writer.tensor(&gguf_name(name), &tensor.shape, &values, format);
    }
    writer
}

/// Every loaded value within `format`'s bound of the source (blocks along the rows).
fn assert_close(source: &Weights, loaded: &Weights, format: Format) {
    assert_eq!(loaded.len(), source.len());
    for (name, want) in source.iter() {
        let got = loaded
            .get(name)
            .unwrap_or_else(|| panic!("{name} not loaded"));
        assert_eq!(got.shape, want.shape, "{name}");
        let format = if want.shape.len() == 1 {
            Format::F32
        } else {
            format
        };
        let row = *want.shape.last().unwrap();
        for (i, (&g, &w)) in got.data.iter().zip(&want.data).enumerate() {
            let block_start = i / 32 * 32;
            let block = &want.data[block_start..(block_start + 32).min(want.data.len())];
            let block = if row % 32 == 0 {
                block
            } else {
                &want.data[i..=i]
            };
            let bound = format.bound(w, block);
            assert!(
                (g - w).abs() <= bound,
                "{name}[{i}] ({format:?}): loaded {g}, source {w}, bound {bound}"
            );
        }
    }
}

fn err_text<T: std::fmt::Debug>(result: Result<T, GgufError>) -> String {
    result.expect_err("expected an error").to_string()
}

// ---------------------------------------------------------------------------------------
// Round trips.

#[test]
fn llama_round_trips_in_every_tensor_type() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config("LlamaForCausalLM", "");
    let expected = expected_f32(&config);
    let source = Weights::random(&expected, 7).unwrap();
    for format in Format::ALL {
        let path = model_writer(&config, "llama", &source, format)
            .write(dir.path(), &format!("{format:?}.gguf"));
        let file = GgufFile::open(&path).unwrap();
        let loaded_config = file.model_config().unwrap();
        let mut want = config.clone();
        want.name = path.display().to_string();
        want.dtype = match format {
            Format::F32 => DType::F32,
            Format::Bf16 => DType::BF16,
            _ => DType::F16,
        };
        assert_eq!(loaded_config, want, "{format:?}");
        let loaded = file.load_weights(&expected).unwrap();
        assert_close(&source, &loaded, format);
    }
}

#[test]
fn quantized_round_trip_is_lossy_but_close_and_unpermuted() {
    // The Q/K rows come back in Hugging Face order: an unpermuted load would be far off.
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config("LlamaForCausalLM", "");
    let expected = expected_f32(&config);
    let source = Weights::random(&expected, 3).unwrap();
    let path = model_writer(&config, "llama", &source, Format::Q8_0).write(dir.path(), "q.gguf");
    let loaded = GgufFile::open(&path)
        .unwrap()
        .load_weights(&expected)
        .unwrap();
    let q = "model.layers.1.self_attn.q_proj.weight";
    let (want, got) = (source.get(q).unwrap(), loaded.get(q).unwrap());
    assert_ne!(want.data, got.data, "Q8_0 is lossy");
    assert!(
        got.relative_error(want) < 0.02,
        "{}",
        got.relative_error(want)
    );
    let file_order = hf_permute(&want.data, want.shape[0], config.num_attention_heads);
    let misordered = kiln_ir::tensor::Tensor::f32(&want.shape, file_order);
    assert!(got.relative_error(&misordered) > 0.5);
}

#[test]
fn weights_round_to_the_expected_dtype_and_report_progress() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config("LlamaForCausalLM", "");
    let source = Weights::random(&expected_f32(&config), 5).unwrap();
    let path = model_writer(&config, "llama", &source, Format::Q4_1).write(dir.path(), "q41.gguf");
    let file = GgufFile::open(&path).unwrap();
    let config = file.model_config().unwrap();
    assert_eq!(config.dtype, DType::F16);
    let graph = build_model(&config, Phase::Prefill).unwrap();
    let expected: Vec<_> = graph
        .weights()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    let mut reports = Vec::new();
    let loaded = file
        .load_weights_with_progress(&expected, |p| {
            reports.push((
                p.weight.map(str::to_string),
                p.loaded,
                p.total,
                p.bytes_read,
                p.total_bytes,
            ))
        })
        .unwrap();
    let f32_loaded = file.load_weights(&expected_f32(&config)).unwrap();
    for (name, tensor) in loaded.iter() {
        assert_eq!(tensor.dtype, DType::F16, "{name}");
        let exact = f32_loaded.get(name).unwrap();
        let rounded: Vec<f32> = exact.data.iter().map(|&v| DType::F16.round(v)).collect();
        assert_eq!(tensor.data, rounded, "{name}");
    }
    assert_eq!(reports.len(), expected.len() + 1);
    assert_eq!(reports[0].0, None);
    let last = reports.last().unwrap();
    assert_eq!((last.1, last.2), (expected.len(), expected.len()));
    assert_eq!(last.3, last.4);
    assert!(last.4 > 0);
}

#[test]
fn tied_embeddings_when_there_is_no_output_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config("LlamaForCausalLM", r#", "tie_word_embeddings": true"#);
    let expected = expected_f32(&config);
    assert!(!expected.iter().any(|(n, _)| n == "lm_head.weight"));
    let source = Weights::random(&expected, 1).unwrap();
    let path = model_writer(&config, "llama", &source, Format::F16).write(dir.path(), "t.gguf");
    let file = GgufFile::open(&path).unwrap();
    assert!(file.model_config().unwrap().tie_word_embeddings);
    assert_close(&source, &file.load_weights(&expected).unwrap(), Format::F16);
}

#[test]
fn qwen2_has_biases_and_no_permutation() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config("Qwen2ForCausalLM", "");
    assert!(config.attention_bias);
    let expected = expected_f32(&config);
    assert!(expected.iter().any(|(n, _)| n.ends_with("q_proj.bias")));
    let source = Weights::random(&expected, 2).unwrap();
    let path = model_writer(&config, "qwen2", &source, Format::F32).write(dir.path(), "q.gguf");
    let file = GgufFile::open(&path).unwrap();
    let loaded_config = file.model_config().unwrap();
    assert_eq!(loaded_config.architecture, Architecture::Qwen2);
    assert!(loaded_config.attention_bias);
    assert_eq!(file.load_weights(&expected).unwrap(), source);
}

#[test]
fn llama_biases_are_permuted_like_their_weights() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config("LlamaForCausalLM", r#", "attention_bias": true"#);
    let expected = expected_f32(&config);
    let source = Weights::random(&expected, 4).unwrap();
    // model_writer permutes the q/k biases with their weights, as the converter does.
    let writer = model_writer(&config, "llama", &source, Format::F32);
    let path = writer.write(dir.path(), "b.gguf");
    let file = GgufFile::open(&path).unwrap();
    assert!(file.model_config().unwrap().attention_bias);
    assert_eq!(file.load_weights(&expected).unwrap(), source);
}

/// Writes a tiny Mixtral: experts stacked in 3-D tensors (`stacked`) or one tensor each.
fn mixtral_writer(
    config: &ModelConfig,
    source: &Weights,
    stacked: bool,
    format: Format,
) -> GgufWriter {
    let mut dense = Weights::new();
    for (name, tensor) in source.iter() {
        if !name.contains(".experts.") {
            dense.insert(name, tensor.clone());
        }
    }
    let mut writer = model_writer(config, "llama", &dense, format);
    let moe = config.moe.as_ref().unwrap();
    for layer in 0..config.num_layers {
        for (hf, gguf) in [("w1", "ffn_gate"), ("w3", "ffn_up"), ("w2", "ffn_down")] {
            let expert = |e: usize| {
                source
                    .get(&format!(
                        "model.layers.{layer}.block_sparse_moe.experts.{e}.{hf}.weight"
                    ))
                    .unwrap()
            };
            if stacked {
                let shape = expert(0).shape.clone();
                let values: Vec<f32> = (0..moe.num_experts)
                    .flat_map(|e| expert(e).data.clone())
                    .collect();
                let stacked_shape = [moe.num_experts, shape[0], shape[1]];
                writer.tensor(
                    &format!("blk.{layer}.{gguf}_exps.weight"),
                    &stacked_shape,
                    &values,
                    format,
                );
            } else {
                for e in 0..moe.num_experts {
                    let t = expert(e);
                    writer.tensor(
                        &format!("blk.{layer}.{gguf}.{e}.weight"),
                        &t.shape,
                        &t.data,
                        format,
                    );
                }
            }
        }
    }
    writer
}

#[test]
fn mixtral_experts_load_stacked_or_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(
        "MixtralForCausalLM",
        r#", "num_local_experts": 4, "num_experts_per_tok": 2"#,
    );
    let expected = expected_f32(&config);
    let source = Weights::random(&expected, 9).unwrap();
    for (stacked, format) in [
        (true, Format::Q8_0),
        (false, Format::F32),
        (true, Format::F16),
    ] {
        let path = mixtral_writer(&config, &source, stacked, format)
            .write(dir.path(), &format!("m{stacked}{format:?}.gguf"));
        let file = GgufFile::open(&path).unwrap();
        let mut want = config.clone();
        want.name = path.display().to_string();
        want.dtype = if format == Format::F32 {
            DType::F32
        } else {
            DType::F16
        };
        assert_eq!(file.model_config().unwrap(), want);
        assert_close(&source, &file.load_weights(&expected).unwrap(), format);
    }
}

#[test]
fn tokenizer_metadata_is_exposed() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = GgufWriter::new();
    writer
        .meta("tokenizer.ggml.model", Meta::Str("gpt2".into()))
        .meta("tokenizer.ggml.pre", Meta::Str("smollm".into()))
        .meta(
            "tokenizer.ggml.tokens",
            strings(&["<unk>", "<s>", "</s>", "a", "b", "ab"]),
        )
        .meta(
            "tokenizer.ggml.token_type",
            Meta::Array(5, [2, 3, 3, 1, 1, 1].map(Meta::I32).to_vec()),
        )
        .meta("tokenizer.ggml.merges", strings(&["a b"]))
        .meta("tokenizer.ggml.bos_token_id", Meta::U32(1))
        .meta("tokenizer.ggml.eos_token_id", Meta::U32(2))
        .meta("tokenizer.ggml.unknown_token_id", Meta::U32(0))
        .meta("tokenizer.ggml.add_bos_token", Meta::Bool(false))
        .meta(
            "tokenizer.chat_template",
            Meta::Str("{{ messages }}".into()),
        );
    let path = writer.write(dir.path(), "tok.gguf");
    let file = GgufFile::open(&path).unwrap();
    let tokenizer = file.tokenizer_data().unwrap();
    assert_eq!(tokenizer.model, "gpt2");
    assert_eq!(tokenizer.pre.as_deref(), Some("smollm"));
    assert_eq!(tokenizer.vocab, ["<unk>", "<s>", "</s>", "a", "b", "ab"]);
    assert_eq!(tokenizer.token_types, Some(vec![2, 3, 3, 1, 1, 1]));
    assert_eq!(tokenizer.merges, ["a b"]);
    assert_eq!(tokenizer.scores, None);
    assert_eq!(
        (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.unknown_token_id
        ),
        (Some(1), Some(2), Some(0))
    );
    assert_eq!(tokenizer.padding_token_id, None);
    assert_eq!(tokenizer.add_bos, Some(false));
    assert_eq!(tokenizer.chat_template.as_deref(), Some("{{ messages }}"));
    assert_eq!(
        file.metadata_value("tokenizer.ggml.bos_token_id"),
        Some(&MetadataValue::U32(1))
    );

    // Ids outside the vocabulary and lists of the wrong length are errors naming the key.
    writer.meta("tokenizer.ggml.eos_token_id", Meta::U32(6));
    let path = writer.write(dir.path(), "bad-id.gguf");
    let msg = err_text(GgufFile::open(&path).unwrap().tokenizer_data());
    assert!(
        msg.contains("tokenizer.ggml.eos_token_id") && msg.contains("6"),
        "{msg}"
    );
    writer
        .meta("tokenizer.ggml.eos_token_id", Meta::U32(2))
        .meta(
            "tokenizer.ggml.token_type",
            Meta::Array(5, vec![Meta::I32(1)]),
        );
    let path = writer.write(dir.path(), "bad-types.gguf");
    let msg = err_text(GgufFile::open(&path).unwrap().tokenizer_data());
    assert!(
        msg.contains("tokenizer.ggml.token_type") && msg.contains("has 1 entries"),
        "{msg}"
    );
    writer.remove_meta("tokenizer.ggml.tokens");
    let path = writer.write(dir.path(), "no-tokens.gguf");
    let msg = err_text(GgufFile::open(&path).unwrap().tokenizer_data());
    assert!(
        msg.contains("missing metadata key `tokenizer.ggml.tokens`"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------
// Bad inputs.

/// A small valid llama file and its config and expected weights.
fn small_model() -> (GgufWriter, ModelConfig, Vec<(String, TensorType)>) {
    let config = tiny_config("LlamaForCausalLM", "");
    let expected = expected_f32(&config);
    let source = Weights::random(&expected, 0).unwrap();
    let writer = model_writer(&config, "llama", &source, Format::Q4_0);
    (writer, config, expected)
}

#[test]
fn bad_magic_and_unsupported_versions_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    for content in [&b"GGML\x03\0\0\0"[..], b"", b"GG"] {
        std::fs::write(&path, content).unwrap();
        let msg = err_text(GgufFile::open(&path));
        assert!(
            msg.contains("x.gguf") && msg.contains("not a GGUF file"),
            "{msg}"
        );
    }
    let mut writer = GgufWriter::new();
    for (version, hint) in [(1, false), (4, false), (3u32.swap_bytes(), true)] {
        writer.version = version;
        let path = writer.write(dir.path(), "v.gguf");
        let msg = err_text(GgufFile::open(&path));
        assert!(
            msg.contains(&format!("unsupported GGUF version {version}")),
            "{msg}"
        );
        assert_eq!(msg.contains("big-endian"), hint, "{msg}");
    }
    writer.version = 2;
    assert_eq!(
        GgufFile::open(&writer.write(dir.path(), "v2.gguf"))
            .unwrap()
            .version(),
        2
    );
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = GgufWriter::new();
    writer
        .meta("general.architecture", Meta::Str("llama".into()))
        .meta("tokenizer.ggml.tokens", strings(&["a", "bc"]))
        .tensor("x.weight", &[2, 32], &[0.5; 64], Format::Q8_0)
        .tensor("y.weight", &[3], &[1.0; 3], Format::F32);
    let bytes = writer.bytes();
    let path = dir.path().join("cut.gguf");
    for len in 0..bytes.len() {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let msg = err_text(GgufFile::open(&path));
        assert!(msg.contains("cut.gguf"), "{len}: {msg}");
        if len >= 8 {
            assert!(msg.contains("truncated"), "{len}: {msg}");
        }
    }
    std::fs::write(&path, &bytes).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.tensors().len(), 2);
    assert_eq!(file.tensor("x.weight").unwrap().shape, vec![2, 32]);
    // Truncated in the tensor data: the message names the tensor.
    std::fs::write(&path, &bytes[..bytes.len() - 13]).unwrap();
    let msg = err_text(GgufFile::open(&path));
    assert!(msg.contains("truncated data of tensor `y.weight`"), "{msg}");
}

#[test]
fn counts_larger_than_the_file_are_truncation_not_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    put_string(&mut bytes, "huge");
    bytes.extend(9u32.to_le_bytes()); // array
    bytes.extend(10u32.to_le_bytes()); // of u64
    bytes.extend((u64::MAX / 2).to_le_bytes());
    let path = dir.path().join("huge.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let msg = err_text(GgufFile::open(&path));
    assert!(
        msg.contains("truncated array") && msg.contains("`huge`"),
        "{msg}"
    );

    // A string length beyond the file, and a metadata count beyond it.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let msg = err_text(GgufFile::open(&path));
    assert!(msg.contains("truncated metadata entry #0"), "{msg}");
}

#[test]
fn malformed_metadata_and_tensor_entries_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let open = |writer: &GgufWriter| err_text(GgufFile::open(&writer.write(dir.path(), "m.gguf")));

    let mut writer = GgufWriter::new();
    writer.meta("k", Meta::Raw(13, vec![0; 8]));
    let msg = open(&writer);
    assert!(
        msg.contains("metadata `k`") && msg.contains("unknown value type 13"),
        "{msg}"
    );
    writer.meta("k", Meta::Raw(7, vec![2]));
    assert!(open(&writer).contains("bool byte is 2"));
    writer.meta(
        "k",
        Meta::Raw(8, [2u64.to_le_bytes().to_vec(), vec![0xff, 0xfe]].concat()),
    );
    assert!(open(&writer).contains("not valid UTF-8"));
    writer.metadata = vec![("k".into(), Meta::U32(1)), ("k".into(), Meta::U32(2))];
    assert!(open(&writer).contains("appears twice"));
    writer.metadata.clear();
    writer.meta("general.alignment", Meta::U32(24));
    assert!(open(&writer).contains("general.alignment"));

    let mut writer = GgufWriter::new();
    writer.tensor("t", &[1, 32], &[0.0; 32], Format::F32);
    writer.entry("t").offset = Some(7);
    let msg = open(&writer);
    assert!(
        msg.contains("tensor `t`") && msg.contains("not a multiple of the alignment 32"),
        "{msg}"
    );
    writer.entry("t").offset = Some(1 << 40);
    let msg = open(&writer);
    assert!(msg.contains("truncated data of tensor `t`"), "{msg}");
    writer.entry("t").offset = None;
    writer.entry("t").ne = vec![1, 1, 1, 1, 1];
    assert!(open(&writer).contains("has 5 dimensions"));
    writer.entry("t").ne = vec![u64::MAX, 4];
    assert!(open(&writer).contains("too many elements") || open(&writer).contains("too large"));
    // Q8_0 rows must be whole blocks.
    writer.raw_tensor("t", &[2, 16], 8, vec![0; 34]);
    let msg = open(&writer);
    assert!(
        msg.contains("rows of 16 values do not split into blocks of 32"),
        "{msg}"
    );
}

#[test]
fn unsupported_tensor_types_are_named_by_ggml_type_id() {
    let dir = tempfile::tempdir().unwrap();
    let (mut writer, config, expected) = small_model();
    // Q4_K (12) and an id ggml does not define (99): named when the weight is loaded.
    for (type_id, name) in [(12u32, "Q4_K"), (99, "unknown")] {
        writer.entry("blk.1.ffn_up.weight").type_id = type_id;
        let file = GgufFile::open(&writer.write(dir.path(), "k.gguf")).unwrap();
        assert_eq!(file.model_config().unwrap().hidden_size, config.hidden_size);
        let msg = err_text(file.load_weights(&expected));
        assert!(msg.contains("tensor `blk.1.ffn_up.weight`"), "{msg}");
        assert!(
            msg.contains(&format!("GGML type {name} (type id {type_id})")),
            "{msg}"
        );
        assert!(msg.contains("Q4_0"), "{msg}");
    }
}

#[test]
fn shape_mismatch_names_the_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut writer, _, expected) = small_model();
    writer.tensor(
        "blk.0.ffn_gate.weight",
        &[64, 96],
        &[0.0; 64 * 96],
        Format::F16,
    );
    let file = GgufFile::open(&writer.write(dir.path(), "s.gguf")).unwrap();
    let msg = err_text(file.load_weights(&expected));
    assert!(msg.contains("tensor `blk.0.ffn_gate.weight`"), "{msg}");
    assert!(msg.contains("model.layers.0.mlp.gate_proj.weight"), "{msg}");
    assert!(
        msg.contains("[64, 96]") && msg.contains("expected [96, 64]"),
        "{msg}"
    );

    // A vocabulary size that disagrees with the embedding.
    let (mut writer, _, _) = small_model();
    writer.meta("llama.vocab_size", Meta::U32(100));
    let file = GgufFile::open(&writer.write(dir.path(), "v.gguf")).unwrap();
    let msg = err_text(file.model_config());
    assert!(
        msg.contains("llama.vocab_size") && msg.contains("128 rows"),
        "{msg}"
    );
}

#[test]
fn missing_keys_tensors_and_unsupported_models_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config_error = |writer: &GgufWriter| {
        err_text(
            GgufFile::open(&writer.write(dir.path(), "c.gguf"))
                .unwrap()
                .model_config(),
        )
    };
    for key in [
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.head_count",
        "llama.attention.layer_norm_rms_epsilon",
        "general.architecture",
    ] {
        let (mut writer, _, _) = small_model();
        writer.remove_meta(key);
        let msg = config_error(&writer);
        assert!(
            msg.contains(&format!("missing metadata key `{key}`")),
            "{msg}"
        );
        assert!(msg.contains("c.gguf"), "{msg}");
    }
    let (mut writer, _, expected) = small_model();
    writer.meta("llama.block_count", Meta::Str("two".into()));
    let msg = config_error(&writer);
    assert!(
        msg.contains("llama.block_count") && msg.contains("non-negative integer"),
        "{msg}"
    );

    writer.meta("general.architecture", Meta::Str("gemma2".into()));
    let msg = config_error(&writer);
    assert!(msg.contains("unsupported architecture \"gemma2\""), "{msg}");
    assert!(msg.contains("llama") && msg.contains("qwen2"), "{msg}");

    let (mut writer, _, _) = small_model();
    writer.meta("llama.rope.scaling.type", Meta::Str("yarn".into()));
    assert!(config_error(&writer).contains("RoPE scaling"));
    let (mut writer, _, _) = small_model();
    writer.meta("llama.rope.dimension_count", Meta::U32(8));
    assert!(config_error(&writer).contains("partial rotary"));
    let (mut writer, _, _) = small_model();
    writer.meta("llama.attention.head_count_kv", Meta::U32(3));
    let msg = config_error(&writer);
    assert!(msg.contains("num_key_value_heads"), "{msg}");

    // A weight the graph expects but the file lacks.
    let (mut writer, _, _) = small_model();
    writer.tensors.retain(|t| t.name != "blk.1.attn_v.weight");
    let file = GgufFile::open(&writer.write(dir.path(), "t.gguf")).unwrap();
    let msg = err_text(file.load_weights(&expected));
    assert!(
        msg.contains("model.layers.1.self_attn.v_proj.weight"),
        "{msg}"
    );
    assert!(msg.contains("blk.1.attn_v.weight"), "{msg}");
    // A weight name GGUF has no equivalent for, and one expected as an integer.
    let odd = vec![(
        "model.layers.0.mlp.shared_expert.up_proj.weight".to_string(),
        expected[0].1.clone(),
    )];
    let msg = err_text(file.load_weights(&odd));
    assert!(msg.contains("no GGUF tensor name corresponds"), "{msg}");
    let mut int = expected[..1].to_vec();
    int[0].1.dtype = DType::I32;
    assert!(err_text(file.load_weights(&int)).contains("load only as f32, f16 or bf16"));
}
