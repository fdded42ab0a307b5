//! The paravirtual network device: client TCP connections on the host,
//! request/response rings in guest memory (layout and protocol in
//! [`abi::NET_BASE`]).
//!
//! # Threads and data flow
//!
//! ```text
//! client --TCP--> reader thread --(conn, seq, msg)--> pending queue
//!                                                         |  (vCPU thread, in a NET_* exit)
//!                                                         v
//!                                               request ring (guest RAM)
//! guest service: one batch of requests -> responses -> NET_WAIT
//!                                                         |  (vCPU thread, in the exit)
//!                                                         v
//! client <--TCP-- writer thread <-- Delivery <-- OutputGate::submit
//! ```
//!
//! * One acceptor thread; per connection a reader thread (cuts the stream
//!   into frames, checks them with [`proto::parse_request`], drops the
//!   connection on garbage) and a writer thread (so a slow client never
//!   blocks a vCPU).
//! * Guest memory is read and written only on the vCPU thread that is in a
//!   `NET_*` exit ([`NetDevice::write`], [`NetDevice::wait_done`]), never by
//!   the network threads: a paused guest's memory and rings are stable, and
//!   every page the device writes is recorded
//!   ([`NetDevice::take_written_pages`]) for dirty tracking, which does not
//!   see writes the VMM makes through its own mapping.
//! * A vCPU waiting in `NET_WAIT` blocks on its command channel
//!   ([`MmioAction::Wait`]); a new request wakes it through
//!   [`VcpuWakers`] at once (no polling interval), and a pause or stop
//!   command ends the wait as well.
//! * Every response goes through one [`OutputGate`]. `simrep run` uses
//!   [`ImmediateGate`], which delivers at once; replication holds a
//!   response produced in epoch k until the backup acked k and then hands
//!   it to the same [`Delivery`].
//!
//! Every index, length, kind and sequence number the guest provides is
//! checked; a violation is a [`NetError`] that stops the vCPU, never a
//! panic or an access outside the rings.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::abi::{self, NetRecord, NetRings};
use super::devices::{DeviceError, MmioAction};
use super::memory::{GuestMemory, MemoryError};
use super::vcpu::VcpuWakers;
use crate::proto;

// SAFETY: `#[repr(C)]` structs of `u32`/`u64` fields without padding
// (checked by the size assertions below); every bit pattern is valid.
unsafe impl vm_memory::ByteValued for NetRings {}
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for NetRecord {}
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for abi::KvParams {}
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for abi::BankParams {}

const _: () = assert!(size_of::<NetRings>() == 128);
const _: () = assert!(size_of::<NetRecord>() as u64 == abi::NET_RECORD_HEADER);
const _: () = assert!(size_of::<abi::KvParams>() == 8);
const _: () = assert!(size_of::<abi::BankParams>() == 8);
const _: () = assert!(
    2 * abi::net_record_size(proto::MAX_REQUEST as u64) <= abi::NET_REQ_RING_MIN
        && 2 * abi::net_record_size(proto::MAX_RESPONSE as u64) <= abi::NET_RESP_RING_MIN
);

/// Bytes of requests the host queues before readers wait for the guest.
const PENDING_BUDGET: usize = 8 << 20;
/// Most client connections at once; more are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// Stack size of the per-connection threads.
const CONN_STACK: usize = 256 << 10;
/// Bytes of responses a connection may have waiting for its client; while
/// over it, its reader stops taking requests (a client that sends without
/// reading cannot grow the VMM's memory).
const WRITE_BACKLOG: usize = 8 << 20;
/// Requests of one connection queued or in the guest, not yet answered;
/// while at it, its reader waits (pipelining depth per connection).
const MAX_IN_FLIGHT: u64 = 256;

/// Errors of the network device and its host side.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The guest used a ring register before `NET_SETUP`.
    #[error("network device: {register} written before NET_SETUP")]
    NotSetUp {
        /// The register.
        register: &'static str,
    },
    /// The guest wrote `NET_SETUP` twice.
    #[error("network device: NET_SETUP written twice")]
    AlreadySetUp,
    /// The ring block the guest described is unusable.
    #[error("network device: bad ring setup at {gpa:#x}: {reason}")]
    BadSetup {
        /// GPA of the [`NetRings`] block.
        gpa: u64,
        /// What is wrong.
        reason: String,
    },
    /// The guest moved one of its ring positions out of the allowed range.
    #[error("network device: guest set the {ring} ring's {index} to {value} (allowed {min}..={max}, 16-aligned)")]
    BadIndex {
        /// "request" or "response".
        ring: &'static str,
        /// "head" or "tail".
        index: &'static str,
        /// What the guest wrote.
        value: u64,
        /// Lowest allowed value.
        min: u64,
        /// Highest allowed value.
        max: u64,
    },
    /// A response record is malformed.
    #[error("network device: bad response record at ring position {pos}: {reason}")]
    BadRecord {
        /// Ring position of the record.
        pos: u64,
        /// What is wrong.
        reason: String,
    },
    /// A response does not answer the connection's next request.
    #[error(
        "network device: response for connection {conn} has sequence {got}, expected {expected}"
    )]
    OutOfOrder {
        /// The connection.
        conn: u32,
        /// The record's sequence number.
        got: u32,
        /// The next sequence number the connection waits for.
        expected: u32,
    },
    /// Guest memory could not be accessed (should not happen after the
    /// checks).
    #[error("network device: guest memory access failed")]
    Memory(#[from] MemoryError),
    /// The listening socket could not be set up.
    #[error("network device: cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A network thread could not be started.
    #[error("network device: cannot start a thread")]
    Thread(#[source] io::Error),
}

/// Result of the network device.
pub type Result<T, E = NetError> = std::result::Result<T, E>;

/// A response the guest produced, on its way to its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetResponse {
    /// The connection.
    pub conn: u32,
    /// The request's sequence number within the connection.
    pub seq: u32,
    /// The whole frame: the 4-byte length prefix and the message.
    pub frame: Vec<u8>,
}

