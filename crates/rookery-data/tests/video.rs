//! Videos through the page loader: frames sampled and padded as `data.interleaved` says, and
//! malformed videos (a missing frame, no frames, more than allowed) skipped and counted.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rookery_data::loader::{load_image, Mode};
use rookery_data::media::even_sample;
use rookery_data::pages::{PageBatch, Pages};
use rookery_data::synth::{generate, SynthConfig};
use rookery_data::wds::{read_shard, ShardItem};
use rookery_data::writer::write_shard;
use rookery_data::{expand_shards, DataConfig, DataError, Loader, TextTokenizer};

fn video_set(dir: &Path, pages: usize) -> SynthConfig {
    let cfg = SynthConfig {
        out: dir.to_path_buf(),
        train_shards: 1,
        train_samples_per_shard: 4,
        val_shards: 1,
        val_samples_per_shard: 4,
        image_size: 32,
        video: true,
        video_shards: 1,
        video_pages_per_shard: pages,
        val_video_shards: 1,
        ..Default::default()
    };
    generate(&cfg).unwrap();
    cfg
}

fn data_cfg(tokenizer: &Path, max_frames: usize) -> DataConfig {
    let mut dc = DataConfig {
        tokenizer: tokenizer.to_path_buf(),
        batch_size: 4,
        image_size: 32,
        shuffle_buffer: 8,
        workers: 1,
        decode_threads: 2,
        ..Default::default()
    };
    dc.interleaved.max_tokens = 64;
    dc.interleaved.max_frames = max_frames;
    dc
}

fn batches(dc: &DataConfig, shards: Vec<String>) -> Result<Vec<PageBatch>, DataError> {
    let tk = Arc::new(TextTokenizer::from_file(&dc.tokenizer).unwrap());
    let prep = Pages::new(dc, tk, Mode::Eval).unwrap();
    Loader::start(dc, prep, shards, 0, 1, Mode::Eval, None)
        .unwrap()
        .collect()
}

/// Every sample's members by key.
fn samples(shard: &str) -> HashMap<String, HashMap<String, Vec<u8>>> {
    let mut out = HashMap::new();
    read_shard(shard, |i| {
        if let ShardItem::Sample(s) = i {
            out.insert(s.key.clone(), s.members.into_iter().collect());
        }
        true
    });
    out
}

#[test]
fn video_pages_load_with_frames_sampled_evenly_and_padding_zeroed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = video_set(dir.path(), 12);
    let shard = expand_shards(&cfg.videos_train_pattern()).unwrap();
    let raw = samples(&shard[0]);
    // Videos of 4 to 8 frames: those over 6 sampled, those under padded.
    let dc = data_cfg(&cfg.tokenizer_path(), 6);
    let per = 3 * 32 * 32;
    let (mut pages, mut padded, mut sampled) = (0, 0, 0);
    for b in batches(&dc, shard.clone()).unwrap() {
        let (n, f) = (b.max_images, b.max_frames);
        assert!(f <= 6);
        assert_eq!(b.images.len(), b.batch_size * n * f * per);
        for r in 0..b.batch_size {
            let members = &raw[&b.keys[r]];
            for k in 0..n {
                let slot = r * n + k;
                let at = |t: usize| &b.images[(slot * f + t) * per..(slot * f + t + 1) * per];
                if k >= b.n_images[r] {
                    assert_eq!(b.frames[slot], 1, "an empty slot counts one frame");
                    assert!((0..f).all(|t| at(t).iter().all(|&x| x == 0.0)));
                    continue;
                }
                let total = (0..)
                    .take_while(|t| members.contains_key(&format!("vid{k}.frame{t:03}.jpg")))
                    .count();
                let picked = even_sample(total, 6);
                sampled += usize::from(total > 6);
                assert_eq!(b.frames[slot], picked.len(), "{} video {k}", b.keys[r]);
                for (t, &i) in picked.iter().enumerate() {
                    let bytes = &members[&format!("vid{k}.frame{i:03}.jpg")];
                    let want = load_image(&dc, Mode::Eval, "jpg", bytes, &[0]).unwrap();
                    assert_eq!(at(t), &want[..], "{} video {k} frame {t}", b.keys[r]);
                }
                for t in picked.len()..f {
                    padded += 1;
                    assert!(at(t).iter().all(|&x| x == 0.0), "padding is zeros");
                }
            }
            pages += 1;
        }
    }
    assert_eq!((pages, sampled > 0), (12, true));
    assert!(
        padded > 0,
        "no batch mixed frame counts: the padding went untested"
    );
    // max_frames = 1 reads each video as its first frame.
    for b in batches(&data_cfg(&cfg.tokenizer_path(), 1), shard).unwrap() {
        assert_eq!(b.max_frames, 1);
        assert!(b.frames.iter().all(|&f| f == 1));
        let bytes = &raw[&b.keys[0]]["vid0.frame000.jpg"];
        let want = load_image(&dc, Mode::Eval, "jpg", bytes, &[0]).unwrap();
        assert_eq!(&b.images[..per], &want[..]);
    }
}

