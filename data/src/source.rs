//! Inputs: `data.train` / `data.valid` / `[[data.sources]]` resolved to files with formats,
//! cheap fingerprints (size, mtime, sampled hash) that spare re-hashing an unchanged corpus, and
//! the documents read out of text, jsonl and parquet files.
use std::fs::{self, File};
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::text::{io_err, open_counted, split_document, Chunker, Piece};
use crate::util::{note_bytes_read, note_bytes_sampled, sha256_hex, write_atomic};
use crate::{Error, Result};

/// Element type of a pre-tokenized file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    pub fn width(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
    pub(crate) fn index_name(self) -> &'static str {
        match self {
            Dtype::U16 => "u16le",
            Dtype::U32 => "u32le",
        }
    }
}

/// How a file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// UTF-8 text; `<|endoftext|>` lines separate documents (`.zst` / `.gz` decompressed).
    Text,
    /// One JSON object per line; `text_field` is the document.
    Jsonl { text_field: String },
    /// A parquet table; string column `text_field` is the document.
    Parquet { text_field: String },
    /// Raw little-endian token ids (nanoGPT style), used as they are.
    Tokens(Dtype),
}

impl Format {
    /// Extra cache-key parts (empty for plain text, so text caches keep their names).
    pub(crate) fn key_parts(&self) -> Vec<String> {
        match self {
            Format::Text => vec![],
            Format::Jsonl { text_field } => vec!["jsonl".into(), text_field.clone()],
            Format::Parquet { text_field } => vec!["parquet".into(), text_field.clone()],
            Format::Tokens(d) => vec!["tokens".into(), d.index_name().into()],
        }
    }
}

/// One input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    pub path: PathBuf,
    pub format: Format,
}

/// Options that decide formats while resolving.
pub(crate) struct FormatOpts<'a> {
    pub format: Option<&'a str>,
    pub text_field: &'a str,
    pub token_dtype: Option<&'a str>,
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The format a file name implies, if it implies one (`None` for `tokens` without a dtype is an
/// error, reported by the caller).
fn infer(name: &str) -> Option<&'static str> {
    let n = name.to_ascii_lowercase();
    let n = n
        .strip_suffix(".zst")
        .or_else(|| n.strip_suffix(".gz"))
        .unwrap_or(&n);
    if n.ends_with(".txt") || n.ends_with(".text") {
        Some("text")
    } else if n.ends_with(".jsonl") || n.ends_with(".ndjson") || n.ends_with(".json") {
        Some("jsonl")
    } else if n.ends_with(".parquet") {
        Some("parquet")
    } else if n.ends_with(".bin") {
        Some("tokens")
    } else {
        None
    }
}

fn format_of(path: &Path, what: &str, kind: &str, o: &FormatOpts) -> Result<Format> {
    Ok(match kind {
        "text" => Format::Text,
        "jsonl" => Format::Jsonl {
            text_field: o.text_field.to_string(),
        },
        "parquet" => Format::Parquet {
            text_field: o.text_field.to_string(),
        },
        "tokens" => match o.token_dtype {
            Some("uint16") => Format::Tokens(Dtype::U16),
            Some("uint32") => Format::Tokens(Dtype::U32),
            _ => {
                return Err(Error::Invalid(format!(
                    "{what}: {} holds pre-tokenized ids: set data.token_dtype = \"uint16\" or \"uint32\"",
                    path.display()
                )))
            }
        },
        other => {
            return Err(Error::Invalid(format!(
                "{what}: unknown format '{other}'; use text, jsonl, parquet or tokens"
            )))
        }
    })
}

