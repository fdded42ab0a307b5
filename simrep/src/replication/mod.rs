//! Replication between a primary and its backup.
//!
//! * [`protocol`]: the wire protocol (handshake, authenticated encrypted
//!   records, messages). Pure: no I/O, no VMM, no unsafe code, so it is
//!   fast to test and fuzz.
//!
//! The primary and backup engines (epochs, output commit, failover) build
//! on it; see `issues show 4`.

pub mod protocol;
