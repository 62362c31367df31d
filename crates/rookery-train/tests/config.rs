//! Bad configs are refused before any work, with the key and the file named.

use std::path::Path;

use rookery_train::RunConfig;

fn load(text: &str, sets: &[&str]) -> Result<RunConfig, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    RunConfig::load(&path, &sets).map_err(|e| e.to_string())
}

fn refused(text: &str, sets: &[&str], key: &str) {
    let err = load(text, sets).expect_err("must be refused");
    assert!(err.contains("bad.toml"), "file not named: {err}");
    assert!(err.contains(key), "key {key} not named: {err}");
}

/// Every recipe in configs/ loads and validates.
#[test]
fn shipped_configs_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") {
            RunConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 7, "{n} recipes in {}", dir.display());
}

#[test]
fn bad_configs_name_the_key() {
    refused("[data]\nbatch_sise = 3\n", &[], "batch_sise");
    refused("[nonsense]\nx = 1\n", &[], "nonsense");
    refused("[data]\nbatch_size = \"many\"\n", &[], "data.batch_size");
    refused("[data]\nbatch_size = 0\n", &[], "data.batch_size");
    refused("[optim]\nlr = -0.1\n", &[], "optim.lr");
    refused("", &["optim.lr=-1e-3"], "optim.lr");
    refused("", &["train.steps=0"], "train.steps");
    refused(
        "",
        &["model.vision.patch_size=7"],
        "model.vision.patch_size",
    );
    refused(
        "",
        &["model.vision.stem_patch=3"],
        "model.vision.stem_patch",
    );
    refused(
        "",
        &["model.vision.stem_patch=4", "model.vision.stem_width=0"],
        "model.vision.stem_width",
    );
    refused("", &["data.image_size=32"], "data.image_size");
    refused(
        "",
        &["model.vision.pool_type=max"],
        "model.vision.pool_type",
    );
    refused(
        "",
        &["model.vision.patch_dropout=1.0"],
        "model.vision.patch_dropout",
    );
    refused(
        "",
        &["model.text.length_buckets=0"],
        "model.text.length_buckets",
    );
    refused("", &["optim.schedule=step"], "optim.schedule");
    refused("", &["optim.decay_fraction=0"], "optim.decay_fraction");
    let flamingo = "[train]\nstage = \"flamingo\"\n";
    refused(
        flamingo,
        &["flamingo.gate_lr_mult=0"],
        "flamingo.gate_lr_mult",
    );
    refused(
        flamingo,
        &["flamingo.gate_lr_mult=nan"],
        "flamingo.gate_lr_mult",
    );
    // More frames per video than the resampler has time embeddings; no frames at all.
    refused(
        flamingo,
        &["data.interleaved.max_frames=4"],
        "data.interleaved.max_frames",
    );
    refused(
        flamingo,
        &["data.interleaved.max_frames=0"],
        "data.interleaved.max_frames",
    );
    refused("[train]\nsteps = 10\n[train]\nsteps = 3\n", &[], "bad.toml");
}

/// Zero sizes and ratios used to panic inside burn's reshapes: each is refused by its key.
#[test]
fn zero_sizes_and_ratios_name_the_key() {
    for key in [
        "model.vision.width",
        "model.text.width",
        "model.vision.image_size",
        "model.vision.mlp_ratio",
        "model.text.mlp_ratio",
        "model.embed_dim",
        "model.vision.layers",
        "train.max_bad_steps",
    ] {
        refused("", &[&format!("{key}=0")], key);
    }
    refused(
        "",
        &["model.vision.mlp_ratio=nan"],
        "model.vision.mlp_ratio",
    );
    refused("", &["data.crop_ratio=[0.0, 1.0]"], "data.crop_ratio");
    let lm = "[train]\nstage = \"lm\"\n";
    for key in ["lm.width", "lm.layers", "lm.mlp_ratio"] {
        refused(lm, &[&format!("{key}=0")], key);
    }
    refused(lm, &["lm.context_length=1"], "lm.context_length");
    let flamingo = "[train]\nstage = \"flamingo\"\n";
    for key in [
        "flamingo.model.resampler.latents",
        "flamingo.model.resampler.dim_head",
        "flamingo.model.xattn_heads",
        "flamingo.model.xattn_ff_mult",
    ] {
        refused(flamingo, &[&format!("{key}=0")], key);
    }
}

