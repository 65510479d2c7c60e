//! `prepare`: inputs resolved, tokenizer loaded or trained, corpora tokenized, all cached by
//! content hash.
use std::fs;
use std::path::{Path, PathBuf};

use trellis_core::job::DataSection;

use crate::dataset::{Dataset, Source};
use crate::source::{resolve, verify, Format, FormatOpts, InputFile, Verified};
use crate::text::{io_err, CHUNK_BYTES};
use crate::tokens::{index_path, tokenize_input, Progress, TokenizeOpts};
use crate::util::{require_file, sha256_file, sha256_hex, write_atomic, BuildLock};
use crate::{Error, Result, Sampler, TokenFile, Tokenizer};

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
    pub train: Dataset,
    pub valid: Dataset,
}

impl PreparedData {
    /// The deterministic order of training windows (see [`Dataset::sampler`]).
    pub fn sampler(&self, seq_len: usize, seed: u64) -> Result<Sampler> {
        self.train.sampler(seq_len, seed)
    }
}

fn key(parts: &[&str]) -> String {
    let joined = parts.join("\0");
    sha256_hex(joined.as_bytes())[..32].to_string()
}

/// The files of one source, resolved.
struct Resolved {
    spec: PathBuf,
    what: String,
    weight: f64,
    files: Vec<(InputFile, Verified)>,
}

/// Load or train the tokenizer and tokenize every input once, caching under `cache_dir` keyed
/// by content hashes (a second call reuses the files). Content hashes are remembered with each
/// file's size, mtime and a sampled hash, so an unchanged corpus is not read again. Safe when
/// several processes call it at once (write to temp + rename).
pub fn prepare(section: &DataSection, cache_dir: &Path) -> Result<PreparedData> {
    if section.seq_len == 0 {
        return Err(Error::Invalid("data.seq_len must be at least 1".into()));
    }
    fn opts<'a>(
        section: &'a DataSection,
        format: Option<&'a str>,
        text_field: Option<&'a str>,
    ) -> FormatOpts<'a> {
        FormatOpts {
            format: format.or(section.format.as_deref()),
            text_field: text_field
                .or(section.text_field.as_deref())
                .unwrap_or("text"),
            token_dtype: section.token_dtype.as_deref(),
        }
    }
    let mut train_specs = Vec::new();
    if section.sources.is_empty() {
        train_specs.push((
            "data.train".to_string(),
            section.train.clone(),
            1.0,
            opts(section, None, None),
        ));
    }
    for (i, s) in section.sources.iter().enumerate() {
        let o = opts(section, s.format.as_deref(), s.text_field.as_deref());
        train_specs.push((format!("data.sources[{i}]"), s.path.clone(), s.weight, o));
    }
    let mut train_inputs = Vec::new();
    for (what, spec, weight, o) in &train_specs {
        train_inputs.push((what.clone(), spec.clone(), *weight, resolve(spec, what, o)?));
    }
    let valid_inputs = resolve(&section.valid, "data.valid", &opts(section, None, None))?;
    if let Some(t) = &section.tokenizer {
        require_file(t, "data.tokenizer")?;
    }
    fs::create_dir_all(cache_dir).map_err(io_err(format!(
        "cannot create cache directory {}",
        cache_dir.display()
    )))?;
    let verify_all =
        |what: &str, spec: &Path, weight: f64, files: Vec<InputFile>| -> Result<Resolved> {
            let files = files
                .into_iter()
                .map(|f| verify(&f, cache_dir).map(|v| (f, v)))
                .collect::<Result<Vec<_>>>()?;
            Ok(Resolved {
                spec: spec.to_path_buf(),
                what: what.to_string(),
                weight,
                files,
            })
        };
    let train: Vec<Resolved> = train_inputs
        .into_iter()
        .map(|(what, spec, weight, files)| verify_all(&what, &spec, weight, files))
        .collect::<Result<_>>()?;
    let valid = verify_all("data.valid", &section.valid, 1.0, valid_inputs)?;

    let (tokenizer, tokenizer_path) = match &section.tokenizer {
        Some(src) => cached_copy(src, cache_dir)?,
        None => cached_training(&train, section.vocab_size, cache_dir)?,
    };
    let tokenizer_sha = sha256_file(&tokenizer_path)?;

    let train = train
        .iter()
        .map(|r| open_source(&tokenizer, &tokenizer_sha, r, cache_dir))
        .collect::<Result<Vec<_>>>()?;
    let valid = vec![open_source(&tokenizer, &tokenizer_sha, &valid, cache_dir)?];
    let eos = tokenizer.eos_id();
    let (train, valid) = (Dataset::new(train, eos), Dataset::new(valid, eos));
    for (what, ds) in [("data.train", &train), ("data.valid", &valid)] {
        for (i, src) in ds.sources().iter().enumerate() {
            let what = if section.sources.is_empty() || what == "data.valid" {
                what.to_string()
            } else {
                format!("data.sources[{i}]")
            };
            if src.is_empty() {
                return Err(Error::EmptyCorpus {
                    what,
                    path: src.spec.clone(),
                });
            }
            if src.num_windows(section.seq_len) == 0 {
                return Err(Error::CorpusTooShort {
                    what,
                    path: src.spec.clone(),
                    tokens: src.len() as usize,
                    seq_len: section.seq_len,
                });
            }
        }
    }
    // A mixture's proportions must be representable.
    train.sampler(section.seq_len, 0)?;
    Ok(PreparedData {
        tokenizer,
        tokenizer_path,
        train,
        valid,
    })
}

