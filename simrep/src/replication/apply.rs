//! The backup's receive path, without I/O: the committed image, the epoch
//! being received, and the checks an epoch must pass before it is applied.
//!
//! [`BackupImage::handle`] takes each [`Message`] the primary sends. Epoch
//! data is staged; at [`EpochEnd`] the whole epoch is decoded against the
//! committed image into a separate buffer and checked (chunk and disk
//! record counts, frame bounds, page count, the page digest). Only an epoch
//! that passes every check is returned as a [`VerifiedEpoch`]; the caller
//! makes its disk writes durable and then calls [`BackupImage::commit`],
//! which cannot fail. Any error leaves the committed image, state and
//! epoch exactly as they were.
//!
//! The primary's side of the same contract is [`epoch_messages`] and
//! [`digest_epoch`].

use crate::compress::{decode_epoch_into, DecodedEpoch, Image, PageView, PAGE_SIZE, ZERO_PAGE};

use super::protocol::{
    EpochData, EpochDisk, EpochEnd, Message, PageData, PageDigest, SyncBegin, DIGEST_LEN,
    MAX_PAYLOAD, SECTOR_SIZE,
};

/// Largest guest memory a backup accepts (256 GiB, the codec's frame
/// limit).
pub const MAX_MEM_SIZE: u64 = (crate::compress::MAX_FRAMES as u64) * PAGE_SIZE as u64;

/// Why the backup refused a message. The committed state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The message is not allowed in the current phase.
    #[error("unexpected {message} while {phase}")]
    Unexpected {
        /// The message's name.
        message: &'static str,
        /// What the backup was doing.
        phase: &'static str,
    },
    /// A size or index is out of bounds.
    #[error("{0}")]
    Bounds(String),
    /// An epoch arrived out of sequence.
    #[error("epoch {got} out of sequence (expected {expected})")]
    Sequence {
        /// The epoch received.
        got: u64,
        /// The one expected.
        expected: String,
    },
    /// The epoch's codec stream does not decode.
    #[error("epoch {epoch}: codec stream does not decode: {why}")]
    Decode {
        /// The epoch.
        epoch: u64,
        /// The decoder's error.
        why: String,
    },
    /// The decoded epoch does not match what the primary announced.
    #[error("epoch {epoch}: {what} mismatch")]
    Verify {
        /// The epoch.
        epoch: u64,
        /// What differs ("page count", "digest", ...).
        what: &'static str,
    },
}

/// An epoch that passed every check, ready to commit.
#[derive(Debug)]
pub struct VerifiedEpoch {
    /// The epoch.
    pub epoch: u64,
    /// Block writes to make durable before [`BackupImage::commit`].
    pub disk_writes: Vec<(u64, Vec<u8>)>,
    /// Saved vCPU/VM/device state of the checkpoint.
    pub state: Vec<u8>,
    /// Pages the epoch changes.
    pub pages: u64,
    /// Bytes of codec stream received for it.
    pub stream_bytes: u64,
}

#[derive(Debug)]
enum Phase {
    /// No image.
    Empty,
    /// Receiving the initial copy.
    Syncing { pages: u64 },
    /// The initial copy is complete; no epoch committed on it yet, so it is
    /// not a checkpoint.
    Synced,
    /// At least one epoch committed: the image is a checkpoint.
    Ready,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Empty => "waiting for a synchronisation",
            Phase::Syncing { .. } => "synchronising",
            Phase::Synced => "synchronised, waiting for the first epoch",
            Phase::Ready => "replicating",
        }
    }
}

#[derive(Debug, Default)]
struct Pending {
    epoch: u64,
    chunks: u32,
    stream: Vec<u8>,
    disk: Vec<(u64, Vec<u8>)>,
    disk_records: u32,
}

/// The backup's memory image and replication state.
pub struct BackupImage {
    image: Image,
    frames: u32,
    disk_sectors: u64,
    run_id: u64,
    config: Vec<u8>,
    phase: Phase,
    committed_epoch: Option<u64>,
    state: Vec<u8>,
    pending: Option<Pending>,
    decoded: DecodedEpoch,
}

