//! End-to-end tests of eBPF copy-on-write fault tracing
//! (`simrep::ebpf::CowTracer`) on real guest memory (`simrep::vmm`'s
//! `GuestMemory`) under a real userfaultfd write-protect view
//! (`simrep::dirty::cow::CowMemory`): host threads of this process write a
//! known set of pages while a view is armed over another known set, and the
//! events must name exactly the armed pages written, with the writer's
//! thread id. The programs filter by thread group *and* guest-memory range,
//! so other tests of this process (other memory) do not disturb them.
//!
//! Needs root, bpffs, tracefs, `bpftool` and the right to open a
//! userfaultfd; without one a test fails and says which.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use simrep::dirty::cow::{CowMemory, CowOptions, PageSource, PAGE_SIZE};
use simrep::ebpf::{
    consecutive_ranges, CowEvent, CowStat, CowTraceError, CowTracer, EbpfError, WriteTracer,
    COW_CONFIG_MAP, COW_EVENTS_MAP, COW_LOCK_DIR, COW_PINNED_MAPS, COW_STATS_MAP, PIN_ROOT,
};
use simrep::vmm::run::{self, ChurnOptions, RunOptions, Workload};
use simrep::vmm::GuestMemory;

use super::ebpf::{bpftool_dump, dump_entries, error_chain, json_number, require_root};

const PAGE: u64 = PAGE_SIZE as u64;
const MIB: u64 = 1 << 20;
/// Env var that turns [`crash_helper`] on; its value is the VM name.
const CRASH_HELPER_ENV: &str = "SIMREP_E2E_EBPF_COW_CRASH_HELPER";

/// A VM name unique to this test process.
fn instance(test: &str) -> String {
    format!("e2e-cow-{test}-{}", std::process::id())
}

fn my_tgid() -> u32 {
    std::process::id()
}

/// The calling thread's id.
fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    u32::try_from(tid).expect("positive tid")
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn start(name: &str, mem: &GuestMemory) -> CowTracer {
    CowTracer::for_memory(name, my_tgid(), mem).unwrap_or_else(|e| {
        panic!(
            "cannot start eBPF copy-on-write tracing: {}",
            error_chain(&e)
        )
    })
}

/// Guest memory with every page written once (populated, no first-touch
/// faults later).
fn memory(bytes: u64) -> Arc<GuestMemory> {
    let mem = Arc::new(GuestMemory::new(bytes).expect("guest memory"));
    for gfn in 0..bytes / PAGE {
        mem.write(gfn * PAGE, &gfn.to_le_bytes()).unwrap();
    }
    mem
}

/// A view over exactly the armed pages (no merged gaps, which would fault
/// too).
fn cow_memory(mem: &Arc<GuestMemory>) -> CowMemory {
    let mut cow = CowMemory::new(Arc::clone(mem)).unwrap_or_else(|e| {
        panic!(
            "cannot register guest memory for userfaultfd write-protect: {}",
            error_chain(&e)
        )
    });
    cow.set_options(CowOptions {
        coalesce_gap: 0,
        max_ranges: usize::MAX,
        align: 1,
        // One fault per written page: the counts are checked.
        block_copy_max: 0,
    });
    cow
}

/// Writes 64 bytes into each page of `gfns`, `times` times, from a new
/// thread; returns that thread's id.
fn write_pages(mem: &Arc<GuestMemory>, gfns: &[u64], times: u32, byte: u8) -> u32 {
    let mem = Arc::clone(mem);
    let gfns = gfns.to_vec();
    std::thread::spawn(move || {
        for t in 0..times {
            for &g in &gfns {
                mem.write(g * PAGE + 64 * u64::from(t), &[byte; 64])
                    .unwrap();
            }
        }
        gettid()
    })
    .join()
    .expect("writer thread")
}

/// Sum over CPUs of entry `key` in a `bpftool -j` per-CPU array dump.
fn per_cpu_sum(entries: &[serde_json::Value], key: u32) -> u64 {
    let entry = entries
        .iter()
        .find(|e| json_number(&e["key"]) == u64::from(key))
        .unwrap_or_else(|| panic!("no key {key} in {entries:?}"));
    entry["values"]
        .as_array()
        .expect("per-CPU values")
        .iter()
        .map(|v| json_number(&v["value"]))
        .sum()
}

