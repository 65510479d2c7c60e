//! Data for Trellis (DESIGN §6): a byte-level BPE tokenizer (trained or loaded), corpora
//! tokenized once into memory-mapped token files, and the deterministic global-cursor sampler.
//!
//! The sampler maps a *global sample index* (the cursor in the job state) to a training window,
//! so any DP degree reads exactly the single-rank stream: at step s with global batch B the
//! samples are `cursor .. cursor + B`, and DP rank r of `dp` takes the contiguous block
//! `cursor + r·B/dp .. cursor + (r+1)·B/dp`.
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A loaded tokenizer (Hugging Face `tokenizer.json`).
pub struct Tokenizer {
    // H2
}

impl Tokenizer {
    /// Train a byte-level BPE (`add_prefix_space = false`, exact round trip) of `vocab_size` on
    /// `text_file`; `<|endoftext|>` is a special token.
    pub fn train(text_file: &Path, vocab_size: usize) -> Result<Tokenizer> {
        todo!("H2 {text_file:?} {vocab_size}")
    }
    pub fn load(path: &Path) -> Result<Tokenizer> {
        todo!("H2 {path:?}")
    }
    pub fn save(&self, path: &Path) -> Result<()> {
        todo!("H2 {path:?}")
    }
    pub fn vocab_size(&self) -> usize {
        todo!("H2")
    }
    pub fn eos_id(&self) -> u32 {
        todo!("H2")
    }
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        todo!("H2 {text}")
    }
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        todo!("H2 {}", ids.len())
    }
}

/// A memory-mapped flat token file (u32 little-endian) plus its small JSON index.
pub struct TokenFile {
    // H2
}

impl TokenFile {
    pub fn open(path: &Path) -> Result<TokenFile> {
        todo!("H2 {path:?}")
    }
    pub fn len(&self) -> usize {
        todo!("H2")
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn tokens(&self, range: Range<usize>) -> &[u32] {
        todo!("H2 {range:?}")
    }
    /// Number of training windows of `seq_len + 1` tokens at stride `seq_len`.
    pub fn num_windows(&self, seq_len: usize) -> u64 {
        todo!("H2 {seq_len}")
    }
    /// Window `i`: `seq_len + 1` tokens (inputs are `[..seq_len]`, targets `[1..]`).
    pub fn window(&self, i: u64, seq_len: usize) -> Vec<i64> {
        todo!("H2 {i} {seq_len}")
    }
}

/// Everything a trainer needs.
pub struct PreparedData {
    pub tokenizer: Tokenizer,
    pub tokenizer_path: PathBuf,
    pub train: TokenFile,
    pub valid: TokenFile,
}

/// Load or train the tokenizer and tokenize train/valid once, caching under `cache_dir` keyed
/// by the content hash of the inputs (a second call reuses the files). Safe when several
/// processes call it at once (write to temp + rename).
pub fn prepare(section: &trellis_core::job::DataSection, cache_dir: &Path) -> Result<PreparedData> {
    todo!("H2 {:?} {cache_dir:?}", section.train)
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
    /// The window id of global sample `index`.
    pub fn window(&self, index: u64) -> u64 {
        todo!("H2 {index}")
    }
}

/// The global sample indices DP rank `dp_rank` of `dp` reads at the step whose cursor is
/// `cursor`, for a global batch of `global_batch` sequences.
pub fn rank_samples(cursor: u64, global_batch: usize, dp_rank: usize, dp: usize) -> Range<u64> {
    let per = (global_batch / dp) as u64;
    let start = cursor + dp_rank as u64 * per;
    start..start + per
}
