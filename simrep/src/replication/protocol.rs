//! The replication wire protocol between a primary and its backup: the
//! handshake, the authenticated and encrypted record layer, and the
//! messages. Pure: no I/O, no unsafe, no dependency on the VMM; the async
//! transport lives elsewhere and feeds bytes in and out of these types.
//!
//! # Connection
//!
//! The primary connects to the backup over TCP. Both hold the same
//! pre-shared key (`--key-file`, at least [`MIN_KEY_LEN`] bytes).
//!
//! ```text
//!  primary                                        backup
//!     | -- ClientHello {version, nonce_p} ----------> |
//!     | <--------- ServerHello {version, nonce_b, proof_b} |  proof_b = HMAC(K, "server" | nonce_p | nonce_b)
//!     |   (primary checks proof_b: the backup knows K) |
//!     | -- ClientAuth {proof_p} ---------------------> |  proof_p = HMAC(K, "client" | nonce_p | nonce_b)
//!     |                (backup checks proof_p)         |
//!     |   == records, AES-256-GCM, both directions ==  |
//!     | <----------------------- Welcome {committed}  |
//!     | -- SyncBegin / SyncPages* / SyncEnd ---------> |  (when the backup has no image)
//!     | -- EpochData* / EpochDisk* / EpochEnd -------> |  every epoch
//!     | <------------------------------- Ack {epoch}   |  after the backup committed
//!     | <-> Heartbeat (both ways, when idle)           |
//! ```
//!
//! The three handshake messages are cleartext and fixed-size
//! ([`HELLO_LEN`], [`SERVER_HELLO_LEN`], [`AUTH_LEN`]). Fresh random nonces
//! on both sides make every session's keys and proofs new, so a recorded
//! handshake cannot be replayed. A backup that speaks another protocol
//! version answers with its version and status [`HELLO_VERSION_MISMATCH`]
//! and closes; a wrong key fails the proof check on whichever side checks
//! first, and that side closes the connection.
//!
//! # Records
//!
//! After the handshake every message travels in a record:
//!
//! | field | size | content |
//! |-------|------|---------|
//! | `len` | 4    | bytes that follow, little-endian, at most [`MAX_RECORD`] |
//! | body  | len  | AES-256-GCM ciphertext of `type (1) | payload`, then the 16-byte tag |
//!
//! The key of each direction is HKDF-SHA256 of the pre-shared key, salted
//! with both nonces; the GCM nonce is the direction and a per-direction
//! record counter that both sides keep, and the length prefix is
//! authenticated data. A record that was altered, truncated, dropped,
//! replayed, reordered or injected therefore fails to open, and the
//! receiver drops the connection without acting on it.
//!
//! Encryption is on because guest memory is the payload: it holds whatever
//! the guest's service holds. AES-GCM runs at several GB/s per core with
//! AES-NI, well above what a replication link carries after the codec.
//!
//! # Epochs
//!
//! The epoch's codec stream (the output of
//! [`crate::compress::EpochEncoder::encode_epoch`]) is cut into [`EpochData`]
//! records; block writes of the epoch travel in [`EpochDisk`] records; the
//! epoch closes with [`EpochEnd`], carrying the saved vCPU/VM/device state,
//! the number of dirty pages and a 128-bit digest (XXH3) of the epoch's
//! dirty pages as the primary saw them. The records are already
//! authenticated; the digest checks the *decoder's result* (the codec's
//! block fingerprints are probabilistic, and a bug must not go unnoticed),
//! so a fast non-cryptographic hash is enough: it runs at memory speed. The backup decodes against its committed image
//! into a staging area, checks the page count and the digest, and only then
//! commits and sends [`Message::Ack`]. An epoch that fails any check is
//! never applied: the backup answers [`Message::Reject`] and closes.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u16 = 1;
/// First bytes of both hello messages.
pub const MAGIC: [u8; 8] = *b"SIMREPv1";
/// Shortest accepted pre-shared key.
pub const MIN_KEY_LEN: usize = 16;
/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a handshake proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;
/// Bytes of [`ClientHello`] on the wire.
pub const HELLO_LEN: usize = 8 + 2 + 6 + NONCE_LEN;
/// Bytes of [`ServerHello`] on the wire.
pub const SERVER_HELLO_LEN: usize = 8 + 2 + 1 + 5 + NONCE_LEN + PROOF_LEN;
/// Bytes of the client's proof on the wire.
pub const AUTH_LEN: usize = PROOF_LEN;
/// Largest record body (ciphertext and tag) accepted.
pub const MAX_RECORD: usize = 16 << 20;
/// Largest payload a sender puts in one record; larger data is chunked.
pub const MAX_PAYLOAD: usize = MAX_RECORD - 1024;
/// Bytes of the GCM tag at the end of each record.
pub const TAG_LEN: usize = 16;
/// Bytes of a page.
pub const PAGE_SIZE: usize = 4096;
/// Bytes of a disk sector.
pub const SECTOR_SIZE: usize = 512;

/// [`ServerHello::status`]: the versions match and the proof follows.
pub const HELLO_OK: u8 = 0;
/// [`ServerHello::status`]: the backup speaks another version.
pub const HELLO_VERSION_MISMATCH: u8 = 1;
/// [`ServerHello::status`]: the backup already serves a primary.
pub const HELLO_BUSY: u8 = 2;

