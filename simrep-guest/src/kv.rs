//! The `kv` workload: GET / PUT / DEL / SCAN / PING (see `proto.rs`) over
//! the network device, with the data in guest memory.
//!
//! # Data structure
//!
//! An ordered skip list (keys in byte order, for SCAN) whose nodes and
//! values live in one arena carved from the heap, addressed by byte offsets
//! (so all of it is safe slice code after one `unsafe` to make the arena
//! slice). A skip list rather than a B-tree: the same O(log n) expected
//! cost for point and range operations, far less code, and every update
//! touches only the nodes on its path (small, local dirty sets for
//! replication).
//!
//! The arena allocator has power-of-two size classes (16 B .. 64 KiB), one
//! free list per class: a freed node or value (DEL, overwrite) is reused by
//! the next allocation of its class; an empty class splits a larger free
//! block; the bump pointer serves the rest. A failed allocation is
//! `NO_SPACE` and leaves the store unchanged. Internal fragmentation is at
//! most half of a block; free blocks are not merged.
//!
//! Node layout (little-endian): `u64 value offset, u32 value length, u16
//! key length, u8 height, u8 0, u64 next[height], key bytes`.

use crate::abi::{BootParams, VcpuStatus};
use crate::heap::Heap;
use crate::net::{self, Net, Service};
use crate::proto::{self, op, status};
use crate::user::{exit, println};

/// Tallest node.
const MAX_HEIGHT: usize = 16;
/// Smallest and largest size class (log2).
const MIN_CLASS: u32 = 4;
const MAX_CLASS: u32 = 16;
const CLASSES: usize = (MAX_CLASS - MIN_CLASS + 1) as usize;
/// Offset of the head node (offset 0 is never a real node or value, so it
/// doubles as "none").
const HEAD: u64 = 0;
/// Node header bytes before `next[]`.
const NODE_HEADER: u64 = 16;

/// A change to the store, as the block-device log records it.
pub enum Mutation<'a> {
    /// `key` now holds `value`.
    Put {
        /// The key.
        key: &'a [u8],
        /// The value.
        value: &'a [u8],
    },
    /// `key` was deleted.
    Del {
        /// The key.
        key: &'a [u8],
    },
}

/// Log record kinds.
const REC_PUT: u8 = 1;
const REC_DEL: u8 = 2;
/// Record header: kind u8, key length u16, value length u32.
const REC_HEADER: usize = 7;
/// Bytes of the record buffer (also the replay scratch: the longest record
/// plus the log's own header, in whole sectors).
const REC_BUF: usize = 72 * 1024;

/// The append-only log of every change on the block device (when the VM
/// has a disk). Record: `kind u8 (1 PUT, 2 DEL), key_len u16, value_len
/// u32, key, value`, little-endian, inside the block driver's checksummed
/// log records. On start the log is replayed into the empty store, so a
/// restarted guest (or one restored on a backup with the disk) has its
/// data back.
struct LogSink {
    log: crate::block::Log,
    rec: &'static mut [u8],
    full: bool,
}

impl LogSink {
    /// The mutation hook: called once for every PUT or DEL that changed the
    /// store, after the change and before its response is written. The
    /// record reaches the VMM's write buffer at once (under replication it
    /// travels with the epoch's checkpoint); a full log is reported once
    /// and later changes are no longer persisted.
    fn record(&mut self, m: &Mutation<'_>) {
        if self.full {
            return;
        }
        let (kind, key, value): (u8, &[u8], &[u8]) = match m {
            Mutation::Put { key, value } => (REC_PUT, key, value),
            Mutation::Del { key } => (REC_DEL, key, &[]),
        };
        let n = REC_HEADER + key.len() + value.len();
        self.rec[0] = kind;
        self.rec[1..3].copy_from_slice(&(key.len() as u16).to_le_bytes());
        self.rec[3..7].copy_from_slice(&(value.len() as u32).to_le_bytes());
        self.rec[REC_HEADER..REC_HEADER + key.len()].copy_from_slice(key);
        self.rec[REC_HEADER + key.len()..n].copy_from_slice(value);
        match self.log.append(&self.rec[..n]) {
            Ok(()) => {}
            Err(crate::block::Error::LogFull) => {
                self.full = true;
                println!(
                    "kv: the disk log is full after {} records; later changes are not persisted",
                    self.log.records()
                );
            }
            Err(e) => {
                self.full = true;
                println!("kv: disk log write failed ({e:?}); later changes are not persisted");
            }
        }
    }
}

