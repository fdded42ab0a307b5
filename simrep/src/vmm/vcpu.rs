//! vCPU threads: one `std::thread` per vCPU, each a Paused / Running /
//! Exited state machine driven over channels (the Firecracker model).
//!
//! A vCPU starts Paused. The controller sends [`VcpuCommand`]s and waits for
//! [`VcpuAck`]s; a vCPU that ends (the guest exited, it failed, or it was
//! told to) sends one [`VcpuExitEvent`] on the VM-wide exit channel.
//!
//! # Kicking a vCPU out of `KVM_RUN`
//!
//! A command is sent first, then the thread gets [`kick_signal`]. The
//! handler sets `kvm_run.immediate_exit` through a thread-local pointer, so
//! whether the signal lands inside `KVM_RUN` (which returns `EINTR`), just
//! before it (it returns at once because of `immediate_exit`) or while the
//! thread handles an exit (the next `KVM_RUN` returns at once), the thread
//! looks at its command channel before the guest runs again.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::abi::{self, ExceptionReport};
use super::devices::{DeviceError, MmioAction, MmioBus};
use super::memory::GuestMemory;
use super::state::{StateError, VcpuSnapshot};
use crate::dirty::DirtyRings;

/// Where a vCPU thread leaves its answer to [`VcpuCommand::Save`].
type SaveSlot = Arc<std::sync::Mutex<Option<Result<VcpuSnapshot, StateError>>>>;

/// Errors of a vCPU: the guest misbehaved or KVM failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_RUN` or another vCPU ioctl failed.
    #[error("vCPU {vcpu}: {what} failed")]
    Kvm {
        /// The vCPU.
        vcpu: u32,
        /// The ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest triple-faulted or otherwise shut down (`KVM_EXIT_SHUTDOWN`).
    #[error("vCPU {vcpu}: guest shut down (triple fault?) at rip {rip:#x}")]
    Shutdown {
        /// The vCPU.
        vcpu: u32,
        /// RIP when KVM gave up (0 if unreadable).
        rip: u64,
    },
    /// KVM could not emulate or run the guest (`KVM_EXIT_INTERNAL_ERROR`).
    /// Under PVM this is what CPL0 code using SSE, x87, `int n` ... gets.
    #[error("vCPU {vcpu}: KVM internal error {suberror} ({}) at rip {rip:#x}, data {data:x?}", internal_error_name(*.suberror))]
    InternalError {
        /// The vCPU.
        vcpu: u32,
        /// `kvm_run.internal.suberror` (`KVM_INTERNAL_ERROR_*`).
        suberror: u32,
        /// RIP of the offending instruction.
        rip: u64,
        /// `kvm_run.internal.data`.
        data: Vec<u64>,
    },
    /// The hardware refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    #[error("vCPU {vcpu}: VM entry failed, reason {reason:#x} on host cpu {cpu}")]
    FailEntry {
        /// The vCPU.
        vcpu: u32,
        /// `hardware_entry_failure_reason`.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// The guest's exception handler reported a fault and stopped.
    #[error(
        "vCPU {vcpu}: guest exception {} (vector {}) error code {:#x} at rip {:#x} (CPL{}), cr2 {:#x}",
        abi::exception_name(.report.vector), .report.vector, .report.error_code, .report.rip, .report.cs & 3, .report.cr2
    )]
    GuestException {
        /// The vCPU.
        vcpu: u32,
        /// What the guest recorded.
        report: ExceptionReport,
    },
    /// The guest accessed an MMIO address no device claims.
    #[error("vCPU {vcpu}: {} of {len} bytes at unknown MMIO address {gpa:#x} (rip {rip:#x})", if *.write { "write" } else { "read" })]
    UnknownMmio {
        /// The vCPU.
        vcpu: u32,
        /// The address.
        gpa: u64,
        /// Access width.
        len: usize,
        /// Whether it was a write.
        write: bool,
        /// The instruction.
        rip: u64,
    },
    /// A device rejected an access.
    #[error("vCPU {vcpu}: device error (rip {rip:#x})")]
    Device {
        /// The vCPU.
        vcpu: u32,
        /// The instruction.
        rip: u64,
        /// What the device said.
        #[source]
        source: DeviceError,
    },
    /// An exit the VMM does not expect from its guest (port I/O, `hlt`
    /// without an in-kernel irqchip, ...).
    #[error("vCPU {vcpu}: unexpected exit {exit} at rip {rip:#x}")]
    UnexpectedExit {
        /// The vCPU.
        vcpu: u32,
        /// The exit, as text.
        exit: String,
        /// The instruction.
        rip: u64,
    },
    /// Draining a full dirty ring failed (`KVM_EXIT_DIRTY_RING_FULL`).
    #[error("vCPU {vcpu}: cannot drain its full dirty ring")]
    DirtyRing {
        /// The vCPU.
        vcpu: u32,
        /// What failed.
        #[source]
        source: crate::dirty::DirtyError,
    },
}