/// The one place every response passes through on its way out (output
/// commit, issue 4). Called on the vCPU thread, in guest order, while the
/// guest is inside the exit that handed the responses over; an
/// implementation must not block for long.
pub trait OutputGate: Send + Sync + std::fmt::Debug {
    /// Takes one response; it must eventually reach [`Delivery::deliver`]
    /// (or be dropped, when its epoch is lost).
    fn submit(&self, response: NetResponse);
}

/// The gate of `simrep run`: every response leaves at once.
#[derive(Debug, Clone)]
pub struct ImmediateGate {
    delivery: Delivery,
}

impl ImmediateGate {
    /// A gate that hands every response straight to `delivery`.
    pub fn new(delivery: Delivery) -> Self {
        ImmediateGate { delivery }
    }
}

impl OutputGate for ImmediateGate {
    fn submit(&self, response: NetResponse) {
        self.delivery.deliver(response);
    }
}

/// Counters of the network device.
#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    dropped: AtomicU64,
    requests: AtomicU64,
    responses: AtomicU64,
    discarded: AtomicU64,
    notify_exits: AtomicU64,
    wait_exits: AtomicU64,
    waits_blocked: AtomicU64,
}

/// A snapshot of the network device's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections dropped for garbage, an early disconnect or an I/O error.
    pub dropped_connections: u64,
    /// Requests queued for the guest.
    pub requests: u64,
    /// Responses the guest produced.
    pub responses: u64,
    /// Responses for connections that had closed.
    pub discarded_responses: u64,
    /// `NET_NOTIFY` exits.
    pub notify_exits: u64,
    /// `NET_WAIT` exits.
    pub wait_exits: u64,
    /// `NET_WAIT` exits that blocked the vCPU (nothing to do).
    pub waits_blocked: u64,
}

impl NetStats {
    /// `NET_*` exits per response (0 with no responses).
    pub fn exits_per_response(&self) -> f64 {
        if self.responses == 0 {
            0.0
        } else {
            (self.notify_exits + self.wait_exits) as f64 / self.responses as f64
        }
    }
}

/// One client connection in the table.
#[derive(Debug)]
struct Conn {
    /// Frames for the writer thread.
    tx: Sender<Vec<u8>>,
    /// Bytes handed to the writer thread and not yet written.
    unsent: Arc<AtomicUsize>,
    /// A handle to shut the socket down.
    stream: TcpStream,
    /// Sequence number of the next response the guest must produce.
    next_resp_seq: u32,
    /// Requests queued and not yet delivered.
    outstanding: u64,
    /// The client closed its side cleanly: remove the connection once
    /// nothing is outstanding.
    eof: bool,
}

/// The table of live connections.
#[derive(Debug, Default)]
struct Connections {
    map: Mutex<HashMap<u32, Conn>>,
    next_id: AtomicU32,
}

impl Connections {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Conn>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes a connection and shuts its socket down.
    fn drop_conn(&self, id: u32) {
        if let Some(c) = self.lock().remove(&id) {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
    }
}

/// Sends responses to their connections' writer threads. Cloneable; what
/// an [`OutputGate`] releases to.
#[derive(Debug, Clone)]
pub struct Delivery {
    conns: Arc<Connections>,
    counters: Arc<Counters>,
}

impl Delivery {
    /// Queues `response` on its connection; dropped (and counted) if the
    /// connection has closed.
    pub fn deliver(&self, response: NetResponse) {
        let mut map = self.conns.lock();
        let Some(c) = map.get_mut(&response.conn) else {
            self.counters.discarded.fetch_add(1, Ordering::Relaxed);
            return;
        };
        c.unsent.fetch_add(response.frame.len(), Ordering::Relaxed);
        let _ = c.tx.send(response.frame);
        c.outstanding = c.outstanding.saturating_sub(1);
        if c.eof && c.outstanding == 0 {
            // Dropping the sender ends the writer once it has sent the
            // queued frames.
            map.remove(&response.conn);
        }
    }
}

/// A request waiting for room in the request ring.
#[derive(Debug)]
struct PendingRequest {
    conn: u32,
    seq: u32,
    msg: Vec<u8>,
}

/// Requests queued on the host, and the vCPUs waiting for them.
#[derive(Debug, Default)]
struct Pending {
    queue: VecDeque<PendingRequest>,
    bytes: usize,
    /// Bit i: vCPU i waits in `NET_WAIT`.
    waiting: u64,
}

/// A ring's validated geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ring {
    gpa: u64,
    size: u64,
}

