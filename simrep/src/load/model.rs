//! The workloads one connection drives and the `--verify` model that checks
//! every response exactly.
//!
//! Exactness despite concurrency comes from partitioning: key `i` (and bank
//! account `i`) belongs to connection `i % C`, and only that connection
//! touches it, one request at a time. So the model of a connection knows
//! the state of each of its keys after every acknowledged write. A write
//! whose response never arrived (the connection died) leaves one *pending*
//! operation: either outcome is accepted until a read settles it; the
//! connection re-reads all its keys (a *sweep*) right after it reconnects,
//! so at most one operation is pending at any time.
//!
//! kv keys live in a namespace of their own per run (`{tag}:{conn}:{index}`
//! with a random tag), so the model knows that every key starts absent and
//! can report keys that appear without having been written. Values encode
//! their key index and a version (the first 16 bytes, when the value is that
//! long) followed by bytes derived from both, so a stale value is told
//! apart from a corrupted one.
//!
//! bank accounts are shared by every run, so the model learns each
//! account's balance and history count from a first sweep and predicts
//! every later response from there.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fmt;

use serde::Serialize;

use super::parse::{Mix, Rng, SizeRange};
use crate::proto::{op, status, MAX_BODY, MAX_KEY, MAX_SCAN_ENTRIES, MAX_VALUE};

/// Operation names of the kv workload, in [`Mix`] order.
pub const KV_OPS: [&str; 4] = ["get", "put", "del", "scan"];
/// Operation names of the bank workload, in [`Mix`] order.
pub const BANK_OPS: [&str; 3] = ["transfer", "balance", "history"];
/// History records the bank model remembers per account (and the most a
/// `HISTORY` request asks for).
pub const BANK_RECENT: usize = 8;

/// What a `--verify` check found wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// An acknowledged write is not visible: a value older than the last
    /// acknowledged `PUT`, a key absent after an acknowledged `PUT`, a key
    /// present after an acknowledged `DEL`, a bank balance without its
    /// acknowledged transfers.
    LostWrite,
    /// A value (or balance, history record) that is no version the client
    /// ever wrote.
    WrongValue,
    /// A key of this run's namespace that was never written.
    UnexpectedKey,
    /// A status that the model rules out (e.g. `NOT_FOUND` for a present
    /// key is a lost write; `BAD_REQUEST` for a well-formed request is this).
    BadStatus,
    /// The bank's total balance over the client's accounts changed.
    Conservation,
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProblemKind::LostWrite => "lost acknowledged write",
            ProblemKind::WrongValue => "wrong value",
            ProblemKind::UnexpectedKey => "unexpected key",
            ProblemKind::BadStatus => "bad status",
            ProblemKind::Conservation => "balance not conserved",
        })
    }
}

/// One finding of `--verify`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Its kind.
    pub kind: ProblemKind,
    /// The key or account and what was expected and seen.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// One request of a connection, by local key/account index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// kv `GET` of local key `j`.
    Get(u32),
    /// kv `PUT` of local key `j` with version `ver` of `len` bytes.
    Put(u32, u64, u32),
    /// kv `DEL` of local key `j`.
    Del(u32),
    /// kv `SCAN` from local key `j`, at most `max` entries.
    Scan(u32, u32),
    /// bank `TRANSFER` between local accounts.
    Transfer {
        /// Local index of the source.
        from: u32,
        /// Local index of the destination.
        to: u32,
        /// Cents.
        amount: u64,
    },
    /// bank `BALANCE` of local account `j`.
    Balance(u32),
    /// bank `HISTORY` of local account `j`, at most `max` records.
    History(u32, u32),
}

impl Op {
    /// Whether a lost response leaves the outcome unknown.
    pub fn is_write(&self) -> bool {
        matches!(self, Op::Put(..) | Op::Del(..) | Op::Transfer { .. })
    }
}

/// A request on the wire: op code, key and value.
#[derive(Default, Debug)]
pub struct Encoded {
    /// The [`op`] code.
    pub op: u8,
    /// Key bytes.
    pub key: Vec<u8>,
    /// Value bytes.
    pub value: Vec<u8>,
}

