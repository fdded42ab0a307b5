//! The backup: holds the last committed checkpoint of the primary's guest
//! and resumes it when the primary is lost.
//!
//! One primary at a time connects to `--listen` (another one is told the
//! backup is busy). Every message goes through [`BackupImage::handle`];
//! an epoch that passes every check has its disk writes written and
//! synced to `STATE_DIR/disk.raw`, then is committed and acked. Any
//! failed check answers `Reject`, closes the connection and leaves the
//! committed checkpoint as it was.
//!
//! # When the backup takes over
//!
//! Only when the primary is *lost*: no record for `--link-timeout`
//! (heartbeats flow every 200 ms when idle), or the connection closed
//! without a `Goodbye`, and no primary reconnected within `--grace`
//! (a primary whose connection broke but which is still alive reconnects
//! within a fraction of a second and synchronises again, which must not
//! create a second live guest). A corrupted or unauthenticated stream, a
//! rejected epoch or a `Goodbye` never trigger a failover. Then the last
//! committed checkpoint (memory, vCPUs, devices, disk) is restored into a
//! fresh VM, which serves on `--service-port` until Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::vmm::block::{BlockDevice, DiskFile, FlushPolicy};
use crate::vmm::checkpoint::attach_restored_net;
use crate::vmm::run::{supervise, RunSummary};
use crate::vmm::state::{StateError, VmSnapshot};
use crate::vmm::vm::Vm;
use crate::vmm::{RunOptions, VmmError};

use super::apply::{ApplyError, BackupImage};
use super::observe::{Metrics, ObserveServer, StatusBoard};
use super::primary::ReplicaConfig;
use super::protocol::{Message, PreSharedKey, Welcome, SECTOR_SIZE};
use super::transport::{self, TransportError};

/// Options of `simrep backup`.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Replication address to listen on.
    pub listen: SocketAddr,
    /// The pre-shared key.
    pub key: PreSharedKey,
    /// Where the resumed guest's service listens after a failover.
    pub service: SocketAddr,
    /// Directory for the backup's disk image (`disk.raw`).
    pub state_dir: PathBuf,
    /// The primary is lost after this long without a record from it.
    pub link_timeout: Duration,
    /// After a connection loss, how long a primary may take to reconnect
    /// before the backup takes over.
    pub grace: Duration,
    /// Prometheus `/metrics` and `/status`.
    pub metrics: Option<SocketAddr>,
    /// Do not take over when the primary is lost (tests, maintenance).
    pub no_failover: bool,
}

/// Errors of the backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The replication address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state directory cannot be used.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metrics endpoint could not start.
    #[error("{0}")]
    Observe(String),
    /// The runtime could not start.
    #[error("starting the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Resuming the checkpoint failed.
    #[error("failover: {0}")]
    Failover(#[source] VmmError),
}

/// How a backup run ended.
#[derive(Debug)]
pub enum BackupOutcome {
    /// Stopped (Ctrl-C) while replicating or waiting.
    Stopped {
        /// The last committed epoch.
        committed: Option<u64>,
    },
    /// Took over: the resumed guest ran until it stopped.
    FailedOver {
        /// The epoch resumed.
        epoch: u64,
        /// From detecting the loss to the guest running.
        failover: Duration,
        /// The resumed guest's run.
        run: RunSummary,
    },
}

/// The committed checkpoint and its disk, shared by the sessions.
struct Shared {
    /// The checkpoint a failover resumes.
    current: Replica,
    /// A re-synchronisation in progress: it replaces `current` when its
    /// first epoch commits, so a primary lost meanwhile still leaves the
    /// previous checkpoint to resume.
    staging: Option<Replica>,
    /// `disk.raw`: the disk of `current`.
    disk_path: PathBuf,
    /// `disk.raw.sync`: the disk of `staging`.
    staging_disk_path: PathBuf,
}

/// A memory image with its VM configuration and disk.
struct Replica {
    image: BackupImage,
    config: Option<ReplicaConfig>,
    disk: Option<DiskFile>,
}

impl Replica {
    fn empty() -> Self {
        Replica {
            image: BackupImage::new(0),
            config: None,
            disk: None,
        }
    }
}

