//! Memory-mapped token files: `NAME` holds u32 little-endian ids, `NAME.json` its index.
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::text::{io_err, open_text, Chunker, Piece, CHUNK_BYTES};
use crate::util::{publish, require_file, temp_path, write_atomic};
use crate::{Error, Result, Tokenizer};

#[cfg(target_endian = "big")]
compile_error!(
    "trellis-data maps little-endian token files directly; big-endian hosts are unsupported"
);

/// The `format` field of every index this crate writes.
pub const TOKEN_FORMAT: &str = "trellis-tokens-v1";

/// The JSON index next to a token file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenIndex {
    /// Always [`TOKEN_FORMAT`].
    pub format: String,
    /// Always `"u32le"`.
    pub dtype: String,
    pub num_tokens: u64,
    /// SHA-256 of the source text file's bytes (as stored, e.g. compressed).
    pub source_sha256: String,
    /// SHA-256 of the `tokenizer.json` that made the tokens.
    pub tokenizer_sha256: String,
    pub eos_id: u32,
}

impl TokenIndex {
    pub fn new(num_tokens: u64, source_sha256: &str, tokenizer_sha256: &str, eos_id: u32) -> Self {
        TokenIndex {
            format: TOKEN_FORMAT.into(),
            dtype: "u32le".into(),
            num_tokens,
            source_sha256: source_sha256.into(),
            tokenizer_sha256: tokenizer_sha256.into(),
            eos_id,
        }
    }
}

/// The index path of token file `path`: `path` + `.json`.
pub fn index_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

/// A memory-mapped flat token file (u32 little-endian) plus its small JSON index.
pub struct TokenFile {
    path: PathBuf,
    index: TokenIndex,
    map: Option<Mmap>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .field("index", &self.index)
            .finish()
    }
}

impl TokenFile {
    pub fn open(path: &Path) -> Result<TokenFile> {
        require_file(path, "token file")?;
        let ipath = index_path(path);
        require_file(&ipath, "token index")?;
        let text = fs::read_to_string(&ipath)
            .map_err(io_err(format!("cannot read {}", ipath.display())))?;
        let index: TokenIndex = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: bad token index: {e}", ipath.display())))?;
        if index.format != TOKEN_FORMAT || index.dtype != "u32le" {
            return Err(Error::Invalid(format!(
                "{}: unsupported token file format {:?}/{:?} (expected {TOKEN_FORMAT:?}/\"u32le\")",
                ipath.display(),
                index.format,
                index.dtype
            )));
        }
        let file = File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(io_err(format!("cannot stat {}", path.display())))?
            .len();
        if Some(len) != index.num_tokens.checked_mul(4) {
            return Err(Error::Invalid(format!(
                "{}: {len} bytes, but its index says {} tokens ({} bytes)",
                path.display(),
                index.num_tokens,
                index.num_tokens.saturating_mul(4)
            )));
        }
        let map = if len == 0 {
            None
        } else {
            // SAFETY: token files are immutable once published (only ever replaced by rename,
            // which leaves this mapping's inode intact).
            let m = unsafe { Mmap::map(&file) }
                .map_err(io_err(format!("cannot map {}", path.display())))?;
            Some(m)
        };
        Ok(TokenFile {
            path: path.to_path_buf(),
            index,
            map,
        })
    }