/// Mixes three numbers into a seed.
fn mix3(a: u64, b: u64, c: u64) -> u64 {
    let mut r = Rng::new(a ^ b.rotate_left(21) ^ c.rotate_left(42));
    r.next_u64() ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c
}

/// Writes the value of version `ver` of key `index` (`len` bytes) in the
/// namespace `tag` into `out`.
pub fn fill_value(out: &mut Vec<u8>, tag: u64, index: u64, ver: u64, len: usize) {
    out.clear();
    out.reserve(len);
    if len >= 16 {
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&ver.to_le_bytes());
    }
    let mut r = Rng::new(mix3(tag, index, ver));
    while out.len() < len {
        let w = r.next_u64().to_le_bytes();
        let n = (len - out.len()).min(8);
        out.extend_from_slice(&w[..n]);
    }
}

/// A kv key's state in the model: absent, or `(version, length)`.
type Ver = Option<(u64, u32)>;

/// The kv workload and model of one connection.
#[derive(Debug)]
pub struct KvModel {
    tag: u64,
    conn: u32,
    conns: u32,
    /// Local keys: global index `conn + conns * j`.
    n: u32,
    mix: Mix,
    sizes: SizeRange,
    scan_len: u32,
    state: Vec<Ver>,
    written: Vec<bool>,
    /// A problem was reported on the key since its last acknowledged
    /// write: one loss is reported once, not at every read.
    reported: Vec<bool>,
    pending: Option<(u32, Ver)>,
    next_ver: u64,
    scratch: Vec<u8>,
}

impl KvModel {
    /// The model of connection `conn` of `conns` over `keys` keys in all.
    pub fn new(
        tag: u64,
        conn: u32,
        conns: u32,
        keys: u64,
        mix: Mix,
        sizes: SizeRange,
        scan_len: u32,
    ) -> KvModel {
        let n = keys
            .saturating_sub(u64::from(conn))
            .div_ceil(u64::from(conns)) as u32;
        KvModel {
            tag,
            conn,
            conns,
            n,
            mix,
            sizes,
            scan_len: scan_len.clamp(1, MAX_SCAN_ENTRIES),
            state: vec![None; n as usize],
            written: vec![false; n as usize],
            reported: vec![false; n as usize],
            pending: None,
            next_ver: 1,
            scratch: Vec::new(),
        }
    }

    /// Keys of this connection.
    pub fn keys(&self) -> u32 {
        self.n
    }

    fn index(&self, j: u32) -> u64 {
        u64::from(self.conn) + u64::from(self.conns) * u64::from(j)
    }

    /// The key prefix of this connection.
    fn prefix(&self) -> String {
        format!("{:08x}:{:04}:", self.tag as u32, self.conn)
    }

    /// The key bytes of local key `j`.
    pub fn key(&self, j: u32) -> String {
        format!("{}{:010}", self.prefix(), self.index(j))
    }

    /// Local index of a key of this connection's namespace.
    fn local(&self, key: &[u8]) -> Option<u32> {
        let rest = key.strip_prefix(self.prefix().as_bytes())?;
        let i: u64 = std::str::from_utf8(rest).ok()?.parse().ok()?;
        let c = u64::from(self.conn);
        let cs = u64::from(self.conns);
        if rest.len() != 10 || i < c || !(i - c).is_multiple_of(cs) {
            return None;
        }
        u32::try_from((i - c) / cs).ok().filter(|j| *j < self.n)
    }

    /// The next operation of the workload.
    pub fn next_op(&mut self, rng: &mut Rng) -> Op {
        let j = rng.range(0, u64::from(self.n.max(1)) - 1) as u32;
        match KV_OPS[self.mix.pick(rng.next_u64())] {
            "get" => Op::Get(j),
            "put" => {
                let len = rng.range(u64::from(self.sizes.min), u64::from(self.sizes.max)) as u32;
                let ver = self.next_ver;
                self.next_ver += 1;
                Op::Put(j, ver, len)
            }
            "del" => Op::Del(j),
            _ => Op::Scan(j, rng.range(1, u64::from(self.scan_len)) as u32),
        }
    }

