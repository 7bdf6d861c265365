//! Artifacts: coverage of every prompt length, round trips, and each kind of bad input
//! refused with an error that names the file and the field.

use kiln_compiler::{Artifact, ArtifactError, ArtifactOptions, Target};
use kiln_ir::dtype::DType;
use kiln_ir::shape::Bindings;
use kiln_models::{ModelConfig, Phase};
use std::path::Path;

fn tiny_llama_bf16() -> ModelConfig {
    preset_bf16("tiny-llama")
}

fn preset_bf16(model: &str) -> ModelConfig {
    let mut config = ModelConfig::preset(model).unwrap();
    config.dtype = DType::BF16;
    config
}

/// The bf16 tiny-llama artifact for `target`, with the default sizes.
fn compiled(target: &str) -> Artifact {
    compiled_preset("tiny-llama", target)
}

/// The bf16 artifact of preset `model` for `target`, with the default sizes.
fn compiled_preset(model: &str, target: &str) -> Artifact {
    let options = ArtifactOptions {
        target: Target::from_name(target).unwrap(),
        ..ArtifactOptions::default()
    };
    Artifact::compile(&preset_bf16(model), &options).unwrap()
}

fn written(target: &str) -> (tempfile::TempDir, std::path::PathBuf, Artifact) {
    let artifact = compiled(target);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    artifact.write(&dir).unwrap();
    (root, dir, artifact)
}

#[test]
fn a_gpu_artifact_has_the_kernels_of_every_prompt_length() {
    let artifact = Artifact::compile(&tiny_llama_bf16(), &ArtifactOptions::default()).unwrap();
    assert!(
        artifact
            .plan(Phase::Prefill)
            .count_on(kiln_ir::schedule::Device::Gpu)
            > 0
    );
    for seq in (1..=40).chain([511, 1023, 1024, 3000]) {
        let bindings = Bindings::from_pairs(&[("batch", 1), ("seq", seq), ("ctx", 4096)]);
        let missing = artifact.missing_kernels(Phase::Prefill, &bindings);
        assert!(missing.is_empty(), "seq {seq}: {missing:?}");
    }
    for ctx in [256, 4096, 32768] {
        let bindings = Bindings::from_pairs(&[("batch", 1), ("ctx", ctx)]);
        let missing = artifact.missing_kernels(Phase::Decode, &bindings);
        assert!(missing.is_empty(), "ctx {ctx}: {missing:?}");
    }
    // A kernel the artifact lacks is reported with the step that launches it.
    let mut partial = artifact.clone();
    let dropped = partial.manifest.kernels.remove(0);
    let bindings = Bindings::from_pairs(&[("batch", 1), ("seq", 1024), ("ctx", 4096)]);
    let missing = [Phase::Prefill, Phase::Decode]
        .iter()
        .flat_map(|&phase| partial.missing_kernels(phase, &bindings))
        .chain((1..=9).flat_map(|seq| {
            let bindings = Bindings::from_pairs(&[("batch", 1), ("seq", seq), ("ctx", 4096)]);
            partial.missing_kernels(Phase::Prefill, &bindings)
        }))
        .collect::<Vec<_>>();
    assert!(
        missing.iter().any(|m| m.ends_with(&dropped.key)),
        "{} not reported: {missing:?}",
        dropped.key
    );
}

