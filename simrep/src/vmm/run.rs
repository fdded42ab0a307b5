//! `simrep run`: boots the bundled guest with a workload and runs it until
//! the guest ends or the caller stops it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::abi::{self, fault, workload, BootParams, ChurnParams, SelftestParams, VcpuStatus};
use super::abi::{RandomParams, TouchParams};
use super::block::{BlockDevice, FlushPolicy};
use super::vcpu::VcpuOutcome;
use super::vm::Vm;
use super::{boot, VmmError, GUEST_ELF};
use crate::dirty::{DirtyMode, DirtyTracker};

/// The workload the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workload {
    /// Dirty memory at a rate with a content similarity.
    #[default]
    Churn,
    /// Check the console, memory, clock and MMIO, then fault on purpose.
    Selftest,
    /// Write PRNG-chosen pages, logging each first (dirty-tracking tests).
    Touch,
    /// Incompressible writes at a rate (uses the `churn` rate, buffer,
    /// seconds and report interval).
    Random,
    /// Test the block device: pattern, append-only log, error probes,
    /// throughput (needs `--disk`).
    Disk,
    /// The key-value service on the network device.
    Kv,
    /// The banking service on the network device.
    Bank,
}

impl Workload {
    /// Whether the workload serves clients over the network device.
    pub fn uses_network(self) -> bool {
        matches!(self, Workload::Kv | Workload::Bank)
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "churn" => Ok(Workload::Churn),
            "selftest" => Ok(Workload::Selftest),
            "touch" => Ok(Workload::Touch),
            "random" => Ok(Workload::Random),
            "disk" => Ok(Workload::Disk),
            "kv" => Ok(Workload::Kv),
            "bank" => Ok(Workload::Bank),
            _ => Err(format!(
                "unknown workload `{s}` (expected churn, selftest, kv, bank, random, disk or touch)"
            )),
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Workload::Churn => "churn",
            Workload::Selftest => "selftest",
            Workload::Touch => "touch",
            Workload::Random => "random",
            Workload::Disk => "disk",
            Workload::Kv => "kv",
            Workload::Bank => "bank",
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

/// Parameters of the `touch` workload (see [`abi::TouchParams`]). The
/// logs start at [`abi::HEAP_GPA`]; the region follows them, 2 MiB aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TouchOptions {
    /// PRNG seed.
    pub seed: u64,
    /// Bytes of the region over all vCPUs (cut to what fits).
    pub region_bytes: u64,
    /// Entries in each vCPU's log.
    pub log_entries: u64,
    /// Writes per round (0: continuous).
    pub pages_per_round: u32,
    /// Wait for the VMM's `go` after each round.
    pub gated: bool,
    /// Idle between rounds when not gated, in microseconds.
    pub idle_us: u32,
    /// Rounds, then exit (0: forever).
    pub rounds: u32,
}

impl Default for TouchOptions {
    fn default() -> Self {
        TouchOptions {
            seed: 1,
            region_bytes: 16 << 20,
            log_entries: 65536,
            pages_per_round: 0,
            gated: false,
            idle_us: 0,
            rounds: 0,
        }
    }
}

impl TouchOptions {
    /// The guest parameters for `mem_bytes` of RAM and `vcpus` vCPUs.
    pub fn params(&self, mem_bytes: u64, vcpus: u32) -> TouchParams {
        let logs = u64::from(vcpus) * abi::touch_log_stride(self.log_entries);
        let region_gpa = (abi::HEAP_GPA + logs).next_multiple_of(abi::LARGE_PAGE_SIZE);
        let room = mem_bytes.saturating_sub(region_gpa);
        TouchParams {
            seed: self.seed,
            region_gpa,
            region_pages: self.region_bytes.min(room) / abi::PAGE_SIZE,
            log_gpa: abi::HEAP_GPA,
            log_entries: self.log_entries,
            pages_per_round: self.pages_per_round,
            gated: u32::from(self.gated),
            idle_us: self.idle_us,
            rounds: self.rounds,
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
    /// `touch` parameters.
    pub touch: TouchOptions,
    /// The block device's disk image (`None`: no disk, capacity 0).
    pub disk: Option<PathBuf>,
    /// `disk` workload parameters.
    pub disk_test: DiskOptions,
    /// When the disk's write buffer reaches the file (replication sets
    /// [`FlushPolicy::Replicated`] before the vCPUs start).
    pub disk_policy: FlushPolicy,
    // --- net ---
    /// `kv` / `bank`: address the service listens on.
    pub bind: std::net::IpAddr,
    /// `kv` / `bank`: TCP port (0: an ephemeral port, logged).
    pub port: u16,
    /// `kv`: bytes of heap for the data (`None`: all the rings leave).
    pub kv_data_bytes: Option<u64>,
    /// `bank`: number of accounts.
    pub bank_accounts: u32,
    /// `bank`: history records kept per account.
    pub bank_history: u32,
    // --- end net ---
}

/// Parameters of the `disk` workload (layout: the log region first, then
/// the pattern, then the benchmark region).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskOptions {
    /// Sectors of the log region, from sector 0.
    pub log_sectors: u64,
    /// Log records appended per run.
    pub log_records: u32,
    /// Sectors of pattern written, flushed and verified.
    pub pattern_sectors: u32,
    /// Seed of the pattern.
    pub seed: u64,
    /// Bytes moved per request size by the throughput measurement (0: off).
    pub bench_bytes: u64,
    /// Single-sector requests timed (0: off).
    pub bench_requests: u32,
    /// Submit bad requests and check their error statuses.
    pub probe_errors: bool,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            log_sectors: 2048,
            log_records: 64,
            pattern_sectors: 1024,
            seed: 1,
            bench_bytes: 0,
            bench_requests: 0,
            probe_errors: true,
        }
    }
}

