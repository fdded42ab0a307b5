//! `cargo xtask run`: the bundled guest's `kv` service under `simrep run`,
//! with a disk, driven by `simrep load --verify` with a live line per
//! second; both stop cleanly on Ctrl-C or at the end.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Stops a child with SIGINT (a clean stop), then kills it if it lingers.
struct Guard(Option<Child>, &'static str);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: kill(2) on our own, not yet reaped, child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("{} did not stop within 10 s; killing it", self.1);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the main job.
pub fn run(simrep: &Path, out: &Path, duration: &str, mem: &str) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let disk = out.join("kv-disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 30))
        .with_context(|| format!("creating {}", disk.display()))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    // Ctrl-C reaches the foreground process group: the client stops, makes
    // its final verification pass against the still running guest and
    // prints its summary; this process notes it and then stops the guest,
    // which runs in a process group of its own.
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&interrupted))
        .context("installing the Ctrl-C handler")?;
    eprintln!(
        "== starting the guest: simrep run --workload kv --mem {mem} --port {port} --disk {}",
        disk.display()
    );
    let guest = Command::new(simrep)
        .args(["run", "--workload", "kv", "--mem", mem, "--vcpus", "1"])
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .arg("--disk")
        .arg(&disk)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .context("starting simrep run")?;
    let mut guest = Guard(Some(guest), "simrep run");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        if let Some(c) = guest.0.as_mut() {
            if let Some(status) = c.try_wait()? {
                guest.0 = None;
                bail!("simrep run exited before serving: {status}");
            }
        }
        if Instant::now() > deadline {
            bail!("the guest did not listen on port {port} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let json = out.join("load.json");
    eprintln!(
        "== client load: simrep load --target 127.0.0.1:{port} --duration {duration} --verify (Ctrl-C stops early)"
    );
    let status = Command::new(simrep)
        .args(["load", "--target", &format!("127.0.0.1:{port}")])
        .args([
            "--workload",
            "kv",
            "--duration",
            duration,
            "--connections",
            "8",
        ])
        .args([
            "--value-size",
            "64-4096",
            "--warmup",
            "2s",
            "--verify",
            "--json",
        ])
        .arg(&json)
        .status()
        .context("starting simrep load")?;
    drop(guest);
    if interrupted.load(Ordering::Relaxed) {
        eprintln!("== interrupted (Ctrl-C): the client and the guest stopped");
        return Ok(());
    }
    if !status.success() {
        bail!("simrep load failed: {status}");
    }
    eprintln!(
        "== done: figures in {}; the guest's kv log is in {} (a fresh one each run)",
        json.display(),
        disk.display()
    );
    Ok(())
}
