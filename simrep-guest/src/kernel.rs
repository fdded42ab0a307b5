//! The CPL0 stub: entry, IDT, TSS, the drop to CPL3 and the exception handler.
//!
//! Everything here runs in KVM's instruction emulator under PVM, so it is
//! kept to a few hundred instructions and uses only integer instructions,
//! moves, `rep` string ops and control-register reads: no SSE, x87, `int n`,
//! `int3` or `vmcall`.

use core::arch::{asm, global_asm};
use core::ptr::{addr_of, write_volatile};

use crate::abi::{self, gdt, ExceptionReport};

// Entry point and the 32 exception stubs. Each stub pushes a zero error code
// when the CPU does not push one, then the vector, so `isr_common` always
// sees `[vector, error_code, rip, cs, rflags, rsp, ss]` at `rsp`.
global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
_start:
    xor ebp, ebp
    call {kmain}
    ud2

    .section .text.isr, "ax"
    .macro ISR_NOERR n
isr_\n:
    push 0
    push \n
    jmp isr_common
    .endm
    .macro ISR_ERR n
isr_\n:
    push \n
    jmp isr_common
    .endm

    ISR_NOERR 0
    ISR_NOERR 1
    ISR_NOERR 2
    ISR_NOERR 3
    ISR_NOERR 4
    ISR_NOERR 5
    ISR_NOERR 6
    ISR_NOERR 7
    ISR_ERR   8
    ISR_NOERR 9
    ISR_ERR   10
    ISR_ERR   11
    ISR_ERR   12
    ISR_ERR   13
    ISR_ERR   14
    ISR_NOERR 15
    ISR_NOERR 16
    ISR_ERR   17
    ISR_NOERR 18
    ISR_NOERR 19
    ISR_NOERR 20
    ISR_ERR   21
    ISR_NOERR 22
    ISR_NOERR 23
    ISR_NOERR 24
    ISR_NOERR 25
    ISR_NOERR 26
    ISR_NOERR 27
    ISR_NOERR 28
    ISR_ERR   29
    ISR_ERR   30
    ISR_NOERR 31

    // LAPIC timer: count the tick in this vCPU's status slot, EOI through
    // the x2APIC MSR, return. About 15 emulated instructions.
isr_timer:
    push rax
    push rcx
    push rdx
    str ax
    movzx eax, ax
    sub eax, {tss_base}
    shl eax, 2
    inc qword ptr [rax + {ticks}]
    mov ecx, 0x80b
    xor eax, eax
    xor edx, edx
    wrmsr
    pop rdx
    pop rcx
    pop rax
    iretq

isr_spurious:
    iretq

isr_common:
    mov rdi, rsp
    and rsp, -16
    call {handler}
    ud2

    .section .rodata.isr_table, "a"
    .balign 8
    .global isr_table
isr_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr_\n
    .endr
    .global isr_timer_addr
isr_timer_addr:
    .quad isr_timer
    .global isr_spurious_addr
isr_spurious_addr:
    .quad isr_spurious
"#,
    kmain = sym kmain,
    handler = sym exception_handler,
    tss_base = const gdt::TSS_BASE,
    ticks = const abi::STATUS_GPA + abi::STATUS_TICKS_OFFSET,
);

unsafe extern "C" {
    /// Addresses of the 32 exception stubs (defined in `global_asm!` above).
    static isr_table: [u64; 32];
    /// Address of the LAPIC timer handler.
    static isr_timer_addr: u64;
    /// Address of the spurious-interrupt handler.
    static isr_spurious_addr: u64;
}

/// Writes the interrupt gate for `vector` (present, DPL 0, kernel CS).
fn set_gate(vector: u64, handler: u64) {
    let low = (handler & 0xffff)
        | (u64::from(gdt::KERNEL_CS) << 16)
        | (0x8e00_u64 << 32)
        | ((handler >> 16) & 0xffff) << 48;
    let high = handler >> 32;
    let gate = (abi::IDT_GPA + vector * 16) as *mut u64;
    // SAFETY: the IDT page is guest RAM reserved for the IDT by the memory
    // map and mapped writable at CPL0; every vCPU writes the same values,
    // so concurrent writers agree.
    unsafe { write_volatile(gate, low) };
    // SAFETY: as above, second half of the same gate.
    unsafe { write_volatile(gate.add(1), high) };
}