/// Name of a `KVM_INTERNAL_ERROR_*` suberror.
pub fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failure",
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown",
    }
}

/// Commands to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Run the guest.
    Resume,
    /// Leave `KVM_RUN` and wait for the next command.
    Pause,
    /// End the thread.
    Exit,
    // --- net ---
    /// A device has work for a vCPU waiting in [`MmioAction::Wait`]: end
    /// the wait. Ignored in any other state (sent through [`VcpuWakers`],
    /// without a kick).
    Wake,
    // --- end net ---
    /// Save the vCPU's state (only while Paused); answered with
    /// [`VcpuAck::Saved`], the state taken with [`VcpuHandle::take_saved`].
    Save,
}

/// A vCPU thread's answer to [`VcpuCommand::Pause`] / [`VcpuCommand::Resume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuAck {
    /// Out of `KVM_RUN`, waiting.
    Paused,
    /// About to enter `KVM_RUN`.
    Resumed,
    /// The answer to [`VcpuCommand::Save`] is ready.
    Saved,
}

/// The observable state of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuState {
    /// Not in `KVM_RUN`, waiting for a command.
    Paused = 0,
    /// Running the guest.
    Running = 1,
    /// The thread ended.
    Exited = 2,
}

impl VcpuState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => VcpuState::Paused,
            1 => VcpuState::Running,
            _ => VcpuState::Exited,
        }
    }
}

/// How a vCPU ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuOutcome {
    /// The guest wrote this status to `SYS_EXIT`.
    GuestExit(u64),
    /// The VMM told the vCPU to exit.
    Stopped,
}

/// Sent once by a vCPU thread when it ends.
#[derive(Debug)]
pub struct VcpuExitEvent {
    /// The vCPU.
    pub vcpu: u32,
    /// How it ended.
    pub result: Result<VcpuOutcome, VcpuError>,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler (null when the
    /// thread runs no vCPU).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Const-initialised thread-local without destructor: no lazy
    // initialisation, so reading it is async-signal-safe.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's live `kvm_run` mapping: it is
        // set after the vCPU fd is owned by this thread and cleared before
        // the fd is dropped. A volatile byte store is what the kernel reads
        // at the next KVM_RUN.
        unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// Installs the kick handler (once per process). Must precede any kick:
/// the default action of a real-time signal ends the process.
///
/// # Errors
///
/// The errno of `sigaction`.
pub fn install_kick_handler() -> Result<(), kvm_ioctls::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), handle_kick));
    result
}

/// The controller's side of one vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u32,
    commands: Sender<VcpuCommand>,
    acks: Receiver<VcpuAck>,
    state: Arc<AtomicU8>,
    thread: Option<JoinHandle<()>>,
    saved: SaveSlot,
}

/// Everything a vCPU thread owns.
struct VcpuThread {
    id: u32,
    fd: VcpuFd,
    bus: Arc<MmioBus>,
    mem: Arc<GuestMemory>,
    commands: Receiver<VcpuCommand>,
    acks: Sender<VcpuAck>,
    state: Arc<AtomicU8>,
    /// The last `KVM_RUN` returned an exit that KVM has not completed yet
    /// (it does so at the next `KVM_RUN`).
    exit_pending: bool,
    /// The VM's dirty rings (ring mode), drained on
    /// `KVM_EXIT_DIRTY_RING_FULL`.
    dirty_rings: Option<Arc<DirtyRings>>,
    saved: SaveSlot,
}