/// Parses a log record into a mutation.
fn parse_record(r: &[u8]) -> Option<Mutation<'_>> {
    if r.len() < REC_HEADER {
        return None;
    }
    let klen = usize::from(u16::from_le_bytes([r[1], r[2]]));
    let vlen = u32::from_le_bytes([r[3], r[4], r[5], r[6]]) as usize;
    if r.len() != REC_HEADER + klen + vlen {
        return None;
    }
    let key = &r[REC_HEADER..REC_HEADER + klen];
    match r[0] {
        REC_PUT => Some(Mutation::Put {
            key,
            value: &r[REC_HEADER + klen..],
        }),
        REC_DEL if vlen == 0 => Some(Mutation::Del { key }),
        _ => None,
    }
}

/// The arena and its allocator.
struct Arena {
    mem: &'static mut [u8],
    bump: u64,
    free: [u64; CLASSES],
}

fn class_of(size: u64) -> Option<u32> {
    let c = size
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_CLASS);
    (c <= MAX_CLASS).then_some(c)
}

impl Arena {
    fn rd64(&self, off: u64) -> u64 {
        let o = off as usize;
        u64::from_le_bytes(self.mem[o..o + 8].try_into().unwrap_or([0; 8]))
    }
    fn wr64(&mut self, off: u64, v: u64) {
        let o = off as usize;
        self.mem[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn rd32(&self, off: u64) -> u32 {
        let o = off as usize;
        u32::from_le_bytes(self.mem[o..o + 4].try_into().unwrap_or([0; 4]))
    }
    fn wr32(&mut self, off: u64, v: u32) {
        let o = off as usize;
        self.mem[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn rd16(&self, off: u64) -> u16 {
        let o = off as usize;
        u16::from_le_bytes([self.mem[o], self.mem[o + 1]])
    }
    fn bytes(&self, off: u64, len: u64) -> &[u8] {
        &self.mem[off as usize..(off + len) as usize]
    }

    fn alloc(&mut self, size: u64) -> Option<u64> {
        let c = class_of(size)?;
        let i = (c - MIN_CLASS) as usize;
        if self.free[i] != 0 {
            let b = self.free[i];
            self.free[i] = self.rd64(b);
            return Some(b);
        }
        let bsize = 1u64 << c;
        if self.bump + bsize <= self.mem.len() as u64 {
            let b = self.bump;
            self.bump += bsize;
            return Some(b);
        }
        // Split the smallest larger free block.
        let j = (i + 1..CLASSES).find(|&j| self.free[j] != 0)?;
        let b = self.free[j];
        self.free[j] = self.rd64(b);
        for k in (i..j).rev() {
            let half = b + (1u64 << (k as u32 + MIN_CLASS));
            self.wr64(half, self.free[k]);
            self.free[k] = half;
        }
        Some(b)
    }

    fn release(&mut self, off: u64, size: u64) {
        if off == 0 {
            return;
        }
        if let Some(c) = class_of(size) {
            let i = (c - MIN_CLASS) as usize;
            self.wr64(off, self.free[i]);
            self.free[i] = off;
        }
    }
}

/// The store.
struct Kv {
    a: Arena,
    level: usize,
    rng: u64,
    keys: u64,
    log: Option<LogSink>,
}

fn node_size(height: usize, key_len: usize) -> u64 {
    NODE_HEADER + 8 * height as u64 + key_len as u64
}

impl Kv {
    fn new(mem: &'static mut [u8]) -> Option<Kv> {
        let mut a = Arena {
            mem,
            bump: 0,
            free: [0; CLASSES],
        };
        let head = a.alloc(node_size(MAX_HEIGHT, 0))?;
        debug_assert_eq!(head, HEAD);
        a.mem[..node_size(MAX_HEIGHT, 0) as usize].fill(0);
        a.mem[14] = MAX_HEIGHT as u8;
        Some(Kv {
            a,
            level: 1,
            rng: 0x2545_f491_4f6c_dd1d,
            keys: 0,
            log: None,
        })
    }

    fn next(&self, node: u64, lvl: usize) -> u64 {
        self.a.rd64(node + NODE_HEADER + 8 * lvl as u64)
    }
    fn set_next(&mut self, node: u64, lvl: usize, v: u64) {
        self.a.wr64(node + NODE_HEADER + 8 * lvl as u64, v);
    }
    fn height(&self, node: u64) -> usize {
        usize::from(self.a.mem[node as usize + 14])
    }
    fn key(&self, node: u64) -> &[u8] {
        let h = self.height(node);
        let klen = u64::from(self.a.rd16(node + 12));
        self.a.bytes(node + NODE_HEADER + 8 * h as u64, klen)
    }
    fn value(&self, node: u64) -> (u64, u64) {
        (self.a.rd64(node), u64::from(self.a.rd32(node + 8)))
    }

    /// The first node with a key >= `key`, and the last node before it on
    /// every level.
    fn seek(&self, key: &[u8], update: &mut [u64; MAX_HEIGHT]) -> u64 {
        let mut x = HEAD;
        for lvl in (0..self.level).rev() {
            loop {
                let nx = self.next(x, lvl);
                if nx != 0 && self.key(nx) < key {
                    x = nx;
                } else {
                    break;
                }
            }
            update[lvl] = x;
        }
        self.next(x, 0)
    }

    fn find(&self, key: &[u8]) -> Option<u64> {
        let mut u = [HEAD; MAX_HEIGHT];
        let n = self.seek(key, &mut u);
        (n != 0 && self.key(n) == key).then_some(n)
    }

    fn random_height(&mut self) -> usize {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        // p = 1/4 per level.
        ((x.trailing_zeros() / 2) as usize + 1).min(MAX_HEIGHT)
    }

    /// Copies `value` into a new block (0 for an empty value).
    fn store_value(&mut self, value: &[u8]) -> Result<u64, u8> {
        if value.is_empty() {
            return Ok(0);
        }
        let v = self.a.alloc(value.len() as u64).ok_or(status::NO_SPACE)?;
        self.a.mem[v as usize..v as usize + value.len()].copy_from_slice(value);
        Ok(v)
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> u8 {
        let mut u = [HEAD; MAX_HEIGHT];
        let n = self.seek(key, &mut u);
        if n != 0 && self.key(n) == key {
            let (old, old_len) = self.value(n);
            if old != 0 && !value.is_empty() && class_of(old_len) == class_of(value.len() as u64) {
                // Same size class: overwrite in place (works when full).
                self.a.mem[old as usize..old as usize + value.len()].copy_from_slice(value);
                self.a.wr32(n + 8, value.len() as u32);
                return status::OK;
            }
            let Ok(v) = self.store_value(value) else {
                return status::NO_SPACE;
            };
            self.a.release(old, old_len);
            self.a.wr64(n, v);
            self.a.wr32(n + 8, value.len() as u32);
            return status::OK;
        }
        let h = self.random_height();
        let size = node_size(h, key.len());
        let Some(node) = self.a.alloc(size) else {
            return status::NO_SPACE;
        };
        let Ok(v) = self.store_value(value) else {
            self.a.release(node, size);
            return status::NO_SPACE;
        };
        self.a.wr64(node, v);
        self.a.wr32(node + 8, value.len() as u32);
        let o = node as usize;
        self.a.mem[o + 12..o + 14].copy_from_slice(&(key.len() as u16).to_le_bytes());
        self.a.mem[o + 14] = h as u8;
        self.a.mem[o + 15] = 0;
        let k = (node + NODE_HEADER + 8 * h as u64) as usize;
        self.a.mem[k..k + key.len()].copy_from_slice(key);
        if h > self.level {
            for slot in u.iter_mut().take(h).skip(self.level) {
                *slot = HEAD;
            }
            self.level = h;
        }
        for (lvl, &prev) in u.iter().enumerate().take(h) {
            let nx = self.next(prev, lvl);
            self.set_next(node, lvl, nx);
            self.set_next(prev, lvl, node);
        }
        self.keys += 1;
        status::OK
    }

    fn del(&mut self, key: &[u8]) -> u8 {
        let mut u = [HEAD; MAX_HEIGHT];
        let n = self.seek(key, &mut u);
        if n == 0 || self.key(n) != key {
            return status::NOT_FOUND;
        }
        let h = self.height(n);
        for (lvl, &prev) in u.iter().enumerate().take(h.min(self.level)) {
            if self.next(prev, lvl) == n {
                let nx = self.next(n, lvl);
                self.set_next(prev, lvl, nx);
            }
        }
        while self.level > 1 && self.next(HEAD, self.level - 1) == 0 {
            self.level -= 1;
        }
        let (v, vlen) = self.value(n);
        self.a.release(v, vlen);
        let klen = self.key(n).len();
        self.a.release(n, node_size(h, klen));
        self.keys -= 1;
        status::OK
    }

    /// SCAN: entries from `first` on, at most `max`, into `body`.
    fn scan(&self, first: &[u8], max: u32, body: &mut [u8]) -> usize {
        let mut u = [HEAD; MAX_HEIGHT];
        let mut n = self.seek(first, &mut u);
        let mut len = 0usize;
        let mut count = 0;
        while n != 0 && count < max {
            let key = self.key(n);
            let (v, vlen) = self.value(n);
            let need = 6 + key.len() + vlen as usize;
            if len + need > body.len() {
                break;
            }
            body[len..len + 2].copy_from_slice(&(key.len() as u16).to_le_bytes());
            body[len + 2..len + 6].copy_from_slice(&(vlen as u32).to_le_bytes());
            body[len + 6..len + 6 + key.len()].copy_from_slice(key);
            let vs = len + 6 + key.len();
            body[vs..vs + vlen as usize].copy_from_slice(self.a.bytes(v, vlen));
            len += need;
            count += 1;
            n = self.next(n, 0);
        }
        len
    }
}

impl Service for Kv {
    fn max_body(&mut self, req: &proto::Request<'_>) -> usize {
        match req.op {
            op::GET => self.find(req.key).map_or(0, |n| self.value(n).1 as usize),
            op::SCAN => proto::MAX_BODY,
            _ => 0,
        }
    }

    fn handle(&mut self, req: &proto::Request<'_>, body: &mut [u8]) -> (u8, usize) {
        let key_ok = !req.key.is_empty() && req.key.len() <= proto::MAX_KEY;
        match req.op {
            op::PING => (status::OK, 0),
            op::GET if key_ok => match self.find(req.key) {
                Some(n) => {
                    let (v, vlen) = self.value(n);
                    let vlen = (vlen as usize).min(body.len());
                    body[..vlen].copy_from_slice(self.a.bytes(v, vlen as u64));
                    (status::OK, vlen)
                }
                None => (status::NOT_FOUND, 0),
            },
            op::PUT if key_ok => {
                let st = self.put(req.key, req.value);
                if st == status::OK {
                    if let Some(log) = &mut self.log {
                        log.record(&Mutation::Put {
                            key: req.key,
                            value: req.value,
                        });
                    }
                }
                (st, 0)
            }
            op::DEL if key_ok => {
                let st = self.del(req.key);
                if st == status::OK {
                    if let Some(log) = &mut self.log {
                        log.record(&Mutation::Del { key: req.key });
                    }
                }
                (st, 0)
            }
            op::SCAN => {
                let Ok(b) = <[u8; 4]>::try_from(req.value) else {
                    return (status::BAD_REQUEST, 0);
                };
                let max = u32::from_le_bytes(b);
                if max == 0 || max > proto::MAX_SCAN_ENTRIES {
                    return (status::BAD_REQUEST, 0);
                }
                (status::OK, self.scan(req.key, max, body))
            }
            op::GET | op::PUT | op::DEL => (status::BAD_REQUEST, 0),
            _ => (status::UNKNOWN_OP, 0),
        }
    }
}

/// The `kv` workload on vCPU `cpu` (vCPUs other than 0 idle).
pub fn main(cpu: u64, bp: &BootParams, st: *mut VcpuStatus) -> ! {
    if cpu != 0 {
        net::idle_forever();
    }
    let mut heap = Heap::new(bp);
    let Ok(mut net) = Net::setup(&mut heap) else {
        println!("kv: no memory for the network rings");
        exit(4)
    };
    let disk_sectors = crate::block::capacity();
    let rec = if disk_sectors > 0 {
        let Some(at) = heap.alloc(REC_BUF as u64, crate::abi::PAGE_SIZE) else {
            println!("kv: no memory for the disk log buffer");
            exit(4)
        };
        // SAFETY: a heap block handed out once, mapped writable at CPL3,
        // used only through this slice.
        Some(unsafe { core::slice::from_raw_parts_mut(at as *mut u8, REC_BUF) })
    } else {
        None
    };
    let avail = heap.remaining().saturating_sub(crate::abi::PAGE_SIZE);
    let want = if bp.kv.data_bytes == 0 {
        avail
    } else {
        bp.kv.data_bytes.min(avail)
    };
    let Some(base) = heap.alloc(want, crate::abi::PAGE_SIZE) else {
        println!("kv: no memory for the data");
        exit(4)
    };
    // SAFETY: `base..base+want` is a heap block handed out once, mapped
    // writable at CPL3, used only through this slice.
    let mem = unsafe { core::slice::from_raw_parts_mut(base as *mut u8, want as usize) };
    let Some(mut kv) = Kv::new(mem) else {
        println!("kv: {want} bytes are too few for the store");
        exit(4)
    };
    if let Some(rec) = rec {
        let mut log = crate::block::Log::new(0, disk_sectors);
        let (mut puts, mut dels, mut bad) = (0u64, 0u64, 0u64);
        let replayed = log.replay(rec, |_, r| match parse_record(r) {
            Some(Mutation::Put { key, value }) => {
                if kv.put(key, value) == status::OK {
                    puts += 1;
                } else {
                    bad += 1;
                }
            }
            Some(Mutation::Del { key }) => {
                let _ = kv.del(key);
                dels += 1;
            }
            None => bad += 1,
        });
        match replayed {
            Ok(n) => println!(
                "kv: disk log of {disk_sectors} sectors: replayed {n} records ({puts} puts, {dels} deletes, {bad} not applied), {} keys",
                kv.keys
            ),
            Err(e) => {
                println!("kv: cannot read the disk log: {e:?}");
                exit(4)
            }
        }
        kv.log = Some(LogSink {
            log,
            rec,
            full: false,
        });
    }
    println!(
        "kv: serving with {} MiB of data memory at {base:#x}",
        want >> 20
    );
    net::serve(&mut net, &mut kv, st)
}
