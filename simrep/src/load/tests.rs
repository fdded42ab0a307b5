//! Option checks and a whole run against the in-process test server.

use super::testserver::{Faults, Service, SharedState, TestServer};
use super::*;

fn opts(targets: Vec<String>) -> LoadOptions {
    LoadOptions {
        duration: Duration::from_millis(300),
        connections: 3,
        keys: 60,
        verify: true,
        threads: 1,
        seed: 42,
        ..LoadOptions::new(targets, LoadWorkload::Kv)
    }
}

#[test]
fn validation_names_the_option() {
    let bad = |o: LoadOptions| match validate(&o) {
        Err(LoadError::Config(m)) => m,
        r => panic!("{r:?}"),
    };
    assert!(bad(opts(vec![])).contains("--target"));
    assert!(bad(opts(vec!["nohost".into()])).contains("HOST:PORT"));
    assert!(bad(LoadOptions {
        keys: 2,
        ..opts(vec!["127.0.0.1:1".into()])
    })
    .contains("--keys"));
    assert!(bad(LoadOptions {
        connections: 0,
        ..opts(vec!["127.0.0.1:1".into()])
    })
    .contains("--connections"));
    assert!(validate(&opts(vec!["localhost:7000".into(), "[::1]:7000".into()])).is_ok());
}

#[test]
fn clean_run_in_process() {
    let srv = TestServer::bind(
        "127.0.0.1:0",
        Service::Kv,
        SharedState::new(0),
        Faults::default(),
    )
    .unwrap();
    let r = run(
        &opts(vec![srv.addr().to_string()]),
        Arc::new(AtomicBool::new(false)),
        &mut |_| {},
    )
    .unwrap();
    assert!(r.responses > 0 && r.throughput_rps > 0.0, "{r:?}");
    let v = r.verify.as_ref().unwrap();
    assert_eq!(v.problem_count(), 0, "{v:?}");
    // The final sweep read all 60 keys.
    assert!(v.checked >= r.responses + 60, "{v:?}");
    assert!(r.good_share <= r.tolerable_share && r.tolerable_share <= 1.0);
    assert!(render_summary(&r).contains("verify      OK"));
}

#[test]
fn unreachable_target_is_no_target() {
    // Bind then drop: a port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = run(
        &opts(vec![format!("127.0.0.1:{port}")]),
        Arc::new(AtomicBool::new(false)),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(e, LoadError::NoTarget(_)), "{e:?}");
}

/// A 400 ms stall at 200 req/s delays ~80 requests: the open loop counts
/// every one of them as slow (latency from the intended send time), the
/// closed loop only the one in flight (coordinated omission).
#[test]
fn open_loop_charges_a_stall_to_every_request_it_delays() {
    let slow = |rate: u64| {
        let faults = Faults {
            stall: Some((100, Duration::from_millis(400))),
            ..Faults::default()
        };
        let srv =
            TestServer::bind("127.0.0.1:0", Service::Kv, SharedState::new(0), faults).unwrap();
        let o = LoadOptions {
            rate,
            connections: 1,
            duration: Duration::from_millis(1500),
            verify: false,
            good: Duration::from_millis(100),
            tolerable: Duration::from_millis(100),
            ..opts(vec![srv.addr().to_string()])
        };
        let r = run(&o, Arc::new(AtomicBool::new(false)), &mut |_| {}).unwrap();
        assert!(r.latency.max_ms >= 390.0, "{r:?}");
        r.requests - (r.good_share * r.requests as f64).round() as u64
    };
    let open = slow(200);
    assert!(open >= 50, "open loop: only {open} slow requests");
    let closed = slow(0);
    assert!(closed <= 3, "closed loop: {closed} slow requests");
}