impl std::fmt::Debug for BackupImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupImage")
            .field("frames", &self.frames)
            .field("run_id", &self.run_id)
            .field("phase", &self.phase)
            .field("committed_epoch", &self.committed_epoch)
            .finish_non_exhaustive()
    }
}

impl BackupImage {
    /// An empty backup; block writes must stay below `disk_sectors`.
    pub fn new(disk_sectors: u64) -> Self {
        BackupImage {
            image: Image::default(),
            frames: 0,
            disk_sectors,
            run_id: 0,
            config: Vec::new(),
            phase: Phase::Empty,
            committed_epoch: None,
            state: Vec::new(),
            pending: None,
            decoded: DecodedEpoch::default(),
        }
    }

    /// Sets the disk size block writes must stay within (from the VM
    /// configuration of a synchronisation).
    pub fn set_disk_sectors(&mut self, sectors: u64) {
        self.disk_sectors = sectors;
    }

    /// The last committed epoch (`None`: no checkpoint to fail over to).
    pub fn committed_epoch(&self) -> Option<u64> {
        self.committed_epoch
    }

    /// The committed memory image.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The committed checkpoint's saved state.
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// The VM configuration of the current run.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// The primary's run identity.
    pub fn run_id(&self) -> u64 {
        self.run_id
    }

    /// Guest memory bytes (0 before a synchronisation).
    pub fn mem_size(&self) -> u64 {
        u64::from(self.frames) * PAGE_SIZE as u64
    }

    /// Whether the image is a checkpoint a failover can resume.
    pub fn can_fail_over(&self) -> bool {
        matches!(self.phase, Phase::Ready)
    }