    /// The operations of a sweep: a `GET` of every key.
    pub fn sweep(&self) -> Vec<Op> {
        (0..self.n).map(Op::Get).collect()
    }

    /// Encodes `o`.
    pub fn encode(&self, o: &Op, e: &mut Encoded) {
        e.key.clear();
        e.value.clear();
        match *o {
            Op::Get(j) => {
                e.op = op::GET;
                e.key.extend_from_slice(self.key(j).as_bytes());
            }
            Op::Put(j, ver, len) => {
                e.op = op::PUT;
                e.key.extend_from_slice(self.key(j).as_bytes());
                fill_value(&mut e.value, self.tag, self.index(j), ver, len as usize);
            }
            Op::Del(j) => {
                e.op = op::DEL;
                e.key.extend_from_slice(self.key(j).as_bytes());
            }
            Op::Scan(j, max) => {
                e.op = op::SCAN;
                e.key.extend_from_slice(self.key(j).as_bytes());
                e.value.extend_from_slice(&max.to_le_bytes());
            }
            _ => e.op = op::PING,
        }
    }

    /// The response to `o` never arrived.
    pub fn lost(&mut self, o: &Op) {
        match *o {
            Op::Put(j, ver, len) => self.pending = Some((j, Some((ver, len)))),
            Op::Del(j) => self.pending = Some((j, None)),
            _ => {}
        }
    }

    /// Whether `v` is the value of `ver`.
    fn is_value(&mut self, j: u32, ver: Ver, v: Option<&[u8]>) -> bool {
        match (ver, v) {
            (None, None) => true,
            (Some((ver, len)), Some(bytes)) => {
                if bytes.len() != len as usize {
                    return false;
                }
                let idx = self.index(j);
                let mut s = std::mem::take(&mut self.scratch);
                fill_value(&mut s, self.tag, idx, ver, len as usize);
                let same = s == bytes;
                self.scratch = s;
                same
            }
            _ => false,
        }
    }

    /// Checks an observed value of key `j` against the model (settling a
    /// pending write on it); returns what is wrong.
    fn observe(&mut self, j: u32, v: Option<&[u8]>) -> Option<Problem> {
        let want = self.state[j as usize];
        if let Some((pj, new)) = self.pending {
            if pj == j {
                if self.is_value(j, new, v) {
                    self.acked(j, new);
                    self.pending = None;
                    return None;
                }
                if self.is_value(j, want, v) {
                    self.pending = None;
                    return None;
                }
            }
        }
        if self.is_value(j, want, v) {
            return None;
        }
        self.report(j, want, v)
    }

    /// The problem of reading `v` from key `j` instead of `want`, unless
    /// one was reported since the last acknowledged write.
    fn report(&mut self, j: u32, want: Ver, v: Option<&[u8]>) -> Option<Problem> {
        if std::mem::replace(&mut self.reported[j as usize], true) {
            return None;
        }
        Some(self.classify(j, want, v))
    }

    /// An acknowledged write to `j`: its state is `v`.
    fn acked(&mut self, j: u32, v: Ver) {
        self.state[j as usize] = v;
        self.written[j as usize] = true;
        self.reported[j as usize] = false;
    }

