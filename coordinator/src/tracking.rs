//! Experiment tracking for managed jobs: `metrics.jsonl` and TensorBoard event files in the
//! job's directory (`<checkpoint root>/<job>/`, the same layout a standalone run writes), fed
//! from rank 0's step reports, validation losses and growths.
//!
//! Writes happen on a thread of their own, never under the coordinator's lock; a directory
//! that cannot be written disables tracking with one warning and never touches the job.
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use tracing::warn;
use trellis_telemetry::tracker::{line_step, Tracker};

/// A handle to the tracking thread of one job.
pub struct RunTracker {
    tx: mpsc::Sender<(String, u64, Value)>,
    dir: PathBuf,
}

impl RunTracker {
    /// Start tracking into `dir`, from `first_step` on (lines of a previous coordinator at or
    /// after it are dropped: the job restarts there). `None` when `dir` cannot be written.
    pub fn open(dir: &Path, first_step: u64) -> Option<RunTracker> {
        let (tracker, _) = match Tracker::open(dir, first_step, |l| line_step(l) < first_step) {
            Ok(t) => t,
            Err(e) => {
                warn!(dir = %dir.display(), "experiment tracking is off: {e}");
                return None;
            }
        };
        let (tx, rx) = mpsc::channel::<(String, u64, Value)>();
        let shown = dir.display().to_string();
        std::thread::Builder::new()
            .name("trellis-tracking".into())
            .spawn(move || {
                let mut tracker = tracker;
                for (kind, step, fields) in rx {
                    if let Err(e) = tracker.event(&kind, step, fields) {
                        warn!(dir = %shown, "experiment tracking stopped: {e}");
                        return;
                    }
                }
            })
            .ok()?;
        Some(RunTracker {
            tx,
            dir: dir.to_path_buf(),
        })
    }

    /// Record one event (`train`, `val`, `growth`, …) of `step`; numbers in `fields` become
    /// TensorBoard scalars `<kind>/<field>`.
    pub fn record(&self, kind: &str, step: u64, fields: Value) {
        let _ = self.tx.send((kind.to_string(), step, fields));
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
