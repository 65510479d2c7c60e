//! The collective backend of a process group, and the relay of NCCL unique ids
//! (docs/parallelism.md, "NCCL"). Pure functions of what the workers reported in `Hello`: the
//! coordinator calls them when it forms an epoch's groups.
//!
//! * [`choose`]: a group of one is `solo`; a group of CPU ranks uses the TCP `ring`; a group of
//!   CUDA ranks that can all load NCCL uses `nccl`. A group mixing CUDA and CPU ranks, or of
//!   CUDA ranks of which one cannot load NCCL, is refused with one line saying which worker
//!   and what to do.
//! * [`relay`]: an NCCL group needs a unique id made in the process of its rank 0 (NCCL's
//!   bootstrap root runs there) and used once. Workers offer fresh ids; [`relay`] takes one
//!   from each NCCL group's rank 0, or takes none and names the rank still owing one.
use std::collections::VecDeque;

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const NCCL_ID_BYTES: usize = 128;

/// How many fresh ids a worker offers: it can be rank 0 of its DP group and of its TP group.
pub const NCCL_IDS_OFFERED: usize = 2;

/// The collective backend of one process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A group of one: every collective is the identity.
    Solo,
    /// The TCP ring over host memory (CPU ranks).
    Ring,
    /// NCCL over device memory (CUDA ranks). The group's TCP ring still carries the
    /// control-plane agreements (step and command numbers, barriers, small gathers).
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Solo => "solo",
            Backend::Ring => "ring",
            Backend::Nccl => "nccl",
        }
    }

    /// The backend named `s` (`solo`, `ring`, `nccl`); the empty string (an assignment of a
    /// coordinator from before backends were chosen) is `None`.
    pub fn parse(s: &str) -> Result<Option<Backend>, String> {
        match s {
            "" => Ok(None),
            "solo" => Ok(Some(Backend::Solo)),
            "ring" => Ok(Some(Backend::Ring)),
            "nccl" => Ok(Some(Backend::Nccl)),
            other => Err(format!(
                "unknown collective backend '{other}'; expected solo, ring or nccl (is this worker older than its coordinator?)"
            )),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a worker said about itself in `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub worker: String,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// CUDA and NCCL both load on it.
    pub nccl: bool,
}

/// Whether `device` names a CUDA device.
pub fn is_cuda(device: &str) -> bool {
    device == "cuda" || device.starts_with("cuda:")
}

/// The backend of a group of `members` (in group-rank order), or why the group cannot run.
pub fn choose(members: &[Member]) -> Result<Backend, String> {
    if members.len() <= 1 {
        return Ok(Backend::Solo);
    }
    let cuda: Vec<&Member> = members.iter().filter(|m| is_cuda(&m.device)).collect();
    if cuda.is_empty() {
        return Ok(Backend::Ring);
    }
    if let Some(cpu) = members.iter().find(|m| !is_cuda(&m.device)) {
        return Err(format!(
            "a group would mix CUDA and CPU ranks ({} on {}, {} on {}); run every rank of a job on the same kind of device",
            cuda[0].worker,
            cuda[0].device,
            cpu.worker,
            if cpu.device.is_empty() { "cpu" } else { &cpu.device }
        ));
    }
    if let Some(m) = cuda.iter().find(|m| !m.nccl) {
        return Err(format!(
            "worker {} on {} cannot load NCCL, which CUDA ranks need to share gradients; install NCCL there (libnccl.so on LD_LIBRARY_PATH) or run the job on CPU workers",
            m.worker, m.device
        ));
    }
    Ok(Backend::Nccl)
}

/// The DP group's and the TP group's backend of a DP × TP world whose ranks (TP-major: global
/// rank `d * tp + t`) are `members`. Every group of a kind gets the same backend (the groups of
/// one kind are the same size, and a world that mixes devices is refused by some group).
pub fn choose_layout(
    dp: usize,
    tp: usize,
    members: &[Member],
) -> Result<(Backend, Backend), String> {
    assert_eq!(members.len(), dp * tp, "one member per rank");
    let group = |ranks: Vec<usize>| -> Vec<Member> {
        ranks.into_iter().map(|r| members[r].clone()).collect()
    };
    let mut tp_backend = Backend::Solo;
    for d in 0..dp {
        tp_backend = choose(&group((0..tp).map(|t| d * tp + t).collect()))?;
    }
    let mut dp_backend = Backend::Solo;
    for t in 0..tp {
        dp_backend = choose(&group((0..dp).map(|d| d * tp + t).collect()))?;
    }
    Ok((dp_backend, tp_backend))
}

/// The NCCL ids of one epoch: `dp[t]` for the DP group of TP rank `t` (its rank 0 is global
/// rank `t`), `tp[d]` for the TP group of DP rank `d` (its rank 0 is global rank `d * tp`).
/// Empty for a kind whose backend is not NCCL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayedIds {
    pub dp: Vec<Vec<u8>>,
    pub tp: Vec<Vec<u8>>,
}

impl RelayedIds {
    /// The ids of global rank `rank`'s (DP group, TP group), empty where not NCCL.
    pub fn for_rank(&self, rank: usize, tp: usize) -> (Vec<u8>, Vec<u8>) {
        let (d, t) = (rank / tp, rank % tp);
        (
            self.dp.get(t).cloned().unwrap_or_default(),
            self.tp.get(d).cloned().unwrap_or_default(),
        )
    }
}

/// Take one fresh id from the offers of every NCCL group's rank 0 (`offers[r]`: global rank
/// `r`'s offered, unused ids, oldest first). All or nothing: when a rank 0 has too few ids,
/// nothing is taken and the error is that global rank (it will offer more after its current
/// assignment). A taken id leaves the offers, so it is never relayed twice.
pub fn relay(
    dp: usize,
    tp: usize,
    backends: (Backend, Backend),
    offers: &mut [VecDeque<Vec<u8>>],
) -> Result<RelayedIds, usize> {
    assert_eq!(offers.len(), dp * tp, "one offer list per rank");
    let mut need = vec![0usize; dp * tp];
    if backends.0 == Backend::Nccl {
        for t in 0..tp {
            need[t] += 1;
        }
    }
    if backends.1 == Backend::Nccl {
        for d in 0..dp {
            need[d * tp] += 1;
        }
    }
    if let Some(r) = (0..dp * tp).find(|&r| offers[r].len() < need[r]) {
        return Err(r);
    }
    let mut ids = RelayedIds::default();
    if backends.0 == Backend::Nccl {
        ids.dp = (0..tp)
            .map(|t| offers[t].pop_front().expect("checked"))
            .collect();
    }
    if backends.1 == Backend::Nccl {
        ids.tp = (0..dp)
            .map(|d| offers[d * tp].pop_front().expect("checked"))
            .collect();
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(worker: &str, device: &str, nccl: bool) -> Member {
        Member {
            worker: worker.into(),
            device: device.into(),
            nccl,
        }
    }

    #[test]
    fn backend_per_group() {
        assert_eq!(choose(&[m("a", "cuda:0", false)]), Ok(Backend::Solo));
        assert_eq!(choose(&[m("a", "cpu", false)]), Ok(Backend::Solo));
        assert_eq!(
            choose(&[m("a", "cpu", false), m("b", "cpu", true)]),
            Ok(Backend::Ring)
        );
        assert_eq!(
            choose(&[m("a", "cuda:0", true), m("b", "cuda", true)]),
            Ok(Backend::Nccl)
        );
        let mixed = choose(&[m("a", "cpu", false), m("b", "cuda:1", true)]).unwrap_err();
        assert!(
            mixed.contains("mix CUDA and CPU")
                && mixed.contains("b on cuda:1")
                && mixed.contains("a on cpu"),
            "{mixed}"
        );
        assert!(!mixed.contains('\n'));
        let no_nccl = choose(&[m("a", "cuda:0", true), m("b", "cuda:0", false)]).unwrap_err();
        assert!(
            no_nccl.contains("worker b on cuda:0 cannot load NCCL"),
            "{no_nccl}"
        );
    }

    #[test]
    fn layout_backends() {
        let cuda: Vec<Member> = (0..4)
            .map(|i| m(&format!("w{i}"), "cuda:0", true))
            .collect();
        assert_eq!(
            choose_layout(2, 2, &cuda),
            Ok((Backend::Nccl, Backend::Nccl))
        );
        assert_eq!(
            choose_layout(4, 1, &cuda),
            Ok((Backend::Nccl, Backend::Solo))
        );
        assert_eq!(
            choose_layout(1, 4, &cuda),
            Ok((Backend::Solo, Backend::Nccl))
        );
        let cpu: Vec<Member> = (0..4).map(|i| m(&format!("w{i}"), "cpu", false)).collect();
        assert_eq!(
            choose_layout(2, 2, &cpu),
            Ok((Backend::Ring, Backend::Ring))
        );
        // One CPU worker among CUDA ones: its TP group (ranks 2, 3) refuses.
        let mut mixed = cuda.clone();
        mixed[3] = m("w3", "cpu", false);
        let e = choose_layout(2, 2, &mixed).unwrap_err();
        assert!(e.contains("w2 on cuda:0") && e.contains("w3 on cpu"), "{e}");
    }

    fn id(tag: u8) -> Vec<u8> {
        vec![tag; NCCL_ID_BYTES]
    }

    #[test]
    fn relay_takes_rank_zeros_ids_once() {
        // DP = 2 × TP = 2: DP groups {0, 2} (root 0) and {1, 3} (root 1); TP groups {0, 1}
        // (root 0) and {2, 3} (root 2).
        let mut offers: Vec<VecDeque<Vec<u8>>> = (0..4u8)
            .map(|r| VecDeque::from(vec![id(10 * r + 1), id(10 * r + 2)]))
            .collect();
        let nccl = (Backend::Nccl, Backend::Nccl);
        let ids = relay(2, 2, nccl, &mut offers).unwrap();
        assert_eq!(ids.dp, vec![id(1), id(11)]);
        assert_eq!(ids.tp, vec![id(2), id(21)]);
        // Every rank gets its groups' roots' ids; DP and TP ids differ.
        assert_eq!(ids.for_rank(0, 2), (id(1), id(2)));
        assert_eq!(ids.for_rank(1, 2), (id(11), id(2)));
        assert_eq!(ids.for_rank(2, 2), (id(1), id(21)));
        assert_eq!(ids.for_rank(3, 2), (id(11), id(21)));
        // Taken ids left the offers: rank 0 used both, rank 1 and 2 one each, rank 3 none.
        let left: Vec<usize> = offers.iter().map(|o| o.len()).collect();
        assert_eq!(left, vec![0, 1, 1, 2]);
        // The next epoch cannot reuse them: rank 0 owes fresh ids, and nothing is taken.
        let before = offers.clone();
        assert_eq!(relay(2, 2, nccl, &mut offers), Err(0));
        assert_eq!(offers, before);
        // Fresh offers (they replace the old ones) make a new epoch with new ids.
        for (r, o) in offers.iter_mut().enumerate() {
            *o = VecDeque::from(vec![id(100 + 10 * r as u8), id(101 + 10 * r as u8)]);
        }
        let next = relay(2, 2, nccl, &mut offers).unwrap();
        for (a, b) in next
            .dp
            .iter()
            .chain(&next.tp)
            .zip(ids.dp.iter().chain(&ids.tp))
        {
            assert_ne!(a, b);
        }
        assert_eq!(next.dp, vec![id(100), id(110)]);
        assert_eq!(next.tp, vec![id(101), id(120)]);
    }

    #[test]
    fn relay_takes_nothing_without_nccl() {
        let mut offers: Vec<VecDeque<Vec<u8>>> = vec![VecDeque::new(); 4];
        let ids = relay(2, 2, (Backend::Ring, Backend::Ring), &mut offers).unwrap();
        assert_eq!(ids, RelayedIds::default());
        assert_eq!(ids.for_rank(3, 2), (vec![], vec![]));
        // DP only (TP = 1): every rank-0 of a DP group is global rank t.
        let mut offers: Vec<VecDeque<Vec<u8>>> =
            (0..3u8).map(|r| VecDeque::from(vec![id(r)])).collect();
        let ids = relay(3, 1, (Backend::Nccl, Backend::Solo), &mut offers).unwrap();
        assert_eq!(ids.dp, vec![id(0)]);
        assert!(ids.tp.is_empty());
        assert_eq!(ids.for_rank(2, 1), (id(0), vec![]));
    }
}
