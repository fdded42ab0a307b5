//! Safe wrappers for the dirty-logging ioctls that kvm-ioctls 0.25 lacks.
//!
//! * [`enable_manual_protect`] wraps `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`
//!   with `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET`.
//! * [`get_dirty_log`] wraps `KVM_GET_DIRTY_LOG` into a caller-owned bitmap (the
//!   kvm-ioctls version allocates a new one each call).
//! * [`clear_dirty_log`] wraps `KVM_CLEAR_DIRTY_LOG` (ioctl nr 0xc0).
//! * [`enable_dirty_ring`] wraps `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)`.
//! * [`reset_dirty_rings`] wraps `KVM_RESET_DIRTY_RINGS` (`_IO(0xAE, 0xc7)`).
//!
//! Every wrapper checks its arguments before the ioctl, so that a caller's
//! mistake is a typed error and not an `EINVAL` to puzzle over. The VM fd is
//! taken as `impl AsRawFd`: a [`kvm_ioctls::VmFd`] or a duplicate of it.

use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};

use self::nr::{KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};
use super::DirtyError;

/// The ioctl numbers (from `linux/kvm.h`).
mod nr {
    use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log};
    use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

    /// The KVM ioctl type.
    const KVMIO: u32 = 0xAE;

    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}

/// Size in bytes of one dirty-ring entry (`struct kvm_dirty_gfn`).
pub const DIRTY_GFN_SIZE: u32 = size_of::<kvm_bindings::kvm_dirty_gfn>() as u32;
/// Fewest entries a dirty ring may have: one page of entries.
pub const MIN_RING_ENTRIES: u32 = 4096 / DIRTY_GFN_SIZE;
/// The alignment KVM requires of `KVM_CLEAR_DIRTY_LOG`'s `first_page`.
pub const CLEAR_ALIGN: u64 = 64;

/// Enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with
/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET`:
/// `KVM_GET_DIRTY_LOG` then only reads the bitmap, [`clear_dirty_log`]
/// clears bits and write-protects their pages again, and a slot that gets
/// `KVM_MEM_LOG_DIRTY_PAGES` starts with every bit set (every page dirty,
/// nothing write-protected until it is cleared).
///
/// Must precede setting `KVM_MEM_LOG_DIRTY_PAGES` on the slot.
///
/// # Errors
///
/// [`DirtyError::Unsupported`] when KVM does not offer both flags;
/// [`DirtyError::Ioctl`] when the ioctl fails.
pub fn enable_manual_protect(vm: &VmFd) -> Result<(), DirtyError> {
    let want = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
    // The capability check returns the mask of supported flags.
    let have = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if have < 0 || (have as u32) & want != want {
        return Err(DirtyError::Unsupported(
            "MANUAL_DIRTY_LOG_PROTECT2 with INITIALLY_SET",
        ));
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(want);
    vm.enable_cap(&cap).map_err(|source| DirtyError::Ioctl {
        what: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
        source,
    })
}

/// Checks a dirty-ring size: a power of two, at least [`MIN_RING_ENTRIES`]
/// and at most `max_bytes` (what KVM reports) in bytes.
///
/// # Errors
///
/// [`DirtyError::RingSize`].
pub fn check_ring_entries(entries: u32, max_bytes: u64) -> Result<u32, DirtyError> {
    let bytes = u64::from(entries) * u64::from(DIRTY_GFN_SIZE);
    if !entries.is_power_of_two() || entries < MIN_RING_ENTRIES || bytes > max_bytes {
        return Err(DirtyError::RingSize {
            entries,
            min: MIN_RING_ENTRIES,
            max: (max_bytes / u64::from(DIRTY_GFN_SIZE)) as u32,
        });
    }
    Ok(bytes as u32)
}

/// Enables the dirty ring (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`) with
/// `entries` entries per vCPU. Must be called before any vCPU is created;
/// afterwards `KVM_GET_DIRTY_LOG` fails with `ENXIO`.
///
/// # Errors
///
/// [`DirtyError::Unsupported`] without the capability;
/// [`DirtyError::RingSize`] for a bad size; [`DirtyError::Ioctl`] when the
/// ioctl fails (`EINVAL` once vCPUs exist).
pub fn enable_dirty_ring(vm: &VmFd, entries: u32) -> Result<(), DirtyError> {
    let max = vm.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING_ACQ_REL));
    if max <= 0 {
        return Err(DirtyError::Unsupported("DIRTY_LOG_RING_ACQ_REL"));
    }
    let bytes = check_ring_entries(entries, max as u64)?;
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
        ..Default::default()
    };
    cap.args[0] = u64::from(bytes);
    vm.enable_cap(&cap).map_err(|source| DirtyError::Ioctl {
        what: "KVM_ENABLE_CAP(DIRTY_LOG_RING_ACQ_REL)",
        source,
    })
}

/// Words of a bitmap with one bit per page of `pages` pages.
pub fn bitmap_words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// `KVM_GET_DIRTY_LOG` of `slot` (of `pages` pages) into `bitmap`.
///
/// With manual protect this only copies the bitmap; without it, it also
/// clears it and write-protects the pages.
///
/// # Errors
///
/// [`DirtyError::BitmapTooSmall`]; [`DirtyError::Ioctl`] (`ENOENT`: the
/// slot has no dirty logging; `ENXIO`: the dirty ring is on).
pub fn get_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    pages: u64,
    bitmap: &mut [u64],
) -> Result<(), DirtyError> {
    if bitmap.len() < bitmap_words(pages) {
        return Err(DirtyError::BitmapTooSmall {
            words: bitmap.len(),
            pages,
        });
    }
    let log = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `log` points at `bitmap`, which has room for one bit per page
    // of the slot (checked above; KVM writes exactly that many bits,
    // rounded up to 64); the kernel reads `log` only during the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
    if ret != 0 {
        return Err(DirtyError::Ioctl {
            what: "KVM_GET_DIRTY_LOG",
            source: vmm_sys_util::errno::Error::last(),
        });
    }
    Ok(())
}

