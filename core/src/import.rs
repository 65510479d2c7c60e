//! `coordctl checkpoint import --hf`: a Hugging Face `LlamaForCausalLM` directory
//! (`config.json`, `model.safetensors` or a sharded `model.safetensors.index.json`, bf16 / fp16 /
//! fp32, and its tokenizer files) becomes a Trellis checkpoint at step 0 with fp32 masters and no
//! optimizer state, which `[checkpoint] init_from` starts a job from (docs/models.md).
//!
//! What the model cannot represent is refused with one line naming it: another architecture,
//! biases, an activation other than SiLU, a RoPE scaling other than `llama3`, missing, unknown
//! or misshapen tensors. Tensors are converted one at a time while the checkpoint file is
//! written (the source files are memory-mapped), so a 1B model never has two copies in memory.
use crate::checkpoint::{
    self, file_digest, finalize_into, shard_dim, shard_file_name, FileEntry, Layout, ScheduleState,
    ShardKind, ShardReport, SliceEntry, TensorEntry, TrainerState, HF_SIDECARS, TOKENIZER,
};
use crate::config::{names, ModelConfig, RopeScaling, RopeType};
use crate::{Error, Result};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What an import produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportReport {
    pub config: ModelConfig,
    /// Tensors written.
    pub tensors: usize,
    pub parameters: u64,
    /// The source dtypes seen (`BF16`, `F16`, `F32`).
    pub source_dtypes: BTreeSet<String>,
    /// Source tensors deliberately not imported (a tied `lm_head.weight`, RoPE buffers).
    pub skipped: Vec<String>,
    /// Whether `tokenizer.json` was copied.
    pub tokenizer: bool,
}

fn refuse(path: &Path, message: impl Into<String>) -> Error {
    Error::Import {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            refuse(
                path,
                "the file is missing; point --hf at a Hugging Face model directory",
            )
        } else {
            Error::io(format!("cannot read {}", path.display()), e)
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| refuse(path, format!("not valid JSON: {e}")))
}