/// Errors of the protocol layer. Every one ends the connection; none
/// touches the backup's committed state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The key file holds too few bytes.
    #[error("the pre-shared key has {len} bytes; at least {MIN_KEY_LEN} are needed (e.g. `head -c 32 /dev/urandom > key`)")]
    ShortKey {
        /// Bytes found.
        len: usize,
    },
    /// A handshake message did not start with [`MAGIC`].
    #[error("the peer is not a simrep replication endpoint (bad magic)")]
    BadMagic,
    /// The peers speak different versions.
    #[error("protocol version mismatch: this side speaks v{ours}, the peer v{theirs}")]
    VersionMismatch {
        /// This build's version.
        ours: u16,
        /// The peer's.
        theirs: u16,
    },
    /// The backup is busy with another primary.
    #[error("the backup already serves another primary")]
    Busy,
    /// The server answered a status this side does not know.
    #[error("unknown handshake status {0}")]
    BadStatus(u8),
    /// A handshake proof was wrong: the peer has another key, or someone
    /// in the middle tampered with the handshake.
    #[error("authentication failed: the {peer} does not hold the same pre-shared key")]
    AuthFailed {
        /// "backup" or "primary".
        peer: &'static str,
    },
    /// A record announced a length over [`MAX_RECORD`] or under the tag.
    #[error("record length {len} is outside 17..={MAX_RECORD}")]
    BadRecordLength {
        /// The announced length.
        len: usize,
    },
    /// A record did not authenticate.
    #[error(
        "record {seq} failed authentication (corrupted, truncated, replayed, reordered or forged)"
    )]
    RecordAuth {
        /// Its position in the stream.
        seq: u64,
    },
    /// A record's type is unknown.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// A message's payload is malformed.
    #[error("malformed {what} message: {why}")]
    Malformed {
        /// The message type.
        what: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// The system's random source failed.
    #[error("no randomness for the handshake nonce: {0}")]
    Random(String),
    /// Too many records in one direction (the counter would wrap).
    #[error("record counter exhausted; reconnect")]
    CounterExhausted,
}

/// The pre-shared key.
#[derive(Clone)]
pub struct PreSharedKey(Vec<u8>);

impl std::fmt::Debug for PreSharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreSharedKey({} bytes)", self.0.len())
    }
}

impl PreSharedKey {
    /// The key from a key file's content. A trailing newline is ignored,
    /// so `echo secret-of-sixteen+ > key` works as well as random bytes.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::ShortKey`].
    pub fn new(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let trimmed = bytes
            .strip_suffix(b"\n")
            .map(|b| b.strip_suffix(b"\r").unwrap_or(b))
            .unwrap_or(bytes);
        if trimmed.len() < MIN_KEY_LEN {
            return Err(ProtocolError::ShortKey { len: trimmed.len() });
        }
        Ok(PreSharedKey(trimmed.to_vec()))
    }

    fn hmac(&self, label: &[u8], a: &[u8], b: &[u8]) -> [u8; 32] {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(label);
        mac.update(a);
        mac.update(b);
        mac.finalize().into_bytes().into()
    }

    fn direction_key(&self, salt: &[u8], info: &[u8]) -> [u8; 32] {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(salt), &self.0);
        let mut key = [0u8; 32];
        hk.expand(info, &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        key
    }
}

/// A fresh random nonce.
///
/// # Errors
///
/// [`ProtocolError::Random`].
pub fn random_nonce() -> Result<[u8; NONCE_LEN], ProtocolError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| ProtocolError::Random(e.to_string()))?;
    Ok(n)
}

/// The primary's first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello {
    /// Its protocol version.
    pub version: u16,
    /// Its nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl ClientHello {
    /// Wire form.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[16..].copy_from_slice(&self.nonce);
        b
    }

    /// Parses the wire form.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::BadMagic`].
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, ProtocolError> {
        if b[..8] != MAGIC {
            return Err(ProtocolError::BadMagic);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[16..]);
        Ok(ClientHello {
            version: u16::from_le_bytes([b[8], b[9]]),
            nonce,
        })
    }
}

/// The backup's answer to [`ClientHello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerHello {
    /// Its protocol version.
    pub version: u16,
    /// [`HELLO_OK`], [`HELLO_VERSION_MISMATCH`] or [`HELLO_BUSY`].
    pub status: u8,
    /// Its nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Its proof of the key (zero unless the status is OK).
    pub proof: [u8; PROOF_LEN],
}

impl ServerHello {
    /// Wire form.
    pub fn encode(&self) -> [u8; SERVER_HELLO_LEN] {
        let mut b = [0u8; SERVER_HELLO_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10] = self.status;
        b[16..16 + NONCE_LEN].copy_from_slice(&self.nonce);
        b[16 + NONCE_LEN..].copy_from_slice(&self.proof);
        b
    }

    /// Parses the wire form.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::BadMagic`].
    pub fn decode(b: &[u8; SERVER_HELLO_LEN]) -> Result<Self, ProtocolError> {
        if b[..8] != MAGIC {
            return Err(ProtocolError::BadMagic);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[16..16 + NONCE_LEN]);
        let mut proof = [0u8; PROOF_LEN];
        proof.copy_from_slice(&b[16 + NONCE_LEN..]);
        Ok(ServerHello {
            version: u16::from_le_bytes([b[8], b[9]]),
            status: b[10],
            nonce,
            proof,
        })
    }
}

const SERVER_PROOF: &[u8] = b"simrep v1 backup proof";
const CLIENT_PROOF: &[u8] = b"simrep v1 primary proof";
const P2B: &[u8] = b"simrep v1 primary to backup";
const B2P: &[u8] = b"simrep v1 backup to primary";

