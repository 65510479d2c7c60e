//! The byte-level BPE tokenizer (Hugging Face `tokenizers`).
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::text::{open_text, Chunker, Piece, CHUNK_BYTES, EOS_TOKEN};
use crate::util::write_atomic;
use crate::{Error, Result};

/// End-of-sequence tokens looked for (in this order) in a loaded `tokenizer.json`.
const EOS_CANDIDATES: &[&str] = &[EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>"];

/// A loaded tokenizer (Hugging Face `tokenizer.json`).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: u32,
    vocab_size: usize,
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
        let mut texts = Vec::new();
        let mut bytes = 0usize;
        for piece in
            Chunker::new(open_text(text_file)?, text_file, CHUNK_BYTES).with_limit(max_bytes)
        {
            if let Piece::Text(t) = piece? {
                if !t.trim().is_empty() {
                    bytes += t.len();
                    texts.push(t);
                }
            }
        }
        if texts.is_empty() {
            return Err(Error::Invalid(format!(
                "cannot train a tokenizer: corpus {} is empty",
                text_file.display()
            )));
        }
        crate::util::note_training();
        let t0 = std::time::Instant::now();
        eprintln!(
            "trellis-data: training byte-level BPE (vocab {vocab_size}) on {:.1} MB of {}",
            bytes as f64 / 1e6,
            text_file.display()
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
        Ok(Tokenizer {
            inner,
            eos_id,
            vocab_size,
        })
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
