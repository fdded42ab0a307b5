//! Unit tests of the network device: ring placement, the checks on every
//! guest-provided value, framing of client input, and a whole round trip
//! through real guest memory with a simulated guest.

use std::sync::mpsc;

use super::*;
use crate::vmm::vcpu::VcpuCommand;

const MEM: u64 = 16 << 20;
const CTL: u64 = abi::HEAP_GPA;
const REQ: u64 = abi::HEAP_GPA + 0x1000;
const RESP: u64 = REQ + (1 << 20);

/// A gate that keeps what it is given.
#[derive(Debug, Default)]
struct Capture(Mutex<Vec<NetResponse>>);

impl OutputGate for Arc<Capture> {
    fn submit(&self, response: NetResponse) {
        self.0.lock().unwrap().push(response);
    }
}

fn rings() -> NetRings {
    NetRings {
        magic: abi::NET_MAGIC,
        req_gpa: REQ,
        req_size: 1 << 20,
        resp_gpa: RESP,
        resp_size: 1 << 20,
        ..Default::default()
    }
}

struct Rig {
    mem: GuestMemory,
    dev: Arc<NetDevice>,
    out: Arc<Capture>,
    wake_rx: mpsc::Receiver<VcpuCommand>,
    _peer: TcpStream,
}

/// A device with rings set up in real guest memory, one registered
/// connection (id 0) and vCPU 0's wake channel.
fn rig() -> Rig {
    let mem = GuestMemory::new(MEM).unwrap();
    let wakers = Arc::new(VcpuWakers::default());
    let (tx, wake_rx) = mpsc::channel();
    wakers.register(0, tx);
    let out = Arc::new(Capture::default());
    let o = out.clone();
    let dev = NetDevice::new(wakers, move |_| Arc::new(o) as Arc<dyn OutputGate>);
    mem.write_obj(CTL, rings()).unwrap();
    assert_eq!(
        dev.write(0, abi::NET_SETUP, &CTL.to_le_bytes(), &mem)
            .unwrap(),
        MmioAction::Continue
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    let (tx, _rx) = mpsc::channel();
    std::mem::forget(_rx);
    dev.conns.lock().insert(
        0,
        Conn {
            tx,
            unsent: Arc::default(),
            stream: s,
            next_resp_seq: 0,
            outstanding: 0,
            eof: false,
        },
    );
    Rig {
        mem,
        dev,
        out,
        wake_rx,
        _peer: peer,
    }
}

fn notify(r: &Rig) -> Result<MmioAction, DeviceError> {
    r.dev.write(0, abi::NET_NOTIFY, &0u64.to_le_bytes(), &r.mem)
}

fn request(id: u64, op: u8, key: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 20 + key.len()];
    proto::write_request_header(&mut buf, id, op, key.len() as u16, 0);
    buf[20..].copy_from_slice(key);
    buf.split_off(4)
}

/// What the simulated guest does: reads the request records in the ring.
fn guest_take_requests(r: &Rig, tail: &mut u64) -> Vec<(NetRecord, Vec<u8>)> {
    let head = r.mem.load_u64(CTL + abi::NET_REQ_HEAD_OFFSET).unwrap();
    let mut out = Vec::new();
    while *tail < head {
        let at = REQ + *tail % (1 << 20);
        let h: NetRecord = r.mem.read_obj(at).unwrap();
        if h.kind == abi::NET_REC_PAD {
            *tail += (1 << 20) - *tail % (1 << 20);
            continue;
        }
        let mut msg = vec![0u8; h.len as usize];
        r.mem.read(at + 16, &mut msg).unwrap();
        *tail += abi::net_record_size(u64::from(h.len));
        out.push((h, msg));
    }
    r.mem
        .write_obj(CTL + abi::NET_REQ_TAIL_OFFSET, *tail)
        .unwrap();
    out
}

