//! Artifacts: coverage of every prompt length, round trips, and each kind of bad input
//! refused with an error that names the file and the field.

use kiln_compiler::{Artifact, ArtifactError, ArtifactOptions, Target};
use kiln_ir::dtype::DType;
use kiln_ir::shape::Bindings;
use kiln_models::{ModelConfig, Phase};
use std::path::Path;

fn tiny_llama_bf16() -> ModelConfig {
    let mut config = ModelConfig::preset("tiny-llama").unwrap();
    config.dtype = DType::BF16;
    config
}

fn written(target: &str) -> (tempfile::TempDir, std::path::PathBuf, Artifact) {
    let options = ArtifactOptions {
        target: Target::from_name(target).unwrap(),
        ..ArtifactOptions::default()
    };
    let artifact = Artifact::compile(&tiny_llama_bf16(), &options).unwrap();
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
    let options = ArtifactOptions {
        target: Target::from_name("cpu").unwrap(),
        ..ArtifactOptions::default()
    };
    let artifact = Artifact::compile(&tiny_llama_bf16(), &options).unwrap();
    for phase in [Phase::Prefill, Phase::Decode] {
        assert_eq!(
            artifact
                .plan(phase)
                .count_on(kiln_ir::schedule::Device::Gpu),
            0
        );
    }
    assert!(artifact.manifest.kernels.is_empty());
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