    /// What the backup is doing, for status output.
    pub fn phase(&self) -> &'static str {
        self.phase.name()
    }

    fn unexpected(&self, message: &'static str) -> ApplyError {
        ApplyError::Unexpected {
            message,
            phase: self.phase.name(),
        }
    }

    /// Takes one message from the primary. `Ok(Some(_))` when an epoch
    /// passed every check: make its disk writes durable, then
    /// [`Self::commit`] it.
    ///
    /// # Errors
    ///
    /// [`ApplyError`]; the committed state is unchanged and the staged
    /// epoch is dropped.
    pub fn handle(&mut self, msg: Message) -> Result<Option<VerifiedEpoch>, ApplyError> {
        let result = self.handle_inner(msg);
        if result.is_err() {
            self.pending = None;
        }
        result
    }

    fn handle_inner(&mut self, msg: Message) -> Result<Option<VerifiedEpoch>, ApplyError> {
        match msg {
            Message::SyncBegin(s) => self.sync_begin(s).map(|()| None),
            Message::SyncPages(p) => {
                let Phase::Syncing { pages } = &mut self.phase else {
                    return Err(self.unexpected("SyncPages"));
                };
                for (gfn, data) in p.pages {
                    if gfn >= u64::from(self.frames) {
                        return Err(ApplyError::Bounds(format!(
                            "sync page {gfn} outside guest memory ({} pages)",
                            self.frames
                        )));
                    }
                    let page = self.image.page_mut(gfn as u32);
                    match data {
                        PageData::Zero => page.fill(0),
                        PageData::Raw(b) => page.copy_from_slice(&b),
                        PageData::Lz4(b) => match lz4_flex::block::decompress_into(&b, page) {
                            Ok(PAGE_SIZE) => {}
                            _ => {
                                return Err(ApplyError::Bounds(format!(
                                    "sync page {gfn}: lz4 data does not decode to one page"
                                )))
                            }
                        },
                    }
                    *pages += 1;
                }
                Ok(None)
            }
            Message::SyncEnd(e) => {
                let Phase::Syncing { pages } = self.phase else {
                    return Err(self.unexpected("SyncEnd"));
                };
                if pages != e.pages {
                    return Err(ApplyError::Bounds(format!(
                        "sync ended after {pages} pages, the primary says {}",
                        e.pages
                    )));
                }
                self.phase = Phase::Synced;
                Ok(None)
            }
            Message::EpochData(d) => self.epoch_data(d).map(|()| None),
            Message::EpochDisk(d) => self.epoch_disk(d).map(|()| None),
            Message::EpochEnd(e) => self.epoch_end(e).map(Some),
            Message::Heartbeat { .. } => Ok(None),
            other => Err(self.unexpected(other.name())),
        }
    }

    fn sync_begin(&mut self, s: SyncBegin) -> Result<(), ApplyError> {
        if s.mem_size > MAX_MEM_SIZE {
            return Err(ApplyError::Bounds(format!(
                "guest memory of {} bytes is over the {MAX_MEM_SIZE}-byte limit",
                s.mem_size
            )));
        }
        // A new synchronisation replaces the old checkpoint: while the
        // backup was away the primary ran unprotected, so the old one is
        // stale and must not be resumed.
        if self.committed_epoch.is_some() {
            tracing::warn!(
                old_run = self.run_id,
                new_run = s.run_id,
                "new synchronisation: the previous checkpoint is discarded"
            );
        }
        self.frames = (s.mem_size / PAGE_SIZE as u64) as u32;
        self.image = Image::zeroed(self.frames);
        self.run_id = s.run_id;
        self.config = s.config;
        self.committed_epoch = None;
        self.state.clear();
        self.pending = None;
        self.phase = Phase::Syncing { pages: 0 };
        Ok(())
    }

    fn expected_epoch(&self) -> Result<Option<u64>, ApplyError> {
        match self.phase {
            Phase::Synced => Ok(None),
            Phase::Ready => Ok(self.committed_epoch.map(|e| e + 1)),
            _ => Err(self.unexpected("epoch data")),
        }
    }

    fn pending_for(&mut self, epoch: u64) -> Result<&mut Pending, ApplyError> {
        match &self.pending {
            Some(p) if p.epoch == epoch => {}
            Some(p) => {
                return Err(ApplyError::Sequence {
                    got: epoch,
                    expected: p.epoch.to_string(),
                })
            }
            None => {
                if let Some(expected) = self.expected_epoch()? {
                    if epoch != expected {
                        return Err(ApplyError::Sequence {
                            got: epoch,
                            expected: expected.to_string(),
                        });
                    }
                }
                self.pending = Some(Pending {
                    epoch,
                    ..Pending::default()
                });
            }
        }
        Ok(self.pending.as_mut().expect("set above"))
    }

    fn epoch_data(&mut self, d: EpochData) -> Result<(), ApplyError> {
        // A whole epoch's stream is at most every page raw plus headers.
        let cap = u64::from(self.frames) * (PAGE_SIZE as u64 + 64) + MAX_PAYLOAD as u64;
        let p = self.pending_for(d.epoch)?;
        if d.chunk != p.chunks {
            return Err(ApplyError::Sequence {
                got: d.epoch,
                expected: format!(
                    "chunk {} of epoch {}, got chunk {}",
                    p.chunks, p.epoch, d.chunk
                ),
            });
        }
        if p.stream.len() as u64 + d.data.len() as u64 > cap {
            return Err(ApplyError::Bounds(format!(
                "epoch {} stream is larger than guest memory allows",
                d.epoch
            )));
        }
        p.chunks += 1;
        p.stream.extend_from_slice(&d.data);
        Ok(())
    }

    fn epoch_disk(&mut self, d: EpochDisk) -> Result<(), ApplyError> {
        let sectors = self.disk_sectors;
        for (sector, data) in &d.writes {
            let n = (data.len() / SECTOR_SIZE) as u64;
            if data.len() % SECTOR_SIZE != 0 || sector.checked_add(n).is_none_or(|e| e > sectors) {
                return Err(ApplyError::Bounds(format!(
                    "block write of {} bytes at sector {sector} is outside the {sectors}-sector disk",
                    data.len()
                )));
            }
        }
        let p = self.pending_for(d.epoch)?;
        p.disk_records += 1;
        p.disk.extend(d.writes);
        Ok(())
    }

    fn epoch_end(&mut self, e: EpochEnd) -> Result<VerifiedEpoch, ApplyError> {
        // An epoch with no data (an idle guest) has no pending record yet.
        self.pending_for(e.epoch)?;
        let p = self.pending.take().expect("pending_for created it");
        if p.chunks != e.chunks || p.disk_records != e.disk_records {
            return Err(ApplyError::Verify {
                epoch: e.epoch,
                what: "record count",
            });
        }
        let stream_bytes = p.stream.len() as u64;
        let pages = if p.stream.is_empty() {
            self.decoded.frames.clear();
            self.decoded.data.clear();
            self.decoded.dropped.clear();
            0
        } else {
            decode_epoch_into(&self.image, &p.stream, self.frames, &mut self.decoded).map_err(
                |err| ApplyError::Decode {
                    epoch: e.epoch,
                    why: format!("{err:#}"),
                },
            )?;
            (self.decoded.frames.len() + self.decoded.dropped.len()) as u64
        };
        if pages != e.dirty_pages {
            return Err(ApplyError::Verify {
                epoch: e.epoch,
                what: "page count",
            });
        }
        if digest_decoded(&self.decoded) != e.digest {
            return Err(ApplyError::Verify {
                epoch: e.epoch,
                what: "page digest",
            });
        }
        Ok(VerifiedEpoch {
            epoch: e.epoch,
            disk_writes: p.disk,
            state: e.state,
            pages,
            stream_bytes,
        })
    }

    /// Applies a verified epoch: the image, state and epoch become the new
    /// checkpoint. `epoch` must be what [`Self::handle`] just returned,
    /// with nothing handled in between.
    ///
    /// # Panics
    ///
    /// If `epoch` is not the epoch just verified (a caller bug).
    pub fn commit(&mut self, epoch: VerifiedEpoch) {
        assert!(
            matches!(self.phase, Phase::Synced | Phase::Ready),
            "commit without a verified epoch"
        );
        self.decoded.apply(&mut self.image);
        self.committed_epoch = Some(epoch.epoch);
        self.state = epoch.state;
        self.phase = Phase::Ready;
    }
}