/// The simulated guest writes a response record at `head`.
fn guest_respond(r: &Rig, head: &mut u64, conn: u32, seq: u32, id: u64, body: &[u8]) {
    let mut msg = vec![0u8; 20 + body.len()];
    proto::write_response_header(&mut msg, id, proto::status::OK, body.len() as u32);
    msg[20..].copy_from_slice(body);
    let msg = &msg[4..];
    let rec = abi::net_record_size(msg.len() as u64);
    let tail = r.mem.load_u64(CTL + abi::NET_RESP_TAIL_OFFSET).unwrap();
    let at = abi::net_place_record(*head, tail, 1 << 20, rec).expect("room");
    if at != *head {
        let pad = NetRecord {
            kind: abi::NET_REC_PAD,
            ..Default::default()
        };
        r.mem.write_obj(RESP + *head % (1 << 20), pad).unwrap();
    }
    let h = NetRecord {
        conn,
        seq,
        len: msg.len() as u32,
        kind: abi::NET_REC_MSG,
    };
    r.mem.write_obj(RESP + at % (1 << 20), h).unwrap();
    r.mem.write(RESP + at % (1 << 20) + 16, msg).unwrap();
    *head = at + rec;
    r.mem
        .write_obj(CTL + abi::NET_RESP_HEAD_OFFSET, *head)
        .unwrap();
}

#[test]
fn placement_pads_at_the_end_and_respects_the_consumer() {
    let size = 1024;
    assert_eq!(abi::net_place_record(0, 0, size, 512), Some(0));
    assert_eq!(abi::net_place_record(0, 0, size, 1024), Some(0));
    assert_eq!(abi::net_place_record(0, 0, size, 1040), None);
    // 256 bytes before the end: a 512-byte record pads and starts at 1024.
    assert_eq!(abi::net_place_record(768, 768, size, 512), Some(1024));
    // ... but not while the consumer still holds the start of the array.
    assert_eq!(abi::net_place_record(768, 256, size, 512), None);
    assert_eq!(abi::net_place_record(768, 512, size, 512), Some(1024));
    // Full ring.
    assert_eq!(abi::net_place_record(2048, 1024, size, 16), None);
    assert_eq!(abi::net_record_size(0), 16);
    assert_eq!(abi::net_record_size(1), 32);
    assert_eq!(abi::net_record_size(16), 32);
}

#[test]
fn placement_never_overlaps_unconsumed_bytes_or_wraps() {
    // A consumer that lags by a varying amount; every placed record must
    // lie in free space and inside the array.
    let size = 4096u64;
    let (mut head, mut tail) = (0u64, 0u64);
    let mut x = 12345u64;
    for _ in 0..20_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let rec = abi::net_record_size((x >> 33) % 1500);
        match abi::net_place_record(head, tail, size, rec) {
            Some(at) => {
                assert!(
                    at >= head && at + rec <= tail + size,
                    "{head} {tail} {at} {rec}"
                );
                assert_eq!(at / size, (at + rec - 1) / size, "record wraps");
                assert!(at == head || at % size == 0);
                head = at + rec;
            }
            None => {
                // Consume something; an empty ring always takes a record
                // of at most half its size.
                assert!(head != tail || rec > size / 2);
                tail += (head - tail)
                    .div_ceil(2)
                    .next_multiple_of(16)
                    .min(head - tail);
            }
        }
    }
}

#[test]
fn setup_is_validated() {
    let mem = GuestMemory::new(MEM).unwrap();
    let ok = validate_setup(CTL, &rings(), MEM).unwrap();
    assert_eq!(
        ok.0,
        Ring {
            gpa: REQ,
            size: 1 << 20
        }
    );
    let bad = |f: &dyn Fn(&mut NetRings), ctl: u64| {
        let mut r = rings();
        f(&mut r);
        let e = validate_setup(ctl, &r, MEM).unwrap_err();
        assert!(matches!(e, NetError::BadSetup { .. }), "{e}");
        e.to_string()
    };
    assert!(bad(&|r| r.magic = 0, CTL).contains("magic"));
    bad(&|_| {}, CTL + 8);
    bad(&|_| {}, 0x1000);
    bad(&|r| r.req_size = 3 << 18, CTL);
    bad(&|r| r.req_size = 64 << 10, CTL);
    bad(&|r| r.resp_size = 512 << 10, CTL);
    bad(&|r| r.req_size = 128 << 20, CTL);
    bad(&|r| r.req_gpa = MEM - 0x1000, CTL);
    bad(&|r| r.req_gpa = u64::MAX - 0xf, CTL);
    bad(&|r| r.req_gpa = 0x1000, CTL);
    bad(&|r| r.req_gpa += 8, CTL);
    bad(&|r| r.resp_gpa = REQ + 0x1000, CTL);
    bad(&|r| r.req_gpa = CTL, CTL);
    bad(&|r| r.resp_head = 16, CTL);
    // Through the register: outside RAM, twice, before setup, bad width.
    let dev = NetDevice::new(Arc::default(), |d| Arc::new(ImmediateGate::new(d)));
    assert!(matches!(
        dev.write(0, abi::NET_NOTIFY, &[0; 8], &mem),
        Err(DeviceError::Net(NetError::NotSetUp { .. }))
    ));
    assert!(matches!(
        dev.write(0, abi::NET_SETUP, &(MEM - 8).to_le_bytes(), &mem),
        Err(DeviceError::Net(NetError::BadSetup { .. }))
    ));
    assert!(matches!(
        dev.write(0, abi::NET_SETUP, &[0; 4], &mem),
        Err(DeviceError::BadAccess { .. })
    ));
    assert!(matches!(
        dev.write(0, abi::NET_BASE + 0x800, &[0; 8], &mem),
        Err(DeviceError::UnknownAddress { .. })
    ));
    mem.write_obj(CTL, rings()).unwrap();
    dev.write(0, abi::NET_SETUP, &CTL.to_le_bytes(), &mem)
        .unwrap();
    assert!(matches!(
        dev.write(0, abi::NET_SETUP, &CTL.to_le_bytes(), &mem),
        Err(DeviceError::Net(NetError::AlreadySetUp))
    ));
}

