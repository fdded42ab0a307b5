//! Observability of the primary and backup engines: per-epoch statistics
//! as JSON lines (`--stats FILE`), Prometheus counters and gauges and the
//! engine's status, served over HTTP (`--metrics ADDR`: `GET /metrics`,
//! `GET /status`), and the client of `simrep status`.
//!
//! The server is plain `std` TCP on its own threads: one accept thread, one
//! short-lived thread per connection with a 2 s deadline and an 8 KiB cap
//! on the request, at most [`MAX_CONNECTIONS`] at a time. A slow, silent or
//! garbage client costs one thread for at most 2 s and never touches the
//! engine, which only updates atomics and a mutex-protected [`Status`].

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Longest a connection to the server may take, from accept to response.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Largest request (request line and headers) the server reads.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Most connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest response [`fetch`] accepts.
const MAX_RESPONSE: u64 = 4 << 20;
/// Pause of the accept thread after a failed accept (out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Errors of the stats file, the server and the status client.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The stats file could not be created.
    #[error("creating the stats file {path}")]
    CreateStats {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A record could not be written to the stats file.
    #[error("writing the stats file {path}")]
    WriteStats {
        /// The file.
        path: PathBuf,
        /// The OS or serialisation error.
        #[source]
        source: std::io::Error,
    },
    /// The metrics server could not listen.
    #[error("listening for metrics on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Nothing answers at the address (refused, timed out, closed silently).
    #[error(
        "nothing answers at {addr} (is a simrep primary or backup running with --metrics {addr}?)"
    )]
    NoAnswer {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Something answered, but not with a successful HTTP response.
    #[error("{addr} answered, but not as a simrep metrics endpoint: {reason}")]
    BadAnswer {
        /// The address.
        addr: SocketAddr,
        /// What was wrong.
        reason: String,
    },
    /// The `/status` body is not a valid [`Status`].
    #[error("{addr} answered /status with an invalid status")]
    BadStatus {
        /// The address.
        addr: SocketAddr,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// One epoch, one line of the stats file (`--stats FILE`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct EpochRecord {
    /// Epoch number.
    pub epoch: u64,
    /// Wall-clock time of the checkpoint, ms since the Unix epoch.
    pub unix_ms: u64,
    /// Time since the previous checkpoint in ms.
    pub interval_ms: f64,
    /// Time the guest was paused in µs.
    pub pause_us: u64,
    /// Of the pause: harvesting dirty pages, µs.
    pub harvest_us: u64,
    /// Of the pause: saving vCPU, VM and device state, µs.
    pub save_us: u64,
    /// Of the pause: arming copy-on-write, µs.
    pub arm_us: u64,
    /// Dirty pages in the epoch.
    pub dirty_pages: u64,
    /// Bytes of the dirty pages.
    pub raw_bytes: u64,
    /// Bytes of the encoded epoch.
    pub out_bytes: u64,
    /// `out_bytes / raw_bytes`.
    pub ratio: f64,
    /// Pages encoded as all zero.
    pub zero: u64,
    /// Pages unchanged since the last epoch.
    pub unchanged: u64,
    /// Pages identical to another page.
    pub identical: u64,
    /// Areas XORed with their own previous content.
    pub xor_self: u64,
    /// Areas XORed with another similar area.
    pub xor_other: u64,
    /// Areas sent verbatim.
    pub raw_areas: u64,
    /// Bytes of block writes in the epoch.
    pub disk_bytes: u64,
    /// Encoding time in ms.
    pub encode_ms: f64,
    /// Encoding speed in MB/s of raw bytes.
    pub encode_mb_s: f64,
    /// Time to send the epoch in ms.
    pub send_ms: f64,
    /// Time from checkpoint to the backup's ack in ms (None until acked).
    pub ack_ms: Option<f64>,
    /// Guest responses held until this epoch is acked.
    pub held_responses: u64,
    /// Bytes of those responses.
    pub held_bytes: u64,
    /// Whether a backup protected this epoch.
    pub protected: bool,
    /// eBPF (`--ebpf`): guest write faults (write page-table walks) seen
    /// in the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_faults: Option<u64>,
    /// eBPF: pages seen written that the dirty log lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebpf_only_pages: Option<u64>,
    /// eBPF: harvested pages eBPF did not see written (pages the VMM's
    /// devices wrote, mappings still writable from an earlier epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harvest_only_pages: Option<u64>,
    /// Write-fault prediction (`--predict`): hot pages (dirty in each of
    /// the last K checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_pages: Option<u64>,
    /// Write-fault prediction: pages the checkpoint left writable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unprotected_pages: Option<u64>,
    /// eBPF: copy-on-write faults of the VMM's own threads in guest memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cow_faults: Option<u64>,
    /// Copy-on-write pre-armed before the checkpoint (outside the pause):
    /// what that took, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prearm_us: Option<u64>,
    /// Pre-armed: the guest's write faults between the pre-arm and the
    /// checkpoint (one per huge page, protected again in the pause).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prearm_faults: Option<u64>,
}

/// A JSON-lines file: one object per line, flushed per line.
#[derive(Debug)]
pub struct StatsFile {
    path: PathBuf,
    out: BufWriter<File>,
}

impl StatsFile {
    /// Creates (truncates) `path`.
    ///
    /// # Errors
    /// [`ObserveError::CreateStats`].
    pub fn create(path: impl AsRef<Path>) -> Result<Self, ObserveError> {
        let path = path.as_ref().to_owned();
        let file = File::create(&path).map_err(|source| ObserveError::CreateStats {
            path: path.clone(),
            source,
        })?;
        Ok(StatsFile {
            path,
            out: BufWriter::new(file),
        })
    }

    /// Appends `rec` as one line and flushes it.
    ///
    /// # Errors
    /// [`ObserveError::WriteStats`].
    pub fn write(&mut self, rec: &impl Serialize) -> Result<(), ObserveError> {
        let r = serde_json::to_writer(&mut self.out, rec)
            .map_err(std::io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"))
            .and_then(|()| self.out.flush());
        r.map_err(|source| ObserveError::WriteStats {
            path: self.path.clone(),
            source,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Counter,
    Gauge,
}

#[derive(Debug)]
struct Entry {
    name: String,
    help: String,
    kind: Kind,
    /// A counter's value, or a gauge's `f64` bits.
    cell: Arc<AtomicU64>,
}

/// A registry of Prometheus counters and gauges, shared between threads
/// (wrap it in an `Arc`). Registering a name twice returns the same cell.
#[derive(Debug, Default)]
pub struct Metrics {
    entries: Mutex<Vec<Entry>>,
}

/// A monotonic counter; clones share the value.
#[derive(Clone, Debug)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds 1.
    pub fn inc(&self) {
        self.inc_by(1);
    }
    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge; clones share the value.
#[derive(Clone, Debug)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    /// The value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or finds) the counter `name` (characters outside
    /// `[a-zA-Z0-9_:]` become `_`).
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        Counter(self.register(name, help, Kind::Counter, 0))
    }

    /// Registers (or finds) the gauge `name`, initially 0.
    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        Gauge(self.register(name, help, Kind::Gauge, 0f64.to_bits()))
    }

    fn register(&self, name: &str, help: &str, kind: Kind, init: u64) -> Arc<AtomicU64> {
        let name = sanitize(name);
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = entries.iter().find(|e| e.name == name) {
            if e.kind == kind {
                return Arc::clone(&e.cell);
            }
            tracing::warn!(%name, "metric registered as both counter and gauge; the second is not exported");
            return Arc::new(AtomicU64::new(init));
        }
        let cell = Arc::new(AtomicU64::new(init));
        entries.push(Entry {
            name,
            help: help.to_owned(),
            kind,
            cell: Arc::clone(&cell),
        });
        cell
    }

    /// Every metric in the Prometheus text exposition format 0.0.4, in
    /// registration order.
    pub fn render(&self) -> String {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut s = String::new();
        for e in entries.iter() {
            let help = e.help.replace('\\', "\\\\").replace('\n', "\\n");
            let raw = e.cell.load(Ordering::Relaxed);
            let (kind, value) = match e.kind {
                Kind::Counter => ("counter", raw.to_string()),
                Kind::Gauge => ("gauge", prom_float(f64::from_bits(raw))),
            };
            let _ = write!(
                s,
                "# HELP {n} {help}\n# TYPE {n} {kind}\n{n} {value}\n",
                n = e.name
            );
        }
        s
    }
}

fn sanitize(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | ':' => c,
            _ => '_',
        })
        .collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

fn prom_float(v: f64) -> String {
    match v {
        v if v.is_nan() => "NaN".into(),
        f64::INFINITY => "+Inf".into(),
        f64::NEG_INFINITY => "-Inf".into(),
        v => v.to_string(),
    }
}

/// What `simrep status` shows: an engine's role and protection state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Status {
    /// "primary" or "backup".
    pub role: String,
    /// "protected", "unprotected", "synchronising", "replicating",
    /// "failed-over", ...
    pub state: String,
    /// Latest epoch taken (primary) or committed (backup).
    pub epoch: u64,
    /// Latest epoch the backup acknowledged.
    #[serde(default)]
    pub acked_epoch: Option<u64>,
    /// Epochs taken but not yet acknowledged.
    pub lag_epochs: u64,
    /// The replication link: the peer's address, or "down".
    pub link: String,
    /// The peer, when known.
    #[serde(default)]
    pub peer: Option<String>,
    /// Whether a backup holds a recent checkpoint of the guest.
    pub protected: bool,
    /// Since when `state` holds, ms since the Unix epoch.
    pub since_unix_ms: u64,
    /// A human explanation of the state (why unprotected, what failed).
    pub detail: String,
    /// Engine-specific figures.
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The engine's current [`Status`], shared with the server; clones share it.
#[derive(Clone, Debug, Default)]
pub struct StatusBoard(Arc<Mutex<Status>>);

impl StatusBoard {
    /// A board showing `status`.
    pub fn new(status: Status) -> Self {
        StatusBoard(Arc::new(Mutex::new(status)))
    }

    /// Changes the status in place.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Sets `state`, `protected` and `detail`; `since_unix_ms` becomes now
    /// when the state or the protection changes. Returns whether it did.
    pub fn set_state(&self, state: &str, protected: bool, detail: impl Into<String>) -> bool {
        let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        s.detail = detail.into();
        let changed = s.state != state || s.protected != protected;
        if changed {
            s.state = state.to_owned();
            s.protected = protected;
            s.since_unix_ms = unix_ms_now();
        }
        changed
    }

    /// A copy of the status.
    pub fn get(&self) -> Status {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Milliseconds since the Unix epoch now.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The HTTP server of `/metrics` and `/status`; stops when dropped.
#[derive(Debug)]
pub struct ObserveServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ObserveServer {
    /// Listens on `addr` (port 0: any) and serves on its own threads.
    ///
    /// # Errors
    /// [`ObserveError::Bind`] names the address.
    pub fn start(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        board: StatusBoard,
    ) -> Result<Self, ObserveError> {
        let bind = |source| ObserveError::Bind { addr, source };
        let listener = TcpListener::bind(addr).map_err(bind)?;
        let local = listener.local_addr().map_err(bind)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("observe".into())
            .spawn(move || accept_loop(&listener, &stop2, &metrics, &board))
            .map_err(bind)?;
        tracing::info!(addr = %local, "serving /metrics and /status");
        Ok(ObserveServer {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits for the accept thread (connections in
    /// progress finish within [`REQUEST_DEADLINE`] on their own).
    pub fn shutdown(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        match TcpStream::connect_timeout(&wake, Duration::from_secs(1)) {
            Ok(_) => {
                let _ = t.join();
            }
            Err(e) => {
                tracing::warn!(addr = %wake, error = %e, "cannot wake the metrics server; leaving its thread behind");
            }
        }
    }
}

impl Drop for ObserveServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    metrics: &Arc<Metrics>,
    board: &StatusBoard,
) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "accepting a metrics connection");
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            continue; // dropped: closed at once
        }
        let (m, b, slot) = (
            Arc::clone(metrics),
            board.clone(),
            Slot(Arc::clone(&active)),
        );
        let spawned = std::thread::Builder::new()
            .name("observe-conn".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = serve(stream, &m, &b) {
                    tracing::debug!(error = %e, "metrics connection");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a metrics connection thread");
        }
    }
}

/// One of the [`MAX_CONNECTIONS`] connection slots, freed when dropped
/// (also when its thread panics or cannot start).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads one request (within the deadline and size cap) and answers it.
fn serve(mut s: TcpStream, metrics: &Metrics, board: &StatusBoard) -> std::io::Result<()> {
    s.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let complete = loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || buf.len() >= MAX_REQUEST {
            break false;
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut chunk) {
            Ok(0) => break false,
            Ok(n) => buf.extend_from_slice(&chunk[..n.min(MAX_REQUEST - buf.len())]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break false
            }
            Err(e) => return Err(e),
        }
    };
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next(), parts.next());
    let (code, ctype, body) = match (complete, method, target) {
        (false, _, _) if buf.is_empty() => return Ok(()),
        (false, ..) | (_, None, _) | (_, _, None) => {
            (400, "text/plain", "bad request\n".to_owned())
        }
        (true, Some("GET" | "HEAD"), Some(t)) => match t.split('?').next().unwrap_or(t) {
            "/metrics" => (200, "text/plain; version=0.0.4", metrics.render()),
            "/status" => match serde_json::to_string_pretty(&board.get()) {
                Ok(mut j) => {
                    j.push('\n');
                    (200, "application/json", j)
                }
                Err(e) => (500, "text/plain", format!("{e}\n")),
            },
            _ => (
                404,
                "text/plain",
                "not found: try /metrics or /status\n".to_owned(),
            ),
        },
        (true, Some(_), Some(_)) => (405, "text/plain", "only GET\n".to_owned()),
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    };
    let mut resp = format!(
        "HTTP/1.0 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != Some("HEAD") {
        resp.extend_from_slice(body.as_bytes());
    }
    s.write_all(&resp)?;
    s.shutdown(Shutdown::Write)
}

/// `GET path` from the server at `addr`; the body of a 200 response.
///
/// # Errors
/// [`ObserveError::NoAnswer`] when nothing answers within `timeout`,
/// [`ObserveError::BadAnswer`] for anything but an HTTP 200 response.
pub fn fetch(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, ObserveError> {
    let no_answer = |source| ObserveError::NoAnswer { addr, source };
    let bad = |reason: String| ObserveError::BadAnswer { addr, reason };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(no_answer)?;
    s.set_read_timeout(Some(timeout)).map_err(no_answer)?;
    s.set_write_timeout(Some(timeout)).map_err(no_answer)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(no_answer)?;
    let mut buf = Vec::new();
    let read = (&mut s).take(MAX_RESPONSE).read_to_end(&mut buf);
    match read {
        Err(e) if buf.is_empty() => return Err(no_answer(e)),
        Err(e) => return Err(bad(format!("the response broke off: {e}"))),
        Ok(0) => {
            return Err(no_answer(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection was closed without an answer",
            )))
        }
        Ok(_) => {}
    }
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .or_else(|| text.split_once("\n\n"))
        .ok_or_else(|| bad("not an HTTP response".into()))?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some("200")) if v.starts_with("HTTP/") => Ok(body.to_owned()),
        (Some(v), Some(_)) if v.starts_with("HTTP/") => {
            Err(bad(format!("`{status_line}` for {path}")))
        }
        _ => Err(bad("not an HTTP response".into())),
    }
}

