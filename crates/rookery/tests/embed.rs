//! `rookery embed` on a trained run: unit-length image and text embeddings of the model's
//! width, the same for an image given as a file as for the same sample read from shards, and
//! a tokenizer that does not fit the text tower refused.

mod common;
use common::{check, rookery, root, rows, sets, BIN};

use std::process::Command;

#[test]
fn embeddings_of_a_run_are_unit_rows_and_agree_between_files_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let run = sets(dir.path(), "run", &["train.steps=3", "checkpoint.every=0"]);
    check(
        rookery(&["train", "configs/clip-tiny.toml"], &run)
            .current_dir(root())
            .output()
            .unwrap(),
    );
    // The first sample of the first validation shard, as a file and as a shard.
    let val = dir.path().join("synth/val");
    let shard = std::fs::read_dir(&val)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "tar"))
        .unwrap();
    let mut first = None;
    rookery_data::wds::read_shard(shard.to_str().unwrap(), |i| {
        if let rookery_data::wds::ShardItem::Sample(s) = i {
            let (ext, bytes) = ["jpg", "png"]
                .iter()
                .find_map(|e| s.get(e).map(|b| (e.to_string(), b.to_vec())))
                .unwrap();
            first = Some((
                s.key.clone(),
                ext,
                bytes,
                String::from_utf8(s.get("txt").unwrap().to_vec()).unwrap(),
            ));
        }
        false
    });
    let (key, ext, bytes, caption) = first.unwrap();
    let image = dir.path().join(format!("first.{ext}"));
    std::fs::write(&image, bytes).unwrap();
    let out = dir.path().join("emb.safetensors");
    let run_dir = dir.path().join("run");
    let one_shard = format!("{}", shard.display());
    check(
        Command::new(BIN)
            .args(["embed", "--weights", run_dir.to_str().unwrap(), "--images"])
            .arg(&image)
            .args(["--texts", &caption, "a caption", "--out"])
            .arg(&out)
            .output()
            .unwrap(),
    );
    let (img, txt) = (rows(&out, "image"), rows(&out, "text"));
    assert_eq!((img.len(), txt.len(), img[0].len()), (1, 2, 32));
    for r in img.iter().chain(&txt) {
        let norm: f32 = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    let pairs = dir.path().join("pairs.safetensors");
    check(
        Command::new(BIN)
            .args([
                "embed",
                "--weights",
                run_dir.to_str().unwrap(),
                "--data",
                &one_shard,
                "--out",
            ])
            .arg(&pairs)
            .output()
            .unwrap(),
    );
    let keys: Vec<String> =
        serde_json::from_slice(&std::fs::read(pairs.with_extension("keys.json")).unwrap()).unwrap();
    let at = keys.iter().position(|k| *k == key).unwrap();
    let (pimg, ptxt) = (rows(&pairs, "image"), rows(&pairs, "text"));
    assert_eq!(pimg.len(), keys.len());
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4);
    assert!(
        close(&pimg[at], &img[0]),
        "the file and the shard sample embed differently"
    );
    assert!(close(&ptxt[at], &txt[0]), "the caption embeds differently");

    // The HF fixture's text tower has 100 tokens: the run's tokenizer does not fit it.
    let hf = root().join("crates/rookery-interop/fixtures/hf_clip");
    let tk = dir.path().join("synth/tokenizer.json");
    let bad = Command::new(BIN)
        .args([
            "embed",
            "--weights",
            hf.to_str().unwrap(),
            "--tokenizer",
            tk.to_str().unwrap(),
        ])
        .args(["--texts", "x", "--out"])
        .arg(dir.path().join("bad.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("not the tokenizer"),
        "{err}"
    );
}

/// `rookery embed` on an HF SigLIP (rookery-interop's `hf_siglip` fixture): texts through a
/// tokenizer.json that appends `</s>`, padded with `</s>` to the trained length and cut with the
/// end token kept, give transformers' text embeddings; images squashed and normalised with 0.5
/// as `SiglipImageProcessor` does give its image embeddings up to the two resizers' difference
/// (PIL's bicubic against fast_image_resize's Catmull-Rom). Expected values: `siglip_embed` in
/// rookery-interop's fixtures, from `generate.py`.
#[test]
fn siglip_embeddings_match_transformers() {
    let fx = root().join("crates/rookery-interop/fixtures");
    let want = fx.join("siglip_embed");
    let listed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(want.join("texts.json")).unwrap()).unwrap();
    let texts: Vec<&str> = listed["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("e.safetensors");
    let (weights, tokenizer) = (fx.join("hf_siglip"), want.join("tokenizer.json"));
    let (image0, image1) = (want.join("image0.png"), want.join("image1.png"));
    let mut args = vec![
        "embed",
        "--weights",
        weights.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--images",
        image0.to_str().unwrap(),
        image1.to_str().unwrap(),
        "--texts",
    ];
    args.extend(&texts);
    check(rookery(&args, &[]).output().unwrap());
    let expected = want.join("expected.safetensors");
    for (name, tol) in [("text", 1e-5), ("image", 5e-3)] {
        let (got, exp) = (rows(&out, name), rows(&expected, name));
        assert_eq!(got.len(), exp.len(), "{name}");
        for (g, e) in got.iter().zip(&exp) {
            let diff = g.iter().zip(e).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff < tol, "{name}: differs by {diff}");
        }
    }
}
