//! Integration tests of the shard reader and loader on shards made here: by rookery's writer,
//! by GNU tar, in Python webdataset's ShardWriter layout, and broken in every supported way.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use rookery_data::loader::Mode;
use rookery_data::stream::{ShardStream, StreamItem, StreamSpec};
use rookery_data::synth::{generate, SynthConfig};
use rookery_data::wds::{read_shard, ShardItem};
use rookery_data::writer::write_shard;
use rookery_data::{expand_shards, DataConfig, Loader, TextTokenizer};

fn synth(dir: &Path, shards: usize, per: usize) -> SynthConfig {
    let cfg = SynthConfig {
        out: dir.to_path_buf(),
        train_shards: shards,
        train_samples_per_shard: per,
        val_shards: 1,
        val_samples_per_shard: 20,
        image_size: 32,
        ..Default::default()
    };
    generate(&cfg).unwrap();
    cfg
}

fn keys_of(url: &str) -> Vec<String> {
    let mut keys = vec![];
    read_shard(url, |i| {
        if let ShardItem::Sample(s) = i {
            keys.push(s.key);
        }
        true
    });
    keys
}

fn data_cfg(train: String, tokenizer: &Path) -> DataConfig {
    DataConfig {
        train,
        tokenizer: tokenizer.to_path_buf(),
        batch_size: 8,
        image_size: 32,
        shuffle_buffer: 16,
        workers: 2,
        decode_threads: 2,
        ..Default::default()
    }
}

fn loader(cfg: &DataConfig, rank: usize, world: usize, mode: Mode) -> Loader {
    let tk = Arc::new(TextTokenizer::from_file(&cfg.tokenizer).unwrap());
    Loader::new(
        cfg,
        tk,
        expand_shards(&cfg.train).unwrap(),
        rank,
        world,
        mode,
        None,
    )
    .unwrap()
}

#[test]
fn synthetic_shards_read_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth(dir.path(), 2, 30);
    let shards = expand_shards(&cfg.train_pattern()).unwrap();
    assert_eq!(shards.len(), 2);
    let mut n = 0;
    read_shard(&shards[1], |i| {
        let ShardItem::Sample(s) = i else {
            panic!("broken")
        };
        assert_eq!(s.key, format!("{:09}", 30 + n));
        assert_eq!(s.index, n as u64);
        assert!(s.get("txt").is_some() && s.get("json").is_some());
        assert!(s.get("jpg").is_some() ^ s.get("png").is_some());
        n += 1;
        true
    });
    assert_eq!(n, 30);
    // same seed, same bytes
    let again = tempfile::tempdir().unwrap();
    let cfg2 = synth(again.path(), 2, 30);
    let a = std::fs::read(&shards[0]).unwrap();
    let b = std::fs::read(expand_shards(&cfg2.train_pattern()).unwrap()[0].clone()).unwrap();
    assert!(a == b, "synthesis is deterministic");
}

