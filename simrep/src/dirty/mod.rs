//! Dirty-page tracking and the copy-on-write view of guest memory.

pub mod cow;
