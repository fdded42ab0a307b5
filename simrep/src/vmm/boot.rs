//! The boot environment of the bundled guest: identity page tables, the
//! GDT, the guest image, the boot parameters, and the 64-bit register state
//! each vCPU starts in (no real-mode code: the VMM puts the vCPU straight in
//! long mode at CPL0).
//!
//! The layout is the one [`super::abi`] documents.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::abi::{self, gdt, BootParams};
use super::elf::{self, ElfError};
use super::memory::{GuestMemory, MemoryError};

/// Errors of building the boot environment.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The guest image is not loadable.
    #[error("the guest image is not loadable")]
    Elf(#[from] ElfError),
    /// Writing the boot structures into guest memory failed.
    #[error("cannot write the boot structures into guest memory")]
    Memory(#[from] MemoryError),
    /// The guest memory size does not fit the memory map.
    #[error("guest memory of {size:#x} bytes does not fit the memory map ({min:#x}..={max:#x}, a multiple of 2 MiB)")]
    MemorySize {
        /// The size asked for.
        size: u64,
        /// Smallest allowed size.
        min: u64,
        /// Largest allowed size.
        max: u64,
    },
    /// Too many or too few vCPUs.
    #[error("{vcpus} vCPUs requested; the memory map has room for 1..={max}")]
    VcpuCount {
        /// The count asked for.
        vcpus: u32,
        /// Most vCPUs supported.
        max: u32,
    },
}

/// Page-table entry bits.
mod pte {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const USER: u64 = 1 << 2;
    pub const WRITE_THROUGH: u64 = 1 << 3;
    pub const CACHE_DISABLE: u64 = 1 << 4;
    pub const ACCESSED: u64 = 1 << 5;
    pub const DIRTY: u64 = 1 << 6;
    pub const LARGE: u64 = 1 << 7;
}

/// The page-table pages, inside [`abi::PAGE_TABLES_GPA`]..[`abi::PAGE_TABLES_END`].
const PML4_GPA: u64 = abi::PAGE_TABLES_GPA;
const PDPT_GPA: u64 = abi::PAGE_TABLES_GPA + 0x1000;
const PT_LOW_GPA: u64 = abi::PAGE_TABLES_GPA + 0x2000;
const PD_MMIO_GPA: u64 = abi::PAGE_TABLES_GPA + 0x3000;
const PD_RAM_GPA: u64 = abi::PAGE_TABLES_GPA + 0x4000;
const GIB: u64 = 1 << 30;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Checks a memory size and vCPU count against the memory map.
///
/// # Errors
///
/// [`BootError::MemorySize`] or [`BootError::VcpuCount`].
pub fn check_config(mem_size: u64, vcpus: u32) -> Result<(), BootError> {
    if !(abi::MIN_MEM_SIZE..=abi::MAX_MEM_SIZE).contains(&mem_size)
        || !mem_size.is_multiple_of(abi::LARGE_PAGE_SIZE)
    {
        return Err(BootError::MemorySize {
            size: mem_size,
            min: abi::MIN_MEM_SIZE,
            max: abi::MAX_MEM_SIZE,
        });
    }
    if vcpus == 0 || vcpus > abi::MAX_VCPUS {
        return Err(BootError::VcpuCount {
            vcpus,
            max: abi::MAX_VCPUS,
        });
    }
    Ok(())
}

/// The 4 KiB mappings of the first 2 MiB: `(gpa, flags)` of each mapped
/// page; unlisted pages are not present.
fn low_pages() -> impl Iterator<Item = (u64, u64)> {
    use pte::*;
    let sys = PRESENT | WRITABLE | ACCESSED | DIRTY;
    let user = sys | USER;
    let ranges: [(u64, u64, u64); 7] = [
        (
            abi::BOOT_PARAMS_GPA,
            abi::GDT_GPA,
            PRESENT | USER | ACCESSED,
        ),
        (abi::GDT_GPA, abi::STATUS_GPA, sys),
        (abi::STATUS_GPA, abi::EXCEPTION_REPORT_GPA, user),
        (
            abi::EXCEPTION_REPORT_GPA,
            abi::EXCEPTION_REPORT_GPA + 0x2000,
            sys,
        ),
        (abi::PAGE_TABLES_GPA, abi::PAGE_TABLES_END, sys),
        (
            abi::KERNEL_STACKS_GPA,
            abi::KERNEL_STACKS_GPA + u64::from(abi::MAX_VCPUS) * abi::KERNEL_STACK_SIZE,
            sys,
        ),
        (abi::IMAGE_GPA, abi::IMAGE_END, user),
    ];
    ranges.into_iter().flat_map(|(start, end, flags)| {
        (start..end)
            .step_by(abi::PAGE_SIZE as usize)
            .map(move |gpa| (gpa, flags))
    })
}

/// Writes the identity page tables for `mem_size` bytes of RAM plus the
/// MMIO window.
fn write_page_tables(mem: &GuestMemory) -> Result<(), BootError> {
    use pte::*;
    let table = PRESENT | WRITABLE | USER | ACCESSED;
    let zero = vec![0u8; (abi::PAGE_TABLES_END - abi::PAGE_TABLES_GPA) as usize];
    mem.write(abi::PAGE_TABLES_GPA, &zero)?;

    mem.write_obj(PML4_GPA, PDPT_GPA | table)?;
    let gibs = mem.size().div_ceil(GIB);
    for g in 0..gibs {
        let pd = PD_RAM_GPA + g * 0x1000;
        mem.write_obj(PDPT_GPA + g * 8, pd | table)?;
        let first = g * GIB;
        let last = (first + GIB).min(mem.size());
        for (i, gpa) in (first..last)
            .step_by(abi::LARGE_PAGE_SIZE as usize)
            .enumerate()
        {
            let entry = if gpa == 0 {
                PT_LOW_GPA | table
            } else {
                gpa | PRESENT | WRITABLE | USER | ACCESSED | DIRTY | LARGE
            };
            mem.write_obj(pd + i as u64 * 8, entry)?;
        }
    }
    for (gpa, flags) in low_pages() {
        mem.write_obj(PT_LOW_GPA + gpa / abi::PAGE_SIZE * 8, gpa | flags)?;
    }
    let mmio_pdpt_index = abi::MMIO_BASE / GIB;
    mem.write_obj(PDPT_GPA + mmio_pdpt_index * 8, PD_MMIO_GPA | table)?;
    let mmio = abi::MMIO_BASE
        | PRESENT
        | WRITABLE
        | USER
        | WRITE_THROUGH
        | CACHE_DISABLE
        | ACCESSED
        | DIRTY
        | LARGE;
    mem.write_obj(
        PD_MMIO_GPA + (abi::MMIO_BASE % GIB) / abi::LARGE_PAGE_SIZE * 8,
        mmio,
    )?;
    Ok(())
}

/// A 64-bit TSS descriptor (16 bytes), marked busy.
fn tss_descriptor(base: u64) -> [u64; 2] {
    let limit = u64::from(abi::TSS_LIMIT);
    let low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0xb << 40 // 64-bit TSS, busy
        | 1 << 47 // present
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    [low, base >> 32]
}

/// Writes the GDT: null, kernel code/data, user data/code, one TSS per vCPU.
fn write_gdt(mem: &GuestMemory, vcpus: u32) -> Result<(), BootError> {
    let flat: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff, // 0x08 kernel code: L, P, DPL0, exec/read, accessed
        0x00cf_9300_0000_ffff, // 0x10 kernel data: P, DPL0, read/write, accessed
        0x00cf_f300_0000_ffff, // 0x18 user data: P, DPL3
        0x00af_fb00_0000_ffff, // 0x20 user code: L, P, DPL3
    ];
    for (i, d) in flat.iter().enumerate() {
        mem.write_obj(abi::GDT_GPA + i as u64 * 8, *d)?;
    }
    for cpu in 0..vcpus {
        let [low, high] = tss_descriptor(tss_base(cpu));
        let at = abi::GDT_GPA + u64::from(gdt::tss(cpu));
        mem.write_obj(at, low)?;
        mem.write_obj(at + 8, high)?;
    }
    Ok(())
}