#[test]
fn gnu_tar_and_webdataset_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    // keys with dots in directories, several extensions, a multi-dot extension
    for (p, body) in [
        ("a.b/000001.jpg", "j1"),
        ("a.b/000001.txt", "t1"),
        ("a.b/000001.seg.png", "s1"),
        ("a.b/000002.txt", "t2"),
        ("a.b/000002.JSON", "{}"),
    ] {
        let path = src.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
    let tar = dir.path().join("gnu.tar");
    let ok = std::process::Command::new("tar")
        .args(["--format=gnu", "--sort=name", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg("a.b")
        .status()
        .unwrap();
    assert!(ok.success());
    let mut samples = vec![];
    read_shard(tar.to_str().unwrap(), |i| {
        let ShardItem::Sample(s) = i else {
            panic!("broken")
        };
        samples.push(s);
        true
    });
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[0].key, "a.b/000001");
    let mut exts: Vec<_> = samples[0].members.iter().map(|m| m.0.clone()).collect();
    exts.sort();
    assert_eq!(exts, ["jpg", "seg.png", "txt"]);
    assert_eq!(samples[0].get("seg.png"), Some(&b"s1"[..]));
    assert_eq!(
        samples[1].get("json"),
        Some(&b"{}"[..]),
        "extensions are lower-cased"
    );
    // ShardWriter layout: flat `key.ext` members, and a repeated extension starts a new sample
    let wds = dir.path().join("wds.tar");
    let m = |e: &str, b: &str| (e.to_string(), b.as_bytes().to_vec());
    write_shard(
        &wds,
        vec![
            ("k1".to_string(), vec![m("txt", "x"), m("cls", "1")]),
            ("k1".to_string(), vec![m("txt", "y")]),
        ],
    )
    .unwrap();
    let texts: Vec<String> = {
        let mut v = vec![];
        read_shard(wds.to_str().unwrap(), |i| {
            if let ShardItem::Sample(s) = i {
                v.push(String::from_utf8(s.get("txt").unwrap().to_vec()).unwrap());
            }
            true
        });
        v
    };
    assert_eq!(texts, ["x", "y"]);
    // pipe: sources read the same bytes
    let piped = keys_of(&format!("pipe:cat {}", tar.display()));
    assert_eq!(piped, ["a.b/000001", "a.b/000002"]);
}

#[test]
fn ranks_and_workers_split_without_overlap_and_cover_everything() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth(dir.path(), 6, 7);
    let all: HashSet<String> = expand_shards(&cfg.train_pattern())
        .unwrap()
        .iter()
        .flat_map(|s| keys_of(s))
        .collect();
    assert_eq!(all.len(), 42);
    let dc = data_cfg(cfg.train_pattern(), &cfg.tokenizer_path());
    let mut seen = HashSet::new();
    for rank in 0..3 {
        for batch in loader(&dc, rank, 3, Mode::Eval) {
            for k in batch.unwrap().keys {
                assert!(seen.insert(k.clone()), "sample {k} read by two ranks");
            }
        }
    }
    assert_eq!(seen, all);
    // the training stream of one epoch also covers everything exactly once across ranks
    let spec = |rank| StreamSpec {
        shards: expand_shards(&cfg.train_pattern()).unwrap(),
        rank,
        world: 2,
        workers: 2,
        seed: 5,
        shuffle_buffer: 4,
        resampled: false,
        single_epoch: true,
        skip: Default::default(),
        stall_timeout: None,
    };
    let mut train_seen = HashSet::new();
    for rank in 0..2 {
        for item in ShardStream::start(spec(rank), None).unwrap() {
            if let StreamItem::Sample { sample, .. } = item {
                assert!(train_seen.insert(sample.key));
            }
        }
    }
    assert_eq!(train_seen, all);
}

/// The same shards under another parent directory (a dataset moved, or mounted elsewhere on
/// another node) give the same samples with the same augmentations: seeds name a shard by its
/// directory and file name, not by where it lies.
#[test]
fn augmentations_do_not_depend_on_where_the_dataset_lies() {
    use std::path::Path;
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth(&dir.path().join("here"), 2, 10);
    let from = cfg.train_pattern();
    let (shards, file) = (
        Path::new(&from).parent().unwrap(),
        Path::new(&from).file_name(),
    );
    let moved = dir
        .path()
        .join("elsewhere/deeper")
        .join(shards.file_name().unwrap());
    std::fs::create_dir_all(&moved).unwrap();
    for e in std::fs::read_dir(shards).unwrap() {
        let e = e.unwrap().path();
        std::fs::copy(&e, moved.join(e.file_name().unwrap())).unwrap();
    }
    let take = |pattern: String| -> Vec<f32> {
        let dc = data_cfg(pattern, &cfg.tokenizer_path());
        let mut l = loader(&dc, 0, 1, Mode::Train);
        (0..3)
            .flat_map(|_| l.next().unwrap().unwrap().images)
            .collect()
    };
    let there = moved.join(file.unwrap()).to_string_lossy().into_owned();
    assert!(
        take(from) == take(there),
        "moving the shards changed the crops"
    );
}

