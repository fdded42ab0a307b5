use proptest::prelude::*;

use super::*;

/// A snapshot with distinctive, non-default contents (no KVM needed).
pub(crate) fn sample_snapshot(vcpus: u32) -> VmSnapshot {
    let mut irqchips: [kvm_irqchip; 3] = Default::default();
    for (i, chip) in irqchips.iter_mut().enumerate() {
        chip.chip_id = i as u32;
        let mut dummy = [0i8; 512];
        dummy[7] = 0x40 + i as i8;
        chip.chip = kvm_bindings::kvm_irqchip__bindgen_ty_1 { dummy };
    }
    let mut pit = kvm_pit_state2::default();
    pit.channels[0].count = 0x1234;
    let clock = kvm_clock_data {
        clock: 123_456_789,
        ..Default::default()
    };
    let mut devices = DeviceStates::new();
    devices.insert(CONSOLE_STATE.into(), b"\x01\0\0\0\x03\0\0\0abc".to_vec());
    devices.insert(SYSTEM_STATE.into(), 42u64.to_le_bytes().to_vec());
    devices.insert("blk".into(), vec![9; 300]);
    VmSnapshot {
        mem_bytes: 64 << 20,
        boot_params: vec![1, 2, 3],
        irqchips,
        pit,
        clock,
        devices,
        vcpus: (0..vcpus)
            .map(|id| {
                let mut regs = kvm_regs {
                    rip: 0x10_0000 + u64::from(id),
                    rsp: 0x20_0000,
                    rflags: 0x202,
                    ..Default::default()
                };
                regs.rax = 0xdead_beef;
                let sregs = kvm_sregs {
                    cr0: 0x8000_0011,
                    efer: 0x500,
                    ..Default::default()
                };
                let mut xsave = kvm_xsave::default();
                xsave.region[3] = 0x55;
                let mut lapic = kvm_lapic_state::default();
                lapic.regs[0x20] = id as i8;
                VcpuSnapshot {
                    id,
                    cpuid: vec![
                        kvm_cpuid_entry2 {
                            function: 1,
                            ebx: id << 24,
                            ..Default::default()
                        };
                        3
                    ],
                    tsc_khz: 2_000_000,
                    mp_state: kvm_mp_state { mp_state: 0 },
                    regs,
                    sregs,
                    xsave,
                    xcrs: kvm_xcrs::default(),
                    debugregs: kvm_debugregs::default(),
                    lapic,
                    msrs: vec![
                        kvm_msr_entry {
                            index: MSR_EFER,
                            data: 0x500,
                            ..Default::default()
                        },
                        kvm_msr_entry {
                            index: MSR_IA32_TSC_DEADLINE,
                            data: 77,
                            ..Default::default()
                        },
                    ],
                    events: kvm_vcpu_events::default(),
                }
            })
            .collect(),
    }
}

#[test]
fn round_trip() {
    for n in [1, 2, 5] {
        let s = sample_snapshot(n);
        let bytes = s.encode();
        let back = VmSnapshot::decode(&bytes).expect("decode");
        assert!(back == s);
        assert_eq!(back.encode(), bytes);
        assert_eq!(
            back.vcpus[n as usize - 1].regs.rip,
            0x10_0000 + u64::from(n - 1)
        );
        assert_eq!(back.devices["blk"], vec![9; 300]);
    }
}

#[test]
fn every_truncation_is_rejected() {
    let bytes = sample_snapshot(2).encode();
    for len in 0..bytes.len() {
        let e = VmSnapshot::decode(&bytes[..len]).expect_err("truncated input decoded");
        assert!(e.is_bad_input(), "{len}: {e}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        VmSnapshot::decode(&longer),
        Err(StateError::Trailing(1))
    ));
}

#[test]
fn every_bit_flip_is_rejected() {
    let s = sample_snapshot(1);
    let bytes = s.encode();
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            match VmSnapshot::decode(&b) {
                Err(e) => assert!(e.is_bad_input(), "byte {i} bit {bit}: {e}"),
                // CRC-32 catches every single-bit error; decoding equal
                // would be the only acceptable alternative.
                Ok(d) => assert!(d == s, "byte {i} bit {bit} decoded to something else"),
            }
        }
    }
}