fn has_glob(p: &Path) -> bool {
    p.to_string_lossy().contains(['*', '?', '['])
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = fs::read_dir(dir).map_err(io_err(format!("cannot list {}", dir.display())))?;
    for e in rd {
        let e = e.map_err(io_err(format!("cannot list {}", dir.display())))?;
        let p = e.path();
        let name = name_of(&p);
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// Resolve `spec` (a file, a directory or a glob) to its input files, sorted by path. `what`
/// names it in errors (e.g. `data.train`). A single named file of no known extension is text
/// (unless `format` says otherwise); directories keep only files of known extensions.
pub(crate) fn resolve(spec: &Path, what: &str, o: &FormatOpts) -> Result<Vec<InputFile>> {
    let (files, explicit) = if spec.is_file() {
        (vec![spec.to_path_buf()], true)
    } else if spec.is_dir() {
        let mut v = Vec::new();
        walk(spec, &mut v)?;
        (v, false)
    } else if has_glob(spec) {
        let pattern = spec.to_string_lossy();
        let paths = glob::glob(&pattern)
            .map_err(|e| Error::Invalid(format!("{what}: bad glob '{pattern}': {e}")))?;
        let mut v = Vec::new();
        for p in paths {
            let p = p.map_err(|e| Error::Invalid(format!("{what}: {e}")))?;
            if p.is_file() {
                v.push(p);
            }
        }
        (v, true)
    } else {
        return Err(Error::NotFound {
            what: what.to_string(),
            path: spec.to_path_buf(),
        });
    };
    let mut out = Vec::new();
    for path in files {
        let kind = match (o.format, infer(&name_of(&path))) {
            (Some(f), _) => f,
            (None, Some(k)) => k,
            (None, None) if explicit && spec.is_file() => "text",
            (None, None) if explicit => {
                return Err(Error::Invalid(format!(
                    "{what}: cannot tell the format of {} from its name (.txt, .jsonl, .parquet, .bin, optionally .zst/.gz); set data.format",
                    path.display()
                )))
            }
            (None, None) => continue,
        };
        let format = format_of(&path, what, kind, o)?;
        out.push(InputFile { path, format });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "{what}: {} holds no .txt, .txt.zst, .jsonl(.gz/.zst), .parquet or .bin files",
            spec.display()
        )));
    }
    Ok(out)
}

/// What a cheap look at a file gives: if all three match, the content is taken as unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Fingerprint {
    size: u64,
    mtime_ns: u64,
    /// SHA-256 of up to [`SAMPLES`] blocks of [`SAMPLE_BYTES`] at evenly spaced offsets.
    sample_sha256: String,
}

const SAMPLES: u64 = 16;
const SAMPLE_BYTES: u64 = 4096;

/// The most bytes a fingerprint reads from one file.
pub const FINGERPRINT_BYTES: u64 = SAMPLES * SAMPLE_BYTES;

fn fingerprint(path: &Path) -> Result<Fingerprint> {
    let ctx = || format!("cannot read {}", path.display());
    let mut f = File::open(path).map_err(io_err(ctx()))?;
    let meta = f.metadata().map_err(io_err(ctx()))?;
    let size = meta.len();
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos().min(u64::MAX as u128) as u64)
        .unwrap_or(0);
    let mut h = Sha256::new();
    h.update(size.to_le_bytes());
    let mut buf = vec![0u8; SAMPLE_BYTES as usize];
    let span = size.saturating_sub(SAMPLE_BYTES);
    let mut read = 0u64;
    let mut last = None;
    for i in 0..SAMPLES {
        let off = span * i / (SAMPLES - 1);
        if last == Some(off) {
            continue;
        }
        last = Some(off);
        f.seek(SeekFrom::Start(off)).map_err(io_err(ctx()))?;
        let n = (SAMPLE_BYTES.min(size - off)) as usize;
        f.read_exact(&mut buf[..n]).map_err(io_err(ctx()))?;
        h.update(&buf[..n]);
        read += n as u64;
    }
    note_bytes_sampled(read);
    Ok(Fingerprint {
        size,
        mtime_ns,
        sample_sha256: hex::encode(h.finalize()),
    })
}

/// A file's full content hash, remembered with its fingerprint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    path: PathBuf,
    fingerprint: Fingerprint,
    sha256: String,
    /// The largest id in a pre-tokenized file (checked against the vocabulary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_token_id: Option<u32>,
}

/// What [`verify`] learns about a file.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub sha256: String,
    pub max_token_id: Option<u32>,
}