/// The tiny presets have head_dim 32, which the attention generators take: a GPU artifact
/// places every attention and KV-append step on the GPU (none falls back to the host) and
/// holds their head_dim-32 kernels.
#[test]
fn the_tiny_presets_head_dim_32_attention_is_placed_on_the_gpu() {
    use kiln_ir::schedule::{Device, Family};
    let config = tiny_llama_bf16();
    assert_eq!(config.head_dim, 32);
    let artifact = Artifact::compile(&config, &ArtifactOptions::default()).unwrap();
    for phase in [Phase::Prefill, Phase::Decode] {
        let steps: Vec<_> = artifact
            .plan(phase)
            .kernels
            .iter()
            .filter(|k| matches!(k.family, Family::Attention { .. } | Family::KvAppend { .. }))
            .collect();
        assert!(
            steps.len() >= 2,
            "{phase:?}: {} attention steps",
            steps.len()
        );
        for step in steps {
            assert_eq!(step.device, Device::Gpu, "{phase:?}: {}", step.name);
        }
    }
    let entries: Vec<&str> = artifact
        .manifest
        .kernels
        .iter()
        .map(|k| k.entry.as_str())
        .collect();
    for entry in [
        "prefill_attention_bf16_q8_kv2_d32",
        "attention_decode_dense_bf16_q8_kv2_d32",
        "attention_decode_merge_bf16_q8_d32",
        "kv_append_start_single_bf16_q2_kv2_d32",
    ] {
        assert!(
            entries.iter().any(|e| e.starts_with(entry)),
            "{entry}: {entries:?}"
        );
    }
}

#[test]
fn a_cpu_target_places_every_step_on_the_host() {
    use kiln_ir::schedule::FamilyKind;
    use kiln_kernels::cpu_step::CpuStep;
    let artifact = compiled("cpu");
    for phase in [Phase::Prefill, Phase::Decode] {
        assert_eq!(
            artifact
                .plan(phase)
                .count_on(kiln_ir::schedule::Device::Gpu),
            0
        );
        // The gather (and prefill's slice) are typed families, run as the host copies.
        for (kernel, step) in artifact
            .plan(phase)
            .kernels
            .iter()
            .zip(artifact.cpu_steps(phase))
        {
            match kernel.family.kind() {
                FamilyKind::Gather => assert_eq!(step, &Some(CpuStep::Gather)),
                FamilyKind::Slice => {
                    assert!(matches!(step, Some(CpuStep::Slice { .. })), "{step:?}")
                }
                _ => {}
            }
        }
    }
    assert!(artifact.manifest.kernels.is_empty());
}

/// The last host steps of the tiny presets have generators: a bf16 tiny-llama or
/// tiny-mixtral artifact for sm_90 runs every step of both phases on the GPU (the embedding
/// gather, prefill's last-token slice, decode's i32 `lengths = cache_start + 1` map and, for
/// tiny-mixtral, the four MoE stages included), and holds their kernels.
#[test]
fn bf16_tiny_preset_artifacts_for_sm_90_have_no_host_steps() {
    for model in ["tiny-llama", "tiny-mixtral"] {
        assert_no_host_steps(model);
    }
}

fn assert_no_host_steps(model: &str) {
    use kiln_ir::schedule::{Device, Family, FamilyKind};
    let artifact = compiled_preset(model, "sm_90");
    for phase in [Phase::Prefill, Phase::Decode] {
        let plan = artifact.plan(phase);
        let on_cpu: Vec<String> = plan
            .kernels
            .iter()
            .filter(|k| k.device == Device::Cpu)
            .map(|k| format!("{} ({})", k.name, k.family.describe()))
            .collect();
        assert!(
            on_cpu.is_empty(),
            "{model} {phase:?}: host steps {on_cpu:?}"
        );
        assert_eq!(plan.count_on(Device::Cpu), 0);
        assert!(artifact.cpu_steps(phase).iter().all(Option::is_none));
        let kinds: Vec<FamilyKind> = plan.kernels.iter().map(|k| k.family.kind()).collect();
        assert!(kinds.contains(&FamilyKind::Gather), "{phase:?}");
        assert!(!kinds.contains(&FamilyKind::HostOnly), "{phase:?}");
        match phase {
            Phase::Prefill => assert!(kinds.contains(&FamilyKind::Slice)),
            Phase::Decode => assert!(plan.kernels.iter().any(|k| matches!(
                &k.family,
                Family::Map { dtype: DType::I32, scalar_operands, .. } if !scalar_operands.is_empty()
            ))),
        }
    }
    let entries: Vec<&str> = artifact
        .manifest
        .kernels
        .iter()
        .map(|k| k.entry.as_str())
        .collect();
    let mut expected = vec!["gather_bf16_h", "slice_bf16_h", "elementwise_i32_2in_s1_"];
    if model == "tiny-mixtral" {
        expected.extend([
            "moe_router_",
            "moe_dispatch_",
            "moe_gate_up_",
            "moe_down_",
            "moe_combine_",
        ]);
    }
    for entry in expected {
        assert!(
            entries.iter().any(|e| e.starts_with(entry)),
            "{model}: {entry}: {entries:?}"
        );
    }
}

