//! Instances of one study rebuilt ahead of the reader (issue 14: retrieve
//! at the speed of the cores, not of one instance at a time): up to
//! [`READ_AHEAD`] instances are fetched, opened and rebuilt at once, each
//! under its own job permit (the memory budget still bounds them), and are
//! handed out in study order. Dropping the reader aborts what is still
//! being read.

use std::collections::VecDeque;
use std::sync::Arc;

use tessera_dicom::Profile;
use tokio::task::JoinHandle;

use super::Loaded;
use crate::error::GatewayError;
use crate::shared::keys::Key;
use crate::shared::{GatewayService, Result};
use crate::vault::{InstanceRecord, StudyRecord};

/// Instances of one study being read at once.
pub(super) const READ_AHEAD: usize = 4;

/// What every instance of the study is rebuilt with.
pub(super) struct Rebuild {
    pub(super) study: StudyRecord,
    /// Instances in the whole retrieve (the headers' `count`).
    pub(super) count: u32,
    pub(super) kmeta: Key,
    pub(super) kpx: Option<Key>,
    /// De-identify with this profile; `None` gives the stored file.
    pub(super) profile: Option<Profile>,
    pub(super) reidentify: bool,
}

/// The instances still to come, in order.
pub(super) struct ReadAhead {
    svc: GatewayService,
    rebuild: Arc<Rebuild>,
    rest: std::vec::IntoIter<(u32, InstanceRecord)>,
    reading: VecDeque<JoinHandle<Result<Loaded>>>,
}

impl ReadAhead {
    /// Starts reading `instances` (each with its index in the retrieve).
    pub(super) fn start(
        svc: &GatewayService,
        rebuild: Arc<Rebuild>,
        instances: Vec<(u32, InstanceRecord)>,
    ) -> Self {
        let mut this = Self {
            svc: svc.clone(),
            rebuild,
            rest: instances.into_iter(),
            reading: VecDeque::with_capacity(READ_AHEAD),
        };
        this.fill();
        this
    }

    fn fill(&mut self) {
        while self.reading.len() < READ_AHEAD {
            let Some((index, inst)) = self.rest.next() else {
                return;
            };
            let svc = self.svc.clone();
            let r = self.rebuild.clone();
            self.reading.push_back(tokio::spawn(async move {
                svc.load_instance(
                    &r.study,
                    &inst,
                    index,
                    r.count,
                    &r.kmeta,
                    r.kpx.as_ref(),
                    r.profile.as_ref(),
                    r.reidentify,
                )
                .await
            }));
        }
    }

    /// The next instance in order, or `None` after the last.
    pub(super) async fn next(&mut self) -> Option<Result<Loaded>> {
        let handle = self.reading.pop_front()?;
        let loaded = handle
            .await
            .unwrap_or_else(|e| Err(GatewayError::Internal(format!("reading an instance: {e}"))));
        self.fill();
        Some(loaded)
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        for handle in &self.reading {
            handle.abort();
        }
    }
}