/// Pages of `events`, with the number of events each.
fn pages(events: &[CowEvent]) -> BTreeMap<u64, usize> {
    let mut out = BTreeMap::new();
    for e in events {
        *out.entry(e.gfn).or_insert(0) += 1;
    }
    out
}

#[test]
fn cow_events_name_exactly_the_armed_pages_written() {
    require_root();
    let name = instance("window");
    let mem = memory(16 * MIB);
    let cow = cow_memory(&mem);
    let mut tracer = start(&name, &mem);
    let npages = mem.size() / PAGE;

    // Before any view: populated pages do not fault.
    write_pages(&mem, &[1, 2, 3, 1000], 2, 0x11);
    let before = tracer.poll();
    assert!(
        before.is_empty(),
        "write faults before arming: {before:?} (guest memory not populated?)"
    );
    let _ = tracer.take_epoch_stats().unwrap();

    // Armed: scattered pages, runs, both ends of memory.
    let armed: Vec<u64> = [0, 7, 8, 9, 100, 513, 1024, 2000, 3000, npages - 1]
        .into_iter()
        .chain((1500..1540).step_by(3))
        .collect();
    // Two writers, each with part of the armed pages (every armed page but
    // three) and pages outside the view.
    let written_armed = &armed[..armed.len() - 3];
    let a: Vec<u64> = written_armed.iter().copied().step_by(2).collect();
    let b: Vec<u64> = written_armed.iter().copied().skip(1).step_by(2).collect();
    let outside = [1, 2, 3, 10, 101, 1000, 1501, npages - 2];
    let armed_set: BTreeSet<u64> = armed.iter().copied().collect();
    assert!(outside.iter().all(|g| !armed_set.contains(g)));

    let t0 = monotonic_ns();
    let view = cow.arm(&armed).unwrap();
    let tid_a = write_pages(&mem, &[&a[..], &outside[..]].concat(), 3, 0xa5);
    let tid_b = write_pages(&mem, &[&outside[..], &b[..]].concat(), 3, 0x5a);
    let events = tracer.poll();
    let t1 = monotonic_ns();
    // The view saw the same writes.
    let mut buf = [0u8; PAGE_SIZE];
    for &g in a.iter().chain(&b) {
        assert_eq!(
            view.read_page(g, &mut buf).unwrap(),
            PageSource::Saved,
            "page {g}"
        );
    }
    let cow_stats = view.finish();
    let epoch = tracer.take_epoch_stats().unwrap();
    eprintln!(
        "armed {} pages, wrote {} of them and {} outside: {} events on {} pages; \
         userfaultfd faults {}; eBPF epoch stats {epoch:?}",
        armed.len(),
        a.len() + b.len(),
        outside.len(),
        events.len(),
        pages(&events).len(),
        cow_stats.faults
    );

    let written: BTreeSet<u64> = a.iter().chain(&b).copied().collect();
    let seen: BTreeSet<u64> = pages(&events).keys().copied().collect();
    assert_eq!(
        seen,
        written,
        "the COW events must name exactly the armed pages written (missing {:?}, extra {:?})",
        written.difference(&seen).collect::<Vec<_>>(),
        seen.difference(&written).collect::<Vec<_>>()
    );
    // Every write-protect fault the handler saw was a CPU exception of a
    // host writer; a writer can also re-fault on a page while the handler
    // is un-protecting it (an event, and no second userfaultfd message).
    assert!(
        events.len() as u64 >= cow_stats.faults,
        "{} events < {} write-protect faults",
        events.len(),
        cow_stats.faults
    );
    for e in &events {
        let want_tid = if a.contains(&e.gfn) { tid_a } else { tid_b };
        assert_eq!(e.tid, want_tid, "writer of page {}: {e:?}", e.gfn);
        assert!(e.is_write() && e.is_protection(), "{e:?}");
        assert_eq!(e.range, 0);
        assert_eq!(tracer.gfn_of(e.host_addr), Some(e.gfn));
        assert_eq!(e.host_addr & !(PAGE - 1), mem.host_addr() + e.gfn * PAGE);
        assert!(
            (t0..=t1).contains(&e.ktime_ns),
            "{e:?} outside [{t0}, {t1}]"
        );
    }
    assert_eq!(epoch.cow_faults, events.len() as u64, "{epoch:?}");
    assert_eq!(epoch.ring_full, 0, "{epoch:?}");
    assert_eq!(epoch.read_errors, 0, "{epoch:?}");

    // After the view: nothing faults any more.
    write_pages(&mem, &[&a[..], &b[..], &outside[..]].concat(), 1, 0x77);
    let after = tracer.poll();
    assert!(after.is_empty(), "events after the view closed: {after:?}");
    assert_eq!(tracer.take_epoch_stats().unwrap().cow_faults, 0);
}

