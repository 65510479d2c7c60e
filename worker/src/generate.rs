//! `trellis-worker generate`: let people read what a checkpoint's model writes.
//!
//! The prompt is tokenized with the checkpoint's `tokenizer.json` (the job's tokenizer, copied
//! into every checkpoint), with the ids its post-processor puts before a document (a BOS such as
//! Llama 3's `<|begin_of_text|>`; none for a trained byte-level BPE). Tokens are then drawn one at
//! a time from the model's next-token distribution: temperature 0 is greedy (the first maximum,
//! as `torch.argmax`), otherwise softmax(logits / T), optionally restricted to the `top_k` most
//! likely tokens, sampled with a seeded generator so the same seed gives the same text.
//! Generation stops at the tokenizer's end-of-text id, after `max_tokens`, or when the sequence
//! fills the model's context (`max_position_embeddings`).
//!
//! The prompt runs through the model once, filling a KV cache (every layer's keys and values,
//! after RoPE); each new token then runs alone against the cache ([`Llama::forward_cached`]).
//! `--no-kv-cache` reruns the whole sequence for every token instead (the reference the cache is
//! tested against; docs/benchmarks.md has tokens/s of both). Any checkpoint layout works: the
//! full tensors are read on one rank, as `eval` does.
use crate::model::{KvCache, Llama};
use crate::trainer::load_model;
use crate::{Error, Result};
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use trellis_core::checkpoint::Checkpoint;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// New tokens at most (the end-of-text token counts as one).
    pub max_tokens: usize,
    /// 0 = greedy; otherwise the softmax temperature.
    pub temperature: f64,
    /// Sample only among the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Seed of the sampling generator (unused when greedy).
    pub seed: u64,
    /// Keep every layer's keys and values and run only the new token per step (`false`: rerun
    /// the whole sequence per token, `--no-kv-cache`).
    pub kv_cache: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_tokens: 64,
            temperature: 0.0,
            top_k: None,
            seed: 0,
            kv_cache: true,
        }
    }
}

