//! Offline checkpoint tools (no libtorch): grow a checkpoint with a [`GrowthPlan`] and export a
//! Hugging Face `LlamaForCausalLM` directory. `coordctl checkpoint grow` and
//! `coordctl checkpoint export --hf` call these (`import --hf`: [`crate::import`]).
use crate::checkpoint::{
    self, finalize_into, moment_names, Checkpoint, GrowthRecord, HostTensor, MaskState, ShardKind,
    TrainerState, HF_SIDECARS, TOKENIZER,
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

pub(crate) fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
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

pub(crate) fn check_out_dir(in_dir: &Path, out_dir: &Path) -> Result<()> {
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
/// * the same TP layout as the input, and its `tokenizer.json` (and the HF tokenizer /
///   generation configs an import kept) if it has them.
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
        for name in std::iter::once(TOKENIZER).chain(HF_SIDECARS.iter().copied()) {
            if ck.has_file(name) {
                copy_file(&ck.dir.join(name), &tmp.join(name))?;
            }
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

pub(crate) fn copy_file(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).map(|_| ()).map_err(|e| {
        Error::io(
            format!("cannot copy {} to {}", from.display(), to.display()),
            e,
        )
    })
}

/// The Hugging Face `config.json` of a `LlamaForCausalLM` with config `cfg` (no special
/// tokens known; [`export_hf`] fills them from the tokenizer).
pub fn hf_config(cfg: &ModelConfig) -> serde_json::Value {
    crate::hf::config_json(cfg, &crate::hf::SpecialTokens::default(), "float32")
}

/// Export the checkpoint at `in_dir` as a Hugging Face directory at `out_dir` with fp32 weights
/// and the default shard size. See [`export_hf_with`].
pub fn export_hf(in_dir: &Path, out_dir: &Path) -> Result<()> {
    export_hf_with(in_dir, out_dir, &ExportOptions::default())
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
    fn bytes(self) -> u64 {
        match self {
            ExportDtype::F32 => 4,
            ExportDtype::Bf16 => 2,
        }
    }
}

/// How [`export_hf_with`] writes the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    pub dtype: ExportDtype,
    /// Above this many bytes of weights, `model-0000i-of-0000n.safetensors` shards with a
    /// `model.safetensors.index.json` (as `transformers`' `max_shard_size`); a tensor larger
    /// than it gets a shard of its own.
    pub max_shard_size: u64,
}

/// `transformers`' default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            dtype: ExportDtype::F32,
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
        }
    }
}

/// [`export_hf`] with the weights in `dtype`.
pub fn export_hf_as(in_dir: &Path, out_dir: &Path, dtype: ExportDtype) -> Result<()> {
    export_hf_with(
        in_dir,
        out_dir,
        &ExportOptions {
            dtype,
            ..ExportOptions::default()
        },
    )
}

/// Name of shard `i` (0-based) of `n`, as `transformers` names them.
fn shard_name(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
}

fn is_weight_file(name: &str) -> bool {
    name == "model.safetensors"
        || name == INDEX
        || (name.starts_with("model-") && name.ends_with(".safetensors") && name.contains("-of-"))
}

const INDEX: &str = "model.safetensors.index.json";

fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> Result<()> {
    let json = serde_json::to_vec_pretty(v)
        .map_err(|e| Error::InvalidConfig(format!("cannot serialise {name}: {e}")))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    checkpoint::write_file_synced(&tmp, &json)?;
    rename(&tmp, &dir.join(name))
}

