//! The one place store keys are built (docs/design.md §7). Layout, version 1:
//!
//! ```text
//! /trellis/v1/jobs/<job>/spec
//! /trellis/v1/jobs/<job>/state
//! /trellis/v1/jobs/<job>/checkpoints/<step, 20 digits>
//! /trellis/v1/jobs/<job>/growth/<generation, 20 digits>
//! /trellis/v1/jobs/<job>/loss/<step, 20 digits>
//! /trellis/v1/workers/<worker>
//! /trellis/v1/leader                       (the coordinator election key)
//! ```
//!
//! Numbers are zero-padded to 20 digits (u64::MAX has 20) so a prefix listing, which sorts by
//! key bytes, is in numeric order. Ids must be non-empty and must not contain `/`
//! ([`check_segment`]).
use trellis_core::ids::{Generation, JobId, Step, WorkerId};

pub const ROOT: &str = "/trellis/v1/";

/// Reject an id that would break the layout (empty, or containing `/`).
pub fn check_segment(what: &str, id: &str) -> crate::Result<()> {
    if id.is_empty() || id.contains('/') || id.chars().any(|c| c.is_control()) {
        return Err(crate::Error::Invalid(format!(
            "{what} {id:?} must be non-empty and contain no '/' or control characters"
        )));
    }
    Ok(())
}

fn num(n: u64) -> String {
    format!("{n:020}")
}

/// `/trellis/v1/jobs/` — list it to find every job's keys.
pub fn jobs_prefix() -> String {
    format!("{ROOT}jobs/")
}
/// `/trellis/v1/jobs/<job>/`
pub fn job_prefix(job: &JobId) -> String {
    format!("{ROOT}jobs/{job}/")
}
pub fn job_spec(job: &JobId) -> String {
    format!("{}spec", job_prefix(job))
}
pub fn job_state(job: &JobId) -> String {
    format!("{}state", job_prefix(job))
}
pub fn checkpoints_prefix(job: &JobId) -> String {
    format!("{}checkpoints/", job_prefix(job))
}
pub fn checkpoint(job: &JobId, step: Step) -> String {
    format!("{}{}", checkpoints_prefix(job), num(step.0))
}
pub fn growth_prefix(job: &JobId) -> String {
    format!("{}growth/", job_prefix(job))
}
/// One growth's record: its plan's inputs and, once done, `based_on` — the recorded checkpoint
/// it applies to, so that "checkpoint + plan" is a restore point (docs/design.md §3).
pub fn growth(job: &JobId, generation: Generation) -> String {
    format!("{}{}", growth_prefix(job), num(generation.0))
}
pub fn loss_prefix(job: &JobId) -> String {
    format!("{}loss/", job_prefix(job))
}
/// One loss record (or a chunk of loss history starting at `step`).
pub fn loss(job: &JobId, step: Step) -> String {
    format!("{}{}", loss_prefix(job), num(step.0))
}
pub fn workers_prefix() -> String {
    format!("{ROOT}workers/")
}
pub fn worker(id: &WorkerId) -> String {
    format!("{}{id}", workers_prefix())
}
/// The coordinator election key (pass it to `StateStore::campaign`).
pub fn leader() -> String {
    format!("{ROOT}leader")
}

fn tail_num(key: &str, prefix: &str) -> Option<u64> {
    let t = key.strip_prefix(prefix)?;
    if t.len() != 20 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

/// The step of a key built by [`checkpoint`].
pub fn parse_checkpoint(job: &JobId, key: &str) -> Option<Step> {
    tail_num(key, &checkpoints_prefix(job)).map(Step)
}
/// The generation of a key built by [`growth`].
pub fn parse_growth(job: &JobId, key: &str) -> Option<Generation> {
    tail_num(key, &growth_prefix(job)).map(Generation)
}
/// The step of a key built by [`loss`].
pub fn parse_loss(job: &JobId, key: &str) -> Option<Step> {
    tail_num(key, &loss_prefix(job)).map(Step)
}
/// The job of a key built by [`job_spec`] (list [`jobs_prefix`] and keep the `Some`s).
pub fn parse_job_spec(key: &str) -> Option<JobId> {
    let rest = key.strip_prefix(&jobs_prefix())?;
    let job = rest.strip_suffix("/spec")?;
    (!job.is_empty() && !job.contains('/')).then(|| JobId(job.to_string()))
}
/// The worker of a key built by [`worker`].
pub fn parse_worker(key: &str) -> Option<WorkerId> {
    let id = key.strip_prefix(&workers_prefix())?;
    (!id.is_empty() && !id.contains('/')).then(|| WorkerId(id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let j = JobId::from("tiny");
        assert_eq!(job_spec(&j), "/trellis/v1/jobs/tiny/spec");
        assert_eq!(job_state(&j), "/trellis/v1/jobs/tiny/state");
        assert_eq!(
            checkpoint(&j, Step(42)),
            "/trellis/v1/jobs/tiny/checkpoints/00000000000000000042"
        );
        assert_eq!(
            growth(&j, Generation(1)),
            "/trellis/v1/jobs/tiny/growth/00000000000000000001"
        );
        assert_eq!(worker(&WorkerId::from("h-1")), "/trellis/v1/workers/h-1");
        assert_eq!(leader(), "/trellis/v1/leader");
        assert!(checkpoint(&j, Step(42)).starts_with(&checkpoints_prefix(&j)));
        assert!(job_spec(&j).starts_with(&job_prefix(&j)));
    }

    #[test]
    fn numeric_order_and_roundtrip() {
        let j = JobId::from("j");
        let mut ks: Vec<String> = [100u64, 9, 10, u64::MAX, 0]
            .iter()
            .map(|s| checkpoint(&j, Step(*s)))
            .collect();
        ks.sort();
        let steps: Vec<u64> = ks
            .iter()
            .map(|k| parse_checkpoint(&j, k).unwrap().0)
            .collect();
        assert_eq!(steps, vec![0, 9, 10, 100, u64::MAX]);
        assert_eq!(
            parse_growth(&j, &growth(&j, Generation(7))),
            Some(Generation(7))
        );
        assert_eq!(parse_loss(&j, &loss(&j, Step(3))), Some(Step(3)));
        assert_eq!(parse_job_spec(&job_spec(&j)), Some(j.clone()));
        assert_eq!(parse_job_spec(&job_state(&j)), None);
        assert_eq!(parse_checkpoint(&j, &job_state(&j)), None);
        assert_eq!(
            parse_worker(&worker(&WorkerId::from("w"))),
            Some(WorkerId::from("w"))
        );
    }

    #[test]
    fn segments() {
        assert!(check_segment("job", "ok-1.x").is_ok());
        for bad in ["", "a/b", "a\nb"] {
            assert!(check_segment("job", bad).is_err());
        }
    }
}