fn lock(s: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a session ended.
#[derive(Debug)]
enum End {
    /// The primary is gone (timeout, connection loss): a failover reason.
    Lost(String),
    /// The session ended without the primary being lost.
    Closed(String),
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `simrep backup`: serves primaries until `stop` is set, or until the
/// primary is lost and the resumed guest stops.
///
/// # Errors
///
/// [`BackupError`].
pub fn run_backup(
    opts: BackupOptions,
    stop: Arc<AtomicBool>,
) -> Result<BackupOutcome, BackupError> {
    std::fs::create_dir_all(&opts.state_dir).map_err(|source| BackupError::StateDir {
        path: opts.state_dir.clone(),
        source,
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(BackupError::Runtime)?;
    let metrics = Arc::new(Metrics::default());
    let board = StatusBoard::default();
    board.update(|s| {
        s.role = "backup".into();
        s.state = "waiting".into();
        s.link = "down".into();
        s.since_unix_ms = unix_ms();
        s.detail = format!("waiting for a primary on {}", opts.listen);
    });
    let _server = match opts.metrics {
        Some(addr) => Some(
            ObserveServer::start(addr, Arc::clone(&metrics), board.clone())
                .map_err(|e| BackupError::Observe(e.to_string()))?,
        ),
        None => None,
    };
    let shared = Arc::new(Mutex::new(Shared {
        current: Replica::empty(),
        staging: None,
        disk_path: opts.state_dir.join("disk.raw"),
        staging_disk_path: opts.state_dir.join("disk.raw.sync"),
    }));
    let lost = rt.block_on(serve(&opts, Arc::clone(&shared), &stop, &metrics, &board))?;
    drop(rt);
    let Some(detected) = lost else {
        let committed = lock(&shared).current.image.committed_epoch();
        return Ok(BackupOutcome::Stopped { committed });
    };
    // Failover.
    let st = lock(&shared);
    let epoch = st
        .current
        .image
        .committed_epoch()
        .expect("failover needs a checkpoint");
    if st.staging.is_some() {
        tracing::warn!(
            epoch,
            "a re-synchronisation was in progress: resuming the previous checkpoint {epoch}"
        );
    }
    board.update(|s| {
        s.state = "failing-over".into();
        s.detail = format!("resuming checkpoint {epoch}");
    });
    let waited = detected.elapsed();
    let t_restore = Instant::now();
    let (vm, net) = resume(&st, &opts).map_err(BackupError::Failover)?;
    let restore = t_restore.elapsed();
    let vcpus = st.current.config.as_ref().map(|c| c.vcpus).unwrap_or(1);
    let mem_bytes = st.current.image.mem_size();
    drop(st);
    let failover = detected.elapsed();
    tracing::warn!(
        epoch,
        failover_ms = failover.as_secs_f64() * 1e3,
        grace_ms = waited.as_secs_f64() * 1e3,
        restore_ms = restore.as_secs_f64() * 1e3,
        service = %opts.service,
        "FAILOVER: the guest resumed from checkpoint {epoch} and serves on {}",
        opts.service
    );
    board.update(|s| {
        s.state = "failed-over".into();
        s.protected = false;
        s.link = "down".into();
        s.since_unix_ms = unix_ms();
        s.detail = format!(
            "running the guest from checkpoint {epoch} (failover took {:.0} ms); unprotected",
            failover.as_secs_f64() * 1e3
        );
    });
    metrics
        .gauge(
            "simrep_failover_ms",
            "Time from losing the primary to the resumed guest running (ms)",
        )
        .set(failover.as_secs_f64() * 1e3);
    let ropts = RunOptions {
        mem_bytes,
        vcpus,
        ..Default::default()
    };
    let run = supervise(vm, net, &ropts, &stop, &mut |_| Ok(())).map_err(BackupError::Failover)?;
    Ok(BackupOutcome::FailedOver {
        epoch,
        failover,
        run,
    })
}

/// Accepts primaries until stopped (`Ok(None)`) or the primary is lost
/// with a checkpoint to resume (`Ok(Some(when the loss was detected))`).
async fn serve(
    opts: &BackupOptions,
    shared: Arc<Mutex<Shared>>,
    stop: &AtomicBool,
    metrics: &Arc<Metrics>,
    board: &StatusBoard,
) -> Result<Option<Instant>, BackupError> {
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| BackupError::Listen {
            addr: opts.listen,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(opts.listen);
    tracing::info!(%addr, state_dir = %opts.state_dir.display(), "backup: waiting for a primary on {addr}");
    let (end_tx, mut end_rx) = mpsc::channel::<End>(4);
    let mut busy = false;
    // Set when the primary was lost: fail over at this instant unless a
    // primary reconnects first.
    let mut deadline: Option<(Instant, Instant)> = None;
    let counters = SessionCounters::new(metrics);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            acc = listener.accept() => {
                let Ok((stream, peer)) = acc else { continue };
                if busy {
                    tracing::warn!(%peer, "a second primary tried to connect: refused (busy)");
                    tokio::spawn(transport::refuse_busy(stream));
                    continue;
                }
                busy = true;
                if deadline.take().is_some() {
                    tracing::info!(%peer, "a primary reconnected within the grace period: no failover");
                }
                let (shared, key, tx, board, counters) = (Arc::clone(&shared), opts.key.clone(), end_tx.clone(), board.clone(), counters.clone());
                let timeout = opts.link_timeout;
                tokio::spawn(async move {
                    let end = session(stream, peer, key, shared, timeout, &board, &counters).await;
                    let _ = tx.send(end).await;
                });
            }
            end = end_rx.recv() => {
                busy = false;
                let Some(end) = end else { continue };
                let (can, committed) = {
                    let st = lock(&shared);
                    (st.current.image.can_fail_over(), st.current.image.committed_epoch())
                };
                board.update(|s| { s.link = "down".into(); s.peer = None; });
                match end {
                    End::Lost(why) if can && !opts.no_failover => {
                        let now = Instant::now();
                        tracing::warn!(
                            committed = ?committed,
                            grace_ms = opts.grace.as_millis() as u64,
                            "primary lost ({why}); taking over unless it reconnects within the grace period"
                        );
                        deadline = Some((now, now + opts.grace));
                    }
                    End::Lost(why) => {
                        let what = if opts.no_failover { "failover disabled" } else { "no committed checkpoint to resume" };
                        tracing::warn!("primary lost ({why}); {what}: waiting for a primary");
                        board.update(|s| { s.state = "waiting".into(); s.detail = format!("primary lost: {why}; {what}"); });
                    }
                    End::Closed(why) => {
                        tracing::info!("primary session ended: {why}; waiting for a primary");
                        board.update(|s| { s.state = "waiting".into(); s.detail = format!("session ended: {why}"); });
                    }
                }
            }
            _ = tick.tick() => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                if let Some((detected, at)) = deadline {
                    if Instant::now() >= at && !busy {
                        return Ok(Some(detected));
                    }
                }
            }
        }
    }
}

#[derive(Clone)]
struct SessionCounters {
    epochs: super::observe::Counter,
    rejected: super::observe::Counter,
    bytes: super::observe::Counter,
    pages: super::observe::Counter,
    committed: super::observe::Gauge,
    apply_ms: super::observe::Gauge,
}

impl SessionCounters {
    fn new(m: &Metrics) -> Self {
        SessionCounters {
            epochs: m.counter("simrep_backup_epochs_committed_total", "Epochs committed"),
            rejected: m.counter("simrep_backup_rejected_total", "Epochs or streams rejected"),
            bytes: m.counter(
                "simrep_backup_stream_bytes_total",
                "Codec stream bytes received",
            ),
            pages: m.counter("simrep_backup_pages_total", "Pages applied"),
            committed: m.gauge("simrep_backup_committed_epoch", "Last committed epoch"),
            apply_ms: m.gauge(
                "simrep_backup_last_apply_ms",
                "Decode, verify, disk and commit time of the last epoch (ms)",
            ),
        }
    }
}

async fn session(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    key: PreSharedKey,
    shared: Arc<Mutex<Shared>>,
    timeout: Duration,
    board: &StatusBoard,
    counters: &SessionCounters,
) -> End {
    let conn = match transport::accept(stream, key).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, "refused a connection: {e}");
            counters.rejected.inc_by(1);
            return End::Closed(format!("handshake with {peer} failed: {e}"));
        }
    };
    tracing::info!(%peer, "primary connected and authenticated");
    board.update(|s| {
        s.link = peer.to_string();
        s.peer = Some(peer.to_string());
        s.state = "synchronising".into();
        s.detail = "receiving the initial copy".into();
    });
    let mut reader = conn.reader;
    let mut writer = conn.writer;
    let welcome = {
        let st = lock(&shared);
        Welcome {
            committed_epoch: st.current.image.committed_epoch(),
            mem_size: st.current.image.mem_size(),
            run_id: st.current.image.run_id(),
        }
    };
    // Acks and rejects go through the writer task, which also sends
    // heartbeats.
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let writer_task = tokio::spawn(async move {
        if writer.send(&Message::Welcome(welcome)).await.is_err() {
            return;
        }
        let mut hb = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { return };
                    let last = matches!(m, Message::Reject { .. } | Message::Goodbye { .. });
                    if writer.send(&m).await.is_err() || last {
                        return;
                    }
                }
                _ = hb.tick() => {
                    if writer.send(&Message::Heartbeat { epoch: 0, time_ns: 0 }).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let end = loop {
        let msg = match reader.next_idle(timeout).await {
            Err(TransportError::Idle(_)) => {
                break End::Lost(format!("no data from {peer} for {timeout:?}"))
            }
            Err(TransportError::Closed) => {
                break End::Lost(format!("{peer} closed the connection without a goodbye"))
            }
            Err(TransportError::Io { what, source }) => {
                break End::Lost(format!("{what}: {source}"))
            }
            Err(e) => {
                counters.rejected.inc_by(1);
                tracing::error!(%peer, "stream from the primary rejected: {e}; committed state kept");
                break End::Closed(format!("bad stream: {e}"));
            }
            Ok(m) => m,
        };
        if let Message::Goodbye { reason } = &msg {
            break End::Closed(format!("the primary said goodbye: {reason}"));
        }
        let shared2 = Arc::clone(&shared);
        let result = tokio::task::block_in_place(|| apply(&shared2, msg));
        match result {
            Ok(Some((epoch, stats))) => {
                counters.epochs.inc_by(1);
                counters.pages.inc_by(stats.pages);
                counters.bytes.inc_by(stats.stream_bytes);
                counters.committed.set(epoch as f64);
                counters.apply_ms.set(stats.apply.as_secs_f64() * 1e3);
                if stats.first {
                    tracing::info!(
                        epoch,
                        "first checkpoint committed: the primary is protected"
                    );
                }
                board.update(|s| {
                    s.epoch = epoch;
                    s.acked_epoch = Some(epoch);
                    s.state = "replicating".into();
                    s.protected = true;
                    s.detail = format!("holding checkpoint {epoch}");
                });
                let _ = tx.send(Message::Ack { epoch });
            }
            Ok(None) => {}
            Err((epoch, e)) => {
                counters.rejected.inc_by(1);
                tracing::error!(%peer, epoch, "rejected: {e}; committed state kept");
                let _ = tx.send(Message::Reject {
                    epoch,
                    reason: e.chars().take(1000).collect(),
                });
                break End::Closed(format!("rejected epoch {epoch}: {e}"));
            }
        }
    };
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_millis(500), writer_task).await;
    end
}

