//! A small deterministic RNG whose whole state is one `u64`, so loader positions and
//! checkpoints can store it exactly (SplitMix64, Steele et al. 2014).

use serde::{Deserialize, Serialize};

/// SplitMix64: fast, statistically fine for shuffling and augmentation, trivially serializable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    pub state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// An independent stream for a tuple of identifiers (seed, epoch, worker, ...).
    pub fn derive(parts: &[u64]) -> Self {
        let mut h = 0x9E37_79B9_7F4A_7C15u64;
        for &p in parts {
            h = mix(h ^ p.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        }
        Rng::new(h)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// Uniform in [0, n). `n` must be > 0. Lemire's multiply-shift; the bias is < n / 2^64.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    pub fn bool(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    pub fn choose<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, for turning a shard name or sample key into a stable seed component.
pub fn hash_str(s: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A shard's identity for seeding its samples' augmentations: its file name and the
/// directory holding it (`laion/shard-000012.tar`), not where the dataset lies, so that a
/// dataset moved or mounted elsewhere (another node, another checkout) gets the same crops, and
/// a resumed run the same as the unbroken one.
pub fn shard_seed(url: &str) -> u64 {
    let url = url.trim_end_matches('/');
    // From after the second-to-last '/' (the whole name when there is none).
    let cut = url.rmatch_indices('/').nth(1).map_or(0, |(i, _)| i + 1);
    hash_str(&url[cut..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = Rng::new(7);
        let mut counts = [0usize; 10];
        for _ in 0..100_000 {
            counts[r.below(10)] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn derive_separates_streams_and_is_stable() {
        let a = Rng::derive(&[1, 2]).next_u64();
        let b = Rng::derive(&[2, 1]).next_u64();
        assert_ne!(a, b);
        assert_eq!(a, Rng::derive(&[1, 2]).next_u64());
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut xs: Vec<u32> = (0..100).collect();
        Rng::new(3).shuffle(&mut xs);
        assert_ne!(xs, (0..100).collect::<Vec<_>>());
        xs.sort();
        assert_eq!(xs, (0..100).collect::<Vec<_>>());
    }
}
