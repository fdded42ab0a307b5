//! The verify model against the reference service, in process: clean runs
//! (with lost responses at any point) report nothing; lost, corrupted and
//! foreign data are reported, naming the key or account.

use proptest::prelude::*;

use super::*;
use crate::load::parse::Rng;
use crate::load::testserver::{Faults, Service, SharedState};
use crate::proto::Request;

/// What happens to one request.
#[derive(Clone, Copy, Debug)]
enum Fate {
    /// Answered.
    Answered,
    /// The connection died before the service saw it.
    LostBefore,
    /// The service applied it, the response was lost.
    LostAfter,
}

fn call(state: &SharedState, service: Service, faults: &Faults, e: &Encoded) -> (u8, Vec<u8>) {
    let req = Request {
        id: 1,
        op: e.op,
        key: &e.key,
        value: &e.value,
    };
    state
        .handle(service, faults, &req)
        .expect("no garbage configured")
}

fn sweep(
    w: &mut Work,
    state: &SharedState,
    service: Service,
    faults: &Faults,
    problems: &mut Vec<Problem>,
) {
    let mut e = Encoded::default();
    for o in w.sweep() {
        w.encode(&o, &mut e);
        let (st, body) = call(state, service, faults, &e);
        w.check(&o, st, &body, true, problems);
    }
    w.swept();
}

/// Drives `works` (connections) round robin for `fates.len()` steps, as the
/// client does: a sweep after every lost response, a final sweep.
fn drive(
    works: &mut [Work],
    state: &SharedState,
    service: Service,
    faults: &Faults,
    seed: u64,
    fates: &[Fate],
) -> Vec<Problem> {
    let mut rng = Rng::new(seed);
    let mut problems = Vec::new();
    let mut e = Encoded::default();
    for w in works.iter_mut() {
        if w.needs_baseline() {
            sweep(w, state, service, faults, &mut problems);
        }
    }
    for (i, fate) in fates.iter().enumerate() {
        let w = &mut works[i % works.len()];
        let o = w.next_op(&mut rng);
        w.encode(&o, &mut e);
        match fate {
            Fate::Answered => {
                let (st, body) = call(state, service, faults, &e);
                w.check(&o, st, &body, true, &mut problems);
            }
            Fate::LostBefore | Fate::LostAfter => {
                if matches!(fate, Fate::LostAfter) {
                    call(state, service, faults, &e);
                }
                w.lost(&o);
                sweep(w, state, service, faults, &mut problems);
            }
        }
    }
    for w in works.iter_mut() {
        sweep(w, state, service, faults, &mut problems);
    }
    problems
}

fn kv_works(conns: u32, keys: u64, mix: &str, sizes: &str) -> Vec<Work> {
    let mix = Mix::parse(mix, &KV_OPS).unwrap();
    (0..conns)
        .map(|c| {
            Work::Kv(KvModel::new(
                0xfeed,
                c,
                conns,
                keys,
                mix.clone(),
                sizes.parse().unwrap(),
                8,
            ))
        })
        .collect()
}

fn bank_works(conns: u32, accounts: u32) -> Vec<Work> {
    let mix = Mix::parse("transfer=60,balance=30,history=10", &BANK_OPS).unwrap();
    (0..conns)
        .map(|c| Work::Bank(BankModel::new(c, conns, accounts, mix.clone(), 60_000)))
        .collect()
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        20 => Just(Fate::Answered),
        1 => Just(Fate::LostBefore),
        1 => Just(Fate::LostAfter),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn kv_clean_runs_report_nothing(seed: u64, conns in 1u32..4, keys in 4u64..40, fates in proptest::collection::vec(fate(), 1..300)) {
        let state = SharedState::new(0);
        let mut works = kv_works(conns, keys.max(u64::from(conns)), "get=30,put=40,del=15,scan=15", "0-40");
        let p = drive(&mut works, &state, Service::Kv, &Faults::default(), seed, &fates);
        prop_assert!(p.is_empty(), "{p:#?}");
    }

    #[test]
    fn bank_clean_runs_report_nothing(seed: u64, conns in 1u32..4, fates in proptest::collection::vec(fate(), 1..300)) {
        let state = SharedState::new(12);
        let mut works = bank_works(conns, 12);
        let p = drive(&mut works, &state, Service::Bank, &Faults::default(), seed, &fates);
        prop_assert!(p.is_empty(), "{p:#?}");
    }

    #[test]
    fn kv_lost_writes_are_reported(seed: u64, after in 0u64..50) {
        let state = SharedState::new(0);
        let faults = Faults { lose_writes_after: Some(after), ..Faults::default() };
        let mut works = kv_works(2, 20, "get=40,put=60", "16-64");
        let p = drive(&mut works, &state, Service::Kv, &faults, seed, &[Fate::Answered; 400]);
        prop_assert!(!p.is_empty());
        prop_assert!(p.iter().all(|p| p.kind == ProblemKind::LostWrite), "{p:#?}");
    }
}

