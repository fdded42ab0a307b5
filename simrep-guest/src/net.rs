//! Driver of the paravirtual network device (layout and protocol: see
//! `abi::NET_BASE`), and the request loop the services share.
//!
//! The rings change only across this vCPU's own `NET_NOTIFY` / `NET_WAIT`
//! exits (the VMM touches them on this vCPU's thread during the exit), so
//! between exits the driver reads and writes them like private memory;
//! positions are still accessed volatile.

use core::ptr::{read_volatile, write_volatile};

use crate::abi::{self, NetRecord, NetRings, VcpuStatus};
use crate::heap::Heap;
use crate::proto::{self, status};
use crate::user::{mmio_write, set_progress};

/// Bytes of each ring.
const RING_SIZE: u64 = 1 << 20;

const _: () = assert!(RING_SIZE >= abi::NET_REQ_RING_MIN && RING_SIZE >= abi::NET_RESP_RING_MIN);

/// The device, set up.
pub struct Net {
    ctl: *mut NetRings,
    req: u64,
    resp: u64,
    /// Our consumer position in the request ring (published at `done`).
    req_tail: u64,
    /// Our producer position in the response ring.
    resp_head: u64,
}

/// A request record, valid until [`Net::done`] is called for it.
pub struct Incoming {
    /// Connection id.
    pub conn: u32,
    /// Sequence number within the connection.
    pub seq: u32,
    /// The request message.
    pub msg: &'static [u8],
    /// The position after this record.
    next: u64,
}

/// Why setting up the device failed.
pub enum SetupError {
    /// The heap has no room for the rings.
    NoMemory,
}

impl Net {
    /// Allocates the rings in the heap and tells the VMM where they are.
    pub fn setup(heap: &mut Heap) -> Result<Net, SetupError> {
        let ctl = heap
            .alloc(core::mem::size_of::<NetRings>() as u64, 64)
            .ok_or(SetupError::NoMemory)?;
        let req = heap
            .alloc(RING_SIZE, abi::PAGE_SIZE)
            .ok_or(SetupError::NoMemory)?;
        let resp = heap
            .alloc(RING_SIZE, abi::PAGE_SIZE)
            .ok_or(SetupError::NoMemory)?;
        let block = NetRings {
            magic: abi::NET_MAGIC,
            req_gpa: req,
            req_size: RING_SIZE,
            resp_gpa: resp,
            resp_size: RING_SIZE,
            ..Default::default()
        };
        let ctl = ctl as *mut NetRings;
        // SAFETY: `ctl` is a fresh, 64-aligned heap block of the right size,
        // identity-mapped and writable at CPL3; nothing else uses it.
        unsafe { write_volatile(ctl, block) };
        mmio_write(abi::NET_SETUP, ctl as u64);
        Ok(Net {
            ctl,
            req,
            resp,
            req_tail: 0,
            resp_head: 0,
        })
    }

    fn load(&self, field: *const u64) -> u64 {
        // SAFETY: `field` points into the ring block set up in `setup`.
        unsafe { read_volatile(field) }
    }

    fn req_head(&self) -> u64 {
        // SAFETY: `ctl` is the block from `setup`; no reference is formed.
        self.load(unsafe { &raw const (*self.ctl).req_head })
    }

    fn resp_tail(&self) -> u64 {
        // SAFETY: as in `req_head`.
        self.load(unsafe { &raw const (*self.ctl).resp_tail })
    }

    fn publish(&self) {
        // SAFETY: as in `req_head`; the guest owns these two positions.
        unsafe {
            write_volatile(&raw mut (*self.ctl).req_tail, self.req_tail);
            write_volatile(&raw mut (*self.ctl).resp_head, self.resp_head);
        }
    }

    /// The next request in the ring, if any.
    pub fn next_request(&mut self) -> Option<Incoming> {
        let head = self.req_head();
        loop {
            if self.req_tail >= head {
                return None;
            }
            let at = self.req + self.req_tail % RING_SIZE;
            // SAFETY: `at` is a record header inside the request ring (the
            // VMM placed it below `head`; positions are 16-aligned).
            let h: NetRecord = unsafe { read_volatile(at as *const NetRecord) };
            if h.kind == abi::NET_REC_PAD {
                self.req_tail += RING_SIZE - self.req_tail % RING_SIZE;
                continue;
            }
            let len = u64::from(h.len);
            // SAFETY: the VMM wrote `len` message bytes after the header,
            // inside the ring; they stay untouched until `done` moves the
            // tail past them.
            let msg = unsafe {
                core::slice::from_raw_parts(
                    (at + abi::NET_RECORD_HEADER) as *const u8,
                    len as usize,
                )
            };
            return Some(Incoming {
                conn: h.conn,
                seq: h.seq,
                msg,
                next: self.req_tail + abi::net_record_size(len),
            });
        }
    }

