//! Capture of running processes into a memory trace (work in progress).