#[test]
fn overrides_apply_and_resolved_config_round_trips() {
    let cfg = load(
        "[data]\nbatch_size = 8\n",
        &[
            "data.batch_size=16",
            "optim.lr=3e-4",
            "train.run_dir=runs/x",
            "model.vision.act=quickgelu",
        ],
    )
    .unwrap();
    assert_eq!(cfg.data.batch_size, 16);
    assert_eq!(cfg.optim.lr, 3e-4);
    assert_eq!(cfg.train.run_dir, Path::new("runs/x"));
    let again: RunConfig = toml::from_str(&cfg.to_toml()).unwrap();
    assert_eq!(again, cfg);
}

#[test]
fn shard_pattern_matching_nothing_is_refused_with_the_key() {
    let cfg = load("", &["data.train=/nonexistent/{000..003}.tar"]).unwrap();
    let (key, msg) = cfg.check_shards().unwrap_err();
    assert_eq!(key, "data.train");
    assert!(msg.contains("/nonexistent/{000..003}.tar"), "{msg}");
}

/// configs/flamingo-vitl14-llama.toml resolves against the published shapes of its sources
/// (configs/pretrained-shapes: their config.json alone, no weights, no tokenizer): OpenAI's
/// ViT-L/14 and TinyLlama 1.1B with the three tokens OpenFlamingo adds, OpenFlamingo-3B's new
/// layers, and the parameter counts the models publish.
#[test]
fn the_vitl14_llama_recipe_resolves_against_the_published_shapes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let sources = [
        format!(
            "flamingo.vision_from={}",
            root.join("pretrained-shapes/clip-vit-large-patch14")
                .display()
        ),
        format!(
            "flamingo.lm_from={}",
            root.join("pretrained-shapes/TinyLlama_v1.1").display()
        ),
    ];
    let cfg = RunConfig::load(&root.join("flamingo-vitl14-llama.toml"), &sources).unwrap();
    // TinyLlama's tokenizer has 32000 tokens: <|endofchunk|> 32000, <image> 32001, <PAD> 32002.
    let (r, _) = rookery_train::stage::flamingo::resolve(&cfg, 32003, (32001, 32000)).unwrap();
    r.validate().unwrap();
    let m = &r.flamingo.model;
    let v = &m.vision;
    assert_eq!(
        (v.width, v.layers, v.heads, v.patch_size),
        (1024, 24, 16, 14)
    );
    let l = &m.lm;
    assert_eq!((l.width, l.layers, l.heads, l.kv()), (2048, 22, 32, 4));
    assert_eq!(
        (l.vocab_size, l.hidden(), l.context_length),
        (32003, 5632, 2048)
    );
    assert!(!l.tie_embeddings);
    let e = rookery_train::memory::estimate(&r);
    eprintln!("{e:?}");
    // ViT-L/14's tower 303.2M (+0.8M projection), TinyLlama 1.100B (+2 x 3 x 2048 new rows),
    // the resampler 63.0M and 22 gated blocks of 36.7M: 2.27B in all (norms not counted).
    let params = e.params / 1e9;
    assert!((2.25..2.28).contains(&params), "{params}B parameters");
    let trained = e.optimizer / 12.0 / 1e9;
    assert!((0.86..0.88).contains(&trained), "{trained}B trained");
    // A resolved config resolves to itself; a shape or token set by hand to another value is
    // refused, naming the key, not replaced without a word.
    let (again, _) = rookery_train::stage::flamingo::resolve(&r, 32003, (32001, 32000)).unwrap();
    assert_eq!(again.flamingo, r.flamingo);
    for (key, change) in [
        ("flamingo.model.lm", "flamingo.model.lm.width=4096"),
        ("flamingo.model.vision", "flamingo.model.vision.layers=12"),
        ("flamingo.model.image_token", "flamingo.model.image_token=7"),
    ] {
        let sets = [&sources[..], &[change.to_string()]].concat();
        let hand = RunConfig::load(&root.join("flamingo-vitl14-llama.toml"), &sets).unwrap();
        let err = rookery_train::stage::flamingo::resolve(&hand, 32003, (32001, 32000))
            .map(|_| ())
            .expect_err(change)
            .to_string();
        assert!(err.contains(key), "{change}: {err}");
    }
    // Refused where its images do not fit the tower.
    let mut small = cfg.clone();
    small.data.image_size = 336;
    let err = rookery_train::stage::flamingo::resolve(&small, 32003, (32001, 32000))
        .err()
        .unwrap();
    assert!(err.to_string().contains("takes 224"), "{err}");
}

