//! End-to-end tests of `simrep status`: the real binary against an
//! [`ObserveServer`] in this process, a port where nothing listens, and a
//! server that answers garbage.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use simrep::replication::observe::{Metrics, ObserveServer, Status, StatusBoard};

fn status_cmd(args: &[&str]) -> (Option<i32>, String, String) {
    let out = tests::run(tests::simrep().arg("status").args(args));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sample() -> Status {
    let mut extra = serde_json::Map::new();
    extra.insert("held_responses".into(), 17.into());
    extra.insert("codec".into(), "similarity".into());
    Status {
        role: "primary".into(),
        state: "protected".into(),
        epoch: 4242,
        acked_epoch: Some(4241),
        lag_epochs: 1,
        link: "10.1.2.3:9701".into(),
        peer: Some("10.1.2.3:9701".into()),
        protected: true,
        since_unix_ms: simrep::replication::observe::unix_ms_now() - 5_000,
        detail: "backup acked epoch 4241".into(),
        extra,
    }
}

#[test]
fn status_prints_a_running_servers_status() {
    let board = StatusBoard::new(sample());
    let srv = ObserveServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(Metrics::new()),
        board.clone(),
    )
    .expect("start the observe server");
    let addr = srv.local_addr().to_string();

    let (code, out, _) = status_cmd(&["--addr", &addr]);
    assert_eq!(code, Some(0), "{out}");
    for want in [
        "role:      primary",
        "state:     protected",
        "protected: yes",
        "epoch:     4242",
        "acked:     4241",
        "lag:       1 epochs",
        "link:      10.1.2.3:9701",
        "detail:    backup acked epoch 4241",
        "held_responses = 17",
        "codec = similarity",
        " UTC (",
        " s ago)",
    ] {
        assert!(out.contains(want), "`{want}` missing in:\n{out}");
    }

    // The status changes while the server runs; --json gives it verbatim.
    board.update(|s| {
        s.state = "unprotected".into();
        s.protected = false;
        s.link = "down".into();
    });
    let (code, out, _) = status_cmd(&["--addr", &addr, "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let got: Status = serde_json::from_str(&out).expect("--json prints a Status");
    assert_eq!(got, board.get());
    assert_eq!(got.state, "unprotected");
}

#[test]
fn status_exits_9_when_nothing_answers() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed: nothing listens there now
    let addr = format!("127.0.0.1:{port}");
    let (code, out, err) = status_cmd(&["--addr", &addr]);
    assert_eq!(code, Some(9), "stdout: {out}\nstderr: {err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains(&format!("nothing answers at {addr}")),
        "stderr: {err}"
    );
}

#[test]
fn status_exits_10_for_an_invalid_answer() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        for body in ["{\"role\": 3}", "garbage"] {
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let resp = if body == "garbage" {
                "SSH-2.0-OpenSSH_9.6\r\n".to_owned()
            } else {
                format!("HTTP/1.0 200 OK\r\n\r\n{body}")
            };
            s.write_all(resp.as_bytes()).unwrap();
        }
    });
    let (code, _, err) = status_cmd(&["--addr", &addr.to_string()]);
    assert_eq!(code, Some(10), "{err}");
    assert!(err.contains("invalid status"), "{err}");
    let (code, _, err) = status_cmd(&["--addr", &addr.to_string()]);
    assert_eq!(code, Some(10), "{err}");
    assert!(err.contains("not as a simrep metrics endpoint"), "{err}");
    server.join().unwrap();
}