/// The SHA-256 of `input` (and the largest id of a pre-tokenized file), read in full only when
/// its fingerprint differs from the one remembered under `cache_dir/inputs`; an unchanged file
/// costs a stat and [`FINGERPRINT_BYTES`] of reads.
pub(crate) fn verify(input: &InputFile, cache_dir: &Path) -> Result<Verified> {
    let path = &input.path;
    let canon = fs::canonicalize(path).unwrap_or_else(|_| path.clone());
    let dir = cache_dir.join("inputs");
    let mut key_src = canon.to_string_lossy().into_owned();
    key_src.extend(input.format.key_parts().iter().map(|p| format!("\0{p}")));
    let rec_path = dir.join(format!("{}.json", &sha256_hex(key_src.as_bytes())[..32]));
    let fp = fingerprint(path)?;
    let old: Option<Record> = fs::read(&rec_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(r) = old.filter(|r| r.fingerprint == fp) {
        return Ok(Verified {
            sha256: r.sha256,
            max_token_id: r.max_token_id,
        });
    }
    let dtype = match input.format {
        Format::Tokens(d) => Some(d),
        _ => None,
    };
    let (sha256, max_token_id) = full_hash(path, dtype)?;
    fs::create_dir_all(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let rec = Record {
        path: canon,
        fingerprint: fp,
        sha256: sha256.clone(),
        max_token_id,
    };
    let json = serde_json::to_vec_pretty(&rec).expect("record serialises");
    write_atomic(&rec_path, &json)?;
    Ok(Verified {
        sha256,
        max_token_id,
    })
}

/// SHA-256 of the whole file, plus its largest id when it holds raw tokens of `dtype`.
fn full_hash(path: &Path, dtype: Option<Dtype>) -> Result<(String, Option<u32>)> {
    let ctx = || format!("reading {}", path.display());
    let mut f = File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
    if let Some(d) = dtype {
        let len = f.metadata().map_err(io_err(ctx()))?.len();
        if len % d.width() as u64 != 0 {
            return Err(Error::Invalid(format!(
                "{}: {len} bytes is not a whole number of {} tokens; check data.token_dtype",
                path.display(),
                d.index_name()
            )));
        }
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut max: Option<u32> = None;
    let mut total = 0u64;
    loop {
        let mut n = 0;
        // Fill whole buffers so token boundaries stay aligned.
        while n < buf.len() {
            let k = f.read(&mut buf[n..]).map_err(io_err(ctx()))?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
        match dtype {
            Some(Dtype::U16) => {
                let m = buf[..n]
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                    .max();
                max = max.max(m);
            }
            Some(Dtype::U32) => {
                let m = buf[..n]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .max();
                max = max.max(m);
            }
            None => {}
        }
        if n < buf.len() {
            break;
        }
    }
    note_bytes_read(total);
    let max = dtype.map(|_| max.unwrap_or(0));
    Ok((hex::encode(h.finalize()), max))
}

/// Read the documents of `input` as [`Piece`]s: text chunks (cut where [`may_cut`] allows when
/// `cut`, into pieces of about `chunk_bytes`), each document closed by [`Piece::End`] (text
/// files: at separator lines only). `emit` returns `false` to stop early. On-disk bytes read are
/// added to `count` as they are read.
///
/// [`may_cut`]: crate::text::may_cut
pub(crate) fn read_pieces(
    input: &InputFile,
    cut: bool,
    chunk_bytes: usize,
    count: Arc<AtomicU64>,
    emit: &mut dyn FnMut(Piece) -> Result<bool>,
) -> Result<()> {
    let path = &input.path;
    let doc = |text: &str, emit: &mut dyn FnMut(Piece) -> Result<bool>| -> Result<bool> {
        if cut {
            for p in split_document(text, chunk_bytes) {
                if !emit(Piece::Text(p.to_string()))? {
                    return Ok(false);
                }
            }
        } else if !text.is_empty() && !emit(Piece::Text(text.to_string()))? {
            return Ok(false);
        }
        emit(Piece::End)
    };
    match &input.format {
        Format::Text => {
            let reader = open_counted(path, count)?;
            for p in Chunker::new(reader, path, chunk_bytes).with_cuts(cut) {
                if !emit(p?)? {
                    break;
                }
            }
        }
        Format::Jsonl { text_field } => {
            let mut reader = open_counted(path, count)?;
            let mut line = String::new();
            let mut no = 0u64;
            loop {
                line.clear();
                let n = reader.read_line(&mut line).map_err(|e| {
                    Error::Invalid(format!(
                        "{}: line {}: cannot read ({e})",
                        path.display(),
                        no + 1
                    ))
                })?;
                if n == 0 {
                    break;
                }
                no += 1;
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
                    Error::Invalid(format!("{}: line {no}: not JSON ({e})", path.display()))
                })?;
                let text = match v.get(text_field.as_str()) {
                    Some(serde_json::Value::String(s)) => s.as_str(),
                    Some(serde_json::Value::Null) => continue,
                    Some(_) => {
                        return Err(Error::Invalid(format!(
                            "{}: line {no}: field '{text_field}' is not a string",
                            path.display()
                        )))
                    }
                    None => {
                        let fields: Vec<&str> = v
                            .as_object()
                            .map(|o| o.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        return Err(Error::Invalid(format!(
                            "{}: line {no} has no field '{text_field}' (it has: {}); set data.text_field",
                            path.display(),
                            fields.join(", ")
                        )));
                    }
                };
                if !doc(text, emit)? {
                    break;
                }
            }
        }
        Format::Parquet { text_field } => {
            read_parquet(path, text_field, &count, &mut |t| doc(t, emit))?;
        }
        Format::Tokens(_) => {
            return Err(Error::Invalid(format!(
                "{}: pre-tokenized files are not read as text",
                path.display()
            )))
        }
    }
    Ok(())
}

/// Call `each` with every non-null string of column `field` of the parquet file at `path`, row
/// group by row group (streaming), until it returns `false`.
fn read_parquet(
    path: &Path,
    field: &str,
    count: &AtomicU64,
    each: &mut dyn FnMut(&str) -> Result<bool>,
) -> Result<()> {
    use parquet::basic::Type as Physical;
    use parquet::column::reader::get_typed_column_reader;
    use parquet::data_type::ByteArrayType;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use std::sync::atomic::Ordering;

    let perr = |e: parquet::errors::ParquetError| {
        let e = e.to_string();
        match e.split("Disabled feature at compile time: ").nth(1) {
            Some(codec) => Error::Invalid(format!(
                "{}: compressed with {}, which Trellis does not read; rewrite it uncompressed or with snappy (pyarrow's default)",
                path.display(),
                if codec == "flate2" { "gzip" } else { codec }
            )),
            None => Error::Invalid(format!("{}: not a readable parquet file: {e}", path.display())),
        }
    };
    let file = File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
    let reader = SerializedFileReader::new(file).map_err(perr)?;
    let meta = reader.metadata();
    let schema = meta.file_metadata().schema_descr();
    let col = (0..schema.num_columns())
        .find(|&i| schema.column(i).path().string() == field)
        .ok_or_else(|| {
            let names: Vec<String> = (0..schema.num_columns())
                .map(|i| schema.column(i).path().string())
                .collect();
            Error::Invalid(format!(
                "{} has no column '{field}' (it has: {}); set data.text_field",
                path.display(),
                names.join(", ")
            ))
        })?;
    let descr = schema.column(col);
    if descr.physical_type() != Physical::BYTE_ARRAY || descr.max_rep_level() > 0 {
        return Err(Error::Invalid(format!(
            "{}: column '{field}' is not a string column",
            path.display()
        )));
    }
    let max_def = descr.max_def_level();
    const BATCH: usize = 1024;
    for rg in 0..meta.num_row_groups() {
        let rgr = reader.get_row_group(rg).map_err(perr)?;
        let mut cr =
            get_typed_column_reader::<ByteArrayType>(rgr.get_column_reader(col).map_err(perr)?);
        let mut defs: Vec<i16> = Vec::new();
        let mut vals = Vec::new();
        loop {
            defs.clear();
            vals.clear();
            let (records, _, _) = cr
                .read_records(BATCH, Some(&mut defs), None, &mut vals)
                .map_err(perr)?;
            if records == 0 {
                break;
            }
            let mut vi = vals.iter();
            // A required column (max_def 0) has no definition levels: no nulls.
            for r in 0..records {
                if max_def > 0 && defs.get(r).is_some_and(|&d| d < max_def) {
                    continue; // null
                }
                let Some(v) = vi.next() else { break };
                let s = std::str::from_utf8(v.data()).map_err(|e| {
                    Error::Invalid(format!(
                        "{}: column '{field}' holds invalid UTF-8 ({e})",
                        path.display()
                    ))
                })?;
                if !each(s)? {
                    return Ok(());
                }
            }
        }
        count.fetch_add(
            meta.row_group(rg).compressed_size().max(0) as u64,
            Ordering::Relaxed,
        );
    }
    Ok(())
}
