//! A host-side reference server of the `kv` and `bank` services, for tests
//! of `simrep load`: the semantics of [`crate::proto`], in memory, over TCP.
//!
//! It can misbehave on purpose ([`Faults`]) so tests prove that `--verify`
//! catches lost or corrupted data and that the client survives garbage. Two
//! servers built on one [`SharedState`] serve the same data (a failover
//! that keeps it); servers on separate states do not (a failover that loses
//! it). `simrep load-testserver` runs one as a process.
//!
//! Not a model of the guest's performance: it answers from a `BTreeMap`
//! behind a mutex.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::proto::{
    self, op, status, BANK_INITIAL_BALANCE, MAX_BODY, MAX_REQUEST, MAX_SCAN_ENTRIES,
};

/// Which service a server offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// GET/PUT/DEL/SCAN.
    Kv,
    /// TRANSFER/BALANCE/HISTORY.
    Bank,
}

/// Deliberate misbehaviour, each starting after a number of operations.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Acknowledge but do not apply writes (PUT, DEL, TRANSFER) after this
    /// many applied ones.
    pub lose_writes_after: Option<u64>,
    /// Flip a byte of every value read (GET) after this many reads.
    pub corrupt_reads_after: Option<u64>,
    /// Answer with garbage (a frame with a bad length) after this many
    /// responses.
    pub garbage_after: Option<u64>,
    /// Once, after this many responses in all, hold the connection's next
    /// response for this long (a stall, as during a checkpoint pause).
    pub stall: Option<(u64, std::time::Duration)>,
}

#[derive(Debug)]
struct Record {
    seq: u64,
    other: u32,
    outgoing: bool,
    amount: u64,
}

#[derive(Debug)]
struct Account {
    balance: u64,
    history: Vec<Record>,
}

/// The data of the services.
#[derive(Debug)]
struct State {
    kv: BTreeMap<Vec<u8>, Vec<u8>>,
    accounts: Vec<Account>,
    seq: u64,
    writes: u64,
    reads: u64,
    responses: u64,
}

/// The data, shareable between servers.
#[derive(Clone, Debug)]
pub struct SharedState(Arc<Mutex<State>>);

impl SharedState {
    /// An empty kv store and `accounts` bank accounts at
    /// [`BANK_INITIAL_BALANCE`].
    pub fn new(accounts: u32) -> SharedState {
        SharedState(Arc::new(Mutex::new(State {
            kv: BTreeMap::new(),
            accounts: (0..accounts)
                .map(|_| Account {
                    balance: BANK_INITIAL_BALANCE,
                    history: Vec::new(),
                })
                .collect(),
            seq: 0,
            writes: 0,
            reads: 0,
            responses: 0,
        })))
    }

    /// Responses given so far.
    pub fn responses(&self) -> u64 {
        self.0.lock().map_or(0, |s| s.responses)
    }

    /// Keys in the kv store.
    pub fn kv_len(&self) -> usize {
        self.0.lock().map_or(0, |s| s.kv.len())
    }

