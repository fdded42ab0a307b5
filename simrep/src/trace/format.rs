//! The memory-trace file format, version 1 (`MEMTRACE`): header, records,
//! a validating reader and a writer.
//!
//! The format is specified in `FORMAT.md` (shared with the capture tools):
//! a fixed little-endian header, then a body of tagged records, optionally
//! one zstd stream (header flag bit 0). The reader checks everything it can:
//! magic, version, page size, length caps, record order inside an epoch,
//! epoch numbering and the counts each `EPOCH_END` declares. Any malformed
//! input is a typed [`TraceError`]; the reader never panics.
//!
//! ```text
//! [PROC…] EPOCH 0 [PROC…] [REGIONS] PAGE… DROP… EPOCH_END 0
//! [PROC…] EPOCH 1 [PROC…] [REGIONS] PAGE… DROP… EPOCH_END 1
//! …
//! END n            (missing if the capture was killed)
//! ```

#![forbid(unsafe_code)]

use std::io::{self, BufReader, Read, Write};

use crate::compress::{Page, PAGE_SIZE};

/// File magic, the first 8 bytes of every trace.
pub const MAGIC: &[u8; 8] = b"MEMTRACE";
/// The only format version this module reads and writes.
pub const VERSION: u32 = 1;
/// Header flag bit 0: the body is one zstd stream.
pub const FLAG_ZSTD: u32 = 1;
/// Length of the fixed part of the header (before the description).
pub const HEADER_FIXED_LEN: u64 = 36;

/// Longest description accepted (bytes).
pub const MAX_DESCRIPTION: usize = 64 * 1024;
/// Longest process name accepted in a PROC record (bytes).
pub const MAX_COMM: usize = 1024;
/// Longest mapping name accepted in a REGIONS record (bytes).
pub const MAX_REGION_NAME: usize = 8192;
/// Most regions accepted in one REGIONS record.
pub const MAX_REGIONS: u32 = 1 << 20;

/// First slot of shared memory objects; slots below it are processes.
pub const SHARED_SLOT_BASE: u32 = 0x8000;
/// Largest slot a key can hold (16 bits).
pub const MAX_SLOT: u32 = 0xFFFF;
/// Addresses in keys are below 2^48.
pub const ADDRESS_MASK: u64 = (1 << 48) - 1;

/// Region protection bit: readable.
pub const PROT_READ: u8 = 1;
/// Region protection bit: writable.
pub const PROT_WRITE: u8 = 2;
/// Region protection bit: executable.
pub const PROT_EXEC: u8 = 4;
/// Region protection bit: shared mapping.
pub const PROT_SHARED: u8 = 8;

/// Record tag: a traced process got a slot.
pub const TAG_PROC: u8 = 0x07;
/// Record tag: an epoch begins.
pub const TAG_EPOCH: u8 = 0x01;
/// Record tag: the tracked mapping list.
pub const TAG_REGIONS: u8 = 0x05;
/// Record tag: new contents of one page.
pub const TAG_PAGE: u8 = 0x02;
/// Record tag: a page is no longer present.
pub const TAG_DROP: u8 = 0x03;
/// Record tag: an epoch ends.
pub const TAG_EPOCH_END: u8 = 0x06;
/// Record tag: end of trace.
pub const TAG_END: u8 = 0xFF;

/// Builds a key from a slot and an address (or offset in a shared object).
pub fn make_key(slot: u32, address: u64) -> u64 {
    (u64::from(slot & MAX_SLOT) << 48) | (address & ADDRESS_MASK)
}

/// The slot part of a key.
pub fn key_slot(key: u64) -> u32 {
    (key >> 48) as u32
}

/// The address part of a key.
pub fn key_address(key: u64) -> u64 {
    key & ADDRESS_MASK
}