/// tiny-mixtral's MoE layers are plan steps like any other: the router, dispatch and
/// combine one launch each, the expert FFN its two stages through a workspace, every
/// expert's gate, up and down weights bound to the step's operands in the op's order.
#[test]
fn the_moe_expert_ffn_step_binds_every_experts_weights() {
    use kiln_ir::schedule::{Family, MoeStage};
    use kiln_kernels::step_launches::StepBuffer;
    let config = preset_bf16("tiny-mixtral");
    let moe = config.moe.clone().expect("tiny-mixtral is an MoE model");
    let artifact = compiled_preset("tiny-mixtral", "sm_90");
    let plan = artifact.plan(Phase::Decode);
    let tables = &artifact.phase(Phase::Decode).launch_tables;
    assert!(!tables.is_empty());
    let mut seen = 0;
    for (index, kernel) in plan.kernels.iter().enumerate() {
        let Family::Moe { stage, top_k, .. } = &kernel.family else {
            continue;
        };
        assert_eq!(*top_k, moe.top_k);
        let step = tables[0].steps[index]
            .as_ref()
            .expect("a GPU step has launches");
        match stage {
            MoeStage::ExpertFfn { experts, .. } => {
                seen += 1;
                assert_eq!(*experts, moe.num_experts);
                assert_eq!(step.launches.len(), 2);
                assert!(matches!(
                    step.buffers["activated"],
                    StepBuffer::Workspace { bytes } if bytes > 0
                ));
                for e in 0..*experts {
                    for (offset, weight) in ["gate", "up", "down"].into_iter().enumerate() {
                        assert_eq!(
                            step.buffers[&format!("{weight}_{e}")],
                            StepBuffer::Operand {
                                index: 3 + 3 * e + offset
                            }
                        );
                    }
                }
                // Each launch binds exactly the parameters its kernel declares.
                for launch in &step.launches {
                    let kernels = artifact.kernels();
                    let kernel = kernels
                        .get(&launch.kernel)
                        .expect("the launch's kernel is in the artifact");
                    let declared: Vec<&str> = kernel
                        .params
                        .iter()
                        .filter(|p| matches!(p.kind, kiln_codegen::kernel::ParamKind::Pointer(_)))
                        .map(|p| p.name.as_str())
                        .collect();
                    let bound: Vec<&str> =
                        launch.buffers.iter().map(|b| b.param.as_str()).collect();
                    assert_eq!(bound, declared, "{}", launch.kernel);
                }
            }
            _ => assert_eq!(step.launches.len(), 1, "{}", kernel.family.describe()),
        }
    }
    let moe_layers = (0..config.num_layers)
        .filter(|&l| config.is_moe_layer(l))
        .count();
    assert_eq!(seen, moe_layers, "one expert FFN per MoE layer");
}

/// In f32 (no GPU generator takes it) the gather and the slice stay on the host even for a
/// GPU target, as the host copies, and so does decode's i32 map, which nothing on the GPU
/// reads: an f32 plan needs no device.
#[test]
fn an_f32_tiny_llama_keeps_its_copies_on_the_host() {
    use kiln_ir::schedule::{Device, FamilyKind};
    let config = ModelConfig::preset("tiny-llama").unwrap();
    assert_eq!(config.dtype, DType::F32);
    let options =
        kiln_compiler::CompileOptions::default().for_target(Target::from_name("sm_90").unwrap());
    for phase in [Phase::Prefill, Phase::Decode] {
        let compiled = kiln_compiler::compile(&config, phase, &options).unwrap();
        let plan = &compiled.plan;
        assert_eq!(plan.count_on(Device::Gpu), 0, "{phase:?}");
        let gather = plan
            .kernels
            .iter()
            .find(|k| k.family.kind() == FamilyKind::Gather)
            .expect("the embedding is a gather");
        assert_eq!(gather.device, Device::Cpu);
        assert_eq!(
            kiln_kernels::cpu_step::cpu_step(&gather.family, &gather.computes),
            Some(kiln_kernels::cpu_step::CpuStep::Gather)
        );
    }
}

