//! The Rust half of `scripts/gpu-check.sh` (docs/precision.md §GPU): checks that need a CUDA
//! device, each printing one JSON line and exiting 1 when a check fails.
//!
//! ```text
//! gpu_check parity   CUDA forward/backward of a tiny LLaMA against CPU fp32 (fp32 and bf16)
//! gpu_check nccl     NCCL all-reduce and broadcast on CUDA tensors, world size 1: the raw
//!                    communicator, then the trainer's tensor path (`parallel::all_reduce_sum_`,
//!                    `broadcast_`, `all_reduce_tensor`) through an `NcclGroup`
//! ```
//! Without a CUDA device both refuse with one line on stderr (exit 2).
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use trellis_comm::nccl::{self, DeviceCollective, NcclComm, NcclGroup};
use trellis_comm::{Collective, Solo};
use trellis_core::config::ModelConfig;
use trellis_worker::model::{Llama, Precision};
use trellis_worker::parallel;

/// fp32 on CUDA vs CPU: the same math, other kernels and summation orders (no TF32: libtorch's
/// default keeps cuBLAS fp32 GEMMs in fp32). Relative to the reference's largest magnitude.
const FP32_TOL: f64 = 1e-4;
/// bf16 on CUDA vs fp32 on CPU: bf16 rounding (2^-8 relative per value) through 2 layers.
const BF16_LOSS_TOL: f64 = 2e-2;
const BF16_GRAD_TOL: f64 = 1e-1;

fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 512,
        hidden_size: 128,
        intermediate_size: 352,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 128,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        head_dim: None,
        rope_scaling: None,
    }
}

/// (loss, logits, grads on the CPU) of one forward/backward on `device` in `prec`.
fn run(device: Device, prec: Precision, ids: &Tensor) -> (f64, Tensor, Vec<(String, Tensor)>) {
    let mut m = Llama::init(&cfg(), device, 7);
    m.precision = prec;
    m.refresh_working_copies();
    let ids = ids.to_device(device);
    let (inp, tgt) = (ids.narrow(1, 0, 64), ids.narrow(1, 1, 64));
    let logits = tch::no_grad(|| m.forward(&inp)).to_device(Device::Cpu);
    let loss = m.forward_backward(&inp, &tgt, 1.0, false);
    m.collect_working_grads();
    let grads = m
        .named_parameters()
        .iter()
        .map(|(n, p)| (n.clone(), p.grad().to_device(Device::Cpu)))
        .collect();
    (loss, logits, grads)
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-6);
    (a - b).abs().max().double_value(&[]) / scale
}

fn parity() -> bool {
    let dev = Device::Cuda(0);
    let ids = Tensor::randint(512, [4, 65], (Kind::Int64, Device::Cpu));
    let (l_cpu, lg_cpu, g_cpu) = run(Device::Cpu, Precision::F32, &ids);
    let (l32, lg32, g32) = run(dev, Precision::F32, &ids);
    let (l16, _, g16) = run(dev, Precision::Bf16, &ids);
    let worst = |g: &[(String, Tensor)]| {
        g.iter()
            .zip(&g_cpu)
            .map(|((_, a), (_, b))| rel(a, b))
            .fold(0f64, f64::max)
    };
    let (logit32, grad32, grad16) = (rel(&lg32, &lg_cpu), worst(&g32), worst(&g16));
    let ok = (l32 - l_cpu).abs() / l_cpu < FP32_TOL
        && logit32 < FP32_TOL
        && grad32 < 10.0 * FP32_TOL
        && (l16 - l_cpu).abs() / l_cpu < BF16_LOSS_TOL
        && grad16 < BF16_GRAD_TOL;
    println!(
        "{}",
        serde_json::json!({
            "check": "parity", "ok": ok,
            "loss_cpu_fp32": l_cpu, "loss_cuda_fp32": l32, "loss_cuda_bf16": l16,
            "logits_rel_cuda_fp32": logit32, "grad_rel_cuda_fp32": grad32,
            "grad_rel_cuda_bf16": grad16,
            "tolerances": {"fp32_loss_logits_rel": FP32_TOL, "fp32_grad_rel": 10.0 * FP32_TOL,
                           "bf16_loss_rel": BF16_LOSS_TOL, "bf16_grad_rel": BF16_GRAD_TOL},
        })
    );
    ok
}