impl Options {
    /// Refuse values that cannot work, with what to use instead.
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(Error::Invalid(
                "--max-tokens 0: ask for at least 1 token".into(),
            ));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Invalid(format!(
                "--temperature {}: use 0 for greedy decoding or a positive number (e.g. 0.8)",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::Invalid(
                "--top-k 0: use a positive number of candidate tokens, or leave it out for all"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// The model wrote the end-of-text token.
    Eos,
    /// `max_tokens` new tokens were written.
    MaxTokens,
    /// The sequence reached the model's `max_position_embeddings`.
    Context,
}

/// The outcome of [`generate`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Generation {
    pub checkpoint: String,
    pub step: u64,
    pub num_hidden_layers: usize,
    /// The prompt's ids as the model saw them (BOS included where the tokenizer adds one).
    pub prompt_ids: Vec<u32>,
    /// The new ids (the end-of-text id last when `stop` is `eos`).
    pub ids: Vec<u32>,
    /// The new text (without the end-of-text token).
    pub text: String,
    pub stop: Stop,
    pub seconds: f64,
    /// New tokens per second of wall time (model load excluded).
    pub tokens_per_second: f64,
}

/// Generate from checkpoint `dir` after `prompt`; `on_text` receives the new text as it becomes
/// printable (whole UTF-8 characters; a byte-level token may end inside one).
pub fn generate(
    dir: &Path,
    prompt: &str,
    opts: &Options,
    device: Device,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    opts.validate()?;
    if prompt.is_empty() {
        return Err(Error::Invalid(
            "--prompt is empty: give the text the model should continue".into(),
        ));
    }
    let dir = &resolve(dir)?;
    let ck = Checkpoint::open(dir)?;
    let cfg = ck.state.model.clone();
    let tok = crate::eval::checkpoint_tokenizer(dir, cfg.vocab_size)?;
    let (bos, _) = tok.document_affixes();
    let mut ids: Vec<u32> = bos.to_vec();
    ids.extend(tok.encode(prompt)?);
    let ctx = cfg.max_position_embeddings;
    if ids.len() >= ctx {
        return Err(Error::Invalid(format!(
            "the prompt is {} tokens but the model's context is {ctx} (max_position_embeddings); shorten the prompt",
            ids.len()
        )));
    }
    let prompt_ids = ids.clone();
    let (mut model, _) = load_model(&ck, device)?;
    apply_mask(&mut model, &ck);
    let mut decoder = Decoder::new(
        &model,
        device,
        opts.kv_cache
            .then(|| (ids.len() + opts.max_tokens).min(ctx)),
    );
    let eos = tok.eos_id();
    let mut rng = SplitMix64(opts.seed);
    let mut new: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let t0 = Instant::now();
    let stop = loop {
        if new.len() >= opts.max_tokens {
            break Stop::MaxTokens;
        }
        if ids.len() >= ctx {
            break Stop::Context;
        }
        let logits = decoder.next_logits(&ids);
        let id = pick(&logits, opts, &mut rng);
        ids.push(id);
        new.push(id);
        if id == eos {
            break Stop::Eos;
        }
        let text = tok.decode(&new)?;
        // A token ending inside a multi-byte character decodes to U+FFFD: wait for the rest.
        if !text.ends_with('\u{FFFD}') && text.starts_with(printed.as_str()) {
            on_text(&text[printed.len()..]);
            printed = text;
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let body = match stop {
        Stop::Eos => &new[..new.len() - 1],
        _ => &new[..],
    };
    let text = tok.decode(body)?;
    if text.len() > printed.len() && text.starts_with(printed.as_str()) {
        on_text(&text[printed.len()..]);
    }
    Ok(Generation {
        checkpoint: dir.display().to_string(),
        step: ck.state.step,
        num_hidden_layers: cfg.num_hidden_layers,
        prompt_ids,
        tokens_per_second: new.len() as f64 / seconds.max(1e-9),
        ids: new,
        text,
        stop,
        seconds,
    })
}

/// A checkpoint directory, or a job's checkpoint root (its `latest` one).
fn resolve(dir: &Path) -> Result<std::path::PathBuf> {
    if !dir.is_dir() {
        return Err(Error::Invalid(format!(
            "--checkpoint {}: no such directory; give a checkpoint (…/step-N) or a job's checkpoint directory",
            dir.display()
        )));
    }
    if !dir.join(trellis_core::checkpoint::MANIFEST).exists() {
        if let Some(latest) = trellis_core::checkpoint::latest(dir)? {
            return Ok(latest);
        }
    }
    Ok(dir.to_path_buf())
}

/// Next-token logits of a growing sequence: with a KV cache, each call runs only the ids not
/// seen yet; without, the whole sequence every time.
pub struct Decoder<'a> {
    model: &'a Llama,
    device: Device,
    cache: Option<KvCache>,
}

impl<'a> Decoder<'a> {
    /// `cache_capacity`: the most positions the sequence will reach (`None`: no KV cache).
    pub fn new(model: &'a Llama, device: Device, cache_capacity: Option<usize>) -> Decoder<'a> {
        Decoder {
            model,
            device,
            cache: cache_capacity.map(|c| KvCache::new(model, c)),
        }
    }

    /// fp32 logits of the token after `ids`; `ids` must extend the sequence of the previous
    /// call (with a cache, its new ids are the ones after the cached positions).
    pub fn next_logits(&mut self, ids: &[u32]) -> Vec<f32> {
        tch::no_grad(|| {
            let seen = self.cache.as_ref().map_or(0, KvCache::len);
            assert!(seen < ids.len(), "next_logits: no new ids after {seen}");
            let x: Vec<i64> = ids[seen..].iter().map(|&i| i64::from(i)).collect();
            let n = x.len() as i64;
            let input = Tensor::from_slice(&x).view([1, n]).to_device(self.device);
            let logits = match &mut self.cache {
                Some(c) => self.model.forward_cached(&input, c),
                None => self.model.forward(&input),
            };
            let last = logits.select(1, n - 1).squeeze_dim(0);
            Vec::<f32>::try_from(&last.to_kind(Kind::Float).to_device(Device::Cpu))
                .expect("fp32 logits")
        })
    }
}

/// A checkpoint written during a `random` operator's mask ramp: the mask values its trainer
/// evaluates with at that step.
pub fn apply_mask(model: &mut Llama, ck: &Checkpoint) {
    if let Some(ms) = &ck.state.mask {
        let k = ck.state.step.saturating_sub(ms.start_step);
        let v = (k as f64 / ms.ramp_steps.max(1) as f64).min(1.0);
        for &l in &ms.layers {
            if l < model.masks.len() {
                model.masks[l] = if v >= 1.0 { None } else { Some(v) };
            }
        }
    }
}

/// The next id from `logits`: greedy at temperature 0, else a seeded draw.
pub fn pick(logits: &[f32], opts: &Options, rng: &mut SplitMix64) -> u32 {
    if opts.temperature == 0.0 {
        // The first maximum, as torch.argmax (and transformers' greedy search) takes it.
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut cand: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, f64::from(v) / opts.temperature))
        .collect();
    if let Some(k) = opts.top_k {
        if k < cand.len() {
            // Stable: equal logits keep id order.
            cand.sort_by(|a, b| b.1.total_cmp(&a.1));
            cand.truncate(k);
        }
    }
    let max = cand.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = cand.iter().map(|c| (c.1 - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.next_f64() * total;
    for (c, w) in cand.iter().zip(&weights) {
        if u < *w {
            return c.0 as u32;
        }
        u -= w;
    }
    cand.last().map_or(0, |c| c.0 as u32)
}

/// SplitMix64 (Steele et al.): a small seeded generator, the same on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) (53 random bits).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut r = SplitMix64(1);
        let o = Options::default();
        assert_eq!(pick(&[0.0, 2.0, 2.0, 1.0], &o, &mut r), 1);
    }

    #[test]
    fn top_1_sampling_is_greedy_and_top_k_stays_in_the_top_k() {
        let logits = [0.5f32, 3.0, 2.9, -1.0, 2.8];
        let mut r = SplitMix64(9);
        let one = Options {
            temperature: 1.0,
            top_k: Some(1),
            ..Options::default()
        };
        let two = Options {
            top_k: Some(2),
            ..one.clone()
        };
        let mut seen = [0u32; 5];
        for _ in 0..200 {
            assert_eq!(pick(&logits, &one, &mut r), 1);
            seen[pick(&logits, &two, &mut r) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[3] + seen[4], 0, "{seen:?}");
        assert!(seen[1] > 0 && seen[2] > 0, "{seen:?}");
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75]; 20k draws: σ ≈ 0.003, bound 5σ.
        let logits = [0.0f32, 3f32.ln()];
        let o = Options {
            temperature: 1.0,
            ..Options::default()
        };
        let mut r = SplitMix64(3);
        let n = 20_000;
        let ones = (0..n).filter(|_| pick(&logits, &o, &mut r) == 1).count();
        let p = ones as f64 / n as f64;
        assert!((p - 0.75).abs() < 0.016, "{p}");
    }

    #[test]
    fn bad_options_are_refused() {
        for (o, needle) in [
            (
                Options {
                    temperature: -0.5,
                    ..Options::default()
                },
                "--temperature",
            ),
            (
                Options {
                    temperature: f64::NAN,
                    ..Options::default()
                },
                "--temperature",
            ),
            (
                Options {
                    max_tokens: 0,
                    ..Options::default()
                },
                "--max-tokens",
            ),
            (
                Options {
                    top_k: Some(0),
                    ..Options::default()
                },
                "--top-k",
            ),
        ] {
            let e = o.validate().unwrap_err();
            assert!(e.is_bad_input() && e.to_string().contains(needle), "{e}");
        }
    }
}
