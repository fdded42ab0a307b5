//! Output commit on the primary: the guest's responses wait until the
//! backup has committed the epoch that produced them.
//!
//! The network device hands every response to [`HeldGate::submit`] on a
//! vCPU thread. While protected, a response is tagged with the open epoch
//! (the one that ends at the next checkpoint) and held; the epoch loop
//! closes the open epoch while the vCPUs are paused at a checkpoint
//! ([`HeldGate::close_epoch`]), and releases every response of epochs up to
//! `k` when the backup acks `k` ([`HeldGate::release`]). While unprotected
//! (no backup yet, or the backup was lost) responses leave at once, and
//! turning protection off releases everything held.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use crate::vmm::net::{Delivery, NetResponse, OutputGate};

#[derive(Debug)]
struct State {
    protected: bool,
    open_epoch: u64,
    held: VecDeque<(u64, NetResponse)>,
    held_bytes: u64,
}

/// The primary's [`OutputGate`].
#[derive(Debug)]
pub struct HeldGate {
    delivery: Delivery,
    state: Mutex<State>,
}

/// Responses and bytes currently held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Responses held.
    pub responses: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Epoch of the oldest held response.
    pub oldest_epoch: Option<u64>,
    /// The open epoch (responses submitted now belong to it).
    pub open_epoch: u64,
}

impl HeldGate {
    /// An unprotected gate (responses leave at once) releasing to
    /// `delivery`.
    pub fn new(delivery: Delivery) -> Self {
        HeldGate {
            delivery,
            state: Mutex::new(State {
                protected: false,
                open_epoch: 0,
                held: VecDeque::new(),
                held_bytes: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts holding output; `open_epoch` is the epoch that ends at the
    /// next checkpoint. Call with the vCPUs paused.
    pub fn protect(&self, open_epoch: u64) {
        let mut st = self.lock();
        st.protected = true;
        st.open_epoch = open_epoch;
    }

    /// Stops holding output and releases everything held (the backup is
    /// gone: the guest runs unprotected). Returns what was released.
    pub fn unprotect(&self) -> Held {
        let released: Vec<NetResponse> = {
            let mut st = self.lock();
            st.protected = false;
            st.held_bytes = 0;
            st.held.drain(..).map(|(_, r)| r).collect()
        };
        let held = Held {
            responses: released.len() as u64,
            bytes: released.iter().map(|r| r.frame.len() as u64).sum(),
            ..Held::default()
        };
        for r in released {
            self.delivery.deliver(r);
        }
        held
    }

    /// Whether output is held.
    pub fn is_protected(&self) -> bool {
        self.lock().protected
    }

    /// At a checkpoint (vCPUs paused): the responses submitted so far
    /// belong to the open epoch, which becomes `closed`; later ones belong
    /// to `closed + 1`.
    pub fn close_epoch(&self, closed: u64) {
        let mut st = self.lock();
        debug_assert!(!st.protected || st.open_epoch == closed);
        st.open_epoch = closed + 1;
    }

    /// The backup acked `epoch`: every response of epochs up to it leaves.
    pub fn release(&self, epoch: u64) -> Held {
        let released: Vec<NetResponse> = {
            let mut st = self.lock();
            let mut out = Vec::new();
            while st.held.front().is_some_and(|(e, _)| *e <= epoch) {
                let (_, r) = st.held.pop_front().expect("front exists");
                st.held_bytes -= r.frame.len() as u64;
                out.push(r);
            }
            out
        };
        let held = Held {
            responses: released.len() as u64,
            bytes: released.iter().map(|r| r.frame.len() as u64).sum(),
            ..Held::default()
        };
        for r in released {
            self.delivery.deliver(r);
        }
        held
    }

    /// What is held now.
    pub fn held(&self) -> Held {
        let st = self.lock();
        Held {
            responses: st.held.len() as u64,
            bytes: st.held_bytes,
            oldest_epoch: st.held.front().map(|(e, _)| *e),
            open_epoch: st.open_epoch,
        }
    }
}

impl OutputGate for HeldGate {
    fn submit(&self, response: NetResponse) {
        let mut st = self.lock();
        if st.protected {
            let e = st.open_epoch;
            st.held_bytes += response.frame.len() as u64;
            st.held.push_back((e, response));
        } else {
            drop(st);
            self.delivery.deliver(response);
        }
    }
}
