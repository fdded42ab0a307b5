//! One client connection (framing per [`crate::proto`]) and the shared
//! target list that connections fail over along.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::model::Encoded;
use super::LoadError;
use crate::proto::{self, status, MAX_RESPONSE, RESPONSE_HEADER};

/// Why a request got no valid response.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The connection failed or closed (the request's fate is unknown).
    Lost(String),
    /// The target answered something that is not the protocol.
    Protocol(String),
}

/// A connected client.
pub(crate) struct Conn {
    stream: BufReader<TcpStream>,
    out: Vec<u8>,
    buf: Vec<u8>,
    next_id: u64,
    /// Index of the target in the list.
    pub target: usize,
    /// The failover generation the connection was made in.
    pub gen: u64,
}

impl Conn {
    fn new(stream: TcpStream, target: usize, gen: u64) -> Conn {
        let _ = stream.set_nodelay(true);
        Conn {
            stream: BufReader::with_capacity(64 * 1024, stream),
            out: Vec::with_capacity(1024),
            buf: Vec::with_capacity(1024),
            next_id: 1,
            target,
            gen,
        }
    }

    /// Sends `req` and waits for its response: `(status, body)`.
    pub(crate) async fn call(
        &mut self,
        req: &Encoded,
        timeout: Duration,
    ) -> Result<(u8, &[u8]), CallError> {
        let id = self.next_id;
        self.next_id += 1;
        self.out.clear();
        self.out
            .resize(proto::FRAME_PREFIX + proto::REQUEST_HEADER, 0);
        proto::write_request_header(
            &mut self.out,
            id,
            req.op,
            req.key.len() as u16,
            req.value.len() as u32,
        );
        self.out.extend_from_slice(&req.key);
        self.out.extend_from_slice(&req.value);
        match tokio::time::timeout(
            timeout,
            exchange(&mut self.stream, &self.out, &mut self.buf),
        )
        .await
        {
            Err(_) => return Err(CallError::Lost(format!("no response within {timeout:?}"))),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(())) => {}
        }
        let r = proto::parse_response(&self.buf)
            .map_err(|e| CallError::Protocol(format!("malformed response ({e:?})")))?;
        if r.id != id {
            return Err(CallError::Protocol(format!(
                "response id {} to request {id}",
                r.id
            )));
        }
        if r.status > status::UNKNOWN_OP {
            return Err(CallError::Protocol(format!("unknown status {}", r.status)));
        }
        Ok((r.status, r.body))
    }
}

async fn exchange(
    s: &mut BufReader<TcpStream>,
    out: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), CallError> {
    let lost = |e: std::io::Error| CallError::Lost(e.to_string());
    s.get_mut().write_all(out).await.map_err(lost)?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.map_err(lost)?;
    let len = u32::from_le_bytes(len) as usize;
    if !(RESPONSE_HEADER..=MAX_RESPONSE).contains(&len) {
        return Err(CallError::Protocol(format!(
            "response length {len} outside {RESPONSE_HEADER}..={MAX_RESPONSE}"
        )));
    }
    buf.resize(len, 0);
    s.read_exact(buf).await.map_err(lost)?;
    Ok(())
}

/// A switch from one target to the next.
#[derive(Clone, Debug, Serialize)]
pub struct Failover {
    /// The target that failed.
    pub from: String,
    /// The target switched to.
    pub to: String,
    /// Seconds since the start of the run when the switch happened.
    pub at_s: f64,
    /// Time without any successful response around the switch: from the
    /// last success before it to the first success after it (ms; `None`
    /// when no response came after it).
    pub gap_ms: Option<f64>,
    /// Moves along the target list this failover took: more than 1 when
    /// the next target did not accept either (a backup still taking over)
    /// and the client went round the list until one served.
    pub moves: u32,
}

struct TargetState {
    current: usize,
    gen: u64,
    /// Per failover: the event, the last success before it (ns since
    /// start) and the generation it moved to.
    events: Vec<(Failover, u64, u64)>,
}

/// The target list, the current target and the success timeline.
pub(crate) struct Targets {
    addrs: Vec<String>,
    state: Mutex<TargetState>,
    gen: AtomicU64,
    /// The generation of the oldest failover no response has followed yet
    /// (`u64::MAX`: none), so that most successes need no lock.
    gap_open_gen: AtomicU64,
    start: Instant,
    last_success_ns: AtomicU64,
    longest_gap_ns: AtomicU64,
    connect_timeout: Duration,
    failover_timeout: Duration,
    reconnects: AtomicU64,
    /// Set on Ctrl-C: reconnecting gives up at once.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Targets {
    pub(crate) fn new(
        addrs: Vec<String>,
        connect_timeout: Duration,
        failover_timeout: Duration,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Targets {
        Targets {
            addrs,
            state: Mutex::new(TargetState {
                current: 0,
                gen: 0,
                events: Vec::new(),
            }),
            gen: AtomicU64::new(0),
            gap_open_gen: AtomicU64::new(u64::MAX),
            start: Instant::now(),
            last_success_ns: AtomicU64::new(0),
            longest_gap_ns: AtomicU64::new(0),
            connect_timeout,
            failover_timeout,
            reconnects: AtomicU64::new(0),
            stop,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TargetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The address of the current target.
    pub(crate) fn current_addr(&self) -> String {
        self.addrs[self.lock().current].clone()
    }

    async fn try_connect(&self, i: usize) -> Result<TcpStream, String> {
        let addr = &self.addrs[i];
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr.as_str())).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(format!("{addr}: {e}")),
            Err(_) => Err(format!(
                "{addr}: no connection within {:?}",
                self.connect_timeout
            )),
        }
    }