    /// Releases a request's ring space (after its response is written).
    pub fn done(&mut self, req: Incoming) {
        self.req_tail = req.next;
        self.publish();
    }

    /// Writes the response to request `(conn, seq)` with id `id`: `fill`
    /// gets a body buffer of `max_body` bytes and returns the status and
    /// the body length it wrote. Hands responses to the VMM first when the
    /// ring has no room.
    pub fn respond(
        &mut self,
        conn: u32,
        seq: u32,
        id: u64,
        max_body: usize,
        fill: impl FnOnce(&mut [u8]) -> (u8, usize),
    ) {
        let max_msg = (proto::RESPONSE_HEADER + max_body.min(proto::MAX_BODY)) as u64;
        let rec = abi::net_record_size(max_msg);
        let at = loop {
            match abi::net_place_record(self.resp_head, self.resp_tail(), RING_SIZE, rec) {
                Some(at) => break at,
                None => self.notify(),
            }
        };
        if at != self.resp_head {
            let pad = NetRecord {
                kind: abi::NET_REC_PAD,
                ..Default::default()
            };
            // SAFETY: `resp_head` is inside the response ring and free.
            unsafe {
                write_volatile(
                    (self.resp + self.resp_head % RING_SIZE) as *mut NetRecord,
                    pad,
                )
            };
        }
        let rec_addr = self.resp + at % RING_SIZE;
        // SAFETY: `net_place_record` found `rec` free bytes at `at`, before
        // the end of the ring; the VMM does not touch them until we publish.
        let msg = unsafe {
            core::slice::from_raw_parts_mut(
                (rec_addr + abi::NET_RECORD_HEADER) as *mut u8,
                max_msg as usize,
            )
        };
        let (st, body_len) = fill(&mut msg[proto::RESPONSE_HEADER..]);
        let body_len = body_len.min(max_msg as usize - proto::RESPONSE_HEADER);
        msg[0..8].copy_from_slice(&id.to_le_bytes());
        msg[8] = st;
        msg[9..12].fill(0);
        msg[12..16].copy_from_slice(&(body_len as u32).to_le_bytes());
        let len = (proto::RESPONSE_HEADER + body_len) as u32;
        let h = NetRecord {
            conn,
            seq,
            len,
            kind: abi::NET_REC_MSG,
        };
        // SAFETY: the header slot of the record reserved above.
        unsafe { write_volatile(rec_addr as *mut NetRecord, h) };
        self.resp_head = at + abi::net_record_size(u64::from(len));
        self.publish();
    }

    /// Hands published responses to the VMM and takes queued requests.
    pub fn notify(&mut self) {
        self.publish();
        mmio_write(abi::NET_NOTIFY, 0);
    }

    /// As [`Net::notify`], then waits up to `ns` for a request.
    pub fn wait(&mut self, ns: u64) {
        self.publish();
        mmio_write(abi::NET_WAIT, ns);
    }
}

/// A service behind the request loop.
pub trait Service {
    /// Most body bytes the response to `req` can have.
    fn max_body(&mut self, req: &proto::Request<'_>) -> usize;
    /// Handles `req`, writing the body into `body`; returns the status and
    /// the body length.
    fn handle(&mut self, req: &proto::Request<'_>, body: &mut [u8]) -> (u8, usize);
}

/// Serves requests forever: every request in the ring, then one
/// `NET_WAIT` that hands the responses over and brings the next batch.
pub fn serve(net: &mut Net, svc: &mut impl Service, st: *mut VcpuStatus) -> ! {
    let mut handled: u64 = 0;
    loop {
        while let Some(r) = net.next_request() {
            match proto::parse_request(r.msg) {
                Ok(req) => {
                    let max = svc.max_body(&req);
                    net.respond(r.conn, r.seq, req.id, max, |body| svc.handle(&req, body));
                }
                Err(_) => {
                    let id = r.msg.get(..8).map_or(0, |b| {
                        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                    });
                    net.respond(r.conn, r.seq, id, 0, |_| (status::BAD_REQUEST, 0));
                }
            }
            net.done(r);
            handled += 1;
            set_progress(st, handled);
        }
        net.wait(abi::NET_WAIT_MAX_NS);
    }
}

/// What vCPUs other than 0 do under a network workload: idle.
pub fn idle_forever() -> ! {
    loop {
        mmio_write(abi::SYS_IDLE, abi::SYS_IDLE_MAX_NS);
    }
}