#[test]
fn order_is_deterministic_for_a_seed_and_changes_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth(dir.path(), 4, 10);
    let mut dc = data_cfg(cfg.train_pattern(), &cfg.tokenizer_path());
    let take = |dc: &DataConfig| -> (Vec<String>, Vec<f32>) {
        let mut l = loader(dc, 0, 1, Mode::Train);
        let (mut keys, mut px) = (vec![], vec![]);
        for _ in 0..8 {
            let b = l.next().unwrap().unwrap();
            keys.extend(b.keys);
            px.extend_from_slice(&b.images[..16]);
        }
        (keys, px)
    };
    let a = take(&dc);
    assert_eq!(
        a.0.len(),
        64,
        "epochs roll over without a gap (40 samples per epoch)"
    );
    assert_eq!(
        a,
        take(&dc),
        "same seed, same samples and same augmentations"
    );
    dc.seed = 1;
    assert_ne!(a.0, take(&dc).0);
}

#[test]
fn resume_mid_shard_yields_exactly_the_remaining_batches() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth(dir.path(), 3, 25);
    let dc = data_cfg(cfg.train_pattern(), &cfg.tokenizer_path());
    let tk = Arc::new(TextTokenizer::from_file(&dc.tokenizer).unwrap());
    let shards = expand_shards(&dc.train).unwrap();
    let full: Vec<_> = loader(&dc, 0, 1, Mode::Train)
        .take(20)
        .map(|b| b.unwrap())
        .collect();
    for stop in [1, 4, 11] {
        let pos = full[stop - 1].position.clone();
        let json = serde_json::to_string(&pos).unwrap(); // positions survive serialization
        let pos = serde_json::from_str(&json).unwrap();
        let resumed = Loader::new(
            &dc,
            tk.clone(),
            shards.clone(),
            0,
            1,
            Mode::Train,
            Some(pos),
        )
        .unwrap();
        for (want, got) in full[stop..].iter().zip(resumed) {
            let got = got.unwrap();
            assert_eq!(want.keys, got.keys, "resumed after batch {stop}");
            assert_eq!(want.images, got.images);
            assert_eq!(want.tokens, got.tokens);
        }
    }
}

#[test]
fn bad_input_is_skipped_counted_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth(dir.path(), 1, 40);
    let good = std::fs::read(expand_shards(&cfg.train_pattern()).unwrap()[0].clone()).unwrap();
    let d = dir.path().join("bad");
    std::fs::create_dir_all(&d).unwrap();
    // 1. a truncated tar (cut inside a member); 2. garbage bytes; 3. an empty shard
    std::fs::write(d.join("a-truncated.tar"), &good[..good.len() / 2 + 100]).unwrap();
    std::fs::write(d.join("b-garbage.tar"), vec![0x5au8; 5000]).unwrap();
    write_shard(&d.join("c-empty.tar"), vec![]).unwrap();
    // 4. corrupt image, zero-byte image, missing caption, non-UTF-8 caption, missing image
    let m = |e: &str, b: &[u8]| (e.to_string(), b.to_vec());
    let jpg = {
        let mut v = vec![];
        read_shard(&expand_shards(&cfg.train_pattern()).unwrap()[0], |i| {
            if let ShardItem::Sample(s) = i {
                if let Some(j) = s.get("jpg") {
                    v = j.to_vec();
                    return false;
                }
            }
            true
        });
        v
    };
    let samples = vec![
        (
            "ok1".to_string(),
            vec![m("jpg", &jpg), m("txt", b"two red circles")],
        ),
        (
            "corrupt".to_string(),
            vec![m("jpg", &jpg[..jpg.len() / 3]), m("txt", b"x")],
        ),
        ("zero".to_string(), vec![m("jpg", b""), m("txt", b"x")]),
        ("nocaption".to_string(), vec![m("jpg", &jpg)]),
        (
            "latin1".to_string(),
            vec![m("jpg", &jpg), m("txt", b"caf\xe9")],
        ),
        ("noimage".to_string(), vec![m("txt", b"two red circles")]),
        (
            "ok2".to_string(),
            vec![m("jpg", &jpg), m("txt", b"a blue square")],
        ),
    ];
    write_shard(&d.join("d-samples.tar"), samples).unwrap();
    let spec = format!(
        "{}/{{a-truncated,b-garbage,c-empty,d-samples}}.tar",
        d.display()
    );
    let mut dc = data_cfg(spec.clone(), &cfg.tokenizer_path());
    dc.batch_size = 4;
    dc.max_bad_fraction = 1.0;
    dc.workers = 1;
    let batches: Vec<_> = loader(&dc, 0, 1, Mode::Eval).map(|b| b.unwrap()).collect();
    let keys: Vec<String> = batches.iter().flat_map(|b| b.keys.clone()).collect();
    assert!(keys.contains(&"ok1".to_string()) && keys.contains(&"ok2".to_string()));
    for bad in ["corrupt", "zero", "nocaption", "latin1", "noimage"] {
        assert!(!keys.contains(&bad.to_string()), "{bad} was not skipped");
    }
    let counts = &batches.last().unwrap().position.counts;
    let c = |k: &str| counts.by_reason.get(k).copied().unwrap_or(0);
    assert_eq!(c("undecodable image .jpg"), 2, "{counts:?}");
    assert_eq!(
        (
            c("missing caption"),
            c("caption is not UTF-8"),
            c("missing image")
        ),
        (1, 1, 1),
        "{counts:?}"
    );
    assert_eq!(c("empty shard"), 1, "{counts:?}");
    assert!(
        counts.by_reason.keys().any(|k| k.contains("broken tar")),
        "{counts:?}"
    );
    assert_eq!(counts.bad, 8, "{counts:?}");
    // a truncated shard still delivers the samples before the cut
    assert!(keys.len() > 2 + 10, "{} samples", keys.len());
    // over the limit: a clear error naming shard and key
    dc.max_bad_fraction = 0.01;
    dc.min_bad_allowed = 0;
    let err = loader(&dc, 0, 1, Mode::Eval)
        .find_map(|b| b.err())
        .expect("limit stops the run");
    let msg = err.to_string();
    assert!(
        msg.contains("too many bad samples") && msg.contains(".tar"),
        "{msg}"
    );
    // inspect lists them all, with shard and key
    let report =
        rookery_data::inspect::inspect(&expand_shards(&spec).unwrap(), &dc.image_exts, "txt");
    let bad_keys: HashSet<&str> = report.bad.iter().map(|b| b.1.as_str()).collect();
    for k in ["corrupt", "zero", "nocaption", "latin1", "noimage"] {
        assert!(bad_keys.contains(k), "inspect missed {k}: {:?}", report.bad);
    }
}

