//! Deterministic parameter initialisation (docs/design.md §Conventions), independent of
//! libtorch's global RNG.
//!
//! Stds come from `trellis_core::growth::init_std`, values from
//! `trellis_core::offline::normal_tensor` (splitmix64 + Box–Muller, one stream per tensor name),
//! the same generator the offline `coordctl checkpoint grow` uses. So every DP rank builds
//! identical weights, the result depends neither on creation order nor on other threads using
//! libtorch's generator, and a resumed job re-creates a growth's fresh tensors bit for bit.
use crate::host::from_host;
use tch::{Device, Kind, Tensor};
use trellis_core::config::ModelConfig;
use trellis_core::growth::init_std;
use trellis_core::offline::normal_tensor;

/// The seed of the fresh tensors made at `generation` (0 = the initial model) of a job with
/// seed `seed`. Pass the same value to `trellis_core::offline::grow_checkpoint` to reproduce an
/// online growth offline.
pub fn generation_seed(seed: u64, generation: u64) -> u64 {
    seed ^ generation.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A fresh N(0, std²) fp32 tensor named `name` from stream `seed`, on `device`.
pub fn normal(name: &str, shape: &[usize], std: f64, seed: u64, device: Device) -> Tensor {
    from_host(&normal_tensor(shape, std, seed, name), device)
}

/// The fresh value of tensor `name` of `cfg` (normal for weights, ones for norms).
pub fn fresh(name: &str, shape: &[usize], cfg: &ModelConfig, seed: u64, device: Device) -> Tensor {
    match init_std(name, cfg) {
        Some(std) => normal(name, shape, std, seed, device),
        None => {
            let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            Tensor::ones(dims.as_slice(), (Kind::Float, device))
        }
    }
}
