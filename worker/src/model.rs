//! LLaMA in tch, single-device and parallel-agnostic (docs/design.md §Architecture,
//! §Conventions).
//!
//! Parameter names are Hugging Face `LlamaForCausalLM`'s: modules are built on
//! `p / "model" / "layers" / i / "self_attn" / "q_proj"` and own a `weight` (no biases), so the
//! VarStore's names are exactly the HF names. The math follows `transformers`' eager/sdpa code
//! (RMSNorm in fp32, `rotate_half` RoPE with theta and Llama 3 `rope_scaling` from the config,
//! GQA, an explicit `head_dim`, causal SDPA), so logits match `transformers` to float tolerance
//! (tested). With `tie_word_embeddings` the head multiplies with the embedding tensor itself:
//! there is no `lm_head.weight` parameter, and the embedding's gradient collects both uses.
//!
//! Speed: q/k/v and gate/up run as one GEMM each over their concatenated weights (the
//! parameters stay separate, with HF names), and GQA runs inside SDPA (`enable_gqa`) instead of
//! materialising repeated k/v.
//!
//! Generation: [`Llama::forward_cached`] runs only the tokens after those in a [`KvCache`]
//! (every layer's keys and values after RoPE, GQA-sized: `kv_heads`, not `heads`), through the
//! same projection, RoPE (at the cached offset) and attention code as [`Llama::forward`], whose
//! operations are unchanged by it (training is bit-identical with and without this path).
//!
//! Tensor parallelism stays outside this file (`crate::parallel`): a model can be built as one
//! TP rank's [`Shard`] (the Megatron-split projections hold only their slice, attention holds
//! only its heads), and the parallel code composes the per-layer pieces below with its
//! collectives. [`Llama::forward`] is the single-device path and refuses a shard.
//!
//! Precision (docs/precision.md): [`Precision::F32`], or [`Precision::Bf16`]: bf16 matmuls and
//! attention with fp32 master weights; RMSNorm statistics, the residual stream, logits and the
//! loss stay fp32. The same code on CPU and CUDA. tch 0.24's `autocast` enables CUDA autocast
//! with libtorch's default dtype (fp16) and exposes no way to choose bf16, so the casts are
//! explicit instead. A training step multiplies with bf16 *working copies* of the projection
//! weights ([`Llama::refresh_working_copies`], once per optimizer step: q/k/v and gate/up stored
//! concatenated, so neither the cast nor the concatenation runs per forward); their bf16
//! gradients are added into the fp32 masters' gradients after each backward
//! ([`Llama::collect_working_grads`]). Without working copies (evaluation, tests that build a
//! model directly) the bf16 path casts per matmul.
use std::collections::HashMap;
use tch::{nn, Device, Kind, Tensor};
use trellis_core::checkpoint::{shard_dim, shard_range};
use trellis_core::config::{ModelConfig, PrecisionChoice, RopeScaling, RopeType};

/// Which tensor-parallel slice of the model one instance holds (`tp = 1`: the whole model).
/// The split rule is the checkpoint's ([`shard_dim`]/[`shard_range`]): column-parallel
/// `q,k,v,gate,up` keep rows `shard_range(out, rank, tp)`, row-parallel `o,down` keep those
/// columns, everything else is whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub tp: usize,
}

impl Shard {
    /// The whole model.
    pub const FULL: Shard = Shard { rank: 0, tp: 1 };

    pub fn is_full(&self) -> bool {
        self.tp <= 1
    }

    /// The local shape of tensor `name` whose global shape is `full`.
    pub fn local_shape(&self, name: &str, full: &[usize]) -> Vec<usize> {
        let mut s = full.to_vec();
        if let Some(d) = shard_dim(name) {
            s[d] = shard_range(full[d], self.rank, self.tp).len();
        }
        s
    }

    /// This rank's slice of the global tensor `full` named `name`.
    pub fn slice(&self, name: &str, full: &Tensor) -> Tensor {
        match shard_dim(name) {
            Some(d) if !self.is_full() => {
                let r = shard_range(full.size()[d] as usize, self.rank, self.tp);
                full.narrow(d as i64, r.start as i64, r.len() as i64)
                    .contiguous()
            }
            _ => full.shallow_clone(),
        }
    }
}

/// The arithmetic of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// bf16 matmuls and attention; fp32 master weights, norms, residual stream and loss.
    Bf16,
}

