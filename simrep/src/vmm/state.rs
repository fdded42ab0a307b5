//! Full VM state save and restore: every vCPU register set, the VM-level
//! KVM state and the device state, as an in-memory [`VmSnapshot`] and as a
//! versioned, checksummed byte format.
//!
//! The lists come from `ENVIRONMENT.md` (measured on this machine kind):
//! saved from one VM and restored into a fresh one, they continue the guest
//! bit-identically.
//!
//! * Per vCPU ([`VcpuSnapshot`]): CPUID, TSC_KHZ, MP_STATE, REGS, SREGS,
//!   XSAVE, XCRS, DEBUGREGS, LAPIC, MSRS (the supported index list plus
//!   `IA32_TSC_DEADLINE`, `IA32_APIC_BASE`, `EFER`, FS/GS base) and
//!   VCPU_EVENTS. `KVM_GET_FPU` is not saved: XSAVE's legacy area holds the
//!   same x87/SSE state and is what `KVM_SET_XSAVE` restores.
//! * Per VM: IRQCHIP (PIC master, PIC slave, IOAPIC), PIT2, CLOCK.
//! * Devices: a map of named byte blobs ([`DeviceStates`]); built in are the
//!   console's partial lines (`console`) and the guest-visible clock of the
//!   system device (`system`), and any device can join through
//!   [`DeviceState`] and [`MmioBus::register_device_state`].
//! * The options the guest was booted with: memory size, vCPU count and the
//!   [`BootParams`] copy, so a restore needs no flags.
//!
//! Restore order (also `ENVIRONMENT.md`): per vCPU CPUID2, TSC_KHZ,
//! MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRS, VCPU_EVENTS;
//! then IRQCHIP, PIT2, CLOCK.
//!
//! Replication calls the same code every epoch: [`Vm::save_state`] while the
//! vCPUs are paused, [`VmSnapshot::encode`] to ship it, and on failover
//! [`VmSnapshot::decode`] and [`Vm::restore`] into a fresh VM.
//!
//! # Byte format (version 1)
//!
//! All integers little-endian. A 32-byte header:
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 8    | magic `"SIMREPVS"` |
//! | 8      | 4    | format version ([`STATE_VERSION`]) |
//! | 12     | 4    | header length (32) |
//! | 16     | 8    | payload length (at most [`MAX_STATE_BYTES`]) |
//! | 24     | 4    | CRC-32 (IEEE) of the payload |
//! | 28     | 4    | CRC-32 of header bytes 0..28 |
//!
//! The payload, in order (`blob<T>` is a `u32` byte length that must equal
//! `size_of::<T>()`, then the bytes of the kvm-bindings struct as the kernel
//! lays it out; `bytes` is a `u32` length then the bytes; `str` a `u16`
//! length then UTF-8):
//!
//! ```text
//! u64 mem_bytes, u32 vcpu_count, bytes boot_params (abi::BootParams)
//! blob<kvm_irqchip> x 3 (PIC master, PIC slave, IOAPIC)
//! blob<kvm_pit_state2>, blob<kvm_clock_data>
//! u32 device_count (<= 64), device_count x (str name (<= 64 bytes), bytes state (<= 16 MiB))
//! vcpu_count x:
//!   u32 id, u32 tsc_khz
//!   u32 n (<= 256), n x blob-less kvm_cpuid_entry2 (40 bytes each)
//!   blob<kvm_mp_state>, blob<kvm_regs>, blob<kvm_sregs>, blob<kvm_xsave>,
//!   blob<kvm_xcrs>, blob<kvm_debugregs>, blob<kvm_lapic_state>
//!   u32 n (<= 1024), n x (u32 index, u32 reserved 0, u64 data)
//!   blob<kvm_vcpu_events>
//! ```
//!
//! Nothing may follow the last vCPU. Decoding checks every length against
//! the bytes left before it allocates and returns a typed [`StateError`]
//! for anything malformed; it never panics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use vm_memory::ByteValued;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::abi::BootParams;
use super::devices::MmioBus;
use super::memory::{GuestMemory, MemoryError};
use super::vcpu::{VcpuAck, VcpuCommand, VcpuState};
use super::vm::{Vm, VmError};

/// `"SIMREPVS"`: the first bytes of an encoded [`VmSnapshot`].
pub const STATE_MAGIC: [u8; 8] = *b"SIMREPVS";
/// Version of the byte format; a decoder accepts only this one.
pub const STATE_VERSION: u32 = 1;
/// Length of the header.
pub const STATE_HEADER_LEN: usize = 32;
/// Largest payload accepted (a 32-vCPU snapshot is ~250 KiB; device blobs
/// are capped at [`MAX_DEVICE_STATE`] each).
pub const MAX_STATE_BYTES: u64 = 64 << 20;
/// Largest state blob of one device.
pub const MAX_DEVICE_STATE: usize = 16 << 20;
/// Most named device blobs in a snapshot.
pub const MAX_DEVICES: usize = 64;
/// Longest device name.
pub const MAX_DEVICE_NAME: usize = 64;
/// Most MSRs per vCPU.
pub const MAX_MSRS: usize = 1024;
/// Most vCPUs in a snapshot.
pub const MAX_VCPUS: u32 = super::abi::MAX_VCPUS;