/// The token files of one source: raw pre-tokenized files mapped as they are (their ids checked
/// against the vocabulary), text files tokenized once into the cache.
fn open_source(
    tokenizer: &Tokenizer,
    tokenizer_sha: &str,
    r: &Resolved,
    cache_dir: &Path,
) -> Result<Source> {
    let todo: u64 = r
        .files
        .iter()
        .filter(|(f, v)| {
            !matches!(f.format, Format::Tokens(_))
                && cached_tokens_if_fresh(tokenizer_sha, f, v, r.files.len() > 1, cache_dir)
                    .is_none()
        })
        .map(|(f, _)| fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0))
        .sum();
    let progress = (todo > 0).then(|| Progress::new(&r.spec.display().to_string(), todo));
    let mut done = 0u64;
    let mut files = Vec::new();
    for (f, v) in &r.files {
        if let Format::Tokens(dtype) = f.format {
            let max = v.max_token_id.unwrap_or(0);
            if max as usize >= tokenizer.vocab_size() {
                return Err(Error::Invalid(format!(
                    "{}: {}: token id {max} is outside the tokenizer's vocabulary of {}; check data.token_dtype and data.tokenizer",
                    r.what,
                    f.path.display(),
                    tokenizer.vocab_size()
                )));
            }
            files.push(TokenFile::open_raw(
                &f.path,
                dtype,
                &v.sha256,
                tokenizer.eos_id(),
            )?);
            continue;
        }
        let close_last = r.files.len() > 1;
        if let Some(tf) = cached_tokens_if_fresh(tokenizer_sha, f, v, close_last, cache_dir) {
            files.push(tf);
            continue;
        }
        let p = progress.as_ref().expect("a progress bar when work is left");
        let (tf, read) = cached_tokens(
            tokenizer,
            tokenizer_sha,
            f,
            v,
            close_last,
            cache_dir,
            p,
            done,
        )?;
        done += read;
        files.push(tf);
    }
    if let Some(p) = progress {
        p.finish();
    }
    Ok(Source::new(r.spec.clone(), r.weight, files))
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