/// The digest of a decoded epoch: every changed page in gfn order.
fn digest_decoded(d: &DecodedEpoch) -> [u8; DIGEST_LEN] {
    let mut h = PageDigest::new();
    let (mut i, mut j) = (0, 0);
    while i < d.frames.len() || j < d.dropped.len() {
        if j == d.dropped.len() || (i < d.frames.len() && d.frames[i] < d.dropped[j]) {
            h.add(u64::from(d.frames[i]), d.page(i));
            i += 1;
        } else {
            h.add(u64::from(d.dropped[j]), &ZERO_PAGE);
            j += 1;
        }
    }
    h.finish()
}

/// The primary's digest of an epoch: the contents in `image` of every
/// frame of `dirty` and `dropped` (both sorted), merged in gfn order. The
/// backup computes the same over what it decoded.
pub fn digest_epoch(image: &dyn PageView, dirty: &[u32], dropped: &[u32]) -> [u8; DIGEST_LEN] {
    let mut h = PageDigest::new();
    let (mut i, mut j) = (0, 0);
    while i < dirty.len() || j < dropped.len() {
        let f = if j == dropped.len() || (i < dirty.len() && dirty[i] < dropped[j]) {
            i += 1;
            dirty[i - 1]
        } else {
            j += 1;
            dropped[j - 1]
        };
        h.add(u64::from(f), image.page(f));
    }
    h.finish()
}