/// Constant-time equality of two proofs.
fn proofs_equal(a: &[u8; PROOF_LEN], b: &[u8; PROOF_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The primary's side of the handshake.
#[derive(Debug)]
pub struct ClientHandshake {
    key: PreSharedKey,
    nonce: [u8; NONCE_LEN],
}

impl ClientHandshake {
    /// Starts a handshake with a fresh nonce; send the returned hello.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::Random`].
    pub fn start(key: PreSharedKey) -> Result<(Self, ClientHello), ProtocolError> {
        Self::with_nonce(key, random_nonce()?)
    }

    /// [`Self::start`] with a given nonce (tests).
    ///
    /// # Errors
    ///
    /// None today.
    pub fn with_nonce(
        key: PreSharedKey,
        nonce: [u8; NONCE_LEN],
    ) -> Result<(Self, ClientHello), ProtocolError> {
        let hello = ClientHello {
            version: PROTOCOL_VERSION,
            nonce,
        };
        Ok((ClientHandshake { key, nonce }, hello))
    }

    /// Checks the backup's answer; returns the proof to send and the
    /// session (the primary seals with primary-to-backup keys).
    ///
    /// # Errors
    ///
    /// Version mismatch, busy, unknown status, or a wrong backup proof.
    pub fn finish(self, server: &ServerHello) -> Result<([u8; AUTH_LEN], Session), ProtocolError> {
        match server.status {
            HELLO_OK if server.version == PROTOCOL_VERSION => {}
            HELLO_OK | HELLO_VERSION_MISMATCH => {
                return Err(ProtocolError::VersionMismatch {
                    ours: PROTOCOL_VERSION,
                    theirs: server.version,
                })
            }
            HELLO_BUSY => return Err(ProtocolError::Busy),
            s => return Err(ProtocolError::BadStatus(s)),
        }
        let expect = self.key.hmac(SERVER_PROOF, &self.nonce, &server.nonce);
        if !proofs_equal(&expect, &server.proof) {
            return Err(ProtocolError::AuthFailed { peer: "backup" });
        }
        let proof = self.key.hmac(CLIENT_PROOF, &self.nonce, &server.nonce);
        let session = Session::new(&self.key, &self.nonce, &server.nonce, true);
        Ok((proof, session))
    }
}

/// The backup's side of the handshake.
#[derive(Debug)]
pub struct ServerHandshake {
    key: PreSharedKey,
    client_nonce: [u8; NONCE_LEN],
    nonce: [u8; NONCE_LEN],
}

impl ServerHandshake {
    /// Answers a primary's hello with a fresh nonce. On a version mismatch
    /// the returned hello says so and the error tells the caller to close
    /// after sending it.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::VersionMismatch`] (send the hello, then close);
    /// [`ProtocolError::Random`].
    pub fn accept(
        key: PreSharedKey,
        hello: &ClientHello,
    ) -> Result<(Self, ServerHello), (ProtocolError, Option<ServerHello>)> {
        let nonce = random_nonce().map_err(|e| (e, None))?;
        Self::accept_with_nonce(key, hello, nonce)
    }

    /// [`Self::accept`] with a given nonce (tests).
    ///
    /// # Errors
    ///
    /// As [`Self::accept`].
    pub fn accept_with_nonce(
        key: PreSharedKey,
        hello: &ClientHello,
        nonce: [u8; NONCE_LEN],
    ) -> Result<(Self, ServerHello), (ProtocolError, Option<ServerHello>)> {
        if hello.version != PROTOCOL_VERSION {
            let reply = ServerHello {
                version: PROTOCOL_VERSION,
                status: HELLO_VERSION_MISMATCH,
                nonce,
                proof: [0; PROOF_LEN],
            };
            return Err((
                ProtocolError::VersionMismatch {
                    ours: PROTOCOL_VERSION,
                    theirs: hello.version,
                },
                Some(reply),
            ));
        }
        let proof = key.hmac(SERVER_PROOF, &hello.nonce, &nonce);
        let reply = ServerHello {
            version: PROTOCOL_VERSION,
            status: HELLO_OK,
            nonce,
            proof,
        };
        Ok((
            ServerHandshake {
                key,
                client_nonce: hello.nonce,
                nonce,
            },
            reply,
        ))
    }

    /// The hello a busy backup sends before closing.
    pub fn busy() -> ServerHello {
        ServerHello {
            version: PROTOCOL_VERSION,
            status: HELLO_BUSY,
            nonce: [0; NONCE_LEN],
            proof: [0; PROOF_LEN],
        }
    }

    /// Checks the primary's proof; returns the session (the backup seals
    /// with backup-to-primary keys).
    ///
    /// # Errors
    ///
    /// [`ProtocolError::AuthFailed`].
    pub fn finish(self, proof: &[u8; AUTH_LEN]) -> Result<Session, ProtocolError> {
        let expect = self.key.hmac(CLIENT_PROOF, &self.client_nonce, &self.nonce);
        if !proofs_equal(&expect, proof) {
            return Err(ProtocolError::AuthFailed { peer: "primary" });
        }
        Ok(Session::new(
            &self.key,
            &self.client_nonce,
            &self.nonce,
            false,
        ))
    }
}

/// One direction of the record layer.
struct Direction {
    cipher: Aes256Gcm,
    id: u32,
    seq: u64,
}

impl Direction {
    fn nonce(&self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.id.to_be_bytes());
        n[4..].copy_from_slice(&self.seq.to_be_bytes());
        n
    }
}

/// An established session: seals outgoing records and opens incoming ones.
pub struct Session {
    send: Direction,
    recv: Direction,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("sent", &self.send.seq)
            .field("received", &self.recv.seq)
            .finish()
    }
}

impl Session {
    fn new(
        key: &PreSharedKey,
        client_nonce: &[u8; NONCE_LEN],
        server_nonce: &[u8; NONCE_LEN],
        is_primary: bool,
    ) -> Self {
        let mut salt = [0u8; 2 * NONCE_LEN];
        salt[..NONCE_LEN].copy_from_slice(client_nonce);
        salt[NONCE_LEN..].copy_from_slice(server_nonce);
        let p2b = Direction {
            cipher: Aes256Gcm::new(&key.direction_key(&salt, P2B).into()),
            id: 1,
            seq: 0,
        };
        let b2p = Direction {
            cipher: Aes256Gcm::new(&key.direction_key(&salt, B2P).into()),
            id: 2,
            seq: 0,
        };
        if is_primary {
            Session {
                send: p2b,
                recv: b2p,
            }
        } else {
            Session {
                send: b2p,
                recv: p2b,
            }
        }
    }

