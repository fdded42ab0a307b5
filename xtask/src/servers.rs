//! Real servers under their own load tools, traced with `simrep trace capture`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sh;

/// A server and its load tool.
#[derive(Clone, Copy, Debug)]
pub enum Server {
    /// memcached under memaslap (Debian: memcached, libmemcached-tools).
    Memcached,
    /// Redis under redis-benchmark (Debian: redis-server, redis-tools).
    Redis,
    /// MariaDB under sysbench oltp_read_write (Debian: mariadb-server, sysbench).
    Mariadb,
}

impl Server {
    /// Every server, in the order `figures` traces them.
    pub const ALL: [Server; 3] = [Server::Memcached, Server::Redis, Server::Mariadb];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Server::Memcached => "memcached",
            Server::Redis => "redis",
            Server::Mariadb => "mariadb",
        }
    }
}

impl FromStr for Server {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Server::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .with_context(|| format!("unknown server {s:?} (memcached, redis, mariadb)"))
    }
}

/// Child processes killed when dropped, so nothing outlives the task.
struct Procs(Vec<(String, Child)>);

impl Procs {
    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<u32> {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?}); did `cargo xtask setup` run?"))?;
        let pid = child.id();
        self.0.push((name.to_string(), child));
        Ok(pid)
    }

    fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited early: {status}");
            }
        }
        Ok(())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child) in self.0.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        sleep(Duration::from_millis(100));
    }
    bail!("{what} did not listen on port {port} within 30 s")
}

/// Starts `server` with its load, captures `epochs` epochs into `trace`.
pub fn trace_server(
    simrep: &Path,
    server: Server,
    trace: &Path,
    epochs: u32,
    epoch_ms: u32,
) -> Result<()> {
    let secs = (u64::from(epochs) * u64::from(epoch_ms)) / 1000 + 90;
    let tmpdir = tempfile::Builder::new()
        .prefix(&format!("simrep-{}-", server.name()))
        .tempdir()?;
    let tmp = tmpdir.path().to_owned();
    // Declared after the directory so that the servers stop before it goes.
    let mut procs = Procs(Vec::new());
    let (pid, description) = match server {
        Server::Memcached => {
            let port = free_port()?;
            let pid = procs.spawn(
                "memcached",
                Command::new("memcached").args([
                    "-u",
                    "root",
                    "-l",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "0",
                    "-m",
                    "512",
                    "-t",
                    "2",
                ]),
            )?;
            wait_for_port(port, "memcached")?;
            procs.spawn(
                "memaslap",
                Command::new("memcaslap").args([
                    "-s",
                    &format!("127.0.0.1:{port}"),
                    "-T",
                    "2",
                    "-c",
                    "32",
                    "-o",
                    "0.3",
                    "-t",
                    &format!("{secs}s"),
                ]),
            )?;
            (
                pid,
                format!(
                    "memcached (512 MiB cache, 2 threads), under memaslap (2 threads, 32 connections, 30% overwrites), {epoch_ms} ms epochs"
                ),
            )
        }
        Server::Redis => {
            let port = free_port()?;
            let pid = procs.spawn(
                "redis-server",
                Command::new("redis-server").args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    &tmp.to_string_lossy(),
                ]),
            )?;
            wait_for_port(port, "redis-server")?;
            procs.spawn(
                "redis-benchmark",
                Command::new("redis-benchmark").args([
                    "-p",
                    &port.to_string(),
                    "-t",
                    "set,get,incr,lpush,hset",
                    "-r",
                    "200000",
                    "-d",
                    "512",
                    "-c",
                    "32",
                    "-n",
                    "100000000",
                    "-q",
                ]),
            )?;
            (
                pid,
                format!(
                    "redis-server under redis-benchmark (set,get,incr,lpush,hset; 200k keys, 512 B values, 32 clients), {epoch_ms} ms epochs"
                ),
            )
        }
        Server::Mariadb => {
            let data = tmp.join("data");
            let sock = tmp.join("mysqld.sock");
            sh(Command::new("mariadb-install-db")
                .arg("--user=root")
                .arg(format!("--datadir={}", data.display()))
                .arg("--auth-root-authentication-method=normal")
                .stdout(Stdio::null()))?;
            let pid = procs.spawn(
                "mariadbd",
                Command::new("mariadbd")
                    .arg("--user=root")
                    .arg(format!("--datadir={}", data.display()))
                    .arg(format!("--socket={}", sock.display()))
                    .arg("--skip-networking")
                    .arg("--innodb-buffer-pool-size=256M")
                    .arg(format!("--pid-file={}", tmp.join("mysqld.pid").display())),
            )?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !sock.exists() {
                procs.check_alive()?;
                if Instant::now() > deadline {
                    bail!("mariadbd did not create {} within 60 s", sock.display());
                }
                sleep(Duration::from_millis(200));
            }
            sh(Command::new("mariadb")
                .arg(format!("--socket={}", sock.display()))
                .args(["-u", "root", "-e", "CREATE DATABASE IF NOT EXISTS sbtest"]))?;
            let sysbench = |phase: &str| {
                let mut c = Command::new("sysbench");
                c.arg("oltp_read_write")
                    .arg("--db-driver=mysql")
                    .arg(format!("--mysql-socket={}", sock.display()))
                    .args(["--mysql-user=root", "--tables=4", "--table-size=100000"])
                    .arg(phase);
                c
            };
            sh(sysbench("prepare").stdout(Stdio::null()))?;
            let mut run = sysbench("run");
            run.args(["--threads=4", &format!("--time={secs}")]);
            procs.spawn("sysbench", &mut run)?;
            (
                pid,
                format!(
                    "mariadbd (256 MiB buffer pool) under sysbench oltp_read_write (4 tables x 100k rows, 4 threads), {epoch_ms} ms epochs"
                ),
            )
        }
    };
    // Let the load fill the server's memory and reach a steady state.
    let warm = match server {
        Server::Memcached => 12,
        Server::Redis => 10,
        Server::Mariadb => 8,
    };
    eprintln!("warming {} up under load for {warm} s", server.name());
    sleep(Duration::from_secs(warm));
    procs.check_alive()?;
    sh(Command::new(simrep)
        .args(["trace", "capture", "--pid", &pid.to_string()])
        .args(["--epochs", &epochs.to_string()])
        .args(["--epoch-ms", &epoch_ms.to_string()])
        .args(["--description", &description])
        .arg("-o")
        .arg(trace))?;
    procs.check_alive()?;
    Ok(())
}
