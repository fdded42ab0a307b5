//! The service protocol: what a client (`simrep load`, or any program)
//! sends to the bundled guest's `kv` and `bank` services over TCP, and what
//! it gets back.
//!
//! Like [`abi`](super::abi), this file is compiled into the guest (no_std,
//! `core` only, no allocation) and into the host crate through a `#[path]`
//! include, so the client, the VMM and the guest read one definition.
//!
//! # Framing
//!
//! A TCP connection carries a stream of frames in each direction. Every
//! frame starts with its length, so the VMM can cut the stream into
//! messages without understanding them:
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 4    | `len`: bytes that follow this field, little-endian |
//! | 4      | len  | the message |
//!
//! A request message is at most [`MAX_REQUEST`] bytes and a response
//! message at most [`MAX_RESPONSE`] bytes; a peer that announces more is
//! sent nothing further and its connection is closed.
//!
//! # Request message
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 8    | `id`: chosen by the client, echoed in the response |
//! | 8      | 1    | `op`: an [`op`] code |
//! | 9      | 1    | `flags`: 0 |
//! | 10     | 2    | `key_len` K, at most [`MAX_KEY`] |
//! | 12     | 4    | `value_len` V, at most [`MAX_VALUE`] |
//! | 16     | K    | key bytes |
//! | 16 + K | V    | value bytes |
//!
//! The message is exactly `16 + K + V` bytes long; anything else is
//! [`status::BAD_REQUEST`].
//!
//! # Response message
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 8    | `id` of the request |
//! | 8      | 1    | `status`: a [`status`] code |
//! | 9      | 3    | reserved, 0 |
//! | 12     | 4    | `body_len` B, at most [`MAX_BODY`] |
//! | 16     | B    | body |
//!
//! Responses on one connection come in the order of the requests.
//!
//! # Operations
//!
//! `kv` (keys and values are arbitrary bytes; keys 1..=[`MAX_KEY`] bytes):
//!
//! | op | request | response body |
//! |----|---------|---------------|
//! | [`op::GET`]  | key | the value ([`status::NOT_FOUND`]: empty) |
//! | [`op::PUT`]  | key, value (0..=[`MAX_VALUE`] bytes) | empty; [`status::NO_SPACE`] when the guest is full |
//! | [`op::DEL`]  | key | empty; [`status::NOT_FOUND`] if it was absent |
//! | [`op::SCAN`] | key = first key (inclusive; may be empty), value = `u32` LE most entries (1..=[`MAX_SCAN_ENTRIES`]) | entries with key >= first key in byte order, each `u16 K, u32 V, key, value` (LE), stopping before the body would pass [`MAX_BODY`] |
//! | [`op::PING`] | nothing | empty |
//!
//! `bank` (accounts `0..accounts`, each opened with
//! [`BANK_INITIAL_BALANCE`] cents; the sum of all balances never changes):
//!
//! | op | request value (LE) | response body (LE) |
//! |----|--------------------|--------------------|
//! | [`op::TRANSFER`] | `u32 from, u32 to, u64 amount` | `u64 from_balance, u64 to_balance` after the transfer; [`status::INSUFFICIENT_FUNDS`] (nothing moved) or [`status::NOT_FOUND`] |
//! | [`op::BALANCE`]  | `u32 account` | `u64 balance, u64 history_records` |
//! | [`op::HISTORY`]  | `u32 account, u32 max` | up to `max` (at most [`MAX_SCAN_ENTRIES`]) records, newest first: `u64 seq, u32 other_account, u32 flags (1 = outgoing), u64 amount` |
//! | [`op::PING`]     | nothing | empty |
//!
//! A `kv` op sent to `bank` (or the reverse) is [`status::UNKNOWN_OP`].

/// Bytes of the length prefix of every frame.
pub const FRAME_PREFIX: usize = 4;
/// Bytes of a request header.
pub const REQUEST_HEADER: usize = 16;
/// Bytes of a response header.
pub const RESPONSE_HEADER: usize = 16;
/// Longest key.
pub const MAX_KEY: usize = 250;
/// Longest value.
pub const MAX_VALUE: usize = 64 * 1024;
/// Longest response body.
pub const MAX_BODY: usize = 256 * 1024;
/// Longest request message (after the length prefix).
pub const MAX_REQUEST: usize = REQUEST_HEADER + MAX_KEY + MAX_VALUE;
/// Longest response message (after the length prefix).
pub const MAX_RESPONSE: usize = RESPONSE_HEADER + MAX_BODY;
/// Most entries one `SCAN` or `HISTORY` returns.
pub const MAX_SCAN_ENTRIES: u32 = 1024;
/// Opening balance of every bank account, in cents.
pub const BANK_INITIAL_BALANCE: u64 = 100_000;

/// Operation codes.
pub mod op {
    /// kv: read a key.
    pub const GET: u8 = 1;
    /// kv: write a key.
    pub const PUT: u8 = 2;
    /// kv: delete a key.
    pub const DEL: u8 = 3;
    /// kv: ordered range read.
    pub const SCAN: u8 = 4;
    /// Both: liveness check.
    pub const PING: u8 = 5;
    /// bank: move money between two accounts.
    pub const TRANSFER: u8 = 16;
    /// bank: read an account.
    pub const BALANCE: u8 = 17;
    /// bank: an account's newest history records.
    pub const HISTORY: u8 = 18;
}