    /// Splits the session into its sending and receiving halves, for a
    /// writer task and a reader task.
    pub fn split(self) -> (Sealer, Opener) {
        (Sealer(self.send), Opener(self.recv))
    }

    /// Records sent so far.
    pub fn sent(&self) -> u64 {
        self.send.seq
    }

    /// Records received so far.
    pub fn received(&self) -> u64 {
        self.recv.seq
    }

    /// Seals `msg` into a complete record (length prefix included),
    /// appended to `out`.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::CounterExhausted`]; a message too large for one
    /// record is [`ProtocolError::BadRecordLength`] (chunk it first).
    pub fn seal(&mut self, msg: &Message, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        seal(&mut self.send, msg, out)
    }

    /// Checks a record's length prefix; returns the body length to read.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::BadRecordLength`].
    pub fn body_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
        body_len(prefix)
    }

    /// Opens the next record, given its prefix and body, and decodes the
    /// message.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::BadRecordLength`], [`ProtocolError::RecordAuth`]
    /// or a decoding error. After any error the session must be dropped.
    pub fn open(&mut self, prefix: [u8; 4], body: &[u8]) -> Result<Message, ProtocolError> {
        open(&mut self.recv, prefix, body)
    }
}

/// The sending half of a [`Session`].
pub struct Sealer(Direction);

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({} sent)", self.0.seq)
    }
}

impl Sealer {
    /// As [`Session::seal`].
    ///
    /// # Errors
    ///
    /// As [`Session::seal`].
    pub fn seal(&mut self, msg: &Message, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        seal(&mut self.0, msg, out)
    }
}

/// The receiving half of a [`Session`].
pub struct Opener(Direction);

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opener({} received)", self.0.seq)
    }
}

impl Opener {
    /// As [`Session::open`].
    ///
    /// # Errors
    ///
    /// As [`Session::open`].
    pub fn open(&mut self, prefix: [u8; 4], body: &[u8]) -> Result<Message, ProtocolError> {
        open(&mut self.0, prefix, body)
    }
}

fn seal(send: &mut Direction, msg: &Message, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let mut plain = Vec::with_capacity(msg.encoded_len_hint());
    msg.encode(&mut plain);
    let len = plain.len() + TAG_LEN;
    if len > MAX_RECORD {
        return Err(ProtocolError::BadRecordLength { len });
    }
    if send.seq == u64::MAX {
        return Err(ProtocolError::CounterExhausted);
    }
    let prefix = (len as u32).to_le_bytes();
    let nonce = send.nonce();
    let sealed = send
        .cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plain,
                aad: &prefix,
            },
        )
        .map_err(|_| ProtocolError::BadRecordLength { len })?;
    send.seq += 1;
    out.extend_from_slice(&prefix);
    out.extend_from_slice(&sealed);
    Ok(())
}

/// Checks a record's length prefix; returns the body length to read.
///
/// # Errors
///
/// [`ProtocolError::BadRecordLength`].
pub fn body_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if !(TAG_LEN + 1..=MAX_RECORD).contains(&len) {
        return Err(ProtocolError::BadRecordLength { len });
    }
    Ok(len)
}

fn open(recv: &mut Direction, prefix: [u8; 4], body: &[u8]) -> Result<Message, ProtocolError> {
    let len = body_len(prefix)?;
    if body.len() != len {
        return Err(ProtocolError::BadRecordLength { len: body.len() });
    }
    let nonce = recv.nonce();
    let plain = recv
        .cipher
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: body,
                aad: &prefix,
            },
        )
        .map_err(|_| ProtocolError::RecordAuth { seq: recv.seq })?;
    recv.seq += 1;
    Message::decode(&plain)
}

/// What the backup holds when a primary connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The last committed epoch, if the backup has an image.
    pub committed_epoch: Option<u64>,
    /// Guest memory size of that image (0 without one).
    pub mem_size: u64,
    /// Identity of the run that image belongs to (0 without one).
    pub run_id: u64,
}

/// Start of a full synchronisation: the backup drops any staged image and
/// prepares one of `mem_size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncBegin {
    /// Identity of the primary's run (random; epochs refer to it).
    pub run_id: u64,
    /// Guest memory bytes (a multiple of [`PAGE_SIZE`]).
    pub mem_size: u64,
    /// The VM's configuration (opaque to the protocol: the VMM's own
    /// serialisation), so the backup can build the same VM.
    pub config: Vec<u8>,
}

/// How a page travels in [`SyncPages`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageData {
    /// All zero.
    Zero,
    /// The page as is.
    Raw(Vec<u8>),
    /// lz4 block of the page.
    Lz4(Vec<u8>),
}

/// A batch of whole pages of the initial synchronisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPages {
    /// (guest frame number, content).
    pub pages: Vec<(u64, PageData)>,
}

/// End of the initial copy. Epochs follow; the first one carries every
/// page dirtied while the copy ran, and only its commit makes the image a
/// checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncEnd {
    /// Pages sent in [`SyncPages`] records.
    pub pages: u64,
}

/// A piece of an epoch's codec stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochData {
    /// The epoch.
    pub epoch: u64,
    /// Index of this chunk in the epoch (0, 1, ...).
    pub chunk: u32,
    /// Codec stream bytes.
    pub data: Vec<u8>,
}

