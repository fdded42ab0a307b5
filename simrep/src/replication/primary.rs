//! The primary: runs the guest and replicates it to a backup, epoch by
//! epoch (DESIGN.md, "One replication epoch").
//!
//! Every `--epoch-ms`:
//!
//! 1. checkpoint ([`EpochCheckpointer::checkpoint_with`]): pause, harvest
//!    the dirty pages, save the state, close the epoch of held output and
//!    of disk writes, copy the dirty pages or arm copy-on-write, resume;
//! 2. while the guest runs: read the dirty pages into the *shadow* (the
//!    image the backup will hold once it commits this epoch), encode them
//!    with the codec against it on `--threads` threads, digest them, and
//!    queue the epoch for the link;
//! 3. the link sends it; when the backup acks, the epoch's held responses
//!    leave (on the link thread) and its disk writes reach the primary's
//!    disk file.
//!
//! When a backup connects, the primary synchronises it while the guest
//! runs: a checkpoint whose view covers all of memory, every page into
//! the shadow and across, the disk's contents with the next epoch. When
//! the backup is lost, the guest goes on unprotected: held output is
//! released, disk writes go to the file at once, and the link keeps trying
//! to reconnect, which starts a new synchronisation.
//!
//! When the link cannot keep up, the queue to it fills ([`QUEUE_EPOCHS`])
//! and the epoch loop waits: the epoch stretches and carries more pages,
//! and held output waits longer. The stats show it in `interval_ms`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::compress::{CodecSpec, EpochEncoder, Image, PageView, PAGE_SIZE};
use crate::dirty::DirtyMode;
use crate::vmm::block::{BlockDevice, FlushPolicy};
use crate::vmm::epoch::{EpochCheckpointer, EpochError};
use crate::vmm::net::OutputGate;
use crate::vmm::run::boot_service_with;
use crate::vmm::vcpu::VcpuOutcome;
use crate::vmm::vm::Vm;
use crate::vmm::{RunOptions, VmmError};

use super::apply::{digest_epoch, epoch_messages, sync_messages};
use super::gate::HeldGate;
use super::link::{Link, LinkEvent, LinkOptions, Outgoing, QUEUE_EPOCHS};
use super::observe::{EpochRecord, Metrics, ObserveServer, StatsFile, StatusBoard};
use super::protocol::{PreSharedKey, SECTOR_SIZE};

/// The VM's configuration as the backup receives it in `SyncBegin`
/// (JSON): what it needs to prepare a VM and a disk before the first
/// checkpoint arrives. The checkpoint's saved state carries the rest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaConfig {
    /// Guest memory bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The workload's name.
    pub workload: String,
    /// Disk sectors (0: no disk).
    pub disk_sectors: u64,
}

impl ReplicaConfig {
    /// The JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain struct serialises")
    }

    /// Parses the JSON bytes.
    ///
    /// # Errors
    ///
    /// A description of what is wrong.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(b).map_err(|e| format!("bad VM configuration: {e}"))
    }
}

/// Options of `simrep primary`.
#[derive(Debug, Clone)]
pub struct PrimaryOptions {
    /// The guest, as for `simrep run`.
    pub run: RunOptions,
    /// The backup's replication address.
    pub backup: SocketAddr,
    /// The pre-shared key.
    pub key: PreSharedKey,
    /// Epoch length.
    pub epoch: Duration,
    /// The codec on the wire (`raw` is plain asynchronous replication).
    pub codec: CodecSpec,
    /// Encoder threads.
    pub threads: usize,
    /// JSON lines, one per epoch.
    pub stats: Option<PathBuf>,
    /// Prometheus `/metrics` and `/status`.
    pub metrics: Option<SocketAddr>,
    /// The backup is lost after this long without a record from it.
    pub link_timeout: Duration,
    /// Dirty tracking mode.
    pub dirty_mode: DirtyMode,
    /// Write-fault prediction: pages dirty in each of the last `k`
    /// checkpoints stay writable and are sent every epoch (`None`: off).
    pub predict: Option<crate::dirty::Prediction>,
    /// Trace guest write faults and the VMM's copy-on-write faults with
    /// eBPF, cross-check them with the dirty log and report them per epoch.
    pub ebpf: bool,
    /// Pre-arm copy-on-write before each checkpoint
    /// ([`EpochCheckpointer::prearm`]); off: arm it in the pause only.
    pub prearm: bool,
    /// Dirty sets up to this many pages are copied in the pause, larger
    /// ones get copy-on-write ([`EpochCheckpointer::copy_limit`]).
    pub copy_limit: usize,
}

