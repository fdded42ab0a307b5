//! `simrep run`: boots the bundled guest with a workload and runs it until
//! the guest ends or the caller stops it.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::abi::{self, fault, workload, BootParams, ChurnParams, SelftestParams, VcpuStatus};
use super::vcpu::VcpuOutcome;
use super::vm::Vm;
use super::{boot, VmmError, GUEST_ELF};

/// The workload the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workload {
    /// Dirty memory at a rate with a content similarity.
    #[default]
    Churn,
    /// Check the console, memory, clock and MMIO, then fault on purpose.
    Selftest,
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "churn" => Ok(Workload::Churn),
            "selftest" => Ok(Workload::Selftest),
            _ => Err(format!(
                "unknown workload `{s}` (expected churn or selftest)"
            )),
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Workload::Churn => "churn",
            Workload::Selftest => "selftest",
        })
    }
}

/// The deliberate fault at the end of `selftest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// No fault: exit with status 0.
    None,
    /// `#PF` (vector 14): a write to the unmapped page at 0x8.
    #[default]
    PageFault,
    /// `#UD` (vector 6): `ud2`.
    InvalidOpcode,
    /// `#GP` (vector 13): `hlt` at CPL3.
    GeneralProtection,
    /// `#DE` (vector 0): division by zero.
    DivideError,
    /// A write to an MMIO address no device claims.
    UnknownMmio,
}

impl Fault {
    fn code(self) -> u32 {
        match self {
            Fault::None => fault::NONE,
            Fault::PageFault => fault::PAGE_FAULT,
            Fault::InvalidOpcode => fault::INVALID_OPCODE,
            Fault::GeneralProtection => fault::GENERAL_PROTECTION,
            Fault::DivideError => fault::DIVIDE_ERROR,
            Fault::UnknownMmio => fault::UNKNOWN_MMIO,
        }
    }
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Fault::None),
            "pf" => Ok(Fault::PageFault),
            "ud" => Ok(Fault::InvalidOpcode),
            "gp" => Ok(Fault::GeneralProtection),
            "de" => Ok(Fault::DivideError),
            "mmio" => Ok(Fault::UnknownMmio),
            _ => Err(format!(
                "unknown fault `{s}` (expected none, pf, ud, gp, de or mmio)"
            )),
        }
    }
}

/// Parameters of the `churn` workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChurnOptions {
    /// Dirty rate in MiB/s over all vCPUs (0 = as fast as possible).
    pub rate_mib_s: u32,
    /// Share of each rewritten page that keeps its content, in %.
    pub similarity_pct: u32,
    /// Bytes churned (`None`: the whole heap, guest RAM minus 4 MiB).
    pub buffer_bytes: Option<u64>,
    /// Interval between progress lines in ms (0: none).
    pub report_ms: u32,
    /// Run time in seconds, then the guest exits (0: until stopped).
    pub seconds: u32,
}

impl Default for ChurnOptions {
    fn default() -> Self {
        ChurnOptions {
            rate_mib_s: 100,
            similarity_pct: 50,
            buffer_bytes: None,
            report_ms: 1000,
            seconds: 0,
        }
    }
}

/// What `simrep run` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// The workload.
    pub workload: Workload,
    /// Guest RAM in bytes (a multiple of 2 MiB, at least 8 MiB).
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// `churn` parameters.
    pub churn: ChurnOptions,
    /// `selftest`'s deliberate fault.
    pub fault: Fault,
    /// `selftest`'s count of timed MMIO round trips.
    pub mmio_round_trips: u32,
    /// Periodic LAPIC timer rate in Hz (0: no timer). Each tick runs the
    /// guest's CPL0 handler in the PVM emulator (tens of microseconds).
    pub timer_hz: u32,
    /// Stop with [`VmmError::NoProgress`] when no vCPU's progress counter
    /// moves for this long (`None`: never). Only meaningful for `churn`.
    pub watchdog: Option<Duration>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            workload: Workload::Churn,
            mem_bytes: 256 << 20,
            vcpus: 1,
            churn: ChurnOptions::default(),
            fault: Fault::PageFault,
            mmio_round_trips: 1000,
            timer_hz: 0,
            watchdog: None,
        }
    }
}

