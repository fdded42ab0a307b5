//! Unit tests of the network device: ring placement, the checks on every
//! guest-provided value, framing of client input, and a whole round trip
//! through real guest memory with a simulated guest.