/// `IA32_TSC_DEADLINE`: not in KVM's index list, needed for TSC-deadline
/// timers (restored after the LAPIC).
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// `IA32_APIC_BASE`.
pub const MSR_IA32_APIC_BASE: u32 = 0x1b;
/// `EFER`.
pub const MSR_EFER: u32 = 0xc000_0080;
/// `FS.base`.
pub const MSR_FS_BASE: u32 = 0xc000_0100;
/// `GS.base`.
pub const MSR_GS_BASE: u32 = 0xc000_0101;

/// How long a vCPU may take to answer a save.
const SAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of saving, encoding, decoding and restoring VM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The bytes end before a field.
    #[error("state truncated: {what} needs {needed} bytes, {available} left")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left.
        available: u64,
    },
    /// The bytes do not start with [`STATE_MAGIC`].
    #[error("not a simrep VM state (bad magic {found:02x?})")]
    BadMagic {
        /// The first bytes found.
        found: [u8; 8],
    },
    /// A format version this build does not read.
    #[error("VM state format version {found} is not supported (this build reads version {STATE_VERSION})")]
    UnsupportedVersion {
        /// The version in the header.
        found: u32,
    },
    /// The header's own checksum or length field is wrong.
    #[error("VM state header is corrupt ({0})")]
    BadHeader(&'static str),
    /// The payload length is over [`MAX_STATE_BYTES`].
    #[error("VM state payload of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// The length claimed.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The payload does not match its checksum.
    #[error("VM state checksum mismatch: header says {expected:#010x}, payload has {found:#010x}")]
    Checksum {
        /// The CRC-32 in the header.
        expected: u32,
        /// The CRC-32 of the payload.
        found: u32,
    },
    /// A KVM structure has the wrong size.
    #[error("VM state field {what} is {found} bytes, expected {expected}")]
    StructSize {
        /// The structure.
        what: &'static str,
        /// Its size in this build.
        expected: u64,
        /// The size in the bytes.
        found: u64,
    },
    /// A count or length is over its limit.
    #[error("VM state field {what} is {count}, over the limit of {max}")]
    Limit {
        /// The field.
        what: &'static str,
        /// Its value.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// A value is not valid (a reserved field set, a bad name, mismatching
    /// ids).
    #[error("VM state is inconsistent: {0}")]
    Invalid(String),
    /// Bytes follow the last vCPU.
    #[error("VM state has {0} trailing bytes")]
    Trailing(u64),
    /// A KVM ioctl failed while saving or restoring.
    #[error("{}{what} failed", match .vcpu { Some(v) => format!("vCPU {v}: "), None => String::new() })]
    Kvm {
        /// The vCPU (`None`: a VM ioctl).
        vcpu: Option<u32>,
        /// The ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only part of the MSRs.
    #[error("vCPU {vcpu}: KVM_SET_MSRS stopped at MSR {index:#x} ({set} of {total} set)")]
    MsrsIncomplete {
        /// The vCPU.
        vcpu: u32,
        /// The first MSR KVM refused.
        index: u32,
        /// How many it set.
        set: usize,
        /// How many there were.
        total: usize,
    },
    /// A save was asked of a vCPU that is not Paused.
    #[error("vCPU {vcpu} is {state:?}, not paused: pause all vCPUs before saving")]
    NotPaused {
        /// The vCPU.
        vcpu: u32,
        /// Its state.
        state: VcpuState,
    },
    /// A vCPU did not answer a save in time.
    #[error("vCPU {vcpu} did not answer the save within {timeout:?}")]
    NoAnswer {
        /// The vCPU.
        vcpu: u32,
        /// How long the VMM waited.
        timeout: Duration,
    },
    /// Creating or setting up the fresh VM failed.
    #[error("cannot create the VM to restore into")]
    Vm(#[from] VmError),
    /// Guest memory could not be read or written.
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    /// Loading the guest memory image failed.
    #[error("cannot load guest memory")]
    LoadMemory(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A device rejected its saved state.
    #[error("device {name}: cannot restore its state: {reason}")]
    Device {
        /// The device.
        name: String,
        /// What was wrong.
        reason: String,
    },
}

impl StateError {
    /// Whether the error says the input bytes are malformed (as opposed to
    /// KVM or the host failing): the CLI maps these to "bad input".
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            StateError::Truncated { .. }
                | StateError::BadMagic { .. }
                | StateError::UnsupportedVersion { .. }
                | StateError::BadHeader(_)
                | StateError::TooLarge { .. }
                | StateError::Checksum { .. }
                | StateError::StructSize { .. }
                | StateError::Limit { .. }
                | StateError::Invalid(_)
                | StateError::Trailing(_)
                | StateError::Device { .. }
        )
    }
}

fn kvm(vcpu: Option<u32>, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { vcpu, what, source }
}

/// The state of one vCPU, in KVM's own structures.
pub struct VcpuSnapshot {
    /// The vCPU index (= APIC ID).
    pub id: u32,
    /// The CPUID table the vCPU was created with.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// TSC frequency in kHz.
    pub tsc_khz: u32,
    /// `KVM_GET_MP_STATE`.
    pub mp_state: kvm_mp_state,
    /// `KVM_GET_REGS`.
    pub regs: kvm_regs,
    /// `KVM_GET_SREGS`.
    pub sregs: kvm_sregs,
    /// `KVM_GET_XSAVE` (x87, SSE, AVX... state).
    pub xsave: kvm_xsave,
    /// `KVM_GET_XCRS`.
    pub xcrs: kvm_xcrs,
    /// `KVM_GET_DEBUGREGS`.
    pub debugregs: kvm_debugregs,
    /// `KVM_GET_LAPIC`.
    pub lapic: kvm_lapic_state,
    /// `KVM_GET_MSRS` over [`msr_indices`], in that order.
    pub msrs: Vec<kvm_msr_entry>,
    /// `KVM_GET_VCPU_EVENTS` (pending exceptions, interrupts, NMIs).
    pub events: kvm_vcpu_events,
}

impl Clone for VcpuSnapshot {
    fn clone(&self) -> Self {
        // `kvm_xsave` ends in a zero-length array and is not `Clone`.
        let xsave = kvm_xsave {
            region: self.xsave.region,
            ..Default::default()
        };
        VcpuSnapshot {
            id: self.id,
            cpuid: self.cpuid.clone(),
            tsc_khz: self.tsc_khz,
            mp_state: self.mp_state,
            regs: self.regs,
            sregs: self.sregs,
            xsave,
            xcrs: self.xcrs,
            debugregs: self.debugregs,
            lapic: self.lapic,
            msrs: self.msrs.clone(),
            events: self.events,
        }
    }
}

impl std::fmt::Debug for VcpuSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuSnapshot")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("cs", &format_args!("{:#x}", self.sregs.cs.selector))
            .field("mp_state", &self.mp_state.mp_state)
            .field("tsc_khz", &self.tsc_khz)
            .field("cpuid_entries", &self.cpuid.len())
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// Named device state blobs, by device name.
pub type DeviceStates = BTreeMap<String, Vec<u8>>;

/// The whole state of a VM except guest memory.
#[derive(Clone)]
pub struct VmSnapshot {
    /// Bytes of guest RAM.
    pub mem_bytes: u64,
    /// The boot parameters the guest was started with (a copy of
    /// [`BootParams`] as bytes; empty if unknown). Informative: the guest's
    /// own copy lives in its memory.
    pub boot_params: Vec<u8>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: [kvm_irqchip; 3],
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock (`KVM_CLOCK_TSC_STABLE` and `KVM_CLOCK_REALTIME` cleared,
    /// so the clock continues from the saved value).
    pub clock: kvm_clock_data,
    /// Device state blobs.
    pub devices: DeviceStates,
    /// One per vCPU, by index.
    pub vcpus: Vec<VcpuSnapshot>,
}

impl std::fmt::Debug for VmSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSnapshot")
            .field("mem_bytes", &self.mem_bytes)
            .field("clock", &self.clock.clock)
            .field(
                "devices",
                &self
                    .devices
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.len()))
                    .collect::<Vec<_>>(),
            )
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

/// Snapshots are equal when their encodings are (the KVM structs hold
/// unions, which have no field-wise equality).
impl PartialEq for VmSnapshot {
    fn eq(&self, other: &Self) -> bool {
        self.encode() == other.encode()
    }
}

impl VmSnapshot {
    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        self.vcpus.len() as u32
    }

    /// The boot parameters, if the stored copy has this build's layout.
    pub fn boot_params(&self) -> Option<BootParams> {
        BootParams::from_slice(&self.boot_params).copied()
    }

    /// Encodes the snapshot in the byte format of the module docs.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(
            STATE_HEADER_LEN + 8192 * (self.vcpus.len() + 1),
        ));
        w.0.resize(STATE_HEADER_LEN, 0);
        w.u64(self.mem_bytes);
        w.u32(self.vcpus.len() as u32);
        w.bytes(&self.boot_params);
        for chip in &self.irqchips {
            w.blob(chip);
        }
        w.blob(&self.pit);
        w.blob(&self.clock);
        w.u32(self.devices.len() as u32);
        for (name, state) in &self.devices {
            w.u16(name.len() as u16);
            w.0.extend_from_slice(name.as_bytes());
            w.bytes(state);
        }
        for v in &self.vcpus {
            w.u32(v.id);
            w.u32(v.tsc_khz);
            w.u32(v.cpuid.len() as u32);
            for e in &v.cpuid {
                w.0.extend_from_slice(e.as_bytes());
            }
            w.blob(&v.mp_state);
            w.blob(&v.regs);
            w.blob(&v.sregs);
            w.blob(&v.xsave);
            w.blob(&v.xcrs);
            w.blob(&v.debugregs);
            w.blob(&v.lapic);
            w.u32(v.msrs.len() as u32);
            for m in &v.msrs {
                w.u32(m.index);
                w.u32(0);
                w.u64(m.data);
            }
            w.blob(&v.events);
        }
        let mut out = w.0;
        let payload_len = (out.len() - STATE_HEADER_LEN) as u64;
        let crc = crc32fast::hash(&out[STATE_HEADER_LEN..]);
        let h = &mut out[..STATE_HEADER_LEN];
        h[0..8].copy_from_slice(&STATE_MAGIC);
        h[8..12].copy_from_slice(&STATE_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(STATE_HEADER_LEN as u32).to_le_bytes());
        h[16..24].copy_from_slice(&payload_len.to_le_bytes());
        h[24..28].copy_from_slice(&crc.to_le_bytes());
        let hcrc = crc32fast::hash(&h[0..28]);
        h[28..32].copy_from_slice(&hcrc.to_le_bytes());
        out
    }

    /// Decodes bytes from [`VmSnapshot::encode`]; `bytes` may come from
    /// anywhere (a file, the network).
    ///
    /// # Errors
    ///
    /// A [`StateError`] for which [`StateError::is_bad_input`] holds:
    /// truncated, corrupt, oversized or inconsistent bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = Reader::new(bytes);
        let magic: [u8; 8] = r.array("magic")?;
        if magic != STATE_MAGIC {
            return Err(StateError::BadMagic { found: magic });
        }
        let version = r.u32("version")?;
        let header_len = r.u32("header length")?;
        let payload_len = r.u64("payload length")?;
        let payload_crc = r.u32("payload checksum")?;
        let header_crc = r.u32("header checksum")?;
        if crc32fast::hash(&bytes[0..28]) != header_crc {
            return Err(StateError::BadHeader("header checksum mismatch"));
        }
        if version != STATE_VERSION {
            return Err(StateError::UnsupportedVersion { found: version });
        }
        if header_len as usize != STATE_HEADER_LEN {
            return Err(StateError::BadHeader("wrong header length"));
        }
        if payload_len > MAX_STATE_BYTES {
            return Err(StateError::TooLarge {
                len: payload_len,
                max: MAX_STATE_BYTES,
            });
        }
        let payload = &bytes[STATE_HEADER_LEN..];
        if (payload.len() as u64) < payload_len {
            return Err(StateError::Truncated {
                what: "payload",
                needed: payload_len,
                available: payload.len() as u64,
            });
        }
        if payload.len() as u64 > payload_len {
            return Err(StateError::Trailing(payload.len() as u64 - payload_len));
        }
        let found = crc32fast::hash(payload);
        if found != payload_crc {
            return Err(StateError::Checksum {
                expected: payload_crc,
                found,
            });
        }
        Self::decode_payload(payload)
    }

    /// Decodes a payload without header or checksum (the structural part
    /// of [`VmSnapshot::decode`]; public for fuzzing).
    ///
    /// # Errors
    ///
    /// As [`VmSnapshot::decode`].
    pub fn decode_payload(payload: &[u8]) -> Result<Self, StateError> {
        let mut r = Reader::new(payload);
        let mem_bytes = r.u64("mem_bytes")?;
        let vcpu_count = r.u32("vcpu count")?;
        if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
            return Err(StateError::Limit {
                what: "vcpu count",
                count: u64::from(vcpu_count),
                max: u64::from(MAX_VCPUS),
            });
        }
        let boot_params = r.bytes("boot params", 4096)?.to_vec();
        let irqchips = [
            r.blob::<kvm_irqchip>("irqchip")?,
            r.blob::<kvm_irqchip>("irqchip")?,
            r.blob::<kvm_irqchip>("irqchip")?,
        ];
        for (chip, id) in irqchips.iter().zip([
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ]) {
            if chip.chip_id != id {
                return Err(StateError::Invalid(format!(
                    "irqchip {} where {id} belongs",
                    chip.chip_id
                )));
            }
        }
        let pit = r.blob::<kvm_pit_state2>("pit")?;
        let clock = r.blob::<kvm_clock_data>("clock")?;
        let ndev = r.count("device count", MAX_DEVICES)?;
        let mut devices = DeviceStates::new();
        for _ in 0..ndev {
            let len = usize::from(r.u16("device name length")?);
            if len == 0 || len > MAX_DEVICE_NAME {
                return Err(StateError::Limit {
                    what: "device name length",
                    count: len as u64,
                    max: MAX_DEVICE_NAME as u64,
                });
            }
            let name = std::str::from_utf8(r.take("device name", len)?)
                .map_err(|_| StateError::Invalid("device name is not UTF-8".into()))?
                .to_owned();
            let state = r.bytes("device state", MAX_DEVICE_STATE)?.to_vec();
            if devices.insert(name.clone(), state).is_some() {
                return Err(StateError::Invalid(format!("device {name} appears twice")));
            }
        }
        let mut vcpus = Vec::with_capacity(vcpu_count as usize);
        for index in 0..vcpu_count {
            let id = r.u32("vcpu id")?;
            if id != index {
                return Err(StateError::Invalid(format!(
                    "vCPU {id} where vCPU {index} belongs"
                )));
            }
            let tsc_khz = r.u32("tsc_khz")?;
            let n = r.count("cpuid entries", KVM_MAX_CPUID_ENTRIES)?;
            let mut cpuid = Vec::with_capacity(n);
            for _ in 0..n {
                cpuid.push(r.raw::<kvm_cpuid_entry2>("cpuid entry")?);
            }
            let mp_state = r.blob("mp_state")?;
            let regs = r.blob("regs")?;
            let sregs = r.blob("sregs")?;
            let xsave = r.blob("xsave")?;
            let xcrs = r.blob("xcrs")?;
            let debugregs = r.blob("debugregs")?;
            let lapic = r.blob("lapic")?;
            let n = r.count("msr count", MAX_MSRS)?;
            let mut msrs = Vec::with_capacity(n);
            for _ in 0..n {
                let index = r.u32("msr index")?;
                if r.u32("msr reserved")? != 0 {
                    return Err(StateError::Invalid(format!(
                        "reserved bits set in MSR {index:#x}"
                    )));
                }
                let data = r.u64("msr data")?;
                msrs.push(kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                });
            }
            let events = r.blob("vcpu events")?;
            vcpus.push(VcpuSnapshot {
                id,
                cpuid,
                tsc_khz,
                mp_state,
                regs,
                sregs,
                xsave,
                xcrs,
                debugregs,
                lapic,
                msrs,
                events,
            });
        }
        if r.left() != 0 {
            return Err(StateError::Trailing(r.left() as u64));
        }
        Ok(VmSnapshot {
            mem_bytes,
            boot_params,
            irqchips,
            pit,
            clock,
            devices,
            vcpus,
        })
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn blob<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.bytes(v.as_bytes());
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }
    fn left(&self) -> usize {
        self.rest.len()
    }
    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], StateError> {
        if n > self.rest.len() {
            return Err(StateError::Truncated {
                what,
                needed: n as u64,
                available: self.rest.len() as u64,
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(what, N)?);
        Ok(a)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, StateError> {
        self.array(what).map(u16::from_le_bytes)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, StateError> {
        self.array(what).map(u32::from_le_bytes)
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, StateError> {
        self.array(what).map(u64::from_le_bytes)
    }
    /// A `u32` count, at most `max`.
    fn count(&mut self, what: &'static str, max: usize) -> Result<usize, StateError> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(StateError::Limit {
                what,
                count: n as u64,
                max: max as u64,
            });
        }
        Ok(n)
    }
    fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], StateError> {
        let n = self.count(what, max)?;
        self.take(what, n)
    }
    fn raw<T: FromBytes>(&mut self, what: &'static str) -> Result<T, StateError> {
        let b = self.take(what, size_of::<T>())?;
        T::read_from_bytes(b).map_err(|_| StateError::StructSize {
            what,
            expected: size_of::<T>() as u64,
            found: b.len() as u64,
        })
    }
    fn blob<T: FromBytes>(&mut self, what: &'static str) -> Result<T, StateError> {
        let n = self.u32(what)? as u64;
        if n != size_of::<T>() as u64 {
            return Err(StateError::StructSize {
                what,
                expected: size_of::<T>() as u64,
                found: n,
            });
        }
        self.raw(what)
    }
}

