//! Scenes of the synthetic world: groups of shapes with a count, size and color, optionally two
//! groups in a spatial relation; rendered with anti-aliasing on a noisy gradient background and
//! described by captions from varied templates.

use serde::Serialize;

use crate::rng::Rng;

pub const SHAPES: [&str; 6] = ["circle", "square", "triangle", "star", "diamond", "cross"];
pub const COLORS: [&str; 8] = [
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black",
];
const RGB: [[f32; 3]; 8] = [
    [220., 40., 40.],
    [40., 180., 60.],
    [40., 80., 220.],
    [235., 210., 40.],
    [140., 50., 190.],
    [245., 140., 30.],
    [245., 245., 245.],
    [20., 20., 20.],
];
pub const SIZES: [&str; 2] = ["small", "large"];
pub const COUNT_WORDS: [&str; 5] = ["zero", "one", "two", "three", "four"];
pub const RELATIONS: [&str; 4] = ["above", "below", "to the left of", "to the right of"];
pub const MAX_COUNT: u8 = 4;

/// A group of identical shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Group {
    pub count: u8,
    pub size: usize,
    pub color: usize,
    pub shape: usize,
}

impl Group {
    pub fn random(rng: &mut Rng) -> Self {
        Group {
            count: 1 + rng.below(MAX_COUNT as usize) as u8,
            size: rng.below(SIZES.len()),
            color: rng.below(COLORS.len()),
            shape: rng.below(SHAPES.len()),
        }
    }

    /// Half the side of a shape of this group's size, in units of the image side.
    pub fn half_side(&self) -> f64 {
        if self.size == 0 {
            0.075
        } else {
            0.125
        }
    }

    pub fn shape_word(&self) -> String {
        plural(SHAPES[self.shape], self.count)
    }

    /// "two small red circles", "a large blue star".
    pub fn phrase(&self, rng: &mut Rng) -> String {
        let n = if self.count == 1 && rng.bool(0.5) {
            "a"
        } else {
            COUNT_WORDS[self.count as usize]
        };
        group_words(
            n,
            SIZES[self.size],
            COLORS[self.color],
            SHAPES[self.shape],
            self.count,
        )
    }
}

/// A group in a caption's words: `n` (the count word, "a" or "one" for one) then size, color
/// and the shape in the count's number: "two small red circles".
pub fn group_words(n: &str, size: &str, color: &str, shape: &str, count: u8) -> String {
    format!("{n} {size} {color} {}", plural(shape, count))
}

pub fn plural(word: &str, count: u8) -> String {
    match (count, word) {
        (1, w) => w.to_string(),
        (_, "cross") => "crosses".into(),
        (_, w) => format!("{w}s"),
    }
}

/// The relation that says the same with the groups swapped: "a above b" is "b below a".
pub fn inverse_relation(rel: usize) -> usize {
    [1, 0, 3, 2][rel]
}

/// One or two groups; with two, `relation` says where the first is relative to the second.
#[derive(Clone, Debug, Serialize)]
pub struct Scene {
    pub groups: Vec<Group>,
    pub relation: Option<usize>,
    #[serde(skip)]
    pub background: [f32; 3],
    #[serde(skip)]
    pub gradient: [f32; 3],
}

impl Scene {
    pub fn random(rng: &mut Rng, p_two_groups: f64) -> Self {
        let first = Group::random(rng);
        let (groups, relation) = if rng.bool(p_two_groups) {
            let mut second = Group::random(rng);
            while second.shape == first.shape && second.color == first.color {
                second = Group::random(rng);
            }
            (vec![first, second], Some(rng.below(RELATIONS.len())))
        } else {
            (vec![first], None)
        };
        Scene::with_groups(rng, groups, relation)
    }