#[test]
fn interleaved_pages_inspect_clean_and_flag_broken_pages() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        out: dir.path().to_path_buf(),
        train_shards: 1,
        train_samples_per_shard: 4,
        val_shards: 1,
        val_samples_per_shard: 4,
        image_size: 32,
        interleaved: true,
        page_shards: 1,
        pages_per_shard: 12,
        val_page_shards: 1,
        ..Default::default()
    };
    generate(&cfg).unwrap();
    let shards = expand_shards(&cfg.pages_train_pattern()).unwrap();
    let r = rookery_data::inspect::inspect(&shards, &DataConfig::default().image_exts, "txt");
    assert_eq!(r.samples, 12);
    assert!(r.bad.is_empty(), "{:?}", r.bad);
    assert!(
        r.image_sides.values().sum::<u64>() >= 24,
        "2-4 images per page"
    );
    // a page whose first image is missing and whose second is out of range and undecodable
    let m = |e: &str, b: &[u8]| (e.to_string(), b.to_vec());
    let doc = br#"{"text_list": ["a", "b"], "image_info": [{"image_name": "img0.jpg", "matched_text_index": 1, "matched_sim": 0.3}, {"image_name": "img1.jpg", "matched_text_index": 5, "matched_sim": 0.3}]}"#;
    let broken = dir.path().join("broken.tar");
    write_shard(
        &broken,
        vec![(
            "p1".to_string(),
            vec![m("json", doc), m("img1.jpg", b"not a jpeg")],
        )],
    )
    .unwrap();
    let r = rookery_data::inspect::inspect(
        &[broken.to_string_lossy().into_owned()],
        &DataConfig::default().image_exts,
        "txt",
    );
    let why: Vec<&str> = r.bad.iter().map(|b| b.2.as_str()).collect();
    assert_eq!(why.len(), 3, "{why:?}");
    assert!(
        why[0].contains("not a member")
            && why[1].contains("out of range")
            && why[2].contains("undecodable"),
        "{why:?}"
    );
}