impl RunOptions {
    /// The boot parameters these options give the guest.
    pub fn boot_params(&self, tsc_khz: u32) -> BootParams {
        BootParams {
            magic: abi::BOOT_MAGIC,
            version: abi::BOOT_VERSION,
            vcpus: self.vcpus,
            mem_size: self.mem_bytes,
            tsc_khz: u64::from(tsc_khz),
            workload: match self.workload {
                Workload::Churn => workload::CHURN,
                Workload::Selftest => workload::SELFTEST,
            },
            lapic_timer_count: match self.timer_hz {
                0 => 0,
                hz => u32::try_from(LAPIC_BUS_HZ / u64::from(hz))
                    .unwrap_or(u32::MAX)
                    .max(1),
            },
            churn: ChurnParams {
                rate_mib_s: self.churn.rate_mib_s,
                similarity_pct: self.churn.similarity_pct.min(100),
                buffer_bytes: self
                    .churn
                    .buffer_bytes
                    .unwrap_or(self.mem_bytes.saturating_sub(abi::HEAP_GPA)),
                report_ms: self.churn.report_ms,
                seconds: self.churn.seconds,
            },
            selftest: SelftestParams {
                fault: self.fault.code(),
                mmio_round_trips: self.mmio_round_trips,
            },
        }
    }
}

/// KVM's emulated APIC bus frequency (`APIC_BUS_CYCLE_NS` = 1 by default).
const LAPIC_BUS_HZ: u64 = 1_000_000_000;

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// How long the guest ran.
    pub elapsed: Duration,
    /// How each vCPU ended, by index (`Stopped` when the caller stopped the
    /// run).
    pub outcomes: Vec<VcpuOutcome>,
    /// Each vCPU's progress counter at the end (churn: pages written).
    pub progress: Vec<u64>,
    /// Whether the caller's stop flag ended the run.
    pub interrupted: bool,
}

/// Parses a byte size: a number with an optional `K`, `M`, `G` or `T`
/// suffix (binary units, `B`/`iB` tolerated): `256M`, `1G`, `4096`.
///
/// # Errors
///
/// A message naming the bad input.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("bad size `{s}`: unknown unit `{c}`")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("bad size `{s}`"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

/// Creates the VM, loads the bundled guest with `opts` and starts all
/// vCPUs. The caller drives it (pause, resume, wait, shutdown).
///
/// # Errors
///
/// [`VmmError::Config`] for options that do not fit the memory map;
/// [`VmmError::Vm`] when KVM is missing or fails.
pub fn boot(opts: &RunOptions) -> Result<Vm, VmmError> {
    boot_image(opts, GUEST_ELF)
}

/// [`boot()`] with another guest image.
///
/// # Errors
///
/// As [`boot()`], plus [`VmmError::Config`] for a bad image.
pub fn boot_image(opts: &RunOptions, image: &[u8]) -> Result<Vm, VmmError> {
    boot::check_config(opts.mem_bytes, opts.vcpus)?;
    let t0 = Instant::now();
    let mut vm = Vm::new(opts.mem_bytes)?;
    let t_mem = t0.elapsed();
    vm.create_vcpus(opts.vcpus)?;
    let tsc_khz = vm.tsc_khz()?;
    let params = opts.boot_params(tsc_khz);
    let entry = boot::setup_memory(vm.memory(), image, &params)?;
    let vcpus = opts.vcpus;
    vm.start(|id, sregs| {
        (
            boot::entry_regs(id, entry),
            boot::entry_sregs(sregs, id, vcpus),
        )
    })?;
    tracing::info!(
        workload = %opts.workload,
        mem_mib = opts.mem_bytes >> 20,
        vcpus,
        tsc_khz,
        entry = format_args!("{entry:#x}"),
        vm_and_memory = ?t_mem,
        total = ?t0.elapsed(),
        "guest started"
    );
    Ok(vm)
}

/// The progress counter of vCPU `cpu` (churn: pages written).
///
/// # Errors
///
/// [`VmmError::Memory`] if the status page is outside guest memory.
pub fn progress(vm: &Vm, cpu: u32) -> Result<u64, VmmError> {
    let gpa = abi::STATUS_GPA + u64::from(cpu) * size_of::<VcpuStatus>() as u64;
    Ok(vm.memory().load_u64(gpa)?)
}

