//! Video pages: MMC4-layout documents whose media are short videos (4 to 8 frames) of shapes
//! that move, turn, appear or disappear, each followed by a caption or a question. The
//! questions need more than one frame: which way a shape moves (it starts near the middle
//! whatever its direction), which way it turns round the middle (the same arcs either way:
//! only the frames' order tells), which color appears (absent from the first frame), which one
//! disappears (both in the first frame). "What color is the ...", asked of a shape alone, is a
//! control a single frame answers. Appearing and disappearing shapes are asked for by color,
//! which a tiny vision tower reads without fail (shape it does not; docs/experiments.md), so
//! the questions measure what the frames add.
//!
//! A video is stored as members `vid{i}.frame000.jpg`, `vid{i}.frame001.jpg`, ... of the page's
//! sample, named by `image_info[i].image_name = "vid{i}"` ([`crate::media`]).

use serde_json::json;

use super::pages::Qa;
use super::scene::{add_noise, draw, Group, Scene, COLORS, SHAPES};
use crate::rng::Rng;

/// Words the video pages use besides the scene vocabulary and the page words.
pub const VIDEO_WORDS: &[&str] = &[
    "video",
    "videos",
    "moving",
    "move",
    "moves",
    "way",
    "does",
    "left",
    "right",
    "up",
    "down",
    "appears",
    "disappears",
    "next",
    "to",
    "and",
    "stays",
    "turn",
    "turning",
    "clockwise",
    "counterclockwise",
    "is",
    "here",
    "look",
    "at",
    "these",
    "some",
    "of",
    "shapes",
    "shape",
    "what",
    "color",
    "which",
    "the",
    "this",
    "shows",
    "a",
    "an",
    "q",
    ":",
    "?",
    ".",
];
/// Directions of motion and their unit steps (x right, y down).
pub const DIRECTIONS: [(&str, (f64, f64)); 4] = [
    ("left", (-1.0, 0.0)),
    ("right", (1.0, 0.0)),
    ("up", (0.0, -1.0)),
    ("down", (0.0, 1.0)),
];
/// How far a moving shape travels over the whole video, in image sides.
const TRAVEL: f64 = 0.3;
/// A turning shape's circle around the middle (radius, in image sides) and how far round it
/// goes over the whole video (radians).
const ORBIT: (f64, f64) = (0.25, std::f64::consts::FRAC_PI_2);
const INTROS: [&str; 3] = [
    "here is a video.",
    "look at these videos.",
    "some videos of shapes.",
];

/// What happens in a video.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Event {
    /// Shape `a` moves one way.
    Moves { direction: usize },
    /// Shape `a` goes a quarter round the middle, from angle `from` (radians, 0 to the right),
    /// clockwise or not. Where it starts and the arc it covers are the same either way: only
    /// the frames' order tells.
    Turns { clockwise: bool, from: f64 },
    /// Shape `a` stays; `b` appears at frame `at`.
    Appears { at: usize },
    /// Shapes `a` and `b` are there; `b` disappears at frame `at`.
    Disappears { at: usize },
}

/// A video: two shapes (only `a` is shown in a motion video), where they start, what happens.
#[derive(Clone, Debug)]
pub struct Video {
    pub frames: usize,
    pub a: Group,
    pub b: Group,
    pub a_at: (f64, f64),
    pub b_at: (f64, f64),
    pub event: Event,
    scene: Scene,
}