/// Block writes of an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochDisk {
    /// The epoch.
    pub epoch: u64,
    /// (first sector, data: a whole number of [`SECTOR_SIZE`] sectors).
    pub writes: Vec<(u64, Vec<u8>)>,
}

/// Closes an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochEnd {
    /// The epoch.
    pub epoch: u64,
    /// [`EpochData`] chunks sent for it.
    pub chunks: u32,
    /// [`EpochDisk`] records sent for it.
    pub disk_records: u32,
    /// Dirty pages in the epoch.
    pub dirty_pages: u64,
    /// [`PageDigest`] of every page of the epoch (dirty and dropped), in
    /// gfn order, as the primary saw them at the checkpoint.
    pub digest: [u8; DIGEST_LEN],
    /// Saved vCPU, VM and device state (the VMM's serialisation).
    pub state: Vec<u8>,
}

/// A replication message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Backup to primary, first record of a session.
    Welcome(Welcome),
    /// Primary to backup.
    SyncBegin(SyncBegin),
    /// Primary to backup.
    SyncPages(SyncPages),
    /// Primary to backup.
    SyncEnd(SyncEnd),
    /// Primary to backup.
    EpochData(EpochData),
    /// Primary to backup.
    EpochDisk(EpochDisk),
    /// Primary to backup.
    EpochEnd(EpochEnd),
    /// Backup to primary: this epoch is committed.
    Ack {
        /// The epoch.
        epoch: u64,
    },
    /// Backup to primary: this epoch failed a check and was not applied;
    /// the connection closes after it.
    Reject {
        /// The epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// Either way, when nothing else was sent for a while.
    Heartbeat {
        /// The sender's latest epoch (sent or committed).
        epoch: u64,
        /// The sender's monotonic clock in ns.
        time_ns: u64,
    },
    /// Either way: the sender closes on purpose.
    Goodbye {
        /// Why.
        reason: String,
    },
}

mod tag {
    pub const WELCOME: u8 = 1;
    pub const SYNC_BEGIN: u8 = 2;
    pub const SYNC_PAGES: u8 = 3;
    pub const SYNC_END: u8 = 4;
    pub const EPOCH_DATA: u8 = 5;
    pub const EPOCH_DISK: u8 = 6;
    pub const EPOCH_END: u8 = 7;
    pub const ACK: u8 = 8;
    pub const REJECT: u8 = 9;
    pub const HEARTBEAT: u8 = 10;
    pub const GOODBYE: u8 = 11;
}

/// Longest text in a [`Message::Reject`] or [`Message::Goodbye`].
pub const MAX_REASON: usize = 1024;

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// A cursor over a message payload with typed, bounded reads.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, why: &'static str) -> ProtocolError {
        ProtocolError::Malformed {
            what: self.what,
            why,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.b.len() < n {
            return Err(self.err("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn bytes(&mut self, max: usize) -> Result<Vec<u8>, ProtocolError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(self.err("length over its limit"));
        }
        Ok(self.take(n)?.to_vec())
    }

    fn text(&mut self) -> Result<String, ProtocolError> {
        let b = self.bytes(MAX_REASON)?;
        String::from_utf8(b).map_err(|_| self.err("text is not UTF-8"))
    }

    fn end(&self) -> Result<(), ProtocolError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.err("trailing bytes"))
        }
    }
}

impl Message {
    fn encoded_len_hint(&self) -> usize {
        match self {
            Message::EpochData(d) => d.data.len() + 32,
            Message::SyncPages(p) => p.pages.len() * (PAGE_SIZE + 16) + 8,
            Message::EpochEnd(e) => e.state.len() + 96,
            Message::EpochDisk(d) => d.writes.iter().map(|w| w.1.len() + 16).sum::<usize>() + 16,
            _ => 64,
        }
    }

