//! `rookery train --dry-run` resolves a recipe (stage 2 against its sources' configs alone) and
//! prints its parameters and memory without touching the run directory.

mod common;
use common::{check, rookery, root};

#[test]
fn a_dry_run_resolves_the_realistic_recipe_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let shapes = root().join("configs/pretrained-shapes");
    let sets = [
        format!(
            "flamingo.vision_from={}",
            shapes.join("clip-vit-large-patch14").display()
        ),
        format!(
            "flamingo.lm_from={}",
            shapes.join("TinyLlama_v1.1").display()
        ),
        format!("train.run_dir={}", run.display()),
    ];
    let out = check(
        rookery(
            &["train", "configs/flamingo-vitl14-llama.toml", "--dry-run"],
            &sets,
        )
        .current_dir(root())
        .output()
        .unwrap(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("parameters        2.273e9 (8.704e8 trained)"),
        "{text}"
    );
    assert!(text.contains("no tokenizer.json"), "{text}");
    assert!(!run.exists(), "a dry run created {}", run.display());
    // A source that is not there is refused, naming the key.
    let bad = [format!(
        "flamingo.lm_from={}",
        dir.path().join("nowhere").display()
    )];
    let out = rookery(
        &["train", "configs/flamingo-vitl14-llama.toml", "--dry-run"],
        &bad,
    )
    .current_dir(root())
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("flamingo.lm_from"), "{err}");
}
