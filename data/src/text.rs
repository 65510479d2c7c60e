//! Reading corpus text: optional zstd / gzip decompression, document separators and chunking at
//! points where the pre-tokenizer is guaranteed to split anyway (so encoding the chunks
//! separately gives exactly the tokens of encoding the whole document).
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

use crate::{Error, Result};

/// The special token, and the line that separates documents in a corpus file.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// Chunks handed to the encoder are about this large (bytes); cut only at safe points.
pub(crate) const CHUNK_BYTES: usize = 64 * 1024;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// A `.zst` file (one or more frames, skippable frames allowed) as a plain reader.
struct ZstdReader {
    source: BufReader<Counting<File>>,
    decoder: FrameDecoder,
    done: bool,
}

fn zstd_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}"))
}

impl ZstdReader {
    /// Start the next frame; `false` at the end of the file.
    fn next_frame(&mut self) -> io::Result<bool> {
        loop {
            if self.source.fill_buf()?.is_empty() {
                return Ok(false);
            }
            match self.decoder.reset(&mut self.source) {
                Ok(()) => return Ok(true),
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let want = u64::from(length);
                    let skipped = io::copy(&mut (&mut self.source).take(want), &mut io::sink())?;
                    if skipped != want {
                        return Err(zstd_err("truncated skippable frame"));
                    }
                }
                Err(e) => return Err(zstd_err(e)),
            }
        }
    }
}

impl Read for ZstdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.done {
                return Ok(0);
            }
            if self.decoder.is_finished() && self.decoder.can_collect() == 0 {
                if !self.next_frame()? {
                    self.done = true;
                }
                continue;
            }
            while self.decoder.can_collect() < buf.len() && !self.decoder.is_finished() {
                let need = buf.len() - self.decoder.can_collect();
                self.decoder
                    .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBytes(need))
                    .map_err(zstd_err)?;
            }
            let n = self.decoder.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
        }
    }
}

/// Counts the bytes read through it into a shared counter (on-disk bytes, for the progress bar
/// and the read counters).
pub(crate) struct Counting<R> {
    pub(crate) inner: R,
    pub(crate) count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Open a text file for reading; a name ending in `.zst` is decompressed on the fly.
pub fn open_text(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    open_counted(path, Arc::new(AtomicU64::new(0)))
}

/// [`open_text`] (`.zst` and `.gz` decompressed on the fly), counting the on-disk bytes read
/// into `count`.
pub(crate) fn open_counted(path: &Path, count: Arc<AtomicU64>) -> Result<Box<dyn BufRead + Send>> {
    let file = File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
    let file = Counting { inner: file, count };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "gz" {
        let gz = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, file));
        return Ok(Box::new(BufReader::with_capacity(1 << 20, gz)));
    }
    if ext != "zst" {
        return Ok(Box::new(BufReader::with_capacity(1 << 20, file)));
    }
    let mut reader = ZstdReader {
        source: BufReader::with_capacity(1 << 20, file),
        decoder: FrameDecoder::new(),
        done: false,
    };
    match reader.next_frame() {
        Ok(true) => {}
        Ok(false) => reader.done = true,
        Err(e) => {
            return Err(Error::Invalid(format!(
                "{}: not a readable zstd file: {e}",
                path.display()
            )))
        }
    }
    Ok(Box::new(BufReader::with_capacity(1 << 20, reader)))
}

/// A piece of a corpus: text to encode (part of the current document), or the end of a
/// document (a separator line in a text file; every jsonl line or parquet row ends one).
#[derive(Debug, PartialEq)]
pub(crate) enum Piece {
    Text(String),
    End,
}

/// Whether text may be cut right after a `\n` that follows `prev` and precedes `next`: both
/// must be non-whitespace. Neither GPT-2's nor Llama 3's pre-tokenizer regex matches across
/// such a point (no alternative spans a newline followed by a non-space, the newline never
/// prefixes a word, and there is no look-behind), so the pieces encode to exactly the tokens of
/// the whole document. [`crate::Tokenizer`] checks the rule against each tokenizer on a probe
/// text and encodes documents whole where it does not hold.
pub(crate) fn may_cut(prev: Option<char>, next: Option<char>) -> bool {
    prev.is_some_and(|c| !c.is_whitespace()) && next.is_some_and(|c| !c.is_whitespace())
}