/// Errors reading or writing a trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Opening the trace file failed.
    #[error("cannot open trace {path}")]
    Open {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading (or decompressing) the trace failed.
    #[error("cannot read trace at byte {offset}")]
    Read {
        /// Offset in the decoded trace (header + decompressed body).
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the trace failed.
    #[error("cannot write trace ({what})")]
    Write {
        /// What was being written.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file does not start with `MEMTRACE`.
    #[error("not a memory trace: bad magic {found:02x?}")]
    BadMagic {
        /// The first 8 bytes found.
        found: [u8; 8],
    },
    /// The format version is not 1.
    #[error("unsupported trace version {version} (only {VERSION} is supported)")]
    UnsupportedVersion {
        /// The version in the header.
        version: u32,
    },
    /// The page size is not 4096.
    #[error("unsupported page size {page_size} (only {PAGE_SIZE} is supported)")]
    UnsupportedPageSize {
        /// The page size in the header.
        page_size: u32,
    },
    /// The header sets flag bits this reader does not know.
    #[error("unsupported header flags {flags:#x}")]
    UnsupportedFlags {
        /// The flags in the header.
        flags: u32,
    },
    /// A record starts with a tag that is not in the format.
    #[error("unknown record tag {tag:#04x} at byte {offset}")]
    UnknownTag {
        /// The tag byte.
        tag: u8,
        /// Offset of the record in the decoded trace.
        offset: u64,
    },
    /// A length or count field exceeds its cap.
    #[error("{what} of {len} exceeds the limit of {max} at byte {offset}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The value found.
        len: u64,
        /// The cap.
        max: u64,
        /// Offset of the record in the decoded trace.
        offset: u64,
    },
    /// The trace ends in the middle of the header or of a record.
    #[error("trace truncated in {what} at byte {offset}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Offset of the record (or header) in the decoded trace.
        offset: u64,
    },
    /// The trace ends at a record boundary inside an epoch (no `EPOCH_END`).
    #[error("trace ends inside epoch {epoch}")]
    UnfinishedEpoch {
        /// The epoch that was cut short.
        epoch: u32,
    },
    /// A record appears where the format does not allow it.
    #[error("{record} record at byte {offset} is misplaced: {reason}")]
    Misplaced {
        /// The record kind.
        record: &'static str,
        /// Offset of the record in the decoded trace.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// An epoch number is out of sequence.
    #[error("{record} at byte {offset} names epoch {found}, expected {expected}")]
    EpochSequence {
        /// The record kind (`EPOCH` or `EPOCH_END`).
        record: &'static str,
        /// The expected epoch number.
        expected: u32,
        /// The epoch number found.
        found: u32,
        /// Offset of the record in the decoded trace.
        offset: u64,
    },
    /// An `EPOCH_END` declares counts that differ from the records seen.
    #[error("epoch {epoch}: EPOCH_END declares {declared} {what} records, the epoch holds {seen}")]
    CountMismatch {
        /// The epoch.
        epoch: u32,
        /// `PAGE` or `DROP`.
        what: &'static str,
        /// The count in `EPOCH_END`.
        declared: u32,
        /// The number of records seen.
        seen: u32,
    },
    /// `END` declares a number of epochs that differs from the epochs seen.
    #[error("END declares {declared} epochs, the trace holds {seen}")]
    EndCount {
        /// The count in `END`.
        declared: u32,
        /// The number of complete epochs seen.
        seen: u32,
    },
    /// A region has its end before its start.
    #[error("region {start:#x}..{end:#x} at byte {offset} is inverted")]
    InvalidRegion {
        /// Start address.
        start: u64,
        /// End address.
        end: u64,
        /// Offset of the REGIONS record in the decoded trace.
        offset: u64,
    },
    /// A value handed to the writer cannot be represented in the format.
    #[error("cannot encode {what}: {len} exceeds the limit of {max}")]
    Unencodable {
        /// Which field.
        what: &'static str,
        /// The value given.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// The reader was used again after it returned an error.
    #[error("trace reader already failed")]
    Failed,
}

/// The trace header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceHeader {
    /// Format version (1).
    pub version: u32,
    /// Page size (4096).
    pub page_size: u32,
    /// Flags; bit 0 ([`FLAG_ZSTD`]): the body is zstd-compressed.
    pub flags: u32,
    /// The target's run time between two stops, in ms.
    pub epoch_ms: u32,
    /// Capture start, Unix time in ns.
    pub start_unix_ns: u64,
    /// What was traced and how the load was made.
    pub description: String,
}

impl TraceHeader {
    /// A version-1 header with a 4 KiB page size and no flags.
    pub fn new(epoch_ms: u32, start_unix_ns: u64, description: impl Into<String>) -> Self {
        Self {
            version: VERSION,
            page_size: PAGE_SIZE as u32,
            flags: 0,
            epoch_ms,
            start_unix_ns,
            description: description.into(),
        }
    }

    /// Whether the body is one zstd stream.
    pub fn is_zstd(&self) -> bool {
        self.flags & FLAG_ZSTD != 0
    }

    /// Length of the encoded header in bytes.
    pub fn encoded_len(&self) -> u64 {
        HEADER_FIXED_LEN + self.description.len() as u64
    }

    /// Reads and validates a header.
    ///
    /// # Errors
    /// I/O errors, a truncated header, bad magic, an unsupported version,
    /// page size or flags, an over-long description.
    pub fn read_from(r: &mut impl Read) -> Result<Self, TraceError> {
        let mut fixed = [0u8; HEADER_FIXED_LEN as usize];
        read_full(r, &mut fixed, 0, "header")?;
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&fixed[0..8]);
        if &magic != MAGIC {
            return Err(TraceError::BadMagic { found: magic });
        }
        let version = le_u32(&fixed[8..12]);
        if version != VERSION {
            return Err(TraceError::UnsupportedVersion { version });
        }
        let page_size = le_u32(&fixed[12..16]);
        if page_size as usize != PAGE_SIZE {
            return Err(TraceError::UnsupportedPageSize { page_size });
        }
        let flags = le_u32(&fixed[16..20]);
        if flags & !FLAG_ZSTD != 0 {
            return Err(TraceError::UnsupportedFlags { flags });
        }
        let epoch_ms = le_u32(&fixed[20..24]);
        let start_unix_ns = le_u64(&fixed[24..32]);
        let n = le_u32(&fixed[32..36]);
        if n as usize > MAX_DESCRIPTION {
            return Err(TraceError::TooLong {
                what: "description length",
                len: n.into(),
                max: MAX_DESCRIPTION as u64,
                offset: 32,
            });
        }
        let mut desc = vec![0u8; n as usize];
        read_full(r, &mut desc, HEADER_FIXED_LEN, "header description")?;
        Ok(Self {
            version,
            page_size,
            flags,
            epoch_ms,
            start_unix_ns,
            description: String::from_utf8_lossy(&desc).into_owned(),
        })
    }

    /// Writes the header.
    ///
    /// # Errors
    /// I/O errors; a description longer than [`MAX_DESCRIPTION`].
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), TraceError> {
        let desc = self.description.as_bytes();
        check_len("description", desc.len(), MAX_DESCRIPTION)?;
        let mut buf = Vec::with_capacity(HEADER_FIXED_LEN as usize + desc.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&self.version.to_le_bytes());
        buf.extend_from_slice(&self.page_size.to_le_bytes());
        buf.extend_from_slice(&self.flags.to_le_bytes());
        buf.extend_from_slice(&self.epoch_ms.to_le_bytes());
        buf.extend_from_slice(&self.start_unix_ns.to_le_bytes());
        buf.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        buf.extend_from_slice(desc);
        w.write_all(&buf).map_err(|source| TraceError::Write {
            what: "header",
            source,
        })
    }
}

