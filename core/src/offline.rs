//! Offline checkpoint tools (no libtorch): grow a checkpoint with a [`GrowthPlan`] and export a
//! Hugging Face `LlamaForCausalLM` directory. `coordctl checkpoint grow` and
//! `coordctl checkpoint export --hf` call these.
use crate::checkpoint::{
    self, finalize_into, moment_names, Checkpoint, GrowthRecord, HostTensor, MaskState, ShardKind,
    TrainerState, TOKENIZER,
};
use crate::config::ModelConfig;
use crate::growth::{plan, GrowthPlan, GrowthSpec, Operator, OptimizerPolicy, TensorSource};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// A small deterministic PRNG: splitmix64 for the bits, Box–Muller for normals. Used for fresh
/// tensors so that an offline grow is reproducible from its seed without a `rand` dependency.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
    spare: Option<f64>,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 {
            state: seed,
            spare: None,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A standard normal sample (Box–Muller; both values of each pair are used).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}

/// FNV-1a of a name: mixes the tensor name into the seed so each tensor's stream is independent
/// of the order tensors are generated in.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A fresh `N(0, std²)` tensor, deterministic in (`seed`, `name`).
pub fn normal_tensor(shape: &[usize], std: f64, seed: u64, name: &str) -> HostTensor {
    let mut rng = SplitMix64::new(seed ^ fnv1a(name));
    let n: usize = shape.iter().product();
    HostTensor {
        shape: shape.to_vec(),
        data: (0..n).map(|_| (rng.normal() * std) as f32).collect(),
    }
}

fn materialize(
    ck: &Checkpoint,
    name: &str,
    shape: &[usize],
    src: &TensorSource,
    seed: u64,
) -> Result<HostTensor> {
    let t = match src {
        TensorSource::Copy(s) => ck.read_full(s)?,
        TensorSource::Zeros => HostTensor::zeros(shape),
        TensorSource::Ones => HostTensor::full(shape, 1.0),
        TensorSource::Normal { std } => normal_tensor(shape, *std, seed, name),
    };
    if t.shape != shape {
        return Err(Error::Checkpoint {
            path: ck.dir.clone(),
            message: format!(
                "growth source for {name} has shape {:?}, the target needs {shape:?}",
                t.shape
            ),
        });
    }
    Ok(t)
}

/// The LR schedule an offline grow installs under `optimizer = reset` (the paper's protocol:
/// fresh AdamW, re-warmup, lower peak LR).
#[derive(Debug, Clone, PartialEq)]
pub struct ResetSchedule {
    /// Post-growth peak LR (the paper: 3e-4).
    pub peak_lr: f64,
    /// Post-growth final LR (the paper: 3e-5).
    pub min_lr: f64,
    /// Re-warmup steps; `None` keeps the checkpoint's warmup length.
    pub warmup_steps: Option<u64>,
}

