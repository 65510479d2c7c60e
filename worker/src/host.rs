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

/// The values of a contiguous fp32 host tensor, borrowed (no copy).
pub fn host_f32(t: &Tensor) -> &[f32] {
    assert!(
        t.kind() == Kind::Float && t.device() == Device::Cpu && t.is_contiguous(),
        "host_f32 needs a contiguous fp32 host tensor"
    );
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    // SAFETY: a contiguous fp32 CPU tensor has `n` f32 values at its data pointer, which live as
    // long as `t` (it holds its storage) and are not resized while borrowed.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, n) }
}

/// [`host_f32`], writable: writes land in `t`'s storage (which a view shares with its base),
/// e.g. to fill a tensor allocated with `Tensor::empty` in place.
pub fn host_f32_mut(t: &mut Tensor) -> &mut [f32] {
    assert!(
        t.kind() == Kind::Float && t.device() == Device::Cpu && t.is_contiguous(),
        "host_f32_mut needs a contiguous fp32 host tensor"
    );
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: as in `host_f32`; `&mut t` keeps this handle from being used elsewhere for the
    // borrow's duration (writes through other views of the same storage are the caller's).
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) }
}
