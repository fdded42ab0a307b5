//! Unit tests of the block device: validation of guest requests, the write
//! buffer's read-your-writes / take / commit semantics, and a property test
//! of the device against a model.

use std::collections::VecDeque;
use std::io::Write as _;

use proptest::prelude::*;
use tempfile::NamedTempFile;

use super::*;

const SECTORS: u64 = 64;

fn image(sectors: u64) -> NamedTempFile {
    let mut f = NamedTempFile::new().unwrap();
    f.write_all(&vec![0u8; sectors as usize * SECTOR]).unwrap();
    f.flush().unwrap();
    f
}

fn file_bytes(f: &NamedTempFile) -> Vec<u8> {
    std::fs::read(f.path()).unwrap()
}

fn sectors_of(byte: u8, n: usize) -> Vec<u8> {
    vec![byte; n * SECTOR]
}

fn device(f: &NamedTempFile, policy: FlushPolicy) -> BlockDevice {
    BlockDevice::open(f.path(), policy).unwrap()
}

#[test]
fn open_rejects_missing_directories_and_bad_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.img");
    let e = DiskFile::open(&missing).unwrap_err();
    assert!(matches!(e, BlockError::Open { .. }), "{e}");
    assert!(e.to_string().contains("nope.img"));
    assert!(matches!(
        DiskFile::open(dir.path()),
        Err(BlockError::NotAFile { .. })
    ));
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    assert!(matches!(
        DiskFile::open(&odd),
        Err(BlockError::BadSize { len: 1000, .. })
    ));
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        DiskFile::open(&empty),
        Err(BlockError::BadSize { len: 0, .. })
    ));
    let f = image(8);
    assert_eq!(DiskFile::open(f.path()).unwrap().capacity(), 8);
}

#[test]
fn reads_see_writes_before_the_file_does_and_flush_writes_through() {
    let f = image(SECTORS);
    let dev = device(&f, FlushPolicy::default());
    dev.write(3, &sectors_of(0xaa, 2)).unwrap();
    let mut buf = vec![0u8; 4 * SECTOR];
    dev.read(2, &mut buf).unwrap();
    assert_eq!(&buf[..SECTOR], &[0; SECTOR][..]);
    assert_eq!(&buf[SECTOR..3 * SECTOR], &sectors_of(0xaa, 2)[..]);
    assert_eq!(&buf[3 * SECTOR..], &[0; SECTOR][..]);
    assert!(
        file_bytes(&f).iter().all(|&b| b == 0),
        "the file changed before the flush"
    );
    dev.flush().unwrap();
    let bytes = file_bytes(&f);
    assert_eq!(&bytes[3 * SECTOR..5 * SECTOR], &sectors_of(0xaa, 2)[..]);
    assert_eq!(dev.buffered_bytes(), 0);
    let s = dev.stats();
    assert_eq!((s.flushes, s.syncs, s.sectors_to_file), (1, 1, 2));
}

#[test]
fn write_back_bounds_the_buffer() {
    let f = image(SECTORS);
    let dev = device(
        &f,
        FlushPolicy::WriteBack {
            max_buffered: 4 * SECTOR as u64,
        },
    );
    dev.write(0, &sectors_of(1, 4)).unwrap();
    assert_eq!(dev.buffered_bytes(), 4 * SECTOR as u64);
    assert!(file_bytes(&f).iter().all(|&b| b == 0));
    dev.write(4, &sectors_of(2, 1)).unwrap();
    assert_eq!(dev.buffered_bytes(), 0, "over the bound: written out");
    assert_eq!(
        &file_bytes(&f)[..5 * SECTOR],
        &[sectors_of(1, 4), sectors_of(2, 1)].concat()[..]
    );
}

