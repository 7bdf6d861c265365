//! `kiln compile`: plan snapshots, determinism, atomic output and the launch reduction.

use kiln::compiler::{compile, Artifact, ArtifactOptions, CompileOptions, CompiledModel};
use kiln_models::{ModelConfig, Phase};
use std::fmt::Write as _;

fn compiled(preset: &str, phase: Phase) -> CompiledModel {
    let config = ModelConfig::preset(preset).unwrap();
    compile(&config, phase, &CompileOptions::default()).unwrap()
}

/// The kernel list with families and devices, for plans too large to snapshot whole.
fn summary(model: &CompiledModel) -> String {
    let mut out = String::new();
    let plan = &model.plan;
    let _ = writeln!(
        out,
        "{}: {} kernels, {} load-time ops, {} buffers, {} transfers",
        plan.graph,
        plan.kernels.len(),
        plan.load_time.len(),
        plan.buffers.len(),
        plan.transfers.len()
    );
    for kernel in &plan.kernels {
        let _ = writeln!(
            out,
            "{} {:?} {} {}",
            kernel.name,
            kernel.device,
            kernel.family.describe(),
            kernel.entry.as_deref().unwrap_or("-")
        );
    }
    out
}

#[test]
fn tiny_plans_snapshot() {
    for preset in ["tiny-llama", "tiny-mixtral"] {
        for phase in [Phase::Decode, Phase::Prefill] {
            let model = compiled(preset, phase);
            insta::assert_snapshot!(format!("{preset}_{}", phase.name()), model.plan.to_json());
        }
    }
}

#[test]
fn large_plans_snapshot() {
    for preset in ["llama-3-8b", "mixtral-8x7b"] {
        for phase in [Phase::Decode, Phase::Prefill] {
            let model = compiled(preset, phase);
            insta::assert_snapshot!(format!("{preset}_{}", phase.name()), summary(&model));
        }
    }
}

/// Every file under `dir`, by path relative to it, with its bytes, sorted.
fn listing(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.push((relative, std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn compiling_twice_gives_identical_bytes() {
    let root = tempfile::tempdir().unwrap();
    let mut listings = Vec::new();
    let config = ModelConfig::preset("llama-3-8b").unwrap();
    for attempt in 0..2 {
        let artifact = Artifact::compile(&config, &ArtifactOptions::default()).unwrap();
        let dir = root.path().join(format!("out{attempt}"));
        artifact.write(&dir).unwrap();
        // Writing again over an existing directory replaces it whole.
        artifact.write(&dir).unwrap();
        let files = listing(&dir);
        assert!(files.iter().any(|(n, _)| n == "plan.json"));
        assert!(files
            .iter()
            .any(|(n, _)| n.starts_with("kernels/") && n.ends_with(".ptx")));
        assert!(files.iter().any(|(n, _)| n == "report.txt"));
        listings.push(files);
    }
    assert_eq!(listings[0], listings[1]);
    // Nothing but the two outputs is left beside them (no temporary directories).
    let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
    assert_eq!(left.len(), 2);
}

#[test]
fn fusion_reduces_llama_3_8b_decode_launches() {
    let model = compiled("llama-3-8b", Phase::Decode);
    let before = model.kernels_before;
    let after = model.plan.kernels.len();
    assert!(
        after < before,
        "{after} kernels after rewriting, {before} before"
    );
    assert_eq!(model.rewrite.after.launches, after);
    assert!(model.report.contains(&format!(
        "before rewriting: {}",
        model.rewrite.before.launches
    )));
    assert!(model.report.contains("after rewriting:  "));
}

#[test]
fn quest_plan_snapshot() {
    // tiny-llama has two layers: skip one so that layer 1's decode attention becomes Quest.
    let config = ModelConfig::preset("tiny-llama").unwrap();
    let options = CompileOptions {
        quest: Some(kiln_ir::quest::QuestOptions {
            budget_tokens: 64,
            page_size: 16,
            skip_layers: 1,
        }),
        ..CompileOptions::default()
    };
    let model = compile(&config, Phase::Decode, &options).unwrap();
    insta::assert_snapshot!("tiny-llama_decode_quest", model.plan.to_json());
}

#[test]
fn kiln_compile_with_quest_records_the_pass_in_the_plan() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("plan");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["compile", "--model", "tiny-llama", "--quest-budget", "64"])
        .args(["--quest-skip-layers", "1", "-o"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("plan.json")).unwrap()).unwrap();
    let decode = plan["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["phase"] == "decode")
        .expect("a decode plan");
    let quest = decode["plan"]["passes_run"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "quest")
        .expect("quest in passes_run");
    assert_eq!(
        quest["options"],
        serde_json::json!({"budget": 64, "page_size": 16, "skip_layers": 1})
    );
    let report = std::fs::read_to_string(dir.join("report.txt")).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with(&report), "{stdout}");
    assert!(
        report.contains("quest pass (budget 64 tokens, page size 16, skip layers 1):"),
        "{report}"
    );
    assert!(report.contains("  quest layers: 1\n"), "{report}");
    // The same artifact as the library's: the default target (sm_90 on a machine without a
    // GPU), so the f32 preset compiles in bf16.
    let mut config = ModelConfig::preset("tiny-llama").unwrap();
    config.dtype = kiln_ir::dtype::DType::BF16;
    let options = ArtifactOptions {
        quest: Some(kiln_ir::quest::QuestOptions {
            budget_tokens: 64,
            page_size: 16,
            skip_layers: 1,
        }),
        ..ArtifactOptions::default()
    };
    let artifact = Artifact::compile(&config, &options).unwrap();
    let loaded = Artifact::load(&dir).unwrap();
    assert_eq!(loaded.manifest, artifact.manifest);
    assert_eq!(loaded.ptx, artifact.ptx);
}