/// `configs/NAME.toml` resolved against ViT-L/14's and the LM `lm`'s published shapes
/// (`configs/pretrained-shapes/`), with GPT-NeoX-20B's tokenizer of 50277 tokens extended:
/// <|endofchunk|> 50277, <image> 50278, <PAD> 50279.
fn resolve_neox_tokenized_recipe(name: &str, lm: &str) -> RunConfig {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let shapes = root.join("pretrained-shapes");
    let sources = [
        format!(
            "flamingo.vision_from={}",
            shapes.join("clip-vit-large-patch14").display()
        ),
        format!("flamingo.lm_from={}", shapes.join(lm).display()),
    ];
    let cfg = RunConfig::load(&root.join(format!("{name}.toml")), &sources).unwrap();
    let (r, _) = rookery_train::stage::flamingo::resolve(&cfg, 50280, (50278, 50277)).unwrap();
    r.validate().unwrap();
    r
}

/// Parameters in all and trained, in billions, by the memory estimate.
fn billions(r: &RunConfig) -> (f64, f64) {
    let e = rookery_train::memory::estimate(r);
    eprintln!("{e:?}");
    (e.params / 1e9, e.optimizer / 12.0 / 1e9)
}

/// OpenFlamingo-4B's recipe (ViT-L/14 + RedPajama-INCITE-Base-3B, a GPT-NeoX) resolves
/// against the published shapes: the LM's layout read from the hub's 4.x config keys, 16 gated
/// blocks (every second of 32 layers), and OpenFlamingo-4B's size.
#[test]
fn the_vitl14_rpj3b_recipe_resolves_against_the_published_shapes() {
    let r = resolve_neox_tokenized_recipe("flamingo-vitl14-rpj3b", "RedPajama-INCITE-Base-3B-v1");
    let l = &r.flamingo.model.lm;
    assert_eq!(l.style, rookery_model::flamingo::LmStyle::Neox);
    assert_eq!(
        (l.width, l.layers, l.heads, l.hidden()),
        (2560, 32, 32, 10240)
    );
    assert_eq!(
        (l.vocab_size, l.rotary_dim(), l.parallel_residual),
        (50432, 80, false)
    );
    // ViT-L/14 0.30B, the LM 2.78B (2 x 50432 x 2560 embeddings and head, 32 blocks of
    // 78.7M), the resampler 63M and 16 gated blocks of 56.1M: 4.04B ("4B"), 0.96B trained.
    let (params, trained) = billions(&r);
    assert!((4.02..4.06).contains(&params), "{params}B parameters");
    assert!((0.95..0.97).contains(&trained), "{trained}B trained");
}