    fn classify(&self, j: u32, want: Ver, v: Option<&[u8]>) -> Problem {
        let key = self.key(j);
        let want_s = match want {
            Some((ver, len)) => format!("version {ver} ({len} bytes)"),
            None => "absent".to_string(),
        };
        let Some(bytes) = v else {
            return Problem {
                kind: ProblemKind::LostWrite,
                detail: format!(
                    "key {key}: acknowledged PUT of {want_s} is missing, the key is absent"
                ),
            };
        };
        // One of our own older versions?
        if bytes.len() >= 16 {
            let idx = u64::from_le_bytes(bytes[0..8].try_into().unwrap_or([0; 8]));
            let ver = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or([0; 8]));
            let mut s = Vec::new();
            fill_value(&mut s, self.tag, idx, ver, bytes.len());
            if idx == self.index(j) && s == bytes {
                let older = want.is_none_or(|(w, _)| ver < w);
                return Problem {
                    kind: if older {
                        ProblemKind::LostWrite
                    } else {
                        ProblemKind::WrongValue
                    },
                    detail: match want {
                        None => format!(
                            "key {key}: acknowledged DEL is missing, the key still holds version {ver}"
                        ),
                        Some(_) => format!(
                            "key {key}: expected {want_s}, read older version {ver} ({} bytes): an acknowledged PUT is missing",
                            bytes.len()
                        ),
                    },
                };
            }
        }
        if want.is_none() && !self.written[j as usize] {
            return Problem {
                kind: ProblemKind::UnexpectedKey,
                detail: format!(
                    "key {key}: never written by this run, but it holds {} bytes",
                    bytes.len()
                ),
            };
        }
        Problem {
            kind: ProblemKind::WrongValue,
            detail: format!(
                "key {key}: expected {want_s}, read {} bytes that no PUT wrote",
                bytes.len()
            ),
        }
    }

    fn bad_status(&self, o: &Op, st: u8) -> Problem {
        Problem {
            kind: ProblemKind::BadStatus,
            detail: format!(
                "{o:?} on key {}: unexpected status {st}",
                self.key(op_key(o))
            ),
        }
    }

    /// Checks the response to `o` (when `verify`) and updates the model;
    /// appends what is wrong to `problems`.
    pub fn check(
        &mut self,
        o: &Op,
        st: u8,
        body: &[u8],
        verify: bool,
        problems: &mut Vec<Problem>,
    ) {
        if !verify {
            return;
        }
        match *o {
            Op::Get(j) => {
                let v = match st {
                    status::OK => Some(body),
                    status::NOT_FOUND => None,
                    _ => return problems.push(self.bad_status(o, st)),
                };
                problems.extend(self.observe(j, v));
            }
            Op::Put(j, ver, len) => match st {
                status::OK => {
                    self.settle(j);
                    self.acked(j, Some((ver, len)));
                }
                status::NO_SPACE => {}
                _ => problems.push(self.bad_status(o, st)),
            },
            Op::Del(j) => {
                let pending = self.settle(j);
                let want = self.state[j as usize];
                let quiet = self.reported[j as usize];
                match st {
                    status::OK | status::NOT_FOUND if quiet => {}
                    status::OK if want.is_none() && pending.is_none() => {
                        problems.push(if self.written[j as usize] {
                            Problem {
                                kind: ProblemKind::LostWrite,
                                detail: format!(
                                    "key {}: DEL found the key, but an acknowledged DEL had removed it",
                                    self.key(j)
                                ),
                            }
                        } else {
                            Problem {
                                kind: ProblemKind::UnexpectedKey,
                                detail: format!(
                                    "key {}: DEL found the key, which this run never wrote",
                                    self.key(j)
                                ),
                            }
                        });
                    }
                    status::NOT_FOUND if want.is_some() && pending.is_none() => {
                        let (ver, len) = want.unwrap_or_default();
                        problems.push(Problem {
                            kind: ProblemKind::LostWrite,
                            detail: format!(
                                "key {}: DEL says not found, but a PUT of version {ver} ({len} bytes) was acknowledged",
                                self.key(j),
                            ),
                        });
                    }
                    status::OK | status::NOT_FOUND => {}
                    _ => return problems.push(self.bad_status(o, st)),
                }
                self.acked(j, None);
            }
            Op::Scan(j, max) => {
                if st != status::OK {
                    return problems.push(self.bad_status(o, st));
                }
                self.check_scan(j, max, body, problems);
            }
            _ => {}
        }
    }

    /// Drops a pending write on `j` (an acknowledged write supersedes it);
    /// returns it.
    fn settle(&mut self, j: u32) -> Option<Ver> {
        match self.pending {
            Some((pj, new)) if pj == j => {
                self.pending = None;
                Some(new)
            }
            _ => None,
        }
    }

    fn check_scan(&mut self, j: u32, max: u32, body: &[u8], problems: &mut Vec<Problem>) {
        let first = self.key(j).into_bytes();
        let prefix = self.prefix().into_bytes();
        let mut entries: Vec<(&[u8], &[u8])> = Vec::new();
        let mut at = 0usize;
        while at < body.len() {
            let bad = |what: &str| Problem {
                kind: ProblemKind::WrongValue,
                detail: format!("SCAN from key {}: malformed body ({what})", self.key(j)),
            };
            if body.len() - at < 6 {
                return problems.push(bad("truncated entry header"));
            }
            let k = usize::from(u16::from_le_bytes([body[at], body[at + 1]]));
            let v = u32::from_le_bytes([body[at + 2], body[at + 3], body[at + 4], body[at + 5]])
                as usize;
            if k > MAX_KEY || v > MAX_VALUE || body.len() - at - 6 < k + v {
                return problems.push(bad("entry longer than the body"));
            }
            let key = &body[at + 6..at + 6 + k];
            let val = &body[at + 6 + k..at + 6 + k + v];
            if key < first.as_slice() || entries.last().is_some_and(|(p, _)| *p >= key) {
                return problems.push(bad("keys out of order"));
            }
            entries.push((key, val));
            at += 6 + k + v;
        }
        if entries.len() > max as usize {
            return problems.push(Problem {
                kind: ProblemKind::WrongValue,
                detail: format!(
                    "SCAN from key {}: {} entries, asked for at most {max}",
                    self.key(j),
                    entries.len()
                ),
            });
        }
        // The range of own keys the answer covers: up to its last key, or
        // to the end of the namespace when it is not cut short.
        let beyond = entries.iter().any(|(k, _)| !k.starts_with(&prefix));
        let complete =
            entries.len() < max as usize && body.len() + 6 + MAX_KEY + MAX_VALUE <= MAX_BODY;
        let last_own = entries
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, _)| self.local(k))
            .next_back();
        let end = if beyond || complete {
            self.n
        } else {
            last_own.map_or(j, |l| l + 1)
        };
        let mut seen = std::collections::HashMap::new();
        for (k, v) in &entries {
            if !k.starts_with(&prefix) {
                continue;
            }
            match self.local(k) {
                Some(l) => {
                    seen.insert(l, *v);
                }
                None => problems.push(Problem {
                    kind: ProblemKind::UnexpectedKey,
                    detail: format!(
                        "key {}: in this run's namespace but no key of it",
                        String::from_utf8_lossy(k)
                    ),
                }),
            }
        }
        for l in j..end {
            let v = seen.get(&l).copied();
            if matches!(self.pending, Some((pj, _)) if pj == l) {
                continue;
            }
            let want = self.state[l as usize];
            if !self.is_value(l, want, v) {
                if let Some(mut p) = self.report(l, want, v) {
                    p.detail = format!("SCAN: {}", p.detail);
                    problems.push(p);
                }
            }
        }
    }
}