/// The device's view of the rings, valid after `NET_SETUP`.
#[derive(Debug)]
struct Rings {
    ctl: u64,
    req: Ring,
    resp: Ring,
    /// Request ring: the VMM's producer position (authoritative copy).
    req_head: u64,
    /// Request ring: the guest's consumer position, last read.
    req_tail: u64,
    /// Response ring: the VMM's consumer position (authoritative copy).
    resp_tail: u64,
}

/// Checks the ring block the guest wrote at `ctl`; returns the two rings.
fn validate_setup(ctl: u64, r: &NetRings, mem_size: u64) -> Result<(Ring, Ring)> {
    let rings = validate_layout(ctl, r, mem_size)?;
    if (r.req_head, r.req_tail, r.resp_head, r.resp_tail) != (0, 0, 0, 0) {
        return Err(NetError::BadSetup {
            gpa: ctl,
            reason: "ring positions must start at 0".into(),
        });
    }
    Ok(rings)
}

/// [`validate_setup`] without the fresh-positions check: a restored ring
/// block carries the positions it had at the snapshot.
fn validate_layout(ctl: u64, r: &NetRings, mem_size: u64) -> Result<(Ring, Ring)> {
    let bad = |reason: String| NetError::BadSetup { gpa: ctl, reason };
    if !ctl.is_multiple_of(64) {
        return Err(bad("the block is not 64-byte aligned".into()));
    }
    if r.magic != abi::NET_MAGIC {
        return Err(bad(format!(
            "magic {:#x}, expected {:#x}",
            r.magic,
            abi::NET_MAGIC
        )));
    }
    let in_heap = |gpa: u64, len: u64| {
        gpa >= abi::HEAP_GPA && gpa.checked_add(len).is_some_and(|end| end <= mem_size)
    };
    if !in_heap(ctl, size_of::<NetRings>() as u64) {
        return Err(bad("the block is not in the guest heap".into()));
    }
    let ring = |name: &str, gpa: u64, size: u64, min: u64| -> Result<Ring> {
        if !size.is_power_of_two() || size < min || size > abi::NET_RING_MAX {
            return Err(bad(format!(
                "{name} ring size {size} is not a power of two in {min}..={}",
                abi::NET_RING_MAX
            )));
        }
        if !gpa.is_multiple_of(abi::NET_RECORD_ALIGN) || !in_heap(gpa, size) {
            return Err(bad(format!(
                "{name} ring {gpa:#x}+{size:#x} is not 16-byte aligned inside the heap ({:#x}..{mem_size:#x})",
                abi::HEAP_GPA
            )));
        }
        Ok(Ring { gpa, size })
    };
    let req = ring("request", r.req_gpa, r.req_size, abi::NET_REQ_RING_MIN)?;
    let resp = ring("response", r.resp_gpa, r.resp_size, abi::NET_RESP_RING_MIN)?;
    let overlap = |a: (u64, u64), b: (u64, u64)| a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
    let block = (ctl, size_of::<NetRings>() as u64);
    if overlap((req.gpa, req.size), (resp.gpa, resp.size))
        || overlap((req.gpa, req.size), block)
        || overlap((resp.gpa, resp.size), block)
    {
        return Err(bad("the rings and the block overlap".into()));
    }
    Ok((req, resp))
}

/// Checks a position the guest moved: `min <= value <= max`, 16-aligned.
fn check_index(
    ring: &'static str,
    index: &'static str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<u64> {
    if value < min || value > max || !value.is_multiple_of(abi::NET_RECORD_ALIGN) {
        return Err(NetError::BadIndex {
            ring,
            index,
            value,
            min,
            max,
        });
    }
    Ok(value)
}

/// A response record found in the ring, before its message is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parsed {
    /// Padding: continue at this position.
    Skip(u64),
    /// A message of `len` bytes at `msg_pos`; the next record is at `next`.
    Msg {
        conn: u32,
        seq: u32,
        msg_pos: u64,
        len: u64,
        next: u64,
    },
}

/// Checks the record header `h` at position `tail` of a ring of `size`
/// bytes whose producer is at `head`.
fn parse_record(h: NetRecord, tail: u64, head: u64, size: u64, max_len: u64) -> Result<Parsed> {
    let bad = |reason: String| NetError::BadRecord { pos: tail, reason };
    let to_end = size - tail % size;
    match h.kind {
        abi::NET_REC_PAD => {
            if tail + to_end > head {
                return Err(bad("padding runs past the producer position".into()));
            }
            Ok(Parsed::Skip(tail + to_end))
        }
        abi::NET_REC_MSG => {
            let len = u64::from(h.len);
            if len > max_len {
                return Err(bad(format!("message of {len} bytes (at most {max_len})")));
            }
            let rec = abi::net_record_size(len);
            if rec > to_end {
                return Err(bad(format!(
                    "record of {rec} bytes wraps around the ring end"
                )));
            }
            if tail + rec > head {
                return Err(bad(format!(
                    "record of {rec} bytes runs past the producer position {head}"
                )));
            }
            Ok(Parsed::Msg {
                conn: h.conn,
                seq: h.seq,
                msg_pos: tail + abi::NET_RECORD_HEADER,
                len,
                next: tail + rec,
            })
        }
        k => Err(bad(format!("unknown record kind {k}"))),
    }
}