#[test]
fn take_keeps_writes_until_commit_and_commit_is_ordered() {
    let f = image(SECTORS);
    let dev = device(&f, FlushPolicy::Replicated);
    dev.write(0, &sectors_of(1, 2)).unwrap();
    dev.write(1, &sectors_of(2, 1)).unwrap(); // rewrites sector 1 in the same epoch
    let e0 = dev.take_epoch_writes();
    assert_eq!(e0.epoch, 0);
    assert_eq!(
        e0.runs,
        vec![SectorRun {
            sector: 0,
            data: [sectors_of(1, 1), sectors_of(2, 1)].concat()
        }]
    );
    dev.write(1, &sectors_of(3, 1)).unwrap();
    dev.write(10, &sectors_of(4, 1)).unwrap();
    // A guest flush under replication does no I/O.
    dev.flush().unwrap();
    let e1 = dev.take_epoch_writes();
    assert_eq!(e1.epoch, 1);
    assert_eq!(e1.sectors(), 2);
    assert_eq!(e1.runs.len(), 2);
    assert!(
        file_bytes(&f).iter().all(|&b| b == 0),
        "uncommitted writes reached the file"
    );
    let mut buf = vec![0u8; 2 * SECTOR];
    dev.read(0, &mut buf).unwrap();
    assert_eq!(buf, [sectors_of(1, 1), sectors_of(3, 1)].concat());

    assert!(matches!(
        dev.commit(2),
        Err(BlockError::CommitOpenEpoch { epoch: 2, open: 2 })
    ));
    assert_eq!(dev.commit(0).unwrap(), 2);
    let bytes = file_bytes(&f);
    assert_eq!(
        &bytes[..2 * SECTOR],
        &[sectors_of(1, 1), sectors_of(2, 1)].concat()[..]
    );
    assert_eq!(&bytes[10 * SECTOR..11 * SECTOR], &[0; SECTOR][..]);
    // Epoch 1 is still served from the buffer.
    dev.read(0, &mut buf).unwrap();
    assert_eq!(buf, [sectors_of(1, 1), sectors_of(3, 1)].concat());
    assert_eq!(dev.commit(0).unwrap(), 0, "committing twice is a no-op");
    assert_eq!(dev.commit(1).unwrap(), 2);
    let bytes = file_bytes(&f);
    assert_eq!(&bytes[SECTOR..2 * SECTOR], &sectors_of(3, 1)[..]);
    assert_eq!(&bytes[10 * SECTOR..11 * SECTOR], &sectors_of(4, 1)[..]);
    assert_eq!(dev.buffered_bytes(), 0);
}