    pub fn with_groups(rng: &mut Rng, groups: Vec<Group>, relation: Option<usize>) -> Self {
        let base = rng.uniform(85.0, 170.0) as f32;
        let tint = |r: &mut Rng| base + r.uniform(-18.0, 18.0) as f32;
        let background = [tint(rng), tint(rng), tint(rng)];
        let gradient = [
            rng.uniform(-30.0, 30.0) as f32,
            rng.uniform(-30.0, 30.0) as f32,
            rng.uniform(-12.0, 12.0) as f32,
        ];
        Scene {
            groups,
            relation,
            background,
            gradient,
        }
    }

    /// What a caption can say about the scene, the same for "a above b" and "b below a":
    /// two scenes with equal keys differ only in rendering (positions, background, noise).
    pub fn content_key(&self) -> (Vec<Group>, Option<usize>) {
        let Some(rel) = self.relation else {
            return (self.groups.clone(), None);
        };
        let inverse = inverse_relation(rel);
        let (a, b) = (self.groups[0], self.groups[1]);
        (vec![a, b], Some(rel)).min((vec![b, a], Some(inverse)))
    }

    /// The same scene with exactly one thing changed, for a hard-negative caption: one group's
    /// shape, color, count or size, or (with two groups) the relation turned around.
    pub fn hard_negative(&self, rng: &mut Rng) -> Scene {
        let mut neg = self.clone();
        let edits = if self.relation.is_some() { 5 } else { 4 };
        let edit = rng.below(edits);
        let g = &mut neg.groups[rng.below(self.groups.len())];
        // A different value: the old one plus 1..n-1, wrapped.
        let other = |rng: &mut Rng, v: usize, n: usize| (v + 1 + rng.below(n - 1)) % n;
        match edit {
            0 => g.shape = other(rng, g.shape, SHAPES.len()),
            1 => g.color = other(rng, g.color, COLORS.len()),
            2 => g.count = 1 + other(rng, g.count as usize - 1, MAX_COUNT as usize) as u8,
            3 => g.size = other(rng, g.size, SIZES.len()),
            _ => neg.relation = self.relation.map(inverse_relation),
        }
        neg
    }

    /// A caption from one of several templates.
    pub fn caption(&self, rng: &mut Rng) -> String {
        let a = self.groups[0].phrase(rng);
        let Some(rel) = self.relation else {
            let verb = if self.groups[0].count == 1 {
                "is"
            } else {
                "are"
            };
            return match rng.below(4) {
                0 => a,
                1 => format!("a photo of {a}"),
                2 => format!("an image with {a}"),
                _ => format!("there {verb} {a}"),
            };
        };
        let b = self.groups[1].phrase(rng);
        let inverse = inverse_relation(rel);
        match rng.below(4) {
            0 => format!("{a} {} {b}", RELATIONS[rel]),
            1 => format!("a photo of {a} {} {b}", RELATIONS[rel]),
            2 => format!("{b} {} {a}", RELATIONS[inverse]),
            _ => format!("an image with {b} {} {a}", RELATIONS[inverse]),
        }
    }

    /// Renders the scene into packed RGB8 of `size`x`size`.
    pub fn render(&self, size: u32, rng: &mut Rng) -> Vec<u8> {
        let s = size as usize;
        let mut px = self.paint_background(s);
        let regions = self.regions();
        for (g, region) in self.groups.iter().zip(regions) {
            let (half, t) = (g.half_side(), 0.3 * rng.uniform(-1.0, 1.0));
            let mut placed: Vec<(f64, f64)> = Vec::new();
            for _ in 0..g.count {
                let pos = place(rng, region, half, &placed);
                placed.push(pos);
                draw_shape(&mut px, s, g.shape, RGB[g.color], pos, half, t);
            }
        }
        add_noise(&px, rng)
    }

