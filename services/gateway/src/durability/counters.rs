//! What reads and scrub/repair passes report: an unusable fragment, one
//! pass's tally, and the counters summed since start (`/metrics`).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

/// A fragment a read could not use, named for the reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FragmentProblem {
    pub object_id: String,
    pub index: u32,
    pub node: String,
    /// `missing` (never written, or gone), `unreachable`, `corrupt`.
    pub kind: &'static str,
    pub detail: String,
}

impl std::fmt::Display for FragmentProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} fragment {} on {}: {} ({})",
            self.object_id, self.index, self.node, self.kind, self.detail
        )
    }
}

/// What a scrub or repair found and did (the RPC's counters).
#[derive(Clone, Debug, Default)]
pub struct RepairTally {
    pub objects: u64,
    pub checked: u64,
    pub missing: u64,
    pub corrupt: u64,
    pub unreachable: u64,
    pub rebuilt: u64,
    pub moved: u64,
    /// Stores a crashed gateway left pending, rolled back by this pass.
    pub interrupted: u64,
    /// Objects on a node that no record names (a crash between a node's
    /// write and the record), removed.
    pub orphans: u64,
    pub failures: Vec<String>,
    pub actions: Vec<String>,
}

impl RepairTally {
    /// Adds another tally (a study repaired beside others) after this one.
    pub(crate) fn merge(&mut self, o: RepairTally) {
        self.objects += o.objects;
        self.checked += o.checked;
        self.missing += o.missing;
        self.corrupt += o.corrupt;
        self.unreachable += o.unreachable;
        self.rebuilt += o.rebuilt;
        self.moved += o.moved;
        self.interrupted += o.interrupted;
        self.orphans += o.orphans;
        self.failures.extend(o.failures);
        self.actions.extend(o.actions);
    }
}

/// Repair passes since start, summed (read by `/metrics`).
#[derive(Debug, Default)]
pub struct RepairCounters {
    pub passes: AtomicU64,
    pub checked: AtomicU64,
    pub missing: AtomicU64,
    pub corrupt: AtomicU64,
    pub unreachable: AtomicU64,
    pub rebuilt: AtomicU64,
    pub moved: AtomicU64,
    pub orphans: AtomicU64,
    pub interrupted: AtomicU64,
    pub failures: AtomicU64,
}

impl RepairCounters {
    /// Each counter with its metric name and help text (`/metrics`).
    pub fn fields(&self) -> [(&'static str, &'static str, &AtomicU64); 10] {
        [
            (
                "gateway_repair_passes",
                "Scrub/repair passes run (background and Repair RPCs)",
                &self.passes,
            ),
            (
                "gateway_repair_fragments_checked",
                "Fragments re-hashed on their nodes by repair passes",
                &self.checked,
            ),
            (
                "gateway_repair_fragments_missing",
                "Fragments found missing by repair passes",
                &self.missing,
            ),
            (
                "gateway_repair_fragments_corrupt",
                "Fragments found corrupt by repair passes",
                &self.corrupt,
            ),
            (
                "gateway_repair_fragments_unreachable",
                "Fragments on unreachable nodes at repair passes",
                &self.unreachable,
            ),
            (
                "gateway_repair_fragments_rebuilt",
                "Fragments rebuilt by repair passes",
                &self.rebuilt,
            ),
            (
                "gateway_repair_fragments_moved",
                "Fragments moved to another node by repair passes",
                &self.moved,
            ),
            (
                "gateway_repair_orphans_removed",
                "Objects no record names, removed by repair passes",
                &self.orphans,
            ),
            (
                "gateway_repair_interrupted_finished",
                "Interrupted stores rolled back by repair passes",
                &self.interrupted,
            ),
            (
                "gateway_repair_failures",
                "Objects repair passes could not bring back to full redundancy",
                &self.failures,
            ),
        ]
    }

    /// Adds one pass's tally.
    pub(crate) fn add(&self, t: &RepairTally) {
        self.passes.fetch_add(1, Relaxed);
        for (c, v) in [
            (&self.checked, t.checked),
            (&self.missing, t.missing),
            (&self.corrupt, t.corrupt),
            (&self.unreachable, t.unreachable),
            (&self.rebuilt, t.rebuilt),
            (&self.moved, t.moved),
            (&self.orphans, t.orphans),
            (&self.interrupted, t.interrupted),
            (&self.failures, t.failures.len() as u64),
        ] {
            c.fetch_add(v, Relaxed);
        }
    }
}