#[test]
fn an_artifact_loads_back_equal() {
    let (_root, dir, artifact) = written("sm_90");
    let loaded = Artifact::load(&dir).unwrap();
    assert_eq!(loaded.manifest, artifact.manifest);
    assert_eq!(loaded.kernels(), artifact.kernels());
    assert!(!artifact.manifest.kernels.is_empty());
}

/// Loads `dir`, expecting an error whose text has every one of `parts`.
fn refused(dir: &Path, parts: &[&str]) -> ArtifactError {
    let err = Artifact::load(dir).unwrap_err();
    let text = err.to_string();
    for part in parts {
        assert!(text.contains(part), "expected `{part}` in: {text}");
    }
    err
}

fn edit_plan(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("plan.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(&path, serde_json::to_string(&value).unwrap()).unwrap();
}

#[test]
fn a_truncated_plan_is_refused() {
    let (_root, dir, _) = written("sm_90");
    let path = dir.join("plan.json");
    let text = std::fs::read(&path).unwrap();
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    let err = refused(&dir, &["plan.json", "is not a kiln plan"]);
    assert!(matches!(err, ArtifactError::Json { .. }));
}

#[test]
fn a_missing_plan_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let err = refused(root.path(), &["plan.json"]);
    assert!(matches!(err, ArtifactError::Io { .. }));
}

#[test]
fn another_schema_version_is_refused_first() {
    let (_root, dir, _) = written("sm_90");
    edit_plan(&dir, |v| {
        v["schema_version"] = 99.into();
        // Even with fields this kiln does not know, the version is what is reported.
        v["phases"] = "from the future".into();
    });
    refused(
        &dir,
        &["plan.json", "`schema_version` is 99", "reads version 1"],
    );
    edit_plan(&dir, |v| {
        v.as_object_mut().unwrap().remove("schema_version");
    });
    refused(&dir, &["`schema_version` is missing"]);
}

#[test]
fn another_kiln_version_is_refused() {
    let (_root, dir, _) = written("sm_90");
    edit_plan(&dir, |v| v["kiln_version"] = "0.0.1-other".into());
    refused(&dir, &["`kiln_version`", "0.0.1-other"]);
}

#[test]
fn edited_fields_are_named() {
    let (_root, dir, _) = written("sm_90");
    edit_plan(&dir, |v| {
        v["phases"][1]["plan"]["kernels"][3]["inputs"][0] = 100000.into();
    });
    refused(
        &dir,
        &["plan.json", "phases[1].plan.kernels[3].inputs", "100000"],
    );

    let (_root, dir, _) = written("sm_90");
    edit_plan(&dir, |v| v["phases"][0]["phase"] = "decode".into());
    refused(&dir, &["`phases`", "one prefill plan, found 0"]);

    let (_root, dir, _) = written("sm_90");
    edit_plan(&dir, |v| v["options"]["batch"] = "one".into());
    refused(&dir, &["plan.json", "invalid type"]);

    let (_root, dir, _) = written("sm_90");
    edit_plan(&dir, |v| {
        v["kernels"][0]["file"] = "../../etc/passwd".into()
    });
    refused(&dir, &["kernels[0].file", "not a file under kernels/"]);

    let (_root, dir, _) = written("cpu");
    edit_plan(&dir, |v| {
        v["phases"][1]["plan"]["kernels"][2]["device"] = "gpu".into()
    });
    refused(&dir, &["phases[1].plan.kernels[2].device", "target cpu"]);
}