/// One tracked mapping (REGIONS record entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// Slot of the process (or shared object) the mapping belongs to.
    pub slot: u32,
    /// Start address (for a shared object: its first byte offset mapped).
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Protection bits: [`PROT_READ`], [`PROT_WRITE`], [`PROT_EXEC`], [`PROT_SHARED`].
    pub prot: u8,
    /// The mapping's name (path, `[heap]`, empty for anonymous).
    pub name: String,
}

/// The payload of an `EPOCH_END` record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochEnd {
    /// The epoch.
    pub epoch: u32,
    /// PAGE records in the epoch.
    pub n_dirty: u32,
    /// DROP records in the epoch.
    pub n_drop: u32,
    /// SIGSTOP sent → SIGCONT sent, in ns.
    pub stop_ns: u64,
    /// Time spent in `process_vm_readv`, in ns.
    pub read_ns: u64,
    /// Time spent comparing and emitting, in ns.
    pub compare_ns: u64,
    /// Pages read this epoch.
    pub tracked_pages: u64,
}

/// One record of the body. Borrowed data lives in the reader's buffers until
/// the next call to [`TraceReader::next_record`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// `PROC`: a traced process got a slot.
    Proc {
        /// The slot (< [`SHARED_SLOT_BASE`]).
        slot: u32,
        /// The process id.
        pid: u32,
        /// The process name.
        comm: &'a str,
    },
    /// `EPOCH`: an epoch begins.
    Epoch {
        /// The epoch number (0, 1, …).
        epoch: u32,
        /// When SIGSTOP was sent, ns since capture start.
        t_stop_ns: u64,
        /// How long the target ran since the previous SIGCONT (0 for epoch 0).
        run_ns: u64,
    },
    /// `REGIONS`: the tracked mappings, written when the list changed.
    Regions(&'a [Region]),
    /// `PAGE`: new contents of one page.
    Page {
        /// The page's key (`slot << 48 | address`).
        key: u64,
        /// Its contents.
        data: &'a Page,
    },
    /// `DROP`: a page that was present is no longer.
    Drop {
        /// The page's key.
        key: u64,
    },
    /// `EPOCH_END`: an epoch ends.
    EpochEnd(EpochEnd),
    /// `END`: the trace ends.
    End {
        /// Number of epochs, including epoch 0.
        epochs: u32,
    },
}