/// `doc` cut into pieces of about `target` bytes (at least), only where [`may_cut`] allows.
pub(crate) fn split_document(doc: &str, target: usize) -> Vec<&str> {
    let b = doc.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut from = target.max(1);
    while from < b.len() {
        let Some(j) = b[from - 1..]
            .iter()
            .position(|&c| c == b'\n')
            .map(|k| k + from - 1)
        else {
            break;
        };
        if j > start
            && may_cut(
                doc[start..j].chars().next_back(),
                doc[j + 1..].chars().next(),
            )
        {
            out.push(&doc[start..j + 1]);
            start = j + 1;
            from = start + target.max(1);
        } else {
            from = j + 2;
        }
    }
    if start < b.len() {
        out.push(&doc[start..]);
    }
    out
}

/// Splits a text corpus into [`Piece`]s: a line that reads exactly `<|endoftext|>` ends a
/// document ([`Piece::End`]); with `cut`, document text is cut into chunks of about `target`
/// bytes where [`may_cut`] allows; without, each document is one piece.
pub(crate) struct Chunker<R> {
    reader: R,
    path: PathBuf,
    target: usize,
    cut: bool,
    /// The text so far ends at a point where it may be cut if the next line starts with a
    /// non-space.
    cut_pending: bool,
    cur: String,
    line: Vec<u8>,
    line_no: u64,
    pending: VecDeque<Piece>,
    done: bool,
    failed: bool,
    /// (Decompressed) bytes read so far.
    pub bytes_read: u64,
    /// Stop after this many bytes (at a line end).
    limit: Option<u64>,
}

impl<R: BufRead> Chunker<R> {
    pub(crate) fn new(reader: R, path: &Path, target: usize) -> Self {
        Chunker {
            reader,
            path: path.to_path_buf(),
            target: target.max(1),
            cut: true,
            cut_pending: false,
            cur: String::new(),
            line: Vec::new(),
            line_no: 0,
            pending: VecDeque::new(),
            done: false,
            failed: false,
            bytes_read: 0,
            limit: None,
        }
    }

    pub(crate) fn with_limit(mut self, limit: Option<u64>) -> Self {
        self.limit = limit;
        self
    }

    /// Whether documents may be cut at all (see [`may_cut`]).
    pub(crate) fn with_cuts(mut self, cut: bool) -> Self {
        self.cut = cut;
        self
    }

    fn flush(&mut self) {
        self.cut_pending = false;
        if !self.cur.is_empty() {
            self.pending
                .push_back(Piece::Text(std::mem::take(&mut self.cur)));
        }
    }

    fn step(&mut self) -> Result<()> {
        if self.limit.is_some_and(|l| self.bytes_read >= l) {
            self.done = true;
            self.flush();
            return Ok(());
        }
        self.line.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.line)
            .map_err(io_err(format!("reading {}", self.path.display())))?;
        if n == 0 {
            self.done = true;
            self.flush();
            return Ok(());
        }
        self.bytes_read += n as u64;
        self.line_no += 1;
        let content = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content == EOS_TOKEN.as_bytes() {
            self.flush();
            self.pending.push_back(Piece::End);
            return Ok(());
        }
        let s = std::str::from_utf8(&self.line).map_err(|e| {
            Error::Invalid(format!(
                "{}: line {} is not valid UTF-8 ({e})",
                self.path.display(),
                self.line_no
            ))
        })?;
        if self.cut_pending {
            if may_cut(Some('x'), s.chars().next()) {
                let s = s.to_string();
                self.flush();
                self.cur = s;
            } else {
                self.cur.push_str(s);
            }
            self.cut_pending = false;
        } else {
            self.cur.push_str(s);
        }
        if self.cut && self.cur.len() >= self.target && self.cur.ends_with('\n') {
            let before = self.cur[..self.cur.len() - 1].chars().next_back();
            self.cut_pending = before.is_some_and(|c| !c.is_whitespace());
        }
        Ok(())
    }
}

impl<R: BufRead> Iterator for Chunker<R> {
    type Item = Result<Piece>;
    fn next(&mut self) -> Option<Result<Piece>> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                return Some(Ok(p));
            }
            if self.done || self.failed {
                return None;
            }
            if let Err(e) = self.step() {
                self.failed = true;
                return Some(Err(e));
            }
        }
    }
}