/// The messages of one epoch, as the primary sends them: the codec stream
/// cut into [`EpochData`] chunks, the block writes in [`EpochDisk`]
/// records, then the [`EpochEnd`].
pub fn epoch_messages(
    epoch: u64,
    stream: &[u8],
    disk_writes: Vec<(u64, Vec<u8>)>,
    dirty_pages: u64,
    digest: [u8; DIGEST_LEN],
    state: Vec<u8>,
) -> Vec<Message> {
    let mut out = Vec::new();
    let mut chunks = 0u32;
    for data in stream.chunks(MAX_PAYLOAD / 2) {
        out.push(Message::EpochData(EpochData {
            epoch,
            chunk: chunks,
            data: data.to_vec(),
        }));
        chunks += 1;
    }
    let mut disk_records = 0u32;
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    for w in disk_writes {
        if batch_bytes + w.1.len() > MAX_PAYLOAD / 2 && !batch.is_empty() {
            out.push(Message::EpochDisk(EpochDisk {
                epoch,
                writes: std::mem::take(&mut batch),
            }));
            disk_records += 1;
            batch_bytes = 0;
        }
        batch_bytes += w.1.len();
        batch.push(w);
    }
    if !batch.is_empty() {
        out.push(Message::EpochDisk(EpochDisk {
            epoch,
            writes: batch,
        }));
        disk_records += 1;
    }
    out.push(Message::EpochEnd(EpochEnd {
        epoch,
        chunks,
        disk_records,
        dirty_pages,
        digest,
        state,
    }));
    out
}

