//! The `bank` workload: accounts with balances and per-account history
//! records, like SPECweb's Banking (small updates): TRANSFER, BALANCE,
//! HISTORY, PING (see `proto.rs`).
//!
//! Accounts are an array of [`Account`]; each has a ring of
//! `history_per_account` [`Record`]s (newest overwrites oldest). A transfer
//! writes two balances and two history records: four small, scattered
//! updates.

use crate::abi::{BootParams, VcpuStatus};
use crate::heap::Heap;
use crate::net::{self, Net, Service};
use crate::proto::{self, op, status};
use crate::user::{exit, println};

/// One account.
#[repr(C)]
#[derive(Clone, Copy)]
struct Account {
    balance: u64,
    /// History records ever written (the ring keeps the newest).
    records: u64,
}

/// One history record.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Record {
    seq: u64,
    other: u32,
    flags: u32,
    amount: u64,
}

/// `Record::flags`: money left this account.
const OUTGOING: u32 = 1;

struct Bank {
    accounts: &'static mut [Account],
    history: &'static mut [Record],
    per_account: usize,
    seq: u64,
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

impl Bank {
    fn record(&mut self, acct: usize, other: u32, flags: u32, amount: u64) {
        let a = &mut self.accounts[acct];
        let slot = (a.records % self.per_account as u64) as usize;
        a.records += 1;
        self.history[acct * self.per_account + slot] = Record {
            seq: self.seq,
            other,
            flags,
            amount,
        };
    }

    fn transfer(&mut self, v: &[u8], body: &mut [u8]) -> (u8, usize) {
        if v.len() != 16 {
            return (status::BAD_REQUEST, 0);
        }
        let (from, to) = (le32(v) as usize, le32(&v[4..]) as usize);
        let amount = u64::from_le_bytes(v[8..16].try_into().unwrap_or([0; 8]));
        let n = self.accounts.len();
        if from >= n || to >= n {
            return (status::NOT_FOUND, 0);
        }
        if from == to {
            return (status::BAD_REQUEST, 0);
        }
        if self.accounts[from].balance < amount {
            return (status::INSUFFICIENT_FUNDS, 0);
        }
        self.accounts[from].balance -= amount;
        self.accounts[to].balance += amount;
        self.seq += 1;
        self.record(from, to as u32, OUTGOING, amount);
        self.record(to, from as u32, 0, amount);
        body[..8].copy_from_slice(&self.accounts[from].balance.to_le_bytes());
        body[8..16].copy_from_slice(&self.accounts[to].balance.to_le_bytes());
        (status::OK, 16)
    }

    fn balance(&self, v: &[u8], body: &mut [u8]) -> (u8, usize) {
        if v.len() != 4 {
            return (status::BAD_REQUEST, 0);
        }
        let Some(a) = self.accounts.get(le32(v) as usize) else {
            return (status::NOT_FOUND, 0);
        };
        body[..8].copy_from_slice(&a.balance.to_le_bytes());
        body[8..16].copy_from_slice(&a.records.to_le_bytes());
        (status::OK, 16)
    }

    fn history(&self, v: &[u8], body: &mut [u8]) -> (u8, usize) {
        if v.len() != 8 {
            return (status::BAD_REQUEST, 0);
        }
        let acct = le32(v) as usize;
        let Some(a) = self.accounts.get(acct) else {
            return (status::NOT_FOUND, 0);
        };
        let stored = a.records.min(self.per_account as u64);
        let want = u64::from(le32(&v[4..]).min(proto::MAX_SCAN_ENTRIES)).min(stored);
        let want = want.min((body.len() / 24) as u64);
        for i in 0..want {
            let slot = ((a.records - 1 - i) % self.per_account as u64) as usize;
            let r = self.history[acct * self.per_account + slot];
            let o = i as usize * 24;
            body[o..o + 8].copy_from_slice(&r.seq.to_le_bytes());
            body[o + 8..o + 12].copy_from_slice(&r.other.to_le_bytes());
            body[o + 12..o + 16].copy_from_slice(&r.flags.to_le_bytes());
            body[o + 16..o + 24].copy_from_slice(&r.amount.to_le_bytes());
        }
        (status::OK, want as usize * 24)
    }
}

impl Service for Bank {
    fn max_body(&mut self, req: &proto::Request<'_>) -> usize {
        match req.op {
            op::HISTORY => proto::MAX_SCAN_ENTRIES as usize * 24,
            _ => 16,
        }
    }

    fn handle(&mut self, req: &proto::Request<'_>, body: &mut [u8]) -> (u8, usize) {
        match req.op {
            op::PING => (status::OK, 0),
            op::TRANSFER => self.transfer(req.value, body),
            op::BALANCE => self.balance(req.value, body),
            op::HISTORY => self.history(req.value, body),
            _ => (status::UNKNOWN_OP, 0),
        }
    }
}

/// The `bank` workload on vCPU `cpu` (vCPUs other than 0 idle).
pub fn main(cpu: u64, bp: &BootParams, st: *mut VcpuStatus) -> ! {
    if cpu != 0 {
        net::idle_forever();
    }
    let mut heap = Heap::new(bp);
    let Ok(mut net) = Net::setup(&mut heap) else {
        println!("bank: no memory for the network rings");
        exit(4)
    };
    let n = bp.bank.accounts as usize;
    let per = bp.bank.history_per_account.max(1) as usize;
    let acct_bytes = (n * core::mem::size_of::<Account>()) as u64;
    let hist_bytes = (n * per * core::mem::size_of::<Record>()) as u64;
    let (Some(a), Some(h)) = (heap.alloc(acct_bytes, 64), heap.alloc(hist_bytes, 64)) else {
        println!(
            "bank: {n} accounts with {per} history records need {} MiB, the heap has less",
            (acct_bytes + hist_bytes) >> 20
        );
        exit(4)
    };
    if n == 0 {
        println!("bank: no accounts");
        exit(4)
    }
    // SAFETY: two disjoint heap blocks handed out once, mapped writable at
    // CPL3, 64-aligned, large enough for `n` accounts and `n * per`
    // records; only these slices use them.
    let (accounts, history) = unsafe {
        (
            core::slice::from_raw_parts_mut(a as *mut Account, n),
            core::slice::from_raw_parts_mut(h as *mut Record, n * per),
        )
    };
    for acct in accounts.iter_mut() {
        *acct = Account {
            balance: proto::BANK_INITIAL_BALANCE,
            records: 0,
        };
    }
    println!("bank: serving {n} accounts, {per} history records each");
    let mut bank = Bank {
        accounts,
        history,
        per_account: per,
        seq: 0,
    };
    net::serve(&mut net, &mut bank, st)
}