#[derive(Debug)]
struct Applied {
    pages: u64,
    stream_bytes: u64,
    apply: Duration,
    first: bool,
}

/// One message through the receive path. `Ok(Some)`: an epoch was
/// committed (its disk writes are durable). `Err((epoch, why))`: rejected.
fn apply(shared: &Mutex<Shared>, msg: Message) -> Result<Option<(u64, Applied)>, (u64, String)> {
    let t0 = Instant::now();
    let mut st = lock(shared);
    let epoch_of = |m: &Message| match m {
        Message::EpochData(d) => d.epoch,
        Message::EpochDisk(d) => d.epoch,
        Message::EpochEnd(e) => e.epoch,
        _ => 0,
    };
    let epoch = epoch_of(&msg);
    if let Message::SyncBegin(b) = &msg {
        let cfg = ReplicaConfig::decode(&b.config).map_err(|e| (0, e))?;
        if cfg.mem_bytes != b.mem_size {
            return Err((0, "configuration and memory size disagree".into()));
        }
        // A new synchronisation builds a new replica beside the current
        // checkpoint, which stays the one to resume until the new one
        // commits its first epoch.
        let mut r = Replica::empty();
        r.image.handle(msg).map_err(|e| (0, e.to_string()))?;
        r.image.set_disk_sectors(cfg.disk_sectors);
        if cfg.disk_sectors > 0 {
            r.disk = Some(fresh_disk(&st.staging_disk_path, cfg.disk_sectors).map_err(|e| (0, e))?);
        }
        tracing::info!(
            mem_mib = cfg.mem_bytes >> 20,
            vcpus = cfg.vcpus,
            workload = %cfg.workload,
            disk_mib = (cfg.disk_sectors * SECTOR_SIZE as u64) >> 20,
            keeps = ?st.current.image.committed_epoch(),
            "synchronisation started (the current checkpoint stays until the new one commits)"
        );
        r.config = Some(cfg);
        st.staging = Some(r);
        return Ok(None);
    }
    let st = &mut *st;
    let target = match st.staging.as_mut() {
        Some(r) => r,
        None => &mut st.current,
    };
    let verified = target
        .image
        .handle(msg)
        .map_err(|e: ApplyError| (epoch, e.to_string()))?;
    let Some(v) = verified else {
        return Ok(None);
    };
    if !v.disk_writes.is_empty() {
        let Some(disk) = &target.disk else {
            return Err((v.epoch, "block writes for a VM without a disk".into()));
        };
        for (sector, data) in &v.disk_writes {
            disk.write_sectors(*sector, data)
                .map_err(|e| (v.epoch, format!("writing the backup's disk: {e}")))?;
        }
        disk.sync()
            .map_err(|e| (v.epoch, format!("syncing the backup's disk: {e}")))?;
    }
    let first = target.image.committed_epoch().is_none();
    let (epoch, pages, stream_bytes) = (v.epoch, v.pages, v.stream_bytes);
    target.image.commit(v);
    if let Some(new) = st.staging.take() {
        // The new replica is a checkpoint now: it replaces the old one,
        // disk included (an atomic rename).
        if new.disk.is_some() {
            std::fs::rename(&st.staging_disk_path, &st.disk_path)
                .map_err(|e| (epoch, format!("installing the new disk image: {e}")))?;
            if let Some(dir) = st.disk_path.parent() {
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
        } else {
            let _ = std::fs::remove_file(&st.disk_path);
        }
        st.current = new;
    }
    Ok(Some((
        epoch,
        Applied {
            pages,
            stream_bytes,
            apply: t0.elapsed(),
            first,
        },
    )))
}

/// A zeroed (sparse) disk image of `sectors` at `path`, replacing any.
fn fresh_disk(path: &Path, sectors: u64) -> Result<DiskFile, String> {
    let f = std::fs::File::create(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    f.set_len(sectors * SECTOR_SIZE as u64)
        .map_err(|e| format!("sizing {}: {e}", path.display()))?;
    drop(f);
    DiskFile::open(path).map_err(|e| format!("opening {}: {e}", path.display()))
}

/// Restores the committed checkpoint into a fresh VM and resumes it.
fn resume(
    st: &Shared,
    opts: &BackupOptions,
) -> Result<(Vm, Option<crate::vmm::net::NetService>), VmmError> {
    let snapshot = VmSnapshot::decode(st.current.image.state())?;
    let bytes = st.current.image.image().as_bytes();
    let (vm, _times) = Vm::restore(&snapshot, |mem| {
        const CHUNK: usize = 2 << 20;
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                mem.write((i * CHUNK) as u64, chunk)
                    .map_err(StateError::Memory)?;
            }
        }
        Ok(())
    })?;
    if st.current.disk.is_some() {
        let dev = Arc::new(BlockDevice::open(&st.disk_path, FlushPolicy::default())?);
        vm.bus().attach_block(Arc::clone(&dev));
        vm.bus().register_device_state(dev)?;
    }
    let workload = snapshot.boot_params().map(|bp| bp.workload);
    let net = if matches!(
        workload,
        Some(crate::vmm::abi::workload::KV | crate::vmm::abi::workload::BANK)
    ) {
        Some(attach_restored_net(&vm, Some(opts.service))?)
    } else {
        None
    };
    vm.resume_all_and_wait().map_err(VmmError::Vm)?;
    Ok((vm, net))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::{CodecSpec, Image, PageView};
    use crate::replication::apply::{digest_epoch, epoch_messages, sync_messages};

    fn shared_in(dir: &Path) -> Mutex<Shared> {
        Mutex::new(Shared {
            current: Replica::empty(),
            staging: None,
            disk_path: dir.join("disk.raw"),
            staging_disk_path: dir.join("disk.raw.sync"),
        })
    }

    fn config(frames: u32, disk_sectors: u64) -> Vec<u8> {
        ReplicaConfig {
            mem_bytes: u64::from(frames) * 4096,
            vcpus: 1,
            workload: "kv".into(),
            disk_sectors,
        }
        .encode()
    }

    /// Feeds a synchronisation of `img` (run `run`) and one epoch changing
    /// frame 1 with a disk write; returns the epoch's messages' outcome.
    fn sync_and_epoch(
        shared: &Mutex<Shared>,
        run: u64,
        img: &mut Image,
        epoch: u64,
        fill: u8,
        commit: bool,
    ) {
        let mut enc = "similarity".parse::<CodecSpec>().unwrap().build(1);
        enc.init(img);
        for m in sync_messages(run, img, config(img.frame_count(), 64)) {
            assert!(apply(shared, m).unwrap().is_none());
        }
        img.page_mut(1).fill(fill);
        let mut out = Vec::new();
        enc.encode_epoch(img, &[1], &[], &mut out).unwrap();
        let d = digest_epoch(img, &[1], &[]);
        let msgs = epoch_messages(epoch, &out, vec![(3, vec![fill; 512])], 1, d, vec![fill]);
        let n = msgs.len();
        for (i, m) in msgs.into_iter().enumerate() {
            if i + 1 == n && !commit {
                return;
            }
            let r = apply(shared, m).unwrap();
            assert_eq!(r.is_some(), i + 1 == n);
        }
    }

    #[test]
    fn a_resync_keeps_the_old_checkpoint_until_the_new_one_commits() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared_in(dir.path());
        let mut img = Image::zeroed(8);
        sync_and_epoch(&shared, 1, &mut img, 5, 0xaa, true);
        {
            let st = lock(&shared);
            assert_eq!(st.current.image.committed_epoch(), Some(5));
            assert_eq!(st.current.image.image().page(1)[0], 0xaa);
        }
        let disk = std::fs::read(dir.path().join("disk.raw")).unwrap();
        assert_eq!(disk[3 * 512], 0xaa);
        // A new run synchronises; its first epoch has not arrived yet.
        let mut img2 = Image::zeroed(8);
        sync_and_epoch(&shared, 2, &mut img2, 9, 0xbb, false);
        {
            let st = lock(&shared);
            assert_eq!(
                st.current.image.committed_epoch(),
                Some(5),
                "old checkpoint kept"
            );
            assert!(st.current.image.can_fail_over());
            assert_eq!(st.current.image.run_id(), 1);
            assert!(st.staging.is_some());
        }
        let disk = std::fs::read(dir.path().join("disk.raw")).unwrap();
        assert_eq!(disk[3 * 512], 0xaa, "old disk kept");
        // Now the new run's first epoch commits and replaces it.
        sync_and_epoch(&shared, 3, &mut img2, 10, 0xcc, true);
        let st = lock(&shared);
        assert_eq!(st.current.image.committed_epoch(), Some(10));
        assert_eq!(st.current.image.run_id(), 3);
        assert_eq!(st.current.image.image().page(1)[0], 0xcc);
        assert!(st.staging.is_none());
        let disk = std::fs::read(dir.path().join("disk.raw")).unwrap();
        assert_eq!(disk[3 * 512], 0xcc, "new disk installed");
        assert!(!dir.path().join("disk.raw.sync").exists());
    }

    #[test]
    fn a_bad_configuration_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared_in(dir.path());
        let img = Image::zeroed(4);
        let mut msgs = sync_messages(1, &img, b"not json".to_vec());
        let err = apply(&shared, msgs.remove(0)).unwrap_err();
        assert!(err.1.contains("bad VM configuration"), "{err:?}");
        assert!(lock(&shared).staging.is_none());
    }
}