fn op_key(o: &Op) -> u32 {
    match *o {
        Op::Get(j) | Op::Put(j, ..) | Op::Del(j) | Op::Scan(j, _) => j,
        Op::Balance(j) | Op::History(j, _) => j,
        Op::Transfer { from, .. } => from,
    }
}

/// One bank account in the model.
#[derive(Clone, Debug, Default)]
struct Account {
    /// `None` until the first sweep read it.
    balance: Option<u64>,
    records: u64,
    /// Newest first: (other account, outgoing, amount).
    recent: VecDeque<(u32, bool, u64)>,
}

/// The bank workload and model of one connection.
#[derive(Debug)]
pub struct BankModel {
    conn: u32,
    conns: u32,
    n: u32,
    mix: Mix,
    max_amount: u64,
    accounts: Vec<Account>,
    pending: Option<(u32, u32, u64)>,
    /// Sum of the balances read by the first sweep.
    initial_total: Option<u64>,
}

impl BankModel {
    /// The model of connection `conn` of `conns` over accounts
    /// `0..accounts`.
    pub fn new(conn: u32, conns: u32, accounts: u32, mix: Mix, max_amount: u64) -> BankModel {
        let n = accounts.saturating_sub(conn).div_ceil(conns);
        BankModel {
            conn,
            conns,
            n,
            mix,
            max_amount: max_amount.max(1),
            accounts: vec![Account::default(); n as usize],
            pending: None,
            initial_total: None,
        }
    }

    /// Accounts of this connection.
    pub fn accounts(&self) -> u32 {
        self.n
    }