/// `wrmsr`.
fn wrmsr(msr: u32, value: u64) {
    // SAFETY: only called at CPL0 on x2APIC and APIC-base MSRs, with values
    // that configure this vCPU's own LAPIC.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// `rdmsr`.
fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads an architectural MSR at CPL0.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// Switches the LAPIC to x2APIC mode and starts a periodic timer.
fn start_timer(count: u32) {
    const IA32_APIC_BASE: u32 = 0x1b;
    const X2APIC_SVR: u32 = 0x80f;
    const X2APIC_LVT_TIMER: u32 = 0x832;
    const X2APIC_TIMER_INIT: u32 = 0x838;
    const X2APIC_TIMER_DIV: u32 = 0x83e;
    wrmsr(IA32_APIC_BASE, rdmsr(IA32_APIC_BASE) | 1 << 11 | 1 << 10);
    wrmsr(X2APIC_SVR, 0x100 | u64::from(abi::SPURIOUS_VECTOR));
    wrmsr(X2APIC_TIMER_DIV, 0xb); // divide by 1
    wrmsr(X2APIC_LVT_TIMER, 1 << 17 | u64::from(abi::TIMER_VECTOR)); // periodic
    wrmsr(X2APIC_TIMER_INIT, u64::from(count));
}

/// CPL0 entry, called by `_start` with the vCPU index.
extern "C" fn kmain(cpu: u64) -> ! {
    // SAFETY: `isr_table` is a read-only table of 32 addresses defined in
    // this file's assembly.
    let table = unsafe { &*addr_of!(isr_table) };
    for (vector, &handler) in table.iter().enumerate() {
        set_gate(vector as u64, handler);
    }
    // SAFETY: both are read-only addresses defined in this file's assembly.
    let (timer, spurious) = unsafe { (*addr_of!(isr_timer_addr), *addr_of!(isr_spurious_addr)) };
    set_gate(u64::from(abi::TIMER_VECTOR), timer);
    set_gate(u64::from(abi::SPURIOUS_VECTOR), spurious);
    // SAFETY: the VMM wrote the boot parameters before starting any vCPU;
    // the page is mapped readable.
    let count = unsafe { core::ptr::read_volatile(abi::BOOT_PARAMS_GPA as *const abi::BootParams) }
        .lapic_timer_count;
    if count != 0 {
        start_timer(count);
    }

    let stack_top = abi::KERNEL_STACKS_GPA + (cpu + 1) * abi::KERNEL_STACK_SIZE;
    // RSP0 sits at offset 4 of the TSS, so it is written as two halves.
    let rsp0 = (abi::TSS_GPA + cpu * abi::TSS_STRIDE + abi::TSS_RSP0_OFFSET) as *mut u32;
    // SAFETY: this vCPU's TSS lies in the TSS page of the memory map, mapped
    // writable at CPL0, and only this vCPU writes it.
    unsafe { write_volatile(rsp0, stack_top as u32) };
    // SAFETY: as above, upper half of RSP0.
    unsafe { write_volatile(rsp0.add(1), (stack_top >> 32) as u32) };

    // ABI: at a function's entry `rsp + 8` is 16-byte aligned.
    let user_stack = abi::USER_STACKS_GPA + (cpu + 1) * abi::USER_STACK_SIZE - 8;
    let entry = crate::user::user_main as extern "C" fn(u64) -> ! as usize as u64;
    // SAFETY: builds an interrupt frame for CPL3 (user code and stack
    // segments from the VMM's GDT, a mapped user stack, IF set) and leaves
    // CPL0 for good; `rdi` carries the vCPU index to `user_main`.
    unsafe {
        asm!(
            "push {ss}",
            "push {rsp3}",
            "push {rflags}",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) u64::from(gdt::USER_DS),
            rsp3 = in(reg) user_stack,
            rflags = in(reg) 0x202_u64,
            cs = in(reg) u64::from(gdt::USER_CS),
            rip = in(reg) entry,
            in("rdi") cpu,
            options(noreturn),
        )
    }
}

