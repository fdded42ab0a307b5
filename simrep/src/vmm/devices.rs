//! The MMIO devices and the exit dispatcher: a console and a
//! system-control device, at the addresses [`super::abi`] documents.
//!
//! Devices are shared by all vCPU threads; each exit is handled on the
//! thread of the vCPU that made it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use super::abi::{self, ExceptionReport};
use super::block::BlockDevice;
use super::memory::{GuestMemory, MemoryError};

/// Errors of MMIO device emulation.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No device claims the address.
    #[error("{} of {len} bytes at unknown MMIO address {gpa:#x}", if *.write { "write" } else { "read" })]
    UnknownAddress {
        /// Guest-physical address of the access.
        gpa: u64,
        /// Access width in bytes.
        len: usize,
        /// Whether it was a write.
        write: bool,
    },
    /// A register was accessed with the wrong width or direction.
    #[error("bad access to MMIO register {register} at {gpa:#x}: {len} bytes, {}", if *.write { "write" } else { "read" })]
    BadAccess {
        /// The register's name.
        register: &'static str,
        /// Guest-physical address of the access.
        gpa: u64,
        /// Access width in bytes.
        len: usize,
        /// Whether it was a write.
        write: bool,
    },
    /// A console line descriptor points outside guest RAM or is too long.
    #[error("bad console line: {len} bytes at {gpa:#x} (at most {max} bytes inside guest RAM)")]
    BadConsoleLine {
        /// Where the line was said to be.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The longest line accepted.
        max: u64,
    },
    /// Reading a line or a report from guest memory failed.
    #[error("cannot read device data from guest memory")]
    Memory(#[from] MemoryError),
    /// The network device rejected what the guest gave it.
    #[error(transparent)]
    Net(#[from] super::net::NetError),
}

/// What the vCPU loop does after an MMIO access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioAction {
    /// Resume the guest.
    Continue,
    /// The guest finished with this status: stop the vCPU.
    Exit(u64),
    /// The guest reported an exception: stop the vCPU with an error.
    Exception(ExceptionReport),
    /// The guest asked to idle this long (already capped).
    Idle(std::time::Duration),
    /// The guest waits for a device (`NET_WAIT`) at most this long: block
    /// until a [`super::vcpu::VcpuCommand::Wake`] or another command, then
    /// call [`MmioBus::wait_done`] before running the guest.
    Wait(std::time::Duration),
}

/// A line the guest wrote on its console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleLine {
    /// The vCPU that wrote it.
    pub vcpu: u32,
    /// The text, with control characters escaped.
    pub text: String,
}

/// The console: lines go to `tracing` (target `simrep::guest`) and to any
/// subscribers.
#[derive(Debug, Default)]
struct Console {
    /// Per-vCPU bytes written through `CONSOLE_PUTC` since the last `\n`.
    partial: Mutex<HashMap<u32, Vec<u8>>>,
    subscribers: Mutex<Vec<Sender<ConsoleLine>>>,
}

impl Console {
    fn emit(&self, vcpu: u32, bytes: &[u8]) {
        let text: String = String::from_utf8_lossy(bytes)
            .chars()
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() && c != '\t' {
                    c.escape_default().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect();
        tracing::info!(target: "simrep::guest", vcpu, "{text}");
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| {
            s.send(ConsoleLine {
                vcpu,
                text: text.clone(),
            })
            .is_ok()
        });
    }

    fn line(&self, vcpu: u32, value: u64, mem: &GuestMemory) -> Result<(), DeviceError> {
        let gpa = value & ((1 << abi::CONSOLE_LEN_SHIFT) - 1);
        let len = value >> abi::CONSOLE_LEN_SHIFT;
        if len > abi::CONSOLE_MAX_LINE || !mem.contains(gpa, len) {
            return Err(DeviceError::BadConsoleLine {
                gpa,
                len,
                max: abi::CONSOLE_MAX_LINE,
            });
        }
        let mut buf = vec![0u8; len as usize];
        mem.read(gpa, &mut buf)?;
        let text = buf.strip_suffix(b"\n").unwrap_or(&buf);
        self.emit(vcpu, text);
        Ok(())
    }

