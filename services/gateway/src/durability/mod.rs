//! Erasure-coded placement, writes, reads and deletes of stored objects
//! (`[erasure]` in the config; `tessera-erasure` does the coding).
//!
//! * **Placement**: each object's `k + m` fragments go to `k + m` distinct
//!   healthy nodes, ranked by rendezvous hashing of the object id and
//!   spread across zones first, so no node holds two fragments of one
//!   object and a zone loses as few as it can.
//! * **Writes** are acknowledged once `write_quorum` fragments (default
//!   k + 1) are durable; a fragment that could not be written is recorded
//!   as missing (for repair), never silently dropped.
//! * **Reads** start with the `k` preferred fragments and fetch another
//!   at once when one is missing, unreachable or fails its recorded
//!   SHA-256 (every such fragment is named in the log and the reports), and
//!   one more each `hedge_after_ms` while k verified fragments are not in
//!   (a slow cloud costs that delay, not its own).
//!
//! An object without an erasure record is stored whole on one node (the
//! records written before erasure coding, or a gateway without
//! `[erasure]`): the functions here fall back to that.
//!
//! Files: `placement.rs` (zone-aware ranking of nodes, the proto form of a
//! placement), `put.rs` (spreading an object's fragments, writing and
//! deleting them), `read.rs` (the hedged read), `repair.rs` (scrub and
//! repair of stored objects, interrupted stores), `sweep.rs` (the orphan
//! sweep), `counters.rs` (what reads and passes report; `/metrics`).
//! `placement` and `counters` import neither `shared` nor the files that
//! do (only `upstream` and `vault` types), so `shared` may use them
//! without an import circle (`tools/crate_graph.py` checks).

pub(crate) mod counters;
pub(crate) mod placement;
mod put;
mod read;
mod repair;
mod sweep;

pub use counters::{FragmentProblem, RepairCounters, RepairTally};
pub(crate) use placement::placement_to_proto;
pub(crate) use repair::{Pacer, Pass};
pub(crate) use sweep::DEFAULT_ORPHAN_GRACE_SECS;