impl Record<'_> {
    /// The record's tag byte.
    pub fn tag(&self) -> u8 {
        match self {
            Record::Proc { .. } => TAG_PROC,
            Record::Epoch { .. } => TAG_EPOCH,
            Record::Regions(_) => TAG_REGIONS,
            Record::Page { .. } => TAG_PAGE,
            Record::Drop { .. } => TAG_DROP,
            Record::EpochEnd(_) => TAG_EPOCH_END,
            Record::End { .. } => TAG_END,
        }
    }
}

fn le_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), TraceError> {
    if len > max {
        return Err(TraceError::Unencodable {
            what,
            len: len as u64,
            max: max as u64,
        });
    }
    Ok(())
}

/// Fills `buf` completely. `offset` is the position reported on error.
fn read_full(
    r: &mut impl Read,
    buf: &mut [u8],
    offset: u64,
    what: &'static str,
) -> Result<(), TraceError> {
    match read_some(r, buf, offset)? {
        n if n == buf.len() => Ok(()),
        _ => Err(TraceError::Truncated { what, offset }),
    }
}

/// Reads until `buf` is full or end of input; returns the bytes read.
/// A zstd stream cut short reports `UnexpectedEof`: that is a short read.
fn read_some(r: &mut impl Read, buf: &mut [u8], offset: u64) -> Result<usize, TraceError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(source) => return Err(TraceError::Read { offset, source }),
        }
    }
    Ok(got)
}

/// A reader that counts the bytes it passed on.
struct Counting<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Buffer size in front of the zstd decoder (small reads are frequent).
const DECODED_BUFFER: usize = 256 * 1024;

enum Body<R: Read> {
    Plain(Counting<R>),
    Zstd(Box<BufReader<zstd::Decoder<'static, BufReader<Counting<R>>>>>),
}

impl<R: Read> Read for Body<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Body::Plain(r) => r.read(buf),
            Body::Zstd(r) => r.read(buf),
        }
    }
}

impl<R: Read> Body<R> {
    fn raw_count(&self) -> u64 {
        match self {
            Body::Plain(r) => r.count,
            Body::Zstd(r) => r.get_ref().get_ref().get_ref().count,
        }
    }
}

/// Where the reader is in the record grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between epochs (or before the first).
    Outside,
    /// Inside an epoch; `phase` is the last kind of record seen.
    Inside(Phase),
    /// After END.
    Ended,
    /// After an error.
    Failed,
}

/// Order of records inside an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Proc,
    Regions,
    Page,
    Drop,
}

/// A validating, lending reader of a trace. Pass a buffered reader (a
/// `BufReader<File>`) for a plain body; a zstd body is buffered internally.
pub struct TraceReader<R: Read> {
    header: TraceHeader,
    body: Body<R>,
    /// Offset in the decoded trace of the next byte to read.
    pos: u64,
    state: State,
    /// Number of the current epoch, or of the next one when outside.
    epoch: u32,
    /// Complete epochs seen.
    epochs_done: u32,
    n_page: u32,
    n_drop: u32,
    page: Box<Page>,
    comm: String,
    regions: Vec<Region>,
    scratch: Vec<u8>,
}