    /// Write `tokens` as a token file at `path` (atomically) and open it.
    pub fn create(path: &Path, tokens: &[u32], index: TokenIndex) -> Result<TokenFile> {
        if index.num_tokens != tokens.len() as u64 {
            return Err(Error::Invalid(format!(
                "index says {} tokens, got {}",
                index.num_tokens,
                tokens.len()
            )));
        }
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        write_atomic(path, &bytes)?;
        write_index(path, &index)?;
        TokenFile::open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn index(&self) -> &TokenIndex {
        &self.index
    }

    pub fn eos_id(&self) -> u32 {
        self.index.eos_id
    }

    pub fn len(&self) -> usize {
        self.index.num_tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All tokens.
    pub fn all(&self) -> &[u32] {
        match &self.map {
            None => &[],
            Some(m) => {
                let bytes: &[u8] = m;
                // The map is page-aligned, its length a multiple of 4 (checked in `open`), and
                // the host little-endian (compile-time check above).
                debug_assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<u32>(), 0);
                // SAFETY: alignment and length as above; u32 has no invalid bit patterns.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u32>(), bytes.len() / 4) }
            }
        }
    }

    /// Tokens `range` (panics, like slice indexing, if it is out of bounds).
    pub fn tokens(&self, range: Range<usize>) -> &[u32] {
        &self.all()[range]
    }

    /// Number of training windows of `seq_len + 1` tokens at stride `seq_len`.
    pub fn num_windows(&self, seq_len: usize) -> u64 {
        if seq_len == 0 || self.len() < seq_len + 1 {
            return 0;
        }
        ((self.len() - 1) / seq_len) as u64
    }

    /// Window `i`: `seq_len + 1` tokens (inputs are `[..seq_len]`, targets `[1..]`), or an
    /// error if `i >= num_windows(seq_len)`.
    pub fn try_window(&self, i: u64, seq_len: usize) -> Result<Vec<i64>> {
        let n = self.num_windows(seq_len);
        if i >= n {
            return Err(Error::Invalid(format!(
                "window {i} out of range: {} has {n} windows of seq_len {seq_len}",
                self.path.display()
            )));
        }
        let start = i as usize * seq_len;
        Ok(self.all()[start..start + seq_len + 1]
            .iter()
            .map(|&t| i64::from(t))
            .collect())
    }

    /// Window `i`: `seq_len + 1` tokens (inputs are `[..seq_len]`, targets `[1..]`).
    /// Panics if `i >= num_windows(seq_len)` (a caller bug, like slice indexing); see
    /// [`TokenFile::try_window`].
    pub fn window(&self, i: u64, seq_len: usize) -> Vec<i64> {
        match self.try_window(i, seq_len) {
            Ok(w) => w,
            Err(e) => panic!("{e}"),
        }
    }
}

fn write_index(path: &Path, index: &TokenIndex) -> Result<()> {
    let json = serde_json::to_string_pretty(index)
        .map_err(|e| Error::Invalid(format!("serializing token index: {e}")))?;
    write_atomic(&index_path(path), json.as_bytes())
}

/// Texts per parallel encode call: about this many bytes.
const BATCH_BYTES: usize = 4 << 20;
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Tokenize corpus `src` (`.zst` decompressed on the fly): documents are separated by lines
/// reading exactly `<|endoftext|>`, each encoded on its own and joined by the EOS id (one EOS
/// per separator line). Streams: memory stays O(batch), not O(corpus). Writes the token file
/// `dest` and its index atomically (index last) and opens it.
pub fn tokenize_file(
    tokenizer: &Tokenizer,
    tokenizer_sha256: &str,
    src: &Path,
    source_sha256: &str,
    dest: &Path,
) -> Result<TokenFile> {
    tokenize_file_chunked(
        tokenizer,
        tokenizer_sha256,
        src,
        source_sha256,
        dest,
        CHUNK_BYTES,
    )
}

pub(crate) fn tokenize_file_chunked(
    tokenizer: &Tokenizer,
    tokenizer_sha256: &str,
    src: &Path,
    source_sha256: &str,
    dest: &Path,
    chunk_bytes: usize,
) -> Result<TokenFile> {
    require_file(src, "corpus")?;
    crate::util::note_tokenization();
    let total = fs::metadata(src).map(|m| m.len()).unwrap_or(0);
    let compressed = src.extension().is_some_and(|e| e == "zst");
    let t0 = Instant::now();
    eprintln!("trellis-data: tokenizing {}", src.display());
    let tmp = temp_path(dest);
    let res = (|| -> Result<u64> {
        let file =
            File::create(&tmp).map_err(io_err(format!("cannot create {}", tmp.display())))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut chunker = Chunker::new(open_text(src)?, src, chunk_bytes);
        let mut count = 0u64;
        let mut batch: Vec<Piece> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut last = Instant::now();
        let mut buf: Vec<u8> = Vec::new();
        let eos = tokenizer.eos_id();
        loop {
            let piece = chunker.next().transpose()?;
            let end = piece.is_none();
            if let Some(p) = piece {
                if let Piece::Text(t) = &p {
                    batch_bytes += t.len();
                }
                batch.push(p);
            }
            if batch_bytes >= BATCH_BYTES || (end && !batch.is_empty()) {
                let texts: Vec<&str> = batch
                    .iter()
                    .filter_map(|p| match p {
                        Piece::Text(t) => Some(t.as_str()),
                        Piece::Eos => None,
                    })
                    .collect();
                let mut encoded = tokenizer.encode_batch(texts)?.into_iter();
                buf.clear();
                for p in &batch {
                    match p {
                        Piece::Eos => {
                            buf.extend_from_slice(&eos.to_le_bytes());
                            count += 1;
                        }
                        Piece::Text(_) => {
                            let ids = encoded.next().unwrap_or_default();
                            count += ids.len() as u64;
                            for id in ids {
                                buf.extend_from_slice(&id.to_le_bytes());
                            }
                        }
                    }
                }
                out.write_all(&buf)
                    .map_err(io_err(format!("writing {}", tmp.display())))?;
                batch.clear();
                batch_bytes = 0;
                if last.elapsed() >= PROGRESS_EVERY {
                    last = Instant::now();
                    let secs = t0.elapsed().as_secs_f64();
                    let mb = chunker.bytes_read as f64 / 1e6;
                    let of = if compressed {
                        String::new()
                    } else {
                        format!(" of {:.1}", total as f64 / 1e6)
                    };
                    eprintln!(
                        "trellis-data: {}: {mb:.1}{of} MB, {count} tokens, {:.1} MB/s",
                        src.display(),
                        mb / secs
                    );
                }
            }
            if end {
                break;
            }
        }
        let file = out.into_inner().map_err(|e| Error::Io {
            context: format!("writing {}", tmp.display()),
            source: e.into_error(),
        })?;
        file.sync_all()
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "trellis-data: tokenized {}: {:.1} MB -> {count} tokens in {secs:.1} s ({:.1} MB/s)",
            src.display(),
            chunker.bytes_read as f64 / 1e6,
            chunker.bytes_read as f64 / 1e6 / secs.max(1e-9)
        );
        Ok(count)
    })();
    let count = match res {
        Ok(c) => c,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    publish(&tmp, dest)?;
    write_index(
        dest,
        &TokenIndex::new(count, source_sha256, tokenizer_sha256, tokenizer.eos_id()),
    )?;
    TokenFile::open(dest)
}