/// What the run loop does after one `KVM_RUN`, besides running again.
enum Stop {
    /// End the thread without error.
    Outcome(VcpuOutcome),
    /// End the thread with an error.
    Error(VcpuError),
    /// Wait for a command for at most this long, then run again.
    Idle(Duration),
    /// Wait for a command (a [`VcpuCommand::Wake`] from a device) for at
    /// most this long, let the devices finish the wait, then run again.
    Wait(Duration),
}

impl VcpuHandle {
    /// Starts the thread of vCPU `id`, Paused. `exits` receives its
    /// [`VcpuExitEvent`]. [`install_kick_handler`] must have succeeded.
    ///
    /// # Errors
    ///
    /// The error of `std::thread::Builder::spawn`.
    pub fn spawn(
        id: u32,
        fd: VcpuFd,
        bus: Arc<MmioBus>,
        mem: Arc<GuestMemory>,
        exits: Sender<VcpuExitEvent>,
    ) -> std::io::Result<Self> {
        Self::spawn_tracked(id, fd, bus, mem, exits, None)
    }

    /// [`VcpuHandle::spawn`] for a VM with dirty rings: on
    /// `KVM_EXIT_DIRTY_RING_FULL` the thread drains its ring into
    /// `dirty_rings`' pending set and runs on.
    ///
    /// # Errors
    ///
    /// The error of `std::thread::Builder::spawn`.
    pub fn spawn_tracked(
        id: u32,
        fd: VcpuFd,
        bus: Arc<MmioBus>,
        mem: Arc<GuestMemory>,
        exits: Sender<VcpuExitEvent>,
        dirty_rings: Option<Arc<DirtyRings>>,
    ) -> std::io::Result<Self> {
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
        let (ack_tx, ack_rx) = std::sync::mpsc::channel();
        let state = Arc::new(AtomicU8::new(VcpuState::Paused as u8));
        let thread_state = state.clone();
        let saved = SaveSlot::default();
        let thread_saved = saved.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let mut t = VcpuThread {
                    id,
                    fd,
                    bus,
                    mem,
                    commands: cmd_rx,
                    acks: ack_tx,
                    state: thread_state,
                    exit_pending: false,
                    dirty_rings,
                    saved: thread_saved,
                };
                let result = t.main();
                t.state.store(VcpuState::Exited as u8, Ordering::Release);
                let _ = exits.send(VcpuExitEvent { vcpu: id, result });
            })?;
        Ok(VcpuHandle {
            id,
            commands: cmd_tx,
            acks: ack_rx,
            state,
            thread: Some(thread),
            saved,
        })
    }

    /// The vCPU index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The vCPU's current state.
    pub fn state(&self) -> VcpuState {
        VcpuState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Sends `cmd` and kicks the thread out of `KVM_RUN`. Returns false if
    /// the thread has ended.
    pub fn send(&self, cmd: VcpuCommand) -> bool {
        if self.commands.send(cmd).is_err() {
            return false;
        }
        if cmd != VcpuCommand::Resume && cmd != VcpuCommand::Save {
            if let Some(t) = &self.thread {
                // ESRCH when the thread just ended: nothing to kick.
                let _ = t.kill(kick_signal());
            }
        }
        true
    }

    /// Waits up to `timeout` for the answer to a Pause or Resume. `None`
    /// when the thread ended (or did not answer in time: check
    /// [`Self::state`]).
    pub fn wait_ack(&self, timeout: Duration) -> Option<VcpuAck> {
        self.acks.recv_timeout(timeout).ok()
    }

    /// A sender for [`VcpuWakers`] (net).
    pub(crate) fn wake_sender(&self) -> Sender<VcpuCommand> {
        self.commands.clone()
    }

    /// Takes the answer to the last [`VcpuCommand::Save`] (after
    /// [`VcpuAck::Saved`]).
    pub fn take_saved(&self) -> Option<Result<VcpuSnapshot, StateError>> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Tells the thread to exit and joins it.
    pub fn stop(&mut self) {
        self.send(VcpuCommand::Exit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

// --- net: waking vCPUs that wait for a device ---

/// Wakes vCPUs that wait in [`MmioAction::Wait`] (a device's `NET_WAIT`):
/// one command sender per started vCPU, filled by [`super::vm::Vm::start`].
#[derive(Debug, Default)]
pub struct VcpuWakers {
    senders: std::sync::Mutex<Vec<Option<Sender<VcpuCommand>>>>,
}

impl VcpuWakers {
    /// Registers vCPU `vcpu`'s command channel.
    pub(crate) fn register(&self, vcpu: u32, tx: Sender<VcpuCommand>) {
        let mut s = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        let i = vcpu as usize;
        if s.len() <= i {
            s.resize(i + 1, None);
        }
        s[i] = Some(tx);
    }

    /// Sends [`VcpuCommand::Wake`] to vCPU `vcpu` (nothing if it has not
    /// started or has ended).
    pub fn wake(&self, vcpu: u32) {
        let s = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Some(tx)) = s.get(vcpu as usize) {
            let _ = tx.send(VcpuCommand::Wake);
        }
    }
}

// --- end net ---

impl VcpuThread {
    fn main(&mut self) -> Result<VcpuOutcome, VcpuError> {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run));
        let result = self.run_loop();
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        result
    }

    fn set_state(&self, s: VcpuState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// Lets KVM finish the last exit (an MMIO read's data lands in its
    /// register, RIP moves past the instruction) without entering the
    /// guest, so that a paused vCPU's state is complete.
    fn complete_pending_exit(&mut self) -> Result<(), VcpuError> {
        if !self.exit_pending {
            return Ok(());
        }
        self.exit_pending = false;
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Ok(()) => Ok(()),
            Err(source) => Err(VcpuError::Kvm {
                vcpu: self.id,
                what: "KVM_RUN (completing an exit)",
                source,
            }),
        }
    }

    /// Handles one command; `Some` when the thread must end.
    fn command(
        &mut self,
        cmd: VcpuCommand,
        running: &mut bool,
    ) -> Result<Option<VcpuOutcome>, VcpuError> {
        match cmd {
            VcpuCommand::Pause => {
                self.complete_pending_exit()?;
                // A kick that arrives after this point only costs one
                // spurious EINTR after the resume.
                self.fd.set_kvm_immediate_exit(0);
                *running = false;
                self.set_state(VcpuState::Paused);
                let _ = self.acks.send(VcpuAck::Paused);
            }
            VcpuCommand::Resume => {
                *running = true;
                self.set_state(VcpuState::Running);
                let _ = self.acks.send(VcpuAck::Resumed);
            }
            VcpuCommand::Exit => return Ok(Some(VcpuOutcome::Stopped)),
            VcpuCommand::Wake => {}
            VcpuCommand::Save => {
                let result = if *running {
                    Err(StateError::NotPaused {
                        vcpu: self.id,
                        state: VcpuState::Running,
                    })
                } else {
                    // Paused: the last exit was completed by the Pause.
                    super::state::save_vcpu(&self.fd, self.id)
                };
                *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                let _ = self.acks.send(VcpuAck::Saved);
            }
        }
        Ok(None)
    }

    fn run_loop(&mut self) -> Result<VcpuOutcome, VcpuError> {
        use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
        let mut running = false;
        loop {
            let cmd = if !running {
                // Paused: block until told otherwise; a closed channel
                // means the controller is gone.
                match self.commands.recv() {
                    Ok(cmd) => Some(cmd),
                    Err(_) => return Ok(VcpuOutcome::Stopped),
                }
            } else {
                match self.commands.try_recv() {
                    Ok(cmd) => Some(cmd),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return Ok(VcpuOutcome::Stopped),
                }
            };
            if let Some(cmd) = cmd {
                if let Some(out) = self.command(cmd, &mut running)? {
                    return Ok(out);
                }
                continue;
            }
            match self.run_once()? {
                None => {}
                Some(Stop::Outcome(o)) => return Ok(o),
                Some(Stop::Error(e)) => return Err(e),
                Some(Stop::Idle(d)) => match self.commands.recv_timeout(d) {
                    Ok(cmd) => {
                        if let Some(out) = self.command(cmd, &mut running)? {
                            return Ok(out);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return Ok(VcpuOutcome::Stopped),
                },
                Some(Stop::Wait(d)) => match self.commands.recv_timeout(d) {
                    Ok(VcpuCommand::Wake) | Err(RecvTimeoutError::Timeout) => {
                        if let Err(source) = self.bus.wait_done(self.id, &self.mem) {
                            return Err(VcpuError::Device {
                                vcpu: self.id,
                                rip: self.rip(),
                                source,
                            });
                        }
                    }
                    Ok(cmd) => {
                        if let Some(out) = self.command(cmd, &mut running)? {
                            return Ok(out);
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => return Ok(VcpuOutcome::Stopped),
                },
            }
        }
    }

    /// `KVM_EXIT_DIRTY_RING_FULL`: move the ring's entries to the pending
    /// set, reset, run on. Without rings (cannot happen) it is an error.
    fn dirty_ring_full(&mut self) -> Option<Stop> {
        let result = match &self.dirty_rings {
            Some(rings) => rings.drain_full(self.id),
            None => Err(crate::dirty::DirtyError::NoRing { vcpu: self.id }),
        };
        result.err().map(|source| {
            Stop::Error(VcpuError::DirtyRing {
                vcpu: self.id,
                source,
            })
        })
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn run_once(&mut self) -> Result<Option<Stop>, VcpuError> {
        let id = self.id;
        self.exit_pending = false;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Ok(None);
            }
            Err(source) => {
                return Err(VcpuError::Kvm {
                    vcpu: id,
                    what: "KVM_RUN",
                    source,
                })
            }
        };
        self.exit_pending = true;
        let dispatched = match exit {
            VcpuExit::MmioWrite(gpa, data) => self.bus.write(id, gpa, data, &self.mem),
            VcpuExit::MmioRead(gpa, data) => {
                self.bus.read(id, gpa, data).map(|()| MmioAction::Continue)
            }
            VcpuExit::Intr => return Ok(None),
            VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL) => {
                return Ok(self.dirty_ring_full());
            }
            VcpuExit::Shutdown => {
                return Ok(Some(Stop::Error(VcpuError::Shutdown {
                    vcpu: id,
                    rip: self.rip(),
                })))
            }
            VcpuExit::InternalError => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
                // `internal` member of the union is the one KVM filled.
                let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                return Ok(Some(Stop::Error(VcpuError::InternalError {
                    vcpu: id,
                    suberror: internal.suberror,
                    rip: self.rip(),
                    data: internal.data[..n].to_vec(),
                })));
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return Ok(Some(Stop::Error(VcpuError::FailEntry {
                    vcpu: id,
                    reason,
                    cpu,
                })));
            }
            other => {
                let exit = format!("{other:?}");
                return Ok(Some(Stop::Error(VcpuError::UnexpectedExit {
                    vcpu: id,
                    exit,
                    rip: self.rip(),
                })));
            }
        };
        match dispatched {
            Ok(MmioAction::Continue) => Ok(None),
            Ok(MmioAction::Idle(d)) => Ok(Some(Stop::Idle(d))),
            Ok(MmioAction::Wait(d)) => Ok(Some(Stop::Wait(d))),
            Ok(MmioAction::Exit(status)) => Ok(Some(Stop::Outcome(VcpuOutcome::GuestExit(status)))),
            Ok(MmioAction::Exception(report)) => Ok(Some(Stop::Error(VcpuError::GuestException {
                vcpu: id,
                report,
            }))),
            Err(DeviceError::UnknownAddress { gpa, len, write }) => {
                Ok(Some(Stop::Error(VcpuError::UnknownMmio {
                    vcpu: id,
                    gpa,
                    len,
                    write,
                    rip: self.rip(),
                })))
            }
            Err(source) => Ok(Some(Stop::Error(VcpuError::Device {
                vcpu: id,
                rip: self.rip(),
                source,
            }))),
        }
    }
}