/// Export the checkpoint at `in_dir` as a Hugging Face directory at `out_dir` (created if
/// missing; earlier export files there are replaced) that `AutoConfig`,
/// `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load:
///
/// * the weights with HF names in `opts.dtype`: `model.safetensors`, or shards and
///   `model.safetensors.index.json` above `opts.max_shard_size`; a tied model has no
///   `lm_head.weight`. Read and written one shard at a time; optimizer moments are not exported;
/// * `config.json` (LlamaConfig: head_dim, tie_word_embeddings, rope_theta / rope_scaling, the
///   tokenizer's BOS / EOS ids);
/// * `tokenizer.json`, and `tokenizer_config.json` / `special_tokens_map.json` /
///   `generation_config.json`: the checkpoint's own (kept from an import) or made from the
///   tokenizer's special tokens ([`crate::hf::special_tokens`]).
pub fn export_hf_with(in_dir: &Path, out_dir: &Path, opts: &ExportOptions) -> Result<()> {
    let ck = Checkpoint::open(in_dir)?;
    if same_dir(in_dir, out_dir) {
        return Err(Error::Checkpoint {
            path: out_dir.to_path_buf(),
            message: "export into the checkpoint itself would change it; choose another directory"
                .into(),
        });
    }
    if opts.max_shard_size == 0 {
        return Err(Error::InvalidConfig(
            "--max-shard-size must be positive".into(),
        ));
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::io(format!("cannot create {}", out_dir.display()), e))?;
    let cfg = &ck.state.model;

    // Shards: consecutive tensors while they fit (transformers' rule).
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut filled = 0u64;
    for (name, shape) in cfg.tensor_shapes() {
        let bytes = shape.iter().product::<usize>() as u64 * opts.dtype.bytes();
        let current = shards.last_mut().expect("never empty");
        if !current.is_empty() && filled + bytes > opts.max_shard_size {
            shards.push(Vec::new());
            filled = 0;
        }
        shards.last_mut().expect("never empty").push((name, shape));
        filled += bytes;
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut written = std::collections::BTreeSet::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            shard_name(i, n)
        };
        let mut tensors = Vec::with_capacity(shard.len());
        for (name, shape) in shard {
            tensors.push((name.as_str(), ck.read_full(name)?));
            total += shape.iter().product::<usize>() as u64 * opts.dtype.bytes();
            weight_map.insert(name.clone(), serde_json::Value::from(file.clone()));
        }
        let refs: Vec<(&str, &HostTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        let tmp = out_dir.join(format!(".{file}.tmp"));
        match opts.dtype {
            ExportDtype::F32 => {
                checkpoint::write_safetensors(&tmp, &refs)?;
            }
            ExportDtype::Bf16 => checkpoint::write_safetensors_bf16(&tmp, &refs)?,
        }
        rename(&tmp, &out_dir.join(&file))?;
        written.insert(file);
    }
    if n > 1 {
        write_json(
            out_dir,
            INDEX,
            &serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
        written.insert(INDEX.to_string());
    }
    // Weight files of an earlier export with another sharding would confuse from_pretrained.
    let rd = std::fs::read_dir(out_dir)
        .map_err(|e| Error::io(format!("cannot list {}", out_dir.display()), e))?;
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        if is_weight_file(&name) && !written.contains(&name) {
            std::fs::remove_file(ent.path()).map_err(|e| {
                Error::io(format!("cannot remove stale {}", ent.path().display()), e)
            })?;
        }
    }

    // The tokenizer and what HF needs to know about its special tokens.
    let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
        if !ck.has_file(name) {
            return Ok(None);
        }
        let p = ck.dir.join(name);
        let bytes =
            std::fs::read(&p).map_err(|e| Error::io(format!("cannot read {}", p.display()), e))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Checkpoint {
                path: p.clone(),
                message: format!("not valid JSON: {e}"),
            })
    };
    let tok = read_json(TOKENIZER)?;
    let tok_cfg = read_json(HF_SIDECARS[0])?;
    let specials = tok
        .as_ref()
        .map(|t| crate::hf::special_tokens(t, tok_cfg.as_ref()))
        .unwrap_or_default();
    let config = crate::hf::config_json(cfg, &specials, opts.dtype.torch_name());
    write_json(out_dir, "config.json", &config)?;
    if tok.is_some() {
        copy_file(&ck.dir.join(TOKENIZER), &out_dir.join(TOKENIZER))?;
        for name in HF_SIDECARS {
            if ck.has_file(name) {
                copy_file(&ck.dir.join(name), &out_dir.join(name))?;
            }
        }
        if !ck.has_file("tokenizer_config.json") {
            write_json(
                out_dir,
                "tokenizer_config.json",
                &crate::hf::tokenizer_config_json(cfg, &specials),
            )?;
        }
        if !ck.has_file("generation_config.json") {
            write_json(
                out_dir,
                "generation_config.json",
                &crate::hf::generation_config_json(&specials),
            )?;
        }
    } else {
        write_json(
            out_dir,
            "generation_config.json",
            &crate::hf::generation_config_json(&specials),
        )?;
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
