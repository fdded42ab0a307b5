//! Replication between a primary and its backup.
//!
//! * [`protocol`]: the wire protocol (handshake, authenticated encrypted
//!   records, messages). Pure: no I/O, no VMM, no unsafe code, so it is
//!   fast to test and fuzz.
//! * [`apply`]: the backup's receive path without I/O: staging, the checks
//!   an epoch must pass, atomic commit; and the primary's matching
//!   message builders.
//! * [`transport`]: the protocol over TCP with tokio (handshake with
//!   timeouts, record reader and writer halves).
//! * [`observe`]: per-epoch JSON-lines stats, Prometheus metrics and the
//!   `/status` endpoint, and the client of `simrep status`.
//!
//! The primary and backup engines (epochs, output commit, failover) build
//! on it; see `issues show 4`.

pub mod apply;
pub mod backup;
pub mod gate;
pub mod link;
pub mod observe;
pub mod primary;
pub mod protocol;
pub mod transport;
