//! End-to-end tests: `simrep analyze` and `simrep trace capture` as a user
//! runs them, on the real sample trace and on a real process.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tests::{require_root, run, sample_trace, simrep};

/// Raw dirty bytes of the sample's 8 delta epochs (FORMAT.md: 22279 pages).
const SAMPLE_RAW_BYTES: u64 = 22279 * 4096;

fn analyze_json(extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let plots = dir.path().join("plots");
    let out = run(simrep()
        .arg("analyze")
        .arg(sample_trace())
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&plots)
        .args(extra));
    assert!(out.status.success(), "simrep analyze failed");
    for p in std::fs::read_dir(&plots).expect("plot dir written") {
        let p = p.expect("dir entry").path();
        let text = std::fs::read_to_string(&p).expect("plot readable");
        assert!(text.contains("<svg"), "{} is not an SVG", p.display());
    }
    serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
        .expect("valid JSON")
}

fn codec<'a>(report: &'a Value, spec_prefix: &str) -> &'a Value {
    report["codecs"]
        .as_array()
        .expect("codecs array")
        .iter()
        .find(|c| {
            c["spec"]
                .as_str()
                .is_some_and(|s| s.starts_with(spec_prefix))
        })
        .unwrap_or_else(|| panic!("no codec {spec_prefix} in {report:#}"))
}

fn percent(c: &Value) -> f64 {
    c["out_bytes"].as_f64().expect("out_bytes") * 100.0 / c["raw_bytes"].as_f64().expect("raw")
}

#[test]
fn analyze_sample_reproduces_the_reference_baselines() {
    let r = analyze_json(&[
        "--codec",
        "similarity",
        "--codec",
        "lz4",
        "--codec",
        "zstd",
        "--codec",
        "xbzrle:cache=64MiB",
        "--codec",
        "raw",
    ]);
    assert_eq!(r["delta_epochs"], 8);
    let codecs = r["codecs"].as_array().expect("codecs");
    assert_eq!(codecs.len(), 5);
    assert_eq!(
        codecs.iter().filter(|c| c["default"] == true).count(),
        1,
        "exactly one default codec"
    );
    for c in codecs {
        assert_eq!(c["raw_bytes"].as_u64(), Some(SAMPLE_RAW_BYTES), "{c}");
        for key in ["name", "encode_mb_s", "decode_mb_s", "reference_bytes"] {
            assert!(!c[key].is_null(), "{key} missing in {c}");
        }
        assert!(c["encode_mb_s"].as_f64().expect("enc") > 0.0);
        assert!(c["decode_mb_s"].as_f64().expect("dec") > 0.0);
    }
    // FORMAT.md's reference figures for the baselines (tolerance: framing
    // and page numbers, which the reference leaves out).
    let raw = percent(codec(&r, "raw"));
    assert!((100.0..101.0).contains(&raw), "raw {raw}");
    let lz4 = percent(codec(&r, "lz4"));
    assert!((lz4 - 51.8).abs() < 1.5, "lz4 per page {lz4} vs 51.8");
    let zstd = percent(codec(&r, "zstd"));
    assert!((zstd - 31.3).abs() < 1.5, "zstd-1 per epoch {zstd} vs 31.3");
    let xbzrle = percent(codec(&r, "xbzrle"));
    assert!(
        (xbzrle - 23.4).abs() < 1.5,
        "xbzrle 64 MiB {xbzrle} vs 23.4"
    );
    // Fig. 1 for every area size from 64 to 2048 B.
    let fig1 = r["fig1"].as_array().expect("fig1");
    let sizes: Vec<u64> = fig1
        .iter()
        .filter_map(|p| p["area_size"].as_u64())
        .collect();
    assert_eq!(sizes, [64, 128, 256, 512, 1024, 2048]);
    for p in fig1 {
        let share = p["mean_identical_percent"].as_f64().expect("share");
        assert!(share > 0.0 && share <= 100.0, "{p}");
    }
}

#[test]
fn analyze_sample_reproduces_the_papers_codec_figures() {
    let r = analyze_json(&[
        "--no-fig1",
        "--codec",
        "similarity:preset=paper,hash=fraction80",
        "--codec",
        "similarity:preset=paper",
    ]);
    let codecs = r["codecs"].as_array().expect("codecs");
    let f80 = percent(&codecs[0]);
    let median = percent(&codecs[1]);
    // FORMAT.md: 93.6 % with the 80 % threshold, 26.5 % with the median.
    assert!((f80 - 93.6).abs() < 4.0, "80% threshold: {f80} vs 93.6");
    assert!(
        (median - 26.5).abs() < 4.0,
        "median threshold: {median} vs 26.5"
    );
}

