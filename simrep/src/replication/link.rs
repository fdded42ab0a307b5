//! The primary's link to its backup: one thread with a tokio runtime that
//! connects (and reconnects), authenticates, sends what the epoch loop
//! queues, reads acks, and sends heartbeats when idle.
//!
//! Every connection is a *session* with a number. The epoch loop learns of
//! a new session from [`LinkEvent::Up`], synchronises the backup on it and
//! tags everything it queues with that session; messages of an older
//! session are dropped. Acks release the held output at once, on the link
//! thread ([`HeldGate::release`]), so a client's latency does not wait for
//! the epoch loop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::gate::HeldGate;
use super::protocol::{Message, PreSharedKey, Welcome};
use super::transport::{self, TransportError};

/// Link settings.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// The backup's replication address.
    pub backup: SocketAddr,
    /// The pre-shared key.
    pub key: PreSharedKey,
    /// No record from the backup for this long: it is lost.
    pub timeout: Duration,
    /// Send a heartbeat when nothing was sent for this long.
    pub heartbeat: Duration,
    /// Wait between connection attempts.
    pub reconnect: Duration,
}

/// What the epoch loop queues for the backup.
#[derive(Debug)]
pub struct Outgoing {
    /// The session the messages belong to.
    pub session: u64,
    /// The epoch they carry (`None`: a synchronisation).
    pub epoch: Option<u64>,
    /// The messages, in order.
    pub messages: Vec<Message>,
    /// When they were queued.
    pub queued: Instant,
}

/// What the link tells the epoch loop.
#[derive(Debug)]
pub enum LinkEvent {
    /// A backup connected and authenticated.
    Up {
        /// The new session.
        session: u64,
        /// The backup's address.
        peer: SocketAddr,
        /// What the backup holds.
        welcome: Welcome,
    },
    /// An epoch's last record was written to the socket.
    Sent {
        /// The session.
        session: u64,
        /// The epoch.
        epoch: u64,
        /// From queueing to the last byte written.
        send: Duration,
        /// Bytes of records written for it.
        bytes: u64,
    },
    /// The backup committed an epoch (its output is already released).
    Acked {
        /// The session.
        session: u64,
        /// The epoch.
        epoch: u64,
        /// When the ack arrived.
        at: Instant,
    },
    /// The session ended.
    Down {
        /// The session.
        session: u64,
        /// Why.
        reason: String,
    },
}

