//! The NCCL backend on a machine without CUDA (CI, these VMs): it must refuse with a clear
//! error, never panic. On a GPU machine with NCCL, a world-size-1 communicator forms.
#![cfg(feature = "nccl")]
use trellis_comm::nccl::{self, NcclComm, UniqueId};
use trellis_comm::Error;

#[test]
fn nccl_refuses_clearly_without_cuda_or_forms_a_world_of_one() {
    match nccl::available() {
        Err(Error::Unavailable(msg)) => {
            assert!(msg.contains("CUDA") || msg.contains("libnccl"), "{msg}");
            let e = NcclComm::new(0, 1, &UniqueId([0; 128])).unwrap_err();
            assert!(matches!(e, Error::Unavailable(_)), "{e}");
            assert!(e.to_string().contains("unavailable"), "{e}");
            let e = nccl::unique_id().unwrap_err();
            assert!(matches!(e, Error::Unavailable(_)), "{e}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(()) => {
            // A GPU machine with NCCL: a world of one forms (no device memory is touched).
            let id = nccl::unique_id().unwrap();
            let c = NcclComm::new(0, 1, &id).unwrap();
            assert_eq!(format!("{c:?}").contains("world: 1"), true);
        }
    }
}

#[test]
fn nccl_rejects_bad_parameters_before_loading_anything() {
    let e = NcclComm::new(2, 2, &UniqueId([0; 128])).unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e}");
}