    /// Answers one request: `(status, body)`, or `None` to send garbage.
    pub fn handle(
        &self,
        service: Service,
        faults: &Faults,
        req: &proto::Request<'_>,
    ) -> Option<(u8, Vec<u8>)> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.responses += 1;
        if faults.garbage_after.is_some_and(|n| s.responses > n) {
            return None;
        }
        Some(s.apply(service, faults, req))
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl State {
    fn write_lost(&mut self, faults: &Faults) -> bool {
        self.writes += 1;
        faults.lose_writes_after.is_some_and(|n| self.writes > n)
    }

    fn apply(
        &mut self,
        service: Service,
        faults: &Faults,
        r: &proto::Request<'_>,
    ) -> (u8, Vec<u8>) {
        let bad = (status::BAD_REQUEST, Vec::new());
        match (service, r.op) {
            (_, op::PING) => (status::OK, Vec::new()),
            (Service::Kv, op::GET) => match self.kv.get(r.key) {
                Some(v) => {
                    let mut v = v.clone();
                    self.reads += 1;
                    if faults.corrupt_reads_after.is_some_and(|n| self.reads > n) && !v.is_empty() {
                        let last = v.len() - 1;
                        v[last] ^= 0x5a;
                    }
                    (status::OK, v)
                }
                None => (status::NOT_FOUND, Vec::new()),
            },
            (Service::Kv, op::PUT) => {
                if r.key.is_empty() {
                    return bad;
                }
                if !self.write_lost(faults) {
                    self.kv.insert(r.key.to_vec(), r.value.to_vec());
                }
                (status::OK, Vec::new())
            }
            (Service::Kv, op::DEL) => {
                if !self.kv.contains_key(r.key) {
                    return (status::NOT_FOUND, Vec::new());
                }
                if !self.write_lost(faults) {
                    self.kv.remove(r.key);
                }
                (status::OK, Vec::new())
            }
            (Service::Kv, op::SCAN) => {
                let Some(max) = u32_at(r.value, 0)
                    .filter(|m| (1..=MAX_SCAN_ENTRIES).contains(m) && r.value.len() == 4)
                else {
                    return bad;
                };
                let mut body = Vec::new();
                for (k, v) in self.kv.range(r.key.to_vec()..).take(max as usize) {
                    if body.len() + 6 + k.len() + v.len() > MAX_BODY {
                        break;
                    }
                    body.extend_from_slice(&(k.len() as u16).to_le_bytes());
                    body.extend_from_slice(&(v.len() as u32).to_le_bytes());
                    body.extend_from_slice(k);
                    body.extend_from_slice(v);
                }
                (status::OK, body)
            }
            (Service::Bank, op::TRANSFER) => {
                let (Some(from), Some(to), Some(amount), 16) = (
                    u32_at(r.value, 0),
                    u32_at(r.value, 4),
                    r.value
                        .get(8..16)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_le_bytes),
                    r.value.len(),
                ) else {
                    return bad;
                };
                let n = self.accounts.len() as u32;
                if from >= n || to >= n {
                    return (status::NOT_FOUND, Vec::new());
                }
                if from == to {
                    return bad;
                }
                let (fb, tb) = (
                    self.accounts[from as usize].balance,
                    self.accounts[to as usize].balance,
                );
                if amount > fb {
                    return (status::INSUFFICIENT_FUNDS, Vec::new());
                }
                let (nf, nt) = (fb - amount, tb + amount);
                if !self.write_lost(faults) {
                    self.seq += 1;
                    let seq = self.seq;
                    let f = &mut self.accounts[from as usize];
                    f.balance = nf;
                    f.history.push(Record {
                        seq,
                        other: to,
                        outgoing: true,
                        amount,
                    });
                    let t = &mut self.accounts[to as usize];
                    t.balance = nt;
                    t.history.push(Record {
                        seq,
                        other: from,
                        outgoing: false,
                        amount,
                    });
                }
                let mut body = nf.to_le_bytes().to_vec();
                body.extend_from_slice(&nt.to_le_bytes());
                (status::OK, body)
            }
            (Service::Bank, op::BALANCE) => {
                let Some(a) = u32_at(r.value, 0).filter(|_| r.value.len() == 4) else {
                    return bad;
                };
                let Some(acc) = self.accounts.get(a as usize) else {
                    return (status::NOT_FOUND, Vec::new());
                };
                let mut body = acc.balance.to_le_bytes().to_vec();
                body.extend_from_slice(&(acc.history.len() as u64).to_le_bytes());
                (status::OK, body)
            }
            (Service::Bank, op::HISTORY) => {
                let (Some(a), Some(max), 8) =
                    (u32_at(r.value, 0), u32_at(r.value, 4), r.value.len())
                else {
                    return bad;
                };
                let Some(acc) = self.accounts.get(a as usize) else {
                    return (status::NOT_FOUND, Vec::new());
                };
                let mut body = Vec::new();
                for rec in acc
                    .history
                    .iter()
                    .rev()
                    .take(max.min(MAX_SCAN_ENTRIES) as usize)
                {
                    body.extend_from_slice(&rec.seq.to_le_bytes());
                    body.extend_from_slice(&rec.other.to_le_bytes());
                    body.extend_from_slice(&u32::from(rec.outgoing).to_le_bytes());
                    body.extend_from_slice(&rec.amount.to_le_bytes());
                }
                (status::OK, body)
            }
            _ => (status::UNKNOWN_OP, Vec::new()),
        }
    }
}

