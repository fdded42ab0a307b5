//! Memory traces of real processes: the file format ([`format`]), its
//! replay into a dense memory image ([`replay`]) and the capture of running
//! processes ([`capture`]).
//!
//! A trace records, epoch by epoch, which 4 KiB pages of a program changed
//! and their new contents (see `FORMAT.md`). Traces are how the codecs in
//! [`crate::compress`] are judged on real workloads.

#![forbid(unsafe_code)]

pub mod analysis;
pub mod capture;
pub mod format;
mod keymap;
pub mod replay;

pub use capture::{CaptureError, CaptureOptions, CaptureSummary, EndReason, EpochSummary};
pub use format::{EpochEnd, Record, Region, TraceError, TraceHeader, TraceReader, TraceWriter};
pub use replay::{EpochDelta, Replay};
