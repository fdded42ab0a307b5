//! A minimal safe wrapper over `userfaultfd(2)`, write-protect mode only.
//!
//! Only what the copy-on-write view needs: open with
//! `UFFD_FEATURE_PAGEFAULT_FLAG_WP`, register one range with
//! `UFFDIO_REGISTER_MODE_WP`, write-protect / un-protect ranges with
//! `UFFDIO_WRITEPROTECT`, and read fault messages. The structures and ioctl
//! numbers are those of `<linux/userfaultfd.h>` (checked in the tests).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::raw::c_ulong;

use vmm_sys_util::ioctl::{ioctl_expr, ioctl_with_mut_ref, ioctl_with_ref, _IOC_READ, _IOC_WRITE};

/// `UFFD_API`.
const UFFD_API: u64 = 0xaa;
/// The ioctl type of userfaultfd.
const UFFDIO: u32 = 0xaa;

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults are reported.
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_WP_UNPOPULATED`: write-protecting a range also protects
/// pages not yet populated (so a later first write faults too).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

/// `UFFDIO_REGISTER_MODE_WP`.
const REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (without it: un-protect and wake).
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// Bit of `UFFDIO_WRITEPROTECT` (`_UFFDIO_WRITEPROTECT` = 6) in the
/// `ioctls` mask `UFFDIO_REGISTER` returns.
const IOCTL_BIT_WRITEPROTECT: u64 = 1 << 6;

/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WP`: the fault is a write to a write-protected page.
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg`: an event read from the file descriptor. For
/// `UFFD_EVENT_PAGEFAULT`, `arg[0]` holds the flags and `arg[1]` the
/// faulting address.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// The event's union of arguments.
    pub arg: [u64; 3],
}

const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRange>() == 16);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(size_of::<UffdMsg>() == 32);

const fn iowr(nr: u32, size: usize) -> c_ulong {
    ioctl_expr(_IOC_READ | _IOC_WRITE, UFFDIO, nr, size as u32)
}

/// `UFFDIO_API`.
pub(super) const UFFDIO_API: c_ulong = iowr(0x3f, size_of::<UffdioApi>());
/// `UFFDIO_REGISTER`.
pub(super) const UFFDIO_REGISTER: c_ulong = iowr(0x00, size_of::<UffdioRegister>());
/// `UFFDIO_UNREGISTER` (`_IOR`).
pub(super) const UFFDIO_UNREGISTER: c_ulong =
    ioctl_expr(_IOC_READ, UFFDIO, 0x01, size_of::<UffdioRange>() as u32);
/// `UFFDIO_WRITEPROTECT`.
pub(super) const UFFDIO_WRITEPROTECT: c_ulong = iowr(0x06, size_of::<UffdioWriteprotect>());

/// An open userfaultfd, non-blocking, with the write-protect API enabled.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

impl Uffd {
    /// Opens a userfaultfd that also handles faults raised inside the
    /// kernel (KVM's `get_user_pages` on behalf of a vCPU), and enables
    /// the API with `FEATURE_PAGEFAULT_FLAG_WP` plus whichever of
    /// `extra_features` the kernel offers.
    ///
    /// # Errors
    ///
    /// The `userfaultfd` syscall's error (`EPERM` without
    /// `CAP_SYS_PTRACE`), `UFFDIO_API`'s error, or `ENOTSUP` when the
    /// kernel has no write-protect support.
    pub fn open(extra_features: u64) -> io::Result<Self> {
        let fd = Self::open_raw()?;
        // First handshake without features, to learn what is offered
        // (UFFDIO_API fails with EINVAL for unknown features); a
        // userfaultfd accepts UFFDIO_API once, so the real one goes to a
        // fresh fd.
        let mut probe = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which
        // `probe` is (layout checked above); `fd` is a userfaultfd.
        if unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API, &mut probe) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if probe.features & FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        let want = FEATURE_PAGEFAULT_FLAG_WP | (extra_features & probe.features);
        drop(fd);
        let fd = Self::open_raw()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: want,
            ioctls: 0,
        };
        // SAFETY: as above.
        if unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API, &mut api) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Uffd {
            fd,
            features: api.features,
        })
    }

    fn open_raw() -> io::Result<OwnedFd> {
        // No UFFD_USER_MODE_ONLY: faults taken by the kernel on behalf of
        // KVM must reach the handler too.
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes one int of flags and
        // returns a new file descriptor or -1; no memory is passed.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = i32::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: `raw` is a file descriptor the syscall just created and
        // nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// The features the kernel enabled.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `start..start+len` for write-protect tracking.
    ///
    /// # Safety
    ///
    /// `start..start+len` must be a mapping of this process that stays
    /// mapped while it is registered; writes to it block (synchronous
    /// write-protect) until a thread reading this fd resolves them.
    ///
    /// # Errors
    ///
    /// The ioctl's error, or `ENOTSUP` if the kernel cannot write-protect
    /// this kind of memory.
    pub unsafe fn register_wp(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct
        // uffdio_register`; the range is the caller's mapping.
        if unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER, &mut reg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if reg.ioctls & IOCTL_BIT_WRITEPROTECT == 0 {
            // SAFETY: undoes the registration just made.
            unsafe { self.unregister(start, len) }?;
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        Ok(())
    }

    /// Unregisters `start..start+len` (waking every thread blocked in it).
    ///
    /// # Safety
    ///
    /// The range must have been registered with [`Uffd::register_wp`].
    ///
    /// # Errors
    ///
    /// The ioctl's error.
    pub unsafe fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let range = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`.
        if unsafe { ioctl_with_ref(&self.fd, UFFDIO_UNREGISTER, &range) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Write-protects (`protect`) or un-protects `start..start+len`; an
    /// un-protect also wakes the threads blocked on the range. Retries on
    /// `EAGAIN` (the address space was changing).
    ///
    /// # Errors
    ///
    /// The ioctl's error (`ENOENT`/`EINVAL` for a range not registered).
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> io::Result<()> {
        let wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        loop {
            // SAFETY: UFFDIO_WRITEPROTECT reads a `struct
            // uffdio_writeprotect`. Changing protection does not change
            // memory contents; the kernel checks the range is registered.
            if unsafe { ioctl_with_ref(&self.fd, UFFDIO_WRITEPROTECT, &wp) } == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EAGAIN) {
                return Err(err);
            }
        }
    }

    /// Reads pending messages into `buf` without blocking; returns how many
    /// were read (0 when none is pending).
    ///
    /// # Errors
    ///
    /// The `read` error other than `EAGAIN`.
    pub fn read_msgs(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of its whole byte length and
            // `UffdMsg` is plain data for which any bytes are valid.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    std::mem::size_of_val(buf),
                )
            };
            if n >= 0 {
                return Ok(n as usize / size_of::<UffdMsg>());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(0),
                Some(libc::EINTR) => continue,
                _ => return Err(err),
            }
        }
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
    }

    #[test]
    fn opens_with_write_protect_and_rejects_unregistered_ranges() {
        let uffd = Uffd::open(FEATURE_WP_UNPOPULATED).expect("userfaultfd with WP");
        assert_ne!(uffd.features() & FEATURE_PAGEFAULT_FLAG_WP, 0);
        // Nothing registered: the kernel refuses.
        assert!(uffd.write_protect(0x1000_0000, 4096, true).is_err());
        let mut msgs = [UffdMsg::default(); 4];
        assert_eq!(uffd.read_msgs(&mut msgs).unwrap(), 0);
    }
}