#[test]
fn backup_applies_epochs_to_its_own_image() {
    let primary = image(SECTORS);
    let backup = image(SECTORS);
    let dev = device(&primary, FlushPolicy::Replicated);
    dev.write(5, &sectors_of(7, 3)).unwrap();
    let e = dev.take_epoch_writes();
    let b = DiskFile::open(backup.path()).unwrap();
    b.apply(&e).unwrap();
    b.apply(&e).unwrap();
    assert_eq!(
        &file_bytes(&backup)[5 * SECTOR..8 * SECTOR],
        &sectors_of(7, 3)[..]
    );
    let small = image(4);
    assert!(matches!(
        DiskFile::open(small.path()).unwrap().apply(&e),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(
        file_bytes(&small).iter().all(|&b| b == 0),
        "a bad epoch was partly applied"
    );
}

fn submit(dev: &BlockDevice, mem: &GuestMemory, desc: u64, req: BlockRequest) -> u32 {
    mem.write_obj(desc, req).unwrap();
    assert_eq!(
        dev.mmio_write(0, abi::BLOCK_REQUEST, &desc.to_le_bytes(), mem)
            .unwrap(),
        MmioAction::Continue
    );
    let status: BlockRequest = mem.read_obj(desc).unwrap();
    let mut reg = [0u8; 8];
    dev.mmio_read(0, abi::BLOCK_STATUS, &mut reg).unwrap();
    assert_eq!(u64::from(status.status), u64::from_le_bytes(reg));
    status.status
}

#[test]
fn guest_requests_are_validated() {
    let f = image(SECTORS);
    let dev = device(&f, FlushPolicy::default());
    let mem = GuestMemory::new(8 << 20).unwrap();
    let desc = 0x1000;
    let buf = 0x40_0000;
    let req = |op, sector, count, buffer| BlockRequest {
        op,
        status: block_status::PENDING,
        sector,
        count,
        reserved: 0,
        buffer,
    };
    let mut cap = [0u8; 8];
    dev.mmio_read(0, abi::BLOCK_CAPACITY, &mut cap).unwrap();
    assert_eq!(u64::from_le_bytes(cap), SECTORS);

    mem.write(buf, &sectors_of(0x5a, 2)).unwrap();
    assert_eq!(
        submit(&dev, &mem, desc, req(block_op::WRITE, 62, 2, buf)),
        block_status::OK
    );
    assert_eq!(
        submit(&dev, &mem, desc, req(block_op::READ, 62, 2, buf + 0x1000)),
        block_status::OK
    );
    let mut back = vec![0u8; 2 * SECTOR];
    mem.read(buf + 0x1000, &mut back).unwrap();
    assert_eq!(back, sectors_of(0x5a, 2));
    assert_eq!(
        submit(&dev, &mem, desc, req(block_op::FLUSH, 0, 0, 0)),
        block_status::OK
    );
    assert_eq!(&file_bytes(&f)[62 * SECTOR..], &sectors_of(0x5a, 2)[..]);

    let bad = [
        (req(9, 0, 1, buf), block_status::BAD_OP),
        (req(0, 0, 1, buf), block_status::BAD_OP),
        (req(block_op::READ, 0, 0, buf), block_status::BAD_COUNT),
        (
            req(block_op::READ, 0, abi::BLOCK_MAX_SECTORS + 1, buf),
            block_status::BAD_COUNT,
        ),
        (req(block_op::READ, 63, 2, buf), block_status::OUT_OF_RANGE),
        (
            req(block_op::WRITE, SECTORS, 1, buf),
            block_status::OUT_OF_RANGE,
        ),
        (
            req(block_op::WRITE, u64::MAX, 1, buf),
            block_status::OUT_OF_RANGE,
        ),
        (
            req(block_op::READ, 0, 1, (8 << 20) - 100),
            block_status::BAD_BUFFER,
        ),
        (
            req(block_op::WRITE, 0, 1, u64::MAX - 10),
            block_status::BAD_BUFFER,
        ),
        (
            req(block_op::READ, 0, 1, abi::MMIO_BASE),
            block_status::BAD_BUFFER,
        ),
    ];
    for (r, want) in bad {
        assert_eq!(submit(&dev, &mem, desc, r), want, "{r:?}");
    }
    // A descriptor outside RAM: the status shows in the register only.
    for d in [8u64 << 20, u64::MAX - 8, (8 << 20) - 16] {
        dev.mmio_write(0, abi::BLOCK_REQUEST, &d.to_le_bytes(), &mem)
            .unwrap();
        dev.mmio_read(0, abi::BLOCK_STATUS, &mut cap).unwrap();
        assert_eq!(
            u64::from_le_bytes(cap),
            u64::from(block_status::BAD_DESCRIPTOR)
        );
    }
    assert_eq!(
        &file_bytes(&f)[..62 * SECTOR],
        &vec![0u8; 62 * SECTOR][..],
        "a bad request wrote"
    );
    // Wrong widths and directions stop the vCPU with a device error.
    assert!(matches!(
        dev.mmio_write(0, abi::BLOCK_REQUEST, &[0; 4], &mem),
        Err(DeviceError::BadAccess { .. })
    ));
    assert!(matches!(
        dev.mmio_write(0, abi::BLOCK_CAPACITY, &[0; 8], &mem),
        Err(DeviceError::BadAccess { .. })
    ));
    assert!(matches!(
        dev.mmio_read(0, abi::BLOCK_REQUEST, &mut cap),
        Err(DeviceError::BadAccess { .. })
    ));
    assert!(matches!(
        dev.mmio_read(0, abi::BLOCK_BASE + 0x100, &mut cap),
        Err(DeviceError::UnknownAddress { .. })
    ));
    let s = dev.stats();
    assert_eq!(s.failed, 13);
}

#[test]
fn without_a_disk_capacity_is_zero_and_io_is_rejected() {
    let dev = BlockDevice::detached();
    let mem = GuestMemory::new(8 << 20).unwrap();
    let mut cap = [0xffu8; 8];
    dev.mmio_read(0, abi::BLOCK_CAPACITY, &mut cap).unwrap();
    assert_eq!(u64::from_le_bytes(cap), 0);
    for op in [block_op::READ, block_op::WRITE, block_op::FLUSH] {
        let r = BlockRequest {
            op,
            status: block_status::PENDING,
            sector: 0,
            count: 1,
            reserved: 0,
            buffer: 0x40_0000,
        };
        assert_eq!(submit(&dev, &mem, 0x1000, r), block_status::NO_DISK);
    }
    assert!(matches!(
        dev.read(0, &mut [0; SECTOR]),
        Err(BlockError::NoDisk)
    ));
    dev.flush_all().unwrap();
    assert_eq!(dev.take_epoch_writes().epoch, 0);
    assert_eq!(dev.commit(0).unwrap(), 0);
}

#[test]
fn the_bus_routes_the_block_window() {
    let bus = crate::vmm::devices::MmioBus::new();
    let mut cap = [0xffu8; 8];
    bus.read(0, abi::BLOCK_CAPACITY, &mut cap).unwrap();
    assert_eq!(u64::from_le_bytes(cap), 0, "detached by default");
    let f = image(SECTORS);
    bus.attach_block(std::sync::Arc::new(device(&f, FlushPolicy::default())));
    bus.read(0, abi::BLOCK_CAPACITY, &mut cap).unwrap();
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    assert_eq!(bus.block().capacity(), SECTORS);
}

/// Not a timed test: prints what taking and committing an epoch of 1k and
/// 20k written sectors costs (run with `--nocapture`).
#[test]
fn take_and_commit_costs() {
    for n in [1_000u64, 20_000] {
        let f = image(n);
        let dev = device(&f, FlushPolicy::Replicated);
        for s in (0..n).step_by(8) {
            dev.write(s, &sectors_of(s as u8, 8.min((n - s) as usize)))
                .unwrap();
        }
        let t0 = std::time::Instant::now();
        let closed = dev.take_epoch();
        let t_take = t0.elapsed();
        let writes = closed.writes();
        let t_runs = t0.elapsed() - t_take;
        assert_eq!(writes.sectors(), n);
        assert_eq!(closed.sectors() as u64, n);
        drop(closed);
        let t1 = std::time::Instant::now();
        assert_eq!(dev.commit(writes.epoch).unwrap(), n);
        println!(
            "epoch of {n} sectors: take {t_take:?} (guest paused), runs {t_runs:?}, commit (pwrite + fdatasync) {:?}",
            t1.elapsed()
        );
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        count: u64,
        byte: u8,
    },
    Read {
        sector: u64,
        count: u64,
    },
    Take,
    /// Commit the n-th oldest uncommitted closed epoch (modulo their count).
    Commit(usize),
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SECTORS, 1..8u64, any::<u8>()).prop_map(|(sector, count, byte)| Op::Write {
            sector,
            count: count.min(SECTORS - sector),
            byte
        }),
        3 => (0..SECTORS, 1..8u64).prop_map(|(sector, count)| Op::Read {
            sector,
            count: count.min(SECTORS - sector)
        }),
        1 => Just(Op::Take),
        1 => (0..4usize).prop_map(Op::Commit),
        1 => Just(Op::Flush),
    ]
}

