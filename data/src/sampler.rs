//! The deterministic order of windows. Everything here is frozen: changing any constant
//! changes which data every existing job reads after a resume.

use crate::TokenFile;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const ROUNDS: usize = 6;

/// splitmix64's finalizer: a bijective 64-bit mixer.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded bijection on `0..n`: a balanced Feistel network on the smallest even number of
/// bits (≥ 2) covering `n`, with cycle walking back into range. O(1) memory; fewer than four
/// network evaluations per call on average.
#[derive(Debug, Clone)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    mask: u64,
    keys: [u64; ROUNDS],
}

impl Permutation {
    pub fn new(n: u64, seed: u64, epoch: u64) -> Permutation {
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        let bits = bits + (bits & 1);
        let half_bits = bits / 2;
        let mask = (1u64 << half_bits) - 1;
        let base = mix64(mix64(seed) ^ epoch.wrapping_mul(GOLDEN));
        let mut keys = [0u64; ROUNDS];
        for (i, k) in keys.iter_mut().enumerate() {
            *k = mix64(base.wrapping_add((i as u64 + 1).wrapping_mul(GOLDEN)));
        }
        Permutation {
            n,
            half_bits,
            mask,
            keys,
        }
    }

    #[inline]
    fn feistel(&self, x: u64) -> u64 {
        let (mut l, mut r) = (x >> self.half_bits, x & self.mask);
        for &k in &self.keys {
            let f = mix64(r ^ k) & self.mask;
            (l, r) = (r, l ^ f);
        }
        (l << self.half_bits) | r
    }

    /// The image of `p` (`p < n`; 0 when `n == 0`).
    pub fn apply(&self, p: u64) -> u64 {
        if self.n <= 1 {
            return 0;
        }
        let mut x = p % self.n;
        loop {
            x = self.feistel(x);
            if x < self.n {
                return x;
            }
        }
    }
}

/// The deterministic order of windows: sample index → window id. Each epoch is a fresh seeded
/// permutation (implemented here, not by a crate, so it never changes with a dependency).
#[derive(Debug, Clone)]
pub struct Sampler {
    pub num_windows: u64,
    pub seed: u64,
}

impl Sampler {
    pub fn new(num_windows: u64, seed: u64) -> Sampler {
        Sampler { num_windows, seed }
    }

    /// The epoch global sample `index` falls in.
    pub fn epoch(&self, index: u64) -> u64 {
        index.checked_div(self.num_windows).unwrap_or(0)
    }

    /// The window id of global sample `index`: epoch `e = index / num_windows`, position
    /// `p = index % num_windows`, window `perm_e(p)` (0 if there are no windows).
    pub fn window(&self, index: u64) -> u64 {
        if self.num_windows == 0 {
            return 0;
        }
        let epoch = index / self.num_windows;
        Permutation::new(self.num_windows, self.seed, epoch).apply(index % self.num_windows)
    }
}

/// Fixed, evenly spaced window ids of `valid` (at most `max_sequences`, all of them if there
/// are fewer) for validation loss: `⌊i·n/k⌋` for `i < k`. Deterministic and distinct.
pub fn validation_windows(valid: &TokenFile, seq_len: usize, max_sequences: usize) -> Vec<u64> {
    spaced_windows(valid.num_windows(seq_len), max_sequences)
}

pub(crate) fn spaced_windows(n: u64, max_sequences: usize) -> Vec<u64> {
    let k = n.min(max_sequences as u64);
    (0..k)
        .map(|i| (i as u128 * n as u128 / k as u128) as u64)
        .collect()
}