#[test]
fn resampled_streams_are_endless_draws_with_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth(dir.path(), 3, 5);
    let spec = StreamSpec {
        shards: expand_shards(&cfg.train_pattern()).unwrap(),
        rank: 0,
        world: 1,
        workers: 1,
        seed: 9,
        shuffle_buffer: 4,
        resampled: true,
        single_epoch: false,
        skip: Default::default(),
        stall_timeout: None,
    };
    let keys = stream_keys(spec.clone(), 60);
    assert_eq!(
        keys.len(),
        60,
        "four times the 15 samples: the stream does not end"
    );
    // shard draws with replacement: some epoch repeats a shard, so its samples come twice in it
    let draws: Vec<Vec<String>> = (0..20).map(|e| spec.worker_shards(e, 0, 1)).collect();
    assert!(
        draws
            .iter()
            .any(|d| d.iter().collect::<HashSet<_>>().len() < d.len()),
        "{draws:?}"
    );
    let again = stream_keys(spec, 60);
    assert_eq!(keys, again, "deterministic for a seed");
}

#[test]
fn resplitting_onto_another_world_size_repeats_and_skips_no_finished_shard() {
    use rookery_data::resplit::resplit;
    use std::collections::HashMap;
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth(dir.path(), 12, 5);
    let shards = expand_shards(&cfg.train_pattern()).unwrap();
    let shard_of: HashMap<String, String> = shards
        .iter()
        .flat_map(|s| keys_of(s).into_iter().map(move |k| (k, s.clone())))
        .collect();
    let spec = |rank, world| StreamSpec {
        shards: shards.clone(),
        rank,
        world,
        workers: 2,
        seed: 9,
        shuffle_buffer: 3,
        ..Default::default()
    };
    // Two old ranks read 13 samples each of epoch 0, then stop.
    let (mut delivered, mut old) = (HashSet::new(), vec![]);
    for rank in 0..2 {
        let mut s = ShardStream::start(spec(rank, 2), None).unwrap();
        for _ in 0..13 {
            if let Some(StreamItem::Sample { sample, epoch }) = s.next_item() {
                assert_eq!(epoch, 0);
                delivered.insert(sample.key);
            }
        }
        old.push(s.position().clone());
    }
    // Shards an old worker was in the middle of: the only ones whose samples may repeat.
    let mut partial: HashSet<String> = HashSet::new();
    for (r, p) in old.iter().enumerate() {
        for (w, st) in p.workers.iter().enumerate() {
            let list = spec(r, 2).worker_shards(0, r * 2 + w, 4);
            partial.extend(list.get(st.cursor).cloned());
            partial.extend(st.buffer.iter().map(|b| list[b.cursor as usize].clone()));
        }
    }
    for world in [1, 3] {
        let mut again = HashSet::new();
        let mut epoch0 = vec![];
        for rank in 0..world {
            let pos = resplit(&spec(rank, world), &old).unwrap();
            let s = ShardStream::start(spec(rank, world), Some(pos)).unwrap();
            for item in s.take(200) {
                if let StreamItem::Sample { sample, epoch: 0 } = item {
                    epoch0.push(sample.key);
                }
            }
        }
        for k in &epoch0 {
            assert!(
                again.insert(k.clone()),
                "world {world}: {k} read twice after the resplit"
            );
            if delivered.contains(k) {
                assert!(
                    partial.contains(&shard_of[k]),
                    "world {world}: {k} repeated from a finished shard"
                );
            }
        }
        let missing: Vec<_> = shard_of
            .keys()
            .filter(|k| !delivered.contains(*k) && !again.contains(*k))
            .collect();
        assert!(
            missing.is_empty(),
            "world {world}: epoch 0 samples never read: {missing:?}"
        );
        assert!(
            epoch0.len() < 60,
            "world {world}: finished shards must not be re-read"
        );
    }
}

/// A synthetic set of 8 pairs and `pages` interleaved pages (32 px images) written under `dir`.
fn small_pages(dir: &std::path::Path, pages: usize) -> SynthConfig {
    let cfg = SynthConfig {
        out: dir.to_path_buf(),
        train_shards: 1,
        train_samples_per_shard: 8,
        val_shards: 1,
        val_samples_per_shard: 4,
        image_size: 32,
        interleaved: true,
        page_shards: 1,
        pages_per_shard: pages,
        val_page_shards: 1,
        ..Default::default()
    };
    generate(&cfg).unwrap();
    cfg
}

