//! Memory-mapped token files: `NAME` holds u32 little-endian ids, `NAME.json` its index.
use std::cell::Cell;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::source::{read_pieces, Format, InputFile};
use crate::text::{io_err, Piece, CHUNK_BYTES};
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
    /// Bytes per id: 4 for the files this crate writes, 2 or 4 for raw pre-tokenized files.
    width: usize,
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
            width: 4,
        })
    }

    /// Map a raw pre-tokenized file (little-endian ids of `dtype`, no index of its own) as it
    /// is; `source_sha256` and `eos_id` fill the in-memory index.
    pub fn open_raw(
        path: &Path,
        dtype: crate::Dtype,
        source_sha256: &str,
        eos_id: u32,
    ) -> Result<TokenFile> {
        let file = File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(io_err(format!("cannot stat {}", path.display())))?
            .len();
        let width = dtype.width();
        if len % width as u64 != 0 {
            return Err(Error::Invalid(format!(
                "{}: {len} bytes is not a whole number of {} tokens; check data.token_dtype",
                path.display(),
                dtype.index_name()
            )));
        }
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the caller's corpus; a concurrent writer could change what windows read,
            // never memory safety (ids are plain integers, read by copy).
            Some(
                unsafe { Mmap::map(&file) }
                    .map_err(io_err(format!("cannot map {}", path.display())))?,
            )
        };
        let mut index = TokenIndex::new(len / width as u64, source_sha256, "", eos_id);
        index.format = "raw".into();
        index.dtype = dtype.index_name().into();
        Ok(TokenFile {
            path: path.to_path_buf(),
            index,
            map,
            width,
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

    /// All tokens (files of 32-bit ids only: every file this crate writes; panics on a raw
    /// 16-bit file, see [`TokenFile::copy_range`]).
    pub fn all(&self) -> &[u32] {
        assert_eq!(
            self.width,
            4,
            "{}: a 16-bit token file has no u32 view; use copy_range",
            self.path.display()
        );
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

    /// Append tokens `range` to `out` as `i64` (any width; panics if out of bounds).
    pub fn copy_range(&self, range: Range<usize>, out: &mut Vec<i64>) {
        if self.width == 4 {
            out.extend(self.all()[range].iter().map(|&t| i64::from(t)));
            return;
        }
        let bytes: &[u8] = self.map.as_deref().unwrap_or(&[]);
        let b = &bytes[range.start * 2..range.end * 2];
        out.extend(
            b.chunks_exact(2)
                .map(|c| i64::from(u16::from_le_bytes([c[0], c[1]]))),
        );
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
        let mut out = Vec::with_capacity(seq_len + 1);
        self.copy_range(start..start + seq_len + 1, &mut out);
        Ok(out)
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

/// Progress of tokenizing a corpus (one bar over all its files, in on-disk bytes): an
/// `indicatif` bar on a terminal, a log line every few seconds otherwise.
pub(crate) struct Progress {
    bar: indicatif::ProgressBar,
    what: String,
    t0: Instant,
    last: Cell<Instant>,
    tokens: Cell<u64>,
}

impl Progress {
    pub(crate) fn new(what: &str, total_bytes: u64) -> Progress {
        let bar = indicatif::ProgressBar::new(total_bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("tokenizing {what}"));
        Progress {
            bar,
            what: what.to_string(),
            t0: Instant::now(),
            last: Cell::new(Instant::now()),
            tokens: Cell::new(0),
        }
    }

    fn update(&self, bytes: u64, tokens: u64) {
        self.bar.set_position(bytes);
        self.tokens.set(tokens);
        self.bar.set_message(format!("{tokens} tokens"));
        if self.bar.is_hidden() && self.last.get().elapsed() >= PROGRESS_EVERY {
            self.last.set(Instant::now());
            let secs = self.t0.elapsed().as_secs_f64();
            eprintln!(
                "trellis-data: tokenizing {}: {:.1} of {:.1} MB, {tokens} tokens, {:.1} MB/s",
                self.what,
                bytes as f64 / 1e6,
                self.bar.length().unwrap_or(0) as f64 / 1e6,
                bytes as f64 / 1e6 / secs.max(1e-9)
            );
        }
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
        let secs = self.t0.elapsed().as_secs_f64();
        let mb = self.bar.position() as f64 / 1e6;
        eprintln!(
            "trellis-data: tokenized {}: {mb:.1} MB -> {} tokens in {secs:.1} s ({:.1} MB/s)",
            self.what,
            self.tokens.get(),
            mb / secs.max(1e-9)
        );
    }
}

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
    let input = InputFile {
        path: src.to_path_buf(),
        format: Format::Text,
    };
    let total = fs::metadata(src).map(|m| m.len()).unwrap_or(0);
    let progress = Progress::new(&src.display().to_string(), total);
    let opts = TokenizeOpts {
        chunk_bytes,
        close_last: false,
    };
    let (tf, _) = tokenize_input(
        tokenizer,
        tokenizer_sha256,
        &input,
        source_sha256,
        dest,
        &opts,
        &progress,
        0,
    )?;
    progress.finish();
    Ok(tf)
}

pub(crate) struct TokenizeOpts {
    /// Target piece size inside a document (see [`crate::text::may_cut`]).
    pub chunk_bytes: usize,
    /// End the file's last document as if a separator followed it (files joined into one
    /// source must not run their documents together).
    pub close_last: bool,
}

/// Tokenize one input file into the token file `dest` (written atomically, index last) and open
/// it. Each document is `prefix ids suffix` (the tokenizer's post-processor affixes), and each
/// document end adds the EOS id unless the suffix already ends with it. Reading and parsing run
/// on a thread of their own while batches of pieces are encoded in parallel (rayon). Returns the
/// file and the on-disk bytes read; `progress` is advanced from `progress_base`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tokenize_input(
    tokenizer: &Tokenizer,
    tokenizer_sha256: &str,
    input: &InputFile,
    source_sha256: &str,
    dest: &Path,
    opts: &TokenizeOpts,
    progress: &Progress,
    progress_base: u64,
) -> Result<(TokenFile, u64)> {
    crate::util::note_tokenization();
    let tmp = temp_path(dest);
    let counter = Arc::new(AtomicU64::new(0));
    let (prefix, suffix) = tokenizer.document_affixes();
    let eos = tokenizer.eos_id();
    let sep_eos = suffix.last() != Some(&eos);
    let cut = tokenizer.cuts_documents();
    let res = std::thread::scope(|scope| -> Result<u64> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<Piece>>>(2);
        let count = counter.clone();
        let reader = scope.spawn(move || {
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            let res = read_pieces(input, cut, opts.chunk_bytes, count, &mut |p| {
                if let Piece::Text(t) = &p {
                    bytes += t.len();
                }
                batch.push(p);
                if bytes >= BATCH_BYTES {
                    bytes = 0;
                    // A closed channel means the writer failed: stop reading.
                    return Ok(tx.send(Ok(std::mem::take(&mut batch))).is_ok());
                }
                Ok(true)
            });
            let last = match res {
                Ok(()) => Ok(batch),
                Err(e) => Err(e),
            };
            let _ = tx.send(last);
        });
        let file =
            File::create(&tmp).map_err(io_err(format!("cannot create {}", tmp.display())))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut count = 0u64;
        let mut buf: Vec<u8> = Vec::new();
        let mut in_doc = false;
        let put = |buf: &mut Vec<u8>, ids: &[u32]| {
            for id in ids {
                buf.extend_from_slice(&id.to_le_bytes());
            }
            ids.len() as u64
        };
        for batch in rx {
            let batch = batch?;
            let texts: Vec<&str> = batch
                .iter()
                .filter_map(|p| match p {
                    Piece::Text(t) => Some(t.as_str()),
                    Piece::End => None,
                })
                .collect();
            let mut encoded = tokenizer.encode_batch(texts)?.into_iter();
            buf.clear();
            for p in &batch {
                match p {
                    Piece::Text(_) => {
                        if !in_doc {
                            count += put(&mut buf, prefix);
                            in_doc = true;
                        }
                        count += put(&mut buf, &encoded.next().unwrap_or_default());
                    }
                    Piece::End => {
                        if in_doc {
                            count += put(&mut buf, suffix);
                            in_doc = false;
                        }
                        if sep_eos {
                            count += put(&mut buf, &[eos]);
                        }
                    }
                }
            }
            out.write_all(&buf)
                .map_err(io_err(format!("writing {}", tmp.display())))?;
            progress.update(progress_base + counter.load(Ordering::Relaxed), count);
        }
        if in_doc {
            buf.clear();
            count += put(&mut buf, suffix);
            if opts.close_last && sep_eos {
                count += put(&mut buf, &[eos]);
            }
            out.write_all(&buf)
                .map_err(io_err(format!("writing {}", tmp.display())))?;
        }
        let _ = reader.join();
        let file = out.into_inner().map_err(|e| Error::Io {
            context: format!("writing {}", tmp.display()),
            source: e.into_error(),
        })?;
        file.sync_all()
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        Ok(count)
    });
    let read = counter.load(Ordering::Relaxed);
    crate::util::note_bytes_read(read);
    let count = match res {
        Ok(c) => c,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    progress.update(progress_base + read, progress.tokens.get());
    publish(&tmp, dest)?;
    write_index(
        dest,
        &TokenIndex::new(count, source_sha256, tokenizer_sha256, eos),
    )?;
    Ok((TokenFile::open(dest)?, read))
}