impl Precision {
    /// `[train] precision` on `device`: `auto` is bf16 on CUDA and on CPUs with native bf16
    /// arithmetic ([`cpu_has_native_bf16`]), fp32 otherwise. Also returns why, for the log.
    pub fn resolve(choice: PrecisionChoice, device: Device) -> (Precision, &'static str) {
        match choice {
            PrecisionChoice::Fp32 => (Precision::F32, "[train] precision = \"fp32\""),
            PrecisionChoice::Bf16 => (Precision::Bf16, "[train] precision = \"bf16\""),
            PrecisionChoice::Auto if device.is_cuda() => (Precision::Bf16, "auto: CUDA device"),
            PrecisionChoice::Auto if cpu_has_native_bf16() => (
                Precision::Bf16,
                "auto: the CPU has native bf16 (avx512_bf16 / amx_bf16 / bf16)",
            ),
            PrecisionChoice::Auto => (
                Precision::F32,
                "auto: the CPU has no native bf16 (no avx512_bf16 / amx_bf16 / bf16 flag)",
            ),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Precision::F32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Whether this CPU multiplies bf16 natively: x86 `avx512_bf16` or `amx_bf16`, Arm `bf16`
/// (the flags of `/proc/cpuinfo`; `false` where it cannot be read).
pub fn cpu_has_native_bf16() -> bool {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.starts_with("flags") || l.starts_with("Features"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| matches!(f, "avx512_bf16" | "amx_bf16" | "bf16"))
}

/// Produces the initial value of a parameter (name, shape): fresh init, a copy, zeros…
pub type ParamSource<'a> = dyn FnMut(&str, &[usize]) -> Tensor + 'a;

fn dims(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| d as i64).collect()
}

/// Give leaf `w` a zero gradient buffer if it has none (a backward of `0 · Σw`, with gradients
/// enabled even inside a caller's `no_grad`).
fn prime_grad(w: &Tensor) {
    if !w.grad().defined() {
        tch::with_grad(|| (w.sum(Kind::Float) * 0.0).backward());
    }
}

/// Register parameter `name` under `p`, taking its value from `src`.
fn param(p: &nn::Path, name: &str, shape: &[usize], src: &mut ParamSource) -> Tensor {
    let full = p.path(name);
    let t = src(&full, shape);
    assert_eq!(
        t.size(),
        dims(shape),
        "initial value of {full} has the wrong shape"
    );
    let t = t.to_kind(Kind::Float).to_device(p.device()).detach();
    p.add(name, t, true)
}

/// A bias-free linear layer (`weight` is `[out, in]`).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
}

impl Linear {
    pub fn new(p: nn::Path, in_dim: usize, out_dim: usize, src: &mut ParamSource) -> Linear {
        Linear {
            weight: param(&p, "weight", &[out_dim, in_dim], src),
        }
    }
    pub fn forward(&self, x: &Tensor, prec: Precision) -> Tensor {
        linear(x, &self.weight, prec)
    }
}

/// `x · wᵀ` in the given precision.
fn linear(x: &Tensor, w: &Tensor, prec: Precision) -> Tensor {
    match prec {
        Precision::F32 => x.matmul(&w.tr()),
        Precision::Bf16 => x
            .to_kind(Kind::BFloat16)
            .matmul(&w.to_kind(Kind::BFloat16).tr()),
    }
}

/// `x · wᵀ` with a bf16 working copy `w` (x is cast to bf16; the result is bf16).
fn linear_bf16(x: &Tensor, w: &Tensor) -> Tensor {
    x.to_kind(Kind::BFloat16).matmul(&w.tr())
}

/// The bf16 working copies of one layer's projection weights (leaves that collect gradients):
/// `qkv` = [q; k; v] and `gate_up` = [gate; up] concatenated along the output dimension.
#[derive(Debug)]
pub struct LayerCopies {
    pub qkv: Tensor,
    pub o: Tensor,
    pub gate_up: Tensor,
    pub down: Tensor,
}

/// What one forward multiplies with: the fp32 parameters (cast per matmul in bf16), or one
/// layer's bf16 working copies.
#[derive(Debug, Clone, Copy)]
pub enum Mats<'a> {
    Params(Precision),
    Copies(&'a LayerCopies),
}

/// RMSNorm as in `transformers`: statistics in fp32, `weight * x_normed`.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(p: nn::Path, dim: usize, eps: f64, src: &mut ParamSource) -> RmsNorm {
        RmsNorm {
            weight: param(&p, "weight", &[dim], src),
            eps,
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = x.to_kind(Kind::Float);
        let var = x.square().mean_dim(-1, true, Kind::Float);
        &self.weight * (x * (var + self.eps).rsqrt())
    }
}