    /// The background alone (a tinted gradient), as f32 RGB of `s`x`s`.
    pub(crate) fn paint_background(&self, s: usize) -> Vec<f32> {
        let mut px = vec![0f32; s * s * 3];
        for y in 0..s {
            for x in 0..s {
                let (fx, fy) = (x as f32 / s as f32, y as f32 / s as f32);
                for c in 0..3 {
                    px[(y * s + x) * 3 + c] = self.background[c]
                        + self.gradient[c] * (fx - 0.5)
                        + self.gradient[(c + 1) % 3] * (fy - 0.5);
                }
            }
        }
        px
    }

    /// Unit-square regions (x0, y0, x1, y1) for each group, from the relation.
    fn regions(&self) -> Vec<[f64; 4]> {
        let full = [0.02, 0.02, 0.98, 0.98];
        match self.relation {
            None => vec![full],
            Some(0) => vec![[0.02, 0.02, 0.98, 0.48], [0.02, 0.52, 0.98, 0.98]],
            Some(1) => vec![[0.02, 0.52, 0.98, 0.98], [0.02, 0.02, 0.98, 0.48]],
            Some(2) => vec![[0.02, 0.02, 0.48, 0.98], [0.52, 0.02, 0.98, 0.98]],
            Some(_) => vec![[0.52, 0.02, 0.98, 0.98], [0.02, 0.02, 0.48, 0.98]],
        }
    }
}

/// Per-pixel noise on `px`, as packed RGB8.
pub(crate) fn add_noise(px: &[f32], rng: &mut Rng) -> Vec<u8> {
    px.iter()
        .map(|v| (v + rng.uniform(-10.0, 10.0) as f32).clamp(0.0, 255.0) as u8)
        .collect()
}

/// Draws one shape of color `color` (an index of [`COLORS`]) centred at `c`.
pub(crate) fn draw(px: &mut [f32], s: usize, shape: usize, color: usize, c: (f64, f64), half: f64) {
    draw_shape(px, s, shape, RGB[color], c, half, 0.0);
}

/// A center inside `region` whose shape does not overlap those already placed, if one is found.
fn place(rng: &mut Rng, r: [f64; 4], half: f64, placed: &[(f64, f64)]) -> (f64, f64) {
    let mut best = (0.5 * (r[0] + r[2]), 0.5 * (r[1] + r[3]));
    for _ in 0..60 {
        let c = (
            rng.uniform(r[0] + half, (r[2] - half).max(r[0] + half)),
            rng.uniform(r[1] + half, (r[3] - half).max(r[1] + half)),
        );
        best = c;
        if placed
            .iter()
            .all(|p| (p.0 - c.0).abs() > 2.0 * half || (p.1 - c.1).abs() > 2.0 * half)
        {
            break;
        }
    }
    best
}

/// Inside test in the shape's own coordinates, u and v in [-1, 1] (v points down).
fn inside(shape: usize, u: f32, v: f32) -> bool {
    match shape {
        0 => u * u + v * v <= 1.0,
        1 => u.abs() <= 0.85 && v.abs() <= 0.85,
        2 => (-0.9..=0.8).contains(&v) && u.abs() <= 0.95 * (v + 0.9) / 1.7,
        3 => {
            let (r, th) = (
                (u * u + v * v).sqrt(),
                v.atan2(u) + std::f32::consts::FRAC_PI_2,
            );
            let k = 0.5 * (1.0 + (5.0 * th).cos());
            r <= 0.42 + 0.58 * k * k
        }
        4 => u.abs() + v.abs() <= 1.0,
        _ => (u.abs() <= 0.3 && v.abs() <= 0.95) || (v.abs() <= 0.3 && u.abs() <= 0.95),
    }
}