#[test]
fn header_errors_are_typed() {
    let bytes = sample_snapshot(1).encode();
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(matches!(
        VmSnapshot::decode(&b),
        Err(StateError::BadMagic { .. })
    ));
    // A new version with a valid header checksum.
    let mut b = bytes.clone();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32fast::hash(&b[0..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        VmSnapshot::decode(&b),
        Err(StateError::UnsupportedVersion { found: 2 })
    ));
    // An absurd payload length with a valid header checksum.
    let mut b = bytes.clone();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let crc = crc32fast::hash(&b[0..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        VmSnapshot::decode(&b),
        Err(StateError::TooLarge { .. })
    ));
    // A payload bit flip.
    let mut b = bytes;
    let last = b.len() - 1;
    b[last] ^= 1;
    assert!(matches!(
        VmSnapshot::decode(&b),
        Err(StateError::Checksum { .. })
    ));
}

#[test]
fn structural_errors_are_typed() {
    let s = sample_snapshot(1);
    let payload = s.encode()[STATE_HEADER_LEN..].to_vec();
    // vCPU count 0.
    let mut p = payload.clone();
    p[8..12].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        VmSnapshot::decode_payload(&p),
        Err(StateError::Limit { .. })
    ));
    // More vCPUs than encoded: runs out of bytes.
    let mut p = payload.clone();
    p[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        VmSnapshot::decode_payload(&p),
        Err(StateError::Truncated { .. })
    ));
    // Boot params length over its cap.
    let mut p = payload;
    p[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        VmSnapshot::decode_payload(&p),
        Err(StateError::Limit { .. })
    ));
}

#[test]
fn console_and_clock_state_round_trip_through_the_bus() {
    let bus = MmioBus::new();
    let mem = GuestMemory::new(8 << 20).unwrap();
    for b in b"partial" {
        bus.write(1, super::super::abi::CONSOLE_PUTC, &[*b], &mem)
            .unwrap();
    }
    bus.set_guest_time_ns(5_000_000_000);
    let saved = bus.save_devices();
    let other = MmioBus::new();
    let rx = other.subscribe_console();
    other.restore_devices(&saved).unwrap();
    assert!(other.guest_time_ns() >= 5_000_000_000);
    assert!(other.guest_time_ns() < 6_000_000_000);
    other
        .write(1, super::super::abi::CONSOLE_PUTC, b"\n", &mem)
        .unwrap();
    assert_eq!(rx.try_recv().unwrap().text, "partial");
    let mut bad = saved.clone();
    bad.insert(SYSTEM_STATE.into(), vec![1, 2]);
    assert!(matches!(
        other.restore_devices(&bad),
        Err(StateError::Device { .. })
    ));
}

struct Counter(std::sync::atomic::AtomicU64);

impl DeviceState for Counter {
    fn state_name(&self) -> &str {
        "counter"
    }
    fn save_state(&self) -> Vec<u8> {
        self.0
            .load(std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes()
            .to_vec()
    }
    fn restore_state(&self, bytes: &[u8]) -> Result<(), String> {
        let b: [u8; 8] = bytes.try_into().map_err(|_| "need 8 bytes".to_string())?;
        self.0
            .store(u64::from_le_bytes(b), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

#[test]
fn registered_devices_save_and_get_pending_state_on_registration() {
    let bus = MmioBus::new();
    bus.register_device_state(Arc::new(Counter(17.into())))
        .unwrap();
    assert!(bus
        .register_device_state(Arc::new(Counter(1.into())))
        .is_err());
    let saved = bus.save_devices();
    assert_eq!(saved["counter"], 17u64.to_le_bytes());
    // Restore before the device exists: the blob waits for it.
    let other = MmioBus::new();
    other.restore_devices(&saved).unwrap();
    assert_eq!(other.unclaimed_device_states(), vec!["counter".to_string()]);
    let dev = Arc::new(Counter(0.into()));
    other.register_device_state(dev.clone()).unwrap();
    assert_eq!(dev.0.load(std::sync::atomic::Ordering::Relaxed), 17);
    assert!(other.unclaimed_device_states().is_empty());
}

proptest! {
    #[test]
    fn random_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = VmSnapshot::decode_payload(&bytes);
        let _ = VmSnapshot::decode(&bytes);
    }

    #[test]
    fn mutated_snapshots_are_rejected_or_equal(
        pos in any::<prop::sample::Index>(),
        val in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let s = sample_snapshot(2);
        let bytes = s.encode();
        let mut b = bytes.clone();
        let i = pos.index(b.len());
        b[i] = val;
        match VmSnapshot::decode(&b) {
            Ok(d) => prop_assert!(d == s),
            Err(e) => prop_assert!(e.is_bad_input()),
        }
        // Mutated payloads without the checksum still decode or fail typed.
        let mut p = bytes[STATE_HEADER_LEN..].to_vec();
        let j = pos.index(p.len());
        p[j] = val;
        let _ = VmSnapshot::decode_payload(&p);
        let c = cut.index(bytes.len());
        prop_assert!(VmSnapshot::decode(&bytes[..c]).is_err());
    }
}