/// The [`ModelConfig`] of a Hugging Face Llama `config.json`, or a one-line refusal.
pub fn config_from_hf(path: &Path, c: &Value) -> Result<ModelConfig> {
    let field = |k: &str| c.get(k).filter(|v| !v.is_null());
    let size = |k: &str| -> Result<Option<usize>> {
        match field(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| refuse(path, format!("{k} = {v} is not a non-negative integer"))),
        }
    };
    let required = |k: &str| -> Result<usize> {
        size(k)?.ok_or_else(|| refuse(path, format!("{k} is missing from config.json")))
    };
    let float = |v: &Value, k: &str| -> Result<f64> {
        v.as_f64()
            .ok_or_else(|| refuse(path, format!("{k} = {v} is not a number")))
    };
    let flag = |k: &str| field(k).and_then(Value::as_bool).unwrap_or(false);

    match field("architectures") {
        Some(a) => {
            let archs: Vec<&str> = a
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if archs != ["LlamaForCausalLM"] {
                return Err(refuse(
                    path,
                    format!("architectures is {a}; only LlamaForCausalLM can be imported"),
                ));
            }
        }
        None => {
            let t = field("model_type").and_then(Value::as_str).unwrap_or("");
            if t != "llama" {
                return Err(refuse(
                    path,
                    format!("model_type is '{t}' and architectures is missing; only LlamaForCausalLM can be imported"),
                ));
            }
        }
    }
    for k in ["attention_bias", "mlp_bias"] {
        if flag(k) {
            return Err(refuse(
                path,
                format!(
                    "{k} is true; Trellis's Llama has no biases, so this model cannot be imported"
                ),
            ));
        }
    }
    if let Some(act) = field("hidden_act") {
        if act.as_str() != Some("silu") {
            return Err(refuse(
                path,
                format!("hidden_act is {act}; only silu (SwiGLU) can be imported"),
            ));
        }
    }

    let hidden_size = required("hidden_size")?;
    let heads = required("num_attention_heads")?;
    // The v5 `rope_parameters` dict (with `rope_theta` inside), else the v4 `rope_scaling`
    // dict with a top-level `rope_theta`.
    let (rope, rope_key) = match field("rope_parameters") {
        Some(r) => (Some(r), "rope_parameters"),
        None => (field("rope_scaling"), "rope_scaling"),
    };
    let mut rope_theta = match field("rope_theta") {
        Some(v) => float(v, "rope_theta")?,
        None => 10000.0,
    };
    let max_pos = size("max_position_embeddings")?.unwrap_or(2048);
    let mut rope_scaling = None;
    if let Some(r) = rope {
        let get = |k: &str| r.get(k).filter(|v| !v.is_null());
        if let Some(t) = get("rope_theta") {
            rope_theta = float(t, "rope_theta")?;
        }
        if let Some(p) = get("partial_rotary_factor") {
            if p.as_f64() != Some(1.0) {
                return Err(refuse(
                    path,
                    format!("{rope_key}.partial_rotary_factor is {p}; only full rotary embeddings can be imported"),
                ));
            }
        }
        let kind = get("rope_type")
            .or_else(|| get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        match kind {
            "default" => {}
            "llama3" => {
                let num = |k: &str| -> Result<f64> {
                    float(
                        get(k).ok_or_else(|| {
                            refuse(path, format!("{rope_key} (llama3) has no {k}"))
                        })?,
                        k,
                    )
                };
                let original = match get("original_max_position_embeddings") {
                    Some(v) => v.as_u64().ok_or_else(|| {
                        refuse(
                            path,
                            format!("original_max_position_embeddings = {v} is not an integer"),
                        )
                    })? as usize,
                    None => max_pos,
                };
                rope_scaling = Some(RopeScaling {
                    rope_type: RopeType::Llama3,
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: original,
                });
            }
            other => {
                return Err(refuse(
                    path,
                    format!("{rope_key} type '{other}' is not supported; Trellis implements default and llama3 RoPE"),
                ))
            }
        }
    }
    let cfg = ModelConfig {
        vocab_size: required("vocab_size")?,
        hidden_size,
        intermediate_size: required("intermediate_size")?,
        num_hidden_layers: required("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: size("num_key_value_heads")?.unwrap_or(heads),
        max_position_embeddings: max_pos,
        rope_theta,
        rms_norm_eps: match field("rms_norm_eps") {
            Some(v) => float(v, "rms_norm_eps")?,
            None => 1e-6, // LlamaConfig's default
        },
        tie_word_embeddings: flag("tie_word_embeddings"),
        head_dim: size("head_dim")?,
        rope_scaling,
    }
    .canonical();
    cfg.validate()
        .map_err(|e| refuse(path, format!("the model cannot be represented: {e}")))?;
    Ok(cfg)
}

/// Where each source tensor lives: name → file (one `model.safetensors`, or the index's map).
fn weight_files(in_dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let index = in_dir.join("model.safetensors.index.json");
    let single = in_dir.join("model.safetensors");
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| refuse(&index, "has no weight_map object"))?;
        let mut out = BTreeMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .filter(|f| !f.is_empty() && !f.contains('/') && !f.contains('\\') && *f != "..")
                .ok_or_else(|| {
                    refuse(
                        &index,
                        format!("weight_map[{name}] = {file} is not a file name in the directory"),
                    )
                })?;
            out.insert(name.clone(), in_dir.join(file));
        }
        return Ok(out);
    }
    if !single.is_file() {
        return Err(refuse(
            in_dir,
            "has neither model.safetensors nor model.safetensors.index.json; only safetensors weights can be imported",
        ));
    }
    let map = map_file(&single)?;
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| refuse(&single, format!("not a valid safetensors file: {e}")))?;
    Ok(st
        .names()
        .into_iter()
        .map(|n| (n.to_string(), single.clone()))
        .collect())
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    // SAFETY: the import only reads; a source changed underneath would give wrong values but
    // every shape and dtype is checked before use.
    unsafe { memmap2::Mmap::map(&f) }
        .map_err(|e| Error::io(format!("cannot mmap {}", path.display()), e))
}