/// Whether `fd` is readable within `timeout_ms`.
fn readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    assert!(rc >= 0, "poll: {}", std::io::Error::last_os_error());
    rc == 1 && pfd.revents & libc::POLLIN != 0
}

#[test]
fn a_full_ring_drops_and_counts_events_and_its_fd_signals_them() {
    require_root();
    let name = instance("full");
    let mem = memory(8 * MIB);
    let cow = cow_memory(&mem);
    // One page of ring: 85 records of 48 bytes.
    let ring = 4096;
    let mut tracer = CowTracer::start_with(
        &name,
        my_tgid(),
        &consecutive_ranges(&[(mem.host_addr(), mem.size())]),
        ring,
    )
    .unwrap_or_else(|e| panic!("start: {}", error_chain(&e)));
    assert!(!readable(tracer.events_fd(), 0), "events before any write");

    let gfns: Vec<u64> = (0..300).map(|i| i * 2).collect();
    let view = cow.arm(&gfns).unwrap();
    write_pages(&mem, &gfns, 1, 0x99);
    drop(view);
    assert!(
        readable(tracer.events_fd(), 1000),
        "the ring fd is not readable"
    );
    let events = tracer.poll();
    let stats = tracer.take_epoch_stats().unwrap();
    eprintln!("{} events kept of {stats:?}", events.len());
    assert!(
        !events.is_empty() && events.len() <= ring as usize / 48,
        "{} events in a {ring}-byte ring",
        events.len()
    );
    assert!(stats.cow_faults >= gfns.len() as u64, "{stats:?}");
    assert_eq!(
        events.len() as u64 + stats.ring_full,
        stats.cow_faults,
        "every fault is an event or counted as dropped: {stats:?}"
    );
    // The first events are kept, the rest dropped.
    let kept: Vec<u64> = pages(&events).keys().copied().collect();
    assert_eq!(kept[..], gfns[..kept.len()], "not the first pages written");
    assert!(!readable(tracer.events_fd(), 0), "events left after poll");

    // Drained, the ring takes events again.
    let again = [1, 3, 5];
    let view = cow.arm(&again).unwrap();
    write_pages(&mem, &again, 1, 0x66);
    drop(view);
    let events = tracer.poll();
    assert_eq!(pages(&events).keys().copied().collect::<Vec<_>>(), again);
    assert_eq!(tracer.take_epoch_stats().unwrap().ring_full, 0);
}

#[test]
fn a_second_range_maps_to_its_guest_frames() {
    require_root();
    let name = instance("ranges");
    let low = memory(4 * MIB);
    let high = memory(4 * MIB);
    let cow = cow_memory(&high);
    // Two mappings: `low` at guest 0, `high` right after it.
    let mut tracer = CowTracer::start(
        &name,
        my_tgid(),
        &[
            (low.host_addr(), low.size()),
            (high.host_addr(), high.size()),
        ],
    )
    .unwrap_or_else(|e| panic!("start: {}", error_chain(&e)));
    let view = cow.arm(&[5, 6, 700]).unwrap();
    write_pages(&high, &[5, 700, 800], 1, 0x3c);
    let events = tracer.poll();
    drop(view);
    let offset = low.size() / PAGE;
    assert_eq!(
        pages(&events).keys().copied().collect::<Vec<_>>(),
        vec![offset + 5, offset + 700],
        "{events:?}"
    );
    assert!(events.iter().all(|e| e.range == 1), "{events:?}");
}