#[test]
fn records_are_validated() {
    let size = 1 << 20;
    let msg = |len, kind| NetRecord {
        conn: 1,
        seq: 2,
        len,
        kind,
    };
    assert_eq!(
        parse_record(msg(20, abi::NET_REC_MSG), 0, 48, size, 100).unwrap(),
        Parsed::Msg {
            conn: 1,
            seq: 2,
            msg_pos: 16,
            len: 20,
            next: 48
        }
    );
    let e = |h, tail, head| {
        parse_record(h, tail, head, size, 100)
            .unwrap_err()
            .to_string()
    };
    assert!(e(msg(20, abi::NET_REC_MSG), 0, 32).contains("past the producer"));
    assert!(e(msg(101, abi::NET_REC_MSG), 0, 1 << 10).contains("at most 100"));
    assert!(e(msg(20, abi::NET_REC_MSG), size - 32, size + 64).contains("wraps"));
    assert!(e(msg(0, 7), 0, 64).contains("unknown record kind 7"));
    assert!(e(msg(0, abi::NET_REC_PAD), size - 32, size - 16).contains("padding"));
    assert_eq!(
        parse_record(msg(0, abi::NET_REC_PAD), size - 32, size + 16, size, 100).unwrap(),
        Parsed::Skip(size)
    );
    assert!(check_index("response", "head", 32, 0, 64).is_ok());
    assert!(check_index("response", "head", 80, 0, 64).is_err());
    assert!(check_index("response", "head", 8, 0, 64).is_err());
    assert!(check_index("request", "tail", 0, 16, 64).is_err());
}

#[test]
fn requests_reach_the_ring_and_responses_the_gate_in_order() {
    let r = rig();
    for seq in 0..3u32 {
        assert!(r
            .dev
            .submit_request(0, seq, request(100 + u64::from(seq), proto::op::GET, b"k")));
    }
    assert_eq!(notify(&r).unwrap(), MmioAction::Continue);
    let (mut tail, mut head) = (0, 0);
    let got = guest_take_requests(&r, &mut tail);
    assert_eq!(got.len(), 3);
    for (i, (h, m)) in got.iter().enumerate() {
        assert_eq!((h.conn, h.seq, h.kind), (0, i as u32, abi::NET_REC_MSG));
        assert_eq!(proto::parse_request(m).unwrap().id, 100 + i as u64);
        guest_respond(&r, &mut head, h.conn, h.seq, 100 + i as u64, b"v");
    }
    // A response for a connection that is gone is dropped, not an error.
    guest_respond(&r, &mut head, 77, 0, 1, b"");
    notify(&r).unwrap();
    let out = r.out.0.lock().unwrap();
    assert_eq!(out.len(), 3);
    for (i, o) in out.iter().enumerate() {
        assert_eq!(o.seq, i as u32);
        let resp = proto::parse_response(&o.frame[4..]).unwrap();
        assert_eq!((resp.id, resp.body), (100 + i as u64, &b"v"[..]));
        assert_eq!(o.frame[..4], ((o.frame.len() - 4) as u32).to_le_bytes());
    }
    assert_eq!(r.dev.stats().discarded_responses, 1);
    assert_eq!(
        r.mem.load_u64(CTL + abi::NET_RESP_TAIL_OFFSET).unwrap(),
        head
    );
    assert!(!r.dev.take_written_pages().is_empty());
}