fn nccl_check() -> Result<bool, String> {
    nccl::available().map_err(|e| e.to_string())?;
    let id = nccl::unique_id().map_err(|e| e.to_string())?;
    let mut comm = NcclComm::new(0, 1, &id).map_err(|e| e.to_string())?;
    let n = 64 << 20; // 256 MiB of f32
    let t = Tensor::arange(n as i64, (Kind::Float, Device::Cuda(0))).remainder(1000.0);
    let before = t.copy();
    let stream = std::ptr::null_mut();
    tch::Cuda::synchronize(0);
    let t0 = Instant::now();
    // SAFETY: `t` is a contiguous fp32 CUDA tensor of n values alive until the synchronize.
    unsafe { comm.all_reduce_sum_f32(t.data_ptr() as *mut f32, n, stream) }
        .map_err(|e| e.to_string())?;
    tch::Cuda::synchronize(0);
    let secs = t0.elapsed().as_secs_f64();
    let same = t.equal(&before);
    // SAFETY: as above.
    unsafe { comm.broadcast_f32(t.data_ptr() as *mut f32, n, 0, stream) }
        .map_err(|e| e.to_string())?;
    tch::Cuda::synchronize(0);
    let raw_ok = same && t.equal(&before);
    drop(t);
    // The trainer's path: an NCCL group (a fresh id: ids are single-use) beside a control
    // collective, driven by the same functions the DP buckets and TP cuts call.
    let id2 = nccl::unique_id().map_err(|e| e.to_string())?;
    let comm2 = NcclComm::new(0, 1, &id2).map_err(|e| e.to_string())?;
    let mut group = NcclGroup::new(Box::new(Solo), comm2).map_err(|e| e.to_string())?;
    let g: &mut dyn Collective = &mut group;
    let mut bucket = Tensor::randn([1 << 20], (Kind::Float, Device::Cuda(0)));
    let b0 = bucket.copy();
    let path = (|| -> Result<bool, String> {
        parallel::all_reduce_sum_(g, &mut bucket).map_err(|e| e.to_string())?;
        parallel::broadcast_(g, &mut bucket, 0).map_err(|e| e.to_string())?;
        let cut =
            parallel::all_reduce_tensor(g, &b0.view([1024, 1024])).map_err(|e| e.to_string())?;
        tch::Cuda::synchronize(0);
        Ok(bucket.equal(&b0) && cut.view([-1]).equal(&b0) && cut.device() == Device::Cuda(0))
    })()?;
    let ok = raw_ok && path;
    println!(
        "{}",
        serde_json::json!({
            "check": "nccl", "ok": ok, "raw_ok": raw_ok, "trainer_path_ok": path,
            "world": comm.world(), "values": n,
            "all_reduce_seconds": secs, "all_reduce_gb_per_s": (n * 4) as f64 / secs / 1e9,
            "note": "world size 1: the sum is the identity; this checks the device-memory path, not bandwidth between GPUs",
        })
    );
    Ok(ok)
}

fn main() -> std::process::ExitCode {
    let what = std::env::args().nth(1).unwrap_or_default();
    if !tch::Cuda::is_available() {
        eprintln!("gpu_check: libtorch sees no CUDA device; run on a GPU machine with the CUDA build of libtorch");
        return std::process::ExitCode::from(2);
    }
    let ok = match what.as_str() {
        "parity" => parity(),
        "nccl" => match nccl_check() {
            Ok(ok) => ok,
            Err(e) => {
                eprintln!("gpu_check nccl: {e}");
                false
            }
        },
        other => {
            eprintln!("gpu_check: unknown check '{other}'; use parity or nccl");
            return std::process::ExitCode::from(2);
        }
    };
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}