/// Draws with 4x4 supersampling for anti-aliased edges; `tilt` is a small rotation in radians.
fn draw_shape(
    px: &mut [f32],
    s: usize,
    shape: usize,
    rgb: [f32; 3],
    c: (f64, f64),
    half: f64,
    tilt: f64,
) {
    let (cx, cy, h) = (
        (c.0 * s as f64) as f32,
        (c.1 * s as f64) as f32,
        (half * s as f64) as f32,
    );
    let (sin, cos) = (tilt as f32).sin_cos();
    let (x0, x1) = (
        ((cx - h - 1.0).floor().max(0.0)) as usize,
        ((cx + h + 1.0).ceil() as usize).min(s),
    );
    let (y0, y1) = (
        ((cy - h - 1.0).floor().max(0.0)) as usize,
        ((cy + h + 1.0).ceil() as usize).min(s),
    );
    for y in y0..y1 {
        for x in x0..x1 {
            let mut hits = 0;
            for sy in 0..4 {
                for sx in 0..4 {
                    let dx = (x as f32 + (sx as f32 + 0.5) / 4.0 - cx) / h;
                    let dy = (y as f32 + (sy as f32 + 0.5) / 4.0 - cy) / h;
                    hits += inside(shape, cos * dx + sin * dy, -sin * dx + cos * dy) as u32;
                }
            }
            let a = hits as f32 / 16.0;
            for (k, &col) in rgb.iter().enumerate() {
                let p = &mut px[(y * s + x) * 3 + k];
                *p = *p * (1.0 - a) + col * a;
            }
        }
    }
}

/// Every word the captions and pages (and, with `video`, the video pages) can use, so a
/// fitted tokenizer never meets `<unk>`.
pub fn vocabulary_text(video: bool) -> String {
    let mut words: Vec<String> = Vec::new();
    for s in SHAPES {
        words.push(s.into());
        words.push(plural(s, 2));
    }
    words.extend(
        COLORS
            .iter()
            .chain(&SIZES)
            .chain(&COUNT_WORDS)
            .chain(&RELATIONS)
            .map(|w| w.to_string()),
    );
    words.extend(
        crate::synth::pages::PAGE_WORDS
            .iter()
            .map(|w| w.to_string()),
    );
    if video {
        let extra = crate::synth::video::VIDEO_WORDS.iter();
        words.extend(extra.map(|w| w.to_string()));
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_name_every_attribute() {
        let mut rng = Rng::new(5);
        for _ in 0..200 {
            let sc = Scene::random(&mut rng, 0.7);
            let cap = sc.caption(&mut rng);
            for g in &sc.groups {
                assert!(
                    cap.contains(COLORS[g.color])
                        && cap.contains(SIZES[g.size])
                        && cap.contains(SHAPES[g.shape]),
                    "{cap}"
                );
            }
        }
    }

    #[test]
    fn hard_negative_changes_exactly_one_thing() {
        let mut rng = Rng::new(11);
        for _ in 0..500 {
            let sc = Scene::random(&mut rng, 0.7);
            let neg = sc.hard_negative(&mut rng);
            assert_ne!(sc.content_key(), neg.content_key(), "{sc:?}");
            let group_edits: usize = sc
                .groups
                .iter()
                .zip(&neg.groups)
                .map(|(a, b)| {
                    (a.shape != b.shape) as usize
                        + (a.color != b.color) as usize
                        + (a.count != b.count) as usize
                        + (a.size != b.size) as usize
                })
                .sum();
            let relation_edits = (sc.relation != neg.relation) as usize;
            assert_eq!(group_edits + relation_edits, 1, "{sc:?} -> {neg:?}");
            assert!(neg
                .groups
                .iter()
                .all(|g| (1..=MAX_COUNT).contains(&g.count)));
        }
    }

    #[test]
    fn render_draws_the_object_color() {
        let mut rng = Rng::new(9);
        let g = Group {
            count: 1,
            size: 1,
            color: 2,
            shape: 1,
        };
        let sc = Scene::with_groups(&mut rng, vec![g], None);
        let img = sc.render(64, &mut rng);
        let blue = img
            .chunks_exact(3)
            .filter(|p| p[2] > 180 && p[0] < 90 && p[1] < 130)
            .count();
        // a large square covers about (0.25 * 0.85 * 64)^2 = 185 pixels
        assert!((120..260).contains(&blue), "{blue} blue pixels");
    }
}