    fn putc(&self, vcpu: u32, byte: u8) {
        let mut partial = self.partial.lock().unwrap_or_else(|e| e.into_inner());
        let buf = partial.entry(vcpu).or_default();
        if byte == b'\n' || buf.len() as u64 >= abi::CONSOLE_MAX_LINE {
            let line = std::mem::take(buf);
            drop(partial);
            self.emit(vcpu, &line);
            if byte != b'\n' {
                self.putc(vcpu, byte);
            }
        } else {
            buf.push(byte);
        }
    }
}

/// The MMIO bus: routes guest MMIO exits to the devices.
#[derive(Debug)]
pub struct MmioBus {
    console: Console,
    start: Instant,
    /// The block device (a detached one, capacity 0, until one is attached).
    block: RwLock<Arc<BlockDevice>>,
    // --- net ---
    net: std::sync::OnceLock<std::sync::Arc<super::net::NetDevice>>,
    wakers: std::sync::Arc<super::vcpu::VcpuWakers>,
    // --- end net ---
    /// Added (wrapping) to `start.elapsed()` for `SYS_TIME_NS`: a restored
    /// guest's clock continues from its saved value.
    time_offset_ns: AtomicU64,
    /// Devices whose state is saved with a snapshot ([`super::state`]).
    device_states: super::state::DeviceRegistry,
}

impl Default for MmioBus {
    fn default() -> Self {
        Self::new()
    }
}

