//! Host copies of tensors: [`HostTensor`] (fp32, row-major, the checkpoint's in-memory form)
//! to and from libtorch. A leaf module (no `crate::` imports), so the model, init, growth and
//! trainer code can all use it without depending on each other.
use tch::{Device, Kind, Tensor};
use trellis_core::checkpoint::HostTensor;

/// Copy a tensor to the host as fp32.
pub fn to_host(t: &Tensor) -> HostTensor {
    let t = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let n = t.numel();
    let mut data = vec![0f32; n];
    t.copy_data(&mut data, n);
    HostTensor {
        shape: t.size().iter().map(|&d| d as usize).collect(),
        data,
    }
}

/// A host tensor as an fp32 libtorch tensor on `device`.
pub fn from_host(h: &HostTensor, device: Device) -> Tensor {
    let dims: Vec<i64> = h.shape.iter().map(|&d| d as i64).collect();
    Tensor::from_slice(&h.data)
        .reshape(dims.as_slice())
        .to_device(device)
}