// ---------------------------------------------------------------------------
// KVM: saving and restoring one vCPU, and the VM-level state.

/// The MSRs saved per vCPU: KVM's supported index list plus
/// `IA32_TSC_DEADLINE`, `IA32_APIC_BASE`, `EFER`, FS/GS base (once per
/// process; MSRs that `KVM_GET_MSRS` refuses are dropped from it).
///
/// # Errors
///
/// Opening `/dev/kvm` or `KVM_GET_MSR_INDEX_LIST` failing.
pub fn msr_indices() -> Result<Vec<u32>, StateError> {
    static LIST: OnceLock<Mutex<Vec<u32>>> = OnceLock::new();
    if let Some(l) = LIST.get() {
        return Ok(l.lock().unwrap_or_else(|e| e.into_inner()).clone());
    }
    let list = super::vm::open_kvm()?
        .get_msr_index_list()
        .map_err(kvm(None, "KVM_GET_MSR_INDEX_LIST"))?;
    let mut v: Vec<u32> = list.as_slice().to_vec();
    for extra in [
        MSR_IA32_APIC_BASE,
        MSR_EFER,
        MSR_FS_BASE,
        MSR_GS_BASE,
        MSR_IA32_TSC_DEADLINE,
    ] {
        if !v.contains(&extra) {
            v.push(extra);
        }
    }
    let l = LIST.get_or_init(|| Mutex::new(v));
    Ok(l.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// Drops an MSR that `KVM_GET_MSRS` refuses from the saved list.
fn drop_msr(index: u32) {
    MSR_DROPPED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(index);
}

/// MSRs `KVM_GET_MSRS` refused on this host (logged once each).
static MSR_DROPPED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn readable_msrs() -> Result<Vec<u32>, StateError> {
    let dropped = MSR_DROPPED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(msr_indices()?
        .into_iter()
        .filter(|i| !dropped.contains(i))
        .collect())
}

fn get_msrs(fd: &VcpuFd, id: u32) -> Result<Vec<kvm_msr_entry>, StateError> {
    let indices = readable_msrs()?;
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: &[u32] = &indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::Limit {
            what: "msr count",
            count: entries.len() as u64,
            max: KVM_MAX_MSR_ENTRIES as u64,
        })?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(kvm(Some(id), "KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(chunk.len())]);
        if n < chunk.len() {
            // KVM stops at the first MSR it cannot read: drop it for good
            // and go on after it.
            tracing::warn!(
                vcpu = id,
                msr = format_args!("{:#x}", chunk[n]),
                "KVM_GET_MSRS refuses this MSR: not saved"
            );
            drop_msr(chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(out)
}

/// Reads the state of a vCPU that is not in `KVM_RUN` and has no exit
/// pending (a Paused vCPU thread; `cpuid` is left empty: the [`Vm`] fills
/// it in). About 11 vCPU ioctls.
///
/// # Errors
///
/// [`StateError::Kvm`] naming the ioctl that failed.
pub fn save_vcpu(fd: &VcpuFd, id: u32) -> Result<VcpuSnapshot, StateError> {
    let v = Some(id);
    Ok(VcpuSnapshot {
        id,
        cpuid: Vec::new(),
        tsc_khz: fd.get_tsc_khz().map_err(kvm(v, "KVM_GET_TSC_KHZ"))?,
        mp_state: fd.get_mp_state().map_err(kvm(v, "KVM_GET_MP_STATE"))?,
        regs: fd.get_regs().map_err(kvm(v, "KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm(v, "KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(kvm(v, "KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(kvm(v, "KVM_GET_XCRS"))?,
        debugregs: fd.get_debug_regs().map_err(kvm(v, "KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(kvm(v, "KVM_GET_LAPIC"))?,
        msrs: get_msrs(fd, id)?,
        events: fd
            .get_vcpu_events()
            .map_err(kvm(v, "KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Writes `s` into a vCPU created with `s.cpuid`, in the documented order
/// (TSC_KHZ, MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRS,
/// VCPU_EVENTS).
///
/// # Errors
///
/// [`StateError::Kvm`] naming the ioctl; [`StateError::MsrsIncomplete`].
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuSnapshot) -> Result<(), StateError> {
    let v = Some(s.id);
    if let Err(e) = fd.set_tsc_khz(s.tsc_khz) {
        // Without TSC scaling KVM refuses any change, even to the current
        // value on some hosts: fine when the frequency already matches.
        let now = fd.get_tsc_khz().map_err(kvm(v, "KVM_GET_TSC_KHZ"))?;
        if now != s.tsc_khz {
            return Err(kvm(v, "KVM_SET_TSC_KHZ")(e));
        }
    }
    fd.set_mp_state(s.mp_state)
        .map_err(kvm(v, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(kvm(v, "KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(kvm(v, "KVM_SET_SREGS"))?;
    // SAFETY: `s.xsave` is a whole `kvm_xsave` (4 KiB). The kernel reads
    // past it only when the VM's XSAVE size exceeds 4 KiB, which needs
    // dynamically enabled features (AMX) granted with
    // `arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)`; simrep never asks for them.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm(v, "KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm(v, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(kvm(v, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(kvm(v, "KVM_SET_LAPIC"))?;
    for chunk in s.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| StateError::Limit {
            what: "msr count",
            count: chunk.len() as u64,
            max: KVM_MAX_MSR_ENTRIES as u64,
        })?;
        let n = fd.set_msrs(&msrs).map_err(kvm(v, "KVM_SET_MSRS"))?;
        if n < chunk.len() {
            return Err(StateError::MsrsIncomplete {
                vcpu: s.id,
                index: chunk[n].index,
                set: n,
                total: chunk.len(),
            });
        }
    }
    fd.set_vcpu_events(&s.events)
        .map_err(kvm(v, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The VM-level KVM state: irqchips, PIT, clock.
struct VmLevel {
    irqchips: [kvm_irqchip; 3],
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

fn save_vm_level(fd: &VmFd) -> Result<VmLevel, StateError> {
    let mut irqchips: [kvm_irqchip; 3] = Default::default();
    for (chip, id) in irqchips.iter_mut().zip([
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ]) {
        chip.chip_id = id;
        fd.get_irqchip(chip).map_err(kvm(None, "KVM_GET_IRQCHIP"))?;
    }
    let pit = fd.get_pit2().map_err(kvm(None, "KVM_GET_PIT2"))?;
    let mut clock = fd.get_clock().map_err(kvm(None, "KVM_GET_CLOCK"))?;
    // With KVM_CLOCK_REALTIME, KVM_SET_CLOCK would add the wall time that
    // passed since the save; the other flags only describe the host. The
    // clock continues from the saved value, as the TSC does.
    clock.flags = 0;
    Ok(VmLevel {
        irqchips,
        pit,
        clock,
    })
}

fn restore_vm_level(fd: &VmFd, s: &VmSnapshot) -> Result<(), StateError> {
    for chip in &s.irqchips {
        fd.set_irqchip(chip).map_err(kvm(None, "KVM_SET_IRQCHIP"))?;
    }
    fd.set_pit2(&s.pit).map_err(kvm(None, "KVM_SET_PIT2"))?;
    let mut clock = s.clock;
    clock.flags = 0;
    fd.set_clock(&clock).map_err(kvm(None, "KVM_SET_CLOCK"))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Devices.

/// A device whose state travels with a snapshot. Implement it for a device
/// and register it with [`MmioBus::register_device_state`]; the name must
/// be unique, stable across versions, and at most [`MAX_DEVICE_NAME`]
/// bytes.
pub trait DeviceState: Send + Sync {
    /// The device's name in [`VmSnapshot::devices`].
    fn state_name(&self) -> &str;
    /// The device's state as bytes, with its own versioning. Called while
    /// all vCPUs are paused.
    fn save_state(&self) -> Vec<u8>;
    /// Restores the state from [`DeviceState::save_state`]'s bytes (which
    /// may be corrupt: reject them with a reason, never panic). Called
    /// before any vCPU runs.
    ///
    /// # Errors
    ///
    /// A description of what is wrong with the bytes.
    fn restore_state(&self, bytes: &[u8]) -> Result<(), String>;
}

/// The devices registered on a bus and the state blobs waiting for a
/// device that has not registered yet (a restore applies blobs before the
/// caller attaches its devices).
#[derive(Default)]
pub struct DeviceRegistry {
    devices: Mutex<Vec<Arc<dyn DeviceState>>>,
    pending: Mutex<DeviceStates>,
}

impl std::fmt::Debug for DeviceRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|d| d.state_name().to_owned())
            .collect();
        f.debug_struct("DeviceRegistry")
            .field("devices", &names)
            .finish_non_exhaustive()
    }
}

/// Name of the console's state blob.
pub const CONSOLE_STATE: &str = "console";
/// Name of the system device's state blob (the guest-visible clock).
pub const SYSTEM_STATE: &str = "system";

impl MmioBus {
    /// Registers a device whose state is saved with every snapshot. If a
    /// restore left a blob under its name, the device gets it now.
    ///
    /// # Errors
    ///
    /// [`StateError::Device`] when the pending blob is rejected or the name
    /// is taken or invalid.
    pub fn register_device_state(&self, dev: Arc<dyn DeviceState>) -> Result<(), StateError> {
        let name = dev.state_name().to_owned();
        let bad = |reason: &str| StateError::Device {
            name: name.clone(),
            reason: reason.into(),
        };
        if name.is_empty() || name.len() > MAX_DEVICE_NAME {
            return Err(bad("the name must be 1..=64 bytes"));
        }
        if name == CONSOLE_STATE || name == SYSTEM_STATE {
            return Err(bad("the name is reserved"));
        }
        let reg = self.device_registry();
        let mut devices = reg.devices.lock().unwrap_or_else(|e| e.into_inner());
        if devices.iter().any(|d| d.state_name() == name) {
            return Err(bad("a device with this name is already registered"));
        }
        let pending = reg
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name);
        if let Some(bytes) = pending {
            dev.restore_state(&bytes).map_err(|r| bad(&r))?;
        }
        devices.push(dev);
        Ok(())
    }

    /// Every device's state: the console, the system clock and the
    /// registered devices.
    pub fn save_devices(&self) -> DeviceStates {
        let mut out = DeviceStates::new();
        let mut console = Vec::new();
        for (vcpu, bytes) in self.console_partial_lines() {
            console.extend_from_slice(&vcpu.to_le_bytes());
            console.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            console.extend_from_slice(&bytes);
        }
        out.insert(CONSOLE_STATE.into(), console);
        out.insert(
            SYSTEM_STATE.into(),
            self.guest_time_ns().to_le_bytes().to_vec(),
        );
        let reg = self.device_registry();
        for d in reg.devices.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            out.insert(d.state_name().to_owned(), d.save_state());
        }
        out
    }

    /// Restores [`MmioBus::save_devices`]'s blobs: the built-in devices and
    /// registered ones now, the others when they register.
    ///
    /// # Errors
    ///
    /// [`StateError::Device`] for a blob a device rejects.
    pub fn restore_devices(&self, states: &DeviceStates) -> Result<(), StateError> {
        let bad = |name: &str, reason: &str| StateError::Device {
            name: name.into(),
            reason: reason.into(),
        };
        let reg = self.device_registry();
        let devices = reg.devices.lock().unwrap_or_else(|e| e.into_inner());
        let mut pending = reg.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (name, bytes) in states {
            match name.as_str() {
                CONSOLE_STATE => {
                    let mut lines = BTreeMap::new();
                    let mut r = Reader::new(bytes);
                    while r.left() > 0 {
                        let vcpu = r
                            .u32("console vcpu")
                            .map_err(|e| bad(name, &e.to_string()))?;
                        let line = r
                            .bytes("console line", super::abi::CONSOLE_MAX_LINE as usize)
                            .map_err(|e| bad(name, &e.to_string()))?;
                        lines.insert(vcpu, line.to_vec());
                    }
                    self.set_console_partial_lines(lines);
                }
                SYSTEM_STATE => {
                    let ns: [u8; 8] = bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| bad(name, "expected 8 bytes of guest time"))?;
                    self.set_guest_time_ns(u64::from_le_bytes(ns));
                }
                _ => match devices.iter().find(|d| d.state_name() == name) {
                    Some(d) => d.restore_state(bytes).map_err(|r| bad(name, &r))?,
                    None => {
                        pending.insert(name.clone(), bytes.clone());
                    }
                },
            }
        }
        Ok(())
    }

    /// Names of restored blobs no registered device has claimed yet.
    pub fn unclaimed_device_states(&self) -> Vec<String> {
        self.device_registry()
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The VM: save and restore.

/// How long the parts of a save took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveTimes {
    /// vCPU state (all vCPUs in parallel, each on its own thread).
    pub vcpus: Duration,
    /// VM-level state and devices (overlapping the vCPUs).
    pub vm: Duration,
    /// The whole save.
    pub total: Duration,
}

/// How long the parts of a restore took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreTimes {
    /// Creating the VM and its (pre-faulted) memory.
    pub create: Duration,
    /// Loading guest memory.
    pub memory: Duration,
    /// Creating vCPUs and setting all KVM state, spawning threads.
    pub kvm_state: Duration,
    /// The whole restore.
    pub total: Duration,
}

impl Vm {
    /// Saves the whole VM state except guest memory. Every started vCPU must
    /// be Paused ([`Vm::pause_all`]); the vCPUs save their own state on
    /// their threads in parallel while this thread saves the VM-level state
    /// and the devices.
    ///
    /// # Errors
    ///
    /// [`StateError::NotPaused`] when a vCPU is running or has ended;
    /// [`StateError::Vm`] before the vCPUs are started; [`StateError::Kvm`]
    /// for a failing ioctl; [`StateError::NoAnswer`].
    pub fn save_state(&self) -> Result<VmSnapshot, StateError> {
        self.save_state_timed().map(|(s, _)| s)
    }

    /// [`Vm::save_state`] with the time its parts took.
    ///
    /// # Errors
    ///
    /// As [`Vm::save_state`].
    pub fn save_state_timed(&self) -> Result<(VmSnapshot, SaveTimes), StateError> {
        let t0 = Instant::now();
        let handles = self.vcpu_handles();
        if handles.is_empty() {
            return Err(StateError::Vm(VmError::Phase("no vCPU started")));
        }
        for h in handles {
            let state = h.state();
            if state != VcpuState::Paused {
                return Err(StateError::NotPaused {
                    vcpu: h.id(),
                    state,
                });
            }
        }
        for h in handles {
            h.send(VcpuCommand::Save);
        }
        let vm_level = save_vm_level(self.fd());
        let devices = self.bus().save_devices();
        let boot_params = self
            .memory()
            .read_obj::<BootParams>(super::abi::BOOT_PARAMS_GPA)
            .map(|bp| bp.as_slice().to_vec())
            .unwrap_or_default();
        let t_vm = t0.elapsed();
        let deadline = Instant::now() + SAVE_TIMEOUT;
        let mut vcpus = Vec::with_capacity(handles.len());
        let mut first_err = None;
        for (h, cpuid) in handles.iter().zip(self.vcpu_cpuids()) {
            let answered = loop {
                match h.wait_ack(deadline.saturating_duration_since(Instant::now())) {
                    Some(VcpuAck::Saved) => break true,
                    Some(_) => continue,
                    None => break false,
                }
            };
            let result = match (answered, h.take_saved()) {
                (true, Some(r)) => r,
                _ => Err(StateError::NoAnswer {
                    vcpu: h.id(),
                    timeout: SAVE_TIMEOUT,
                }),
            };
            match result {
                Ok(mut s) => {
                    s.cpuid = cpuid.as_slice().to_vec();
                    vcpus.push(s);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let t_vcpus = t0.elapsed();
        let vm_level = vm_level?;
        let snapshot = VmSnapshot {
            mem_bytes: self.memory().size(),
            boot_params,
            irqchips: vm_level.irqchips,
            pit: vm_level.pit,
            clock: vm_level.clock,
            devices,
            vcpus,
        };
        Ok((
            snapshot,
            SaveTimes {
                vcpus: t_vcpus,
                vm: t_vm,
                total: t0.elapsed(),
            },
        ))
    }

    /// Creates a fresh VM from `snapshot`: memory of the saved size filled
    /// by `load_memory`, vCPUs created with the saved CPUID, every register
    /// set and the VM-level and device state restored in the documented
    /// order. The vCPU threads are started **Paused**: attach devices
    /// (which pick up their saved state on registration), then call
    /// [`Vm::resume_all`].
    ///
    /// # Errors
    ///
    /// [`StateError::Vm`] when the VM cannot be created; the error of
    /// `load_memory`; [`StateError::Kvm`] for a refused register set;
    /// [`StateError::Device`] for device state a device rejects.
    pub fn restore(
        snapshot: &VmSnapshot,
        load_memory: impl FnOnce(&GuestMemory) -> Result<(), StateError>,
    ) -> Result<(Vm, RestoreTimes), StateError> {
        let t0 = Instant::now();
        super::boot::check_config(snapshot.mem_bytes, snapshot.vcpu_count())
            .map_err(|e| StateError::Invalid(e.to_string()))?;
        let mut vm = Vm::new(snapshot.mem_bytes)?;
        let t_create = t0.elapsed();
        load_memory(vm.memory())?;
        let t_mem = t0.elapsed();
        let mut cpuids = Vec::with_capacity(snapshot.vcpus.len());
        for v in &snapshot.vcpus {
            let cpuid = CpuId::from_entries(&v.cpuid).map_err(|_| StateError::Limit {
                what: "cpuid entries",
                count: v.cpuid.len() as u64,
                max: KVM_MAX_CPUID_ENTRIES as u64,
            })?;
            cpuids.push(cpuid);
        }
        vm.create_vcpus_with_cpuid(cpuids)?;
        let mut failure = None;
        vm.spawn_created_vcpus(|id, fd| {
            let Some(s) = snapshot.vcpus.get(id as usize) else {
                failure = Some(StateError::Invalid(format!("no state for vCPU {id}")));
                return Err(VmError::Phase("vCPU without saved state"));
            };
            restore_vcpu(fd, s).map_err(|e| {
                failure = Some(e);
                VmError::Phase("restoring vCPU state")
            })
        })
        .map_err(|e| failure.take().unwrap_or(StateError::Vm(e)))?;
        restore_vm_level(vm.fd(), snapshot)?;
        vm.bus().restore_devices(&snapshot.devices)?;
        if !vm.fd().check_extension(Cap::AdjustClock) {
            tracing::warn!("KVM lacks ADJUST_CLOCK: kvmclock may jump");
        }
        let total = t0.elapsed();
        Ok((
            vm,
            RestoreTimes {
                create: t_create,
                memory: t_mem - t_create,
                kvm_state: total - t_mem,
                total,
            },
        ))
    }
}

/// A `load_memory` for [`Vm::restore`] that copies another VM's guest
/// memory (same process; its vCPUs must be paused), 2 MiB at a time.
///
/// # Errors
///
/// [`StateError::Invalid`] when the sizes differ; [`StateError::Memory`].
pub fn copy_memory(from: &GuestMemory, to: &GuestMemory) -> Result<(), StateError> {
    if from.size() != to.size() {
        return Err(StateError::Invalid(format!(
            "memory of {} bytes cannot be restored into {} bytes",
            from.size(),
            to.size()
        )));
    }
    let mut buf = vec![0u8; super::abi::LARGE_PAGE_SIZE as usize];
    let mut gpa = 0;
    while gpa < from.size() {
        from.read(gpa, &mut buf)?;
        to.write(gpa, &buf)?;
        gpa += buf.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