/// A shard of hand-made samples beside a good one: `(key, [(extension, bytes)])`.
fn hand_made(dir: &Path, frame: &[u8]) -> String {
    let m = |e: &str, b: &[u8]| (e.to_string(), b.to_vec());
    let mmc4 = |entry: &str| {
        format!(
            r#"{{"text_list": ["intro.", "a red circle moving left."], "image_info": [{{{entry}, "matched_text_index": 1, "matched_sim": 0.5}}]}}"#
        )
    };
    let frames = |prefix: &str, numbers: &[usize]| -> Vec<(String, Vec<u8>)> {
        numbers
            .iter()
            .map(|t| m(&format!("{prefix}frame{t:03}.jpg"), frame))
            .collect()
    };
    let with = |json: String, mut f: Vec<(String, Vec<u8>)>| {
        f.push(m("json", json.as_bytes()));
        f
    };
    let samples = vec![
        // Frame 1 of 3 is missing.
        (
            "gap".to_string(),
            with(mmc4(r#""image_name": "vid0""#), frames("vid0.", &[0, 2, 3])),
        ),
        // A media entry listing no frames.
        ("empty".to_string(), with(mmc4(r#""frames": []"#), vec![])),
        // More frames than max_video_frames (6).
        (
            "long".to_string(),
            with(
                mmc4(r#""image_name": "vid0""#),
                frames("vid0.", &[0, 1, 2, 3, 4, 5, 6]),
            ),
        ),
        // A video-text pair with a gap.
        ("pairgap".to_string(), {
            let mut f = frames("", &[0, 2]);
            f.push(m("txt", b"a red circle moving left."));
            f
        }),
        // Good: a video-text pair of three frames, an OBELICS page listing two frames.
        ("pair".to_string(), {
            let mut f = frames("", &[0, 1, 2]);
            f.push(m("txt", b"a red circle moving left."));
            f
        }),
        ("obelics".to_string(), {
            let doc = r#"{"texts": ["intro.", null, "a red circle moving left."], "images": [null, ["a.jpg", "b.jpg"], null]}"#;
            vec![
                m("json", doc.as_bytes()),
                m("a.jpg", frame),
                m("b.jpg", frame),
            ]
        }),
    ];
    let path = dir.join("videos-bad.tar");
    write_shard(&path, samples).unwrap();
    path.display().to_string()
}

#[test]
fn malformed_videos_are_skipped_and_counted_with_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = video_set(dir.path(), 4);
    let shard = expand_shards(&cfg.videos_train_pattern()).unwrap();
    let raw = samples(&shard[0]);
    let frame = raw.values().next().unwrap()["vid0.frame000.jpg"].clone();
    let bad = hand_made(dir.path(), &frame);
    let mut dc = data_cfg(&cfg.tokenizer_path(), 4);
    (dc.interleaved.max_video_frames, dc.max_bad_fraction) = (6, 0.9);
    let all = batches(&dc, vec![bad.clone()]).unwrap();
    let keys: Vec<&str> = all
        .iter()
        .flat_map(|b| &b.keys)
        .map(|k| k.as_str())
        .collect();
    assert_eq!(keys, ["pair", "obelics"]);
    let b = &all[0];
    let frames: Vec<usize> = (0..b.batch_size)
        .map(|r| b.frames[r * b.max_images])
        .collect();
    assert_eq!(frames, [3, 2]);
    let counts = &b.position.counts;
    assert_eq!(counts.bad, 4, "{counts:?}");
    assert_eq!(counts.by_reason.get("bad video"), Some(&4), "{counts:?}");
    // With no bad sample allowed, the first one stops the loader naming its key and reason.
    (dc.max_bad_fraction, dc.min_bad_allowed) = (0.0, 0);
    let e = batches(&dc, vec![bad]).unwrap_err().to_string();
    assert!(
        e.contains("key gap") && e.contains("missing frame 1"),
        "{e}"
    );
}

/// `rookery data inspect` reads video pages as the loader does: a clean set is clean (every
/// frame decoded, frame members counted as one class), and the malformed videos are listed.
#[test]
fn inspect_reads_videos_and_lists_the_malformed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = video_set(dir.path(), 6);
    let shards = expand_shards(&cfg.videos_train_pattern()).unwrap();
    let exts = DataConfig::default().image_exts;
    let r = rookery_data::inspect::inspect(&shards, &exts, "txt");
    assert_eq!(r.samples, 6);
    assert!(r.bad.is_empty(), "{:?}", r.bad);
    let frames: u64 = samples(&shards[0])
        .values()
        .map(|m| m.keys().filter(|k| k.contains(".frame")).count() as u64)
        .sum();
    assert_eq!(r.image_sides.values().sum::<u64>(), frames);
    assert_eq!(
        r.extensions.get("*.frame*.jpg"),
        Some(&frames),
        "{:?}",
        r.extensions
    );
    let frame = samples(&shards[0]).values().next().unwrap()["vid0.frame000.jpg"].clone();
    let bad = hand_made(dir.path(), &frame);
    let r = rookery_data::inspect::inspect(&[bad], &exts, "txt");
    let mut keys: Vec<&str> = r.bad.iter().map(|b| b.1.as_str()).collect();
    keys.sort();
    // "long" is only too long for a run's max_video_frames, not malformed in itself.
    assert_eq!(keys, ["empty", "gap", "pairgap"], "{:?}", r.bad);
    assert!(r.bad.iter().all(|b| b.2.contains("video")), "{:?}", r.bad);
}