#[test]
fn kv_corruption_is_a_wrong_value_naming_the_key() {
    let state = SharedState::new(0);
    let faults = Faults {
        corrupt_reads_after: Some(5),
        ..Faults::default()
    };
    let mut works = kv_works(1, 10, "get=50,put=50", "32");
    let p = drive(
        &mut works,
        &state,
        Service::Kv,
        &faults,
        7,
        &[Fate::Answered; 100],
    );
    assert!(!p.is_empty());
    assert!(
        p.iter().all(|p| p.kind == ProblemKind::WrongValue),
        "{p:#?}"
    );
    assert!(p[0].detail.contains("key 0000feed:0000:"), "{}", p[0]);
    // One report per key until the next acknowledged write.
    let mut keys: Vec<&str> = p
        .iter()
        .map(|p| p.detail.split(':').take(3).last().unwrap_or(""))
        .collect();
    let n = keys.len();
    keys.dedup();
    assert!(keys.len() * 2 >= n, "{p:#?}");
}

#[test]
fn kv_foreign_key_in_namespace_is_unexpected() {
    let state = SharedState::new(0);
    let mut works = kv_works(1, 4, "get=1", "8");
    let Work::Kv(m) = &works[0] else {
        unreachable!()
    };
    let key = m.key(2);
    let put = Request {
        id: 1,
        op: op::PUT,
        key: key.as_bytes(),
        value: b"intruder",
    };
    state.handle(Service::Kv, &Faults::default(), &put).unwrap();
    let p = drive(&mut works, &state, Service::Kv, &Faults::default(), 1, &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_eq!(p[0].kind, ProblemKind::UnexpectedKey);
    assert!(p[0].detail.contains(&key), "{}", p[0]);
}

#[test]
fn kv_stale_value_is_a_lost_write() {
    let mut m = KvModel::new(
        1,
        0,
        1,
        1,
        Mix::parse("put=1", &KV_OPS).unwrap(),
        SizeRange { min: 32, max: 32 },
        4,
    );
    let mut problems = Vec::new();
    m.check(&Op::Put(0, 1, 32), status::OK, &[], true, &mut problems);
    m.check(&Op::Put(0, 2, 32), status::OK, &[], true, &mut problems);
    let mut old = Vec::new();
    fill_value(&mut old, 1, 0, 1, 32);
    m.check(&Op::Get(0), status::OK, &old, true, &mut problems);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].kind, ProblemKind::LostWrite);
    assert!(
        problems[0].detail.contains("older version 1"),
        "{}",
        problems[0]
    );
    // A pending write accepts either outcome, once.
    m.lost(&Op::Put(0, 3, 32));
    let mut cur = Vec::new();
    fill_value(&mut cur, 1, 0, 2, 32);
    problems.clear();
    m.check(&Op::Get(0), status::OK, &cur, true, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(m.pending, None);
    m.lost(&Op::Del(0));
    m.check(&Op::Get(0), status::NOT_FOUND, &[], true, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    m.check(&Op::Get(0), status::OK, &cur, true, &mut problems);
    assert_eq!(problems[0].kind, ProblemKind::LostWrite, "{problems:?}");
}

#[test]
fn bank_lost_transfers_are_reported_per_account() {
    let state = SharedState::new(8);
    let faults = Faults {
        lose_writes_after: Some(3),
        ..Faults::default()
    };
    let mut works = bank_works(2, 8);
    let p = drive(
        &mut works,
        &state,
        Service::Bank,
        &faults,
        3,
        &[Fate::Answered; 200],
    );
    assert!(
        p.iter()
            .any(|p| p.kind == ProblemKind::LostWrite && p.detail.starts_with("account ")),
        "{p:#?}"
    );
}

#[test]
fn partition_covers_every_key_once() {
    for conns in 1..6u32 {
        let keys = 23u64;
        let mut all: Vec<String> = (0..conns)
            .flat_map(|c| {
                let m = KvModel::new(
                    9,
                    c,
                    conns,
                    keys,
                    Mix::parse("get=1", &KV_OPS).unwrap(),
                    SizeRange { min: 1, max: 1 },
                    1,
                );
                (0..m.keys()).map(move |j| m.key(j)).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(all.len() as u64, keys);
        all.sort();
        all.dedup();
        assert_eq!(all.len() as u64, keys);
        let b: u32 = (0..conns)
            .map(|c| {
                BankModel::new(c, conns, 23, Mix::parse("balance=1", &BANK_OPS).unwrap(), 1)
                    .accounts()
            })
            .sum();
        assert_eq!(b, 23);
    }
}
