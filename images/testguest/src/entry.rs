//! Boot assembly: the Xen PVH ELF note, the 32-bit PVH entry, the switch to long mode (BSP and
//! APs), and the drop of the BSP to CPL3. It also owns the boot stacks and the iretq frame.
//!
//! Everything here runs in CPL0, which on the target machines is emulated at about 1 us per
//! instruction, so the BSP runs about 25 instructions before it is in CPL3. Everything they need
//! is initialised data, complete at link time: the page tables (`paging.rs`), the GDT and TSS
//! (`cpu.rs`), and the pseudo-descriptors and iretq frame below. The BSP's CPL0 code only loads
//! them, stores the boot values that can only be read in CPL0 (start_info address, CPUID), and
//! switches modes. The AP's 16-bit trampoline lives in `smp.rs`.
use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::sync::atomic::AtomicU32;

use crate::{cpu, paging, smp};

/// Size of the BSP's CPL0 stack (TSS.RSP0): used only by the exception handler.
pub const KERNEL_STACK_SIZE: usize = 16 * 1024;
/// Size of the BSP's CPL3 stack, on which all scenarios run.
const USER_STACK_SIZE: usize = 64 * 1024;
/// Each AP gets a 4 KiB CPL0 stack, indexed by APIC ID.
const AP_STACK_SHIFT: u32 = 12;
const AP_STACKS_SIZE: usize = (smp::MAX_APIC_ID as usize + 1) << AP_STACK_SHIFT;

/// A stack in BSS. Only ever used through the stack pointer set in the assembly below.
#[repr(C, align(4096))]
pub struct Stack<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: Rust code never reads or writes a stack's contents; each stack is used by exactly one
// CPU as its stack pointer region (the APs' stacks are disjoint slices indexed by APIC ID).
unsafe impl<const N: usize> Sync for Stack<N> {}

/// The BSP's CPL0 stack: TSS.RSP0 points at its end (see `cpu.rs`).
pub static KERNEL_STACK: Stack<KERNEL_STACK_SIZE> = Stack(UnsafeCell::new([0; KERNEL_STACK_SIZE]));
static USER_STACK: Stack<USER_STACK_SIZE> = Stack(UnsafeCell::new([0; USER_STACK_SIZE]));
static AP_STACKS: Stack<AP_STACKS_SIZE> = Stack(UnsafeCell::new([0; AP_STACKS_SIZE]));

/// The `hvm_start_info` address from `ebx`, stored by the BSP's entry code for `rust_main`. In
/// `.data.tg_hot` (see linker.ld).
#[link_section = ".data.tg_hot"]
static START_INFO: AtomicU32 = AtomicU32::new(0);