/// Errors of the primary.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// The VM failed (as for `simrep run`).
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A checkpoint failed.
    #[error(transparent)]
    Epoch(#[from] EpochError),
    /// The stats file or metrics endpoint could not be set up.
    #[error("{0}")]
    Observe(String),
    /// The link thread could not start.
    #[error("starting the replication link: {0}")]
    Link(#[source] std::io::Error),
}

/// What a primary run did.
#[derive(Debug, Clone, Default)]
pub struct PrimarySummary {
    /// Epochs sent.
    pub epochs: u64,
    /// Epochs acked.
    pub acked: u64,
    /// Synchronisations.
    pub syncs: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Ctrl-C ended it.
    pub interrupted: bool,
}

struct Counters {
    epochs: crate::replication::observe::Counter,
    acked: crate::replication::observe::Counter,
    syncs: crate::replication::observe::Counter,
    link_down: crate::replication::observe::Counter,
    dirty_pages: crate::replication::observe::Counter,
    raw_bytes: crate::replication::observe::Counter,
    out_bytes: crate::replication::observe::Counter,
    pause_us: crate::replication::observe::Counter,
    protected: crate::replication::observe::Gauge,
    last_pause_us: crate::replication::observe::Gauge,
    last_ack_ms: crate::replication::observe::Gauge,
    held_responses: crate::replication::observe::Gauge,
    lag: crate::replication::observe::Gauge,
}

impl Counters {
    fn new(m: &Metrics) -> Self {
        Counters {
            epochs: m.counter("simrep_epochs_total", "Epochs sent to the backup"),
            acked: m.counter("simrep_epochs_acked_total", "Epochs the backup committed"),
            syncs: m.counter("simrep_syncs_total", "Full synchronisations of a backup"),
            link_down: m.counter("simrep_link_down_total", "Times the backup was lost"),
            dirty_pages: m.counter("simrep_dirty_pages_total", "Dirty pages replicated"),
            raw_bytes: m.counter("simrep_raw_bytes_total", "Dirty bytes before the codec"),
            out_bytes: m.counter("simrep_sent_bytes_total", "Codec bytes sent"),
            pause_us: m.counter(
                "simrep_pause_us_total",
                "Guest pause time at checkpoints (us)",
            ),
            protected: m.gauge("simrep_protected", "1 when a backup holds a checkpoint"),
            last_pause_us: m.gauge(
                "simrep_last_pause_us",
                "Pause of the latest checkpoint (us)",
            ),
            last_ack_ms: m.gauge(
                "simrep_last_ack_ms",
                "Checkpoint-to-ack latency of the latest acked epoch (ms)",
            ),
            held_responses: m.gauge("simrep_held_responses", "Responses held for output commit"),
            lag: m.gauge("simrep_lag_epochs", "Epochs taken and not yet acked"),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The epoch loop's replication state.
struct Replicator {
    opts: PrimaryOptions,
    gate: Option<Arc<HeldGate>>,
    block: Arc<BlockDevice>,
    ck: EpochCheckpointer,
    link: Link,
    shadow: Image,
    encoder: Option<Box<dyn EpochEncoder>>,
    /// Session the backup is synchronised on (0: unprotected).
    session: u64,
    /// Next checkpoint's number.
    next_epoch: u64,
    /// Replication epoch → the block device's epoch closed with it.
    block_epochs: BTreeMap<u64, u64>,
    /// Disk contents to send with the next epoch (after a sync).
    disk_base: Vec<(u64, Vec<u8>)>,
    /// Epochs sent and not yet acked, with their records.
    records: BTreeMap<u64, (Instant, EpochRecord)>,
    last_checkpoint: Option<Instant>,
    acked: Option<u64>,
    stats: Option<StatsFile>,
    board: StatusBoard,
    counters: Counters,
    summary: PrimarySummary,
    run_id: u64,
    out: Vec<u8>,
    ebpf: Ebpf,
}

/// The eBPF tracers the agent uses (each absent when unavailable).
#[derive(Default)]
struct Ebpf {
    writes: Option<Box<crate::ebpf::WriteTracer>>,
    cow: Option<Box<crate::ebpf::CowTracer>>,
    write_faults: Option<crate::replication::observe::Counter>,
    cow_faults: Option<crate::replication::observe::Counter>,
    mismatched: Option<crate::replication::observe::Counter>,
}

impl Ebpf {
    /// Starts what the host allows, saying what is missing.
    fn start(vm: &Vm, metrics: &Metrics, board: &StatusBoard) -> Ebpf {
        use crate::ebpf::{CowTracer, CowTracing, WriteTracer, WriteTracing};
        let pid = std::process::id();
        let name = format!("primary{pid}");
        let mut missing = Vec::new();
        let writes = match WriteTracer::try_start(&name, pid) {
            WriteTracing::Active(t) => {
                tracing::info!(sources = ?t.sources(), missing = ?t.missing(), pins = %t.pin_dir().display(), "eBPF write tracing on");
                Some(t)
            }
            WriteTracing::Unavailable { reason } => {
                missing.push(format!("write tracing: {reason}"));
                None
            }
        };
        let mem = vm.memory();
        let cow = match CowTracer::try_start(&name, pid, &[(mem.host_addr(), mem.size())]) {
            CowTracing::Active(t) => {
                tracing::info!("eBPF copy-on-write fault tracing on");
                Some(t)
            }
            CowTracing::Unavailable { reason } => {
                missing.push(format!("copy-on-write tracing: {reason}"));
                None
            }
        };
        if !missing.is_empty() {
            tracing::warn!("eBPF: running without {}", missing.join("; "));
            let text = missing.join("; ");
            board.update(|s| {
                s.extra.insert("ebpf_missing".into(), text.into());
            });
        }
        Ebpf {
            write_faults: writes.as_ref().map(|_| {
                metrics.counter(
                    "simrep_ebpf_write_faults_total",
                    "Guest write faults seen by eBPF",
                )
            }),
            mismatched: writes.as_ref().map(|_| {
                metrics.counter(
                    "simrep_ebpf_only_pages_total",
                    "Pages eBPF saw written that the dirty log lacked",
                )
            }),
            cow_faults: cow.as_ref().map(|_| {
                metrics.counter(
                    "simrep_ebpf_cow_faults_total",
                    "Copy-on-write faults of VMM threads",
                )
            }),
            writes,
            cow,
        }
    }
}

/// `simrep primary`: boots the guest with dirty tracking, held output and
/// a replicated disk, and replicates it until `stop` is set or the guest
/// ends.
///
/// # Errors
///
/// [`PrimaryError`].
pub fn run_primary(
    opts: PrimaryOptions,
    stop: &AtomicBool,
) -> Result<PrimarySummary, PrimaryError> {
    let t0 = Instant::now();
    let mut run = opts.run.clone();
    run.disk_policy = FlushPolicy::Replicated;
    let gate_slot: Arc<OnceLock<Arc<HeldGate>>> = Arc::new(OnceLock::new());
    let slot = Arc::clone(&gate_slot);
    let (mut vm, net) = boot_service_with(&run, None, Some(opts.dirty_mode), move |d| {
        let g = Arc::new(HeldGate::new(d));
        let _ = slot.set(Arc::clone(&g));
        g as Arc<dyn OutputGate>
    })?;
    let gate = gate_slot.get().cloned();
    let tracker = vm.dirty_tracker().map_err(VmmError::from)?;
    let ebpf_on = opts.ebpf;
    let mut ck = EpochCheckpointer::new(&vm, tracker)?;
    ck.copy_limit = opts.copy_limit;
    if let Some(p) = opts.predict {
        ck.set_prediction(Some(p))?;
        tracing::info!(
            k = p.k,
            recheck_every = p.recheck_every,
            "write-fault prediction on"
        );
    }
    let metrics = Arc::new(Metrics::default());
    let counters = Counters::new(&metrics);
    let board = StatusBoard::default();
    board.update(|s| {
        s.role = "primary".into();
        s.state = "unprotected".into();
        s.link = "down".into();
        s.since_unix_ms = unix_ms();
        s.detail = format!("waiting for the backup at {}", opts.backup);
    });
    let _server = match opts.metrics {
        Some(addr) => Some(
            ObserveServer::start(addr, Arc::clone(&metrics), board.clone())
                .map_err(|e| PrimaryError::Observe(e.to_string()))?,
        ),
        None => None,
    };
    let stats = match &opts.stats {
        Some(p) => Some(StatsFile::create(p).map_err(|e| PrimaryError::Observe(e.to_string()))?),
        None => None,
    };
    let link = Link::start(
        LinkOptions {
            backup: opts.backup,
            key: opts.key.clone(),
            timeout: opts.link_timeout,
            heartbeat: Duration::from_millis(200),
            reconnect: Duration::from_millis(250),
        },
        gate.clone(),
    )
    .map_err(PrimaryError::Link)?;
    let ebpf = if ebpf_on {
        Ebpf::start(&vm, &metrics, &board)
    } else {
        Ebpf::default()
    };
    let frames = (run.mem_bytes / PAGE_SIZE as u64) as u32;
    let block = vm.bus().block();
    let mut r = Replicator {
        gate,
        block,
        ck,
        link,
        shadow: Image::zeroed(frames),
        encoder: None,
        session: 0,
        next_epoch: 0,
        block_epochs: BTreeMap::new(),
        disk_base: Vec::new(),
        records: BTreeMap::new(),
        last_checkpoint: None,
        acked: None,
        stats,
        board,
        counters,
        summary: PrimarySummary::default(),
        run_id: rand_u64(),
        out: Vec::new(),
        ebpf,
        opts,
    };
    tracing::info!(
        backup = %r.opts.backup,
        epoch_ms = r.opts.epoch.as_millis() as u64,
        codec = %r.opts.codec,
        threads = r.opts.threads,
        "primary: guest running; connecting to the backup"
    );
    let result = r.run_loop(&vm, stop);
    let reason = if stop.load(Ordering::Relaxed) {
        "primary stopped by the operator"
    } else {
        "the guest stopped"
    };
    r.link.shutdown(reason);
    if let Some(g) = &r.gate {
        g.unprotect();
    }
    vm.shutdown();
    if let Some(mut net) = net {
        net.shutdown();
    }
    let mut summary = r.summary.clone();
    summary.elapsed = t0.elapsed();
    summary.interrupted = stop.load(Ordering::Relaxed);
    result.map(|()| summary)
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    }
    u64::from_le_bytes(b)
}

impl Replicator {
    fn run_loop(&mut self, vm: &Vm, stop: &AtomicBool) -> Result<(), PrimaryError> {
        let n = vm.vcpu_count();
        let mut ended = vec![false; n];
        let mut next_tick = Instant::now() + self.opts.epoch;
        let mut prearmed = false;
        while !stop.load(Ordering::Relaxed) && ended.iter().any(|e| !e) {
            if self.drain_events(vm)? {
                // The first epoch after a synchronisation is a full epoch.
                next_tick = Instant::now() + self.opts.epoch;
            }
            let now = Instant::now();
            // Copy-on-write pre-armed shortly before the checkpoint, while
            // the guest runs: the pause then has little left to arm.
            let prearm_at = next_tick.checked_sub(self.ck.prearm_lead().min(self.opts.epoch / 2));
            if self.opts.prearm
                && self.session != 0
                && !prearmed
                && prearm_at.is_some_and(|t| now >= t)
            {
                prearmed = true;
                self.prearm();
                continue;
            }
            if now >= next_tick {
                prearmed = false;
                if self.session != 0 {
                    self.epoch(vm)?;
                } else if self.link.session() != 0 {
                    // A session is up but not synchronised: wait for its
                    // Up event (drained above).
                }
                next_tick = Instant::now().max(next_tick) + self.opts.epoch;
                next_tick = next_tick.min(Instant::now() + self.opts.epoch);
                continue;
            }
            let until = match prearm_at {
                Some(t) if self.opts.prearm && self.session != 0 && !prearmed => t.max(now),
                _ => next_tick,
            };
            let wait = (until - now).min(Duration::from_millis(5));
            if let Some(ev) = vm.wait_exit(wait) {
                match ev.result {
                    Ok(outcome) => {
                        tracing::info!(vcpu = ev.vcpu, ?outcome, "vCPU ended");
                        ended[ev.vcpu as usize] = true;
                        if let VcpuOutcome::GuestExit(status) = outcome {
                            if status != 0 {
                                return Err(VmmError::GuestFailed {
                                    vcpu: ev.vcpu,
                                    status,
                                }
                                .into());
                            }
                        }
                    }
                    Err(e) => return Err(VmmError::from(e).into()),
                }
            }
        }
        Ok(())
    }

    /// Handles the link's events; true when a synchronisation was made.
    fn drain_events(&mut self, vm: &Vm) -> Result<bool, PrimaryError> {
        let mut synced = false;
        while let Some(ev) = self.link.try_event() {
            match ev {
                LinkEvent::Up {
                    session,
                    peer,
                    welcome,
                } => {
                    tracing::info!(
                        %peer,
                        backup_epoch = ?welcome.committed_epoch,
                        "backup connected; synchronising it while the guest runs"
                    );
                    self.board.update(|s| {
                        s.link = peer.to_string();
                        s.peer = Some(peer.to_string());
                        s.state = "synchronising".into();
                    });
                    if self.link.session() == session {
                        self.sync(vm, session)?;
                        synced = true;
                    }
                }
                LinkEvent::Sent {
                    session,
                    epoch,
                    send,
                    bytes,
                } => {
                    if session == self.session {
                        if let Some((_, rec)) = self.records.get_mut(&epoch) {
                            rec.send_ms = send.as_secs_f64() * 1e3;
                            let _ = bytes;
                        }
                    }
                }
                LinkEvent::Acked { session, epoch, at } => {
                    if session == self.session {
                        self.acked(epoch, at)?;
                    }
                }
                LinkEvent::Down { session, reason } => {
                    if session == self.session || self.session == 0 {
                        self.lost(&reason)?;
                    } else {
                        tracing::debug!(session, "old session ended: {reason}");
                    }
                }
            }
        }
        Ok(synced)
    }

    fn acked(&mut self, epoch: u64, at: Instant) -> Result<(), PrimaryError> {
        // Disk writes of every epoch up to this one reach the file.
        let mut last_block = None;
        while let Some((&e, &b)) = self.block_epochs.first_key_value() {
            if e > epoch {
                break;
            }
            self.block_epochs.remove(&e);
            last_block = Some(b);
        }
        if let Some(b) = last_block {
            self.block.commit(b).map_err(VmmError::from)?;
        }
        if self.acked.is_none() {
            tracing::info!(
                epoch,
                "backup committed its first checkpoint: the guest is protected"
            );
            self.board.update(|s| {
                s.state = "protected".into();
                s.protected = true;
                s.since_unix_ms = unix_ms();
                s.detail = "every response leaves after the backup committed its epoch".into();
            });
            self.counters.protected.set(1.0);
        }
        self.acked = Some(epoch);
        self.summary.acked += 1;
        self.counters.acked.inc_by(1);
        let older: Vec<u64> = self.records.range(..=epoch).map(|(&e, _)| e).collect();
        for e in older {
            let (taken, mut rec) = self.records.remove(&e).expect("listed");
            let ack = at.saturating_duration_since(taken).as_secs_f64() * 1e3;
            rec.ack_ms = Some(ack);
            self.counters.last_ack_ms.set(ack);
            self.write_record(&rec);
        }
        let lag = self.next_epoch.saturating_sub(epoch + 1);
        self.counters.lag.set(lag as f64);
        self.board.update(|s| {
            s.acked_epoch = Some(epoch);
            s.lag_epochs = lag;
        });
        Ok(())
    }

    fn write_record(&mut self, rec: &EpochRecord) {
        if let Some(f) = &mut self.stats {
            if let Err(e) = f.write(rec) {
                tracing::warn!("stats file: {e}; no more stats lines");
                self.stats = None;
            }
        }
    }

    /// The backup is gone: run on unprotected.
    fn lost(&mut self, reason: &str) -> Result<(), PrimaryError> {
        let was = self.session != 0;
        self.session = 0;
        self.encoder = None;
        // No checkpoint comes until the next synchronisation.
        self.ck.cancel_prearm();
        let released = self
            .gate
            .as_ref()
            .map(|g| g.unprotect())
            .unwrap_or_default();
        // Every closed disk epoch goes to the file; from now on writes go
        // there directly.
        self.block.set_policy(FlushPolicy::default());
        if let Some((_, &b)) = self.block_epochs.last_key_value() {
            self.block.commit(b).map_err(VmmError::from)?;
        }
        self.block_epochs.clear();
        self.block.flush_all().map_err(VmmError::from)?;
        for (_, (_, rec)) in std::mem::take(&mut self.records) {
            self.write_record(&rec);
        }
        self.acked = None;
        self.counters.protected.set(0.0);
        self.counters.held_responses.set(0.0);
        if was {
            self.counters.link_down.inc_by(1);
            tracing::error!(
                released_responses = released.responses,
                "backup lost ({reason}): the guest runs UNPROTECTED; held output released; reconnecting"
            );
        } else {
            tracing::warn!("backup link down before synchronisation: {reason}");
        }
        self.board.update(|s| {
            s.state = "unprotected".into();
            s.protected = false;
            s.link = "down".into();
            s.since_unix_ms = unix_ms();
            s.detail = format!("backup lost: {reason}; reconnecting");
        });
        Ok(())
    }

    /// Full synchronisation on `session`, while the guest runs.
    fn sync(&mut self, vm: &Vm, session: u64) -> Result<(), PrimaryError> {
        let t0 = Instant::now();
        let k = self.next_epoch;
        self.next_epoch += 1;
        let block = Arc::clone(&self.block);
        let mut closed = None;
        let ckpt = self.ck.checkpoint_with(vm, true, &mut |_| {
            // Output is held from the next checkpoint on (see `epoch`):
            // before the backup commits a first epoch there is nothing to
            // fail over to, and holding output during a long copy would
            // only stall clients.
            block.set_policy(FlushPolicy::Replicated);
            closed = Some(block.take_epoch());
        })?;
        // The disk at this checkpoint: the file plus the epochs closed up
        // to now, which go to the file at once (nothing after it does
        // until the backup acks).
        if let Some(c) = &closed {
            self.block.commit(c.epoch()).map_err(VmmError::from)?;
        }
        self.block_epochs.clear();
        let frames = self.shadow.frame_count();
        let bar = progress_bar(u64::from(frames), "sync");
        let mut buf = [0u8; PAGE_SIZE];
        for f in 0..frames {
            if ckpt.view.read_page(u64::from(f), &mut buf).is_ok() {
                self.shadow.set_page(f, &buf);
            } else {
                // Not in the view (cannot happen for a full view): live.
                vm.memory()
                    .read(u64::from(f) * PAGE_SIZE as u64, &mut buf)
                    .map_err(VmmError::from)?;
                self.shadow.set_page(f, &buf);
            }
            if f % 4096 == 0 {
                bar.set_position(u64::from(f));
            }
        }
        ckpt.view.finish();
        bar.finish_and_clear();
        let config = ReplicaConfig {
            mem_bytes: self.opts.run.mem_bytes,
            vcpus: self.opts.run.vcpus,
            workload: self.opts.run.workload.to_string(),
            disk_sectors: self.block.capacity(),
        };
        let msgs = sync_messages(self.run_id, &self.shadow, config.encode());
        self.disk_base = self.read_disk()?;
        let mut encoder = self.opts.codec.build(self.opts.threads);
        encoder.init(&self.shadow);
        self.encoder = Some(encoder);
        if !self.link.send(Outgoing {
            session,
            epoch: None,
            messages: msgs,
            queued: Instant::now(),
        }) {
            tracing::warn!("the backup left during the synchronisation");
            return self.lost("left during the synchronisation");
        }
        self.session = session;
        self.summary.syncs += 1;
        self.counters.syncs.inc_by(1);
        self.last_checkpoint = Some(Instant::now());
        tracing::info!(
            epoch = k,
            mib = self.opts.run.mem_bytes >> 20,
            disk_data_mib =
                self.disk_base.iter().map(|w| w.1.len()).sum::<usize>() as f64 / (1 << 20) as f64,
            pause_ms = ckpt.timings.total.as_secs_f64() * 1e3,
            elapsed_ms = t0.elapsed().as_secs_f64() * 1e3,
            "synchronisation queued; epochs follow"
        );
        self.board.update(|s| {
            s.state = "synchronising".into();
            s.epoch = k;
            s.detail =
                "initial copy sent; protected once the backup commits the first epoch".into();
        });
        Ok(())
    }

    /// The disk file's non-zero contents (sent with the first epoch after
    /// a sync; the backup's disk starts all zero).
    fn read_disk(&self) -> Result<Vec<(u64, Vec<u8>)>, PrimaryError> {
        let mut out = Vec::new();
        let Some(disk) = self.block.disk_file() else {
            return Ok(out);
        };
        const CHUNK: usize = 64 << 10;
        let sectors = disk.capacity();
        let per = (CHUNK / SECTOR_SIZE) as u64;
        let mut buf = vec![0u8; CHUNK];
        let mut s = 0u64;
        while s < sectors {
            let n = per.min(sectors - s);
            let b = &mut buf[..n as usize * SECTOR_SIZE];
            disk.read_sectors(s, b).map_err(VmmError::from)?;
            if b.iter().any(|&x| x != 0) {
                out.push((s, b.to_vec()));
            }
            s += n;
        }
        Ok(out)
    }

    /// Adds the eBPF figures of the epoch to `rec`: write faults, the
    /// cross-check with the dirty log (which stays the source of truth),
    /// the VMM's copy-on-write faults.
    fn ebpf_epoch(
        &mut self,
        rec: &mut EpochRecord,
        traced: Option<Result<crate::ebpf::EpochWrites, crate::ebpf::EbpfError>>,
        dirty: &[u64],
    ) {
        use crate::ebpf::WriteSource;
        match traced {
            Some(Ok(w)) => {
                let writes = w.stats.walk_writes + w.stats.ring_events + w.stats.fault_writes;
                rec.write_faults = Some(writes);
                if let Some(c) = &self.ebpf.write_faults {
                    c.inc_by(writes);
                }
                let sources = self
                    .ebpf
                    .writes
                    .as_ref()
                    .map(|t| t.sources().to_vec())
                    .unwrap_or_default();
                // The ring source names guest frames exactly; page-table
                // walks name guest virtual pages (identity-mapped here).
                let source = if sources.contains(&WriteSource::DirtyRing)
                    && !w.ring_frames.is_empty()
                {
                    Some(WriteSource::DirtyRing)
                } else if sources.contains(&WriteSource::KvmPageFault) && !w.fault_frames.is_empty()
                {
                    // VMX/SVM: guest write faults name guest frames.
                    Some(WriteSource::KvmPageFault)
                } else if sources.contains(&WriteSource::PagetableWalk) {
                    Some(WriteSource::PagetableWalk)
                } else {
                    None
                };
                if let Some(src) = source {
                    let harvest = crate::dirty::DirtyPages::from_unsorted(dirty.to_vec());
                    let c = w.cross_check(src, &harvest);
                    rec.ebpf_only_pages = Some(c.only_ebpf.len() as u64);
                    rec.harvest_only_pages = Some(c.only_harvest.len() as u64);
                    if let Some(m) = &self.ebpf.mismatched {
                        m.inc_by(c.only_ebpf.len() as u64);
                    }
                    if !c.only_ebpf.is_empty() {
                        tracing::debug!(epoch = rec.epoch, "eBPF cross-check: {c}");
                    }
                }
            }
            Some(Err(e)) => {
                tracing::warn!("eBPF write tracing failed ({e}); turning it off");
                self.ebpf.writes = None;
            }
            None => {}
        }
        if let Some(t) = self.ebpf.cow.as_mut() {
            // Drain the ring (the events themselves are not kept).
            let _ = t.poll();
            match t.take_epoch_stats() {
                Ok(st) => {
                    rec.cow_faults = Some(st.cow_faults);
                    if let Some(c) = &self.ebpf.cow_faults {
                        c.inc_by(st.cow_faults);
                    }
                }
                Err(e) => {
                    tracing::warn!("eBPF copy-on-write tracing failed ({e}); turning it off");
                    self.ebpf.cow = None;
                }
            }
        }
    }

    /// Pre-arms copy-on-write for the coming checkpoint (see
    /// [`EpochCheckpointer::prearm`]). A failure is logged, not fatal: the
    /// checkpoint then arms in its pause.
    fn prearm(&mut self) {
        match self.ck.prearm() {
            Ok(Some(p)) => tracing::trace!(
                pages = p.protected_pages,
                us = p.time.as_micros() as u64,
                "copy-on-write pre-armed"
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                "cannot pre-arm copy-on-write ({}); the checkpoint arms it in the pause",
                crate::error_chain(&e)
            ),
        }
    }

    fn epoch(&mut self, vm: &Vm) -> Result<(), PrimaryError> {
        let session = self.session;
        let k = self.next_epoch;
        self.next_epoch += 1;
        let gate = self.gate.clone();
        let block = Arc::clone(&self.block);
        let mut closed = None;
        let tracer = &mut self.ebpf.writes;
        let mut traced = None;
        let ckpt = self.ck.checkpoint_with(vm, false, &mut |_| {
            if let Some(g) = &gate {
                if g.is_protected() {
                    g.close_epoch(k);
                } else {
                    // The first epoch after a synchronisation: its
                    // responses already left; hold from here on.
                    g.protect(k + 1);
                }
            }
            closed = Some(block.take_epoch());
            if let Some(t) = tracer.as_mut() {
                traced = Some(t.take_epoch());
            }
        })?;
        let taken = Instant::now();
        let interval = self
            .last_checkpoint
            .map(|t| taken.saturating_duration_since(t))
            .unwrap_or_default();
        self.last_checkpoint = Some(taken);
        let closed = closed.expect("set during the pause");
        self.block_epochs.insert(k, closed.epoch());
        let t_enc = Instant::now();
        let mut buf = [0u8; PAGE_SIZE];
        let mut dirty = Vec::with_capacity(ckpt.dirty.len());
        for &gfn in &ckpt.dirty {
            if gfn >= u64::from(self.shadow.frame_count()) {
                continue;
            }
            ckpt.view
                .read_page(gfn, &mut buf)
                .map_err(|e| PrimaryError::Epoch(EpochError::Cow(e)))?;
            self.shadow.set_page(gfn as u32, &buf);
            dirty.push(gfn as u32);
        }
        let cow = ckpt.view.finish();
        let encoder = self
            .encoder
            .as_mut()
            .expect("protected sessions have an encoder");
        self.out.clear();
        let st = encoder
            .encode_epoch(&self.shadow, &dirty, &[], &mut self.out)
            .map_err(|e| PrimaryError::Observe(format!("encoding epoch {k}: {e}")))?;
        let digest = digest_epoch(&self.shadow, &dirty, &[]);
        let encode = t_enc.elapsed();
        let mut disk: Vec<(u64, Vec<u8>)> = std::mem::take(&mut self.disk_base);
        let writes = closed.writes();
        let disk_bytes: u64 = writes.runs.iter().map(|r| r.data.len() as u64).sum();
        disk.extend(writes.runs.into_iter().map(|r| (r.sector, r.data)));
        let msgs = epoch_messages(
            k,
            &self.out,
            disk,
            dirty.len() as u64,
            digest,
            ckpt.state.encode(),
        );
        let held = self.gate.as_ref().map(|g| g.held()).unwrap_or_default();
        let t = &ckpt.timings;
        let rec = EpochRecord {
            epoch: k,
            unix_ms: unix_ms(),
            interval_ms: interval.as_secs_f64() * 1e3,
            pause_us: t.total.as_micros() as u64,
            harvest_us: t.harvest.as_micros() as u64,
            save_us: t.save.as_micros() as u64,
            arm_us: t.arm.as_micros() as u64,
            dirty_pages: dirty.len() as u64,
            raw_bytes: st.raw_bytes,
            out_bytes: st.out_bytes,
            ratio: if st.raw_bytes == 0 {
                0.0
            } else {
                st.out_bytes as f64 / st.raw_bytes as f64
            },
            zero: st.kinds.zero,
            unchanged: st.kinds.unchanged,
            identical: st.kinds.identical,
            xor_self: st.kinds.xor_self,
            xor_other: st.kinds.xor_other,
            raw_areas: st.kinds.raw,
            disk_bytes,
            encode_ms: encode.as_secs_f64() * 1e3,
            encode_mb_s: if encode.is_zero() {
                0.0
            } else {
                st.raw_bytes as f64 / 1e6 / encode.as_secs_f64()
            },
            send_ms: 0.0,
            ack_ms: None,
            held_responses: held.responses,
            held_bytes: held.bytes,
            protected: self.acked.is_some(),
            ..EpochRecord::default()
        };
        let mut rec = rec;
        if let Some(c) = cow.filter(|c| c.prearmed_pages > 0) {
            rec.prearm_us = Some(c.prearm_time.as_micros() as u64);
            rec.prearm_faults = Some(c.prearm_faults);
        }
        if let Some(p) = self.ck.prediction_stats() {
            rec.hot_pages = Some(p.hot);
            rec.unprotected_pages = Some(p.unprotected);
        }
        self.ebpf_epoch(&mut rec, traced, &ckpt.dirty);
        if rec.write_faults.is_some() || rec.cow_faults.is_some() {
            let r = rec.clone();
            self.board.update(|s| {
                for (k, v) in [
                    ("ebpf_write_faults_last_epoch", r.write_faults),
                    ("ebpf_only_pages_last_epoch", r.ebpf_only_pages),
                    ("ebpf_harvest_only_pages_last_epoch", r.harvest_only_pages),
                    ("ebpf_cow_faults_last_epoch", r.cow_faults),
                ] {
                    if let Some(v) = v {
                        s.extra.insert(k.into(), v.into());
                    }
                }
            });
        }
        self.counters.epochs.inc_by(1);
        self.counters.dirty_pages.inc_by(rec.dirty_pages);
        self.counters.raw_bytes.inc_by(rec.raw_bytes);
        self.counters.out_bytes.inc_by(rec.out_bytes);
        self.counters.pause_us.inc_by(rec.pause_us);
        self.counters.last_pause_us.set(rec.pause_us as f64);
        self.counters.held_responses.set(held.responses as f64);
        tracing::debug!(
            epoch = k,
            pages = rec.dirty_pages,
            out = rec.out_bytes,
            pause_us = rec.pause_us,
            encode_ms = rec.encode_ms,
            "epoch"
        );
        self.records.insert(k, (taken - t.total, rec));
        self.summary.epochs += 1;
        self.board.update(|s| {
            s.epoch = k;
            s.extra
                .insert("held_responses".into(), held.responses.into());
            s.extra
                .insert("held_oldest_epoch".into(), held.oldest_epoch.into());
            s.extra.insert("open_epoch".into(), held.open_epoch.into());
        });
        if !self.link.send(Outgoing {
            session,
            epoch: Some(k),
            messages: msgs,
            queued: Instant::now(),
        }) {
            // The session ended while we waited; its Down event follows.
            tracing::debug!(epoch = k, "epoch dropped: the link went down");
        }
        let _ = QUEUE_EPOCHS;
        Ok(())
    }
}

fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} pages ({eta})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(what.to_owned());
        bar
    } else {
        indicatif::ProgressBar::hidden()
    }
}