#[test]
fn a_missing_or_edited_kernel_file_is_refused() {
    let (_root, dir, artifact) = written("sm_90");
    let first = &artifact.manifest.kernels[0];
    let path = dir.join(&first.file);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("ld.global", "ld.global.nc", 1)).unwrap();
    let err = refused(
        &dir,
        &[&first.file, "sha256", &first.entry, "edited or truncated"],
    );
    assert!(matches!(err, ArtifactError::KernelDigest { .. }));
    std::fs::remove_file(&path).unwrap();
    let err = refused(&dir, &[&first.file]);
    assert!(matches!(err, ArtifactError::Io { .. }));
}

/// The first GPU step of the decode plan and its index.
fn first_gpu_step(artifact: &Artifact) -> usize {
    artifact
        .plan(Phase::Decode)
        .kernels
        .iter()
        .position(|k| k.device == kiln_ir::schedule::Device::Gpu)
        .expect("a GPU artifact has GPU steps")
}

#[test]
fn launch_tables_record_every_gpu_step_for_the_compiled_sizes() {
    let (_root, _dir, artifact) = written("sm_90");
    let keys: std::collections::BTreeSet<&str> = artifact
        .manifest
        .kernels
        .iter()
        .map(|k| k.key.as_str())
        .collect();
    let decode = &artifact.phase(Phase::Decode).launch_tables;
    assert_eq!(decode.len(), 1, "decode has one set of sizes");
    assert_eq!(
        decode[0].bindings,
        Bindings::from_pairs(&[("batch", 1), ("ctx", 4096)])
    );
    let prefill = &artifact.phase(Phase::Prefill).launch_tables;
    let lengths: Vec<usize> = prefill
        .iter()
        .map(|t| t.bindings.get("seq").unwrap())
        .collect();
    assert!(
        lengths.contains(&1) && lengths.contains(&128),
        "{lengths:?}"
    );
    for phase in [Phase::Prefill, Phase::Decode] {
        let plan = artifact.plan(phase);
        for table in &artifact.phase(phase).launch_tables {
            for (kernel, step) in plan.kernels.iter().zip(&table.steps) {
                let on_gpu = kernel.device == kiln_ir::schedule::Device::Gpu;
                assert_eq!(step.is_some(), on_gpu, "{}", kernel.name);
                let Some(step) = step else { continue };
                assert!(!step.launches.is_empty(), "{}", kernel.name);
                for launch in &step.launches {
                    assert!(keys.contains(launch.kernel.as_str()), "{}", launch.kernel);
                    // Every operand and result of the step is bound by some launch.
                    for binding in &launch.buffers {
                        assert!(step.buffers.contains_key(&binding.buffer));
                    }
                }
                let bound: std::collections::BTreeSet<_> = step
                    .launches
                    .iter()
                    .flat_map(|l| &l.buffers)
                    .filter_map(|b| match step.buffers[&b.buffer] {
                        kiln_kernels::step_launches::StepBuffer::Operand { index } => {
                            Some((0, index))
                        }
                        kiln_kernels::step_launches::StepBuffer::Result { index } => {
                            Some((1, index))
                        }
                        _ => None,
                    })
                    .collect();
                let expected: std::collections::BTreeSet<_> = (0..kernel.inputs.len())
                    .map(|i| (0, i))
                    .chain((0..kernel.outputs.len()).map(|i| (1, i)))
                    .collect();
                // A KV append's result is its cache operand's memory, not a parameter.
                let expected: std::collections::BTreeSet<_> =
                    if matches!(kernel.family, kiln_ir::schedule::Family::KvAppend { .. }) {
                        expected
                            .into_iter()
                            .filter(|&(list, _)| list == 0)
                            .collect()
                    } else {
                        expected
                    };
                assert!(
                    expected.is_subset(&bound),
                    "{}: operands and results {expected:?}, bound {bound:?}",
                    kernel.name
                );
            }
        }
    }
    // The decode split count is the target's: a device of 4 SMs records other launches.
    let options = ArtifactOptions {
        target: Target::of_device("small", (9, 0), 4).unwrap(),
        ..ArtifactOptions::default()
    };
    let small = Artifact::compile(&tiny_llama_bf16(), &options).unwrap();
    assert_ne!(
        small.phase(Phase::Decode).launch_tables,
        artifact.phase(Phase::Decode).launch_tables
    );
}