/// Rotary tables (`cos`, `sin`, each `[positions, head_dim]`): HF's default RoPE, or Llama 3's
/// scaled frequencies when the config has `rope_scaling`.
#[derive(Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The tables of `cfg` (its head width, `rope_theta`, `rope_scaling`).
    pub fn for_config(cfg: &ModelConfig, device: Device) -> Rope {
        let inv = Rope::inv_freq(
            cfg.head_dim(),
            cfg.rope_theta,
            cfg.rope_scaling.as_ref(),
            device,
        );
        Rope::from_inv_freq(&inv, cfg.max_position_embeddings)
    }

    /// The inverse frequencies `[head_dim / 2]` (fp32), computed with the same fp32 operations
    /// in the same order as `transformers` (`_compute_default_rope_parameters` and
    /// `_compute_llama3_parameters`), so the tables agree bit for bit.
    pub fn inv_freq(
        head_dim: usize,
        theta: f64,
        scaling: Option<&RopeScaling>,
        device: Device,
    ) -> Tensor {
        let exps = Tensor::arange_start_step(0, head_dim as i64, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / head_dim as f64;
        let inv_freq = Tensor::from(theta as f32)
            .to_device(device)
            .pow(&exps)
            .reciprocal();
        let Some(r) = scaling else {
            return inv_freq;
        };
        match r.rope_type {
            RopeType::Llama3 => {
                let old = r.original_max_position_embeddings as f64;
                let low_wavelen = old / r.low_freq_factor;
                let high_wavelen = old / r.high_freq_factor;
                // `2 * math.pi / inv_freq`: a Python float over an fp32 tensor.
                let wavelen = (&inv_freq).reciprocal() * (2.0 * std::f64::consts::PI);
                let divided = &inv_freq / r.factor;
                let low = wavelen.gt(low_wavelen);
                let scaled = divided.where_self(&low, &inv_freq);
                let smooth = ((wavelen.reciprocal() * old) - r.low_freq_factor)
                    / (r.high_freq_factor - r.low_freq_factor);
                // `(1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama`, in
                // Python's left-to-right order.
                let smoothed =
                    (smooth.ones_like() - &smooth) * &scaled / r.factor + &smooth * &scaled;
                let medium = wavelen.lt(high_wavelen).logical_not() * low.logical_not();
                smoothed.where_self(&medium, &scaled)
            }
        }
    }

    fn from_inv_freq(inv_freq: &Tensor, positions: usize) -> Rope {
        let device = inv_freq.device();
        let pos = Tensor::arange(positions as i64, (Kind::Int64, device)).to_kind(Kind::Float);
        let freqs = pos.unsqueeze(1).matmul(&inv_freq.unsqueeze(0)); // [pos, d/2]
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Rope {
            cos: emb.cos(),
            sin: emb.sin(),
        }
    }

    fn rotate_half(x: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let x1 = x.narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        Tensor::cat(&[&x2.neg(), &x1], -1)
    }

    /// Apply to `x` of shape `[b, heads, seq, head_dim]` (fp32 tables; result in x's kind).
    pub fn apply(&self, x: &Tensor) -> Tensor {
        self.apply_at(x, 0)
    }

    /// [`Rope::apply`] to positions `offset..offset + seq` (incremental decoding: the tokens
    /// after `offset` cached ones).
    pub fn apply_at(&self, x: &Tensor, offset: i64) -> Tensor {
        let seq = x.size()[2];
        let cos = self.cos.narrow(0, offset, seq).to_kind(x.kind());
        let sin = self.sin.narrow(0, offset, seq).to_kind(x.kind());
        x * cos + Self::rotate_half(x) * sin
    }
}

/// Causal self-attention with grouped-query attention.
#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    /// `tp`: the TP degree this rank's slice is of (heads and KV heads split evenly; 1 = all).
    pub fn new(p: nn::Path, cfg: &ModelConfig, tp: usize, src: &mut ParamSource) -> Attention {
        let h = cfg.hidden_size;
        let (heads, kv_heads) = (cfg.num_attention_heads / tp, cfg.num_key_value_heads / tp);
        let (hl, kvl) = (heads * cfg.head_dim(), kv_heads * cfg.head_dim());
        Attention {
            q_proj: Linear::new(&p / "q_proj", h, hl, src),
            k_proj: Linear::new(&p / "k_proj", h, kvl, src),
            v_proj: Linear::new(&p / "v_proj", h, kvl, src),
            o_proj: Linear::new(&p / "o_proj", hl, h, src),
            heads: heads as i64,
            kv_heads: kv_heads as i64,
            head_dim: cfg.head_dim() as i64,
        }
    }

    /// The concatenated [q; k; v] weight (fp32, a graph node over the three parameters).
    pub fn qkv_weight(&self) -> Tensor {
        Tensor::cat(
            &[
                &self.q_proj.weight,
                &self.k_proj.weight,
                &self.v_proj.weight,
            ],
            0,
        )
    }

    pub fn forward(&self, x: &Tensor, rope: &Rope, mats: Mats) -> Tensor {
        let (q, k, v) = self.project(x, rope, mats, 0);
        let y = self.attend(&q, &k, &v);
        self.output(&y, mats)
    }

    /// [`Attention::forward`] for the tokens after the `kv.len` cached ones (generation):
    /// their keys and values (after RoPE) are appended to `kv` and the queries attend to every
    /// cached position and causally among themselves.
    pub fn forward_cached(&self, x: &Tensor, rope: &Rope, mats: Mats, kv: &mut LayerKv) -> Tensor {
        let (q, k, v) = self.project(x, rope, mats, kv.len);
        let (k, v) = kv.append(&k, &v);
        let y = self.attend(&q, &k, &v);
        self.output(&y, mats)
    }

    /// Queries, keys and values `[b, heads or kv_heads, s, head_dim]` of `x` at positions
    /// `offset..offset + s`, RoPE applied.
    fn project(
        &self,
        x: &Tensor,
        rope: &Rope,
        mats: Mats,
        offset: i64,
    ) -> (Tensor, Tensor, Tensor) {
        let (b, s, _) = x.size3().unwrap();
        let (h, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        // One GEMM for q, k and v (their weights concatenated), then split.
        let qkv = match mats {
            Mats::Params(prec) => linear(x, &self.qkv_weight(), prec),
            Mats::Copies(c) => linear_bf16(x, &c.qkv),
        };
        let parts = qkv.split_with_sizes([h, kv, kv], -1);
        let shape = |t: &Tensor, n: i64| t.view([b, s, n, self.head_dim]).transpose(1, 2);
        let q = rope.apply_at(&shape(&parts[0], self.heads), offset);
        let k = rope.apply_at(&shape(&parts[1], self.kv_heads), offset);
        let v = shape(&parts[2], self.kv_heads);
        (q, k, v)
    }

    /// Causal attention of the `s` queries `q` over the `t >= s` keys and values: query `i` is
    /// position `t - s + i` and sees keys `0..=t - s + i` (`t = s` in training).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (s, t) = (q.size()[2], k.size()[2]);
        if q.kind() == Kind::BFloat16
            && q.device() == Device::Cpu
            && t <= CPU_BF16_MATH_ATTENTION_MAX_SEQ
        {
            return self.grouped_attention(q, k, v);
        }
        // GQA inside SDPA (`enable_gqa`), as transformers' sdpa path does: no repeated k/v
        // copies. SDPA's `is_causal` aligns the mask top-left, so queries after cached keys
        // need an explicit (bottom-right) mask, or none for a single query.
        let (mask, causal) = if t == s {
            (None, true)
        } else if s == 1 {
            (None, false)
        } else {
            let m = Tensor::ones([s, t], (Kind::Bool, q.device())).tril(t - s);
            (Some(m), false)
        };
        Tensor::scaled_dot_product_attention(
            q,
            k,
            v,
            mask.as_ref(),
            0.0,
            causal,
            None,
            self.heads != self.kv_heads,
        )
    }

    /// `o_proj` of the attention output `y` `[b, heads, s, head_dim]`.
    fn output(&self, y: &Tensor, mats: Mats) -> Tensor {
        let (b, _, s, _) = y.size4().unwrap();
        let y = y
            .transpose(1, 2)
            .reshape([b, s, self.heads * self.head_dim]);
        match mats {
            Mats::Params(prec) => self.o_proj.forward(&y, prec),
            Mats::Copies(c) => linear_bf16(&y, &c.o),
        }
    }
}

