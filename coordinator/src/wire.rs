//! The edge: `trellis.v1` messages from workers and operators turned into domain values, once.
use crate::domain::{Ack, AckKind, GrowRequest};
use crate::error::{Error, Result};
use crate::txn::checkpoint::ShardAck;
use crate::txn::growth::WorkerPhase;
use std::collections::VecDeque;
use trellis_core::backend::{NCCL_IDS_OFFERED, NCCL_ID_BYTES};
use trellis_core::growth::GrowthSpec;
use trellis_core::ids::{CommandId, Epoch, Generation, Rank, Step};
use trellis_proto::convert::operator_from_pb;
use trellis_proto::v1 as pb;

/// A worker's Ack. A malformed one (an unknown phase, a checkpoint ack without its report) is
/// an error the driver treats like a failed ack of that rank.
pub fn ack(a: pb::Ack) -> Ack {
    let phase = pb::AckPhase::try_from(a.phase).unwrap_or(pb::AckPhase::Unspecified);
    let checkpoint_io = !a.ok
        && a.failure == pb::FailureKind::CheckpointIo as i32
        && matches!(phase, pb::AckPhase::Checkpoint | pb::AckPhase::Commit);
    let result = if !a.ok {
        Err(a.error)
    } else {
        match (phase, a.result) {
            (pb::AckPhase::Assign, _) => Ok(AckKind::Assigned),
            (pb::AckPhase::Checkpoint, Some(pb::ack::Result::Checkpoint(c))) => {
                Ok(AckKind::Written(ShardAck {
                    step: Step(c.step),
                    tokens: c.tokens,
                    data_cursor: c.data_cursor,
                    report: c.report.as_ref().map(Into::into),
                }))
            }
            (pb::AckPhase::Commit, Some(pb::ack::Result::Commit(c))) => {
                Ok(AckKind::Finalized { dir: c.dir })
            }
            (pb::AckPhase::Stack, _) => Ok(AckKind::Phase(WorkerPhase::Stack)),
            (pb::AckPhase::Reshard, _) => Ok(AckKind::Phase(WorkerPhase::Reshard)),
            (pb::AckPhase::Resume, _) => Ok(AckKind::Phase(WorkerPhase::Resume)),
            (
                pb::AckPhase::Pause
                | pb::AckPhase::Unpause
                | pb::AckPhase::Evaluate
                | pb::AckPhase::AbortCheckpoint,
                _,
            ) => Ok(AckKind::Done),
            (p, _) => Err(format!(
                "malformed ack: phase {} (value {}) without the result it needs",
                p.label(),
                a.phase
            )),
        }
    };
    Ack {
        epoch: Epoch(a.epoch),
        generation: Generation(a.generation),
        cmd: CommandId(a.command_id),
        step: Step(a.step),
        rank: Rank(a.rank),
        phase: phase.label(),
        result,
        checkpoint_io,
    }
}

/// An operator's growth request. Whether the growth fits the model is judged by
/// `trellis_core::growth::plan` when the domain begins it.
pub fn grow_request(r: &pb::GrowRequest) -> Result<GrowRequest> {
    let operator = pb::GrowthOperator::try_from(r.operator).map_err(|_| {
        Error::InvalidArgument(format!(
            "unknown growth operator {}; choose one of {}",
            r.operator,
            trellis_core::growth::OPERATOR_NAMES.join(", ")
        ))
    })?;
    let optimizer = pb::OptimizerPolicy::try_from(r.optimizer).map_err(|_| {
        Error::InvalidArgument(format!(
            "unknown optimizer policy {}; use reset or carry",
            r.optimizer
        ))
    })?;
    Ok(GrowRequest {
        spec: GrowthSpec {
            factor: r.factor as usize,
            operator: operator_from_pb(operator, &r.stacking_list, r.mask_ramp_steps),
            optimizer: optimizer.into(),
        },
        at_step: r.at_step.map(Step),
        lr: r.lr,
        min_lr: r.min_lr,
        warmup_steps: r.warmup_steps,
    })
}

/// The NCCL unique ids a worker offers (`Hello.nccl_ids`, `NcclIds.ids`): each exactly 128
/// bytes, at most [`NCCL_IDS_OFFERED`].
pub fn nccl_ids(ids: &[Vec<u8>]) -> Result<VecDeque<Vec<u8>>> {
    if ids.len() > NCCL_IDS_OFFERED {
        return Err(Error::InvalidArgument(format!(
            "a worker offered {} NCCL ids; at most {NCCL_IDS_OFFERED} (one per group it may be rank 0 of)",
            ids.len()
        )));
    }
    if let Some(bad) = ids.iter().find(|id| id.len() != NCCL_ID_BYTES) {
        return Err(Error::InvalidArgument(format!(
            "an offered NCCL id has {} bytes; an ncclUniqueId has {NCCL_ID_BYTES}",
            bad.len()
        )));
    }
    Ok(ids.iter().cloned().collect())
}