/// The size and memory targets on the sample, with the default codec set
/// (deterministic: same trace, same codecs, same bytes).
#[test]
fn default_codec_beats_the_best_baseline_on_the_sample() {
    let r = analyze_json(&["--no-fig1"]);
    let def = r["codecs"]
        .as_array()
        .expect("codecs")
        .iter()
        .find(|c| c["default"] == true)
        .expect("default codec");
    let ratio = r["summary"]["ratio_to_best_baseline"]
        .as_f64()
        .expect("ratio");
    assert!(ratio <= 0.8, "default sends {ratio:.2}x the best baseline");
    let per_gib = def["reference_bytes_per_gib"].as_f64().expect("ref");
    assert!(
        per_gib <= 64.0 * 1024.0 * 1024.0,
        "default holds {:.1} MiB per GiB",
        per_gib / 1048576.0
    );
    // The XBZRLE baseline runs with the same budget.
    let x = codec(&r, "xbzrle");
    assert!(x["reference_bytes"].as_u64() <= def["reference_bytes"].as_u64().map(|b| b + 4096));
}

#[test]
fn analyze_rejects_bad_input_with_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");

    let missing = run(simrep().args(["analyze", "/nonexistent/x.trace"]));
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/x.trace"));

    let garbage = dir.path().join("garbage.trace");
    std::fs::write(&garbage, b"this is not a memory trace at all").expect("write");
    let out = run(simrep().arg("analyze").arg(&garbage));
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error"));

    // A trace cut inside its initial image holds no complete epoch.
    let cut = dir.path().join("cut.trace");
    let bytes = std::fs::read(sample_trace()).expect("sample");
    std::fs::write(&cut, &bytes[..4096]).expect("write");
    let out = run(simrep().arg("analyze").arg(&cut));
    assert_eq!(out.status.code(), Some(3));

    let out = run(simrep()
        .arg("analyze")
        .arg(sample_trace())
        .args(["--codec", "similarity:area=100"]));
    assert_eq!(
        out.status.code(),
        Some(2),
        "bad codec spec is a usage error"
    );
}

/// A real program that keeps rewriting part of a 16 MiB buffer.
fn start_writer() -> Child {
    let script = "
import time
buf = bytearray(16 << 20)
for i in range(0, len(buf), 4096):
    buf[i] = 1
n = 0
while True:
    for i in range(0, 2 << 20, 4096):
        buf[i + (n % 4000)] = n & 0xff
    n += 1
    time.sleep(0.005)
";
    Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 must be installed (cargo xtask setup installs it)")
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat.rsplit(") ").next().expect("comm");
    after.chars().next().expect("state")
}

#[test]
fn capture_then_analyze_a_real_process() {
    require_root("tracing another process");
    let child = Kill(start_writer());
    let pid = child.0.id();
    std::thread::sleep(Duration::from_millis(500));
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = dir.path().join("py.trace");
    let out = run(simrep()
        .args(["trace", "capture", "--pid", &pid.to_string()])
        .args(["--epochs", "5", "--epoch-ms", "50"])
        .arg("-o")
        .arg(&trace));
    assert!(out.status.success(), "capture failed");
    assert_ne!(process_state(pid), 'T', "the target was left stopped");

    let json = dir.path().join("r.json");
    let out = run(simrep()
        .arg("analyze")
        .arg(&trace)
        .args(["--no-fig1", "--json"])
        .arg(&json));
    assert!(out.status.success(), "analyze of a fresh capture failed");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("JSON");
    assert_eq!(r["delta_epochs"], 5);
    // The writer touches 512 pages of its buffer every few ms.
    let dirty = r["dirty_pages"].as_u64().expect("dirty");
    assert!(dirty >= 5 * 400, "only {dirty} dirty pages in 5 epochs");
    let def = r["codecs"]
        .as_array()
        .expect("codecs")
        .iter()
        .find(|c| c["default"] == true)
        .expect("default codec");
    // Each page changes in a single byte: the codec must find that out.
    assert!(
        percent(def) < 10.0,
        "default codec sent {}% of raw",
        percent(def)
    );
}

#[test]
fn capture_of_a_missing_process_fails_with_its_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(simrep()
        .args([
            "trace",
            "capture",
            "--pid",
            "2147483000",
            "--epochs",
            "1",
            "-o",
        ])
        .arg(dir.path().join("x.trace")));
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("2147483000"));
}