global_asm!(
    r#"
    /* XEN_ELFNOTE_PHYS32_ENTRY (18): the 32-bit physical entry point. An 8-byte descriptor with
     * a zero upper half reads the same whether a loader takes 4 or 8 bytes. */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4
    .popsection

    /* Pseudo-descriptors for lgdt/lidt. In 32-bit mode lgdt reads the limit and the low 4 bytes
     * of the base, which is all there is: the image sits below 4 GiB. */
    .pushsection .data.tg_boot, "aw"
    .balign 16
boot_gdt_desc:
    .word {gdt_limit}
    .quad tg_gdt
    .balign 16
boot_idt_desc:
    .word {idt_limit}
    .quad {idt}
boot_tss_sel:
    .word {tss_sel}
    /* The BSP's way into CPL3: iretq pops RIP, CS, RFLAGS (IOPL=3, see cpu.rs; IF=0), RSP, SS. */
    .balign 8
boot_iret_frame:
    .quad user_entry
    .quad {user_cs}
    .quad 0x3002
    .quad {ustack} + {ustack_size}
    .quad {user_ss}
    .popsection

    /* Loads CR4 (PAE only: clears TSD, SMEP, SMAP, whatever was left), CR3, EFER (LME only) and
     * CR0 (PG | NE | ET | PE: also clears CD/NW, which INIT leaves set on APs), then far-jumps
     * to 64-bit code at `target`. Clobbers eax, ecx, edx. */
    .macro tg_enter_long_mode target
    movl $0x20, %eax
    movl %eax, %cr4
    movl ${pml4}, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    movl $0x100, %eax
    xorl %edx, %edx
    wrmsr
    movl $0x80000031, %eax
    movl %eax, %cr0
    ljmp ${kernel_cs64}, $\target
    .endm

    .pushsection .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    /* PVH ABI: protected mode, paging off, IF=0, flat CS/DS/ES/SS, ebx = start_info, no stack.
     * The BSP never reloads DS/ES/SS: their flat cached descriptors serve until the far jump,
     * 64-bit mode ignores their bases, and iretq loads SS for CPL3. DF is cleared by iretq. */
    lgdt boot_gdt_desc
    movl %ebx, {start_info}
    /* CPUID is read here, in CPL0, where it traps to the VMM: under PVM a CPL3 CPUID can run
     * natively and return the host's values. paging.rs decodes the raw values in CPL3. A leaf
     * above the maximum returns harmless data that paging.rs ignores. */
    movl $0x80000000, %eax
    cpuid
    movl %eax, {cpuid_max}
    movl $0x80000001, %eax
    cpuid
    movl %edx, {cpuid_ext1_edx}
    movl $0x80000008, %eax
    cpuid
    movl %eax, {cpuid_ext8_eax}
    tg_enter_long_mode bsp_long_mode64

    /* The AP trampoline (smp.rs) far-jumps here in 32-bit protected mode with our GDT loaded. */
    .global ap_entry32
ap_entry32:
    movw ${kernel_ds}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    tg_enter_long_mode ap_long_mode64

    .code64
bsp_long_mode64:
    lidt boot_idt_desc(%rip)
    ltr boot_tss_sel(%rip)
    leaq boot_iret_frame(%rip), %rsp
    iretq

user_entry:
    /* CPL3 from here on. The call leaves the stack aligned as the ABI expects. */
    movl {start_info}(%rip), %edi
    call {rust_main}
    ud2

ap_long_mode64:
    movw ${kernel_ds}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    lidt boot_idt_desc(%rip)
    /* AP: stack indexed by the APIC ID from CPUID leaf 1 EBX[31:24]; stays in CPL0. */
    movl $1, %eax
    cpuid
    shrl $24, %ebx
    cmpl ${max_apic_id}, %ebx
    ja 6f
    movl %ebx, %eax
    incl %eax
    shll ${ap_stack_shift}, %eax
    leaq {ap_stacks}(%rip), %rsp
    addq %rax, %rsp
    movl %ebx, %edi
    call {ap_main}
6:
    cli
    hlt
    jmp 6b
    .popsection
"#,
    gdt_limit = const cpu::GDT_LIMIT,
    idt = sym cpu::IDT,
    idt_limit = const cpu::IDT_LIMIT,
    kernel_cs64 = const cpu::KERNEL_CS64,
    kernel_ds = const cpu::KERNEL_DS,
    user_cs = const cpu::USER_CS,
    user_ss = const cpu::USER_DS,
    tss_sel = const cpu::TSS_SEL,
    pml4 = sym paging::PML4,
    start_info = sym START_INFO,
    cpuid_max = sym paging::CPUID_MAX_EXT,
    cpuid_ext1_edx = sym paging::CPUID_EXT1_EDX,
    cpuid_ext8_eax = sym paging::CPUID_EXT8_EAX,
    ustack = sym USER_STACK,
    ustack_size = const USER_STACK_SIZE,
    ap_stacks = sym AP_STACKS,
    ap_stack_shift = const AP_STACK_SHIFT,
    max_apic_id = const smp::MAX_APIC_ID,
    rust_main = sym crate::rust_main,
    ap_main = sym smp::ap_main,
    options(att_syntax)
);