/// Response status codes.
pub mod status {
    /// Done.
    pub const OK: u8 = 0;
    /// The key or account does not exist.
    pub const NOT_FOUND: u8 = 1;
    /// The message is malformed (lengths, arguments).
    pub const BAD_REQUEST: u8 = 2;
    /// The guest has no room for the value.
    pub const NO_SPACE: u8 = 3;
    /// A transfer larger than the balance of its source.
    pub const INSUFFICIENT_FUNDS: u8 = 4;
    /// The service does not know the op.
    pub const UNKNOWN_OP: u8 = 5;
}

/// Why a message could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// Shorter than its header.
    Short,
    /// A length field is over its limit.
    TooLong,
    /// The lengths in the header do not add up to the message length.
    LengthMismatch,
}

/// A parsed request, borrowing the message bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// Client-chosen id.
    pub id: u64,
    /// The [`op`] code (not checked here).
    pub op: u8,
    /// The key.
    pub key: &'a [u8],
    /// The value.
    pub value: &'a [u8],
}

/// A parsed response, borrowing the message bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response<'a> {
    /// The request's id.
    pub id: u64,
    /// The [`status`] code.
    pub status: u8,
    /// The body.
    pub body: &'a [u8],
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Parses a request message (without its length prefix).
///
/// # Errors
///
/// [`ProtoError`] when the header is short, a length is over its limit or
/// the lengths do not match the message.
pub fn parse_request(msg: &[u8]) -> Result<Request<'_>, ProtoError> {
    if msg.len() < REQUEST_HEADER {
        return Err(ProtoError::Short);
    }
    let key_len = usize::from(le_u16(&msg[10..]));
    let value_len = le_u32(&msg[12..]) as usize;
    if key_len > MAX_KEY || value_len > MAX_VALUE {
        return Err(ProtoError::TooLong);
    }
    if msg.len() != REQUEST_HEADER + key_len + value_len {
        return Err(ProtoError::LengthMismatch);
    }
    let key_end = REQUEST_HEADER + key_len;
    Ok(Request {
        id: le_u64(msg),
        op: msg[8],
        key: &msg[REQUEST_HEADER..key_end],
        value: &msg[key_end..],
    })
}

/// Parses a response message (without its length prefix).
///
/// # Errors
///
/// As [`parse_request`].
pub fn parse_response(msg: &[u8]) -> Result<Response<'_>, ProtoError> {
    if msg.len() < RESPONSE_HEADER {
        return Err(ProtoError::Short);
    }
    let body_len = le_u32(&msg[12..]) as usize;
    if body_len > MAX_BODY {
        return Err(ProtoError::TooLong);
    }
    if msg.len() != RESPONSE_HEADER + body_len {
        return Err(ProtoError::LengthMismatch);
    }
    Ok(Response {
        id: le_u64(msg),
        status: msg[8],
        body: &msg[RESPONSE_HEADER..],
    })
}

/// Writes the length prefix and header of a request with `key_len` and
/// `value_len` bytes to follow; returns the bytes written
/// (`FRAME_PREFIX + REQUEST_HEADER`).
///
/// # Panics
///
/// If `out` is shorter than 20 bytes.
pub fn write_request_header(
    out: &mut [u8],
    id: u64,
    op: u8,
    key_len: u16,
    value_len: u32,
) -> usize {
    let len = (REQUEST_HEADER as u32) + u32::from(key_len) + value_len;
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[4..12].copy_from_slice(&id.to_le_bytes());
    out[12] = op;
    out[13] = 0;
    out[14..16].copy_from_slice(&key_len.to_le_bytes());
    out[16..20].copy_from_slice(&value_len.to_le_bytes());
    FRAME_PREFIX + REQUEST_HEADER
}

/// Writes the length prefix and header of a response with `body_len` bytes
/// of body to follow; returns the bytes written
/// (`FRAME_PREFIX + RESPONSE_HEADER`).
///
/// # Panics
///
/// If `out` is shorter than 20 bytes.
pub fn write_response_header(out: &mut [u8], id: u64, status: u8, body_len: u32) -> usize {
    let len = (RESPONSE_HEADER as u32) + body_len;
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[4..12].copy_from_slice(&id.to_le_bytes());
    out[12] = status;
    out[13..16].fill(0);
    out[16..20].copy_from_slice(&body_len.to_le_bytes());
    FRAME_PREFIX + RESPONSE_HEADER
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_rejections() {
        let mut buf = [0u8; 64];
        let n = write_request_header(&mut buf, 7, op::PUT, 3, 5);
        buf[n..n + 8].copy_from_slice(b"keyvalue");
        let len = le_u32(&buf) as usize;
        assert_eq!(len, 24);
        let r = parse_request(&buf[4..4 + len]).unwrap();
        assert_eq!(
            (r.id, r.op, r.key, r.value),
            (7, op::PUT, &b"key"[..], &b"value"[..])
        );
        assert_eq!(
            parse_request(&buf[4..4 + len - 1]),
            Err(ProtoError::LengthMismatch)
        );
        assert_eq!(parse_request(&buf[4..10]), Err(ProtoError::Short));
        write_request_header(&mut buf, 7, op::PUT, 251, 0);
        assert_eq!(parse_request(&buf[4..]), Err(ProtoError::TooLong));
    }

    #[test]
    fn response_round_trip() {
        let mut buf = [0u8; 32];
        let n = write_response_header(&mut buf, 9, status::NOT_FOUND, 2);
        buf[n..n + 2].copy_from_slice(b"ok");
        let r = parse_response(&buf[4..22]).unwrap();
        assert_eq!((r.id, r.status, r.body), (9, status::NOT_FOUND, &b"ok"[..]));
    }
}