#[test]
fn the_ring_wraps_with_padding_under_sustained_traffic() {
    let r = rig();
    let (mut tail, mut head) = (0, 0);
    let mut seq = 0u32;
    let mut delivered = 0;
    let key = vec![b'x'; 200];
    for round in 0..60 {
        // Big and small requests, more than one ring's worth in total.
        for i in 0..8 {
            let mut m = request(u64::from(seq), proto::op::PUT, &key);
            let v = if (round + i) % 3 == 0 { 60_000 } else { 100 };
            m[12..16].copy_from_slice(&(v as u32).to_le_bytes());
            m.resize(m.len() + v, 7);
            assert!(r.dev.submit_request(0, seq, m));
            seq += 1;
        }
        loop {
            notify(&r).unwrap();
            let got = guest_take_requests(&r, &mut tail);
            if got.is_empty() {
                break;
            }
            for (h, m) in got {
                assert_eq!(h.seq, delivered);
                proto::parse_request(&m).unwrap();
                guest_respond(&r, &mut head, 0, h.seq, u64::from(h.seq), &[1; 3000]);
                delivered += 1;
            }
        }
    }
    notify(&r).unwrap();
    assert_eq!(delivered, seq);
    assert_eq!(r.out.0.lock().unwrap().len(), seq as usize);
    assert!(tail > 4 << 20 && head > (1 << 20), "the rings wrapped");
}

#[test]
fn a_misbehaving_guest_gets_device_errors() {
    // Response head beyond the ring.
    let r = rig();
    r.mem
        .write_obj(CTL + abi::NET_RESP_HEAD_OFFSET, (2u64 << 20) + 16)
        .unwrap();
    let e = notify(&r).unwrap_err();
    assert!(
        matches!(e, DeviceError::Net(NetError::BadIndex { .. })),
        "{e}"
    );
    // Request tail past what the VMM produced.
    let r = rig();
    r.mem
        .write_obj(CTL + abi::NET_REQ_TAIL_OFFSET, 64u64)
        .unwrap();
    assert!(matches!(
        notify(&r).unwrap_err(),
        DeviceError::Net(NetError::BadIndex { index: "tail", .. })
    ));
    // A record that claims more bytes than were published.
    let r = rig();
    let h = NetRecord {
        conn: 0,
        seq: 0,
        len: 1000,
        kind: abi::NET_REC_MSG,
    };
    r.mem.write_obj(RESP, h).unwrap();
    r.mem
        .write_obj(CTL + abi::NET_RESP_HEAD_OFFSET, 64u64)
        .unwrap();
    assert!(matches!(
        notify(&r).unwrap_err(),
        DeviceError::Net(NetError::BadRecord { .. })
    ));
    // A response whose message is not a valid response.
    let r = rig();
    let h = NetRecord {
        conn: 0,
        seq: 0,
        len: 8,
        kind: abi::NET_REC_MSG,
    };
    r.mem.write_obj(RESP, h).unwrap();
    r.mem
        .write_obj(CTL + abi::NET_RESP_HEAD_OFFSET, 32u64)
        .unwrap();
    let e = notify(&r).unwrap_err().to_string();
    assert!(e.contains("malformed response"), "{e}");
    // Responses out of order.
    let r = rig();
    let mut head = 0;
    guest_respond(&r, &mut head, 0, 1, 9, b"");
    assert!(matches!(
        notify(&r).unwrap_err(),
        DeviceError::Net(NetError::OutOfOrder {
            conn: 0,
            got: 1,
            expected: 0
        })
    ));
}