/// The initial synchronisation of `image` as messages: [`SyncBegin`],
/// batches of pages (zero pages elided to a marker, others lz4-compressed
/// when that saves space), [`super::protocol::SyncEnd`].
pub fn sync_messages(run_id: u64, image: &dyn PageView, config: Vec<u8>) -> Vec<Message> {
    use super::protocol::{SyncEnd, SyncPages};
    let frames = image.frame_count();
    let mut out = vec![Message::SyncBegin(SyncBegin {
        run_id,
        mem_size: u64::from(frames) * PAGE_SIZE as u64,
        config,
    })];
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    for f in 0..frames {
        let page = image.page(f);
        let data = if page.iter().all(|&b| b == 0) {
            PageData::Zero
        } else {
            let c = lz4_flex::block::compress(page);
            if c.len() < PAGE_SIZE {
                PageData::Lz4(c)
            } else {
                PageData::Raw(page.to_vec())
            }
        };
        bytes += match &data {
            PageData::Zero => 9,
            PageData::Raw(b) | PageData::Lz4(b) => b.len() + 13,
        };
        batch.push((u64::from(f), data));
        if bytes > MAX_PAYLOAD / 2 {
            out.push(Message::SyncPages(SyncPages {
                pages: std::mem::take(&mut batch),
            }));
            bytes = 0;
        }
    }
    if !batch.is_empty() {
        out.push(Message::SyncPages(SyncPages { pages: batch }));
    }
    out.push(Message::SyncEnd(SyncEnd {
        pages: u64::from(frames),
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::{CodecSpec, EpochEncoder};

    const FRAMES: u32 = 64;

    fn primary_image(seed: u8) -> Image {
        let mut img = Image::zeroed(FRAMES);
        for f in 1..FRAMES {
            if f % 5 == 0 {
                continue;
            }
            let p = img.page_mut(f);
            for (i, b) in p.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(f as u8).wrapping_add(seed);
            }
        }
        img
    }

    /// A primary: an image, an encoder, an epoch counter.
    struct Primary {
        img: Image,
        enc: Box<dyn EpochEncoder>,
        epoch: u64,
    }

    impl Primary {
        fn new(spec: &str) -> (Self, BackupImage) {
            let img = primary_image(1);
            let mut enc = spec.parse::<CodecSpec>().unwrap().build(1);
            enc.init(&img);
            let mut backup = BackupImage::new(100);
            for m in sync_messages(42, &img, b"config".to_vec()) {
                assert!(backup.handle(m).unwrap().is_none());
            }
            assert!(!backup.can_fail_over());
            (Primary { img, enc, epoch: 0 }, backup)
        }

        /// Dirties some frames, encodes, returns the epoch's messages.
        fn epoch(&mut self, touch: &[u32], zero: &[u32]) -> Vec<Message> {
            self.epoch += 1;
            for &f in touch {
                let p = self.img.page_mut(f);
                p[(self.epoch as usize * 7) % PAGE_SIZE] ^= 0x5a;
                p[100] = self.epoch as u8;
            }
            for &f in zero {
                self.img.page_mut(f).fill(0);
            }
            let mut out = Vec::new();
            self.enc
                .encode_epoch(&self.img, touch, zero, &mut out)
                .unwrap();
            let digest = digest_epoch(&self.img, touch, zero);
            epoch_messages(
                self.epoch,
                &out,
                vec![(self.epoch, vec![self.epoch as u8; 512])],
                (touch.len() + zero.len()) as u64,
                digest,
                format!("state {}", self.epoch).into_bytes(),
            )
        }
    }

    fn deliver(backup: &mut BackupImage, msgs: Vec<Message>) -> Result<VerifiedEpoch, ApplyError> {
        let mut verified = None;
        for m in msgs {
            if let Some(v) = backup.handle(m)? {
                verified = Some(v);
            }
        }
        Ok(verified.expect("EpochEnd was delivered"))
    }

    fn same(a: &Image, b: &Image) -> bool {
        (0..FRAMES).all(|f| a.page(f) == b.page(f))
    }

    #[test]
    fn sync_then_epochs_reproduce_the_primary_image() {
        for spec in ["similarity", "xbzrle", "zstd", "raw"] {
            let (mut p, mut b) = Primary::new(spec);
            assert!(same(&p.img, b.image()));
            for round in 0..5u32 {
                let touch: Vec<u32> = (1..FRAMES).filter(|f| (f + round) % 3 == 0).collect();
                let msgs = p.epoch(&touch, &[]);
                let v = deliver(&mut b, msgs).unwrap();
                assert_eq!(v.disk_writes.len(), 1);
                b.commit(v);
                assert_eq!(b.committed_epoch(), Some(p.epoch));
                assert!(same(&p.img, b.image()), "{spec} round {round}");
                assert_eq!(b.state(), format!("state {}", p.epoch).as_bytes());
            }
            assert!(b.can_fail_over());
        }
    }

    #[test]
    fn dropped_and_empty_epochs_apply() {
        let (mut p, mut b) = Primary::new("similarity");
        let v = deliver(&mut b, p.epoch(&[3], &[4, 6])).unwrap();
        b.commit(v);
        assert!(same(&p.img, b.image()));
        let v = deliver(&mut b, p.epoch(&[], &[])).unwrap();
        assert_eq!(v.pages, 0);
        b.commit(v);
        assert_eq!(b.committed_epoch(), Some(2));
    }

    /// Commits one good epoch, then feeds `msgs` (a damaged epoch 2) and
    /// checks that it is refused and nothing committed changed.
    fn refused(damage: impl FnOnce(&mut Vec<Message>), expect: impl Fn(&ApplyError) -> bool) {
        let (mut p, mut b) = Primary::new("similarity");
        let v = deliver(&mut b, p.epoch(&[1, 2, 3], &[])).unwrap();
        b.commit(v);
        let before = b.image().clone();
        let mut msgs = p.epoch(&[2, 7, 9], &[]);
        damage(&mut msgs);
        let mut err = None;
        for m in msgs {
            if let Err(e) = b.handle(m) {
                err = Some(e);
                break;
            }
        }
        let err = err.expect("the damaged epoch must be refused");
        assert!(expect(&err), "unexpected error {err:?}");
        assert_eq!(b.committed_epoch(), Some(1));
        assert_eq!(b.state(), b"state 1");
        assert!(same(&before, b.image()));
    }

    fn stream_of(msgs: &mut [Message]) -> &mut Vec<u8> {
        match &mut msgs[0] {
            Message::EpochData(d) => &mut d.data,
            _ => panic!("first message is data"),
        }
    }

    fn end_of(msgs: &mut [Message]) -> &mut EpochEnd {
        match msgs.last_mut() {
            Some(Message::EpochEnd(e)) => e,
            _ => panic!("last message is EpochEnd"),
        }
    }

    #[test]
    fn a_corrupted_stream_is_refused_and_nothing_changes() {
        refused(
            |m| {
                let s = stream_of(m);
                let n = s.len();
                s[n / 2] ^= 0xff;
                s[n - 1] ^= 0x01;
            },
            |e| matches!(e, ApplyError::Decode { .. } | ApplyError::Verify { .. }),
        );
    }

    #[test]
    fn a_truncated_stream_is_refused() {
        refused(
            |m| {
                let s = stream_of(m);
                s.truncate(s.len() - 3);
            },
            |e| matches!(e, ApplyError::Decode { .. } | ApplyError::Verify { .. }),
        );
    }

    #[test]
    fn a_wrong_digest_or_page_count_is_refused() {
        refused(
            |m| end_of(m).digest[0] ^= 1,
            |e| {
                matches!(
                    e,
                    ApplyError::Verify {
                        what: "page digest",
                        ..
                    }
                )
            },
        );
        refused(
            |m| end_of(m).dirty_pages += 1,
            |e| {
                matches!(
                    e,
                    ApplyError::Verify {
                        what: "page count",
                        ..
                    }
                )
            },
        );
    }

    #[test]
    fn missing_or_extra_records_are_refused() {
        refused(
            |m| {
                m.remove(0);
            },
            |e| {
                matches!(
                    e,
                    ApplyError::Verify {
                        what: "record count",
                        ..
                    }
                )
            },
        );
        refused(
            |m| end_of(m).disk_records = 0,
            |e| {
                matches!(
                    e,
                    ApplyError::Verify {
                        what: "record count",
                        ..
                    }
                )
            },
        );
    }

    #[test]
    fn replayed_and_skipped_epochs_are_refused() {
        refused(
            |m| {
                for msg in m.iter_mut() {
                    match msg {
                        Message::EpochData(d) => d.epoch = 1,
                        Message::EpochDisk(d) => d.epoch = 1,
                        Message::EpochEnd(e) => e.epoch = 1,
                        _ => {}
                    }
                }
            },
            |e| matches!(e, ApplyError::Sequence { got: 1, .. }),
        );
        refused(
            |m| {
                for msg in m.iter_mut() {
                    match msg {
                        Message::EpochData(d) => d.epoch = 5,
                        Message::EpochDisk(d) => d.epoch = 5,
                        Message::EpochEnd(e) => e.epoch = 5,
                        _ => {}
                    }
                }
            },
            |e| matches!(e, ApplyError::Sequence { got: 5, .. }),
        );
    }

    #[test]
    fn disk_writes_outside_the_disk_are_refused() {
        refused(
            |m| {
                for msg in m.iter_mut() {
                    if let Message::EpochDisk(d) = msg {
                        d.writes[0].0 = 99;
                        d.writes[0].1 = vec![0; 1024];
                    }
                }
            },
            |e| matches!(e, ApplyError::Bounds(_)),
        );
    }

    #[test]
    fn epochs_before_sync_and_bad_sync_pages_are_refused() {
        let mut b = BackupImage::new(0);
        let err = b
            .handle(Message::EpochEnd(EpochEnd {
                epoch: 1,
                chunks: 0,
                disk_records: 0,
                dirty_pages: 0,
                digest: [0; DIGEST_LEN],
                state: vec![],
            }))
            .unwrap_err();
        assert!(matches!(err, ApplyError::Unexpected { .. }));
        b.handle(Message::SyncBegin(SyncBegin {
            run_id: 1,
            mem_size: 8192,
            config: vec![],
        }))
        .unwrap();
        let bad = Message::SyncPages(super::super::protocol::SyncPages {
            pages: vec![(2, PageData::Zero)],
        });
        assert!(matches!(b.handle(bad), Err(ApplyError::Bounds(_))));
        let bad = Message::SyncPages(super::super::protocol::SyncPages {
            pages: vec![(1, PageData::Lz4(vec![0xff; 10]))],
        });
        assert!(matches!(b.handle(bad), Err(ApplyError::Bounds(_))));
        assert!(b
            .handle(Message::SyncBegin(SyncBegin {
                run_id: 1,
                mem_size: MAX_MEM_SIZE + 4096,
                config: vec![],
            }))
            .is_err());
    }
}