/// Writes in order: (first sector, data).
type Writes = Vec<(u64, Vec<u8>)>;

/// What the guest should read, what the file should hold, and the closed
/// epochs not yet committed (replicated mode).
struct Model {
    visible: Vec<u8>,
    file: Vec<u8>,
    open: Writes,
    closed: VecDeque<(u64, Writes)>,
    next_epoch: u64,
}

impl Model {
    fn apply(dst: &mut [u8], writes: &[(u64, Vec<u8>)]) {
        for (s, d) in writes {
            let off = *s as usize * SECTOR;
            dst[off..off + d.len()].copy_from_slice(d);
        }
    }
}

fn check_ops(ops: Vec<Op>, replicated: bool) {
    let f = image(SECTORS);
    let policy = if replicated {
        FlushPolicy::Replicated
    } else {
        FlushPolicy::WriteBack {
            max_buffered: 16 * SECTOR as u64,
        }
    };
    let dev = device(&f, policy);
    let size = SECTORS as usize * SECTOR;
    let mut m = Model {
        visible: vec![0; size],
        file: vec![0; size],
        open: Vec::new(),
        closed: VecDeque::new(),
        next_epoch: 0,
    };
    for op in ops {
        match op {
            Op::Write {
                sector,
                count,
                byte,
            } => {
                let data = sectors_of(byte, count as usize);
                dev.write(sector, &data).unwrap();
                Model::apply(&mut m.visible, &[(sector, data.clone())]);
                m.open.push((sector, data));
                if !replicated && dev.buffered_bytes() == 0 {
                    // Over the bound: everything went to the file.
                    m.file.clone_from(&m.visible);
                    m.open.clear();
                }
            }
            Op::Read { sector, count } => {
                let mut buf = vec![0u8; count as usize * SECTOR];
                dev.read(sector, &mut buf).unwrap();
                let off = sector as usize * SECTOR;
                assert_eq!(
                    buf,
                    m.visible[off..off + buf.len()],
                    "read {sector}+{count}"
                );
            }
            Op::Take if replicated => {
                let e = dev.take_epoch_writes();
                assert_eq!(e.epoch, m.next_epoch);
                // The epoch's runs are its writes, newest per sector.
                let mut expect = m.file.clone();
                for (_, w) in &m.closed {
                    Model::apply(&mut expect, w);
                }
                let mut got = expect.clone();
                Model::apply(&mut expect, &m.open);
                let runs: Vec<(u64, Vec<u8>)> =
                    e.runs.iter().map(|r| (r.sector, r.data.clone())).collect();
                Model::apply(&mut got, &runs);
                assert_eq!(got, expect);
                let mut sectors: Vec<u64> = m
                    .open
                    .iter()
                    .flat_map(|(s, d)| *s..*s + (d.len() / SECTOR) as u64)
                    .collect();
                sectors.sort_unstable();
                sectors.dedup();
                assert_eq!(e.sectors(), sectors.len() as u64);
                m.closed.push_back((e.epoch, std::mem::take(&mut m.open)));
                m.next_epoch += 1;
            }
            Op::Commit(i) if replicated && !m.closed.is_empty() => {
                let i = i % m.closed.len();
                let epoch = m.closed[i].0;
                dev.commit(epoch).unwrap();
                for _ in 0..=i {
                    let (_, w) = m.closed.pop_front().unwrap();
                    Model::apply(&mut m.file, &w);
                }
            }
            Op::Commit(_) if replicated => {
                assert!(dev.commit(m.next_epoch).is_err());
            }
            Op::Flush => {
                dev.flush().unwrap();
                if !replicated {
                    m.file.clone_from(&m.visible);
                    m.open.clear();
                }
            }
            Op::Take | Op::Commit(_) => {}
        }
        assert_eq!(file_bytes(&f), m.file, "the file after {op:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn replicated_device_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        check_ops(ops, true);
    }

    #[test]
    fn write_back_device_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        check_ops(ops, false);
    }
}