    /// The message's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Welcome(_) => "Welcome",
            Message::SyncBegin(_) => "SyncBegin",
            Message::SyncPages(_) => "SyncPages",
            Message::SyncEnd(_) => "SyncEnd",
            Message::EpochData(_) => "EpochData",
            Message::EpochDisk(_) => "EpochDisk",
            Message::EpochEnd(_) => "EpochEnd",
            Message::Ack { .. } => "Ack",
            Message::Reject { .. } => "Reject",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::Goodbye { .. } => "Goodbye",
        }
    }

    /// Appends the plaintext form (type byte, then payload) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::Welcome(w) => {
                out.push(tag::WELCOME);
                out.push(u8::from(w.committed_epoch.is_some()));
                out.extend_from_slice(&w.committed_epoch.unwrap_or(0).to_le_bytes());
                out.extend_from_slice(&w.mem_size.to_le_bytes());
                out.extend_from_slice(&w.run_id.to_le_bytes());
            }
            Message::SyncBegin(s) => {
                out.push(tag::SYNC_BEGIN);
                out.extend_from_slice(&s.run_id.to_le_bytes());
                out.extend_from_slice(&s.mem_size.to_le_bytes());
                put_bytes(out, &s.config);
            }
            Message::SyncPages(p) => {
                out.push(tag::SYNC_PAGES);
                out.extend_from_slice(&(p.pages.len() as u32).to_le_bytes());
                for (gfn, data) in &p.pages {
                    out.extend_from_slice(&gfn.to_le_bytes());
                    match data {
                        PageData::Zero => out.push(0),
                        PageData::Raw(b) => {
                            out.push(1);
                            put_bytes(out, b);
                        }
                        PageData::Lz4(b) => {
                            out.push(2);
                            put_bytes(out, b);
                        }
                    }
                }
            }
            Message::SyncEnd(s) => {
                out.push(tag::SYNC_END);
                out.extend_from_slice(&s.pages.to_le_bytes());
            }
            Message::EpochData(d) => {
                out.push(tag::EPOCH_DATA);
                out.extend_from_slice(&d.epoch.to_le_bytes());
                out.extend_from_slice(&d.chunk.to_le_bytes());
                put_bytes(out, &d.data);
            }
            Message::EpochDisk(d) => {
                out.push(tag::EPOCH_DISK);
                out.extend_from_slice(&d.epoch.to_le_bytes());
                out.extend_from_slice(&(d.writes.len() as u32).to_le_bytes());
                for (sector, data) in &d.writes {
                    out.extend_from_slice(&sector.to_le_bytes());
                    put_bytes(out, data);
                }
            }
            Message::EpochEnd(e) => {
                out.push(tag::EPOCH_END);
                out.extend_from_slice(&e.epoch.to_le_bytes());
                out.extend_from_slice(&e.chunks.to_le_bytes());
                out.extend_from_slice(&e.disk_records.to_le_bytes());
                out.extend_from_slice(&e.dirty_pages.to_le_bytes());
                out.extend_from_slice(&e.digest);
                put_bytes(out, &e.state);
            }
            Message::Ack { epoch } => {
                out.push(tag::ACK);
                out.extend_from_slice(&epoch.to_le_bytes());
            }
            Message::Reject { epoch, reason } => {
                out.push(tag::REJECT);
                out.extend_from_slice(&epoch.to_le_bytes());
                put_bytes(out, truncate_reason(reason).as_bytes());
            }
            Message::Heartbeat { epoch, time_ns } => {
                out.push(tag::HEARTBEAT);
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(&time_ns.to_le_bytes());
            }
            Message::Goodbye { reason } => {
                out.push(tag::GOODBYE);
                put_bytes(out, truncate_reason(reason).as_bytes());
            }
        }
    }

    /// Parses a plaintext message. Every length is bounded; nothing is
    /// allocated beyond the input's size.
    ///
    /// # Errors
    ///
    /// [`ProtocolError::UnknownType`] or [`ProtocolError::Malformed`].
    pub fn decode(b: &[u8]) -> Result<Message, ProtocolError> {
        let (&t, rest) = b.split_first().ok_or(ProtocolError::Malformed {
            what: "record",
            why: "empty",
        })?;
        let what = match t {
            tag::WELCOME => "Welcome",
            tag::SYNC_BEGIN => "SyncBegin",
            tag::SYNC_PAGES => "SyncPages",
            tag::SYNC_END => "SyncEnd",
            tag::EPOCH_DATA => "EpochData",
            tag::EPOCH_DISK => "EpochDisk",
            tag::EPOCH_END => "EpochEnd",
            tag::ACK => "Ack",
            tag::REJECT => "Reject",
            tag::HEARTBEAT => "Heartbeat",
            tag::GOODBYE => "Goodbye",
            t => return Err(ProtocolError::UnknownType(t)),
        };
        let mut r = Reader { b: rest, what };
        let msg = match t {
            tag::WELCOME => {
                let has = r.u8()?;
                let epoch = r.u64()?;
                let committed_epoch = match has {
                    0 if epoch == 0 => None,
                    1 => Some(epoch),
                    _ => return Err(r.err("bad flag")),
                };
                Message::Welcome(Welcome {
                    committed_epoch,
                    mem_size: r.u64()?,
                    run_id: r.u64()?,
                })
            }
            tag::SYNC_BEGIN => {
                let run_id = r.u64()?;
                let mem_size = r.u64()?;
                if mem_size == 0 || mem_size % PAGE_SIZE as u64 != 0 {
                    return Err(r.err("memory size is not a positive number of pages"));
                }
                Message::SyncBegin(SyncBegin {
                    run_id,
                    mem_size,
                    config: r.bytes(MAX_PAYLOAD)?,
                })
            }
            tag::SYNC_PAGES => {
                let n = r.u32()? as usize;
                // Each page takes at least 9 bytes on the wire.
                if n > r.b.len() / 9 {
                    return Err(r.err("page count larger than the record"));
                }
                let mut pages = Vec::with_capacity(n);
                for _ in 0..n {
                    let gfn = r.u64()?;
                    let data = match r.u8()? {
                        0 => PageData::Zero,
                        1 => {
                            let b = r.bytes(PAGE_SIZE)?;
                            if b.len() != PAGE_SIZE {
                                return Err(r.err("raw page is not 4096 bytes"));
                            }
                            PageData::Raw(b)
                        }
                        2 => PageData::Lz4(r.bytes(PAGE_SIZE)?),
                        _ => return Err(r.err("unknown page kind")),
                    };
                    pages.push((gfn, data));
                }
                Message::SyncPages(SyncPages { pages })
            }
            tag::SYNC_END => Message::SyncEnd(SyncEnd { pages: r.u64()? }),
            tag::EPOCH_DATA => Message::EpochData(EpochData {
                epoch: r.u64()?,
                chunk: r.u32()?,
                data: r.bytes(MAX_PAYLOAD)?,
            }),
            tag::EPOCH_DISK => {
                let epoch = r.u64()?;
                let n = r.u32()? as usize;
                if n > r.b.len() / 12 {
                    return Err(r.err("write count larger than the record"));
                }
                let mut writes = Vec::with_capacity(n);
                for _ in 0..n {
                    let sector = r.u64()?;
                    let data = r.bytes(MAX_PAYLOAD)?;
                    if data.is_empty() || data.len() % SECTOR_SIZE != 0 {
                        return Err(r.err("write is not a whole number of sectors"));
                    }
                    writes.push((sector, data));
                }
                Message::EpochDisk(EpochDisk { epoch, writes })
            }
            tag::EPOCH_END => {
                let epoch = r.u64()?;
                let chunks = r.u32()?;
                let disk_records = r.u32()?;
                let dirty_pages = r.u64()?;
                let mut digest = [0u8; DIGEST_LEN];
                digest.copy_from_slice(r.take(DIGEST_LEN)?);
                Message::EpochEnd(EpochEnd {
                    epoch,
                    chunks,
                    disk_records,
                    dirty_pages,
                    digest,
                    state: r.bytes(MAX_PAYLOAD)?,
                })
            }
            tag::ACK => Message::Ack { epoch: r.u64()? },
            tag::REJECT => Message::Reject {
                epoch: r.u64()?,
                reason: r.text()?,
            },
            tag::HEARTBEAT => Message::Heartbeat {
                epoch: r.u64()?,
                time_ns: r.u64()?,
            },
            tag::GOODBYE => Message::Goodbye { reason: r.text()? },
            _ => unreachable!("tags were matched above"),
        };
        r.end()?;
        Ok(msg)
    }
}