fn all_progress(vm: &Vm, vcpus: u32) -> Result<Vec<u64>, VmmError> {
    (0..vcpus).map(|c| progress(vm, c)).collect()
}

/// Runs the guest with `opts` until every vCPU has ended or `stop` is set
/// (Ctrl-C), then stops the VM.
///
/// # Errors
///
/// Setup errors as in [`boot()`]; [`VmmError::Vcpu`] when a vCPU fails (the
/// guest faulted, shut down, touched an unknown MMIO address, or KVM
/// failed); [`VmmError::GuestFailed`] for a nonzero guest exit status;
/// [`VmmError::NoProgress`] when the watchdog fires.
pub fn run(opts: &RunOptions, stop: &AtomicBool) -> Result<RunSummary, VmmError> {
    let vm = boot(opts)?;
    supervise(vm, opts, stop, &mut |_| Ok(()))
}

/// Runs a started (or restored and resumed) `vm` until every vCPU has
/// ended or `stop` is set, calling `tick` about every 50 ms (checkpoints
/// hook in there), then stops the VM. Of `opts`, only `vcpus` and
/// `watchdog` matter.
///
/// # Errors
///
/// As [`run`], plus the error of `tick`.
pub fn supervise(
    mut vm: Vm,
    opts: &RunOptions,
    stop: &AtomicBool,
    tick: &mut dyn FnMut(&Vm) -> Result<(), VmmError>,
) -> Result<RunSummary, VmmError> {
    let start = Instant::now();
    let n = opts.vcpus as usize;
    let mut outcomes: Vec<Option<VcpuOutcome>> = vec![None; n];
    let mut interrupted = false;
    let mut last_progress = (0u64, Instant::now());
    while outcomes.iter().any(Option::is_none) {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        if let Err(e) = tick(&vm) {
            vm.shutdown();
            return Err(e);
        }
        if let Some(ev) = vm.wait_exit(Duration::from_millis(50)) {
            match ev.result {
                Ok(outcome) => {
                    tracing::debug!(vcpu = ev.vcpu, ?outcome, "vCPU ended");
                    outcomes[ev.vcpu as usize] = Some(outcome);
                }
                Err(e) => {
                    vm.shutdown();
                    return Err(e.into());
                }
            }
        }
        if let Some(limit) = opts.watchdog {
            let total: u64 = all_progress(&vm, opts.vcpus)?.iter().sum();
            if total != last_progress.0 {
                last_progress = (total, Instant::now());
            } else if last_progress.1.elapsed() > limit {
                vm.shutdown();
                return Err(VmmError::NoProgress {
                    seconds: limit.as_secs(),
                });
            }
        }
    }
    let elapsed = start.elapsed();
    vm.pause_all()?;
    let progress = all_progress(&vm, opts.vcpus)?;
    vm.shutdown();
    let outcomes: Vec<VcpuOutcome> = outcomes
        .into_iter()
        .map(|o| o.unwrap_or(VcpuOutcome::Stopped))
        .collect();
    for (vcpu, o) in (0u32..).zip(&outcomes) {
        if let VcpuOutcome::GuestExit(status) = *o {
            if status != 0 {
                return Err(VmmError::GuestFailed { vcpu, status });
            }
        }
    }
    Ok(RunSummary {
        elapsed,
        outcomes,
        progress,
        interrupted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn names_parse() {
        assert_eq!("churn".parse(), Ok(Workload::Churn));
        assert_eq!("selftest".parse(), Ok(Workload::Selftest));
        assert!("kv".parse::<Workload>().is_err());
        assert_eq!("ud".parse(), Ok(Fault::InvalidOpcode));
        assert!("int3".parse::<Fault>().is_err());
    }

    #[test]
    fn boot_params_carry_the_options() {
        let opts = RunOptions {
            mem_bytes: 64 << 20,
            vcpus: 2,
            ..Default::default()
        };
        let bp = opts.boot_params(2_000_000);
        assert_eq!(bp.magic, abi::BOOT_MAGIC);
        assert_eq!(bp.vcpus, 2);
        assert_eq!(bp.tsc_khz, 2_000_000);
        assert_eq!(bp.churn.buffer_bytes, (64 << 20) - abi::HEAP_GPA);
        assert_eq!(bp.workload, workload::CHURN);
    }
}