#[test]
fn bpftool_dumps_the_pinned_cow_maps_and_they_go_away_on_drop() {
    require_root();
    let name = instance("pins");
    let mem = memory(8 * MIB);
    let cow = cow_memory(&mem);
    let mut tracer = start(&name, &mem);
    let pin_dir = PathBuf::from(PIN_ROOT).join(&name);
    assert_eq!(tracer.pin_dir(), pin_dir);
    for map in COW_PINNED_MAPS {
        let pin = tracer.map_pin_path(map);
        assert!(pin.exists(), "{} not pinned", pin.display());
    }

    let written: Vec<u64> = (0..32).map(|i| i * 37 + 3).collect();
    let view = cow.arm(&written).unwrap();
    write_pages(&mem, &written, 1, 0xc3);
    drop(view);
    let events = tracer.poll();
    assert_eq!(pages(&events).len(), written.len(), "{events:?}");
    let stats = tracer.stats().unwrap();

    let stats_pin = tracer.map_pin_path(COW_STATS_MAP);
    let plain = bpftool_dump(&stats_pin, false);
    eprintln!("bpftool map dump pinned {}:\n{plain}", stats_pin.display());
    assert!(
        plain.contains("\"key\": 0") && plain.contains("\"cpu\": 0"),
        "bpftool does not show the typed per-CPU statistics:\n{plain}"
    );
    let entries = dump_entries(&bpftool_dump(&stats_pin, true));
    assert_eq!(entries.len(), CowStat::COUNT as usize, "{entries:?}");
    assert_eq!(
        per_cpu_sum(&entries, CowStat::CowFaults.index()),
        stats.cow_faults,
        "bpftool and the API disagree on the COW faults"
    );
    assert!(stats.cow_faults >= written.len() as u64, "{stats:?}");
    assert_eq!(per_cpu_sum(&entries, CowStat::RingFull.index()), 0);

    let config_pin = tracer.map_pin_path(COW_CONFIG_MAP);
    let plain = bpftool_dump(&config_pin, false);
    eprintln!("bpftool map dump pinned {}:\n{plain}", config_pin.display());
    let config = dump_entries(&bpftool_dump(&config_pin, true));
    let value = &config[0]["value"];
    assert_eq!(
        json_number(&value["target_tgid"]),
        u64::from(my_tgid()),
        "{config:?}"
    );
    assert_eq!(json_number(&value["nr_ranges"]), 1, "{config:?}");
    assert_eq!(
        json_number(&value["ranges"][0]["host_addr"]),
        mem.host_addr()
    );
    assert_eq!(json_number(&value["ranges"][0]["len"]), mem.size());
    assert_eq!(json_number(&value["ranges"][0]["guest_phys"]), 0);

    // The ring buffer is pinned too (bpftool cannot dump a ring buffer, but
    // shows it).
    let show = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(tracer.map_pin_path(COW_EVENTS_MAP))
        .output()
        .expect("run bpftool");
    let show = String::from_utf8_lossy(&show.stdout);
    eprintln!("bpftool map show pinned .../{COW_EVENTS_MAP}: {show}");
    assert!(show.contains("\"ringbuf\""), "{show}");

    drop(tracer);
    for map in COW_PINNED_MAPS {
        let pin = pin_dir.join(map);
        assert!(!pin.exists(), "{} left behind", pin.display());
    }
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
}