#[test]
fn interleaved_pages_load_as_sequences_and_malformed_ones_are_counted() {
    use rookery_data::interleaved::{SequenceConfig, Specials};
    use rookery_data::pages::Pages;
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_pages(dir.path(), 12);
    // Malformed documents beside the good ones: index out of range, missing image, not JSON.
    let doc = |i: u64, name: &str| {
        format!(
            r#"{{"text_list": ["a red circle."], "image_info": [{{"image_name": "{name}", "matched_text_index": {i}, "matched_sim": 0.5}}]}}"#
        )
    };
    let m = |e: &str, b: &[u8]| (e.to_string(), b.to_vec());
    let bad = vec![
        (
            "bad0".to_string(),
            vec![
                m("json", doc(7, "img0.jpg").as_bytes()),
                m("img0.jpg", b"x"),
            ],
        ),
        (
            "bad1".to_string(),
            vec![m("json", doc(0, "img9.jpg").as_bytes())],
        ),
        ("bad2".to_string(), vec![m("json", b"{not json")]),
        (
            "bad3".to_string(),
            vec![
                m("json", doc(0, "img0.jpg").as_bytes()),
                m("img0.jpg", b"not a jpeg"),
            ],
        ),
    ];
    let bad_shard = dir.path().join("pages-bad.tar");
    write_shard(&bad_shard, bad).unwrap();
    let tk = Arc::new(TextTokenizer::from_file(&cfg.tokenizer_path()).unwrap());
    let mut dc = data_cfg(String::new(), &cfg.tokenizer_path());
    (dc.batch_size, dc.max_bad_fraction) = (4, 0.5);
    let mut shards = expand_shards(&cfg.pages_train_pattern()).unwrap();
    shards.push(bad_shard.display().to_string());
    let seq = SequenceConfig {
        max_tokens: 64,
        ..Default::default()
    };
    let prep = Pages {
        data: dc.clone(),
        seq: seq.clone(),
        tokenizer: tk.clone(),
        specials: Specials::of(&tk).unwrap(),
        mode: Mode::Eval,
        decode_images: true,
    };
    let image_id = tk.token_id("<image>").unwrap() as i64;
    let (mut docs, mut last) = (0, None);
    for b in Loader::start(&dc, prep, shards, 0, 1, Mode::Eval, None).unwrap() {
        let b = b.unwrap();
        assert_eq!(b.tokens.len(), b.batch_size * 64);
        assert_eq!(b.images.len(), b.batch_size * b.max_images * 3 * 32 * 32);
        for r in 0..b.batch_size {
            let row = &b.tokens[r * 64..(r + 1) * 64];
            let n = row.iter().filter(|&&t| t == image_id).count();
            assert_eq!(
                n, b.n_images[r],
                "one <image> token per image in {}",
                b.keys[r]
            );
            assert!(n >= 1 && b.targets[r * 64..(r + 1) * 64].contains(&1.0));
        }
        docs += b.batch_size;
        last = Some(b.position);
    }
    let counts = last.unwrap().counts;
    // Pages whose every image fell under min_sim are dropped too (the synthetic set has some).
    assert_eq!(docs as u64 + counts.bad, 16);
    assert!(counts.bad >= 4, "{counts:?}");
    assert!(
        counts.by_reason.keys().any(|k| k.contains("bad document")),
        "{counts:?}"
    );
    assert!(
        counts
            .by_reason
            .keys()
            .any(|k| k.contains("undecodable image")),
        "{counts:?}"
    );
}

/// The keys of the first `n` samples of a stream.
fn stream_keys(spec: StreamSpec, n: usize) -> Vec<String> {
    let stream = ShardStream::start(spec, None).unwrap();
    stream
        .filter_map(|i| {
            if let StreamItem::Sample { sample, .. } = i {
                Some(sample.key)
            } else {
                None
            }
        })
        .take(n)
        .collect()
}

