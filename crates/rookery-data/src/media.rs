//! Media of interleaved documents: an image, or a video's frames in order (an image is a video
//! of one frame, as Flamingo reads both).
//!
//! A video is named in one of two ways:
//! - by its frames as members of the webdataset sample, `KEY.frame000.jpg`, `KEY.frame001.jpg`,
//!   ... (extension `frame000.jpg`; in a document, prefixed by the video's name:
//!   `vid0.frame000.jpg`), numbered from 0 without gaps;
//! - by a media entry in the document JSON listing its frames' members (MMC4 `image_info[i]
//!   .frames`, OBELICS `images[i]` as a list).
//!
//! Frames beyond `data.interleaved.max_frames` are dropped by even sampling (the first and the
//! last frame always kept, so what appears or leaves stays in view); a video of more than
//! `data.interleaved.max_video_frames` is refused, not sampled: past that bound the sample is
//! far more likely broken than long, and all its members are held in memory.

use std::collections::BTreeSet;

/// Where an image's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// A member of the same webdataset sample, by extension (`img0.jpg`).
    Member(String),
    /// Base64 JPEG/PNG inside the document JSON (OpenFlamingo's MMC4 shards).
    Base64(String),
}

/// One medium: its frames in order, at least one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Medium {
    pub frames: Vec<ImageRef>,
}

impl Medium {
    pub fn image(r: ImageRef) -> Self {
        Medium { frames: vec![r] }
    }
}

/// Why a video cannot be read. Each names the video.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VideoError {
    #[error("video {0:?} has no frames")]
    NoFrames(String),
    #[error(
        "video {video:?} is missing frame {missing} (has {found} frames numbered up to {last})"
    )]
    MissingFrame {
        video: String,
        missing: usize,
        found: usize,
        last: usize,
    },
    #[error("video {video:?} has {frames} frames, more than allowed (data.interleaved.max_video_frames = {max})")]
    TooManyFrames {
        video: String,
        frames: usize,
        max: usize,
    },
}

pub fn is_image(ext: &str) -> bool {
    ["jpg", "jpeg", "png", "webp"]
        .iter()
        .any(|e| ext.rsplit('.').next() == Some(e))
}

/// Whether `ext` is a video frame (`frame000.jpg`, `vid0.frame000.jpg`).
pub fn is_frame(ext: &str) -> bool {
    let prefix = match ext.rfind(".frame") {
        Some(at) => &ext[..at + 1],
        None => "",
    };
    frame_number(ext, prefix).is_some()
}

/// The frame number of `ext` when it is `{prefix}frameNNN.{image ext}`.
fn frame_number(ext: &str, prefix: &str) -> Option<usize> {
    let rest = ext.strip_prefix(prefix)?.strip_prefix("frame")?;
    let (digits, kind) = rest.split_once('.')?;
    let valid = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    (valid && is_image(kind)).then(|| digits.parse().ok())?
}

/// The members that are frames `{prefix}frame000.jpg`, `{prefix}frame001.jpg`, ... in frame
/// order; `None` when there are none, an error naming `video` when a number is skipped.
pub fn frame_members(
    members: &BTreeSet<String>,
    prefix: &str,
    video: &str,
) -> Option<Result<Vec<String>, VideoError>> {
    let mut numbered: Vec<(usize, &String)> = members
        .iter()
        .filter_map(|m| frame_number(m, prefix).map(|n| (n, m)))
        .collect();
    if numbered.is_empty() {
        return None;
    }
    numbered.sort();
    let last = numbered.last().expect("not empty").0;
    let gap = numbered.iter().enumerate().find(|(i, (n, _))| i != n);
    if let Some((missing, _)) = gap {
        return Some(Err(VideoError::MissingFrame {
            video: video.to_string(),
            missing,
            found: numbered.len(),
            last,
        }));
    }
    Some(Ok(numbered.into_iter().map(|(_, m)| m.clone()).collect()))
}

/// A media entry's frame list (JSON strings naming members) as a medium.
pub fn listed_frames(
    list: &[serde_json::Value],
    members: &BTreeSet<String>,
    video: &str,
) -> Result<Medium, String> {
    if list.is_empty() {
        return Err(VideoError::NoFrames(video.to_string()).to_string());
    }
    let frames = list
        .iter()
        .enumerate()
        .map(|(i, f)| match f.as_str() {
            Some(name) if members.contains(name) => Ok(ImageRef::Member(name.to_string())),
            Some(name) => Err(format!(
                "video {video:?}: frame {i} ({name:?}) is not a member of the sample"
            )),
            None => Err(format!("video {video:?}: frame {i} is not a member name")),
        })
        .collect::<Result<_, _>>()?;
    Ok(Medium { frames })
}

/// Rows of media (each medium its frames' pixels, `per` floats each) laid out as
/// `[rows, max_media, max_frames, per]`, missing media and frames zero.
pub struct PackedMedia {
    pub pixels: Vec<f32>,
    /// `[rows * max_media]`: each slot's real frames (an empty slot counts one).
    pub frames: Vec<usize>,
    pub max_media: usize,
    pub max_frames: usize,
}