    /// The account number of local account `j`.
    pub fn account(&self, j: u32) -> u32 {
        self.conn + self.conns * j
    }

    /// The next operation of the workload.
    pub fn next_op(&mut self, rng: &mut Rng) -> Op {
        let j = rng.range(0, u64::from(self.n.max(1)) - 1) as u32;
        match BANK_OPS[self.mix.pick(rng.next_u64())] {
            "transfer" if self.n >= 2 => {
                let mut to = rng.range(0, u64::from(self.n) - 2) as u32;
                if to >= j {
                    to += 1;
                }
                Op::Transfer {
                    from: j,
                    to,
                    amount: rng.range(1, self.max_amount),
                }
            }
            "history" => Op::History(j, rng.range(1, BANK_RECENT as u64) as u32),
            _ => Op::Balance(j),
        }
    }

    /// The operations of a sweep: `BALANCE` and `HISTORY` of every account.
    pub fn sweep(&self) -> Vec<Op> {
        (0..self.n)
            .flat_map(|j| [Op::Balance(j), Op::History(j, BANK_RECENT as u32)])
            .collect()
    }

    /// Encodes `o`.
    pub fn encode(&self, o: &Op, e: &mut Encoded) {
        e.key.clear();
        e.value.clear();
        match *o {
            Op::Transfer { from, to, amount } => {
                e.op = op::TRANSFER;
                e.value.extend_from_slice(&self.account(from).to_le_bytes());
                e.value.extend_from_slice(&self.account(to).to_le_bytes());
                e.value.extend_from_slice(&amount.to_le_bytes());
            }
            Op::Balance(j) => {
                e.op = op::BALANCE;
                e.value.extend_from_slice(&self.account(j).to_le_bytes());
            }
            Op::History(j, max) => {
                e.op = op::HISTORY;
                e.value.extend_from_slice(&self.account(j).to_le_bytes());
                e.value.extend_from_slice(&max.to_le_bytes());
            }
            _ => e.op = op::PING,
        }
    }

    /// The response to `o` never arrived.
    pub fn lost(&mut self, o: &Op) {
        if let Op::Transfer { from, to, amount } = *o {
            self.pending = Some((from, to, amount));
        }
    }

    fn apply(&mut self, from: u32, to: u32, amount: u64) {
        let (fa, ta) = (self.account(from), self.account(to));
        let f = &mut self.accounts[from as usize];
        f.balance = f.balance.map(|b| b.wrapping_sub(amount));
        f.records += 1;
        f.recent.push_front((ta, true, amount));
        f.recent.truncate(BANK_RECENT);
        let t = &mut self.accounts[to as usize];
        t.balance = t.balance.map(|b| b.wrapping_add(amount));
        t.records += 1;
        t.recent.push_front((fa, false, amount));
        t.recent.truncate(BANK_RECENT);
    }

    /// The balance and record count of `j` if the pending transfer were
    /// applied.
    fn if_applied(&self, j: u32) -> Option<(u64, u64)> {
        let (from, to, amount) = self.pending?;
        let a = &self.accounts[j as usize];
        let b = a.balance?;
        if j == from {
            Some((b.wrapping_sub(amount), a.records + 1))
        } else if j == to {
            Some((b.wrapping_add(amount), a.records + 1))
        } else {
            None
        }
    }

    /// The sum of the balances known to the model (after a sweep: all).
    pub fn total(&self) -> u64 {
        self.accounts.iter().filter_map(|a| a.balance).sum()
    }

    /// The sum the first sweep read.
    pub fn initial_total(&self) -> Option<u64> {
        self.initial_total
    }

    /// Called after every sweep: the first one fixes the initial total.
    pub fn swept(&mut self) {
        if self.initial_total.is_none() && self.accounts.iter().all(|a| a.balance.is_some()) {
            self.initial_total = Some(self.total());
        }
    }

    fn problem(&self, kind: ProblemKind, j: u32, what: String) -> Problem {
        Problem {
            kind,
            detail: format!("account {}: {what}", self.account(j)),
        }
    }