fn tss_base(cpu: u32) -> u64 {
    abi::TSS_GPA + u64::from(cpu) * abi::TSS_STRIDE
}

/// Loads the guest image and writes every boot structure except the
/// per-vCPU register state. Returns the entry point.
///
/// # Errors
///
/// [`BootError`] when the image is bad or a structure does not fit.
pub fn setup_memory(
    mem: &GuestMemory,
    image: &[u8],
    params: &BootParams,
) -> Result<u64, BootError> {
    check_config(mem.size(), params.vcpus)?;
    let img = elf::parse(image, abi::IMAGE_GPA..abi::IMAGE_END)?;
    for seg in &img.segments {
        mem.write(seg.paddr, seg.data)?;
        let bss = vec![0u8; (seg.memsz - seg.data.len() as u64) as usize];
        mem.write(seg.paddr + seg.data.len() as u64, &bss)?;
    }
    write_page_tables(mem)?;
    write_gdt(mem, params.vcpus)?;
    // TSSes, IDT, status and reports start zeroed (fresh anonymous memory,
    // but a reboot into the same memory must not see stale state).
    let zero = vec![0u8; (abi::EXCEPTION_REPORT_GPA + 0x2000 - abi::TSS_GPA) as usize];
    mem.write(abi::TSS_GPA, &zero)?;
    mem.write_obj(abi::BOOT_PARAMS_GPA, *params)?;
    Ok(img.entry)
}

