//! The byte-level BPE tokenizer (Hugging Face `tokenizers`).
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::source::{read_pieces, Format, InputFile};
use crate::text::{Chunker, Piece, CHUNK_BYTES, EOS_TOKEN};
use crate::util::write_atomic;
use crate::{Error, Result};

/// End-of-sequence tokens looked for (in this order) in a loaded `tokenizer.json`.
const EOS_CANDIDATES: &[&str] = &[EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>"];

/// A loaded tokenizer (Hugging Face `tokenizer.json`).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: u32,
    vocab_size: usize,
    /// Ids the post-processor puts before / after every document (e.g. Llama 3's
    /// `<|begin_of_text|>`); empty for a plain byte-level BPE.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// Whether text may be cut inside a document where [`crate::text::may_cut`] allows (checked
    /// on a probe text); if not, documents are encoded whole.
    cut_ok: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn tk_err(context: &str) -> impl FnOnce(tokenizers::Error) -> Error + '_ {
    move |e| Error::Tokenizer(format!("{context}: {e}"))
}

impl Tokenizer {
    /// Train a byte-level BPE (`add_prefix_space = false`, exact round trip) of `vocab_size` on
    /// `text_file`; `<|endoftext|>` is a special token.
    pub fn train(text_file: &Path, vocab_size: usize) -> Result<Tokenizer> {
        Self::train_limited(text_file, vocab_size, None)
    }

    /// [`Tokenizer::train`] on at most the first `max_bytes` (decompressed) bytes of the file,
    /// cut at a line end. Documents are split at `<|endoftext|>` lines as in tokenization.
    /// Deterministic: the same text and size give the same `tokenizer.json`.
    pub fn train_limited(
        text_file: &Path,
        vocab_size: usize,
        max_bytes: Option<u64>,
    ) -> Result<Tokenizer> {
        let min = ByteLevel::alphabet().len() + 1;
        if vocab_size < min {
            return Err(Error::Invalid(format!(
                "vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least \
                 {min} (256 bytes + {EOS_TOKEN})"
            )));
        }
        if vocab_size > u32::MAX as usize {
            return Err(Error::Invalid(format!(
                "vocab_size {vocab_size} is too large"
            )));
        }
        crate::util::require_file(text_file, "training text")?;
        let input = InputFile {
            path: text_file.to_path_buf(),
            format: Format::Text,
        };
        Self::train_inputs(
            &[(input, max_bytes)],
            vocab_size,
            &text_file.display().to_string(),
        )
    }

    /// Train on the documents of `inputs`, at most `budget` (decompressed) bytes of each (cut at
    /// a line end in text files, at a document end otherwise). `what` names the corpus.
    pub(crate) fn train_inputs(
        inputs: &[(InputFile, Option<u64>)],
        vocab_size: usize,
        what: &str,
    ) -> Result<Tokenizer> {
        let min = ByteLevel::alphabet().len() + 1;
        if vocab_size < min {
            return Err(Error::Invalid(format!(
                "vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least \
                 {min} (256 bytes + {EOS_TOKEN})"
            )));
        }
        let mut texts = Vec::new();
        let mut bytes = 0usize;
        for (input, budget) in inputs {
            let count = Arc::new(AtomicU64::new(0));
            let mut taken = 0u64;
            let res = if input.format == Format::Text {
                // Text: exactly the first `budget` bytes, cut at a line end.
                let reader = crate::text::open_counted(&input.path, count.clone())?;
                let mut r = Ok(());
                for piece in Chunker::new(reader, &input.path, CHUNK_BYTES).with_limit(*budget) {
                    match piece {
                        Ok(Piece::Text(t)) => {
                            if !t.trim().is_empty() {
                                bytes += t.len();
                                texts.push(t);
                            }
                        }
                        Ok(Piece::End) => {}
                        Err(e) => {
                            r = Err(e);
                            break;
                        }
                    }
                }
                r
            } else {
                read_pieces(input, true, CHUNK_BYTES, count.clone(), &mut |p| {
                    if let Piece::Text(t) = p {
                        taken += t.len() as u64;
                        if !t.trim().is_empty() {
                            bytes += t.len();
                            texts.push(t);
                        }
                    }
                    Ok(budget.is_none_or(|b| taken < b))
                })
            };
            crate::util::note_bytes_read(count.load(Ordering::Relaxed));
            res?;
        }
        if texts.is_empty() {
            return Err(Error::Invalid(format!(
                "cannot train a tokenizer: corpus {what} is empty"
            )));
        }
        crate::util::note_training();
        let t0 = std::time::Instant::now();
        eprintln!(
            "trellis-data: training byte-level BPE (vocab {vocab_size}) on {:.1} MB of {}",
            bytes as f64 / 1e6,
            what
        );
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_decoder(Some(ByteLevelDecoder::default()));
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        inner
            .train(&mut trainer, texts.iter())
            .map_err(tk_err("training"))?;
        drop(texts);
        // Round-trip through JSON so a trained tokenizer behaves exactly like a loaded one.
        let json = inner.to_string(false).map_err(tk_err("serializing"))?;
        let tok = Self::from_json(json.as_bytes(), "trained tokenizer")?;
        eprintln!(
            "trellis-data: trained BPE: {} tokens in {:.1} s",
            tok.vocab_size(),
            t0.elapsed().as_secs_f64()
        );
        Ok(tok)
    }