#[test]
fn cow_and_write_tracers_of_one_vm_share_its_pin_directory() {
    require_root();
    let name = instance("share");
    let mem = memory(2 * MIB);
    let writes = WriteTracer::start(&name, my_tgid())
        .unwrap_or_else(|e| panic!("start the write tracer: {}", error_chain(&e)));
    let tracer = start(&name, &mem);
    assert_eq!(tracer.pin_dir(), writes.pin_dir());
    // A second live copy-on-write tracer of the same VM is refused.
    match CowTracer::for_memory(&name, my_tgid(), &mem) {
        Err(CowTraceError::Ebpf(EbpfError::PinDirInUse { path })) => {
            assert_eq!(path, tracer.pin_dir().join(COW_LOCK_DIR));
        }
        other => panic!("a second tracer of {name} was not refused: {other:?}"),
    }
    let pin_dir = tracer.pin_dir().to_owned();
    drop(tracer);
    assert!(!pin_dir.join(COW_STATS_MAP).exists());
    assert!(!pin_dir.join(COW_LOCK_DIR).exists());
    assert!(
        writes.map_pin_path(simrep::ebpf::WRITE_STATS_MAP).exists(),
        "dropping the COW tracer removed the write tracer's pins"
    );
    drop(writes);
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
}

#[test]
fn stale_cow_pins_of_a_crashed_run_are_replaced() {
    require_root();
    let name = instance("stale");
    tests::run_ignored_test("ebpf_cow::crash_helper", &[(CRASH_HELPER_ENV, &name)]);
    let pin_dir = PathBuf::from(PIN_ROOT).join(&name);
    let stale = pin_dir.join(COW_CONFIG_MAP);
    assert!(stale.exists(), "the crashed run left no pin to replace");
    assert!(pin_dir.join(COW_LOCK_DIR).exists());
    let stale_config = dump_entries(&bpftool_dump(&stale, true));
    assert_eq!(json_number(&stale_config[0]["value"]["target_tgid"]), 1);

    let mem = memory(2 * MIB);
    let tracer = start(&name, &mem);
    let config = dump_entries(&bpftool_dump(&tracer.map_pin_path(COW_CONFIG_MAP), true));
    assert_eq!(
        json_number(&config[0]["value"]["target_tgid"]),
        u64::from(my_tgid()),
        "the stale pin was not replaced: {config:?}"
    );
    drop(tracer);
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
}

/// Not a test: [`stale_cow_pins_of_a_crashed_run_are_replaced`] runs it in a
/// child process, where it starts a tracer and "crashes" (exits without
/// cleanup).
#[test]
#[ignore = "helper run by stale_cow_pins_of_a_crashed_run_are_replaced"]
fn crash_helper() {
    let Ok(name) = std::env::var(CRASH_HELPER_ENV) else {
        return;
    };
    let mem = GuestMemory::new(2 * MIB).expect("guest memory");
    let tracer = CowTracer::for_memory(&name, 1, &mem)
        .unwrap_or_else(|e| panic!("start: {}", error_chain(&e)));
    assert!(tracer.map_pin_path(COW_CONFIG_MAP).exists());
    // Like a crash: no destructors run, the pins stay.
    std::process::exit(0);
}