/// The network device: the guest side (rings, registers) and the host
/// side (pending requests, connections, the output gate).
#[derive(Debug)]
pub struct NetDevice {
    rings: Mutex<Option<Rings>>,
    pending: Mutex<Pending>,
    /// Signalled when requests move from the queue into the ring.
    space: Condvar,
    conns: Arc<Connections>,
    gate: Arc<dyn OutputGate>,
    wakers: Arc<VcpuWakers>,
    counters: Arc<Counters>,
    stopped: AtomicBool,
    /// Guest pages the device wrote since the last harvest.
    written: Mutex<HashSet<u64>>,
    /// Ring positions from a restored snapshot, applied (and checked
    /// against the restored guest memory) at the next guest access.
    restored: Mutex<Option<SavedNet>>,
}

/// The device state a snapshot holds: where the rings are and the VMM's
/// positions in them. Connections are not saved: they belong to the old
/// process; responses the guest still owes them are discarded, and new
/// connections get ids above every saved one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SavedNet {
    /// GPA of the ring block (0: the guest had not set up its rings).
    ctl: u64,
    req_head: u64,
    req_tail: u64,
    resp_tail: u64,
    next_conn: u32,
}

/// Version byte of the saved state.
const NET_STATE_VERSION: u8 = 1;
/// Bytes of the saved state.
const NET_STATE_LEN: usize = 1 + 8 * 4 + 4;

impl SavedNet {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(NET_STATE_LEN);
        b.push(NET_STATE_VERSION);
        for v in [self.ctl, self.req_head, self.req_tail, self.resp_tail] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.next_conn.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> std::result::Result<Self, String> {
        if b.len() != NET_STATE_LEN {
            return Err(format!("{} bytes, expected {NET_STATE_LEN}", b.len()));
        }
        if b[0] != NET_STATE_VERSION {
            return Err(format!("version {}, expected {NET_STATE_VERSION}", b[0]));
        }
        let u = |i: usize| u64_of(&b[1 + 8 * i..9 + 8 * i]);
        let s = SavedNet {
            ctl: u(0),
            req_head: u(1),
            req_tail: u(2),
            resp_tail: u(3),
            next_conn: u32::from_le_bytes([b[33], b[34], b[35], b[36]]),
        };
        if s.req_tail > s.req_head {
            return Err("request tail ahead of head".into());
        }
        Ok(s)
    }
}

impl super::state::DeviceState for NetDevice {
    fn state_name(&self) -> &str {
        "net"
    }

    fn save_state(&self) -> Vec<u8> {
        if let Some(saved) = *lock(&self.restored) {
            // Restored but not touched by the guest since: unchanged.
            return saved.encode();
        }
        let rings = lock(&self.rings);
        let next_conn = self.conns.next_id.load(Ordering::Relaxed);
        match rings.as_ref() {
            Some(r) => SavedNet {
                ctl: r.ctl,
                req_head: r.req_head,
                req_tail: r.req_tail,
                resp_tail: r.resp_tail,
                next_conn,
            },
            None => SavedNet {
                ctl: 0,
                req_head: 0,
                req_tail: 0,
                resp_tail: 0,
                next_conn,
            },
        }
        .encode()
    }

