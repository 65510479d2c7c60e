//! Conversions between the wire types of `trellis.v1` and the domain types of `trellis-core`:
//! the one place both edges (the coordinator's handlers, the worker's agent, `coordctl`) turn
//! messages into domain values and back.
use crate::v1 as pb;
use std::collections::BTreeMap;
use trellis_core::checkpoint::{FileEntry, ShardKind, ShardReport, SliceEntry, TensorEntry};
use trellis_core::growth::{Operator, OptimizerPolicy};

impl From<&ShardReport> for pb::ShardReport {
    fn from(r: &ShardReport) -> Self {
        pb::ShardReport {
            files: r
                .files
                .iter()
                .map(|f| pb::ShardFile {
                    path: f.path.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                })
                .collect(),
            tensors: r
                .tensors
                .iter()
                .map(|(name, t)| pb::ShardTensor {
                    name: name.clone(),
                    optimizer: t.kind == ShardKind::Optim,
                    shape: t.shape.iter().map(|&d| d as u64).collect(),
                    dtype: t.dtype.clone(),
                    shard_dim: t.shard_dim.map(|d| d as u32),
                    slices: t
                        .slices
                        .iter()
                        .map(|s| pb::ShardSlice {
                            file: s.file.clone(),
                            offset: s.offset as u64,
                            length: s.length as u64,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl From<&pb::ShardReport> for ShardReport {
    fn from(r: &pb::ShardReport) -> Self {
        ShardReport {
            files: r
                .files
                .iter()
                .map(|f| FileEntry {
                    path: f.path.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                })
                .collect(),
            tensors: r
                .tensors
                .iter()
                .map(|t| {
                    (
                        t.name.clone(),
                        TensorEntry {
                            kind: if t.optimizer {
                                ShardKind::Optim
                            } else {
                                ShardKind::Model
                            },
                            shape: t.shape.iter().map(|&d| d as usize).collect(),
                            dtype: t.dtype.clone(),
                            shard_dim: t.shard_dim.map(|d| d as usize),
                            slices: t
                                .slices
                                .iter()
                                .map(|s| SliceEntry {
                                    file: s.file.clone(),
                                    offset: s.offset as usize,
                                    length: s.length as usize,
                                })
                                .collect(),
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
        }
    }
}

/// The domain operator of a wire `(operator, stacking_list, mask_ramp_steps)`. Whether it can
/// be applied to a model (depth, indices, factor) is judged by `trellis_core::growth::plan`.
pub fn operator_from_pb(op: pb::GrowthOperator, stacking_list: &[u32], mask_ramp: u64) -> Operator {
    match op {
        pb::GrowthOperator::Unspecified | pb::GrowthOperator::Stack => Operator::Stack,
        pb::GrowthOperator::Interpolate => Operator::Interpolate,
        pb::GrowthOperator::Middle => Operator::Middle,
        pb::GrowthOperator::Zero => Operator::Zero,
        pb::GrowthOperator::Random => Operator::Random {
            mask_ramp_steps: mask_ramp,
        },
        pb::GrowthOperator::StackingList => Operator::StackingList {
            layers: stacking_list.iter().map(|&l| l as usize).collect(),
        },
    }
}

/// The wire form of an operator: `(operator, stacking_list, mask_ramp_steps)`.
pub fn operator_to_pb(op: &Operator) -> (pb::GrowthOperator, Vec<u32>, u64) {
    match op {
        Operator::Stack => (pb::GrowthOperator::Stack, vec![], 0),
        Operator::Interpolate => (pb::GrowthOperator::Interpolate, vec![], 0),
        Operator::Middle => (pb::GrowthOperator::Middle, vec![], 0),
        Operator::Zero => (pb::GrowthOperator::Zero, vec![], 0),
        Operator::Random { mask_ramp_steps } => {
            (pb::GrowthOperator::Random, vec![], *mask_ramp_steps)
        }
        Operator::StackingList { layers } => (
            pb::GrowthOperator::StackingList,
            layers.iter().map(|&l| l as u32).collect(),
            0,
        ),
    }
}

/// The wire operator for a name (`stack`, `random`, ...), for clients that take names.
pub fn operator_by_name(name: &str) -> Option<pb::GrowthOperator> {
    Some(match name.trim().to_ascii_lowercase().as_str() {
        "" | "stack" | "g_stack" | "gstack" => pb::GrowthOperator::Stack,
        "interpolate" => pb::GrowthOperator::Interpolate,
        "middle" => pb::GrowthOperator::Middle,
        "zero" => pb::GrowthOperator::Zero,
        "random" => pb::GrowthOperator::Random,
        "stacking_list" => pb::GrowthOperator::StackingList,
        _ => return None,
    })
}

impl From<OptimizerPolicy> for pb::OptimizerPolicy {
    fn from(o: OptimizerPolicy) -> Self {
        match o {
            OptimizerPolicy::Reset => pb::OptimizerPolicy::Reset,
            OptimizerPolicy::Carry => pb::OptimizerPolicy::Carry,
        }
    }
}

impl From<pb::OptimizerPolicy> for OptimizerPolicy {
    fn from(o: pb::OptimizerPolicy) -> Self {
        match o {
            pb::OptimizerPolicy::Carry => OptimizerPolicy::Carry,
            pb::OptimizerPolicy::Unspecified | pb::OptimizerPolicy::Reset => OptimizerPolicy::Reset,
        }
    }
}

impl pb::AckPhase {
    /// A short lowercase name for logs and error messages.
    pub fn label(self) -> &'static str {
        use pb::AckPhase::*;
        match self {
            Unspecified => "unspecified",
            Assign => "assign",
            Agree => "agree",
            Step => "step",
            Evaluate => "evaluate",
            Checkpoint => "checkpoint",
            Commit => "commit",
            Pause => "pause",
            Unpause => "unpause",
            Stack => "stack",
            Reshard => "reshard",
            Resume => "resume",
            AbortCheckpoint => "abort_checkpoint",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_round_trip_through_the_wire() {
        for op in [
            Operator::Stack,
            Operator::Interpolate,
            Operator::Middle,
            Operator::Zero,
            Operator::Random { mask_ramp_steps: 7 },
            Operator::StackingList {
                layers: vec![0, 1, 0, 1, 1],
            },
        ] {
            let (o, list, ramp) = operator_to_pb(&op);
            assert_eq!(operator_from_pb(o, &list, ramp), op);
            assert_eq!(operator_by_name(op.name()), Some(o));
        }
        assert_eq!(operator_by_name("nope"), None);
    }
}