    /// Checks the response to `o` (when `verify`) and updates the model;
    /// appends what is wrong to `problems`.
    pub fn check(
        &mut self,
        o: &Op,
        st: u8,
        body: &[u8],
        verify: bool,
        problems: &mut Vec<Problem>,
    ) {
        if !verify {
            return;
        }
        let u64_at = |b: &[u8], at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
        };
        match *o {
            Op::Balance(j) => {
                if st != status::OK {
                    return problems.push(self.problem(
                        ProblemKind::BadStatus,
                        j,
                        format!("BALANCE status {st}"),
                    ));
                }
                let (Some(bal), Some(recs), 16) = (u64_at(body, 0), u64_at(body, 8), body.len())
                else {
                    return problems.push(self.problem(
                        ProblemKind::WrongValue,
                        j,
                        format!("BALANCE body of {} bytes", body.len()),
                    ));
                };
                let a = &self.accounts[j as usize];
                let Some(want) = a.balance else {
                    // First sight: learn it.
                    let a = &mut self.accounts[j as usize];
                    a.balance = Some(bal);
                    a.records = recs;
                    return;
                };
                let want_recs = a.records;
                if (bal, recs) == (want, want_recs) {
                    if self.if_applied(j).is_some() {
                        self.pending = None;
                    }
                    return;
                }
                if let Some(applied) = self.if_applied(j) {
                    if (bal, recs) == applied {
                        let (from, to, amount) = self.pending.take().unwrap_or((0, 0, 0));
                        self.apply(from, to, amount);
                        return;
                    }
                }
                let kind = if recs < want_recs {
                    ProblemKind::LostWrite
                } else {
                    ProblemKind::WrongValue
                };
                problems.push(self.problem(
                    kind,
                    j,
                    format!(
                        "expected balance {want} with {want_recs} history records, read {bal} with {recs}{}",
                        if kind == ProblemKind::LostWrite { ": acknowledged transfers are missing" } else { "" }
                    ),
                ));
                // Resynchronise so that one loss is reported once.
                let a = &mut self.accounts[j as usize];
                a.balance = Some(bal);
                a.records = recs;
                a.recent.clear();
            }
            Op::Transfer { from, to, amount } => {
                if self
                    .pending
                    .is_some_and(|(f, t, _)| [f, t].iter().any(|x| *x == from || *x == to))
                {
                    // Cannot happen (a sweep settles it first); keep the
                    // model consistent anyway.
                    self.pending = None;
                }
                let Some(fb) = self.accounts[from as usize].balance else {
                    return;
                };
                let tb = self.accounts[to as usize].balance.unwrap_or(0);
                match st {
                    status::OK => {
                        let (Some(f), Some(t), 16) = (u64_at(body, 0), u64_at(body, 8), body.len())
                        else {
                            return problems.push(self.problem(
                                ProblemKind::WrongValue,
                                from,
                                format!("TRANSFER body of {} bytes", body.len()),
                            ));
                        };
                        if amount > fb {
                            problems.push(self.problem(ProblemKind::LostWrite, from, format!("transfer of {amount} succeeded on a balance the model has at {fb}: earlier transfers are missing")));
                        } else if (f, t) != (fb - amount, tb + amount) {
                            problems.push(self.problem(
                                ProblemKind::LostWrite,
                                from,
                                format!(
                                    "transfer of {amount} to account {}: balances after it {f} and {t}, expected {} and {}",
                                    self.account(to),
                                    fb - amount,
                                    tb + amount
                                ),
                            ));
                        }
                        self.apply(from, to, amount);
                        // Follow the server so that one loss is reported once.
                        self.accounts[from as usize].balance = Some(f);
                        self.accounts[to as usize].balance = Some(t);
                    }
                    status::INSUFFICIENT_FUNDS => {
                        if amount <= fb {
                            problems.push(self.problem(ProblemKind::LostWrite, from, format!("transfer of {amount} refused for insufficient funds, but the model has {fb}")));
                        }
                    }
                    _ => problems.push(self.problem(
                        ProblemKind::BadStatus,
                        from,
                        format!("TRANSFER status {st}"),
                    )),
                }
            }
            Op::History(j, max) => {
                if st != status::OK {
                    return problems.push(self.problem(
                        ProblemKind::BadStatus,
                        j,
                        format!("HISTORY status {st}"),
                    ));
                }
                if !body.len().is_multiple_of(24) {
                    return problems.push(self.problem(
                        ProblemKind::WrongValue,
                        j,
                        format!("HISTORY body of {} bytes", body.len()),
                    ));
                }
                if self.pending.is_some_and(|(f, t, _)| f == j || t == j) {
                    return; // settled by the BALANCE of the sweep
                }
                let a = &self.accounts[j as usize];
                if a.balance.is_none() {
                    return;
                }
                let got = body.len() / 24;
                let want = (a.records.min(u64::from(max))) as usize;
                if got != want {
                    let kind = if got < want {
                        ProblemKind::LostWrite
                    } else {
                        ProblemKind::WrongValue
                    };
                    return problems.push(self.problem(
                        kind,
                        j,
                        format!("HISTORY of at most {max} returned {got} records, expected {want}"),
                    ));
                }
                let mut last_seq = u64::MAX;
                for (i, rec) in body.chunks_exact(24).enumerate() {
                    let seq = u64_at(rec, 0).unwrap_or(0);
                    let other = u32::from_le_bytes(rec[8..12].try_into().unwrap_or([0; 4]));
                    let flags = u32::from_le_bytes(rec[12..16].try_into().unwrap_or([0; 4]));
                    let amount = u64_at(rec, 16).unwrap_or(0);
                    if seq >= last_seq {
                        return problems.push(self.problem(
                            ProblemKind::WrongValue,
                            j,
                            "HISTORY records not newest first".into(),
                        ));
                    }
                    last_seq = seq;
                    if let Some(&(wo, wout, wa)) = a.recent.get(i) {
                        if (other, flags & 1 == 1, amount) != (wo, wout, wa) {
                            return problems.push(self.problem(
                                ProblemKind::LostWrite,
                                j,
                                format!("history record {i} (newest first) is ({other}, flags {flags}, {amount}), expected ({wo}, outgoing {wout}, {wa})"),
                            ));
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// One connection's workload: kv or bank.
#[derive(Debug)]
pub enum Work {
    /// kv.
    Kv(KvModel),
    /// bank.
    Bank(BankModel),
}

impl Work {
    /// The next operation.
    pub fn next_op(&mut self, rng: &mut Rng) -> Op {
        match self {
            Work::Kv(m) => m.next_op(rng),
            Work::Bank(m) => m.next_op(rng),
        }
    }
    /// Encodes `o`.
    pub fn encode(&self, o: &Op, e: &mut Encoded) {
        match self {
            Work::Kv(m) => m.encode(o, e),
            Work::Bank(m) => m.encode(o, e),
        }
    }
    /// The response to `o` never arrived.
    pub fn lost(&mut self, o: &Op) {
        match self {
            Work::Kv(m) => m.lost(o),
            Work::Bank(m) => m.lost(o),
        }
    }
    /// Checks a response.
    pub fn check(
        &mut self,
        o: &Op,
        st: u8,
        body: &[u8],
        verify: bool,
        problems: &mut Vec<Problem>,
    ) {
        match self {
            Work::Kv(m) => m.check(o, st, body, verify, problems),
            Work::Bank(m) => m.check(o, st, body, verify, problems),
        }
    }
    /// The reads of a sweep.
    pub fn sweep(&self) -> Vec<Op> {
        match self {
            Work::Kv(m) => m.sweep(),
            Work::Bank(m) => m.sweep(),
        }
    }
    /// Whether a first sweep is needed before the workload starts.
    pub fn needs_baseline(&self) -> bool {
        matches!(self, Work::Bank(_))
    }
    /// A sweep ended: every pending write is settled (or reported).
    pub fn swept(&mut self) {
        match self {
            Work::Kv(m) => m.pending = None,
            Work::Bank(m) => {
                m.pending = None;
                m.swept();
            }
        }
    }
    /// Whether a write's outcome is still open.
    pub fn pending(&self) -> bool {
        match self {
            Work::Kv(m) => m.pending.is_some(),
            Work::Bank(m) => m.pending.is_some(),
        }
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