/// The [`Status`] of the engine whose metrics endpoint is `addr` (the
/// client of `simrep status`).
///
/// # Errors
/// As [`fetch`], and [`ObserveError::BadStatus`] for an invalid body.
pub fn fetch_status(addr: SocketAddr, timeout: Duration) -> Result<Status, ObserveError> {
    parse_status(addr, &fetch(addr, "/status", timeout)?)
}

/// Parses a `/status` body fetched from `addr`.
///
/// # Errors
/// [`ObserveError::BadStatus`].
pub fn parse_status(addr: SocketAddr, body: &str) -> Result<Status, ObserveError> {
    serde_json::from_str(body).map_err(|source| ObserveError::BadStatus { addr, source })
}

/// `unix_ms` as `YYYY-MM-DD hh:mm:ss.mmm UTC`.
fn utc(unix_ms: u64) -> String {
    let (days, ms) = (unix_ms / 86_400_000, unix_ms % 86_400_000);
    // Howard Hinnant's civil_from_days.
    let z = days.cast_signed() + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60);
    format!(
        "{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}.{:03} UTC",
        ms % 1000
    )
}

/// `s` as human-readable lines (what `simrep status` prints).
pub fn format_status(s: &Status) -> String {
    let since = match s.since_unix_ms {
        0 => "unknown".to_owned(),
        t => {
            let ago = unix_ms_now().saturating_sub(t) as f64 / 1e3;
            format!("{} ({ago:.1} s ago)", utc(t))
        }
    };
    let yes_no = if s.protected { "yes" } else { "no" };
    let acked = s.acked_epoch.map_or("none".to_owned(), |a| a.to_string());
    let mut rows = vec![
        ("role", s.role.clone()),
        ("state", s.state.clone()),
        ("protected", yes_no.to_owned()),
        ("epoch", s.epoch.to_string()),
        ("acked", acked),
        ("lag", format!("{} epochs", s.lag_epochs)),
        ("link", s.link.clone()),
    ];
    rows.extend(s.peer.clone().map(|p| ("peer", p)));
    rows.push(("since", since));
    if !s.detail.is_empty() {
        rows.push(("detail", s.detail.clone()));
    }
    let mut o = String::new();
    for (k, v) in rows {
        let _ = writeln!(o, "{:<11}{v}", format!("{k}:"));
    }
    for (k, v) in &s.extra {
        let _ = match v {
            serde_json::Value::String(t) => writeln!(o, "  {k} = {t}"),
            v => writeln!(o, "  {k} = {v}"),
        };
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status: Status) -> (ObserveServer, Arc<Metrics>, StatusBoard) {
        let metrics = Arc::new(Metrics::new());
        let board = StatusBoard::new(status);
        let addr = "127.0.0.1:0".parse().unwrap();
        let srv = ObserveServer::start(addr, Arc::clone(&metrics), board.clone()).unwrap();
        (srv, metrics, board)
    }

    /// Sends `req` raw and returns everything the server answers.
    fn raw(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn render_is_exact_prometheus_text() {
        let m = Metrics::new();
        let c = m.counter("simrep_epochs_total", "Epochs taken.");
        let g = m.gauge("simrep_pause_ms", "Last pause in ms.\nSecond line \\ here.");
        c.inc_by(41);
        c.clone().inc();
        g.set(1.5);
        assert_eq!(m.counter("simrep_epochs_total", "again").get(), 42);
        assert_eq!(
            m.render(),
            "# HELP simrep_epochs_total Epochs taken.\n\
             # TYPE simrep_epochs_total counter\n\
             simrep_epochs_total 42\n\
             # HELP simrep_pause_ms Last pause in ms.\\nSecond line \\\\ here.\n\
             # TYPE simrep_pause_ms gauge\n\
             simrep_pause_ms 1.5\n"
        );
        g.set(f64::INFINITY);
        assert!(m.render().ends_with("simrep_pause_ms +Inf\n"));
        assert_eq!(m.gauge("bad name-1", "x").get(), 0.0);
        assert!(m.render().contains("\nbad_name_1 0\n"));
    }

    #[test]
    fn stats_file_is_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.jsonl");
        std::fs::write(&path, "old content\n").unwrap();
        let mut f = StatsFile::create(&path).unwrap();
        let a = EpochRecord {
            epoch: 1,
            ratio: 0.25,
            ack_ms: None,
            ..Default::default()
        };
        let b = EpochRecord {
            epoch: 2,
            ack_ms: Some(3.5),
            protected: true,
            ..Default::default()
        };
        f.write(&a).unwrap();
        f.write(&b).unwrap();
        // Flushed per line: readable while the writer is open.
        let text = std::fs::read_to_string(&path).unwrap();
        let back: Vec<EpochRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, vec![a, b]);
        assert!(text.lines().next().unwrap().contains("\"ack_ms\":null"));
        let err = StatsFile::create(dir.path().join("no/such/dir")).unwrap_err();
        assert!(err.to_string().contains("no/such/dir"), "{err}");
    }

    #[test]
    fn server_answers_metrics_status_and_404() {
        let st = Status {
            role: "primary".into(),
            state: "protected".into(),
            epoch: 7,
            ..Default::default()
        };
        let (srv, metrics, board) = server(st);
        metrics.counter("simrep_epochs_total", "Epochs.").inc_by(7);
        let m = raw(
            srv.local_addr(),
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert!(m.starts_with("HTTP/1.0 200 OK\r\n"), "{m}");
        assert!(
            m.contains("Content-Type: text/plain; version=0.0.4\r\n"),
            "{m}"
        );
        assert!(m.ends_with("\r\n\r\n# HELP simrep_epochs_total Epochs.\n# TYPE simrep_epochs_total counter\nsimrep_epochs_total 7\n"), "{m}");
        board.update(|s| s.epoch = 8);
        assert!(board.set_state("unprotected", false, "backup lost"));
        let since = board.get().since_unix_ms;
        assert!(since > 0);
        assert!(!board.set_state("unprotected", false, "still lost"));
        assert_eq!(
            (board.get().since_unix_ms, board.get().detail.as_str()),
            (since, "still lost")
        );
        let s = raw(srv.local_addr(), b"GET /status HTTP/1.0\r\n\r\n");
        let body = s.split_once("\r\n\r\n").unwrap().1;
        let got: Status = serde_json::from_str(body).unwrap();
        assert_eq!(got, board.get());
        assert_eq!(got.epoch, 8);
        let n = raw(srv.local_addr(), b"GET /nope HTTP/1.0\r\n\r\n");
        assert!(n.starts_with("HTTP/1.0 404 "), "{n}");
        let p = raw(srv.local_addr(), b"POST /status HTTP/1.0\r\n\r\n");
        assert!(p.starts_with("HTTP/1.0 405 "), "{p}");
    }

    #[test]
    fn server_survives_garbage_and_silent_clients() {
        let (mut srv, _m, _b) = server(Status::default());
        let addr = srv.local_addr();
        // Garbage: 20 KiB without a line end, then more.
        let mut g = TcpStream::connect(addr).unwrap();
        let _ = g.write_all(&[0xffu8; 20 * 1024]);
        // Silent: connects and sends nothing, held open meanwhile.
        let silent = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        let ok = raw(addr, b"GET /status HTTP/1.0\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.0 200 OK"), "{ok}");
        assert!(t.elapsed() < REQUEST_DEADLINE, "{:?}", t.elapsed());
        // The garbage client gets a 400 (or a reset) and is closed.
        g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let _ = g.read_to_end(&mut out);
        assert!(out.is_empty() || out.starts_with(b"HTTP/1.0 400 "));
        // The silent one is closed after the deadline without an answer.
        let mut silent = silent;
        silent
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut out = Vec::new();
        silent.read_to_end(&mut out).unwrap();
        assert!(out.is_empty());
        assert!(fetch_status(addr, Duration::from_secs(2)).is_ok());
        srv.shutdown();
        assert!(matches!(
            fetch(addr, "/status", Duration::from_secs(1)),
            Err(ObserveError::NoAnswer { .. })
        ));
    }

    #[test]
    fn fetch_status_against_a_real_server() {
        let mut extra = serde_json::Map::new();
        extra.insert("dirty_pages".into(), 123.into());
        let st = Status {
            role: "backup".into(),
            state: "replicating".into(),
            epoch: 99,
            acked_epoch: Some(99),
            link: "127.0.0.1:4000".into(),
            peer: Some("127.0.0.1:4000".into()),
            protected: true,
            since_unix_ms: 1_796_000_000_000,
            detail: "all good".into(),
            extra,
            ..Default::default()
        };
        let (srv, _m, _b) = server(st.clone());
        let got = fetch_status(srv.local_addr(), Duration::from_secs(2)).unwrap();
        assert_eq!(got, st);
        let text = format_status(&got);
        for want in [
            "role:      backup",
            "state:     replicating",
            "epoch:     99",
            "acked:     99",
            "2026-11-30 00:53:20.000 UTC",
            "dirty_pages = 123",
            "detail:    all good",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
        let err = parse_status(srv.local_addr(), "{\"role\":1}").unwrap_err();
        assert!(matches!(err, ObserveError::BadStatus { .. }));
        let err = fetch(srv.local_addr(), "/x", Duration::from_secs(2)).unwrap_err();
        assert!(err.to_string().contains("404"), "{err}");
    }

    #[test]
    fn shutdown_of_a_wildcard_server_closes_the_port() {
        let board = StatusBoard::default();
        let any = "0.0.0.0:0".parse().unwrap();
        let mut srv = ObserveServer::start(any, Arc::new(Metrics::new()), board).unwrap();
        let port = srv.local_addr().port();
        let local = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(fetch(local, "/metrics", Duration::from_secs(2)).is_ok());
        let t = Instant::now();
        srv.shutdown();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(TcpStream::connect(local).is_err(), "port {port} still open");
    }

    #[test]
    fn bind_error_names_the_address() {
        let (srv, m, b) = server(Status::default());
        let err = ObserveServer::start(srv.local_addr(), m, b).unwrap_err();
        assert!(
            err.to_string().contains(&srv.local_addr().to_string()),
            "{err}"
        );
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc(951_782_400_123), "2000-02-29 00:00:00.123 UTC");
    }
}