fn segment(selector: u16, type_: u8, dpl: u8, code64: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!code64),
        s: 1,
        l: u8::from(code64),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The special registers of vCPU `cpu` at entry: long mode, paging on,
/// CPL0, the VMM's GDT, the (guest-filled) IDT and this vCPU's TSS loaded.
/// `sregs` is the vCPU's current state, so that fields the VMM does not set
/// (APIC base, interrupt bitmap) keep KVM's values.
pub fn entry_sregs(mut sregs: kvm_sregs, cpu: u32, vcpus: u32) -> kvm_sregs {
    sregs.cs = segment(gdt::KERNEL_CS, 0xb, 0, true);
    let data = segment(gdt::KERNEL_DS, 0x3, 0, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: tss_base(cpu),
        limit: abi::TSS_LIMIT,
        selector: gdt::tss(cpu),
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        type_: 0x2,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = abi::GDT_GPA;
    sregs.gdt.limit = gdt::tss(vcpus) - 1;
    sregs.idt.base = abi::IDT_GPA;
    sregs.idt.limit = abi::IDT_LIMIT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// The general registers of vCPU `cpu` at entry: `rip` = `entry`, its CPL0
/// stack, `rdi` = vCPU index, `rsi` = boot parameters.
pub fn entry_regs(cpu: u32, entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: abi::KERNEL_STACKS_GPA + (u64::from(cpu) + 1) * abi::KERNEL_STACK_SIZE,
        rdi: u64::from(cpu),
        rsi: abi::BOOT_PARAMS_GPA,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the guest page tables like the MMU: returns (gpa, flags of the leaf).
    fn translate(mem: &GuestMemory, va: u64) -> Option<(u64, u64)> {
        let pml4e: u64 = mem.read_obj(PML4_GPA + ((va >> 39) & 0x1ff) * 8).ok()?;
        if pml4e & pte::PRESENT == 0 {
            return None;
        }
        let pdpte: u64 = mem
            .read_obj((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8)
            .ok()?;
        if pdpte & pte::PRESENT == 0 {
            return None;
        }
        let pde: u64 = mem
            .read_obj((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8)
            .ok()?;
        if pde & pte::PRESENT == 0 {
            return None;
        }
        if pde & pte::LARGE != 0 {
            return Some((
                (pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff),
                pde & 0xfff,
            ));
        }
        let e: u64 = mem
            .read_obj((pde & !0xfff) + ((va >> 12) & 0x1ff) * 8)
            .ok()?;
        if e & pte::PRESENT == 0 {
            return None;
        }
        Some(((e & !0xfff) | (va & 0xfff), e & 0xfff))
    }

    #[test]
    fn page_tables_identity_map_ram_and_mmio_with_the_right_rights() {
        let mem = GuestMemory::new(64 << 20).unwrap();
        write_page_tables(&mem).unwrap();
        assert_eq!(translate(&mem, 0), None, "null page must not be mapped");
        let (gpa, f) = translate(&mem, abi::BOOT_PARAMS_GPA + 8).unwrap();
        assert_eq!(gpa, abi::BOOT_PARAMS_GPA + 8);
        assert_eq!(
            f & (pte::USER | pte::WRITABLE),
            pte::USER,
            "boot params: user, read-only"
        );
        let (_, f) = translate(&mem, abi::IDT_GPA).unwrap();
        assert_eq!(f & pte::USER, 0, "IDT is supervisor-only");
        let (_, f) = translate(&mem, abi::STATUS_GPA).unwrap();
        assert_ne!(f & pte::USER, 0);
        let (_, f) = translate(&mem, abi::IMAGE_GPA + 0x1234).unwrap();
        assert_ne!(f & pte::USER, 0);
        assert_eq!(
            translate(&mem, abi::HEAP_GPA + 0x1234).unwrap().0,
            abi::HEAP_GPA + 0x1234
        );
        assert_eq!(translate(&mem, (64 << 20) - 8).unwrap().0, (64 << 20) - 8);
        assert_eq!(
            translate(&mem, 64 << 20),
            None,
            "nothing past the end of RAM"
        );
        let (gpa, f) = translate(&mem, abi::SYS_EXIT).unwrap();
        assert_eq!(gpa, abi::SYS_EXIT);
        assert_ne!(f & pte::CACHE_DISABLE, 0);
    }

    #[test]
    fn page_tables_cover_more_than_one_gib() {
        let mem = GuestMemory::new((1 << 30) + (4 << 20)).unwrap();
        write_page_tables(&mem).unwrap();
        let va = (1 << 30) + (2 << 20) + 5;
        assert_eq!(translate(&mem, va).unwrap().0, va);
        assert_eq!(translate(&mem, (1 << 30) + (4 << 20)), None);
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let [low, high] = tss_descriptor(0x1234_5678_9abc_def0);
        assert_eq!(low & 0xffff, 0x67);
        assert_eq!((low >> 16) & 0xff_ffff, 0xbc_def0);
        assert_eq!((low >> 56) & 0xff, 0x9a);
        assert_eq!((low >> 40) & 0xf, 0xb);
        assert_eq!(high, 0x1234_5678);
    }

    #[test]
    fn config_limits() {
        assert!(check_config(256 << 20, 1).is_ok());
        assert!(matches!(
            check_config(4 << 20, 1),
            Err(BootError::MemorySize { .. })
        ));
        assert!(matches!(
            check_config((256 << 20) + 4096, 1),
            Err(BootError::MemorySize { .. })
        ));
        assert!(matches!(
            check_config(abi::MMIO_BASE + (2 << 20), 1),
            Err(BootError::MemorySize { .. })
        ));
        assert!(matches!(
            check_config(256 << 20, 0),
            Err(BootError::VcpuCount { .. })
        ));
        assert!(matches!(
            check_config(256 << 20, 33),
            Err(BootError::VcpuCount { .. })
        ));
    }
}
