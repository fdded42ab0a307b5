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
        let mut st = self.lock();
        st.protected = false;
        let held = Held {
            responses: st.held.len() as u64,
            bytes: st.held_bytes,
            ..Held::default()
        };
        st.held_bytes = 0;
        // Delivered under the lock: a response submitted meanwhile (which
        // now leaves at once) must not overtake older ones of its
        // connection.
        for (_, r) in st.held.drain(..) {
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
        let mut st = self.lock();
        let mut held = Held::default();
        // Delivered in order and under the lock (see `unprotect`).
        while st.held.front().is_some_and(|(e, _)| *e <= epoch) {
            let (_, r) = st.held.pop_front().expect("front exists");
            let n = r.frame.len() as u64;
            st.held_bytes -= n;
            held.responses += 1;
            held.bytes += n;
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
            // Under the lock, so it cannot overtake a release in progress.
            self.delivery.deliver(response);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, OnceLock};

    use super::*;
    use crate::vmm::net::NetDevice;
    use crate::vmm::vcpu::VcpuWakers;

    /// A gate on a real network device without connections: every
    /// response that leaves the gate is counted as discarded by the
    /// device, so the count says what the gate let out.
    fn rig() -> (Arc<NetDevice>, Arc<HeldGate>) {
        let slot = Arc::new(OnceLock::new());
        let s = Arc::clone(&slot);
        let dev = NetDevice::new(Arc::new(VcpuWakers::default()), move |d| {
            let g = Arc::new(HeldGate::new(d));
            let _ = s.set(Arc::clone(&g));
            g as Arc<dyn OutputGate>
        });
        let gate = slot.get().cloned().expect("the device made its gate");
        (dev, gate)
    }

    fn resp(seq: u32) -> NetResponse {
        NetResponse {
            conn: 42,
            seq,
            frame: vec![0; 10],
        }
    }

    #[test]
    fn held_output_leaves_only_when_its_epoch_is_acked() {
        let (dev, gate) = rig();
        let out = || dev.stats().discarded_responses;
        gate.submit(resp(0));
        assert_eq!(out(), 1, "unprotected: at once");
        gate.protect(5);
        gate.submit(resp(1));
        gate.submit(resp(2));
        gate.close_epoch(5);
        gate.submit(resp(3));
        assert_eq!(out(), 1);
        assert_eq!(
            gate.held(),
            Held {
                responses: 3,
                bytes: 30,
                oldest_epoch: Some(5),
                open_epoch: 6
            }
        );
        assert_eq!(gate.release(4).responses, 0);
        assert_eq!(out(), 1);
        assert_eq!(gate.release(5).responses, 2);
        assert_eq!(out(), 3);
        gate.close_epoch(6);
        gate.close_epoch(7);
        assert_eq!(gate.release(7).responses, 1, "acks are cumulative");
        assert_eq!(out(), 4);
        assert_eq!(gate.held().responses, 0);
    }

    #[test]
    fn losing_the_backup_releases_everything_and_stops_holding() {
        let (dev, gate) = rig();
        gate.protect(1);
        for i in 0..4 {
            gate.submit(resp(i));
        }
        gate.close_epoch(1);
        gate.submit(resp(9));
        assert_eq!(dev.stats().discarded_responses, 0);
        assert_eq!(gate.unprotect().responses, 5);
        assert!(!gate.is_protected());
        assert_eq!(dev.stats().discarded_responses, 5);
        gate.submit(resp(10));
        assert_eq!(dev.stats().discarded_responses, 6);
    }
}