impl<R: Read> TraceReader<R> {
    /// Reads the header and prepares to read the body.
    ///
    /// # Errors
    /// See [`TraceHeader::read_from`]; a zstd decoder that cannot be created.
    pub fn new(reader: R) -> Result<Self, TraceError> {
        let mut counting = Counting {
            inner: reader,
            count: 0,
        };
        let header = TraceHeader::read_from(&mut counting)?;
        let pos = header.encoded_len();
        let body = if header.is_zstd() {
            let dec = zstd::Decoder::new(counting).map_err(|source| TraceError::Read {
                offset: pos,
                source,
            })?;
            Body::Zstd(Box::new(BufReader::with_capacity(DECODED_BUFFER, dec)))
        } else {
            Body::Plain(counting)
        };
        Ok(Self {
            header,
            body,
            pos,
            state: State::Outside,
            epoch: 0,
            epochs_done: 0,
            n_page: 0,
            n_drop: 0,
            page: Box::new([0; PAGE_SIZE]),
            comm: String::new(),
            regions: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// The trace header.
    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// Offset in the decoded trace (header + decompressed body) of the next
    /// record.
    pub fn offset(&self) -> u64 {
        self.pos
    }

    /// Bytes read from the underlying reader so far (the file position, for
    /// a progress bar; runs ahead of the records by the buffers).
    pub fn compressed_bytes_read(&self) -> u64 {
        self.body.raw_count()
    }

    /// The epoch being read, if inside one.
    pub fn current_epoch(&self) -> Option<u32> {
        match self.state {
            State::Inside(_) => Some(self.epoch),
            _ => None,
        }
    }

    /// Complete epochs read so far.
    pub fn epochs_done(&self) -> u32 {
        self.epochs_done
    }

    /// Reads the next record. `Ok(None)` at `END` or at the end of input
    /// between epochs (a trace without `END`).
    ///
    /// # Errors
    /// Malformed input (see [`TraceError`]); the end of input inside an
    /// epoch is [`TraceError::UnfinishedEpoch`], inside a record
    /// [`TraceError::Truncated`]. After an error every call returns
    /// [`TraceError::Failed`].
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, TraceError> {
        match self.state {
            State::Ended => return Ok(None),
            State::Failed => return Err(TraceError::Failed),
            _ => {}
        }
        match self.parse() {
            Ok(Some(kind)) => Ok(Some(self.record(kind))),
            Ok(None) => Ok(None),
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    fn record(&self, kind: Parsed) -> Record<'_> {
        match kind {
            Parsed::Proc { slot, pid } => Record::Proc {
                slot,
                pid,
                comm: &self.comm,
            },
            Parsed::Epoch {
                epoch,
                t_stop_ns,
                run_ns,
            } => Record::Epoch {
                epoch,
                t_stop_ns,
                run_ns,
            },
            Parsed::Regions => Record::Regions(&self.regions),
            Parsed::Page { key } => Record::Page {
                key,
                data: &self.page,
            },
            Parsed::Drop { key } => Record::Drop { key },
            Parsed::EpochEnd(e) => Record::EpochEnd(e),
            Parsed::End { epochs } => Record::End { epochs },
        }
    }

    fn field(&mut self, buf: &mut [u8], start: u64, what: &'static str) -> Result<(), TraceError> {
        read_full(&mut self.body, buf, start, what)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn string_field(
        &mut self,
        len: usize,
        start: u64,
        what: &'static str,
    ) -> Result<String, TraceError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(len, 0);
        let r = self.field(&mut scratch, start, what);
        let s = String::from_utf8_lossy(&scratch).into_owned();
        self.scratch = scratch;
        r.map(|()| s)
    }

    fn misplaced(record: &'static str, offset: u64, reason: &'static str) -> TraceError {
        TraceError::Misplaced {
            record,
            offset,
            reason,
        }
    }

    /// Checks that a record of `phase` may come now and moves to it.
    fn enter(&mut self, phase: Phase, record: &'static str, at: u64) -> Result<(), TraceError> {
        match self.state {
            State::Inside(p) if p <= phase => {
                if p == phase && phase == Phase::Regions {
                    return Err(Self::misplaced(record, at, "second REGIONS in one epoch"));
                }
                self.state = State::Inside(phase);
                Ok(())
            }
            State::Inside(_) => Err(Self::misplaced(
                record,
                at,
                "out of order inside the epoch (PROC, REGIONS, PAGE, DROP)",
            )),
            _ => Err(Self::misplaced(record, at, "outside an epoch")),
        }
    }

    fn parse(&mut self) -> Result<Option<Parsed>, TraceError> {
        let at = self.pos;
        let mut tag = [0u8; 1];
        if read_some(&mut self.body, &mut tag, at)? == 0 {
            return match self.state {
                State::Inside(_) => Err(TraceError::UnfinishedEpoch { epoch: self.epoch }),
                _ => {
                    self.state = State::Ended;
                    Ok(None)
                }
            };
        }
        self.pos += 1;
        match tag[0] {
            TAG_PROC => {
                let mut b = [0u8; 10];
                self.field(&mut b, at, "PROC")?;
                let (slot, pid, len) = (le_u32(&b[0..4]), le_u32(&b[4..8]), le_u16(&b[8..10]));
                if len as usize > MAX_COMM {
                    return Err(TraceError::TooLong {
                        what: "process name length",
                        len: len.into(),
                        max: MAX_COMM as u64,
                        offset: at,
                    });
                }
                if slot >= SHARED_SLOT_BASE {
                    return Err(Self::misplaced("PROC", at, "slot is a shared-object slot"));
                }
                match self.state {
                    State::Outside => {}
                    _ => self.enter(Phase::Proc, "PROC", at)?,
                }
                self.comm = self.string_field(len.into(), at, "PROC name")?;
                Ok(Some(Parsed::Proc { slot, pid }))
            }
            TAG_EPOCH => {
                let mut b = [0u8; 20];
                self.field(&mut b, at, "EPOCH")?;
                let epoch = le_u32(&b[0..4]);
                if self.state != State::Outside {
                    return Err(Self::misplaced("EPOCH", at, "inside another epoch"));
                }
                if epoch != self.epoch {
                    return Err(TraceError::EpochSequence {
                        record: "EPOCH",
                        expected: self.epoch,
                        found: epoch,
                        offset: at,
                    });
                }
                self.state = State::Inside(Phase::Proc);
                self.n_page = 0;
                self.n_drop = 0;
                Ok(Some(Parsed::Epoch {
                    epoch,
                    t_stop_ns: le_u64(&b[4..12]),
                    run_ns: le_u64(&b[12..20]),
                }))
            }
            TAG_REGIONS => {
                let mut b = [0u8; 4];
                self.field(&mut b, at, "REGIONS")?;
                let n = le_u32(&b);
                if n > MAX_REGIONS {
                    return Err(TraceError::TooLong {
                        what: "region count",
                        len: n.into(),
                        max: MAX_REGIONS.into(),
                        offset: at,
                    });
                }
                self.enter(Phase::Regions, "REGIONS", at)?;
                self.regions.clear();
                for _ in 0..n {
                    let mut e = [0u8; 23];
                    self.field(&mut e, at, "REGIONS entry")?;
                    let (slot, start, end) =
                        (le_u32(&e[0..4]), le_u64(&e[4..12]), le_u64(&e[12..20]));
                    let (prot, len) = (e[20], le_u16(&e[21..23]));
                    if len as usize > MAX_REGION_NAME {
                        return Err(TraceError::TooLong {
                            what: "region name length",
                            len: len.into(),
                            max: MAX_REGION_NAME as u64,
                            offset: at,
                        });
                    }
                    if end < start {
                        return Err(TraceError::InvalidRegion {
                            start,
                            end,
                            offset: at,
                        });
                    }
                    let name = self.string_field(len.into(), at, "REGIONS name")?;
                    self.regions.push(Region {
                        slot,
                        start,
                        end,
                        prot,
                        name,
                    });
                }
                Ok(Some(Parsed::Regions))
            }
            TAG_PAGE => {
                let mut b = [0u8; 8];
                self.field(&mut b, at, "PAGE")?;
                self.enter(Phase::Page, "PAGE", at)?;
                read_full(&mut self.body, &mut self.page[..], at, "PAGE contents")?;
                self.pos += PAGE_SIZE as u64;
                self.n_page = self.n_page.saturating_add(1);
                Ok(Some(Parsed::Page { key: le_u64(&b) }))
            }
            TAG_DROP => {
                let mut b = [0u8; 8];
                self.field(&mut b, at, "DROP")?;
                self.enter(Phase::Drop, "DROP", at)?;
                self.n_drop = self.n_drop.saturating_add(1);
                Ok(Some(Parsed::Drop { key: le_u64(&b) }))
            }
            TAG_EPOCH_END => {
                let mut b = [0u8; 44];
                self.field(&mut b, at, "EPOCH_END")?;
                let end = EpochEnd {
                    epoch: le_u32(&b[0..4]),
                    n_dirty: le_u32(&b[4..8]),
                    n_drop: le_u32(&b[8..12]),
                    stop_ns: le_u64(&b[12..20]),
                    read_ns: le_u64(&b[20..28]),
                    compare_ns: le_u64(&b[28..36]),
                    tracked_pages: le_u64(&b[36..44]),
                };
                if !matches!(self.state, State::Inside(_)) {
                    return Err(Self::misplaced("EPOCH_END", at, "outside an epoch"));
                }
                if end.epoch != self.epoch {
                    return Err(TraceError::EpochSequence {
                        record: "EPOCH_END",
                        expected: self.epoch,
                        found: end.epoch,
                        offset: at,
                    });
                }
                for (what, declared, seen) in [
                    ("PAGE", end.n_dirty, self.n_page),
                    ("DROP", end.n_drop, self.n_drop),
                ] {
                    if declared != seen {
                        return Err(TraceError::CountMismatch {
                            epoch: end.epoch,
                            what,
                            declared,
                            seen,
                        });
                    }
                }
                self.state = State::Outside;
                self.epochs_done += 1;
                self.epoch = self.epoch.wrapping_add(1);
                Ok(Some(Parsed::EpochEnd(end)))
            }
            TAG_END => {
                let mut b = [0u8; 4];
                self.field(&mut b, at, "END")?;
                let epochs = le_u32(&b);
                if self.state != State::Outside {
                    return Err(Self::misplaced("END", at, "inside an epoch"));
                }
                if epochs != self.epochs_done {
                    return Err(TraceError::EndCount {
                        declared: epochs,
                        seen: self.epochs_done,
                    });
                }
                self.state = State::Ended;
                Ok(Some(Parsed::End { epochs }))
            }
            tag => Err(TraceError::UnknownTag { tag, offset: at }),
        }
    }
}

/// A parsed record whose borrowed parts are in the reader's buffers.
enum Parsed {
    Proc {
        slot: u32,
        pid: u32,
    },
    Epoch {
        epoch: u32,
        t_stop_ns: u64,
        run_ns: u64,
    },
    Regions,
    Page {
        key: u64,
    },
    Drop {
        key: u64,
    },
    EpochEnd(EpochEnd),
    End {
        epochs: u32,
    },
}

enum Sink<W: Write> {
    Plain(W),
    Zstd(zstd::Encoder<'static, W>),
    /// Only while a zstd frame is being finished, or after an error there.
    Gone,
}

/// Writes a trace, record by record, exactly in the format. The writer does
/// not check the record grammar (the reader does): it writes what it is given.
///
/// With zstd, the body is one zstd stream made of one frame per epoch: each
/// `EPOCH_END` closes the frame and flushes the output, so a capture killed
/// mid-way leaves a prefix that decodes up to its last complete epoch.
pub struct TraceWriter<W: Write> {
    sink: Sink<W>,
    level: i32,
    buf: Vec<u8>,
}

impl<W: Write> TraceWriter<W> {
    /// Writes `header` (with flag bit 0 set to whether `zstd_level` is given)
    /// and prepares the body.
    ///
    /// # Errors
    /// I/O errors, an over-long description, a bad zstd level.
    pub fn new(
        mut out: W,
        header: &TraceHeader,
        zstd_level: Option<i32>,
    ) -> Result<Self, TraceError> {
        let mut header = header.clone();
        header.flags = match zstd_level {
            Some(_) => header.flags | FLAG_ZSTD,
            None => header.flags & !FLAG_ZSTD,
        };
        header.write_to(&mut out)?;
        let (sink, level) = match zstd_level {
            Some(level) => (Sink::Zstd(Self::encoder(out, level)?), level),
            None => (Sink::Plain(out), 0),
        };
        Ok(Self {
            sink,
            level,
            buf: Vec::with_capacity(64),
        })
    }

    fn encoder(out: W, level: i32) -> Result<zstd::Encoder<'static, W>, TraceError> {
        zstd::Encoder::new(out, level).map_err(|source| TraceError::Write {
            what: "zstd frame start",
            source,
        })
    }

    fn put(&mut self, data: &[u8], what: &'static str) -> Result<(), TraceError> {
        let r = match &mut self.sink {
            Sink::Plain(w) => w.write_all(data),
            Sink::Zstd(w) => w.write_all(data),
            Sink::Gone => Err(io::Error::other("writer failed earlier")),
        };
        r.map_err(|source| TraceError::Write { what, source })
    }

    /// Writes one record. After an `EPOCH_END` the output is flushed (and
    /// with zstd the frame is closed).
    ///
    /// # Errors
    /// I/O errors; names or counts over the format's caps.
    pub fn write(&mut self, record: &Record<'_>) -> Result<(), TraceError> {
        let mut b = std::mem::take(&mut self.buf);
        b.clear();
        b.push(record.tag());
        let mut page: Option<&Page> = None;
        match record {
            Record::Proc { slot, pid, comm } => {
                check_len("process name", comm.len(), MAX_COMM)?;
                b.extend_from_slice(&slot.to_le_bytes());
                b.extend_from_slice(&pid.to_le_bytes());
                b.extend_from_slice(&(comm.len() as u16).to_le_bytes());
                b.extend_from_slice(comm.as_bytes());
            }
            Record::Epoch {
                epoch,
                t_stop_ns,
                run_ns,
            } => {
                b.extend_from_slice(&epoch.to_le_bytes());
                b.extend_from_slice(&t_stop_ns.to_le_bytes());
                b.extend_from_slice(&run_ns.to_le_bytes());
            }
            Record::Regions(regions) => {
                check_len("region count", regions.len(), MAX_REGIONS as usize)?;
                b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
                for r in regions.iter() {
                    check_len("region name", r.name.len(), MAX_REGION_NAME)?;
                    b.extend_from_slice(&r.slot.to_le_bytes());
                    b.extend_from_slice(&r.start.to_le_bytes());
                    b.extend_from_slice(&r.end.to_le_bytes());
                    b.push(r.prot);
                    b.extend_from_slice(&(r.name.len() as u16).to_le_bytes());
                    b.extend_from_slice(r.name.as_bytes());
                }
            }
            Record::Page { key, data } => {
                b.extend_from_slice(&key.to_le_bytes());
                page = Some(data);
            }
            Record::Drop { key } => b.extend_from_slice(&key.to_le_bytes()),
            Record::EpochEnd(e) => {
                b.extend_from_slice(&e.epoch.to_le_bytes());
                b.extend_from_slice(&e.n_dirty.to_le_bytes());
                b.extend_from_slice(&e.n_drop.to_le_bytes());
                b.extend_from_slice(&e.stop_ns.to_le_bytes());
                b.extend_from_slice(&e.read_ns.to_le_bytes());
                b.extend_from_slice(&e.compare_ns.to_le_bytes());
                b.extend_from_slice(&e.tracked_pages.to_le_bytes());
            }
            Record::End { epochs } => b.extend_from_slice(&epochs.to_le_bytes()),
        }
        let r = self.put(&b, "record");
        self.buf = b;
        r?;
        if let Some(p) = page {
            self.put(&p[..], "page contents")?;
        }
        if let Record::EpochEnd(_) = record {
            self.end_frame()?;
        }
        Ok(())
    }

    /// Closes the current zstd frame (if any) and flushes the output.
    ///
    /// # Errors
    /// I/O errors.
    pub fn end_frame(&mut self) -> Result<(), TraceError> {
        let flush = |source| TraceError::Write {
            what: "flush",
            source,
        };
        match std::mem::replace(&mut self.sink, Sink::Gone) {
            Sink::Plain(mut w) => {
                let r = w.flush();
                self.sink = Sink::Plain(w);
                r.map_err(flush)
            }
            Sink::Zstd(enc) => {
                let mut w = enc.finish().map_err(|source| TraceError::Write {
                    what: "zstd frame end",
                    source,
                })?;
                w.flush().map_err(flush)?;
                self.sink = Sink::Zstd(Self::encoder(w, self.level)?);
                Ok(())
            }
            Sink::Gone => Err(flush(io::Error::other("writer failed earlier"))),
        }
    }

    /// Ends the body (closes the zstd stream, flushes) and returns the
    /// output. Does not write `END`: write [`Record::End`] first.
    ///
    /// # Errors
    /// I/O errors.
    pub fn finish(self) -> Result<W, TraceError> {
        let mut w = match self.sink {
            Sink::Plain(w) => w,
            Sink::Zstd(enc) => enc.finish().map_err(|source| TraceError::Write {
                what: "zstd stream end",
                source,
            })?,
            Sink::Gone => {
                return Err(TraceError::Write {
                    what: "finish",
                    source: io::Error::other("writer failed earlier"),
                })
            }
        };
        w.flush().map_err(|source| TraceError::Write {
            what: "flush",
            source,
        })?;
        Ok(w)
    }
}

#[cfg(test)]
pub(crate) mod tests;