fn u64_of(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl MmioBus {
    /// A bus with the console and the system device.
    pub fn new() -> Self {
        MmioBus {
            console: Console::default(),
            start: Instant::now(),
            net: std::sync::OnceLock::new(),
            wakers: std::sync::Arc::default(),
            block: RwLock::new(Arc::new(BlockDevice::detached())),
            time_offset_ns: AtomicU64::new(0),
            device_states: Default::default(),
        }
    }

    /// Attaches the block device (before the vCPUs start).
    pub fn attach_block(&self, dev: Arc<BlockDevice>) {
        *self.block.write().unwrap_or_else(|e| e.into_inner()) = dev;
    }

    /// The block device (a detached one when none was attached), for
    /// replication's epoch calls.
    pub fn block(&self) -> Arc<BlockDevice> {
        self.block.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    // --- net ---

    /// Attaches the network device (before the vCPUs start). Returns false
    /// if one is attached already.
    pub fn attach_net(&self, dev: std::sync::Arc<super::net::NetDevice>) -> bool {
        self.net.set(dev).is_ok()
    }

    /// The attached network device.
    pub fn net(&self) -> Option<&std::sync::Arc<super::net::NetDevice>> {
        self.net.get()
    }

    /// The senders that wake vCPUs waiting for a device.
    pub fn wakers(&self) -> &std::sync::Arc<super::vcpu::VcpuWakers> {
        &self.wakers
    }

    /// Ends a device wait of vCPU `vcpu` ([`MmioAction::Wait`]), on its
    /// thread, before the guest runs again.
    ///
    /// # Errors
    ///
    /// [`DeviceError::Net`] when the guest's rings are bad.
    pub fn wait_done(&self, vcpu: u32, mem: &GuestMemory) -> Result<(), DeviceError> {
        match self.net.get() {
            Some(net) => Ok(net.wait_done(vcpu, mem)?),
            None => Ok(()),
        }
    }

    // --- end net ---

    /// Receives every console line from now on.
    pub fn subscribe_console(&self) -> Receiver<ConsoleLine> {
        let (tx, rx) = mpsc::channel();
        self.console
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        rx
    }

    /// Handles a guest write of `data` at `gpa` by vCPU `vcpu`.
    ///
    /// # Errors
    ///
    /// [`DeviceError`] for an unknown address, a bad width or bad data; the
    /// vCPU should stop.
    pub fn write(
        &self,
        vcpu: u32,
        gpa: u64,
        data: &[u8],
        mem: &GuestMemory,
    ) -> Result<MmioAction, DeviceError> {
        let len = data.len();
        let bad = |register| DeviceError::BadAccess {
            register,
            gpa,
            len,
            write: true,
        };
        match gpa {
            abi::CONSOLE_LINE => {
                if len != 8 {
                    return Err(bad("CONSOLE_LINE"));
                }
                self.console.line(vcpu, u64_of(data), mem)?;
            }
            abi::CONSOLE_PUTC => {
                if len != 1 {
                    return Err(bad("CONSOLE_PUTC"));
                }
                self.console.putc(vcpu, data[0]);
            }
            abi::SYS_EXIT => {
                if len != 8 {
                    return Err(bad("SYS_EXIT"));
                }
                return Ok(MmioAction::Exit(u64_of(data)));
            }
            abi::SYS_EXCEPTION => {
                if len != 8 {
                    return Err(bad("SYS_EXCEPTION"));
                }
                let report: ExceptionReport = mem.read_obj(u64_of(data))?;
                return Ok(MmioAction::Exception(report));
            }
            abi::SYS_NOP => {}
            abi::NET_BASE..abi::NET_END if self.net.get().is_some() => {
                return self
                    .net
                    .get()
                    .map_or(Ok(MmioAction::Continue), |n| n.write(vcpu, gpa, data, mem));
            }
            abi::SYS_IDLE => {
                if len != 8 {
                    return Err(bad("SYS_IDLE"));
                }
                let ns = u64_of(data).min(abi::SYS_IDLE_MAX_NS);
                return Ok(MmioAction::Idle(std::time::Duration::from_nanos(ns)));
            }
            abi::BLOCK_BASE..abi::BLOCK_END => {
                return self.block().mmio_write(vcpu, gpa, data, mem);
            }
            _ => {
                return Err(DeviceError::UnknownAddress {
                    gpa,
                    len,
                    write: true,
                })
            }
        }
        Ok(MmioAction::Continue)
    }

    /// Handles a guest read at `gpa` by vCPU `vcpu`, filling `data`.
    ///
    /// # Errors
    ///
    /// [`DeviceError`] for an unknown address or a bad width.
    pub fn read(&self, _vcpu: u32, gpa: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let len = data.len();
        match gpa {
            abi::BLOCK_BASE..abi::BLOCK_END => self.block().mmio_read(_vcpu, gpa, data),
            abi::SYS_TIME_NS if len == 8 => {
                let ns = self.guest_time_ns();
                data.copy_from_slice(&ns.to_le_bytes());
                Ok(())
            }
            abi::SYS_TIME_NS => Err(DeviceError::BadAccess {
                register: "SYS_TIME_NS",
                gpa,
                len,
                write: false,
            }),
            _ => Err(DeviceError::UnknownAddress {
                gpa,
                len,
                write: false,
            }),
        }
    }
}

// ---- state save/restore (simrep::vmm::state) ----
impl MmioBus {
    /// The time `SYS_TIME_NS` reads now, in ns.
    pub fn guest_time_ns(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        elapsed.wrapping_add(self.time_offset_ns.load(Ordering::Acquire))
    }

    /// Makes `SYS_TIME_NS` read `ns` now and count on from there.
    pub fn set_guest_time_ns(&self, ns: u64) {
        let elapsed = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.time_offset_ns
            .store(ns.wrapping_sub(elapsed), Ordering::Release);
    }

    /// The console's unfinished lines (bytes since the last newline), by
    /// vCPU.
    pub(crate) fn console_partial_lines(&self) -> std::collections::BTreeMap<u32, Vec<u8>> {
        let partial = self
            .console
            .partial
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        partial
            .iter()
            .filter(|(_, b)| !b.is_empty())
            .map(|(v, b)| (*v, b.clone()))
            .collect()
    }

    /// Replaces the console's unfinished lines.
    pub(crate) fn set_console_partial_lines(
        &self,
        lines: std::collections::BTreeMap<u32, Vec<u8>>,
    ) {
        *self
            .console
            .partial
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = lines.into_iter().collect();
    }

    /// The registry of devices with saved state.
    pub(crate) fn device_registry(&self) -> &super::state::DeviceRegistry {
        &self.device_states
    }
}
// ---- end state save/restore ----

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_line_is_one_exit_and_bounds_checked() {
        let mem = GuestMemory::new(8 << 20).unwrap();
        let bus = MmioBus::new();
        let rx = bus.subscribe_console();
        mem.write(0x40_0000, b"hello\x07world\n").unwrap();
        let v: u64 = 0x40_0000 | (12 << abi::CONSOLE_LEN_SHIFT);
        assert_eq!(
            bus.write(1, abi::CONSOLE_LINE, &v.to_le_bytes(), &mem)
                .unwrap(),
            MmioAction::Continue
        );
        assert_eq!(
            rx.try_recv().unwrap(),
            ConsoleLine {
                vcpu: 1,
                text: "hello\\u{7}world".into()
            }
        );
        let too_long = 0x40_0000 | (abi::CONSOLE_MAX_LINE + 1) << abi::CONSOLE_LEN_SHIFT;
        assert!(matches!(
            bus.write(0, abi::CONSOLE_LINE, &too_long.to_le_bytes(), &mem),
            Err(DeviceError::BadConsoleLine { .. })
        ));
        let outside = ((8u64 << 20) - 2) | (4 << abi::CONSOLE_LEN_SHIFT);
        assert!(matches!(
            bus.write(0, abi::CONSOLE_LINE, &outside.to_le_bytes(), &mem),
            Err(DeviceError::BadConsoleLine { .. })
        ));
        assert!(matches!(
            bus.write(0, abi::CONSOLE_LINE, &[1, 2], &mem),
            Err(DeviceError::BadAccess { .. })
        ));
    }

    #[test]
    fn putc_buffers_until_newline() {
        let mem = GuestMemory::new(8 << 20).unwrap();
        let bus = MmioBus::new();
        let rx = bus.subscribe_console();
        for b in b"hi\n" {
            bus.write(0, abi::CONSOLE_PUTC, &[*b], &mem).unwrap();
        }
        assert_eq!(rx.try_recv().unwrap().text, "hi");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn system_device_and_unknown_addresses() {
        let mem = GuestMemory::new(8 << 20).unwrap();
        let bus = MmioBus::new();
        assert_eq!(
            bus.write(0, abi::SYS_EXIT, &7u64.to_le_bytes(), &mem)
                .unwrap(),
            MmioAction::Exit(7)
        );
        let report = ExceptionReport {
            vector: 14,
            cr2: 8,
            ..Default::default()
        };
        mem.write_obj(0x6000, report).unwrap();
        assert_eq!(
            bus.write(0, abi::SYS_EXCEPTION, &0x6000u64.to_le_bytes(), &mem)
                .unwrap(),
            MmioAction::Exception(report)
        );
        assert!(matches!(
            bus.write(0, abi::MMIO_BASE + 0x10_0000, &[0; 8], &mem),
            Err(DeviceError::UnknownAddress { write: true, .. })
        ));
        let mut t = [0u8; 8];
        bus.read(0, abi::SYS_TIME_NS, &mut t).unwrap();
        let mut x = [0u8; 4];
        assert!(matches!(
            bus.read(0, abi::SYS_EXIT, &mut x),
            Err(DeviceError::UnknownAddress { write: false, .. })
        ));
    }
}
