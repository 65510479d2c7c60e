//! Typed ids: never pass a bare integer where one of these is meant.
use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! int_id {
    ($(#[$m:meta])* $name:ident, $t:ty) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $t);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

macro_rules! str_id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_string())
            }
        }
    };
}

str_id!(
    /// A training job's name, as in the job spec.
    JobId
);
str_id!(
    /// A worker process, chosen by the worker at registration (host + pid + nonce).
    WorkerId
);
int_id!(
    /// A global rank in `0..world`.
    Rank,
    u32
);
int_id!(
    /// The model-structure generation: 0 at start, +1 at every growth.
    Generation,
    u64
);
int_id!(
    /// Optimizer steps completed.
    Step,
    u64
);
int_id!(
    /// A training-group incarnation: +1 at every (re)assignment of ranks (start, rollback,
    /// worker loss, coordinator recovery, re-layout).
    Epoch,
    u64
);
int_id!(
    /// A lockstep command's number within its epoch (1, 2, ...; 0 = none).
    CommandId,
    u64
);

/// This machine's host name (`$HOSTNAME`, else `/etc/hostname`, else `localhost`): the
/// default prefix of worker ids and coordinator election candidates.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