impl Video {
    pub fn random(rng: &mut Rng, frames: usize) -> Self {
        let one = |rng: &mut Rng| Group {
            count: 1,
            ..Group::random(rng)
        };
        let a = one(rng);
        let mut b = one(rng);
        while b.shape == a.shape || b.color == a.color {
            b = one(rng);
        }
        let event = match rng.below(4) {
            0 => Event::Moves {
                direction: rng.below(DIRECTIONS.len()),
            },
            3 => Event::Turns {
                clockwise: rng.bool(0.5),
                from: rng.uniform(0.0, std::f64::consts::TAU),
            },
            1 => Event::Appears {
                at: 1 + rng.below(frames - 1),
            },
            _ => Event::Disappears {
                at: 1 + rng.below(frames - 1),
            },
        };
        // Where `a` starts, drawn apart from the direction: from anywhere in the middle it can
        // travel any way and stay in view, so the first frame says nothing of where it goes.
        let a_at = (rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6));
        // `b` near the edge on the far side from `a`, so the two barely ever touch.
        let left = a_at.0 > 0.5;
        let bx = if left {
            rng.uniform(0.12, 0.18)
        } else {
            rng.uniform(0.82, 0.88)
        };
        let mut b_at = (bx, rng.uniform(0.15, 0.85));
        // Which of the two comes or goes is not told by where it is: either may be at the edge.
        let mut a_at = a_at;
        if matches!(event, Event::Appears { .. } | Event::Disappears { .. }) && rng.bool(0.5) {
            std::mem::swap(&mut a_at, &mut b_at);
        }
        let scene = Scene::with_groups(rng, vec![a], None);
        Video {
            frames,
            a,
            b,
            a_at,
            b_at,
            event,
            scene,
        }
    }

    /// Frame `t` as packed RGB8 of `size`x`size`.
    pub fn render(&self, t: usize, size: u32, rng: &mut Rng) -> Vec<u8> {
        let s = size as usize;
        let mut px = self.scene.paint_background(s);
        let progress = t as f64 / (self.frames - 1) as f64;
        let (a_at, show_b) = match self.event {
            Event::Moves { direction } => {
                let (dx, dy) = DIRECTIONS[direction].1;
                let (x, y) = self.a_at;
                (
                    (x + dx * TRAVEL * progress, y + dy * TRAVEL * progress),
                    false,
                )
            }
            Event::Turns { clockwise, from } => {
                // y points down: a growing angle turns clockwise on screen.
                let sign = if clockwise { 1.0 } else { -1.0 };
                let angle = from + sign * ORBIT.1 * progress;
                let (r, (sin, cos)) = (ORBIT.0, angle.sin_cos());
                ((0.5 + r * cos, 0.5 + r * sin), false)
            }
            Event::Appears { at } => (self.a_at, t >= at),
            Event::Disappears { at } => (self.a_at, t < at),
        };
        draw(
            &mut px,
            s,
            self.a.shape,
            self.a.color,
            a_at,
            self.a.half_side(),
        );
        if show_b {
            let b = &self.b;
            draw(&mut px, s, b.shape, b.color, self.b_at, b.half_side());
        }
        add_noise(&px, rng)
    }

    /// A caption, or a question with its answer, about this video.
    pub fn text(&self, rng: &mut Rng, i: usize) -> (String, Option<Qa>) {
        // "a red circle", "an orange star".
        let name = |g: &Group| {
            let article = if COLORS[g.color].starts_with('o') {
                "an"
            } else {
                "a"
            };
            format!("{article} {} {}", COLORS[g.color], SHAPES[g.shape])
        };
        let (a, b) = (name(&self.a), name(&self.b));
        let (kind, question, answer) = match (self.event, rng.below(4)) {
            (Event::Moves { direction }, 0) => {
                let d = DIRECTIONS[direction].0;
                return (format!("this video shows {a} moving {d}."), None);
            }
            (Event::Turns { clockwise, .. }, 0) => {
                let way = if clockwise {
                    "clockwise"
                } else {
                    "counterclockwise"
                };
                return (format!("this video shows {a} turning {way}."), None);
            }
            (Event::Appears { .. }, 0) => {
                return (format!("{b} appears next to {a}."), None);
            }
            (Event::Disappears { .. }, 0) => {
                return (format!("{b} disappears and {a} stays."), None);
            }
            // The control: one shape, whatever the frame, so one frame answers as well as all.
            (Event::Moves { .. } | Event::Turns { .. }, 1) => (
                "color",
                format!("q: what color is the {}?", SHAPES[self.a.shape]),
                COLORS[self.a.color].to_string(),
            ),
            (Event::Moves { direction }, _) => (
                "direction",
                format!(
                    "q: which way does the {} {} move?",
                    COLORS[self.a.color], SHAPES[self.a.shape]
                ),
                DIRECTIONS[direction].0.to_string(),
            ),
            (Event::Turns { clockwise, .. }, _) => (
                "turns",
                format!(
                    "q: which way does the {} {} turn?",
                    COLORS[self.a.color], SHAPES[self.a.shape]
                ),
                if clockwise {
                    "clockwise"
                } else {
                    "counterclockwise"
                }
                .to_string(),
            ),
            (Event::Appears { .. }, _) => (
                "appears",
                "q: which color appears?".to_string(),
                COLORS[self.b.color].to_string(),
            ),
            (Event::Disappears { .. }, _) => (
                "disappears",
                "q: which color disappears?".to_string(),
                COLORS[self.b.color].to_string(),
            ),
        };
        let answer = format!("{answer}.");
        let text = format!("{question} a: {answer}");
        let qa = Qa {
            image: i,
            kind,
            question,
            answer,
        };
        (text, Some(qa))
    }
}