/// Whether a source tensor is a buffer that older exports saved but the model recomputes.
fn is_buffer(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// A source tensor seen through its file's bytes; converted to little-endian f32 on demand.
struct Converted<'a> {
    shape: Vec<usize>,
    dtype: safetensors::Dtype,
    bytes: &'a [u8],
}

/// An IEEE half to f32 (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut m = man;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

impl Converted<'_> {
    fn f32_bytes(&self) -> Vec<u8> {
        use safetensors::Dtype;
        match self.dtype {
            Dtype::F32 => self.bytes.to_vec(),
            Dtype::BF16 => self
                .bytes
                .chunks_exact(2)
                .flat_map(|c| {
                    f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16).to_le_bytes()
                })
                .collect(),
            Dtype::F16 => self
                .bytes
                .chunks_exact(2)
                .flat_map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])).to_le_bytes())
                .collect(),
            _ => unreachable!("dtype checked before conversion"),
        }
    }
}

impl safetensors::View for &Converted<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(self.f32_bytes())
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

/// Import the Hugging Face directory `in_dir` into a new checkpoint at `out_dir` (which must
/// not exist or be empty): step 0, generation 0, no optimizer state, layout dp = tp = 1, the
/// model's tensors in fp32, `tokenizer.json` and the HF tokenizer/generation configs copied.
pub fn import_hf(in_dir: &Path, out_dir: &Path) -> Result<ImportReport> {
    if !in_dir.is_dir() {
        return Err(refuse(
            in_dir,
            "is not a directory; point --hf at a Hugging Face model directory",
        ));
    }
    crate::offline::check_out_dir(in_dir, out_dir)?;
    let cfg_path = in_dir.join("config.json");
    let cfg = config_from_hf(&cfg_path, &read_json(&cfg_path)?)?;
    let files = weight_files(in_dir)?;

    // Every source tensor must be a model tensor (or a known extra); every model tensor must be
    // there with its shape and a float dtype.
    let want: BTreeMap<String, Vec<usize>> = cfg.tensor_shapes().into_iter().collect();
    let mut skipped = Vec::new();
    for name in files.keys() {
        if want.contains_key(name) {
            continue;
        }
        if name.ends_with(".bias") {
            return Err(refuse(
                in_dir,
                format!("tensor {name} is a bias; Trellis's Llama has no biases, so this model cannot be imported"),
            ));
        }
        if is_buffer(name) || (name == names::LM_HEAD && cfg.tie_word_embeddings) {
            skipped.push(name.clone());
            continue;
        }
        return Err(refuse(
            in_dir,
            format!(
                "tensor {name} is not part of a {}-layer LlamaForCausalLM with this config.json; only Llama weights can be imported",
                cfg.num_hidden_layers
            ),
        ));
    }
    if let Some((name, shape)) = want.iter().find(|(n, _)| !files.contains_key(*n)) {
        return Err(refuse(
            in_dir,
            format!("tensor {name} (shape {shape:?}) is missing from the weights"),
        ));
    }

    let maps: BTreeMap<&PathBuf, memmap2::Mmap> = files
        .values()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|p| {
            if !p.is_file() {
                return Err(refuse(p, "is named by the weight index but missing"));
            }
            Ok((p, map_file(p)?))
        })
        .collect::<Result<_>>()?;
    let parsed: BTreeMap<&PathBuf, safetensors::SafeTensors> = maps
        .iter()
        .map(|(p, m)| {
            safetensors::SafeTensors::deserialize(m)
                .map(|st| (*p, st))
                .map_err(|e| refuse(p, format!("not a valid safetensors file: {e}")))
        })
        .collect::<Result<_>>()?;
    let mut source_dtypes = BTreeSet::new();
    let mut views = Vec::with_capacity(want.len());
    for (name, shape) in cfg.tensor_shapes() {
        let file = &files[&name];
        let view = parsed[file].tensor(&name).map_err(|e| {
            refuse(
                file,
                format!("tensor {name} listed in the index is not in this file: {e}"),
            )
        })?;
        if view.shape() != shape.as_slice() {
            return Err(refuse(
                file,
                format!(
                    "tensor {name} has shape {:?} but config.json implies {shape:?}",
                    view.shape()
                ),
            ));
        }
        let dtype = view.dtype();
        if !matches!(
            dtype,
            safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16
        ) {
            return Err(refuse(
                file,
                format!(
                    "tensor {name} is {dtype:?}; only F32, BF16 and F16 weights can be imported"
                ),
            ));
        }
        source_dtypes.insert(format!("{dtype:?}"));
        views.push((
            name,
            Converted {
                shape,
                dtype,
                bytes: view.data(),
            },
        ));
    }

    let tmp = crate::offline::with_suffix(out_dir, ".tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .map_err(|e| Error::io(format!("cannot remove stale {}", tmp.display()), e))?;
    }
    std::fs::create_dir_all(&tmp)
        .map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
    let state = TrainerState {
        job: format!(
            "import-{}",
            in_dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "hf".into())
        ),
        step: 0,
        tokens: 0,
        generation: 0,
        model: cfg.clone(),
        layout: Layout { dp: 1, tp: 1 },
        data_cursor: 0,
        seed: 0,
        // A job started from a step-0 checkpoint trains with its own [train] schedule.
        schedule: ScheduleState {
            start_step: 0,
            end_step: 1,
            peak_lr: 3e-4,
            min_lr: 3e-5,
            warmup_steps: 0,
        },
        optimizer_step: 0,
        next_growth_stage: 0,
        growth_history: Vec::new(),
        mask: None,
    };
    let mut tokenizer = false;
    let result = (|| {
        for name in std::iter::once(TOKENIZER).chain(HF_SIDECARS.iter().copied()) {
            let src = in_dir.join(name);
            if src.is_file() {
                crate::offline::copy_file(&src, &tmp.join(name))?;
                tokenizer |= name == TOKENIZER;
            }
        }
        let report = write_converted(&tmp, &views)?;
        finalize_into(&tmp, out_dir, &state, &[report])
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    Ok(ImportReport {
        parameters: cfg.num_parameters(),
        config: cfg,
        tensors: views.len(),
        source_dtypes,
        skipped,
        tokenizer,
    })
}

/// Write the model shard file of a TP = 1 checkpoint, converting each tensor as it is written.
fn write_converted(tmp: &Path, views: &[(String, Converted)]) -> Result<ShardReport> {
    let file = shard_file_name(ShardKind::Model, 0, 1);
    let path = tmp.join(&file);
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize_to_file(views.iter().map(|(n, v)| (n.as_str(), v)), metadata, &path)
        .map_err(|e| Error::Checkpoint {
            path: path.clone(),
            message: format!("cannot write safetensors file: {e}"),
        })?;
    checkpoint::fsync_path(&path)?;
    let (size, sha256) = file_digest(&path)?;
    let mut report = ShardReport {
        files: vec![FileEntry {
            path: file.clone(),
            size,
            sha256,
        }],
        tensors: BTreeMap::new(),
    };
    for (name, v) in views {
        let dim = shard_dim(name);
        report.tensors.insert(
            name.clone(),
            TensorEntry {
                kind: ShardKind::Model,
                shape: v.shape.clone(),
                dtype: checkpoint::DTYPE.to_string(),
                shard_dim: dim,
                slices: vec![SliceEntry {
                    file: file.clone(),
                    offset: 0,
                    length: match dim {
                        Some(d) => v.shape[d],
                        None => v.shape.first().copied().unwrap_or(1),
                    },
                }],
            },
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact() {
        for (h, f) in [
            (0x0000u16, 0.0f32),
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x7bff, 65504.0),
            (0x0001, 5.960_464_5e-8),
            (0x0400, 6.103_515_6e-5),
            (0x3555, 0.333_251_95),
        ] {
            assert_eq!(f16_to_f32(h), f, "{h:#06x}");
        }
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    }
}