/// OpenFlamingo-9B's recipe (ViT-L/14 + MPT-7B) resolves against the published shapes:
/// MPT's layout (ALiBi, no biases), 8 gated blocks (every fourth of 32 layers).
#[test]
fn the_vitl14_mpt7b_recipe_resolves_against_the_published_shapes() {
    let r = resolve_neox_tokenized_recipe("flamingo-vitl14-mpt7b", "mpt-7b");
    let f = &r.flamingo.model;
    let l = &f.lm;
    assert_eq!(l.style, rookery_model::flamingo::LmStyle::Mpt);
    assert_eq!(
        (l.width, l.layers, l.heads, l.hidden()),
        (4096, 32, 32, 16384)
    );
    assert!(l.tie_embeddings && f.cross_attn_every_n_layers == 4);
    // ViT-L/14 0.30B, MPT-7B 6.86B (its 6.65B, the tied head counted apart), the resampler
    // 63M and 8 gated blocks of 139.5M: 8.34B; 1.18B trained.
    let (params, trained) = billions(&r);
    assert!((8.32..8.36).contains(&params), "{params}B parameters");
    assert!((1.17..1.19).contains(&trained), "{trained}B trained");
}

/// The default recipe trains CLIP's own tower, so its run exports under HF transformers'
/// names (`rookery export --format hf`), which refuse rookery's patch stem.
#[test]
fn the_default_recipe_exports_to_hf_transformers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/clip-tiny.toml");
    let mut cfg = RunConfig::load(&path, &[]).unwrap();
    assert_eq!(cfg.model.vision.stem_patch, 0, "clip-tiny has a patch stem");
    (cfg.model.text.vocab_size, cfg.model.text.eot_token) = (64, 63);
    let model = cfg.model.init::<burn::backend::Flex>(&Default::default());
    let out = tempfile::tempdir().unwrap();
    rookery_interop::hf_clip_export::export_hf(&model, &cfg.model, out.path(), false).unwrap();
    assert!(out.path().join("model.safetensors").is_file());
}

/// A setting with a fixed set of values is an enum: an unknown value is refused with its key
/// and the values it takes, before any work (nothing falls back to a default).
#[test]
fn unknown_enum_values_are_refused_with_the_allowed_ones() {
    for (set, key, allowed) in [
        (
            "train.stage=\"story\"",
            "train.stage",
            ["clip", "lm", "flamingo"],
        ),
        (
            "dist.backend=\"gloo\"",
            "dist.backend",
            ["local", "mpi", "nccl"],
        ),
        (
            "train.resume=\"yes\"",
            "train.resume",
            ["never", "auto", "auto"],
        ),
        (
            "train.negatives=\"all\"",
            "train.negatives",
            ["global", "local", "local"],
        ),
        (
            "model.loss=\"clip\"",
            "model.loss",
            ["infonce", "siglip", "siglip"],
        ),
        (
            "model.vision.pool_type=\"max\"",
            "model.vision.pool_type",
            ["tok", "avg", "avg"],
        ),
        ("lm.style=\"opt\"", "lm.style", ["gpt2", "llama", "mpt"]),
    ] {
        let err = load("", &[set]).expect_err(set);
        assert!(err.contains(key), "{set}: key not named: {err}");
        for a in allowed {
            assert!(
                err.contains(&format!("`{a}`")),
                "{set}: `{a}` not listed: {err}"
            );
        }
    }
}

/// docs/config.md names every key of every section (checked against the structs, so the
/// reference cannot drift from the code): each leaf key of the default config appears there
/// in backticks, under its own name.
#[test]
fn config_md_names_every_key() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.md"))
            .unwrap();
    let table: toml::Table = RunConfig::default().to_toml().parse().unwrap();
    fn leaves(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in t {
            let path = format!("{prefix}{k}");
            match v {
                toml::Value::Table(inner) => leaves(&format!("{path}."), inner, out),
                _ => out.push(path),
            }
        }
    }
    let mut keys = Vec::new();
    leaves("", &table, &mut keys);
    assert!(keys.len() > 80, "{} keys", keys.len());
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            let name = k.rsplit('.').next().unwrap();
            !doc.contains(&format!("`{name}`")) && !doc.contains(&format!("`{k}`"))
        })
        .collect();
    assert!(missing.is_empty(), "docs/config.md lacks {missing:?}");
}