    /// Tries every target once, in order; the first that accepts becomes
    /// the current one.
    pub(crate) async fn probe(&self) -> Result<(), LoadError> {
        let mut errors = Vec::new();
        for i in 0..self.addrs.len() {
            match self.try_connect(i).await {
                Ok(_) => {
                    self.lock().current = i;
                    self.last_success_ns.store(self.now_ns(), Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => errors.push(e),
            }
        }
        Err(LoadError::NoTarget(format!(
            "none of the targets accepts connections ({})",
            errors.join("; ")
        )))
    }

    /// Connects to the current target; after a failure on `failed`
    /// (`(target, generation)`), first moves to the next target unless
    /// another connection did already. Retries with backoff, moving along
    /// the list, until the failover timeout.
    pub(crate) async fn connect(
        &self,
        mut failed: Option<(usize, u64)>,
    ) -> Result<Conn, LoadError> {
        let down = Instant::now();
        let mut backoff = Duration::from_millis(5);
        if failed.is_some() {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        loop {
            if let Some((t, g)) = failed.take() {
                self.advance(t, g);
            }
            let (t, g) = {
                let s = self.lock();
                (s.current, s.gen)
            };
            match self.try_connect(t).await {
                Ok(s) => return Ok(Conn::new(s, t, g)),
                Err(e) => {
                    tracing::debug!(error = %e, "connecting failed");
                    failed = Some((t, g));
                    if self.stop.load(Ordering::Relaxed) {
                        return Err(LoadError::NoTarget(format!(
                            "interrupted while no target accepted a connection (for {:.1} s); last error: {e}",
                            down.elapsed().as_secs_f64()
                        )));
                    }
                    if down.elapsed() >= self.failover_timeout {
                        return Err(LoadError::NoTarget(format!(
                            "no target accepted a connection for {:.1} s (--failover-timeout); last error: {e}",
                            down.elapsed().as_secs_f64()
                        )));
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    fn advance(&self, t: usize, g: u64) {
        let mut s = self.lock();
        if s.gen != g || self.addrs.len() < 2 {
            return;
        }
        s.current = (t + 1) % self.addrs.len();
        s.gen += 1;
        self.gen.store(s.gen, Ordering::Release);
        let to = self.addrs[s.current].clone();
        // No response since the previous move: the same failover goes on.
        let gen = s.gen;
        if let Some((ev, _, ev_gen)) = s.events.last_mut().filter(|(e, ..)| e.gap_ms.is_none()) {
            tracing::debug!(from = %self.addrs[t], %to, "target failed too: moving on");
            ev.to = to;
            ev.moves += 1;
            *ev_gen = gen;
            return;
        }
        let ev = Failover {
            from: self.addrs[t].clone(),
            to,
            at_s: self.start.elapsed().as_secs_f64(),
            gap_ms: None,
            moves: 1,
        };
        tracing::warn!(from = %ev.from, to = %ev.to, "target failed: moving to the next one");
        let last = self.last_success_ns.load(Ordering::Relaxed);
        s.events.push((ev, last, gen));
        self.gap_open_gen.fetch_min(gen, Ordering::AcqRel);
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// A response arrived on a connection made in generation `conn_gen`.
    /// It closes the gap of every failover that connection was made after
    /// (a late answer on a connection to the failed target does not).
    pub(crate) fn success(&self, conn_gen: u64) {
        let now = self.now_ns();
        let prev = self.last_success_ns.swap(now, Ordering::Relaxed);
        self.longest_gap_ns
            .fetch_max(now.saturating_sub(prev), Ordering::Relaxed);
        if conn_gen < self.gap_open_gen.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.lock();
        let mut open = u64::MAX;
        for (ev, last, gen) in s.events.iter_mut().filter(|(e, ..)| e.gap_ms.is_none()) {
            if *gen <= conn_gen {
                ev.gap_ms = Some(now.saturating_sub(*last) as f64 / 1e6);
            } else {
                open = open.min(*gen);
            }
        }
        self.gap_open_gen.store(open, Ordering::Release);
    }

    /// The failovers so far.
    pub(crate) fn failovers(&self) -> Vec<Failover> {
        self.lock().events.iter().map(|(e, ..)| e.clone()).collect()
    }

    /// The longest time without a successful response, in ms.
    pub(crate) fn longest_gap_ms(&self) -> f64 {
        self.longest_gap_ns.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Reconnections after a lost connection.
    pub(crate) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// The target addresses.
    pub(crate) fn addrs(&self) -> &[String] {
        &self.addrs
    }
}

/// Checks that every target is `HOST:PORT` (names are resolved when
/// connecting).
pub(crate) fn check_target(t: &str) -> Result<(), String> {
    if t.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    match t.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("bad target `{t}`: expected HOST:PORT")),
    }
}
