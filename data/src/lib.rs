//! Data for Trellis: a byte-level BPE tokenizer (trained or loaded), corpora (text, jsonl,
//! parquet, or pre-tokenized ids; files, directories or globs; weighted mixtures) tokenized once
//! into memory-mapped token files, and the deterministic global-cursor sampler.
//!
//! The sampler maps a *global sample index* (the cursor in the job state) to a training window,
//! so any DP degree reads exactly the single-rank stream: at step s with global batch B the
//! samples are `cursor .. cursor + B`, and DP rank r of `dp` takes the contiguous block
//! `cursor + r·B/dp .. cursor + (r+1)·B/dp`.
use std::ops::Range;
use std::path::PathBuf;

mod dataset;
mod prepare;
mod sampler;
mod source;
#[cfg(test)]
mod tests;
mod text;
mod tokenizer;
mod tokens;
mod util;

pub use dataset::{Dataset, Source};
pub use prepare::{prepare, PreparedData, MAX_TRAIN_BYTES};
pub use sampler::{validation_windows, Permutation, Sampler, MIX_BLOCK};
pub use source::{Dtype, Format, InputFile, FINGERPRINT_BYTES};
pub use text::{open_text, EOS_TOKEN};
pub use tokenizer::Tokenizer;
pub use tokens::{index_path, tokenize_file, TokenFile, TokenIndex, TOKEN_FORMAT};
pub use util::{read_counters, sha256_file, work_counters};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A required input is missing (`what` is e.g. `data.train`).
    #[error("{what} file not found: {}", path.display())]
    NotFound { what: String, path: PathBuf },
    /// A corpus tokenized to nothing.
    #[error("{what} corpus {} is empty (0 tokens)", path.display())]
    EmptyCorpus { what: String, path: PathBuf },
    /// A corpus shorter than one training window.
    #[error(
        "{what} corpus {} is too short: {tokens} tokens, but seq_len {seq_len} needs at least \
         {} tokens for one window", path.display(), seq_len + 1
    )]
    CorpusTooShort {
        what: String,
        path: PathBuf,
        tokens: usize,
        seq_len: usize,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The global sample indices DP rank `dp_rank` of `dp` reads at the step whose cursor is
/// `cursor`, for a global batch of `global_batch` sequences.
pub fn rank_samples(cursor: u64, global_batch: usize, dp_rank: usize, dp: usize) -> Range<u64> {
    let per = (global_batch / dp) as u64;
    let start = cursor + dp_rank as u64 * per;
    start..start + per
}
