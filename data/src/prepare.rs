//! `prepare`: tokenizer + tokenized corpora, cached by content hash.
use std::fs;
use std::path::{Path, PathBuf};

use crate::text::io_err;
use crate::tokens::{index_path, tokenize_file};
use crate::util::{require_file, sha256_file, sha256_hex, write_atomic, BuildLock};
use crate::{Error, Result, TokenFile, Tokenizer};

/// A trained tokenizer sees at most this many bytes of the training text.
pub const MAX_TRAIN_BYTES: u64 = 20_000_000;

/// Bump to invalidate every cached trained tokenizer / token file.
const TOKENIZER_KEY: &str = "trellis-bpe-v1";
const TOKENS_KEY: &str = "trellis-tokens-v1";

/// Everything a trainer needs.
pub struct PreparedData {
    pub tokenizer: Tokenizer,
    /// The tokenizer's `tokenizer.json` inside the cache (copy it into checkpoints).
    pub tokenizer_path: PathBuf,
    pub train: TokenFile,
    pub valid: TokenFile,
}

fn key(parts: &[&str]) -> String {
    let joined = parts.join("\0");
    sha256_hex(joined.as_bytes())[..32].to_string()
}

/// Load or train the tokenizer and tokenize train/valid once, caching under `cache_dir` keyed
/// by the content hash of the inputs (a second call reuses the files). Safe when several
/// processes call it at once (write to temp + rename).
pub fn prepare(section: &trellis_core::job::DataSection, cache_dir: &Path) -> Result<PreparedData> {
    require_file(&section.train, "data.train")?;
    require_file(&section.valid, "data.valid")?;
    if let Some(t) = &section.tokenizer {
        require_file(t, "data.tokenizer")?;
    }
    if section.seq_len == 0 {
        return Err(Error::Invalid("data.seq_len must be at least 1".into()));
    }
    fs::create_dir_all(cache_dir).map_err(io_err(format!(
        "cannot create cache directory {}",
        cache_dir.display()
    )))?;
    let train_sha = sha256_file(&section.train)?;
    let valid_sha = sha256_file(&section.valid)?;

    let (tokenizer, tokenizer_path) = match &section.tokenizer {
        Some(src) => cached_copy(src, cache_dir)?,
        None => cached_training(&section.train, &train_sha, section.vocab_size, cache_dir)?,
    };
    let tokenizer_sha = sha256_file(&tokenizer_path)?;

    let train = cached_tokens(
        &tokenizer,
        &tokenizer_sha,
        &section.train,
        &train_sha,
        cache_dir,
    )?;
    let valid = cached_tokens(
        &tokenizer,
        &tokenizer_sha,
        &section.valid,
        &valid_sha,
        cache_dir,
    )?;
    for (what, file, tf) in [
        ("data.train", &section.train, &train),
        ("data.valid", &section.valid, &valid),
    ] {
        if tf.is_empty() {
            return Err(Error::EmptyCorpus {
                what: what.into(),
                path: file.clone(),
            });
        }
        if tf.num_windows(section.seq_len) == 0 {
            return Err(Error::CorpusTooShort {
                what: what.into(),
                path: file.clone(),
                tokens: tf.len(),
                seq_len: section.seq_len,
            });
        }
    }
    Ok(PreparedData {
        tokenizer,
        tokenizer_path,
        train,
        valid,
    })
}

/// A given `tokenizer.json`, copied into the cache under its content hash.
fn cached_copy(src: &Path, cache_dir: &Path) -> Result<(Tokenizer, PathBuf)> {
    let bytes =
        fs::read(src).map_err(io_err(format!("cannot read tokenizer {}", src.display())))?;
    let sha = sha256_hex(&bytes);
    let tok = Tokenizer::from_json(&bytes, &src.display().to_string())?;
    let dest = cache_dir.join(format!("tokenizer-{}.json", &sha[..32]));
    let fresh = fs::read(&dest).map(|b| b == bytes).unwrap_or(false);
    if !fresh {
        write_atomic(&dest, &bytes)?;
    }
    Ok((tok, dest))
}

/// A BPE trained on `train` (first [`MAX_TRAIN_BYTES`]), cached by input hash and size.
fn cached_training(
    train: &Path,
    train_sha: &str,
    vocab_size: usize,
    cache_dir: &Path,
) -> Result<(Tokenizer, PathBuf)> {
    let k = key(&[
        TOKENIZER_KEY,
        train_sha,
        &vocab_size.to_string(),
        &MAX_TRAIN_BYTES.to_string(),
    ]);
    let dest = cache_dir.join(format!("tokenizer-{k}.json"));
    let try_load = || Tokenizer::load(&dest).ok();
    if let Some(t) = try_load() {
        return Ok((t, dest));
    }
    let _lock = BuildLock::acquire(&dest, || dest.exists());
    if let Some(t) = try_load() {
        return Ok((t, dest));
    }
    let tok = Tokenizer::train_limited(train, vocab_size, Some(MAX_TRAIN_BYTES))?;
    // Training is deterministic: whoever renames last writes the same bytes.
    tok.save(&dest)?;
    Ok((tok, dest))
}

/// Open a cached token file if it exists and matches its inputs.
fn open_matching(dest: &Path, source_sha: &str, tokenizer_sha: &str) -> Option<TokenFile> {
    if !index_path(dest).exists() {
        return None;
    }
    let tf = TokenFile::open(dest).ok()?;
    (tf.index().source_sha256 == source_sha && tf.index().tokenizer_sha256 == tokenizer_sha)
        .then_some(tf)
}

fn cached_tokens(
    tokenizer: &Tokenizer,
    tokenizer_sha: &str,
    src: &Path,
    source_sha: &str,
    cache_dir: &Path,
) -> Result<TokenFile> {
    let k = key(&[TOKENS_KEY, source_sha, tokenizer_sha]);
    let stem = src
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.split('.').next().unwrap_or(n))
        .filter(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
        .unwrap_or("corpus");
    let dest = cache_dir.join(format!("tokens-{stem}-{k}.u32"));
    if let Some(tf) = open_matching(&dest, source_sha, tokenizer_sha) {
        return Ok(tf);
    }
    let _lock = BuildLock::acquire(&dest, || index_path(&dest).exists());
    if let Some(tf) = open_matching(&dest, source_sha, tokenizer_sha) {
        return Ok(tf);
    }
    tokenize_file(tokenizer, tokenizer_sha, src, source_sha, &dest)
}