impl DiskOptions {
    /// The guest's view of these options.
    pub fn params(&self) -> abi::DiskParams {
        abi::DiskParams {
            log_start: 0,
            log_sectors: self.log_sectors,
            pattern_start: self.log_sectors,
            pattern_sectors: self.pattern_sectors,
            log_records: self.log_records,
            seed: self.seed,
            bench_bytes: self.bench_bytes,
            bench_requests: self.bench_requests,
            probe_errors: u32::from(self.probe_errors),
        }
    }
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
            touch: TouchOptions::default(),
            disk: None,
            disk_test: DiskOptions::default(),
            disk_policy: FlushPolicy::default(),
            bind: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            port: 7000,
            kv_data_bytes: None,
            bank_accounts: 10_000,
            bank_history: 32,
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
                Workload::Touch => workload::TOUCH,
                Workload::Random => workload::RANDOM,
                Workload::Disk => workload::DISK,
                Workload::Kv => workload::KV,
                Workload::Bank => workload::BANK,
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
            touch: self.touch.params(self.mem_bytes, self.vcpus),
            random: RandomParams {
                rate_mib_s: self.churn.rate_mib_s,
                report_ms: self.churn.report_ms,
                buffer_bytes: self
                    .churn
                    .buffer_bytes
                    .unwrap_or(self.mem_bytes.saturating_sub(abi::HEAP_GPA)),
                seconds: self.churn.seconds,
                reserved: 0,
            },
            disk: self.disk_test.params(),
            kv: abi::KvParams {
                data_bytes: self.kv_data_bytes.unwrap_or(0),
            },
            bank: abi::BankParams {
                accounts: self.bank_accounts,
                history_per_account: self.bank_history,
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
    boot_image_with(opts, image, None, |_| Ok(()))
}

/// [`boot()`] with dirty tracking in `mode` on from the first guest
/// instruction; returns the VM and its tracker (whose first harvest
/// returns every page).
///
/// # Errors
///
/// As [`boot()`], plus [`VmmError::Vm`] when KVM refuses the mode.
pub fn boot_tracked(opts: &RunOptions, mode: DirtyMode) -> Result<(Vm, DirtyTracker), VmmError> {
    let vm = boot_image_with(opts, GUEST_ELF, Some(mode), |_| Ok(()))?;
    let tracker = vm.dirty_tracker()?;
    Ok((vm, tracker))
}

/// The one boot path: check the options, open the disk, create the VM
/// (with dirty tracking in `dirty` from the first instruction), load the
/// guest, let `attach` add devices, start the vCPUs.
fn boot_image_with(
    opts: &RunOptions,
    image: &[u8],
    dirty: Option<DirtyMode>,
    attach: impl FnOnce(&Vm) -> Result<(), VmmError>,
) -> Result<Vm, VmmError> {
    boot::check_config(opts.mem_bytes, opts.vcpus)?;
    let disk = match &opts.disk {
        Some(path) => Some(BlockDevice::open(path, opts.disk_policy)?),
        None => None,
    };
    let t0 = Instant::now();
    let mut vm = Vm::new(opts.mem_bytes)?;
    if let Some(mode) = dirty {
        vm.enable_dirty_log(mode)?;
    }
    if let Some(disk) = disk {
        tracing::info!(path = %path_of(&disk), sectors = disk.capacity(), policy = ?opts.disk_policy, "disk attached");
        let disk = std::sync::Arc::new(disk);
        vm.bus().attach_block(disk.clone());
        // Its state (capacity, policy, epoch) travels with snapshots.
        vm.bus().register_device_state(disk)?;
    }
    let t_mem = t0.elapsed();
    vm.create_vcpus(opts.vcpus)?;
    let tsc_khz = vm.tsc_khz()?;
    let params = opts.boot_params(tsc_khz);
    let entry = boot::setup_memory(vm.memory(), image, &params)?;
    attach(&vm)?;
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

fn path_of(dev: &BlockDevice) -> String {
    dev.disk_file()
        .map(|d| d.path().display().to_string())
        .unwrap_or_default()
}

// --- net ---

/// [`boot()`] for `run`: with `kv` or `bank`, binds the service port (or
/// takes `listener`), attaches the network device with an
/// [`ImmediateGate`](super::net::ImmediateGate) before the vCPUs start, and
/// logs the address.
///
/// # Errors
///
/// As [`boot()`], plus [`VmmError::Net`].
pub fn boot_service(
    opts: &RunOptions,
    listener: Option<std::net::TcpListener>,
) -> Result<(Vm, Option<super::net::NetService>), VmmError> {
    use super::net::{ImmediateGate, OutputGate};
    boot_service_with(opts, listener, None, |d| {
        Arc::new(ImmediateGate::new(d)) as Arc<dyn OutputGate>
    })
}

/// [`boot_service`] with dirty tracking in `dirty` from the first
/// instruction and the network device's [`OutputGate`](super::net::OutputGate)
/// made by `gate` (replication holds output there).
///
/// # Errors
///
/// As [`boot_service`].
pub fn boot_service_with(
    opts: &RunOptions,
    listener: Option<std::net::TcpListener>,
    dirty: Option<DirtyMode>,
    gate: impl FnOnce(super::net::Delivery) -> Arc<dyn super::net::OutputGate>,
) -> Result<(Vm, Option<super::net::NetService>), VmmError> {
    use super::net::{NetDevice, NetError, NetService};
    if !opts.workload.uses_network() {
        return Ok((boot_image_with(opts, GUEST_ELF, dirty, |_| Ok(()))?, None));
    }
    let listener = match listener {
        Some(l) => l,
        None => std::net::TcpListener::bind((opts.bind, opts.port)).map_err(|source| {
            NetError::Listen {
                addr: std::net::SocketAddr::new(opts.bind, opts.port).to_string(),
                source,
            }
        })?,
    };
    let mut service = None;
    let vm = boot_image_with(opts, GUEST_ELF, dirty, |vm| {
        let dev = NetDevice::new(vm.bus().wakers().clone(), gate);
        vm.bus().attach_net(dev.clone());
        vm.bus().register_device_state(dev.clone())?;
        service = Some(NetService::start(listener, dev)?);
        Ok(())
    })?;
    if let Some(s) = &service {
        let addr = s.local_addr();
        tracing::info!(workload = %opts.workload, %addr, "net: listening on {addr}");
    }
    Ok((vm, service))
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
    run_with_listener(opts, stop, None)
}

/// [`run()`] with the service's listening socket already bound (tests bind
/// port 0 and read the address first). `None`: `kv` and `bank` bind
/// `opts.bind:opts.port`; other workloads have no network device.
///
/// # Errors
///
/// As [`run()`], plus [`VmmError::Net`] when the port cannot be bound.
pub fn run_with_listener(
    opts: &RunOptions,
    stop: &AtomicBool,
    listener: Option<std::net::TcpListener>,
) -> Result<RunSummary, VmmError> {
    let (vm, net) = boot_service(opts, listener)?;
    supervise(vm, net, opts, stop, &mut |_| Ok(()))
}

/// Runs a started (or restored and resumed) `vm` until every vCPU has
/// ended or `stop` is set, calling `tick` about every 50 ms (checkpoints
/// hook in there), then stops the VM, flushes its disk and stops its
/// network service. Of `opts`, only `vcpus` and `watchdog` matter.
///
/// # Errors
///
/// As [`run`], plus the error of `tick`.
pub fn supervise(
    mut vm: Vm,
    net: Option<super::net::NetService>,
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
    let block = vm.bus().block();
    if matches!(block.policy(), FlushPolicy::WriteBack { .. }) {
        block.flush_all()?;
    }
    if block.capacity() > 0 {
        tracing::info!(stats = ?block.stats(), "disk");
    }
    if let Some(mut net) = net {
        net.shutdown();
        let s = net.device().stats();
        tracing::info!(
            connections = s.connections,
            dropped = s.dropped_connections,
            requests = s.requests,
            responses = s.responses,
            exits = s.notify_exits + s.wait_exits,
            exits_per_response = format_args!("{:.3}", s.exits_per_response()),
            "net: service stopped"
        );
    }
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
        assert_eq!("touch".parse(), Ok(Workload::Touch));
        assert_eq!("random".parse(), Ok(Workload::Random));
        assert_eq!("kv".parse(), Ok(Workload::Kv));
        assert_eq!("bank".parse(), Ok(Workload::Bank));
        assert!("kvx".parse::<Workload>().is_err());
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

    #[test]
    fn touch_layout_puts_the_region_after_the_logs() {
        let opts = RunOptions {
            workload: Workload::Touch,
            mem_bytes: 64 << 20,
            vcpus: 2,
            ..Default::default()
        };
        let bp = opts.boot_params(1);
        assert_eq!(bp.workload, workload::TOUCH);
        let t = bp.touch;
        assert_eq!(t.log_gpa, abi::HEAP_GPA);
        let logs_end = t.log_gpa + 2 * abi::touch_log_stride(t.log_entries);
        assert!(t.region_gpa >= logs_end);
        assert_eq!(t.region_gpa % abi::LARGE_PAGE_SIZE, 0);
        assert_eq!(t.region_pages, (16 << 20) / abi::PAGE_SIZE);
        assert_eq!(abi::touch_log_stride(65536), 129 * abi::PAGE_SIZE);
        let small = RunOptions {
            mem_bytes: 8 << 20,
            ..opts
        };
        let t = small.boot_params(1).touch;
        assert!(t.region_gpa + t.region_pages * abi::PAGE_SIZE <= 8 << 20);
    }
}