/// A BPE trained on the training sources (first [`MAX_TRAIN_BYTES`], shared by weight), cached
/// by their content hashes and the size.
fn cached_training(
    train: &[Resolved],
    vocab_size: usize,
    cache_dir: &Path,
) -> Result<(Tokenizer, PathBuf)> {
    if let Some((f, _)) = train
        .iter()
        .flat_map(|r| &r.files)
        .find(|(f, _)| matches!(f.format, Format::Tokens(_)))
    {
        return Err(Error::Invalid(format!(
            "{} is pre-tokenized: set data.tokenizer to the tokenizer.json that made it",
            f.path.display()
        )));
    }
    let single =
        train.len() == 1 && train[0].files.len() == 1 && train[0].files[0].0.format == Format::Text;
    let mut parts: Vec<String> = vec![TOKENIZER_KEY.into()];
    let mut budgets = Vec::new();
    let total: f64 = train.iter().map(|r| r.weight).sum();
    for r in train {
        // Each source's share of the budget, spread over its files in order.
        let mut left = (MAX_TRAIN_BYTES as f64 * r.weight / total).round() as u64;
        for (f, v) in &r.files {
            parts.push(v.sha256.clone());
            parts.extend(f.format.key_parts());
            let size = fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0);
            if left > 0 {
                budgets.push((f.clone(), Some(left)));
                left = left.saturating_sub(size);
            }
        }
        if !single {
            parts.push(r.weight.to_string());
        }
    }
    if single {
        parts.truncate(2); // the key of a plain text file, as before mixtures existed
    }
    parts.push(vocab_size.to_string());
    parts.push(MAX_TRAIN_BYTES.to_string());
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let k = key(&refs);
    let dest = cache_dir.join(format!("tokenizer-{k}.json"));
    let try_load = || Tokenizer::load(&dest).ok();
    if let Some(t) = try_load() {
        return Ok((t, dest));
    }
    let _lock = BuildLock::acquire(&dest, || dest.exists());
    if let Some(t) = try_load() {
        return Ok((t, dest));
    }
    let what = train
        .iter()
        .map(|r| r.spec.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ");
    let tok = if single {
        Tokenizer::train_limited(&train[0].files[0].0.path, vocab_size, Some(MAX_TRAIN_BYTES))?
    } else {
        Tokenizer::train_inputs(&budgets, vocab_size, &what)?
    };
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

/// Where the tokens of `input` go: a plain text file keeps the name it had before other formats
/// existed.
fn tokens_dest(
    tokenizer_sha: &str,
    input: &InputFile,
    v: &Verified,
    close_last: bool,
    cache_dir: &Path,
) -> PathBuf {
    let mut parts: Vec<String> = vec![TOKENS_KEY.into(), v.sha256.clone(), tokenizer_sha.into()];
    parts.extend(input.format.key_parts());
    if close_last {
        parts.push("close-last".into());
    }
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let k = key(&refs);
    let stem = input
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.split('.').next().unwrap_or(n))
        .filter(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
        .unwrap_or("corpus");
    cache_dir.join(format!("tokens-{stem}-{k}.u32"))
}

fn cached_tokens_if_fresh(
    tokenizer_sha: &str,
    input: &InputFile,
    v: &Verified,
    close_last: bool,
    cache_dir: &Path,
) -> Option<TokenFile> {
    let dest = tokens_dest(tokenizer_sha, input, v, close_last, cache_dir);
    open_matching(&dest, &v.sha256, tokenizer_sha)
}

#[allow(clippy::too_many_arguments)]
fn cached_tokens(
    tokenizer: &Tokenizer,
    tokenizer_sha: &str,
    input: &InputFile,
    v: &Verified,
    close_last: bool,
    cache_dir: &Path,
    progress: &Progress,
    progress_base: u64,
) -> Result<(TokenFile, u64)> {
    let dest = tokens_dest(tokenizer_sha, input, v, close_last, cache_dir);
    let _lock = BuildLock::acquire(&dest, || index_path(&dest).exists());
    if let Some(tf) = open_matching(&dest, &v.sha256, tokenizer_sha) {
        return Ok((tf, 0));
    }
    let opts = TokenizeOpts {
        chunk_bytes: CHUNK_BYTES,
        close_last,
    };
    tokenize_input(
        tokenizer,
        tokenizer_sha,
        input,
        &v.sha256,
        &dest,
        &opts,
        progress,
        progress_base,
    )
}