impl Attention {
    /// Causal GQA attention as explicit GEMMs (bf16 on CPU, short sequences): the `rep` query
    /// heads of each KV head are stacked into one `[rep·s, d]` matrix, so every KV head is one
    /// batched GEMM against its keys and values (no repeated k/v); softmax statistics in fp32.
    /// On a 2-core CPU at s = 256 this takes ~15% less CPU time per training step than
    /// libtorch's flash-attention CPU kernel in bf16 (docs/benchmarks.md); it keeps the
    /// `[b, heads, s, s]` probabilities for backward, hence the sequence-length cap.
    /// With `t > s` keys (generation after cached positions) query `i` is position
    /// `t - s + i`, as in [`Attention::attend`].
    fn grouped_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, _, s, d) = q.size4().unwrap();
        let t = k.size()[2];
        let (kv, rep) = (self.kv_heads, self.heads / self.kv_heads);
        let scores = q
            .reshape([b, kv, rep * s, d])
            .matmul(&k.transpose(-1, -2))
            .view([b, kv, rep, s, t]);
        let future = Tensor::ones([s, t], (Kind::Bool, q.device())).triu(t - s + 1);
        let p = (scores * (d as f64).powf(-0.5))
            .masked_fill(&future, f64::NEG_INFINITY)
            .softmax(-1, Kind::Float)
            .to_kind(q.kind())
            .view([b, kv, rep * s, t]);
        p.matmul(v).view([b, self.heads, s, d])
    }
}

/// Longest sequence for which bf16 attention on CPU runs as explicit GEMMs
/// ([`Attention::grouped_attention`]) rather than SDPA's flash kernel.
pub const CPU_BF16_MATH_ATTENTION_MAX_SEQ: i64 = 1024;

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// `tp`: the TP degree this rank's slice is of (the FFN width split evenly; 1 = all).
    pub fn new(p: nn::Path, cfg: &ModelConfig, tp: usize, src: &mut ParamSource) -> Mlp {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size / tp);
        Mlp {
            gate_proj: Linear::new(&p / "gate_proj", h, f, src),
            up_proj: Linear::new(&p / "up_proj", h, f, src),
            down_proj: Linear::new(&p / "down_proj", f, h, src),
        }
    }
    /// The concatenated [gate; up] weight (fp32, a graph node over the two parameters).
    pub fn gate_up_weight(&self) -> Tensor {
        Tensor::cat(&[&self.gate_proj.weight, &self.up_proj.weight], 0)
    }

    pub fn forward(&self, x: &Tensor, mats: Mats) -> Tensor {
        // One GEMM for gate and up (weights concatenated), then split.
        let f = self.gate_proj.weight.size()[0];
        let gu = match mats {
            Mats::Params(prec) => linear(x, &self.gate_up_weight(), prec),
            Mats::Copies(c) => linear_bf16(x, &c.gate_up),
        };
        let parts = gu.split_with_sizes([f, f], -1);
        let act = parts[0].silu() * &parts[1];
        match mats {
            Mats::Params(prec) => self.down_proj.forward(&act, prec),
            Mats::Copies(c) => linear_bf16(&act, &c.down),
        }
    }
}

