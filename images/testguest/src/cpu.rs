//! Descriptor tables and the CPL0 side of the guest: the GDT (kernel and user segments, TSS), the
//! TSS, the IDT with its exception stubs, the exception report, and halting.
//!
//! The IDT is loaded (lidt) by the CPL0 entry code while still empty and filled afterwards from
//! CPL3 (`fill_idt`): all memory is mapped user-writable, and the CPU reads gates only when an
//! exception is delivered. Exceptions are fatal: the handler prints a FAIL line and exits 33.
//!
//! Halting from CPL3 (needed when there is no exit port): `hlt` at the label `user_halt` raises
//! #GP, and the handler, seeing that address, parks the CPU in CPL0. Enabling interrupts from
//! CPL3 (`enable_interrupts`) works the same way: `hlt` at `user_enable_interrupts` raises #GP,
//! and the stub sets IF in the interrupted frame and returns past the `hlt`. Software interrupts
//! are no use here: under PVM `int n` from CPL3 raises #UD, and `int` in CPL0 is an emulation
//! failure. Interrupt vectors (32 and up) are filled by their users through `set_gate`.
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::{entry, io, scenario, serial};

pub const KERNEL_CS64: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const KERNEL_CS32: u16 = 0x18;
pub const USER_DS: u16 = 0x20 | 3;
pub const USER_CS: u16 = 0x28 | 3;
pub const TSS_SEL: u16 = 0x30;

const GDT_ENTRIES: usize = 8;
pub const GDT_LIMIT: u16 = (GDT_ENTRIES * 8 - 1) as u16;
const KERNEL_CODE64: u64 = 0x00af_9b00_0000_ffff;
const KERNEL_DATA: u64 = 0x00cf_9300_0000_ffff;
const KERNEL_CODE32: u64 = 0x00cf_9b00_0000_ffff;
const USER_DATA: u64 = 0x00cf_f300_0000_ffff;
const USER_CODE64: u64 = 0x00af_fb00_0000_ffff;

/// Offset of the I/O permission bitmap in the TSS (right after the 104-byte hardware TSS).
const TSS_IOPB_OFFSET: usize = 104;
/// Bitmap bytes: one bit per port for all 65536 ports, all clear (allowed).
const IOPB_BYTES: usize = 65536 / 8;
/// The bitmap is followed by one 0xff byte (the CPU may read a byte past it).
const TSS_LEN: usize = TSS_IOPB_OFFSET + IOPB_BYTES + 1;
/// Offset of RSP0 in the TSS.
const TSS_RSP0: usize = 4;
/// Type byte of an available 64-bit TSS descriptor (present, DPL0, type 9).
const TSS_AVAILABLE: u32 = 0x89;

// The GDT and the TSS are initialised data, complete at link time, so the CPL0 entry code only
// runs lgdt and ltr.
//
// The GDT lives in writable memory because `ltr` sets the TSS descriptor's busy bit. In the TSS
// descriptor, bytes 2..=4 hold base bits 23:0 and byte 5 the type, so one 32-bit field holds
// both: `tg_tss + (0x89 << 24)`. That needs the TSS below 16 MiB, which linker.ld asserts; base
// bits 63:24 are then zero.
//
// The TSS carries RSP0 (the BSP's CPL0 stack, used by the exception handler) and an I/O
// permission bitmap that allows every port. CPL3 code may use `in` and `out` both through
// RFLAGS.IOPL=3 and through this bitmap: the PVM-backed KVM on the target machines ignores the
// guest's IOPL but honours the bitmap. Rust code never accesses either table.
global_asm!(
    r#"
    .pushsection .data.tg_gdt, "aw"
    .balign 16
    .global tg_gdt
tg_gdt:
    .quad 0
    .quad {kernel_code64}   /* 0x08 kernel code, 64-bit */
    .quad {kernel_data}     /* 0x10 kernel data */
    .quad {kernel_code32}   /* 0x18 kernel code, 32-bit (entry and AP trampoline) */
    .quad {user_data}       /* 0x20 user data (DPL3) */
    .quad {user_code64}     /* 0x28 user code, 64-bit (DPL3) */
    .word {tss_len} - 1     /* 0x30 TSS (available): limit 15:0 */
    .long tg_tss + ({tss_type} << 24) /* base 23:0, type */
    .byte 0, 0              /* limit 19:16 and flags, base 31:24 */
    .long 0, 0              /* base 63:32, reserved */
    .popsection

    .pushsection .data.tg_tss, "aw"
    .balign 16
    .global tg_tss
tg_tss:
    .long 0
    .quad {kstack} + {kstack_size} /* RSP0 */
    .skip {iopb} - 2 - ({rsp0} + 8)
    .word {iopb}            /* I/O map base */
    .skip {iopb_bytes}      /* the bitmap: every port allowed */
    .byte 0xff
    .popsection
"#,
    kernel_code64 = const KERNEL_CODE64,
    kernel_data = const KERNEL_DATA,
    kernel_code32 = const KERNEL_CODE32,
    user_data = const USER_DATA,
    user_code64 = const USER_CODE64,
    tss_len = const TSS_LEN,
    tss_type = const TSS_AVAILABLE,
    rsp0 = const TSS_RSP0,
    iopb = const TSS_IOPB_OFFSET,
    iopb_bytes = const IOPB_BYTES,
    kstack = sym entry::KERNEL_STACK,
    kstack_size = const entry::KERNEL_STACK_SIZE,
    options(att_syntax)
);