/// `KVM_CLEAR_DIRTY_LOG`: clears the bits of pages
/// `first_page..first_page + num_pages` of `slot` that are set in `bitmap`
/// (bit 0 of `bitmap[0]` is `first_page`) and write-protects those pages,
/// so their next write is logged again.
///
/// `first_page` must be a multiple of 64, and `num_pages` a multiple of 64
/// unless the range ends at the end of the slot (KVM checks that).
///
/// # Errors
///
/// [`DirtyError::Misaligned`], [`DirtyError::BitmapTooSmall`], or
/// [`DirtyError::Ioctl`].
pub fn clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<(), DirtyError> {
    if !first_page.is_multiple_of(CLEAR_ALIGN) {
        return Err(DirtyError::Misaligned { first_page });
    }
    if bitmap.len() < bitmap_words(u64::from(num_pages)) {
        return Err(DirtyError::BitmapTooSmall {
            words: bitmap.len(),
            pages: u64::from(num_pages),
        });
    }
    let clear = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            // KVM only reads the bitmap; the field is `*mut` in the ABI.
            dirty_bitmap: bitmap.as_ptr().cast_mut().cast(),
        },
    };
    // SAFETY: `clear` points at `bitmap`, which holds at least `num_pages`
    // bits (checked above); KVM only reads it, during the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if ret != 0 {
        return Err(DirtyError::Ioctl {
            what: "KVM_CLEAR_DIRTY_LOG",
            source: vmm_sys_util::errno::Error::last(),
        });
    }
    Ok(())
}

/// `KVM_RESET_DIRTY_RINGS`: for every vCPU's ring, KVM takes back the
/// entries userspace marked `KVM_DIRTY_GFN_F_RESET` and write-protects
/// their pages again. Returns how many entries were reset.
///
/// All signals are blocked in the calling thread for the duration of the
/// ioctl. KVM stops resetting when a signal is pending, and (measured on
/// this project's 6.18 hosts) then still returns success but leaves the
/// batch of entries it was coalescing marked free *without* write-protecting
/// their pages: later writes to them are never logged. A vCPU thread
/// draining its full ring gets exactly such a signal when the VMM pauses it.
/// A blocked signal stays pending and is delivered when the mask is
/// restored.
///
/// # Errors
///
/// [`DirtyError::Ioctl`] (also when the signal mask cannot be changed).
pub fn reset_dirty_rings(vm: &impl AsRawFd) -> Result<u32, DirtyError> {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    let mut old = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )
    .map_err(|e| DirtyError::Ioctl {
        what: "pthread_sigmask (around KVM_RESET_DIRTY_RINGS)",
        source: vmm_sys_util::errno::Error::new(e as i32),
    })?;
    // SAFETY: an `_IO` ioctl: no memory is passed to the kernel.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    let result = if ret >= 0 {
        Ok(ret as u32)
    } else {
        Err(DirtyError::Ioctl {
            what: "KVM_RESET_DIRTY_RINGS",
            source: vmm_sys_util::errno::Error::last(),
        })
    };
    // Restoring the caller's own mask cannot fail.
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // From linux/kvm.h on x86_64.
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(KVM_CLEAR_DIRTY_LOG(), 0xc018_aec0);
        assert_eq!(KVM_RESET_DIRTY_RINGS(), 0xaec7);
    }

    #[test]
    fn ring_sizes_are_checked() {
        assert_eq!(check_ring_entries(256, 1 << 20).unwrap(), 4096);
        assert_eq!(check_ring_entries(65536, 1 << 20).unwrap(), 1 << 20);
        for bad in [0, 100, 128, 300, 131_072] {
            assert!(
                matches!(
                    check_ring_entries(bad, 1 << 20),
                    Err(DirtyError::RingSize { entries, min: 256, max: 65536 }) if entries == bad
                ),
                "{bad} entries accepted"
            );
        }
    }

    #[test]
    fn clear_checks_alignment_and_bitmap_size_before_the_ioctl() {
        // /dev/null is no VM: an ioctl on it would fail with ENOTTY, so the
        // typed errors below prove the checks come first.
        let null = std::fs::File::open("/dev/null").unwrap();
        let bits = [u64::MAX; 2];
        assert!(matches!(
            clear_dirty_log(&null, 0, 32, 64, &bits),
            Err(DirtyError::Misaligned { first_page: 32 })
        ));
        assert!(matches!(
            clear_dirty_log(&null, 0, 64, 129, &bits),
            Err(DirtyError::BitmapTooSmall {
                words: 2,
                pages: 129
            })
        ));
        match clear_dirty_log(&null, 0, 64, 128, &bits) {
            Err(DirtyError::Ioctl { source, .. }) => assert_eq!(source.errno(), libc::ENOTTY),
            other => panic!("expected ENOTTY from /dev/null, got {other:?}"),
        }
        let mut small = [0u64; 1];
        assert!(matches!(
            get_dirty_log(&null, 0, 65, &mut small),
            Err(DirtyError::BitmapTooSmall {
                words: 1,
                pages: 65
            })
        ));
        assert!(matches!(
            reset_dirty_rings(&null),
            Err(DirtyError::Ioctl { .. })
        ));
    }
}