fn truncate_reason(s: &str) -> &str {
    if s.len() <= MAX_REASON {
        return s;
    }
    let mut end = MAX_REASON;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Bytes of an epoch digest.
pub const DIGEST_LEN: usize = 16;

/// XXH3-128 over (gfn LE, page) pairs, in the order given: the digest of
/// [`EpochEnd::digest`].
#[derive(Default, Clone)]
pub struct PageDigest(xxhash_rust::xxh3::Xxh3Default);

impl std::fmt::Debug for PageDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageDigest")
    }
}

impl PageDigest {
    /// A digest of no pages yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one page.
    pub fn add(&mut self, gfn: u64, page: &[u8]) {
        self.0.update(&gfn.to_le_bytes());
        self.0.update(page);
    }

    /// The digest.
    pub fn finish(&self) -> [u8; DIGEST_LEN] {
        self.0.digest128().to_le_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(s: &str) -> PreSharedKey {
        PreSharedKey::new(s.as_bytes()).unwrap()
    }

    fn pair(kp: &str, kb: &str) -> Result<(Session, Session), ProtocolError> {
        let (c, hello) = ClientHandshake::with_nonce(key(kp), [1; 32])?;
        let hello = ClientHello::decode(&hello.encode())?;
        let (s, reply) =
            ServerHandshake::accept_with_nonce(key(kb), &hello, [2; 32]).map_err(|e| e.0)?;
        let reply = ServerHello::decode(&reply.encode())?;
        let (proof, primary) = c.finish(&reply)?;
        let backup = s.finish(&proof)?;
        Ok((primary, backup))
    }

    fn split(rec: &[u8]) -> ([u8; 4], &[u8]) {
        (rec[..4].try_into().unwrap(), &rec[4..])
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Welcome(Welcome {
                committed_epoch: Some(9),
                mem_size: 1 << 30,
                run_id: 77,
            }),
            Message::Welcome(Welcome {
                committed_epoch: None,
                mem_size: 0,
                run_id: 0,
            }),
            Message::SyncBegin(SyncBegin {
                run_id: 5,
                mem_size: 8192,
                config: b"cfg".to_vec(),
            }),
            Message::SyncPages(SyncPages {
                pages: vec![
                    (0, PageData::Zero),
                    (1, PageData::Raw(vec![7; PAGE_SIZE])),
                    (2, PageData::Lz4(vec![1, 2, 3])),
                ],
            }),
            Message::SyncEnd(SyncEnd { pages: 3 }),
            Message::EpochData(EpochData {
                epoch: 3,
                chunk: 1,
                data: vec![9; 100],
            }),
            Message::EpochDisk(EpochDisk {
                epoch: 3,
                writes: vec![(8, vec![1; 1024])],
            }),
            Message::EpochEnd(EpochEnd {
                epoch: 3,
                chunks: 2,
                disk_records: 1,
                dirty_pages: 40,
                digest: [4; DIGEST_LEN],
                state: vec![5; 300],
            }),
            Message::Ack { epoch: 3 },
            Message::Reject {
                epoch: 3,
                reason: "digest mismatch".into(),
            },
            Message::Heartbeat {
                epoch: 3,
                time_ns: 123,
            },
            Message::Goodbye {
                reason: "bye".into(),
            },
        ]
    }

    #[test]
    fn handshake_and_records_round_trip_both_ways() {
        let (mut p, mut b) = pair("0123456789abcdef!", "0123456789abcdef!").unwrap();
        for m in samples() {
            let mut rec = Vec::new();
            p.seal(&m, &mut rec).unwrap();
            let (pre, body) = split(&rec);
            assert_eq!(b.open(pre, body).unwrap(), m);
            let mut rec = Vec::new();
            b.seal(&m, &mut rec).unwrap();
            let (pre, body) = split(&rec);
            assert_eq!(p.open(pre, body).unwrap(), m);
        }
        assert_eq!(p.sent(), 12);
        assert_eq!(b.received(), 12);
    }

    #[test]
    fn wrong_key_fails_on_the_primary_side_first() {
        let err = pair("0123456789abcdef!", "0123456789abcdeX!").unwrap_err();
        assert_eq!(err, ProtocolError::AuthFailed { peer: "backup" });
    }

    #[test]
    fn forged_primary_proof_is_refused_by_the_backup() {
        let hello = ClientHello {
            version: PROTOCOL_VERSION,
            nonce: [3; 32],
        };
        let (s, _) = ServerHandshake::accept_with_nonce(key("0123456789abcdef"), &hello, [4; 32])
            .map_err(|e| e.0)
            .unwrap();
        assert_eq!(
            s.finish(&[0; 32]).unwrap_err(),
            ProtocolError::AuthFailed { peer: "primary" }
        );
    }