/// Lays out `rows` (per row, its media; per medium, its frames) as [`PackedMedia`].
pub fn pack_media(rows: &[&[Vec<Vec<f32>>]], per: usize) -> PackedMedia {
    let max_media = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let longest = rows.iter().flat_map(|r| r.iter().map(Vec::len)).max();
    let max_frames = longest.unwrap_or(1).max(1);
    let mut pixels = vec![0.0; rows.len() * max_media * max_frames * per];
    let mut frames = vec![1; rows.len() * max_media];
    for (row, media) in rows.iter().enumerate() {
        for (k, medium) in media.iter().enumerate() {
            let slot = row * max_media + k;
            frames[slot] = medium.len();
            for (t, px) in medium.iter().enumerate() {
                let at = (slot * max_frames + t) * per;
                pixels[at..at + per].copy_from_slice(px);
            }
        }
    }
    PackedMedia {
        pixels,
        frames,
        max_media,
        max_frames,
    }
}

/// Indices of `keep` frames out of `total`, evenly spread with the first and the last kept
/// (`linspace(0, total - 1, keep)` rounded); all of them when `total <= keep`.
pub fn even_sample(total: usize, keep: usize) -> Vec<usize> {
    if total <= keep {
        return (0..total).collect();
    }
    if keep <= 1 {
        return vec![0];
    }
    let step = (total - 1) as f64 / (keep - 1) as f64;
    (0..keep)
        .map(|i| (i as f64 * step).round() as usize)
        .collect()
}

/// `medium` with at most `max_frames` frames (evenly sampled), refused when it has more than
/// `max_video_frames`; `video` names it in the error.
pub fn sample_frames(
    medium: &Medium,
    max_frames: usize,
    max_video_frames: usize,
    video: &str,
) -> Result<Medium, VideoError> {
    let total = medium.frames.len();
    if total == 0 {
        return Err(VideoError::NoFrames(video.to_string()));
    }
    if total > max_video_frames {
        return Err(VideoError::TooManyFrames {
            video: video.to_string(),
            frames: total,
            max: max_video_frames,
        });
    }
    let frames = even_sample(total, max_frames)
        .into_iter()
        .map(|i| medium.frames[i].clone())
        .collect();
    Ok(Medium { frames })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn even_sampling_keeps_both_ends() {
        assert_eq!(even_sample(8, 4), vec![0, 2, 5, 7]);
        assert_eq!(even_sample(5, 3), vec![0, 2, 4]);
        assert_eq!(even_sample(3, 4), vec![0, 1, 2]);
        assert_eq!(even_sample(6, 1), vec![0]);
        for total in 1..40 {
            for keep in 1..10 {
                let s = even_sample(total, keep);
                assert_eq!(s.len(), total.min(keep));
                assert!(s.windows(2).all(|w| w[0] < w[1]), "{total} {keep}: {s:?}");
                assert_eq!(s[0], 0);
                if keep > 1 {
                    assert_eq!(*s.last().unwrap(), total - 1);
                }
            }
        }
    }

    #[test]
    fn frames_are_found_in_number_order_and_gaps_refused() {
        let m = members(&[
            "json",
            "vid0.frame010.jpg",
            "vid0.frame002.jpg",
            "vid0.frame000.png",
            "vid0.frame001.jpg",
            "vid1.frame000.jpg",
            "frame000.jpg",
        ]);
        // 0, 1, 2 and 10: frame 3 is missing.
        let e = frame_members(&m, "vid0.", "vid0").unwrap().unwrap_err();
        assert_eq!(
            e,
            VideoError::MissingFrame {
                video: "vid0".into(),
                missing: 3,
                found: 4,
                last: 10
            }
        );
        let m = members(&[
            "vid0.frame002.jpg",
            "vid0.frame000.png",
            "vid0.frame001.jpg",
        ]);
        assert_eq!(
            frame_members(&m, "vid0.", "vid0").unwrap().unwrap(),
            vec![
                "vid0.frame000.png",
                "vid0.frame001.jpg",
                "vid0.frame002.jpg"
            ]
        );
        assert!(frame_members(&m, "vid1.", "vid1").is_none());
        assert!(frame_members(
            &members(&["frame00x.jpg", "frame.jpg", "frame000.txt"]),
            "",
            "k"
        )
        .is_none());
        assert!(is_frame("frame000.jpg") && is_frame("vid0.frame12.png"));
        assert!(!is_frame("img0.jpg") && !is_frame("frame.jpg") && !is_frame("vid.frame1.txt"));
    }

    #[test]
    fn too_long_and_empty_videos_are_refused() {
        let v = |n: usize| Medium {
            frames: (0..n).map(|i| ImageRef::Member(format!("f{i}"))).collect(),
        };
        assert_eq!(sample_frames(&v(8), 4, 64, "v").unwrap().frames.len(), 4);
        assert!(matches!(
            sample_frames(&v(65), 4, 64, "v"),
            Err(VideoError::TooManyFrames { frames: 65, .. })
        ));
        assert_eq!(
            sample_frames(&v(0), 4, 64, "v"),
            Err(VideoError::NoFrames("v".into()))
        );
        let m = members(&["a.jpg"]);
        assert!(listed_frames(&[], &m, "v")
            .unwrap_err()
            .contains("no frames"));
        let missing = listed_frames(&[serde_json::json!("b.jpg")], &m, "v").unwrap_err();
        assert!(missing.contains("\"b.jpg\""), "{missing}");
    }
}
