//! Malformed input files never panic the reader or make it allocate what a header claims:
//! tar shards, MMC4 / OBELICS documents and tokenizer files, mutated at random from valid ones
//! (a bounded number of cases, so CI stays fast).

use std::collections::BTreeSet;

use proptest::prelude::*;
use rookery_data::interleaved::{parse_mmc4, parse_obelics, Item};
use rookery_data::wds::{read_shard, ShardItem};
use rookery_data::writer::write_shard;

/// `bytes` with each `(position, value)` written over it, then cut to `len` (if shorter).
fn mutate(bytes: &[u8], edits: &[(usize, u8)], len: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for &(i, v) in edits {
        let n = b.len();
        b[i % n] = v;
    }
    b.truncate(len.max(1));
    b
}

fn valid_shard(dir: &std::path::Path) -> Vec<u8> {
    let m = |e: &str, b: &[u8]| (e.to_string(), b.to_vec());
    let samples = (0..3).map(|i| {
        (
            format!("s{i}"),
            vec![
                m("jpg", &[0xff, 0xd8, 0xff, i as u8]),
                m("txt", b"two red circles"),
                m("json", b"{}"),
            ],
        )
    });
    let path = dir.join("valid.tar");
    write_shard(&path, samples).unwrap();
    std::fs::read(path).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn mutated_tar_shards_end_in_samples_or_one_error(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..12),
        len in 1usize..8192,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let bytes = mutate(&valid_shard(dir.path()), &edits, len);
        let path = dir.path().join("mutated.tar");
        std::fs::write(&path, bytes).unwrap();
        let (mut samples, mut broken) = (0, 0);
        read_shard(path.to_str().unwrap(), |i| {
            match i {
                ShardItem::Sample(_) => samples += 1,
                ShardItem::Broken(e) => {
                    broken += 1;
                    assert!(e.to_string().contains("mutated.tar"), "{e}");
                }
            }
            true
        });
        prop_assert!(broken <= 1);
        prop_assert!(samples <= 3 + 1, "{samples} samples from 3");
    }

    #[test]
    fn mutated_mmc4_and_obelics_documents_with_images_and_videos_parse_or_are_refused(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let mmc4 = br#"{"text_list": ["a red circle.", "two blue squares."], "image_info": [{"image_name": "img0.jpg", "matched_text_index": 1, "matched_sim": 0.3}]}"#;
        let obelics = br#"{"texts": [null, "a red circle."], "images": ["img0.jpg", null]}"#;
        // Videos: named by their frames' members, or listing them.
        let mmc4_video = br#"{"text_list": ["a.", "b."], "image_info": [{"image_name": "vid0", "matched_text_index": 1}, {"frames": ["vid0.frame001.jpg", "img0.jpg"], "matched_text_index": 0}]}"#;
        let obelics_video = br#"{"texts": [null, "a.", null], "images": ["vid0", null, ["vid0.frame000.jpg"]]}"#;
        let members: BTreeSet<String> = ["img0.jpg", "vid0.frame000.jpg", "vid0.frame001.jpg"]
            .map(String::from)
            .into();
        let parsed = |d: &[u8]| serde_json::from_slice::<serde_json::Value>(d).unwrap();
        let videos = |items: Vec<Item>| -> Vec<usize> {
            items.iter().filter_map(|i| match i {
                Item::Media(m) => Some(m.frames.len()),
                Item::Text(_) => None,
            }).collect()
        };
        // Unmutated, they read as the videos they name.
        prop_assert_eq!(videos(parse_mmc4(&parsed(mmc4_video), &members, 0.0).unwrap()), vec![2, 2]);
        prop_assert_eq!(videos(parse_obelics(&parsed(obelics_video), &members).unwrap()), vec![2, 1]);
        for doc in [&mmc4[..], &obelics[..], &mmc4_video[..], &obelics_video[..]] {
            let bytes = mutate(doc, &edits, usize::MAX);
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                let _ = parse_mmc4(&v, &members, 0.0);
                let _ = parse_obelics(&v, &members);
            }
        }
    }

    #[test]
    fn mutated_tokenizer_files_load_or_are_refused_naming_the_file(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        rookery_data::tokenize::fit_word_level(["two red circles", "a blue square"].into_iter(), &path).unwrap();
        let bytes = mutate(&std::fs::read(&path).unwrap(), &edits, usize::MAX);
        std::fs::write(&path, bytes).unwrap();
        if let Err(e) = rookery_data::TextTokenizer::from_file(&path) {
            prop_assert!(e.to_string().contains("tokenizer.json"), "{}", e);
        }
    }
}

/// A member whose header claims a terabyte is read as what is there, not reserved up front.
#[test]
fn a_tar_header_claiming_a_huge_size_is_not_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = valid_shard(dir.path());
    // The first header's size field (12 bytes at offset 124) in GNU's base-256 form: 2^50
    // bytes, a petabyte.
    bytes[124] = 0x80;
    bytes[125..136].copy_from_slice(&(1u128 << 50).to_be_bytes()[5..]);
    // Recompute the header checksum (offset 148, 8 bytes: sum with the field as spaces).
    bytes[148..156].copy_from_slice(b"        ");
    let sum: u32 = bytes[..512].iter().map(|&b| b as u32).sum();
    bytes[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let path = dir.path().join("huge.tar");
    std::fs::write(&path, bytes).unwrap();
    let mut broken = None;
    read_shard(path.to_str().unwrap(), |i| {
        if let ShardItem::Broken(e) = i {
            broken = Some(e.to_string());
        }
        true
    });
    let why = broken.expect("a member longer than the file breaks the shard");
    assert!(why.contains("huge.tar"), "{why}");
}