    #[test]
    fn version_mismatch_is_reported_to_both_sides() {
        let hello = ClientHello {
            version: 99,
            nonce: [3; 32],
        };
        let (err, reply) =
            ServerHandshake::accept_with_nonce(key("0123456789abcdef"), &hello, [4; 32])
                .unwrap_err();
        assert_eq!(
            err,
            ProtocolError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: 99
            }
        );
        let reply = reply.unwrap();
        let (c, _) = ClientHandshake::with_nonce(key("0123456789abcdef"), [1; 32]).unwrap();
        let mut other = reply;
        other.version = 2;
        assert!(matches!(
            c.finish(&other),
            Err(ProtocolError::VersionMismatch { theirs: 2, .. })
        ));
        let (c, _) = ClientHandshake::with_nonce(key("0123456789abcdef"), [1; 32]).unwrap();
        assert_eq!(
            c.finish(&ServerHandshake::busy()).unwrap_err(),
            ProtocolError::Busy
        );
        let mut bad = ClientHello::decode(&hello.encode()).unwrap().encode();
        bad[0] = b'X';
        assert_eq!(
            ClientHello::decode(&bad).unwrap_err(),
            ProtocolError::BadMagic
        );
    }

    #[test]
    fn short_keys_are_refused_and_newline_is_trimmed() {
        assert!(matches!(
            PreSharedKey::new(b"short\n"),
            Err(ProtocolError::ShortKey { len: 5 })
        ));
        let a = PreSharedKey::new(b"0123456789abcdef\n").unwrap();
        let b = PreSharedKey::new(b"0123456789abcdef").unwrap();
        assert_eq!(a.0, b.0);
    }

    #[test]
    fn replayed_reordered_and_dropped_records_fail() {
        let (mut p, mut b) = pair("0123456789abcdef", "0123456789abcdef").unwrap();
        let mut r0 = Vec::new();
        p.seal(&Message::Ack { epoch: 0 }, &mut r0).unwrap();
        let mut r1 = Vec::new();
        p.seal(&Message::Ack { epoch: 1 }, &mut r1).unwrap();
        // Record 1 before record 0: reordered (or 0 dropped).
        let (pre, body) = split(&r1);
        assert_eq!(
            b.open(pre, body).unwrap_err(),
            ProtocolError::RecordAuth { seq: 0 }
        );
        // A fresh session: 0 accepted, 0 again (replay) refused.
        let (mut p, mut b) = pair("0123456789abcdef", "0123456789abcdef").unwrap();
        let mut r0 = Vec::new();
        p.seal(&Message::Ack { epoch: 0 }, &mut r0).unwrap();
        let (pre, body) = split(&r0);
        b.open(pre, body).unwrap();
        assert!(matches!(
            b.open(pre, body),
            Err(ProtocolError::RecordAuth { seq: 1 })
        ));
        // A record of one session does not open in another.
        let (_, mut b2) = pair("0123456789abcdef", "0123456789abcdef").unwrap();
        let mut rb = Vec::new();
        let (mut p3, _) = {
            let (c, hello) = ClientHandshake::with_nonce(key("0123456789abcdef"), [9; 32]).unwrap();
            let (s, reply) =
                ServerHandshake::accept_with_nonce(key("0123456789abcdef"), &hello, [2; 32])
                    .unwrap();
            let (proof, p) = c.finish(&reply).unwrap();
            (p, s.finish(&proof).unwrap())
        };
        p3.seal(&Message::Ack { epoch: 0 }, &mut rb).unwrap();
        let (pre, body) = split(&rb);
        assert!(b2.open(pre, body).is_err());
    }

    #[test]
    fn absurd_lengths_are_refused_before_reading() {
        assert!(Session::body_len((MAX_RECORD as u32 + 1).to_le_bytes()).is_err());
        assert!(Session::body_len(3u32.to_le_bytes()).is_err());
        assert_eq!(Session::body_len(100u32.to_le_bytes()).unwrap(), 100);
    }

    #[test]
    fn every_truncation_of_every_sample_is_an_error() {
        for m in samples() {
            let mut b = Vec::new();
            m.encode(&mut b);
            assert_eq!(Message::decode(&b).unwrap(), m);
            for n in 0..b.len() {
                assert!(Message::decode(&b[..n]).is_err(), "{} cut at {n}", m.name());
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(Message::decode(&longer).is_err());
        }
        assert_eq!(
            Message::decode(&[200]).unwrap_err(),
            ProtocolError::UnknownType(200)
        );
    }

    proptest! {
        #[test]
        fn any_bit_flip_in_a_record_is_detected(idx in 0usize..200, bit in 0u8..8) {
            let (mut p, mut b) = pair("0123456789abcdef", "0123456789abcdef").unwrap();
            let mut rec = Vec::new();
            p.seal(&Message::EpochData(EpochData { epoch: 1, chunk: 0, data: vec![3; 150] }), &mut rec).unwrap();
            let i = idx % rec.len();
            rec[i] ^= 1 << bit;
            let (pre, body) = split(&rec);
            prop_assert!(b.open(pre, body).is_err());
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(&data);
        }

        #[test]
        fn digests_differ_when_a_page_differs(gfn in 0u64..1000, byte in 0usize..PAGE_SIZE) {
            let page = vec![0u8; PAGE_SIZE];
            let mut other = page.clone();
            other[byte] = 1;
            let mut a = PageDigest::new();
            a.add(gfn, &page);
            let mut b = PageDigest::new();
            b.add(gfn, &other);
            let mut c = PageDigest::new();
            c.add(gfn + 1, &page);
            let (a, b, c) = (a.finish(), b.finish(), c.finish());
            prop_assert_ne!(a, b);
            prop_assert_ne!(a, c);
        }
    }
}