const EXCEPTIONS: usize = 32;
/// The IDT covers the exception vectors and 16 interrupt vectors (32..47: the timer's, see
/// `timer.rs`). An interrupt on an empty or higher vector raises #NP or #GP, which is reported.
const IDT_ENTRIES: usize = EXCEPTIONS + 16;
pub const IDT_LIMIT: u16 = (IDT_ENTRIES * 16 - 1) as u16;
const GP_VECTOR: u64 = 13;
/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// Stride of the exception stubs in the assembly below.
const STUB_STRIDE: u64 = 16;

/// The IDT: 16-byte gates, two u64 each.
#[repr(C, align(16))]
pub struct Idt(UnsafeCell<[u64; IDT_ENTRIES * 2]>);

// SAFETY: written once by the BSP in `fill_idt` before any other CPU runs; afterwards only the
// CPUs read it.
unsafe impl Sync for Idt {}

/// In `.data.tg_hot` with the other statics the boot touches (see linker.ld).
#[link_section = ".data.tg_hot"]
pub static IDT: Idt = Idt(UnsafeCell::new([0; IDT_ENTRIES * 2]));

extern "C" {
    static exception_stubs: u8;
    /// `hlt` in CPL3: faults with #GP, which `exception_report` turns into a park.
    fn user_halt() -> !;
    /// `hlt; ret` in CPL3: the #GP from the `hlt` returns with IF set (see `exception_common`).
    /// A call, so the caller keeps nothing in the registers the stub does not preserve.
    fn user_enable_interrupts();
}

/// A present 64-bit interrupt gate (DPL0, no IST) to `handler` in the kernel code segment.
fn gate(handler: u64) -> (u64, u64) {
    const PRESENT_INTERRUPT_GATE: u64 = 0x8e;
    let low = (handler & 0xffff)
        | (u64::from(KERNEL_CS64) << 16)
        | (PRESENT_INTERRUPT_GATE << 40)
        | (((handler >> 16) & 0xffff) << 48);
    (low, handler >> 32)
}

/// Points IDT vector `vector` at `handler` (an interrupt gate, so IF is clear inside it).
/// Vectors beyond the IDT are ignored: there is no such gate to fill.
pub fn set_gate(vector: usize, handler: u64) {
    if vector >= IDT_ENTRIES {
        return;
    }
    let (low, high) = gate(handler);
    let idt = IDT.0.get().cast::<u64>();
    // SAFETY: vector < IDT_ENTRIES, so both words are inside the IDT; the gates are written by
    // the BSP while no interrupt source uses this vector yet, and no Rust reference to the IDT
    // exists.
    unsafe {
        idt.add(vector * 2).write_volatile(low);
        idt.add(vector * 2 + 1).write_volatile(high);
    }
}

/// Fills the IDT: vectors 0..31 report the exception. Runs in CPL3 on the BSP before anything
/// else.
pub fn fill_idt() {
    let stubs = core::ptr::addr_of!(exception_stubs) as u64;
    for vector in 0..EXCEPTIONS {
        set_gate(vector, stubs + vector as u64 * STUB_STRIDE);
    }
}

/// Sets RFLAGS.IF for the calling CPL3 code, through the #GP trap at `user_enable_interrupts`
/// (CPL3 cannot use `sti` under PVM). Interrupts are then delivered to the IDT's gates.
pub fn enable_interrupts() {
    // SAFETY: the label's `hlt` faults into `exception_common`, which sets IF and returns to
    // the `ret` after it; the call clobbers only what a call may.
    unsafe { user_enable_interrupts() }
}