#[test]
fn image_text_pairs_mix_into_pages_with_their_loss_weight() {
    use rookery_data::pages::Pages;
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_pages(dir.path(), 8);
    let tk = Arc::new(TextTokenizer::from_file(&cfg.tokenizer_path()).unwrap());
    let mut dc = data_cfg(String::new(), &cfg.tokenizer_path());
    dc.batch_size = 4;
    dc.interleaved.max_tokens = 48;
    dc.interleaved.pairs_weight = 0.25;
    let shards = expand_shards(&format!(
        "{}::{}",
        cfg.train_pattern(),
        cfg.pages_train_pattern()
    ))
    .unwrap();
    let prep = Pages::new(&dc, tk.clone(), Mode::Eval).unwrap();
    let (image, eoc) = (
        tk.token_id("<image>").unwrap() as i64,
        tk.token_id("<|endofchunk|>").unwrap() as i64,
    );
    let (mut pairs, mut pages) = (0, 0);
    for b in Loader::start(&dc, prep, shards, 0, 1, Mode::Eval, None).unwrap() {
        let b = b.unwrap();
        for r in 0..b.batch_size {
            let row = &b.tokens[r * 48..(r + 1) * 48];
            let w = &b.targets[r * 48..(r + 1) * 48];
            if b.keys[r].starts_with("page") {
                pages += 1;
                assert!(w.iter().all(|&x| x == 0.0 || x == 1.0));
                continue;
            }
            pairs += 1;
            // <sot> <image> caption… <|endofchunk|> <eot>: the caption and the end of chunk
            // carry the pair weight, nothing else does.
            assert_eq!(&row[..2], &[tk.sot as i64, image], "{}", b.keys[r]);
            assert_eq!(b.n_images[r], 1);
            let end = row.iter().position(|&t| t == eoc).unwrap();
            assert!(w[2..=end].iter().all(|&x| x == 0.25), "{w:?}");
            assert!(
                w[..2].iter().chain(&w[end + 1..]).all(|&x| x == 0.0),
                "{w:?}"
            );
        }
    }
    assert_eq!(pairs, 8);
    assert!(pages >= 6, "{pages}");
}

/// Training batches carry the `.neg.txt` hard-negative captions the synthetic set writes; a
/// training sample without one is skipped and counted, and evaluation does not look for them.
#[test]
fn hard_negative_captions_load_with_their_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = synth(dir.path(), 1, 24);
    let shard = expand_shards(&cfg.train_pattern()).unwrap()[0].clone();
    // The same samples again, the first one without its negative.
    let mut samples = vec![];
    read_shard(&shard, |i| {
        if let ShardItem::Sample(s) = i {
            let mut members: Vec<(String, Vec<u8>)> = s.members.clone();
            if samples.is_empty() {
                members.retain(|(ext, _)| ext != "neg.txt");
            }
            samples.push((s.key.clone(), members));
        }
        true
    });
    let edited = dir.path().join("edited.tar");
    write_shard(&edited, samples).unwrap();
    let mut dc = data_cfg(edited.display().to_string(), &cfg.tokenizer_path());
    dc.hard_negative_ext = "neg.txt".into();
    let t = dc.context_length;
    let (mut rows, mut last) = (0, None);
    // Training streams are endless: three batches take the whole epoch of 23 good samples.
    for b in loader(&dc, 0, 1, Mode::Train).take(3) {
        let b = b.unwrap();
        assert_eq!(b.neg_tokens.len(), b.tokens.len());
        for (cap, neg) in b.tokens.chunks(t).zip(b.neg_tokens.chunks(t)) {
            assert_ne!(cap, neg, "a negative equal to its caption");
            assert!(neg.iter().any(|&id| id > 3), "an empty negative");
        }
        rows += b.batch_size;
        last = Some(b.position.counts);
    }
    let counts = last.unwrap();
    assert_eq!(rows, 24);
    assert!(
        counts.by_reason["missing hard-negative caption"] >= 1,
        "{counts:?}"
    );
    assert_eq!(
        counts.bad, counts.by_reason["missing hard-negative caption"],
        "{counts:?}"
    );
    for b in loader(&dc, 0, 1, Mode::Eval) {
        let b = b.unwrap();
        assert!(b.neg_tokens.is_empty() && b.position.counts.bad == 0);
    }
}
