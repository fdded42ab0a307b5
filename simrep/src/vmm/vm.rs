//! The KVM VM: `/dev/kvm`, the VM fd, guest memory registration, the
//! in-kernel irqchip and PIT, vCPU creation, and pausing/resuming all vCPUs.
//!
//! Devices and the guest's boot layout live elsewhere ([`super::devices`],
//! [`super::boot`]); this type only knows KVM.

use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_regs, kvm_sregs, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use super::devices::MmioBus;
use super::memory::{GuestMemory, MemoryError};
use super::vcpu::{
    install_kick_handler, VcpuAck, VcpuCommand, VcpuExitEvent, VcpuHandle, VcpuState,
};
use crate::dirty::{DirtyMode, DirtyRings, DirtyTracker};

/// How long a vCPU may take to answer a pause or resume.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of creating and driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` does not exist: no KVM on this host (or not in this
    /// container).
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel, kvm_amd or kvm_pvm, or run on a host that has it)")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// `/dev/kvm` exists but this user may not open it.
    #[error(
        "permission denied opening /dev/kvm: run as root or join the group that owns /dev/kvm"
    )]
    NoPermission(#[source] kvm_ioctls::Error),
    /// Opening `/dev/kvm` failed otherwise.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The device answered `KVM_GET_API_VERSION` wrongly: not KVM.
    #[error("/dev/kvm is not a KVM device (API version {version}, expected 12)")]
    NotKvm {
        /// What it answered (-1: the ioctl failed).
        version: i32,
    },
    /// KVM lacks a capability the VMM needs.
    #[error("KVM lacks the {0} capability")]
    MissingCapability(&'static str),
    /// A VM or system ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU ioctl failed while the vCPU was being set up.
    #[error("vCPU {vcpu}: {what} failed")]
    VcpuSetup {
        /// The vCPU.
        vcpu: u32,
        /// The ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created.
    #[error("cannot create guest memory")]
    Memory(#[from] MemoryError),
    /// A vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {vcpu}")]
    Thread {
        /// The vCPU.
        vcpu: u32,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
    /// The vCPUs were already started, or not created yet.
    #[error("vCPUs are in the wrong phase: {0}")]
    Phase(&'static str),
    /// A running vCPU did not answer a pause or resume in time.
    #[error("vCPU {vcpu} did not answer {what} within {timeout:?}")]
    NoAck {
        /// The vCPU.
        vcpu: u32,
        /// "pause" or "resume".
        what: &'static str,
        /// How long the VMM waited.
        timeout: Duration,
    },
    /// Setting up dirty tracking failed (see [`crate::dirty`]).
    #[error("dirty tracking")]
    Dirty(#[from] crate::dirty::DirtyError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A KVM VM with its guest memory and vCPUs.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: Arc<GuestMemory>,
    bus: Arc<MmioBus>,
    /// vCPU fds between [`Vm::create_vcpus`] and [`Vm::start`].
    created: Vec<VcpuFd>,
    vcpus: Vec<VcpuHandle>,
    exits: Receiver<VcpuExitEvent>,
    exits_tx: mpsc::Sender<VcpuExitEvent>,
    /// Dirty tracking, once [`Vm::enable_dirty_log`] turned it on.
    dirty_mode: Option<DirtyMode>,
    /// Ring mode: every vCPU's dirty ring, mapped in [`Vm::create_vcpus`].
    dirty_rings: Option<Arc<DirtyRings>>,
    /// The CPUID each vCPU was created with, by index (state save).
    cpuids: Vec<CpuId>,
}

/// Opens `/dev/kvm`, mapping the usual failures to clear errors.
///
/// # Errors
///
/// [`VmError::NoKvm`], [`VmError::NoPermission`], [`VmError::OpenKvm`] or
/// [`VmError::NotKvm`].
pub fn open_kvm() -> Result<Kvm, VmError> {
    open_kvm_at(c"/dev/kvm")
}

/// [`open_kvm`] for another device path (tests, odd containers).
///
/// # Errors
///
/// As [`open_kvm`].
pub fn open_kvm_at(path: &std::ffi::CStr) -> Result<Kvm, VmError> {
    let kvm = Kvm::new_with_path(path).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::NoKvm(e),
        libc::EACCES | libc::EPERM => VmError::NoPermission(e),
        _ => VmError::OpenKvm(e),
    })?;
    match kvm.get_api_version() {
        KVM_API_VERSION => Ok(kvm),
        version => Err(VmError::NotKvm { version }),
    }
}

/// The only KVM API version there has ever been.
const KVM_API_VERSION: i32 = 12;

impl Vm {
    /// Creates a VM (type 0) with `mem_size` bytes of pre-faulted guest RAM
    /// in slot 0, an in-kernel irqchip (PIC, IOAPIC, LAPICs) and a PIT.
    ///
    /// # Errors
    ///
    /// [`VmError`] naming the step that failed.
    pub fn new(mem_size: u64) -> Result<Self, VmError> {
        let t0 = Instant::now();
        let kvm = open_kvm()?;
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::UserMemory, "USER_MEMORY"),
            (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
            (Cap::Pit2, "PIT2"),
            (Cap::ExtCpuid, "EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let fd = kvm
            .create_vm_with_type(0)
            .map_err(kvm_err("KVM_CREATE_VM"))?;
        let t_vm = t0.elapsed();
        let memory = Arc::new(GuestMemory::new(mem_size)?);
        let t_mem = t0.elapsed();
        let region = memory.kvm_region(0);
        // SAFETY: the region describes `memory`'s mapping, which lives in
        // an `Arc` this VM holds until after the VM fd is closed (fields
        // drop in declaration order: `fd` before `memory`), and vCPU threads
        // hold their own `Arc` until they are joined.
        unsafe { fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        install_kick_handler().map_err(kvm_err("sigaction (vCPU kick signal)"))?;
        tracing::debug!(create_vm = ?t_vm, memory = ?(t_mem - t_vm), slot_irqchip_pit = ?(t0.elapsed() - t_mem), "VM created");
        let (exits_tx, exits) = mpsc::channel();
        Ok(Vm {
            kvm,
            fd,
            memory,
            bus: Arc::new(MmioBus::new()),
            created: Vec::new(),
            vcpus: Vec::new(),
            exits,
            exits_tx,
            dirty_mode: None,
            dirty_rings: None,
            cpuids: Vec::new(),
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// The MMIO bus (to subscribe to the console).
    pub fn bus(&self) -> &Arc<MmioBus> {
        &self.bus
    }

    /// The VM fd, for state save/restore and dirty logging.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Creates `count` vCPUs with the host's supported CPUID (APIC IDs set,
    /// x2APIC advertised). They do not run until [`Vm::start`].
    ///
    /// # Errors
    ///
    /// [`VmError::Phase`] if vCPUs exist; otherwise the failing ioctl.
    pub fn create_vcpus(&mut self, count: u32) -> Result<(), VmError> {
        if !self.created.is_empty() || !self.vcpus.is_empty() {
            return Err(VmError::Phase("vCPUs already created"));
        }
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        self.create_vcpus_with_cpuid((0..count).map(|id| vcpu_cpuid(&supported, id)).collect())
    }

    /// Creates one vCPU per entry of `cpuids`, each with that CPUID table
    /// (a restore passes the saved tables). They do not run until
    /// [`Vm::start`].
    ///
    /// # Errors
    ///
    /// [`VmError::Phase`] if vCPUs exist; otherwise the failing ioctl.
    pub fn create_vcpus_with_cpuid(&mut self, cpuids: Vec<CpuId>) -> Result<(), VmError> {
        if !self.created.is_empty() || !self.vcpus.is_empty() {
            return Err(VmError::Phase("vCPUs already created"));
        }
        for (id, cpuid) in (0u32..).zip(&cpuids) {
            let vcpu = self
                .fd
                .create_vcpu(u64::from(id))
                .map_err(|source| VmError::VcpuSetup {
                    vcpu: id,
                    what: "KVM_CREATE_VCPU",
                    source,
                })?;
            vcpu.set_cpuid2(cpuid)
                .map_err(|source| VmError::VcpuSetup {
                    vcpu: id,
                    what: "KVM_SET_CPUID2",
                    source,
                })?;
            self.created.push(vcpu);
        }
        if let Some(DirtyMode::Ring { entries }) = self.dirty_mode {
            let vm = crate::dirty::dup_vm_fd(&self.fd)?;
            let pages = self.memory.size() / crate::dirty::PAGE_SIZE;
            let rings = DirtyRings::map(vm, &self.created, entries, pages)?;
            self.dirty_rings = Some(Arc::new(rings));
        }
        self.cpuids = cpuids;
        Ok(())
    }

    /// Turns on dirty tracking of guest RAM in `mode`: enables the KVM
    /// capability and re-registers slot 0 with `KVM_MEM_LOG_DIRTY_PAGES`.
    /// Call between [`Vm::new`] and [`Vm::create_vcpus`] (the dirty ring
    /// must exist before any vCPU); then take the tracker with
    /// [`Vm::dirty_tracker`].
    ///
    /// # Errors
    ///
    /// [`VmError::Phase`] once vCPUs exist or when tracking is already on;
    /// [`VmError::Dirty`] when KVM refuses the mode;
    /// [`VmError::Kvm`] when the slot cannot be re-registered.
    pub fn enable_dirty_log(&mut self, mode: DirtyMode) -> Result<(), VmError> {
        if !self.created.is_empty() || !self.vcpus.is_empty() {
            return Err(VmError::Phase(
                "dirty tracking must be enabled before vCPUs are created",
            ));
        }
        if self.dirty_mode.is_some() {
            return Err(VmError::Phase("dirty tracking is already enabled"));
        }
        crate::dirty::enable(&self.fd, mode)?;
        let mut region = self.memory.kvm_region(0);
        region.flags |= kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
        // SAFETY: as in `Vm::new`: the same mapping, kept alive by this VM
        // for longer than the VM fd; only the flags change.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (dirty logging)"))?;
        self.dirty_mode = Some(mode);
        tracing::debug!(?mode, "dirty tracking enabled");
        Ok(())
    }

    /// A tracker that harvests the pages the guest dirtied (see
    /// [`DirtyTracker::harvest`]). Several trackers would steal each
    /// other's pages: take one.
    ///
    /// # Errors
    ///
    /// [`VmError::Phase`] without [`Vm::enable_dirty_log`], or in ring mode
    /// before [`Vm::create_vcpus`]; [`VmError::Dirty`].
    pub fn dirty_tracker(&self) -> Result<DirtyTracker, VmError> {
        let mode = self
            .dirty_mode
            .ok_or(VmError::Phase("dirty tracking is not enabled"))?;
        if matches!(mode, DirtyMode::Ring { .. }) && self.dirty_rings.is_none() {
            return Err(VmError::Phase(
                "the dirty rings exist once the vCPUs are created",
            ));
        }
        let pages = self.memory.size() / crate::dirty::PAGE_SIZE;
        Ok(DirtyTracker::new(
            &self.fd,
            mode,
            pages,
            self.dirty_rings.clone(),
        )?)
    }

    /// The TSC frequency of vCPU 0 in kHz.
    ///
    /// # Errors
    ///
    /// [`VmError::Phase`] before [`Vm::create_vcpus`]; the ioctl's errno.
    pub fn tsc_khz(&self) -> Result<u32, VmError> {
        let vcpu = self
            .created
            .first()
            .ok_or(VmError::Phase("no vCPU created"))?;
        vcpu.get_tsc_khz().map_err(|source| VmError::VcpuSetup {
            vcpu: 0,
            what: "KVM_GET_TSC_KHZ",
            source,
        })
    }

    /// Sets every created vCPU's registers (`init(id, current sregs)`
    /// returns its entry state), makes them runnable, starts their threads
    /// and resumes them.
    ///
    /// # Errors
    ///
    /// [`VmError::Phase`] unless vCPUs were created and not started; the
    /// failing ioctl; [`VmError::Thread`].
    pub fn start(
        &mut self,
        init: impl Fn(u32, kvm_sregs) -> (kvm_regs, kvm_sregs),
    ) -> Result<(), VmError> {
        self.spawn_created_vcpus(|id, fd| {
            let setup = |what| {
                move |source| VmError::VcpuSetup {
                    vcpu: id,
                    what,
                    source,
                }
            };
            let sregs = fd.get_sregs().map_err(setup("KVM_GET_SREGS"))?;
            let (regs, sregs) = init(id, sregs);
            fd.set_sregs(&sregs).map_err(setup("KVM_SET_SREGS"))?;
            fd.set_regs(&regs).map_err(setup("KVM_SET_REGS"))?;
            // With the in-kernel LAPIC, APs wait for INIT/SIPI; the guest
            // has no AP start-up code, so every vCPU starts runnable.
            let mp = kvm_bindings::kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            };
            fd.set_mp_state(mp).map_err(setup("KVM_SET_MP_STATE"))
        })?;
        self.resume_all_and_wait()
    }

    /// Runs `setup(id, fd)` on every created vCPU and starts its thread,
    /// Paused (boot and restore share this).
    ///
    /// # Errors
    ///
    /// [`VmError::Phase`] unless vCPUs were created and not started; the
    /// error of `setup`; [`VmError::Thread`].
    pub fn spawn_created_vcpus(
        &mut self,
        mut setup: impl FnMut(u32, &VcpuFd) -> Result<(), VmError>,
    ) -> Result<(), VmError> {
        if self.created.is_empty() {
            return Err(VmError::Phase("no vCPU created, or already started"));
        }
        for (id, fd) in (0u32..).zip(self.created.drain(..)) {
            setup(id, &fd)?;
            let handle = VcpuHandle::spawn_tracked(
                id,
                fd,
                self.bus.clone(),
                self.memory.clone(),
                self.exits_tx.clone(),
                self.dirty_rings.clone(),
            )
            .map_err(|source| VmError::Thread { vcpu: id, source })?;
            self.bus.wakers().register(id, handle.wake_sender());
            self.vcpus.push(handle);
        }
        Ok(())
    }

    /// Number of started vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// States of the started vCPUs, by index.
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
        self.vcpus.iter().map(VcpuHandle::state).collect()
    }

    /// Sends `cmd` to every live vCPU; with `wait`, returns when each has
    /// answered it (acks of earlier resumes are skipped) or ended.
    fn broadcast(
        &self,
        cmd: VcpuCommand,
        wait: Option<VcpuAck>,
        what: &'static str,
    ) -> Result<(), VmError> {
        // Only vCPUs that have not ended take part; one that ends meanwhile
        // answers by closing its channel.
        let live: Vec<&VcpuHandle> = self
            .vcpus
            .iter()
            .filter(|v| v.state() != VcpuState::Exited && v.send(cmd))
            .collect();
        let Some(want) = wait else {
            return Ok(());
        };
        let deadline = Instant::now() + ACK_TIMEOUT;
        for v in live {
            loop {
                match v.wait_ack(deadline.saturating_duration_since(Instant::now())) {
                    Some(a) if a == want => break,
                    Some(_) => continue,
                    None if v.state() == VcpuState::Exited => break,
                    None => {
                        return Err(VmError::NoAck {
                            vcpu: v.id(),
                            what,
                            timeout: ACK_TIMEOUT,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Stops every vCPU at its next instruction boundary and returns when
    /// all are out of `KVM_RUN` with their last exit completed (or have
    /// ended). Guest memory and vCPU state are then stable until
    /// [`Vm::resume_all`].
    ///
    /// # Errors
    ///
    /// [`VmError::NoAck`] when a vCPU does not answer within 2 s.
    pub fn pause_all(&self) -> Result<(), VmError> {
        self.broadcast(VcpuCommand::Pause, Some(VcpuAck::Paused), "pause")
    }

    /// Lets every paused vCPU run again. Returns once the commands are
    /// sent: the vCPU threads wake on their own (the caller's work, such as
    /// compressing the epoch, need not wait for the scheduler to run them).
    ///
    /// # Errors
    ///
    /// None today; the `Result` keeps room for a failing resume path.
    pub fn resume_all(&self) -> Result<(), VmError> {
        self.broadcast(VcpuCommand::Resume, None, "resume")
    }

    /// [`Vm::resume_all`], then waits until every vCPU has left the Paused
    /// state.
    ///
    /// # Errors
    ///
    /// [`VmError::NoAck`] when a vCPU does not answer within 2 s.
    pub fn resume_all_and_wait(&self) -> Result<(), VmError> {
        self.broadcast(VcpuCommand::Resume, Some(VcpuAck::Resumed), "resume")
    }

    /// Waits up to `timeout` for a vCPU to end.
    pub fn wait_exit(&self, timeout: Duration) -> Option<VcpuExitEvent> {
        self.exits.recv_timeout(timeout).ok()
    }

    /// Ends every vCPU thread and joins them; returns the exit events not
    /// yet collected with [`Vm::wait_exit`].
    pub fn shutdown(&mut self) -> Vec<VcpuExitEvent> {
        let start = Instant::now();
        for v in &mut self.vcpus {
            v.stop();
        }
        self.vcpus.clear();
        tracing::debug!(elapsed = ?start.elapsed(), "vCPUs stopped");
        self.exits.try_iter().collect()
    }
}

// ---- state save/restore (simrep::vmm::state) ----
impl Vm {
    /// The started vCPUs' handles, by index.
    pub(crate) fn vcpu_handles(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// The CPUID tables the vCPUs were created with, by index.
    pub(crate) fn vcpu_cpuids(&self) -> &[CpuId] {
        &self.cpuids
    }
}
// ---- end state save/restore ----

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The supported CPUID, adjusted for vCPU `id`: its APIC ID in leaf 1 and
/// the x2APIC ID in leaves 0xb / 0x1f, x2APIC advertised.
fn vcpu_cpuid(supported: &CpuId, id: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24);
                e.ecx |= 1 << 21;
            }
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_no_kvm() {
        assert!(matches!(
            open_kvm_at(c"/nonexistent/kvm"),
            Err(VmError::NoKvm(_))
        ));
    }

    #[test]
    fn a_device_that_is_not_kvm_is_refused() {
        assert!(matches!(
            open_kvm_at(c"/dev/null"),
            Err(VmError::NotKvm { .. })
        ));
    }

    #[test]
    fn cpuid_carries_the_apic_id() {
        let mut cpuid = CpuId::new(2).unwrap();
        cpuid.as_mut_slice()[0].function = 1;
        cpuid.as_mut_slice()[0].ebx = 0xff00_1234;
        cpuid.as_mut_slice()[1].function = 0xb;
        let c = vcpu_cpuid(&cpuid, 3);
        assert_eq!(c.as_slice()[0].ebx, 0x0300_1234);
        assert_ne!(c.as_slice()[0].ecx & (1 << 21), 0);
        assert_eq!(c.as_slice()[1].edx, 3);
    }
}