// --- checkpoints of the disk (begin) ---

#[test]
fn a_checkpoint_hold_freezes_the_file_at_the_checkpoint() {
    let f = image(SECTORS);
    let dev = Arc::new(device(&f, FlushPolicy::default()));
    // Before the checkpoint: one sector flushed, one only buffered.
    dev.write(1, &sectors_of(0x11, 1)).unwrap();
    dev.flush().unwrap();
    dev.write(2, &sectors_of(0x22, 1)).unwrap();
    let hold = dev
        .hold_for_checkpoint()
        .unwrap()
        .expect("a disk is attached");
    assert!(dev.is_held());
    // After it: a rewrite of sector 1 and a new sector 3.
    dev.write(1, &sectors_of(0x33, 1)).unwrap();
    dev.write(3, &sectors_of(0x44, 2)).unwrap();
    // The checkpoint's buffered writes reach the file, the later ones not.
    assert_eq!(hold.settle().unwrap(), 1);
    // Only the writes made after the checkpoint stay buffered.
    assert_eq!(dev.buffered_bytes(), 3 * SECTOR as u64);
    assert_eq!(hold.settle().unwrap(), 0, "settling twice writes nothing");
    let file = file_bytes(&f);
    assert_eq!(&file[SECTOR..2 * SECTOR], &sectors_of(0x11, 1)[..]);
    assert_eq!(&file[2 * SECTOR..3 * SECTOR], &sectors_of(0x22, 1)[..]);
    assert!(file[3 * SECTOR..5 * SECTOR].iter().all(|&b| b == 0));
    // Reads see the newest data.
    let mut buf = vec![0u8; 5 * SECTOR];
    dev.read(0, &mut buf).unwrap();
    assert_eq!(&buf[SECTOR..2 * SECTOR], &sectors_of(0x33, 1)[..]);
    assert_eq!(&buf[3 * SECTOR..5 * SECTOR], &sectors_of(0x44, 2)[..]);
    // A guest FLUSH waits for the end of the hold, then writes through.
    let flusher = {
        let dev = Arc::clone(&dev);
        std::thread::spawn(move || dev.flush())
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(!flusher.is_finished(), "a FLUSH completed during the hold");
    assert!(file_bytes(&f)[3 * SECTOR..5 * SECTOR]
        .iter()
        .all(|&b| b == 0));
    hold.release();
    flusher.join().unwrap().unwrap();
    assert!(!dev.is_held());
    let file = file_bytes(&f);
    assert_eq!(&file[SECTOR..2 * SECTOR], &sectors_of(0x33, 1)[..]);
    assert_eq!(&file[3 * SECTOR..5 * SECTOR], &sectors_of(0x44, 2)[..]);
}

#[test]
fn a_hold_lets_the_buffer_pass_its_bound_and_drains_it_at_the_end() {
    let f = image(SECTORS);
    let dev = Arc::new(device(
        &f,
        FlushPolicy::WriteBack {
            max_buffered: 2 * SECTOR as u64,
        },
    ));
    let hold = dev.hold_for_checkpoint().unwrap().unwrap();
    dev.write(0, &sectors_of(0x55, 8)).unwrap();
    assert_eq!(dev.buffered_bytes(), 8 * SECTOR as u64);
    assert!(file_bytes(&f).iter().all(|&b| b == 0));
    drop(hold);
    assert_eq!(dev.buffered_bytes(), 0);
    assert_eq!(&file_bytes(&f)[..8 * SECTOR], &sectors_of(0x55, 8)[..]);
}

#[test]
fn holds_are_refused_when_they_cannot_work() {
    let f = image(SECTORS);
    let dev = Arc::new(device(&f, FlushPolicy::Replicated));
    assert!(matches!(
        dev.hold_for_checkpoint(),
        Err(BlockError::HoldReplicated)
    ));
    dev.set_policy(FlushPolicy::default());
    let hold = dev.hold_for_checkpoint().unwrap();
    assert!(matches!(
        dev.hold_for_checkpoint(),
        Err(BlockError::AlreadyHeld)
    ));
    drop(hold);
    assert!(dev.hold_for_checkpoint().unwrap().is_some());
    assert!(Arc::new(BlockDevice::detached())
        .hold_for_checkpoint()
        .unwrap()
        .is_none());
}

#[test]
fn device_state_round_trips_and_checks_the_disk() {
    use crate::vmm::state::DeviceState;
    let f = image(SECTORS);
    let dev = device(
        &f,
        FlushPolicy::WriteBack {
            max_buffered: 12345 * SECTOR as u64,
        },
    );
    dev.write(0, &sectors_of(1, 1)).unwrap();
    dev.take_epoch();
    dev.take_epoch();
    let saved = dev.save_state();
    assert_eq!(dev.state_name(), BLOCK_STATE);
    let g = image(SECTORS);
    let fresh = device(&g, FlushPolicy::Replicated);
    fresh.restore_state(&saved).unwrap();
    assert_eq!(fresh.open_epoch(), 2);
    assert_eq!(
        fresh.policy(),
        FlushPolicy::WriteBack {
            max_buffered: 12345 * SECTOR as u64
        }
    );
    // Another disk size, truncated or bad bytes: refused with a reason.
    let small = image(SECTORS / 2);
    let e = device(&small, FlushPolicy::default())
        .restore_state(&saved)
        .unwrap_err();
    assert!(e.contains("sectors"), "{e}");
    let fresh = device(&g, FlushPolicy::default());
    assert!(fresh.restore_state(&saved[..10]).is_err());
    let mut bad = saved.clone();
    bad[0] = 9;
    assert!(fresh.restore_state(&bad).is_err());
    let mut bad = saved.clone();
    bad[9] = 7;
    assert!(fresh.restore_state(&bad).is_err());
}