/// With a real KVM guest (`churn`, its vCPUs writing guest memory as fast
/// as they can): the host's own writes to armed pages while the vCPUs are
/// paused are events with the writer's tid; vCPU writes inside `KVM_RUN`
/// fault through KVM's `get_user_pages` (no CPU exception, so no
/// `page_fault_user` event); every event is an armed page.
#[test]
fn with_a_kvm_guest_events_are_the_host_writes_to_armed_pages() {
    require_root();
    tests::require_kvm();
    let name = instance("kvm");
    let opts = RunOptions {
        workload: Workload::Churn,
        mem_bytes: 64 * MIB,
        vcpus: 1,
        churn: ChurnOptions {
            rate_mib_s: 0,
            report_ms: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    let vm = run::boot(&opts).expect("boot the churn guest");
    let progress = || run::progress(&vm, 0).expect("progress");
    let t = Instant::now();
    while progress() == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "churn never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mem = vm.memory();
    let cow = cow_memory(mem);
    let mut tracer = start(&name, mem);
    let pages = cow.pages();
    let armed: Vec<u64> = (0..pages).step_by(2).collect();
    // Host writes: armed pages near the top of memory, plus unarmed ones.
    let host_armed: Vec<u64> = armed.iter().rev().take(16).copied().collect();
    let host_other: Vec<u64> = host_armed.iter().map(|g| g + 1).collect();
    // Keep the guest's view of those pages: write back what was there.
    let restore: Vec<(u64, [u8; 64])> = host_armed
        .iter()
        .chain(&host_other)
        .map(|&g| {
            let mut b = [0u8; 64];
            mem.read(g * PAGE, &mut b).unwrap();
            (g, b)
        })
        .collect();

    vm.pause_all().expect("pause");
    let _ = tracer.poll();
    let view = cow.arm(&armed).unwrap();
    let host_tid = {
        let mem = Arc::clone(mem);
        std::thread::spawn(move || {
            for (g, b) in &restore {
                mem.write(g * PAGE, b).unwrap();
            }
            gettid()
        })
        .join()
        .unwrap()
    };
    vm.resume_all().expect("resume");
    let p0 = progress();
    std::thread::sleep(Duration::from_millis(300));
    let p1 = progress();
    vm.pause_all().expect("pause");
    let events = tracer.poll();
    let stats = view.finish();
    vm.resume_all().expect("resume");

    let armed_set: BTreeSet<u64> = armed.iter().copied().collect();
    let by_host: BTreeSet<u64> = events
        .iter()
        .filter(|e| e.tid == host_tid)
        .map(|e| e.gfn)
        .collect();
    let others: Vec<&CowEvent> = events.iter().filter(|e| e.tid != host_tid).collect();
    eprintln!(
        "guest progress {p0} -> {p1}; userfaultfd write-protect faults {}, pages copied {}; \
         eBPF events {} ({} from the host writer, {} from other threads: {:?})",
        stats.faults,
        stats.pages_copied,
        events.len(),
        by_host.len(),
        others.len(),
        others.iter().take(4).collect::<Vec<_>>()
    );
    assert!(p1 > p0, "the guest made no progress");
    assert!(
        stats.faults > host_armed.len() as u64,
        "the vCPUs raised no write-protect fault"
    );
    assert_eq!(
        by_host,
        host_armed.iter().copied().collect::<BTreeSet<u64>>(),
        "the host writer's events must be exactly its armed pages"
    );
    for e in &events {
        assert!(
            armed_set.contains(&e.gfn),
            "event outside the armed set: {e:?}"
        );
    }
}

/// Median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `round(traced)` `rounds` times each way, alternating which goes
/// first; returns the medians (without, with) and the program's mean run
/// time in ns over the traced rounds.
fn with_and_without(
    rounds: usize,
    mut round: impl FnMut(bool) -> (f64, Option<(u64, Duration)>),
) -> (f64, f64, f64) {
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let (mut runs, mut time) = (0u64, Duration::ZERO);
    for i in 0..rounds {
        for traced in [i % 2 == 0, i % 2 != 0] {
            let (rate, run_stats) = round(traced);
            if let Some((n, t)) = run_stats {
                runs += n;
                time += t;
            }
            if traced { &mut with } else { &mut without }.push(rate);
        }
    }
    let ns_per_run = time.as_nanos() as f64 / runs.max(1) as f64;
    (median(&mut without), median(&mut with), ns_per_run)
}

/// A tracer if `traced`; then waits for the kernel's deferred work of
/// loading (and of freeing the previous round's maps) to settle, which
/// would otherwise run on the 2 CPUs during the timed writes.
fn maybe_tracer(name: &str, mem: &GuestMemory, traced: bool) -> Option<CowTracer> {
    let tracer = traced.then(|| start(name, mem));
    std::thread::sleep(Duration::from_millis(300));
    tracer
}

/// The program's (runs, run time) since `before`.
fn run_delta(tracer: &CowTracer, before: (u64, Duration)) -> (u64, Duration) {
    let now = tracer.program_run_stats().expect("program run stats");
    (now.0 - before.0, now.1 - before.1)
}

/// Write faults per second of one host writer, with and without the
/// tracer, alternating in one run; prints the medians and the program's
/// mean run time (kernel BPF run-time statistics, on for the benchmark).
/// Two kinds of fault: copy-on-write faults under an armed view (a
/// userfaultfd round trip each), and first-touch faults of freshly
/// discarded 4 KiB pages (cheap, so the program's share shows).
/// `cargo test -p tests --test e2e ebpf_cow::cow_fault_overhead -- --ignored --nocapture`
#[test]
#[ignore = "benchmark: prints figures"]
fn cow_fault_overhead() {
    require_root();
    const PAGES: u64 = 4096;
    const ROUNDS: usize = 15;
    let _run_stats = simrep::ebpf::enable_bpf_run_stats().expect("BPF_ENABLE_STATS");
    let name = instance("bench");

    // Copy-on-write faults: every 4th page of 64 MiB, one range per page.
    let mem = memory(64 * MIB);
    let cow = cow_memory(&mem);
    let gfns: Vec<u64> = (0..PAGES).map(|i| i * 4).collect();
    let (wo, w, ns) = with_and_without(ROUNDS, |traced| {
        let mut tracer = maybe_tracer(&name, &mem, traced);
        let before = tracer.as_ref().map(|t| t.program_run_stats().unwrap());
        let view = cow.arm(&gfns).unwrap();
        let elapsed = {
            let mem = Arc::clone(&mem);
            let gfns = gfns.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                for &g in &gfns {
                    mem.write(g * PAGE, &[0x42; 8]).unwrap();
                }
                t.elapsed()
            })
            .join()
            .unwrap()
        };
        let stats = view.finish();
        assert_eq!(stats.faults, PAGES);
        let runs = tracer.as_mut().map(|t| {
            let events = t.poll();
            assert_eq!(pages(&events).len() as u64, PAGES, "events lost");
            run_delta(t, before.unwrap())
        });
        (PAGES as f64 / elapsed.as_secs_f64(), runs)
    });
    println!(
        "COW faults/s, 1 host writer, {PAGES} pages, median of {ROUNDS}: \
         without tracer {wo:.0}, with tracer {w:.0} ({:+.1} %); program {ns:.0} ns a run",
        (w / wo - 1.0) * 100.0
    );
    drop(cow);

    // First-touch faults: 16 MiB without huge pages, discarded each round.
    let mem = memory(16 * MIB);
    let (base, len) = (mem.host_addr(), mem.size() as usize);
    // SAFETY: `base..base+len` is `mem`'s private mapping, which nothing
    // else uses; MADV_NOHUGEPAGE only changes how the kernel backs it.
    let rc = unsafe { libc::madvise(base as *mut _, len, libc::MADV_NOHUGEPAGE) };
    assert_eq!(rc, 0, "MADV_NOHUGEPAGE");
    let (wo, w, ns) = with_and_without(ROUNDS, |traced| {
        // SAFETY: as above; MADV_DONTNEED drops the pages (they read as
        // zero and fault in again), which no other code relies on.
        let rc = unsafe { libc::madvise(base as *mut _, len, libc::MADV_DONTNEED) };
        assert_eq!(rc, 0, "MADV_DONTNEED");
        let mut tracer = maybe_tracer(&name, &mem, traced);
        let before = tracer.as_ref().map(|t| t.program_run_stats().unwrap());
        let t = Instant::now();
        for g in 0..PAGES {
            mem.write(g * PAGE, &[0x24; 8]).unwrap();
        }
        let elapsed = t.elapsed();
        let runs = tracer.as_mut().map(|t| {
            let events = t.poll();
            assert!(events.len() as u64 >= PAGES, "{} events", events.len());
            assert!(events.iter().all(|e| !e.is_protection()));
            run_delta(t, before.unwrap())
        });
        (PAGES as f64 / elapsed.as_secs_f64(), runs)
    });
    println!(
        "first-touch write faults/s, {PAGES} pages, median of {ROUNDS}: \
         without tracer {wo:.0}, with tracer {w:.0} ({:+.1} %); program {ns:.0} ns a run",
        (w / wo - 1.0) * 100.0
    );
}