/// A running server: its own thread and tokio runtime.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    requests: Arc<AtomicU64>,
}

impl TestServer {
    /// Serves `service` on `listener` (bind port 0 and read
    /// [`TestServer::addr`]) from `state`.
    ///
    /// # Errors
    ///
    /// When the listener cannot be used or the runtime not built.
    pub fn start(
        listener: std::net::TcpListener,
        service: Service,
        state: SharedState,
        faults: Faults,
    ) -> std::io::Result<TestServer> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, rx) = oneshot::channel::<()>();
        let requests = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&requests);
        let thread = std::thread::Builder::new()
            .name(format!("testserver-{addr}"))
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = accept_loop(listener, service, state, faults, counter) => {}
                        _ = rx => {}
                    }
                });
                // Dropping the runtime drops every connection task: their
                // sockets close at once, as when a server dies.
                drop(rt);
            })?;
        Ok(TestServer {
            addr,
            stop: Some(tx),
            thread: Some(thread),
            requests,
        })
    }

    /// Binds `addr` and serves.
    ///
    /// # Errors
    ///
    /// As [`TestServer::start`], and when binding fails.
    pub fn bind(
        addr: &str,
        service: Service,
        state: SharedState,
        faults: Faults,
    ) -> std::io::Result<TestServer> {
        TestServer::start(std::net::TcpListener::bind(addr)?, service, state, faults)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Stops listening and closes every connection at once.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Serves until the process ends (`simrep load-testserver`).
///
/// # Errors
///
/// When the runtime cannot be built or the listener used.
pub fn serve_forever(
    listener: std::net::TcpListener,
    service: Service,
    state: SharedState,
    faults: Faults,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        accept_loop(
            listener,
            service,
            state,
            faults,
            Arc::new(AtomicU64::new(0)),
        )
        .await;
        Ok(())
    })
}

async fn accept_loop(
    listener: TcpListener,
    service: Service,
    state: SharedState,
    faults: Faults,
    counter: Arc<AtomicU64>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let state = state.clone();
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    if let Err(e) = serve_conn(stream, service, state, faults, counter).await {
                        tracing::debug!(%peer, error = %e, "test server: connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "test server: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve_conn(
    stream: TcpStream,
    service: Service,
    state: SharedState,
    faults: Faults,
    counter: Arc<AtomicU64>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut w = BufWriter::new(w);
    let mut msg = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_REQUEST {
            return Ok(()); // over the limit: close
        }
        msg.resize(len, 0);
        r.read_exact(&mut msg).await?;
        let mut hdr = [0u8; 20];
        let reply = match proto::parse_request(&msg) {
            Ok(req) => state
                .handle(service, &faults, &req)
                .map(|(st, body)| (req.id, st, body)),
            Err(_) => {
                let id = msg
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u64::from_le_bytes);
                Some((id, status::BAD_REQUEST, Vec::new()))
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some((n, d)) = faults.stall {
            if state.responses() == n {
                w.flush().await?;
                tokio::time::sleep(d).await;
            }
        }
        match reply {
            Some((id, st, body)) => {
                let n = proto::write_response_header(&mut hdr, id, st, body.len() as u32);
                w.write_all(&hdr[..n]).await?;
                w.write_all(&body).await?;
            }
            None => w.write_all(&[0xff; 24]).await?,
        }
        if r.buffer().is_empty() {
            w.flush().await?;
        }
    }
}