    pub fn load(path: &Path) -> Result<Tokenizer> {
        crate::util::require_file(path, "tokenizer")?;
        let bytes = std::fs::read(path).map_err(crate::text::io_err(format!(
            "cannot read tokenizer {}",
            path.display()
        )))?;
        Self::from_json(&bytes, &path.display().to_string())
    }

    /// Parse a `tokenizer.json` held in memory (`what` names it in errors).
    pub fn from_json(bytes: &[u8], what: &str) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::Tokenizer(format!("{what}: not a valid tokenizer.json: {e}")))?;
        let eos_id = EOS_CANDIDATES
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{what}: no end-of-text token (looked for {})",
                    EOS_CANDIDATES.join(", ")
                ))
            })?;
        // Ids of a foreign tokenizer may have gaps: the size is one past the largest id.
        let max_id = inner.get_vocab(true).values().copied().max().unwrap_or(0) as usize;
        let vocab_size = inner.get_vocab_size(true).max(max_id + 1);
        let mut tok = Tokenizer {
            inner,
            eos_id,
            vocab_size,
            prefix: Vec::new(),
            suffix: Vec::new(),
            cut_ok: false,
        };
        (tok.prefix, tok.suffix) = tok.probe_affixes(what)?;
        tok.cut_ok = tok.probe_cuts()?;
        Ok(tok)
    }

    /// The ids the post-processor adds around a document: encode a probe with and without
    /// special tokens and see what surrounds it.
    fn probe_affixes(&self, what: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let probe = "Probe text.";
        let plain = self.encode(probe)?;
        let full = self
            .inner
            .encode_fast(probe, true)
            .map_err(tk_err("encoding"))?
            .get_ids()
            .to_vec();
        let at = (0..=full.len().saturating_sub(plain.len()))
            .find(|&i| full[i..].starts_with(&plain))
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{what}: its post-processor changes a document's own tokens; only templates that add special tokens around it (BOS/EOS) are supported"
                ))
            })?;
        Ok((full[..at].to_vec(), full[at + plain.len()..].to_vec()))
    }

    /// Whether cutting documents where [`crate::text::may_cut`] allows gives exactly the ids of
    /// encoding them whole, on a probe with every kind of cut point (words, digits, punctuation,
    /// quotes, contractions, non-Latin scripts, emoji). Tokenizers that add a prefix space or
    /// normalise across lines fail it and encode documents whole.
    fn probe_cuts(&self) -> Result<bool> {
        const PROBE: &str = "First line.\nSecond line\nThird, with 'quotes' and \"more\".\n\
            It's here\n's a contraction\n12 apples\n3456789\nx\n-- dash\n(paren)\n\
            Déjà vu\nÀ la carte\n日本語\nテキスト\n🎉 emoji\n👍🏽\n#hash\n@at\n\
            trailing:\n  indented\n\ttab\nend!\n?why\n...\n!!!\nUPPER\nlower\n\
            a\n\nb\n \nc\r\nd\nİstanbul\nΣίσυφος\nпривет\n42\n0x1F\n\u{a0}nbsp\nlast";
        let whole = self.encode(PROBE)?;
        let pieces = crate::text::split_document(PROBE, 1);
        let cut: Vec<u32> = self.encode_batch(pieces)?.concat();
        Ok(cut == whole)
    }

    /// Ids the post-processor adds before / after each document.
    pub fn document_affixes(&self) -> (&[u32], &[u32]) {
        (&self.prefix, &self.suffix)
    }

    /// Whether documents may be cut at line ends for parallel encoding (see
    /// [`crate::text::may_cut`]); checked against this tokenizer when it is loaded.
    pub fn cuts_documents(&self) -> bool {
        self.cut_ok
    }

    /// The standard `tokenizer.json` text (what [`Tokenizer::save`] writes).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(tk_err("serializing"))
    }

    /// Write `tokenizer.json` (atomically: temp file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_json()?.as_bytes())
    }

    /// Full vocabulary size, special tokens included (one past the largest id).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The token of `id`, if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(tk_err("encoding"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encode many texts in parallel (rayon); one id list per text.
    pub fn encode_batch(&self, texts: Vec<&str>) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .inner
            .encode_batch_fast(texts, false)
            .map_err(tk_err("encoding"))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Decode ids to text (special tokens kept, so `decode(encode(t)) == t`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&i| self.inner.id_to_token(i).is_none()) {
            return Err(Error::Tokenizer(format!(
                "decoding: id {bad} is not in the vocabulary (size {})",
                self.vocab_size
            )));
        }
        self.inner.decode(ids, false).map_err(tk_err("decoding"))
    }
}
