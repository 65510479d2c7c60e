//! The deterministic order of windows. Everything here is frozen: changing any constant
//! changes which data every existing job reads after a resume.

use std::sync::Arc;

use crate::Dataset;

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
///
/// A mixture ([`Sampler::mixture`]) cuts the global sample stream into blocks of
/// [`MIX_BLOCK`] samples. Every block gives each source the same number of slots (its weight's
/// share of the block, rounded by largest remainder), placed at seeded-shuffled positions; the
/// k-th slot a source gets over the whole stream reads that source's k-th sample of its own
/// permutation (each source runs through its own epochs). Sample index → (source, window) is a
/// pure O(1) function, so resuming or changing the DP degree neither skips nor repeats.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// Windows over all sources.
    pub num_windows: u64,
    pub seed: u64,
    mix: Option<Arc<Mixture>>,
}

/// Samples per mixture block: proportions are exact over every aligned block of this many
/// samples (rounding at most one slot per source per block).
pub const MIX_BLOCK: u64 = 4096;

#[derive(Debug)]
struct Mixture {
    /// Per source: windows, first global window id, slots per block, first slot in a block.
    windows: Vec<u64>,
    offsets: Vec<u64>,
    slots: Vec<u64>,
    slot_start: Vec<u64>,
    samplers: Vec<Sampler>,
}

impl Sampler {
    pub fn new(num_windows: u64, seed: u64) -> Sampler {
        Sampler {
            num_windows,
            seed,
            mix: None,
        }
    }

    /// A weighted mixture of sources given as `(windows, weight)`; window ids are global (the
    /// windows of source 0 first, then source 1's, …), as [`crate::Dataset`] numbers them.
    pub fn mixture(sources: &[(u64, f64)], seed: u64) -> crate::Result<Sampler> {
        let total: f64 = sources.iter().map(|s| s.1).sum();
        if sources.is_empty() || !(total.is_finite() && total > 0.0) {
            return Err(crate::Error::Invalid(
                "a mixture needs at least one source of positive weight".into(),
            ));
        }
        // Largest-remainder apportionment of the block (ties to the lower index).
        let quotas: Vec<f64> = sources
            .iter()
            .map(|s| s.1 / total * MIX_BLOCK as f64)
            .collect();
        let mut slots: Vec<u64> = quotas.iter().map(|q| q.floor() as u64).collect();
        let mut order: Vec<usize> = (0..sources.len()).collect();
        order.sort_by(|&a, &b| {
            let (fa, fb) = (quotas[a] - quotas[a].floor(), quotas[b] - quotas[b].floor());
            fb.total_cmp(&fa).then(a.cmp(&b))
        });
        let short = MIX_BLOCK - slots.iter().sum::<u64>();
        for &i in order.iter().take(short as usize) {
            slots[i] += 1;
        }
        for (i, (&n, s)) in slots.iter().zip(sources).enumerate() {
            if n == 0 {
                return Err(crate::Error::Invalid(format!(
                    "data.sources[{i}]: weight {} is too small: a source needs at least 1/{MIX_BLOCK} of the total weight",
                    s.1
                )));
            }
            if s.0 == 0 {
                return Err(crate::Error::Invalid(format!(
                    "data.sources[{i}] has no window of seq_len tokens"
                )));
            }
        }
        let mut offsets = Vec::new();
        let mut slot_start = Vec::new();
        let (mut off, mut at) = (0u64, 0u64);
        for (i, s) in sources.iter().enumerate() {
            offsets.push(off);
            slot_start.push(at);
            off += s.0;
            at += slots[i];
        }
        let samplers = sources
            .iter()
            .enumerate()
            .map(|(i, s)| Sampler::new(s.0, mix64(seed ^ (i as u64 + 1).wrapping_mul(GOLDEN))))
            .collect();
        Ok(Sampler {
            num_windows: off,
            seed,
            mix: Some(Arc::new(Mixture {
                windows: sources.iter().map(|s| s.0).collect(),
                offsets,
                slots,
                slot_start,
                samplers,
            })),
        })
    }

    /// The epoch global sample `index` falls in (of the whole split; a mixture's sources run
    /// through epochs at their own pace).
    pub fn epoch(&self, index: u64) -> u64 {
        index.checked_div(self.num_windows).unwrap_or(0)
    }

    /// The source of global sample `index` and its sample index within that source (always
    /// source 0 and `index` without a mixture).
    pub fn source_sample(&self, index: u64) -> (usize, u64) {
        let Some(m) = &self.mix else {
            return (0, index);
        };
        let (block, pos) = (index / MIX_BLOCK, index % MIX_BLOCK);
        let q = Permutation::new(MIX_BLOCK, self.seed ^ MIX_SALT, block).apply(pos);
        let s = m.slot_start.partition_point(|&st| st <= q) - 1;
        (s, block * m.slots[s] + (q - m.slot_start[s]))
    }

    /// The window id of global sample `index`: epoch `e = index / num_windows`, position
    /// `p = index % num_windows`, window `perm_e(p)` (0 if there are no windows). In a mixture:
    /// the source's own window for its sample (see [`Sampler::source_sample`]), as a global id.
    pub fn window(&self, index: u64) -> u64 {
        if let Some(m) = &self.mix {
            let (s, k) = self.source_sample(index);
            debug_assert!(m.windows[s] > 0);
            return m.offsets[s] + m.samplers[s].window(k);
        }
        if self.num_windows == 0 {
            return 0;
        }
        let epoch = index / self.num_windows;
        Permutation::new(self.num_windows, self.seed, epoch).apply(index % self.num_windows)
    }
}

/// Salt of a mixture's block shuffles (so they differ from the window permutations).
const MIX_SALT: u64 = 0x6D69_7874_7572_6531;

/// Fixed, evenly spaced window ids of `valid` (at most `max_sequences`, all of them if there
/// are fewer) for validation loss: `⌊i·n/k⌋` for `i < k`. Deterministic and distinct.
pub fn validation_windows(valid: &Dataset, seq_len: usize, max_sequences: usize) -> Vec<u64> {
    spaced_windows(valid.num_windows(seq_len), max_sequences)
}

pub(crate) fn spaced_windows(n: u64, max_sequences: usize) -> Vec<u64> {
    let k = n.min(max_sequences as u64);
    (0..k)
        .map(|i| (i as u128 * n as u128 / k as u128) as u64)
        .collect()
}