    fn restore_state(&self, bytes: &[u8]) -> std::result::Result<(), String> {
        let saved = SavedNet::decode(bytes)?;
        self.conns.next_id.store(saved.next_conn, Ordering::Relaxed);
        if saved.ctl != 0 {
            *lock(&self.restored) = Some(saved);
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn u64_of(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl NetDevice {
    /// A device with no connections yet. `gate` receives a [`Delivery`]
    /// and returns the gate every response passes through; `wakers` wakes
    /// vCPUs waiting in `NET_WAIT` (the bus's, [`super::devices::MmioBus::wakers`]).
    pub fn new(
        wakers: Arc<VcpuWakers>,
        gate: impl FnOnce(Delivery) -> Arc<dyn OutputGate>,
    ) -> Arc<Self> {
        let conns = Arc::new(Connections::default());
        let counters = Arc::new(Counters::default());
        let gate = gate(Delivery {
            conns: conns.clone(),
            counters: counters.clone(),
        });
        Arc::new(NetDevice {
            rings: Mutex::new(None),
            pending: Mutex::new(Pending::default()),
            space: Condvar::new(),
            conns,
            gate,
            wakers,
            counters,
            stopped: AtomicBool::new(false),
            written: Mutex::new(HashSet::new()),
            restored: Mutex::new(None),
        })
    }

    /// Rebuilds the rings from a restored snapshot against the restored
    /// guest memory (which must hold a valid ring block at the saved
    /// address, and positions that match the saved ones).
    fn apply_restored(&self, rings: &mut Option<Rings>, mem: &GuestMemory) -> Result<()> {
        let Some(saved) = lock(&self.restored).take() else {
            return Ok(());
        };
        let block: NetRings = if mem.contains(saved.ctl, size_of::<NetRings>() as u64) {
            mem.read_obj(saved.ctl)?
        } else {
            return Err(NetError::BadSetup {
                gpa: saved.ctl,
                reason: "the restored ring block is outside guest RAM".into(),
            });
        };
        let (req, resp) = validate_layout(saved.ctl, &block, mem.size())?;
        if saved.req_head - saved.req_tail > req.size
            || (block.req_head, block.resp_tail) != (saved.req_head, saved.resp_tail)
        {
            return Err(NetError::BadSetup {
                gpa: saved.ctl,
                reason: "the restored positions do not match the ring block in guest memory".into(),
            });
        }
        tracing::info!(
            block = format_args!("{:#x}", saved.ctl),
            req_head = saved.req_head,
            resp_tail = saved.resp_tail,
            next_connection = saved.next_conn,
            "net: rings restored from the snapshot"
        );
        *rings = Some(Rings {
            ctl: saved.ctl,
            req,
            resp,
            req_head: saved.req_head,
            req_tail: saved.req_tail,
            resp_tail: saved.resp_tail,
        });
        Ok(())
    }

    /// The counters so far.
    pub fn stats(&self) -> NetStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStats {
            connections: l(&c.connections),
            dropped_connections: l(&c.dropped),
            requests: l(&c.requests),
            responses: l(&c.responses),
            discarded_responses: l(&c.discarded),
            notify_exits: l(&c.notify_exits),
            wait_exits: l(&c.wait_exits),
            waits_blocked: l(&c.waits_blocked),
        }
    }

    /// Guest page numbers (GPA / 4 KiB) the device wrote since the last
    /// call: the rings and positions it filled, which KVM's dirty log does
    /// not see.
    pub fn take_written_pages(&self) -> Vec<u64> {
        let mut pages: Vec<u64> = lock(&self.written).drain().collect();
        pages.sort_unstable();
        pages
    }

    /// Queues a request message of connection `conn` for the guest and
    /// wakes a vCPU waiting for one. Blocks while the host queue is over
    /// its budget. Returns false when the device is stopping.
    pub fn submit_request(&self, conn: u32, seq: u32, msg: Vec<u8>) -> bool {
        let mut p = lock(&self.pending);
        while p.bytes + msg.len() > PENDING_BUDGET && !p.queue.is_empty() {
            if self.stopped.load(Ordering::Acquire) {
                return false;
            }
            p = self.space.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        if self.stopped.load(Ordering::Acquire) {
            return false;
        }
        p.bytes += msg.len();
        p.queue.push_back(PendingRequest { conn, seq, msg });
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let waiting = std::mem::take(&mut p.waiting);
        drop(p);
        for vcpu in 0..64u32 {
            if waiting & (1 << vcpu) != 0 {
                self.wakers.wake(vcpu);
            }
        }
        true
    }

    /// Handles a guest write to a `NET_*` register.
    ///
    /// # Errors
    ///
    /// [`DeviceError::BadAccess`] for a bad width or address;
    /// [`DeviceError::Net`] for a bad setup, index or record.
    pub fn write(
        &self,
        vcpu: u32,
        gpa: u64,
        data: &[u8],
        mem: &GuestMemory,
    ) -> Result<MmioAction, DeviceError> {
        let register = match gpa {
            abi::NET_SETUP => "NET_SETUP",
            abi::NET_NOTIFY => "NET_NOTIFY",
            abi::NET_WAIT => "NET_WAIT",
            _ => {
                return Err(DeviceError::UnknownAddress {
                    gpa,
                    len: data.len(),
                    write: true,
                })
            }
        };
        if data.len() != 8 {
            return Err(DeviceError::BadAccess {
                register,
                gpa,
                len: data.len(),
                write: true,
            });
        }
        let value = u64_of(data);
        let mut rings = lock(&self.rings);
        self.apply_restored(&mut rings, mem)?;
        if gpa == abi::NET_SETUP {
            if rings.is_some() {
                return Err(NetError::AlreadySetUp.into());
            }
            let block: NetRings = if mem.contains(value, size_of::<NetRings>() as u64) {
                mem.read_obj(value)?
            } else {
                return Err(NetError::BadSetup {
                    gpa: value,
                    reason: "the block is outside guest RAM".into(),
                }
                .into());
            };
            let (req, resp) = validate_setup(value, &block, mem.size())?;
            tracing::info!(
                vcpu,
                block = format_args!("{value:#x}"),
                req = format_args!("{:#x}+{:#x}", req.gpa, req.size),
                resp = format_args!("{:#x}+{:#x}", resp.gpa, resp.size),
                "net: guest rings set up"
            );
            *rings = Some(Rings {
                ctl: value,
                req,
                resp,
                req_head: 0,
                req_tail: 0,
                resp_tail: 0,
            });
            return Ok(MmioAction::Continue);
        }
        let r = rings.as_mut().ok_or(NetError::NotSetUp { register })?;
        self.drain_responses(r, mem)?;
        let mut p = lock(&self.pending);
        self.fill_requests(r, &mut p, mem)?;
        if gpa == abi::NET_NOTIFY {
            self.counters.notify_exits.fetch_add(1, Ordering::Relaxed);
            return Ok(MmioAction::Continue);
        }
        self.counters.wait_exits.fetch_add(1, Ordering::Relaxed);
        let ns = value.min(abi::NET_WAIT_MAX_NS);
        if r.req_head != r.req_tail || !p.queue.is_empty() || ns == 0 || vcpu >= 64 {
            return Ok(MmioAction::Continue);
        }
        // Nothing for the guest: wait, to be woken by `submit_request`
        // (which sees this bit under the same lock).
        p.waiting |= 1 << vcpu;
        self.counters.waits_blocked.fetch_add(1, Ordering::Relaxed);
        Ok(MmioAction::Wait(Duration::from_nanos(ns)))
    }

    /// Called on vCPU `vcpu`'s thread when its `NET_WAIT` ends (woken or
    /// timed out), before the guest runs again: moves queued requests into
    /// the ring.
    ///
    /// # Errors
    ///
    /// As [`NetDevice::write`].
    pub fn wait_done(&self, vcpu: u32, mem: &GuestMemory) -> Result<(), NetError> {
        let mut rings = lock(&self.rings);
        self.apply_restored(&mut rings, mem)?;
        let mut p = lock(&self.pending);
        if vcpu < 64 {
            p.waiting &= !(1 << vcpu);
        }
        match rings.as_mut() {
            Some(r) => self.fill_requests(r, &mut p, mem),
            None => Ok(()),
        }
    }

    fn mark_written(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut w = lock(&self.written);
        for page in gpa / abi::PAGE_SIZE..=(gpa + len - 1) / abi::PAGE_SIZE {
            w.insert(page);
        }
    }

    fn store_index(&self, mem: &GuestMemory, gpa: u64, value: u64) -> Result<()> {
        mem.inner()
            .store(value, GuestAddress(gpa), Ordering::Release)
            .map_err(|source| MemoryError::Access {
                gpa,
                len: 8,
                source,
            })?;
        self.mark_written(gpa, 8);
        Ok(())
    }

    /// Moves queued requests into the request ring as far as they fit.
    fn fill_requests(&self, r: &mut Rings, p: &mut Pending, mem: &GuestMemory) -> Result<()> {
        let tail = mem.load_u64(r.ctl + abi::NET_REQ_TAIL_OFFSET)?;
        r.req_tail = check_index("request", "tail", tail, r.req_tail, r.req_head)?;
        let mut moved = false;
        while let Some(front) = p.queue.front() {
            let len = front.msg.len() as u64;
            let rec = abi::net_record_size(len);
            let Some(at) = abi::net_place_record(r.req_head, r.req_tail, r.req.size, rec) else {
                break;
            };
            let req = p.queue.pop_front().expect("front exists");
            p.bytes -= req.msg.len();
            moved = true;
            if at != r.req_head {
                let pad = NetRecord {
                    kind: abi::NET_REC_PAD,
                    ..Default::default()
                };
                let gpa = r.req.gpa + r.req_head % r.req.size;
                mem.write_obj(gpa, pad)?;
                self.mark_written(gpa, abi::NET_RECORD_HEADER);
            }
            let header = NetRecord {
                conn: req.conn,
                seq: req.seq,
                len: len as u32,
                kind: abi::NET_REC_MSG,
            };
            let gpa = r.req.gpa + at % r.req.size;
            mem.write_obj(gpa, header)?;
            mem.write(gpa + abi::NET_RECORD_HEADER, &req.msg)?;
            self.mark_written(gpa, rec);
            r.req_head = at + rec;
        }
        if moved {
            self.store_index(mem, r.ctl + abi::NET_REQ_HEAD_OFFSET, r.req_head)?;
            self.space.notify_all();
        }
        Ok(())
    }

    /// Takes every response the guest published and submits it to the
    /// gate.
    fn drain_responses(&self, r: &mut Rings, mem: &GuestMemory) -> Result<()> {
        let head = mem.load_u64(r.ctl + abi::NET_RESP_HEAD_OFFSET)?;
        let head = check_index(
            "response",
            "head",
            head,
            r.resp_tail,
            r.resp_tail + r.resp.size,
        )?;
        if head == r.resp_tail {
            return Ok(());
        }
        while r.resp_tail < head {
            if head - r.resp_tail < abi::NET_RECORD_HEADER {
                return Err(NetError::BadRecord {
                    pos: r.resp_tail,
                    reason: "truncated header".into(),
                });
            }
            let h: NetRecord = mem.read_obj(r.resp.gpa + r.resp_tail % r.resp.size)?;
            match parse_record(
                h,
                r.resp_tail,
                head,
                r.resp.size,
                proto::MAX_RESPONSE as u64,
            )? {
                Parsed::Skip(next) => r.resp_tail = next,
                Parsed::Msg {
                    conn,
                    seq,
                    msg_pos,
                    len,
                    next,
                } => {
                    let mut frame = vec![0u8; proto::FRAME_PREFIX + len as usize];
                    frame[..proto::FRAME_PREFIX].copy_from_slice(&(len as u32).to_le_bytes());
                    mem.read(
                        r.resp.gpa + msg_pos % r.resp.size,
                        &mut frame[proto::FRAME_PREFIX..],
                    )?;
                    if let Err(e) = proto::parse_response(&frame[proto::FRAME_PREFIX..]) {
                        return Err(NetError::BadRecord {
                            pos: r.resp_tail,
                            reason: format!("malformed response message: {e:?}"),
                        });
                    }
                    self.counters.responses.fetch_add(1, Ordering::Relaxed);
                    r.resp_tail = next;
                    if self.check_sequence(conn, seq)? {
                        self.gate.submit(NetResponse { conn, seq, frame });
                    } else {
                        self.counters.discarded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        self.store_index(mem, r.ctl + abi::NET_RESP_TAIL_OFFSET, r.resp_tail)
    }

    /// Whether connection `conn` is live and `seq` is the response it
    /// waits for next.
    fn check_sequence(&self, conn: u32, seq: u32) -> Result<bool> {
        let mut map = self.conns.lock();
        let Some(c) = map.get_mut(&conn) else {
            return Ok(false);
        };
        if seq != c.next_resp_seq {
            return Err(NetError::OutOfOrder {
                conn,
                got: seq,
                expected: c.next_resp_seq,
            });
        }
        c.next_resp_seq = c.next_resp_seq.wrapping_add(1);
        Ok(true)
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _p = lock(&self.pending);
        self.space.notify_all();
    }
}

/// The host side of the service: the listening socket, the acceptor
/// thread and the device. Dropping it closes every connection.
#[derive(Debug)]
pub struct NetService {
    device: Arc<NetDevice>,
    addr: SocketAddr,
    listener_fd: i32,
    acceptor: Option<JoinHandle<()>>,
}

impl NetService {
    /// Starts accepting clients on `listener` for `device`.
    ///
    /// # Errors
    ///
    /// [`NetError::Listen`] when the listener has no address;
    /// [`NetError::Thread`] when the acceptor cannot start.
    pub fn start(listener: TcpListener, device: Arc<NetDevice>) -> Result<Self> {
        let addr = listener.local_addr().map_err(|source| NetError::Listen {
            addr: "?".into(),
            source,
        })?;
        let listener_fd = listener.as_raw_fd();
        let dev = device.clone();
        let acceptor = std::thread::Builder::new()
            .name("net-accept".into())
            .spawn(move || accept_loop(&listener, &dev))
            .map_err(NetError::Thread)?;
        Ok(NetService {
            device,
            addr,
            listener_fd,
            acceptor: Some(acceptor),
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The device (to attach to the MMIO bus).
    pub fn device(&self) -> &Arc<NetDevice> {
        &self.device
    }

    /// Stops accepting, closes every connection and joins the acceptor.
    pub fn shutdown(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.device.stop();
        // SAFETY: the fd belongs to the listener the acceptor thread owns
        // and has not closed yet (the thread is joined below); shutting a
        // listening socket down makes its blocked `accept` return.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        let _ = acceptor.join();
        let conns: Vec<Conn> = self.device.conns.lock().drain().map(|(_, c)| c).collect();
        for c in conns {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for NetService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: &TcpListener, dev: &Arc<NetDevice>) {
    for stream in listener.incoming() {
        if dev.stopped.load(Ordering::Acquire) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if dev.stopped.load(Ordering::Acquire) {
                    break;
                }
                tracing::warn!(error = %e, "net: accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        if let Err(e) = start_connection(stream, dev, &peer) {
            tracing::warn!(%peer, error = %e, "net: connection refused");
        }
    }
    tracing::debug!("net: acceptor stopped");
}

fn start_connection(stream: TcpStream, dev: &Arc<NetDevice>, peer: &str) -> io::Result<()> {
    if dev.conns.lock().len() >= MAX_CONNECTIONS {
        return Err(io::Error::other(format!(
            "too many connections (at most {MAX_CONNECTIONS})"
        )));
    }
    let _ = stream.set_nodelay(true);
    let id = dev.conns.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel();
    let write_half = stream.try_clone()?;
    let handle = stream.try_clone()?;
    let unsent = Arc::new(AtomicUsize::new(0));
    let writer_unsent = unsent.clone();
    let reader_unsent = unsent.clone();
    dev.conns.lock().insert(
        id,
        Conn {
            tx,
            unsent,
            stream: handle,
            next_resp_seq: 0,
            outstanding: 0,
            eof: false,
        },
    );
    dev.counters.connections.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(conn = id, %peer, "net: client connected");
    let spawned = std::thread::Builder::new()
        .name(format!("net-w{id}"))
        .stack_size(CONN_STACK)
        .spawn(move || writer_loop(write_half, &rx, &writer_unsent))
        .and_then(|_| {
            let dev = dev.clone();
            let peer = peer.to_string();
            std::thread::Builder::new()
                .name(format!("net-r{id}"))
                .stack_size(CONN_STACK)
                .spawn(move || reader_loop(stream, id, &peer, &dev, &reader_unsent))
        });
    if let Err(e) = spawned {
        dev.conns.drop_conn(id);
        return Err(e);
    }
    Ok(())
}

fn writer_loop(stream: TcpStream, rx: &Receiver<Vec<u8>>, unsent: &AtomicUsize) {
    let mut w = BufWriter::with_capacity(64 << 10, stream);
    while let Ok(frame) = rx.recv() {
        let mut ok = w.write_all(&frame).is_ok();
        unsent.fetch_sub(frame.len(), Ordering::Relaxed);
        while ok {
            match rx.try_recv() {
                Ok(f) => {
                    ok = w.write_all(&f).is_ok();
                    unsent.fetch_sub(f.len(), Ordering::Relaxed);
                }
                Err(_) => break,
            }
        }
        if !ok || w.flush().is_err() {
            break;
        }
    }
    let _ = w.flush();
    let _ = w.get_ref().shutdown(Shutdown::Write);
}

/// How reading one frame ended.
#[derive(Debug, PartialEq, Eq)]
enum FrameRead {
    /// A whole frame's message.
    Frame(Vec<u8>),
    /// The client closed the connection between frames.
    Eof,
}

/// Why a connection is dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum FrameError {
    #[error("frame length {0} is outside {min}..={max}", min = proto::REQUEST_HEADER, max = proto::MAX_REQUEST)]
    BadLength(u64),
    #[error("malformed request header: {0:?}")]
    Malformed(proto::ProtoError),
    #[error("disconnected in the middle of a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("read failed: {0}")]
    Io(String),
}

/// Reads as much of `buf` as the stream gives; returns the bytes read
/// (less than `buf.len()` only at end of stream).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e.to_string())),
        }
    }
    Ok(got)
}

/// Reads and checks one request frame.
fn read_frame(r: &mut impl Read) -> Result<FrameRead, FrameError> {
    let mut prefix = [0u8; proto::FRAME_PREFIX];
    match read_full(r, &mut prefix)? {
        0 => return Ok(FrameRead::Eof),
        n if n < prefix.len() => {
            return Err(FrameError::Truncated {
                got: n,
                want: prefix.len(),
            })
        }
        _ => {}
    }
    let len = u64::from(u32::from_le_bytes(prefix));
    if len < proto::REQUEST_HEADER as u64 || len > proto::MAX_REQUEST as u64 {
        return Err(FrameError::BadLength(len));
    }
    let mut msg = vec![0u8; len as usize];
    // Check the header before waiting for a body it may not announce.
    let got = read_full(r, &mut msg[..proto::REQUEST_HEADER])?;
    if got < proto::REQUEST_HEADER {
        return Err(FrameError::Truncated {
            got: prefix.len() + got,
            want: prefix.len() + msg.len(),
        });
    }
    let key_len = u64::from(u16::from_le_bytes([msg[10], msg[11]]));
    let value_len = u64::from(u32::from_le_bytes([msg[12], msg[13], msg[14], msg[15]]));
    if key_len > proto::MAX_KEY as u64 || value_len > proto::MAX_VALUE as u64 {
        return Err(FrameError::Malformed(proto::ProtoError::TooLong));
    }
    if proto::REQUEST_HEADER as u64 + key_len + value_len != len {
        return Err(FrameError::Malformed(proto::ProtoError::LengthMismatch));
    }
    let got = read_full(r, &mut msg[proto::REQUEST_HEADER..])?;
    if got < msg.len() - proto::REQUEST_HEADER {
        return Err(FrameError::Truncated {
            got: prefix.len() + proto::REQUEST_HEADER + got,
            want: prefix.len() + msg.len(),
        });
    }
    proto::parse_request(&msg).map_err(FrameError::Malformed)?;
    Ok(FrameRead::Frame(msg))
}

fn reader_loop(stream: TcpStream, id: u32, peer: &str, dev: &Arc<NetDevice>, unsent: &AtomicUsize) {
    let mut r = io::BufReader::with_capacity(64 << 10, stream);
    let mut seq: u32 = 0;
    loop {
        // A client that does not read its responses: stop reading its
        // requests until the backlog drains (only this connection waits).
        loop {
            let in_flight = dev.conns.lock().get(&id).map_or(0, |c| c.outstanding);
            if unsent.load(Ordering::Relaxed) <= WRITE_BACKLOG && in_flight < MAX_IN_FLIGHT {
                break;
            }
            if dev.stopped.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        match read_frame(&mut r) {
            Ok(FrameRead::Frame(msg)) => {
                {
                    let mut map = dev.conns.lock();
                    match map.get_mut(&id) {
                        Some(c) => c.outstanding += 1,
                        None => return, // dropped by shutdown
                    }
                }
                if !dev.submit_request(id, seq, msg) {
                    return;
                }
                seq = seq.wrapping_add(1);
            }
            Ok(FrameRead::Eof) => {
                tracing::debug!(conn = id, %peer, "net: client closed");
                let mut map = dev.conns.lock();
                if let Some(c) = map.get_mut(&id) {
                    c.eof = true;
                    if c.outstanding == 0 {
                        map.remove(&id);
                    }
                }
                return;
            }
            Err(e) => {
                if !dev.stopped.load(Ordering::Acquire) {
                    tracing::warn!(conn = id, %peer, error = %e, "net: dropping connection");
                    dev.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
                dev.conns.drop_conn(id);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