/// The running link.
#[derive(Debug)]
pub struct Link {
    tx: mpsc::Sender<Outgoing>,
    events: std_mpsc::Receiver<LinkEvent>,
    up: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Epochs the link may have queued, beyond the one it is sending, before
/// the epoch loop waits (when the link cannot keep up, the epoch
/// stretches; a deeper queue would only delay held output further).
pub const QUEUE_EPOCHS: usize = 1;

impl Link {
    /// Starts the link thread.
    ///
    /// # Errors
    ///
    /// When the thread or its runtime cannot be created.
    pub fn start(opts: LinkOptions, gate: Option<Arc<HeldGate>>) -> std::io::Result<Link> {
        let (tx, rx) = mpsc::channel(QUEUE_EPOCHS);
        let (etx, events) = std_mpsc::channel();
        let up = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (up2, stop2) = (Arc::clone(&up), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("simrep-link".into())
            .spawn(move || rt.block_on(run(opts, gate, rx, etx, up2, stop2)))?;
        Ok(Link {
            tx,
            events,
            up,
            stop,
            thread: Some(thread),
        })
    }

    /// The live session (0: none).
    pub fn session(&self) -> u64 {
        self.up.load(Ordering::Acquire)
    }

    /// Next event, if any.
    pub fn try_event(&self) -> Option<LinkEvent> {
        self.events.try_recv().ok()
    }

    /// Queues messages of `out.session`, waiting while the queue is full
    /// (the link is slower than the guest dirties memory: the epoch
    /// stretches). Returns false, dropping them, when that session ended.
    pub fn send(&self, mut out: Outgoing) -> bool {
        loop {
            if self.session() != out.session || self.stop.load(Ordering::Relaxed) {
                return false;
            }
            match self.tx.try_send(out) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(o)) => {
                    out = o;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
    }

    /// Says goodbye to the backup (if connected) and stops the thread.
    pub fn shutdown(&mut self, reason: &str) {
        let session = self.session();
        if session != 0 {
            let _ = self.tx.try_send(Outgoing {
                session,
                epoch: None,
                messages: vec![Message::Goodbye {
                    reason: reason.to_owned(),
                }],
                queued: Instant::now(),
            });
            // Let the writer send it.
            let t = Instant::now();
            while self.tx.capacity() < QUEUE_EPOCHS && t.elapsed() < Duration::from_millis(500) {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn run(
    opts: LinkOptions,
    gate: Option<Arc<HeldGate>>,
    mut rx: mpsc::Receiver<Outgoing>,
    events: std_mpsc::Sender<LinkEvent>,
    up: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut session = 0u64;
    let mut failures = 0u32;
    while !stop.load(Ordering::Relaxed) {
        // Whatever was queued for an ended session is dropped.
        while rx.try_recv().is_ok() {}
        let conn = match transport::connect(opts.backup, opts.key.clone()).await {
            Ok(c) => c,
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(backup = %opts.backup, "cannot reach the backup: {e}; retrying every {:?}", opts.reconnect);
                } else {
                    tracing::debug!(backup = %opts.backup, "still cannot reach the backup: {e}");
                }
                failures += 1;
                sleep_unless_stopped(opts.reconnect, &stop).await;
                continue;
            }
        };
        failures = 0;
        let peer = conn.peer;
        let mut reader = conn.reader;
        let mut writer = conn.writer;
        let welcome = match tokio::time::timeout(opts.timeout, reader.next()).await {
            Ok(Ok(Message::Welcome(w))) => w,
            Ok(Ok(other)) => {
                tracing::warn!(%peer, "backup sent {} instead of Welcome", other.name());
                sleep_unless_stopped(opts.reconnect, &stop).await;
                continue;
            }
            Ok(Err(e)) => {
                tracing::warn!(%peer, "backup closed before its Welcome: {e}");
                sleep_unless_stopped(opts.reconnect, &stop).await;
                continue;
            }
            Err(_) => {
                tracing::warn!(%peer, "backup sent no Welcome within {:?}", opts.timeout);
                sleep_unless_stopped(opts.reconnect, &stop).await;
                continue;
            }
        };
        session += 1;
        up.store(session, Ordering::Release);
        let _ = events.send(LinkEvent::Up {
            session,
            peer,
            welcome,
        });
        let reason = {
            let events_r = events.clone();
            let gate_r = gate.clone();
            let timeout = opts.timeout;
            let mut read_task = tokio::spawn(async move {
                loop {
                    let msg = match reader.next_idle(timeout).await {
                        Err(TransportError::Idle(_)) => {
                            return format!("no data from the backup for {timeout:?}")
                        }
                        Err(TransportError::Closed) => {
                            return "the backup closed the connection".to_owned()
                        }
                        Err(e) => return format!("link error: {e}"),
                        Ok(m) => m,
                    };
                    match msg {
                        Message::Ack { epoch } => {
                            let at = Instant::now();
                            if let Some(g) = &gate_r {
                                g.release(epoch);
                            }
                            let _ = events_r.send(LinkEvent::Acked { session, epoch, at });
                        }
                        Message::Heartbeat { .. } => {}
                        Message::Reject { epoch, reason } => {
                            return format!("the backup rejected epoch {epoch}: {reason}")
                        }
                        Message::Goodbye { reason } => {
                            return format!("the backup said goodbye: {reason}")
                        }
                        other => return format!("the backup sent an unexpected {}", other.name()),
                    }
                }
            });
            let write = async {
                let mut tick = tokio::time::interval(opts.heartbeat / 2);
                let mut last = Instant::now();
                loop {
                    tokio::select! {
                        out = rx.recv() => {
                            let Some(out) = out else { return "the epoch loop ended".to_owned() };
                            if out.session != session {
                                continue;
                            }
                            let before = writer.bytes();
                            for m in &out.messages {
                                if let Err(e) = writer.send(m).await {
                                    return format!("sending to the backup failed: {e}");
                                }
                            }
                            last = Instant::now();
                            if let Some(epoch) = out.epoch {
                                let _ = events.send(LinkEvent::Sent {
                                    session,
                                    epoch,
                                    send: out.queued.elapsed(),
                                    bytes: writer.bytes() - before,
                                });
                            }
                            if out.messages.iter().any(|m| matches!(m, Message::Goodbye { .. })) {
                                return "goodbye sent".to_owned();
                            }
                        }
                        _ = tick.tick() => {
                            if stop.load(Ordering::Relaxed) {
                                return "stopping".to_owned();
                            }
                            if last.elapsed() >= opts.heartbeat {
                                let hb = Message::Heartbeat { epoch: 0, time_ns: mono_ns() };
                                if let Err(e) = writer.send(&hb).await {
                                    return format!("sending a heartbeat failed: {e}");
                                }
                                last = Instant::now();
                            }
                        }
                    }
                }
            };
            let reason = tokio::select! {
                r = &mut read_task => r.unwrap_or_else(|e| format!("reader failed: {e}")),
                w = write => w,
            };
            read_task.abort();
            reason
        };
        up.store(0, Ordering::Release);
        let _ = events.send(LinkEvent::Down { session, reason });
        if !stop.load(Ordering::Relaxed) {
            sleep_unless_stopped(opts.reconnect, &stop).await;
        }
    }
}

async fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20).min(d)).await;
    }
}

fn mono_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