/// One decoder layer: `x + Attn(RMSNorm(x))`, then `x + SwiGLU(RMSNorm(x))`.
#[derive(Debug)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl Block {
    pub fn new(p: nn::Path, cfg: &ModelConfig, tp: usize, src: &mut ParamSource) -> Block {
        let eps = cfg.rms_norm_eps;
        Block {
            input_layernorm: RmsNorm::new(&p / "input_layernorm", cfg.hidden_size, eps, src),
            self_attn: Attention::new(&p / "self_attn", cfg, tp, src),
            post_attention_layernorm: RmsNorm::new(
                &p / "post_attention_layernorm",
                cfg.hidden_size,
                eps,
                src,
            ),
            mlp: Mlp::new(&p / "mlp", cfg, tp, src),
        }
    }

    /// `mask`: the MSG-style mask scalar m (`out = m·f(x) + (1−m)·x`); `None` = 1.
    pub fn forward(&self, x: &Tensor, rope: &Rope, mats: Mats, mask: Option<f64>) -> Tensor {
        let a = self
            .self_attn
            .forward(&self.input_layernorm.forward(x), rope, mats);
        let h = x + a.to_kind(Kind::Float);
        let m = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h), mats);
        Block::residual_out(x, &h, &m.to_kind(Kind::Float), mask)
    }

    /// [`Block::forward`] for the tokens after those cached in `kv` (generation).
    pub fn forward_cached(
        &self,
        x: &Tensor,
        rope: &Rope,
        mats: Mats,
        mask: Option<f64>,
        kv: &mut LayerKv,
    ) -> Tensor {
        let a = self
            .self_attn
            .forward_cached(&self.input_layernorm.forward(x), rope, mats, kv);
        let h = x + a.to_kind(Kind::Float);
        let m = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h), mats);
        Block::residual_out(x, &h, &m.to_kind(Kind::Float), mask)
    }

    /// The layer's output from its input `x`, the mid-layer residual `h = x + attn` and the
    /// MLP output `m` (fp32), under the mask scalar (`None` = 1).
    pub fn residual_out(x: &Tensor, h: &Tensor, m: &Tensor, mask: Option<f64>) -> Tensor {
        let out = h + m;
        match mask {
            None => out,
            Some(m) => out * m + x * (1.0 - m),
        }
    }
}

/// One layer's cached keys and values (after RoPE): `[b, kv_heads, capacity, head_dim]`
/// buffers in the attention's kind, of which the first `len` positions are filled. Allocated at
/// the first append, so the cache takes the kind and batch of what it is fed.
#[derive(Debug)]
pub struct LayerKv {
    kv: Option<(Tensor, Tensor)>,
    len: i64,
    capacity: i64,
}

impl LayerKv {
    /// Write `k`, `v` `[b, kv_heads, s, head_dim]` after the cached positions; returns every
    /// cached position's keys and values (views of the buffers).
    fn append(&mut self, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let s = k.size()[2];
        assert!(
            self.len + s <= self.capacity,
            "KV cache of {} positions cannot take {s} more after {}",
            self.capacity,
            self.len
        );
        let (kb, vb) = self.kv.get_or_insert_with(|| {
            let mut shape = k.size();
            shape[2] = self.capacity;
            let opts = (k.kind(), k.device());
            (Tensor::zeros(&shape, opts), Tensor::zeros(&shape, opts))
        });
        kb.narrow(2, self.len, s).copy_(k);
        vb.narrow(2, self.len, s).copy_(v);
        self.len += s;
        (kb.narrow(2, 0, self.len), vb.narrow(2, 0, self.len))
    }
}

