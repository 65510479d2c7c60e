//! `trellis-worker eval`: the mean next-token loss of a checkpoint on a text file.
//!
//! The text is tokenized with the checkpoint's `tokenizer.json` and cut into non-overlapping
//! windows of `seq_len + 1` tokens at stride `seq_len` (the last, shorter window included when
//! it has at least 2 tokens); the loss is the mean over every predicted token. The HF-export
//! test computes the same quantity with `transformers`.
use crate::trainer::load_model;
use crate::{Error, Result};
use std::path::Path;
use tch::{Device, Tensor};
use trellis_core::checkpoint::Checkpoint;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalReport {
    pub checkpoint: String,
    pub text: String,
    pub loss: f64,
    /// Predicted tokens the loss averages over.
    pub tokens: u64,
    pub windows: u64,
    pub seq_len: usize,
    pub step: u64,
    pub num_hidden_layers: usize,
}

/// The tokenizer a checkpoint was trained with (its `tokenizer.json`), checked against the
/// model's `vocab_size`.
pub fn checkpoint_tokenizer(dir: &Path, vocab_size: usize) -> Result<trellis_data::Tokenizer> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(Error::Invalid(format!(
            "checkpoint {} has no tokenizer.json; copy the job's tokenizer.json into it",
            dir.display()
        )));
    }
    let tok = trellis_data::Tokenizer::load(&tok_path)?;
    if tok.vocab_size() != vocab_size {
        return Err(Error::Invalid(format!(
            "{} has {} tokens but the model's vocab_size is {vocab_size}; use the tokenizer the checkpoint was trained with",
            tok_path.display(),
            tok.vocab_size(),
        )));
    }
    Ok(tok)
}

/// Evaluate checkpoint `dir` on `text_file`. `seq_len` defaults to the model's
/// `max_position_embeddings`.
pub fn eval_checkpoint(
    dir: &Path,
    text_file: &Path,
    seq_len: Option<usize>,
    device: Device,
) -> Result<EvalReport> {
    let ck = Checkpoint::open(dir)?;
    let cfg = ck.state.model.clone();
    let tok = checkpoint_tokenizer(dir, cfg.vocab_size)?;
    let seq = seq_len.unwrap_or(cfg.max_position_embeddings);
    if seq < 1 || seq > cfg.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "--seq-len {seq} must be between 1 and the model's max_position_embeddings {}",
            cfg.max_position_embeddings
        )));
    }
    let text = std::fs::read_to_string(text_file)
        .map_err(|e| Error::io(format!("cannot read {}", text_file.display()), e))?;
    let ids: Vec<i64> = tok.encode(&text)?.into_iter().map(i64::from).collect();
    if ids.len() < 2 {
        return Err(Error::Invalid(format!(
            "{} has fewer than 2 tokens; nothing to evaluate",
            text_file.display()
        )));
    }
    let (model, _) = load_model(&ck, device)?;
    let mut total = 0.0f64;
    let mut count = 0u64;
    let mut windows = 0u64;
    tch::no_grad(|| {
        let mut start = 0usize;
        while start + 1 < ids.len() {
            let end = (start + seq + 1).min(ids.len());
            let w = &ids[start..end];
            let n = (w.len() - 1) as i64;
            let t = Tensor::from_slice(w).view([1, n + 1]).to_device(device);
            let l = model
                .loss(&t.narrow(1, 0, n), &t.narrow(1, 1, n))
                .double_value(&[]);
            total += l * n as f64;
            count += n as u64;
            windows += 1;
            start += seq;
        }
    });
    Ok(EvalReport {
        checkpoint: dir.display().to_string(),
        text: text_file.display().to_string(),
        loss: total / count as f64,
        tokens: count,
        windows,
        seq_len: seq,
        step: ck.state.step,
        num_hidden_layers: cfg.num_hidden_layers,
    })
}