global_asm!(
    r#"
    .macro tg_stub_noerr v
    .balign 16
    pushq $0
    pushq $\v
    jmp exception_common
    .endm
    .macro tg_stub_err v
    .balign 16
    pushq $\v
    jmp exception_common
    .endm

    .pushsection .text.exceptions, "ax"
    .balign 16
    .global exception_stubs
exception_stubs:
    tg_stub_noerr 0
    tg_stub_noerr 1
    tg_stub_noerr 2
    tg_stub_noerr 3
    tg_stub_noerr 4
    tg_stub_noerr 5
    tg_stub_noerr 6
    tg_stub_noerr 7
    tg_stub_err 8
    tg_stub_noerr 9
    tg_stub_err 10
    tg_stub_err 11
    tg_stub_err 12
    tg_stub_err 13
    tg_stub_err 14
    tg_stub_noerr 15
    tg_stub_noerr 16
    tg_stub_err 17
    tg_stub_noerr 18
    tg_stub_noerr 19
    tg_stub_noerr 20
    tg_stub_err 21
    tg_stub_noerr 22
    tg_stub_noerr 23
    tg_stub_noerr 24
    tg_stub_noerr 25
    tg_stub_noerr 26
    tg_stub_noerr 27
    tg_stub_noerr 28
    tg_stub_err 29
    tg_stub_err 30
    tg_stub_noerr 31

exception_common:
    /* rsp -> [vector, error, rip, cs, rflags, rsp, ss]. The one exception that returns: #GP
     * from CPL3 at the `hlt` of user_enable_interrupts sets IF in the frame and resumes after
     * the `hlt` (only flags change, which the caller's `call` gives up anyway). */
    cmpq ${gp}, (%rsp)
    jne 1f
    cmpq $user_enable_interrupts, 16(%rsp)
    jne 1f
    testq $3, 24(%rsp)
    jz 1f
    orq ${rflags_if}, 32(%rsp)
    incq 16(%rsp)
    addq $16, %rsp
    iretq
1:
    /* Every other exception is reported; handlers never return. */
    movq %rsp, %rdi
    andq $-16, %rsp
    call {report}
    ud2

    .global user_halt
user_halt:
    hlt
    jmp user_halt

    .global user_enable_interrupts
user_enable_interrupts:
    hlt
    ret
    .popsection
"#,
    report = sym exception_report,
    gp = const GP_VECTOR,
    rflags_if = const RFLAGS_IF,
    options(att_syntax)
);

/// What the exception stubs and the CPU pushed.
#[repr(C)]
struct ExceptionFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
    "#GP", "#PF", "15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "22", "23", "24", "25", "26",
    "27", "28", "#VC", "#SX", "31",
];

static IN_EXCEPTION: AtomicBool = AtomicBool::new(false);

/// Runs in CPL0 (emulated, so kept short): prints
/// `testguest: FAIL <scenario>: exception <n> (<name>) ...` and exits 33.
extern "C" fn exception_report(frame: &ExceptionFrame) -> ! {
    if frame.vector == GP_VECTOR && frame.rip == user_halt as *const () as u64 && frame.cs & 3 == 3
    {
        park();
    }
    if IN_EXCEPTION.swap(true, Ordering::AcqRel) {
        park(); // a fault while reporting a fault (or on two CPUs): stop quietly
    }
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects; this handler runs in CPL0.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    let name = EXCEPTION_NAMES
        .get(frame.vector as usize)
        .copied()
        .unwrap_or("?");
    serial::line_forced()
        .str("testguest: FAIL ")
        .str(scenario::current_name())
        .str(": exception ")
        .dec(frame.vector)
        .str(" (")
        .str(name)
        .str(") rip=")
        .hex(frame.rip)
        .str(" err=")
        .hex(frame.error)
        .str(" cr2=")
        .hex(cr2)
        .str(" cpl=")
        .dec(frame.cs & 3)
        .str(" rsp=")
        .hex(frame.rsp)
        .str(" rflags=")
        .hex(frame.rflags)
        .str(" ss=")
        .hex(frame.ss)
        .str("\n");
    io::exit(scenario::EXIT_FAIL)
}

/// Stops this CPU for good, from CPL0 or CPL3.
pub fn halt_forever() -> ! {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    if cs & 3 == 0 {
        park();
    }
    // SAFETY: `user_halt` is a CPL3-callable label whose `hlt` faults into `exception_report`,
    // which parks the CPU; it never returns.
    unsafe { user_halt() }
}

/// Parks the calling CPU with interrupts off. CPL0 only (the APs and the exception handler).
pub fn park() -> ! {
    loop {
        // SAFETY: the caller runs in CPL0; cli/hlt touch no memory.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