/// A stage validates the sections it uses and no other: a bad `[eval]` (read by the text
/// stages only) does not stop a CLIP run, and stops an LM run naming the key.
#[test]
fn a_stage_validates_only_its_own_sections() {
    load("", &["eval.batch=0"]).expect("stage clip does not read [eval]");
    let lm = ["train.stage=\"lm\"", "data.interleaved.max_tokens=128"];
    refused("", &[&lm[..], &["eval.batch=0"]].concat(), "eval.batch");
    load("", &[&lm[..], &["model.vision.heads=5"]].concat())
        .expect("stage lm does not read [model]");
    refused("", &["model.vision.heads=5"], "model.vision.heads");
}

/// docs/config.md states each scalar key's default as the structs have it: within the key's
/// section (the heading naming `[section]`), the value after `` `key` `` (table row, `key
/// value` or `key (value)`) equals the default. A changed default without its doc fails here.
#[test]
fn config_md_states_the_defaults_the_structs_have() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.md"))
            .unwrap();
    // Section name -> its text (up to the next heading).
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in doc.lines() {
        if line.starts_with('#') {
            let name = line.split("`[").nth(1).and_then(|r| r.split("]`").next());
            sections.push((name.unwrap_or("").to_string(), String::new()));
        } else if let Some(last) = sections.last_mut() {
            last.1.push_str(line);
            last.1.push('\n');
        }
    }
    let table: toml::Table = RunConfig::default().to_toml().parse().unwrap();
    let mut checked = 0;
    let mut wrong = Vec::new();
    let mut visit = vec![(String::new(), &table)];
    while let Some((prefix, t)) = visit.pop() {
        for (k, v) in t {
            if let toml::Value::Table(inner) = v {
                visit.push((format!("{prefix}{k}."), inner));
                continue;
            }
            let section = prefix.trim_end_matches('.');
            let Some((_, text)) = sections.iter().find(|(s, _)| s == section) else {
                continue;
            };
            let Some(stated) = stated_default(text, k) else {
                continue;
            };
            checked += 1;
            if !same_value(&stated, v) {
                wrong.push(format!("{section}.{k}: docs say {stated}, default is {v}"));
            }
        }
    }
    assert!(
        checked > 60,
        "only {checked} defaults found in docs/config.md"
    );
    assert!(
        wrong.is_empty(),
        "docs/config.md disagrees:\n{}",
        wrong.join("\n")
    );
}

/// The value docs/config.md gives after `` `key` `` in a section: `| `key` | value |`,
/// `` `key` value`` or `` `key` (value)``.
fn stated_default(text: &str, key: &str) -> Option<String> {
    let tag = format!("`{key}`");
    let at = text.find(&tag)? + tag.len();
    let rest = text[at..].trim_start_matches([' ', '|', '(']);
    let rest = rest.trim_start();
    // A value in backticks is whole (it may hold spaces: `"<image>Question:{question} ..."`).
    if let Some(inner) = rest.strip_prefix('`') {
        return inner.split('`').next().map(str::to_string);
    }
    let end = rest
        .find(['|', ')', ',', ';', '\n', ' '])
        .unwrap_or(rest.len());
    let token = rest[..end].trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// Whether a stated default is the value: numbers by value, strings without their quotes,
/// booleans as written; anything else (arrays, tables, prose) is not compared.
fn same_value(stated: &str, v: &toml::Value) -> bool {
    let num = |s: &str| s.replace('_', "").parse::<f64>().ok();
    match v {
        toml::Value::Integer(i) => num(stated).is_none_or(|x| x == *i as f64),
        toml::Value::Float(f) => {
            num(stated).is_none_or(|x| (x - f).abs() <= 1e-9 * f.abs().max(1.0))
        }
        toml::Value::Boolean(b) => !matches!(stated, "true" | "false") || stated == b.to_string(),
        toml::Value::String(s) => {
            let quoted = stated.starts_with('"');
            !quoted || stated.trim_matches('"') == s
        }
        _ => true,
    }
}