/// Which vCPU this is, from the task register the VMM loaded.
fn current_cpu() -> u64 {
    let tr: u16;
    // SAFETY: `str` only reads the task register.
    unsafe { asm!("str {0:x}", out(reg) tr, options(nomem, nostack, preserves_flags)) };
    u64::from(tr.wrapping_sub(gdt::TSS_BASE) / 16)
}

/// A fixed buffer the exception line is formatted into, by hand (no
/// `core::fmt`: every instruction here is emulated).
struct Text<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Text<'_> {
    fn str(&mut self, s: &str) {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn hex(&mut self, v: u64) {
        self.str("0x");
        let digits = if v == 0 {
            1
        } else {
            (67 - v.leading_zeros() as usize) / 4
        };
        for i in (0..digits).rev() {
            let d = ((v >> (i * 4)) & 0xf) as u8;
            let c = if d < 10 { b'0' + d } else { b'a' + d - 10 };
            self.str(core::str::from_utf8(&[c]).unwrap_or("?"));
        }
    }

    fn dec(&mut self, v: u64) {
        let mut tmp = [0u8; 20];
        let mut n = v;
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.str(core::str::from_utf8(&tmp[i..]).unwrap_or("?"));
    }
}

/// Common exception handler: record, report, stop.
///
/// `frame` points at `[vector, error_code, rip, cs, rflags, rsp, ss]`.
extern "C" fn exception_handler(frame: *const [u64; 7]) -> ! {
    // SAFETY: `isr_common` passes the stack address of the frame the CPU and
    // the stub pushed; it stays valid because this function never returns.
    let f = unsafe { *frame };
    let cr2: u64;
    // SAFETY: reading CR2 at CPL0 has no side effect.
    unsafe { asm!("mov {0}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    let cpu = current_cpu();
    let report = ExceptionReport {
        vector: f[0],
        error_code: f[1],
        rip: f[2],
        cs: f[3],
        rflags: f[4],
        rsp: f[5],
        ss: f[6],
        cr2,
        cpu,
    };
    let report_gpa = abi::EXCEPTION_REPORT_GPA
        + cpu.min(u64::from(abi::MAX_VCPUS) - 1) * abi::EXCEPTION_REPORT_STRIDE;
    // SAFETY: this vCPU's report slot lies in the report area of the memory
    // map, mapped writable at CPL0; only this vCPU writes it.
    unsafe { write_volatile(report_gpa as *mut ExceptionReport, report) };

    let text_gpa = report_gpa + 0x60;
    // SAFETY: the 160 bytes after the report are this vCPU's text line, in
    // the same slot; nothing else refers to them.
    let buf = unsafe { core::slice::from_raw_parts_mut(text_gpa as *mut u8, 0xa0) };
    let mut t = Text { buf, len: 0 };
    t.str("exception ");
    t.str(abi::exception_name(report.vector));
    t.str(" vector=");
    t.dec(report.vector);
    t.str(" error=");
    t.hex(report.error_code);
    t.str(" rip=");
    t.hex(report.rip);
    t.str(" cpl=");
    t.dec(report.cs & 3);
    t.str(" cr2=");
    t.hex(report.cr2);
    t.str(" cpu=");
    t.dec(cpu);
    let len = t.len as u64;

    mmio_write(abi::CONSOLE_LINE, text_gpa | len << abi::CONSOLE_LEN_SHIFT);
    mmio_write(abi::SYS_EXCEPTION, report_gpa);
    halt_forever()
}

/// One 8-byte MMIO write, as a single `mov` the emulator decodes.
fn mmio_write(addr: u64, value: u64) {
    // SAFETY: `addr` is in the MMIO window, mapped in the page tables with no
    // memory behind it: the write exits to the VMM. The asm is a memory
    // clobber, so the data the value refers to is written before.
    unsafe {
        asm!("mov qword ptr [{0}], {1}", in(reg) addr, in(reg) value, options(nostack, preserves_flags))
    };
}

/// Stops this vCPU for good (the VMM normally stops it first).
fn halt_forever() -> ! {
    loop {
        // SAFETY: `cli; hlt` at CPL0 parks the vCPU; nothing else is touched.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // A panic at CPL3 ends up here too; the user half reports it before
    // panicking when it can. Report as exit status 101, like std.
    mmio_write(abi::SYS_EXIT, 101);
    loop {
        core::hint::spin_loop();
    }
}
