//! Integration tests: the real storage node, in-process on 127.0.0.1:0 (and
//! as a real process for crash safety), real mTLS with a generated PKI, real
//! redb files.
//!
//! * [`api`]: put/get/stat/list/delete, bad input, roles, bit rot;
//! * [`limits`]: capped streams, stalled clients, handshake and connection caps;
//! * [`input`]: undecodable requests, configuration, the bench;
//! * [`crash`]: SIGKILL mid-stream, key and database file modes;
//! * [`process`]: region-wise processing on real nodes.

mod api;
mod common;
mod crash;
mod input;
mod limits;
mod process;
