//! Reading corpus text: optional zstd decompression, document separators and chunking at
//! points where the byte-level pre-tokenizer is guaranteed to split anyway (so encoding the
//! chunks separately gives exactly the tokens of encoding the whole document).
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

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
    source: BufReader<File>,
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

/// Open a text file for reading; a name ending in `.zst` is decompressed on the fly.
pub fn open_text(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    let file = File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
    let is_zst = path.extension().is_some_and(|e| e == "zst");
    if !is_zst {
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

/// A piece of a corpus: text to encode, or a document separator.
#[derive(Debug, PartialEq)]
pub(crate) enum Piece {
    Text(String),
    Eos,
}

/// Splits a corpus into [`Piece`]s: a line that reads exactly `<|endoftext|>` becomes
/// [`Piece::Eos`]; document text is cut into chunks of about `target` bytes, only right before
/// a `\n` that follows a non-whitespace character. The GPT-2 pre-tokenizer regex always has a
/// split there (no alternative matches across it, and it has no look-behind), so the chunks
/// encode to exactly the tokens of the whole document.
pub(crate) struct Chunker<R> {
    reader: R,
    path: PathBuf,
    target: usize,
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

    fn flush(&mut self) {
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
            self.pending.push_back(Piece::Eos);
            return Ok(());
        }
        let s = std::str::from_utf8(&self.line).map_err(|e| {
            Error::Invalid(format!(
                "{}: line {} is not valid UTF-8 ({e})",
                self.path.display(),
                self.line_no
            ))
        })?;
        self.cur.push_str(s);
        if self.cur.len() >= self.target && self.cur.ends_with('\n') {
            let before = self.cur[..self.cur.len() - 1].chars().next_back();
            if before.is_some_and(|c| !c.is_whitespace()) {
                self.cur.pop();
                self.flush();
                self.cur.push('\n');
            }
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