impl Default for ResetSchedule {
    fn default() -> Self {
        ResetSchedule {
            peak_lr: 3e-4,
            min_lr: 3e-5,
            warmup_steps: None,
        }
    }
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn check_out_dir(in_dir: &Path, out_dir: &Path) -> Result<()> {
    if same_dir(in_dir, out_dir) {
        return Err(Error::Checkpoint {
            path: out_dir.to_path_buf(),
            message: "the output directory is the input checkpoint; choose a new directory".into(),
        });
    }
    if out_dir.exists() {
        let empty = std::fs::read_dir(out_dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(Error::Checkpoint {
                path: out_dir.to_path_buf(),
                message:
                    "the output directory exists and is not empty; remove it or choose another"
                        .into(),
            });
        }
    }
    Ok(())
}

/// Grow the checkpoint at `in_dir` into a new checkpoint at `out_dir` (which must not exist or
/// be empty), with the paper's post-growth schedule under `reset`. See [`grow_checkpoint_with`].
pub fn grow_checkpoint(
    in_dir: &Path,
    out_dir: &Path,
    spec: &GrowthSpec,
    seed: u64,
) -> Result<GrowthPlan> {
    grow_checkpoint_with(in_dir, out_dir, spec, seed, &ResetSchedule::default())
}

/// Grow the checkpoint at `in_dir` into a new, complete checkpoint at `out_dir`:
///
/// * weights by [`plan`] (copies, zeros, ones, fresh normals from `seed`, deterministic);
/// * `optimizer = reset`: no optimizer file, `optimizer_step = 0`, the schedule restarted at the
///   current step with `reset`'s LRs (same end step);
/// * `optimizer = carry`: moments grown with the plan (copies of the source's moments; zero
///   moments for zeroed / ones / fresh tensors), step count and schedule unchanged; the input
///   must hold moments;
/// * `trainer_state.json`: generation + 1, the new model config, a [`GrowthRecord`] appended,
///   for `random` with a ramp a [`MaskState`] starting now; step, tokens, data cursor, layout and
///   `next_growth_stage` unchanged;
/// * the same TP layout as the input, and its `tokenizer.json` if it has one.
pub fn grow_checkpoint_with(
    in_dir: &Path,
    out_dir: &Path,
    spec: &GrowthSpec,
    seed: u64,
    reset: &ResetSchedule,
) -> Result<GrowthPlan> {
    let ck = Checkpoint::open(in_dir)?;
    check_out_dir(in_dir, out_dir)?;
    let plan = plan(&ck.state.model, spec)?;
    if spec.optimizer == OptimizerPolicy::Carry && !ck.has_optim() {
        return Err(Error::InvalidGrowth(format!(
            "optimizer=carry needs Adam moments, but checkpoint {} has none; use optimizer=reset",
            in_dir.display()
        )));
    }
    let tp = ck.state.layout.tp.max(1);

    let mut model = Vec::with_capacity(plan.tensors.len());
    for (name, shape, src) in &plan.tensors {
        model.push((name.clone(), materialize(&ck, name, shape, src, seed)?));
    }
    let mut optim = Vec::new();
    if spec.optimizer == OptimizerPolicy::Carry {
        for (i, (name, shape, _)) in plan.tensors.iter().enumerate() {
            let src = plan.moment_source(i);
            for (k, target) in moment_names(name).into_iter().enumerate() {
                let t = match src {
                    Some(s) => {
                        let m = moment_names(s)[k].clone();
                        if ck
                            .manifest
                            .tensors
                            .get(&m)
                            .is_none_or(|e| e.kind != ShardKind::Optim)
                        {
                            return Err(Error::Checkpoint {
                                path: ck.dir.clone(),
                                message: format!(
                                    "optimizer moment {m} is missing; use optimizer=reset"
                                ),
                            });
                        }
                        materialize(&ck, &target, shape, &TensorSource::Copy(m), seed)?
                    }
                    None => HostTensor::zeros(shape),
                };
                optim.push((target, t));
            }
        }
    }

    let mut state: TrainerState = ck.state.clone();
    let old_layers = plan.old.num_hidden_layers;
    let new_layers = plan.new.num_hidden_layers;
    state.generation += 1;
    state.model = plan.new.clone();
    state.growth_history.push(GrowthRecord {
        generation: state.generation,
        at_step: state.step,
        tokens: state.tokens,
        operator: spec.operator.name().to_string(),
        factor: match spec.operator {
            Operator::StackingList { .. } => (new_layers / old_layers).max(1),
            _ => spec.factor,
        },
        optimizer: spec.optimizer,
        from_layers: old_layers,
        to_layers: new_layers,
    });
    if spec.optimizer == OptimizerPolicy::Reset {
        state.optimizer_step = 0;
        state.schedule.start_step = state.step;
        state.schedule.end_step = state.schedule.end_step.max(state.step + 1);
        state.schedule.peak_lr = reset.peak_lr;
        state.schedule.min_lr = reset.min_lr;
        if let Some(w) = reset.warmup_steps {
            state.schedule.warmup_steps = w;
        }
    }
    state.mask = if plan.mask_ramp_steps > 0 {
        Some(MaskState {
            layers: plan.added_layers.clone(),
            start_step: state.step,
            ramp_steps: plan.mask_ramp_steps,
        })
    } else {
        None
    };

    let tmp = with_suffix(out_dir, ".tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .map_err(|e| Error::io(format!("cannot remove stale {}", tmp.display()), e))?;
    }
    std::fs::create_dir_all(&tmp)
        .map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
    let result = (|| {
        if ck.has_file(TOKENIZER) {
            copy_file(&ck.dir.join(TOKENIZER), &tmp.join(TOKENIZER))?;
        }
        let m: Vec<(&str, &HostTensor)> = model.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let o: Vec<(&str, &HostTensor)> = optim.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let report = checkpoint::write_full_refs(&tmp, tp, &m, &o)?;
        finalize_into(&tmp, out_dir, &state, &[report])
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    Ok(plan)
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).map(|_| ()).map_err(|e| {
        Error::io(
            format!("cannot copy {} to {}", from.display(), to.display()),
            e,
        )
    })
}

/// The Hugging Face `config.json` of a `LlamaForCausalLM` with config `cfg`.
pub fn hf_config(cfg: &ModelConfig) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim(),
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": null,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "tie_word_embeddings": false,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": true,
        "bos_token_id": null,
        "eos_token_id": null,
        "pad_token_id": null,
        "torch_dtype": "float32",
    })
}