/// The keys and values of every layer for the positions a model has seen, so that generation
/// runs only the new token through the model ([`Llama::forward_cached`]) instead of the whole
/// sequence. Holds at most `capacity` positions (memory: `2 · layers · b · kv_heads · capacity
/// · head_dim` elements).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// An empty cache for `model` of at most `capacity` positions.
    pub fn new(model: &Llama, capacity: usize) -> KvCache {
        KvCache {
            layers: (0..model.layers.len())
                .map(|_| LayerKv {
                    kv: None,
                    len: 0,
                    capacity: capacity as i64,
                })
                .collect(),
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every layer's bf16 working copies and the `lm_head`'s.
#[derive(Debug)]
struct WorkingCopies {
    layers: Vec<LayerCopies>,
    lm_head: Tensor,
}

/// The whole causal LM. Owns its VarStore.
pub struct Llama {
    pub cfg: ModelConfig,
    pub vs: nn::VarStore,
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    rope: Rope,
    /// The TP slice this instance holds ([`Shard::FULL`] for a single-device model).
    pub shard: Shard,
    pub precision: Precision,
    /// bf16 working copies of the projection weights (bf16 training only; see the module docs).
    copies: Option<WorkingCopies>,
    /// Per-layer mask scalar for the `random` operator's ramp (`None` = unmasked).
    pub masks: Vec<Option<f64>>,
    /// (name, tensor) in [`ModelConfig::tensor_shapes`] order (shallow clones of the vars).
    params: Vec<(String, Tensor)>,
}

// Tensors are Send; the VarStore's Arc<Mutex<..>> too. The model is moved between threads only
// as a whole (the trainer's dedicated thread owns it).
impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Llama {
    /// Build the model with every parameter taken from `src` (called once per tensor, in
    /// [`ModelConfig::tensor_shapes`] order, with the HF name).
    pub fn new(cfg: &ModelConfig, device: Device, src: &mut ParamSource) -> Llama {
        Llama::new_shard(cfg, device, Shard::FULL, src)
    }

    /// Build TP rank `shard.rank`'s slice: `src` is called with each tensor's HF name and its
    /// *local* shape ([`Shard::local_shape`]). `cfg` must split evenly (heads, KV heads, FFN).
    pub fn new_shard(
        cfg: &ModelConfig,
        device: Device,
        shard: Shard,
        src: &mut ParamSource,
    ) -> Llama {
        let tp = shard.tp.max(1);
        assert!(
            cfg.num_attention_heads % tp == 0
                && cfg.num_key_value_heads % tp == 0
                && cfg.intermediate_size % tp == 0
                && shard.rank < tp,
            "shard {shard:?} does not split this config evenly (heads {}, kv heads {}, ffn {})",
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size
        );
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let p = &root / "model";
        let embed_tokens = param(
            &(&p / "embed_tokens"),
            "weight",
            &[cfg.vocab_size, cfg.hidden_size],
            src,
        );
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::new(&p / "layers" / i, cfg, tp, src))
            .collect();
        let norm = RmsNorm::new(&p / "norm", cfg.hidden_size, cfg.rms_norm_eps, src);
        // Tied: the head multiplies with the embedding itself (one parameter, whose gradient
        // collects both uses).
        let lm_head = if cfg.tie_word_embeddings {
            Linear {
                weight: embed_tokens.shallow_clone(),
            }
        } else {
            Linear::new(&root / "lm_head", cfg.hidden_size, cfg.vocab_size, src)
        };
        let rope = Rope::for_config(cfg, device);
        let vars = vs.variables();
        let params = cfg
            .tensor_shapes()
            .into_iter()
            .map(|(name, _)| {
                let t = vars
                    .get(&name)
                    .unwrap_or_else(|| panic!("model is missing {name}"))
                    .shallow_clone();
                (name, t)
            })
            .collect();
        Llama {
            cfg: cfg.clone(),
            vs,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            shard,
            precision: Precision::F32,
            copies: None,
            masks: vec![None; cfg.num_hidden_layers],
            params,
        }
    }

    /// A freshly initialised model (docs/design.md §Conventions), identical for a given seed on
    /// every rank.
    pub fn init(cfg: &ModelConfig, device: Device, seed: u64) -> Llama {
        let c = cfg.clone();
        Llama::new(cfg, device, &mut |name, shape| {
            crate::init::fresh(
                name,
                shape,
                &c,
                crate::init::generation_seed(seed, 0),
                Device::Cpu,
            )
        })
    }

    /// TP rank `shard.rank`'s slice of [`Llama::init`]: every tensor is generated whole (the
    /// same stream as at TP = 1) and sliced, so any TP starts from the same weights.
    pub fn init_shard(cfg: &ModelConfig, device: Device, seed: u64, shard: Shard) -> Llama {
        let full: HashMap<String, Vec<usize>> = cfg.tensor_shapes().into_iter().collect();
        let c = cfg.clone();
        Llama::new_shard(cfg, device, shard, &mut |name, _local| {
            let t = crate::init::fresh(
                name,
                &full[name],
                &c,
                crate::init::generation_seed(seed, 0),
                Device::Cpu,
            );
            shard.slice(name, &t)
        })
    }

    /// A shard whose tensors are allocated but not initialised: a model that a restore is
    /// about to replace (drawing a fresh init first would cost seconds at 100M+ parameters).
    pub fn placeholder_shard(cfg: &ModelConfig, device: Device, shard: Shard) -> Llama {
        Llama::new_shard(cfg, device, shard, &mut |_name, local| {
            Tensor::zeros(dims(local), (Kind::Float, Device::Cpu))
        })
    }

    /// Build from a name → tensor map (checkpoint load); every tensor must be present.
    pub fn from_tensors(
        cfg: &ModelConfig,
        device: Device,
        tensors: &mut HashMap<String, Tensor>,
    ) -> Llama {
        Llama::from_tensors_shard(cfg, device, Shard::FULL, tensors)
    }

    /// [`Llama::from_tensors`] for a TP slice (the map holds local tensors).
    pub fn from_tensors_shard(
        cfg: &ModelConfig,
        device: Device,
        shard: Shard,
        tensors: &mut HashMap<String, Tensor>,
    ) -> Llama {
        Llama::new_shard(cfg, device, shard, &mut |name, _shape| {
            tensors
                .remove(name)
                .unwrap_or_else(|| panic!("from_tensors: {name} missing"))
        })
    }

    /// The rotary tables (shared by every layer).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Parameters (HF name, tensor), in [`ModelConfig::tensor_shapes`] order.
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn parameter(&self, name: &str) -> Option<&Tensor> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn num_parameters(&self) -> u64 {
        self.params.iter().map(|(_, t)| t.numel() as u64).sum()
    }

    /// What layer `i` multiplies with: its bf16 working copies when the model trains in bf16
    /// and has them, else the parameters.
    pub fn mats(&self, i: usize) -> Mats<'_> {
        match (&self.copies, self.precision) {
            (Some(c), Precision::Bf16) => Mats::Copies(&c.layers[i]),
            _ => Mats::Params(self.precision),
        }
    }

    /// bf16 training: (re)make the bf16 working copies from the fp32 masters: call once per
    /// optimizer step, before the forward passes (the trainer does). Reuses the buffers (and
    /// their gradient buffers) of the previous step. fp32: drops any copies.
    pub fn refresh_working_copies(&mut self) {
        if self.precision != Precision::Bf16 {
            self.copies = None;
            return;
        }
        // The masters of copied weights get their gradients by `collect_working_grads`, which
        // adds into an existing buffer: give every one a (zero) gradient buffer once.
        for l in &self.layers {
            let a = &l.self_attn;
            for w in [
                &a.q_proj.weight,
                &a.k_proj.weight,
                &a.v_proj.weight,
                &a.o_proj.weight,
                &l.mlp.gate_proj.weight,
                &l.mlp.up_proj.weight,
                &l.mlp.down_proj.weight,
            ] {
                prime_grad(w);
            }
        }
        prime_grad(&self.lm_head.weight);
        tch::no_grad(|| {
            let fresh: Vec<[Tensor; 4]> = self
                .layers
                .iter()
                .map(|l| {
                    [
                        l.self_attn.qkv_weight(),
                        l.self_attn.o_proj.weight.shallow_clone(),
                        l.mlp.gate_up_weight(),
                        l.mlp.down_proj.weight.shallow_clone(),
                    ]
                })
                .collect();
            match &mut self.copies {
                Some(c) if c.layers.len() == fresh.len() => {
                    for (lc, [qkv, o, gu, d]) in c.layers.iter_mut().zip(&fresh) {
                        lc.qkv.copy_(qkv);
                        lc.o.copy_(o);
                        lc.gate_up.copy_(gu);
                        lc.down.copy_(d);
                    }
                    c.lm_head.copy_(&self.lm_head.weight);
                }
                _ => {
                    let half = |t: &Tensor| t.to_kind(Kind::BFloat16).set_requires_grad(true);
                    self.copies = Some(WorkingCopies {
                        layers: fresh
                            .iter()
                            .map(|[qkv, o, gu, d]| LayerCopies {
                                qkv: half(qkv),
                                o: half(o),
                                gate_up: half(gu),
                                down: half(d),
                            })
                            .collect(),
                        lm_head: half(&self.lm_head.weight),
                    });
                }
            }
        });
    }

    /// Add the working copies' bf16 gradients into the fp32 masters' gradients (in fp32) and
    /// zero them: call after each backward of a bf16 training step. A no-op without copies.
    pub fn collect_working_grads(&mut self) {
        let Some(c) = &mut self.copies else { return };
        let add = |g: &Tensor, masters: &[&Tensor]| {
            let sizes: Vec<i64> = masters.iter().map(|m| m.size()[0]).collect();
            for (part, m) in g.split_with_sizes(sizes.as_slice(), 0).iter().zip(masters) {
                let _ = m.grad().g_add_(part);
            }
        };
        tch::no_grad(|| {
            for (l, lc) in self.layers.iter().zip(c.layers.iter_mut()) {
                let (a, m) = (&l.self_attn, &l.mlp);
                let parts: [(&mut Tensor, Vec<&Tensor>); 4] = [
                    (
                        &mut lc.qkv,
                        vec![&a.q_proj.weight, &a.k_proj.weight, &a.v_proj.weight],
                    ),
                    (&mut lc.o, vec![&a.o_proj.weight]),
                    (
                        &mut lc.gate_up,
                        vec![&m.gate_proj.weight, &m.up_proj.weight],
                    ),
                    (&mut lc.down, vec![&m.down_proj.weight]),
                ];
                for (copy, masters) in parts {
                    let g = copy.grad();
                    if g.defined() {
                        add(&g, &masters);
                        copy.zero_grad();
                    }
                }
            }
            let g = c.lm_head.grad();
            if g.defined() {
                add(&g, &[&self.lm_head.weight]);
                c.lm_head.zero_grad();
            }
        });
    }

    /// Logits `[b, s, vocab]` (fp32) for input ids `[b, s]` (int64). Single-device only: a TP
    /// shard runs through `crate::parallel::tp`.
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        self.head(&self.body(&self.embed(input_ids)))
    }

    /// Logits `[b, s, vocab]` (fp32) of the `s` tokens `input_ids` that follow the positions
    /// already in `cache`, whose keys and values are appended to it: feeding a sequence in
    /// pieces gives the logits of [`Llama::forward`] on the whole (to float rounding), with each
    /// piece run through the model once. Single-device only; no gradients are meant to flow.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Tensor {
        assert!(
            self.shard.is_full(),
            "Llama::forward_cached on TP shard {:?}: generation runs single-device",
            self.shard
        );
        assert_eq!(
            cache.layers.len(),
            self.layers.len(),
            "KV cache of another model"
        );
        let mut x = self.embed(input_ids);
        for (i, ((layer, mask), kv)) in self
            .layers
            .iter()
            .zip(&self.masks)
            .zip(&mut cache.layers)
            .enumerate()
        {
            x = layer.forward_cached(&x, &self.rope, self.mats(i), *mask, kv);
        }
        self.head(&x)
    }

    /// Every decoder layer on the embeddings `x` (single-device).
    fn body(&self, x: &Tensor) -> Tensor {
        assert!(
            self.shard.is_full(),
            "Llama::forward on TP shard {:?}: use trellis_worker::parallel::tp",
            self.shard
        );
        let mut x = x.shallow_clone();
        for (i, (layer, mask)) in self.layers.iter().zip(&self.masks).enumerate() {
            x = layer.forward(&x, &self.rope, self.mats(i), *mask);
        }
        x
    }

    /// One micro-batch's forward and backward (single-device): accumulates
    /// `scale · ∂loss/∂θ` into the gradients (of the working copies, in bf16 training: collect
    /// them afterwards) and returns the unscaled mean loss. `checkpointing`: keep only each
    /// layer's input during the forward and recompute the layer's activations in backward (less
    /// memory, one more forward of every layer); same gradients.
    pub fn forward_backward(
        &self,
        input_ids: &Tensor,
        targets: &Tensor,
        scale: f64,
        checkpointing: bool,
    ) -> f64 {
        if !checkpointing {
            let loss = self.loss(input_ids, targets);
            (&loss * scale).backward();
            return loss.double_value(&[]);
        }
        assert!(self.shard.is_full(), "checkpointing runs single-device");
        // Forward without a graph, keeping every layer's input.
        let emb = self.embed(input_ids);
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut x = emb.detach();
        tch::no_grad(|| {
            for (i, (layer, mask)) in self.layers.iter().zip(&self.masks).enumerate() {
                inputs.push(x.shallow_clone());
                x = layer.forward(&x, &self.rope, self.mats(i), *mask);
            }
        });
        // The head's segment, then every layer's (recomputed) in reverse, each seeded with the
        // gradient its output's consumer left on the leaf.
        let leaf = x.set_requires_grad(true);
        let loss = self.loss_from_logits(&self.head(&leaf), targets);
        (&loss * scale).backward();
        let mut g = leaf.grad();
        for (i, (layer, mask)) in self.layers.iter().zip(&self.masks).enumerate().rev() {
            let leaf = inputs[i].set_requires_grad(true);
            let out = layer.forward(&leaf, &self.rope, self.mats(i), *mask);
            (out * &g).sum(Kind::Float).backward();
            g = leaf.grad();
        }
        (emb * g).sum(Kind::Float).backward();
        loss.double_value(&[])
    }

    /// Token embeddings `[b, s, hidden]` of `input_ids`.
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false)
    }

    /// Final norm and `lm_head`: fp32 logits from the last hidden state.
    pub fn head(&self, x: &Tensor) -> Tensor {
        let x = self.norm.forward(x);
        let logits = match (&self.copies, self.precision) {
            (Some(c), Precision::Bf16) => linear_bf16(&x, &c.lm_head),
            _ => self.lm_head.forward(&x, self.precision),
        };
        logits.to_kind(Kind::Float)
    }

    /// Mean next-token cross-entropy of `targets` `[b, s]` given `input_ids` `[b, s]`.
    pub fn loss(&self, input_ids: &Tensor, targets: &Tensor) -> Tensor {
        self.loss_from_logits(&self.forward(input_ids), targets)
    }

    /// Mean cross-entropy of `targets` under `logits` `[b, s, vocab]`.
    pub fn loss_from_logits(&self, logits: &Tensor, targets: &Tensor) -> Tensor {
        let v = self.cfg.vocab_size as i64;
        logits.view([-1, v]).cross_entropy_loss(
            &targets.reshape([-1]),
            None::<&Tensor>,
            tch::Reduction::Mean,
            -100,
            0.0,
        )
    }

    /// Set every gradient to zero (in place; keeps the buffers).
    pub fn zero_grad(&mut self) {
        for (_, t) in self.params.iter_mut() {
            t.zero_grad();
        }
    }
}