#[test]
fn wait_blocks_only_when_idle_and_a_request_wakes_it() {
    let r = rig();
    let wait = |ns: u64| r.dev.write(0, abi::NET_WAIT, &ns.to_le_bytes(), &r.mem);
    assert_eq!(
        wait(u64::MAX).unwrap(),
        MmioAction::Wait(Duration::from_nanos(abi::NET_WAIT_MAX_NS))
    );
    assert!(r.wake_rx.try_recv().is_err());
    assert!(r.dev.submit_request(0, 0, request(1, proto::op::PING, b"")));
    assert_eq!(r.wake_rx.try_recv().unwrap(), VcpuCommand::Wake);
    // The vCPU thread ends the wait: the request lands in the ring.
    r.dev.wait_done(0, &r.mem).unwrap();
    let mut tail = 0;
    assert_eq!(guest_take_requests(&r, &mut tail).len(), 1);
    // A request already queued: no wait.
    assert!(r.dev.submit_request(0, 1, request(2, proto::op::PING, b"")));
    assert!(r.wake_rx.try_recv().is_err(), "nobody was waiting");
    assert_eq!(wait(1000).unwrap(), MmioAction::Continue);
    // Unconsumed requests in the ring: no wait either.
    assert_eq!(wait(1000).unwrap(), MmioAction::Continue);
    guest_take_requests(&r, &mut tail);
    assert_eq!(wait(0).unwrap(), MmioAction::Continue);
    let s = r.dev.stats();
    assert_eq!((s.requests, s.waits_blocked), (2, 1));
}

#[test]
fn frames_are_cut_and_garbage_is_refused() {
    let frame = |id, op, key: &[u8], val: &[u8]| {
        let mut b = vec![0u8; 20];
        proto::write_request_header(&mut b, id, op, key.len() as u16, val.len() as u32);
        b.extend_from_slice(key);
        b.extend_from_slice(val);
        b
    };
    let mut input = frame(1, proto::op::PUT, b"k", b"v");
    input.extend(frame(2, proto::op::GET, b"k", b""));
    let mut c = io::Cursor::new(input);
    let FrameRead::Frame(m) = read_frame(&mut c).unwrap() else {
        panic!()
    };
    assert_eq!(proto::parse_request(&m).unwrap().value, b"v");
    assert!(matches!(read_frame(&mut c).unwrap(), FrameRead::Frame(_)));
    assert_eq!(read_frame(&mut c).unwrap(), FrameRead::Eof);

    let err = |b: Vec<u8>| read_frame(&mut io::Cursor::new(b)).unwrap_err();
    assert_eq!(err(vec![1, 0]), FrameError::Truncated { got: 2, want: 4 });
    assert_eq!(err(vec![3, 0, 0, 0, 1, 2, 3]), FrameError::BadLength(3));
    assert_eq!(
        err(vec![0xff, 0xff, 0xff, 0x7f]),
        FrameError::BadLength(0x7fff_ffff)
    );
    let mut long_key = frame(1, proto::op::GET, &[0; 251], b"");
    assert_eq!(
        err(long_key.clone()),
        FrameError::Malformed(proto::ProtoError::TooLong)
    );
    // Lengths that do not add up to the frame length.
    long_key[0..4].copy_from_slice(&(16u32 + 10).to_le_bytes());
    long_key[14..16].copy_from_slice(&5u16.to_le_bytes());
    assert_eq!(
        err(long_key),
        FrameError::Malformed(proto::ProtoError::LengthMismatch)
    );
    let mut half = frame(1, proto::op::PUT, b"key", &[9; 1000]);
    half.truncate(500);
    assert!(matches!(err(half), FrameError::Truncated { .. }));
    let mut half_header = frame(1, proto::op::PUT, b"key", b"");
    half_header.truncate(10);
    assert!(matches!(err(half_header), FrameError::Truncated { .. }));
}

#[test]
fn saved_state_round_trips_and_rejects_bad_bytes() {
    let s = SavedNet {
        ctl: 0x40_0000,
        req_head: 900,
        req_tail: 800,
        resp_tail: 77,
        next_conn: 12,
    };
    let b = s.encode();
    assert_eq!(SavedNet::decode(&b), Ok(s));
    for n in 0..b.len() {
        assert!(SavedNet::decode(&b[..n]).is_err(), "truncated to {n}");
    }
    let mut v = b.clone();
    v[0] = 9;
    assert!(SavedNet::decode(&v).is_err(), "unknown version");
    let bad = SavedNet { req_tail: 901, ..s };
    assert!(
        SavedNet::decode(&bad.encode()).is_err(),
        "tail ahead of head"
    );
}