/// Export the checkpoint at `in_dir` as a Hugging Face directory at `out_dir` (created if
/// missing; existing export files are replaced): `config.json` (LlamaConfig),
/// `model.safetensors` (full, unsharded tensors with HF names, F32) and `tokenizer.json` if the
/// checkpoint has one. Optimizer moments are not exported.
pub fn export_hf(in_dir: &Path, out_dir: &Path) -> Result<()> {
    export_hf_as(in_dir, out_dir, ExportDtype::F32)
}

/// The dtype of an export's weights (checkpoints always hold fp32 masters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    /// Rounded to nearest (ties to even): half the size, what most Llama checkpoints ship as.
    Bf16,
}

impl ExportDtype {
    pub fn parse(s: &str) -> Result<ExportDtype> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(ExportDtype::F32),
            "bf16" | "bfloat16" => Ok(ExportDtype::Bf16),
            other => Err(Error::InvalidConfig(format!(
                "export dtype '{other}' is unknown; use fp32 or bf16"
            ))),
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
        }
    }
}

/// [`export_hf`] with the weights in `dtype`.
pub fn export_hf_as(in_dir: &Path, out_dir: &Path, dtype: ExportDtype) -> Result<()> {
    let ck = Checkpoint::open(in_dir)?;
    if same_dir(in_dir, out_dir) {
        return Err(Error::Checkpoint {
            path: out_dir.to_path_buf(),
            message: "export into the checkpoint itself would change it; choose another directory"
                .into(),
        });
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::io(format!("cannot create {}", out_dir.display()), e))?;
    let mut tensors = Vec::new();
    for (name, _) in ck.state.model.tensor_shapes() {
        let t = ck.read_full(&name)?;
        tensors.push((name, t));
    }
    let refs: Vec<(&str, &HostTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let st_tmp = out_dir.join(".model.safetensors.tmp");
    match dtype {
        ExportDtype::F32 => {
            checkpoint::write_safetensors(&st_tmp, &refs)?;
        }
        ExportDtype::Bf16 => checkpoint::write_safetensors_bf16(&st_tmp, &refs)?,
    }
    rename(&st_tmp, &out_dir.join("model.safetensors"))?;
    let mut config = hf_config(&ck.state.model);
    config["torch_dtype"] = serde_json::Value::from(dtype.torch_name());
    let json = serde_json::to_vec_pretty(&config)
        .map_err(|e| Error::InvalidConfig(format!("cannot serialise config.json: {e}")))?;
    let cfg_tmp = out_dir.join(".config.json.tmp");
    checkpoint::write_file_synced(&cfg_tmp, &json)?;
    rename(&cfg_tmp, &out_dir.join("config.json"))?;
    if ck.has_file(TOKENIZER) {
        copy_file(&ck.dir.join(TOKENIZER), &out_dir.join(TOKENIZER))?;
    }
    Ok(())
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| {
        Error::io(
            format!("cannot rename {} to {}", from.display(), to.display()),
            e,
        )
    })
}