#[test]
fn edited_launch_tables_are_refused_with_the_field() {
    let (_root, dir, artifact) = written("sm_90");
    let k = first_gpu_step(&artifact);
    let step = format!("phases[1].launch_tables[0].steps[{k}]");
    edit_plan(&dir, |v| {
        v["phases"][1]["launch_tables"][0]["steps"][k]["launches"][0]["kernel"] =
            "Gemv(NotASpec)".into()
    });
    refused(
        &dir,
        &[
            "plan.json",
            &format!("{step}.launches[0].kernel"),
            "Gemv(NotASpec)",
        ],
    );

    let (_root, dir, _) = written("sm_90");
    edit_plan(&dir, |v| {
        v["phases"][1]["launch_tables"][0]["steps"][k] = serde_json::Value::Null
    });
    refused(&dir, &[&step, "no launches", "runs on the GPU"]);

    let recorded = artifact.phase(Phase::Decode).launch_tables[0].steps[k]
        .clone()
        .unwrap();
    let operand = recorded
        .buffers
        .iter()
        .find(|(_, b)| matches!(b, kiln_kernels::step_launches::StepBuffer::Operand { .. }))
        .map(|(name, _)| name.clone())
        .expect("a GPU step reads an operand");
    let (_root, dir, _) = written("sm_90");
    edit_plan(&dir, |v| {
        v["phases"][1]["launch_tables"][0]["steps"][k]["buffers"][&operand]["index"] = 7.into()
    });
    refused(
        &dir,
        &[&format!("{step}.buffers.{operand}"), "operands index 7"],
    );

    let (_root, dir, _) = written("sm_90");
    edit_plan(&dir, |v| {
        v["phases"][1]["launch_tables"][0]["steps"][k]["launches"][0]["buffers"][0]["buffer"] =
            "nowhere".into()
    });
    refused(&dir, &[&format!("{step}.launches[0].buffers"), "`nowhere`"]);

    let (_root, dir, _) = written("sm_90");
    edit_plan(&dir, |v| {
        v["phases"][1]["launch_tables"][0]["steps"]
            .as_array_mut()
            .unwrap()
            .pop();
    });
    refused(&dir, &["phases[1].launch_tables[0].steps", "entries for"]);
}

/// A Qwen2-MoE model (routed experts plus the shared expert with its per-token sigmoid gate,
/// a `[tokens, 1]` operand broadcast along each row) compiles in bf16 for sm_90 with every
/// step of both phases on the GPU.
#[test]
fn a_bf16_qwen2_moe_artifact_for_sm_90_has_no_host_steps() {
    use kiln_ir::schedule::{Device, Family};
    let json = r#"{
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "hidden_act": "silu",
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 192,
        "num_experts": 6,
        "num_experts_per_tok": 2,
        "norm_topk_prob": false,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16"
    }"#;
    let config = ModelConfig::from_hf_json(json, "qwen2-moe test config").unwrap();
    let options = ArtifactOptions {
        target: Target::from_name("sm_90").unwrap(),
        ..ArtifactOptions::default()
    };
    let artifact = Artifact::compile(&config, &options).unwrap();
    for phase in [Phase::Prefill, Phase::Decode] {
        let plan = artifact.plan(phase);
        let on_cpu: Vec<String> = plan
            .kernels
            .iter()
            .filter(|k| k.device == Device::Cpu)
            .map(|k| format!("{} ({})", k.name, k.family.describe()))
            .collect();
        assert!(on_cpu.is_empty(), "{phase:?}: host steps {on_cpu:?}");
        let gated = plan.kernels.iter().filter(
            |k| matches!(&k.family, Family::Map { row_operands, .. } if !row_operands.is_empty()),
        );
        assert_eq!(
            gated.count(),
            2,
            "{phase:?}: one gated shared expert per MoE layer"
        );
    }
}