/// One video page of `n` videos of `frames` (min, max) frames: its JSON document and videos.
pub fn page(rng: &mut Rng, n: usize, frames: (usize, usize)) -> (serde_json::Value, Vec<Video>) {
    let mut texts = vec![INTROS[rng.below(INTROS.len())].to_string()];
    let (mut info, mut qa, mut videos) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let f = frames.0 + rng.below(frames.1 - frames.0 + 1);
        let v = Video::random(rng, f);
        let (text, q) = v.text(rng, i);
        texts.push(text);
        qa.extend(q);
        info.push(json!({ "image_name": format!("vid{i}"), "matched_text_index": i + 1, "matched_sim": 0.3 }));
        videos.push(v);
    }
    let doc = json!({ "text_list": texts, "image_info": info, "qa": qa });
    (doc, videos)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the shape is drawn: the mean position of its color's pixels.
    fn centroid(img: &[u8], s: usize, want: [u8; 3]) -> Option<(f64, f64)> {
        let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
        for (k, p) in img.chunks_exact(3).enumerate() {
            let close = p
                .iter()
                .zip(want)
                .all(|(&a, b)| (a as i32 - b as i32).abs() < 25);
            if close {
                sx += (k % s) as f64;
                sy += (k / s) as f64;
                n += 1.0;
            }
        }
        (n > 20.0).then(|| (sx / n / s as f64, sy / n / s as f64))
    }

    #[test]
    fn a_moving_shape_moves_the_way_the_answer_says() {
        let red = Group {
            count: 1,
            size: 1,
            color: 0,
            shape: 0,
        };
        for (d, (name, (dx, dy))) in DIRECTIONS.iter().enumerate() {
            let mut rng = Rng::new(d as u64);
            let mut v = Video::random(&mut rng, 6);
            v.a = red;
            v.event = Event::Moves { direction: d };
            let first = centroid(&v.render(0, 64, &mut rng), 64, [220, 40, 40]).unwrap();
            let last = centroid(&v.render(5, 64, &mut rng), 64, [220, 40, 40]).unwrap();
            let moved = (last.0 - first.0, last.1 - first.1);
            assert!(
                moved.0 * dx + moved.1 * dy > 0.15,
                "{name}: {first:?} -> {last:?}"
            );
        }
    }

    #[test]
    fn a_turning_shape_turns_the_way_the_answer_says() {
        let red = Group {
            count: 1,
            size: 1,
            color: 0,
            shape: 0,
        };
        for (k, clockwise) in [true, false, true, false].into_iter().enumerate() {
            let mut rng = Rng::new(k as u64);
            let mut v = Video::random(&mut rng, 5);
            v.a = red;
            let from = 1.7 * k as f64;
            v.event = Event::Turns { clockwise, from };
            let at = |t: usize, rng: &mut Rng| {
                let (x, y) = centroid(&v.render(t, 64, rng), 64, [220, 40, 40]).unwrap();
                (x - 0.5, y - 0.5)
            };
            let (p0, p1) = (at(0, &mut rng), at(4, &mut rng));
            // With y down, a clockwise turn has a positive cross product.
            let cross = p0.0 * p1.1 - p0.1 * p1.0;
            assert_eq!(cross > 0.02, clockwise, "{from}: {p0:?} -> {p1:?}");
            assert_eq!(cross < -0.02, !clockwise, "{from}: {p0:?} -> {p1:?}");
        }
    }

    #[test]
    fn appearing_and_disappearing_shapes_are_there_when_they_should_be() {
        let mut rng = Rng::new(3);
        let mut v = Video::random(&mut rng, 5);
        v.b = Group {
            count: 1,
            size: 1,
            color: 2,
            shape: 1,
        };
        v.a.color = 0;
        let blue = |v: &Video, t: usize, rng: &mut Rng| {
            centroid(&v.render(t, 64, rng), 64, [40, 80, 220]).is_some()
        };
        v.event = Event::Appears { at: 3 };
        let seen: Vec<bool> = (0..5).map(|t| blue(&v, t, &mut rng)).collect();
        assert_eq!(seen, [false, false, false, true, true]);
        v.event = Event::Disappears { at: 2 };
        let seen: Vec<bool> = (0..5).map(|t| blue(&v, t, &mut rng)).collect();
        assert_eq!(seen, [true, true, false, false, false]);
    }

    #[test]
    fn pages_ask_every_kind_and_name_their_videos() {
        let mut rng = Rng::new(1);
        let mut kinds = std::collections::BTreeSet::new();
        for _ in 0..100 {
            let (doc, videos) = page(&mut rng, 2, (4, 8));
            assert!(videos.iter().all(|v| (4..=8).contains(&v.frames)));
            assert_eq!(doc["image_info"][1]["image_name"], "vid1");
            for q in doc["qa"].as_array().unwrap() {
                kinds.insert(q["kind"].as_str().unwrap().to_string());
            }
        }
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            ["appears", "color", "direction", "disappears", "turns"]
        );
    }
}
