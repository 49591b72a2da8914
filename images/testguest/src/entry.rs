//! Boot assembly: the Xen PVH ELF note, the 32-bit PVH entry, the switch to long mode (shared by
//! the BSP and the APs), and the drop of the BSP to CPL3. It also owns the boot stacks.
//!
//! Everything here runs in CPL0, which on the target machines is emulated at about 1 us per
//! instruction, so it is kept to a few dozen instructions: the BSP maps only the first GiB
//! (one 1 GiB entry, or 512 2 MiB entries without pdpe1gb) and leaves the rest of the identity
//! map to CPL3 (`paging::extend_identity_map`). The AP's 16-bit trampoline lives in `smp.rs`.
use core::arch::global_asm;
use core::cell::UnsafeCell;

use crate::{cpu, paging, smp};

/// Size of the BSP's CPL0 stack (TSS.RSP0): used only by the exception handler.
const KERNEL_STACK_SIZE: usize = 16 * 1024;
/// Size of the BSP's CPL3 stack, on which all scenarios run.
const USER_STACK_SIZE: usize = 64 * 1024;
/// Each AP gets a 4 KiB CPL0 stack, indexed by APIC ID.
const AP_STACK_SHIFT: u32 = 12;
const AP_STACKS_SIZE: usize = (smp::MAX_APIC_ID as usize + 1) << AP_STACK_SHIFT;

/// A stack in BSS. Only ever used through the stack pointer set in the assembly below.
#[repr(C, align(4096))]
struct Stack<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: Rust code never reads or writes a stack's contents; each stack is used by exactly one
// CPU as its stack pointer region (the APs' stacks are disjoint slices indexed by APIC ID).
unsafe impl<const N: usize> Sync for Stack<N> {}

static KERNEL_STACK: Stack<KERNEL_STACK_SIZE> = Stack(UnsafeCell::new([0; KERNEL_STACK_SIZE]));
static USER_STACK: Stack<USER_STACK_SIZE> = Stack(UnsafeCell::new([0; USER_STACK_SIZE]));
static AP_STACKS: Stack<AP_STACKS_SIZE> = Stack(UnsafeCell::new([0; AP_STACKS_SIZE]));

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
    .pushsection .data.boot_desc, "aw"
    .balign 16
boot_gdt_desc:
    .word {gdt_limit}
    .quad {gdt}
    .balign 16
boot_idt_desc:
    .word {idt_limit}
    .quad {idt}
    .popsection

    .pushsection .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    /* PVH ABI: protected mode, paging off, flat segments, ebx = start_info. No stack. */
    cli
    cld
    movl %ebx, %edi
    lgdt boot_gdt_desc
    ljmp ${kernel_cs32}, $1f
1:
    movw ${kernel_ds}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    /* PML4[0] -> PDPT. Page tables are in BSS, which the loader zero-filled. */
    movl ${pdpt}, %eax
    orl ${table_flags}, %eax
    movl %eax, {pml4}
    /* CPUID is read here, in CPL0, where it traps to the VMM: under PVM a CPL3 CPUID can run
     * natively and return the host's values. Physical address width first (default 36). */
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000008, %eax
    jb 5f
    movl $0x80000008, %eax
    cpuid
    movb %al, {phys_bits}
5:
    /* 1 GiB pages if CPUID 0x80000001 EDX bit 26 (pdpe1gb) is set. */
    movl $0x80000001, %eax
    cpuid
    btl $26, %edx
    jnc 2f
    movl ${leaf_flags}, {pdpt}
    movb $1, {gib_pages}
    jmp 4f
2:
    /* Otherwise PDPT[0] -> PD 0, filled with 512 2 MiB pages. */
    movl ${pds}, %eax
    orl ${table_flags}, %eax
    movl %eax, {pdpt}
    xorl %ecx, %ecx
    movl ${leaf_flags}, %eax
3:
    movl %eax, {pds}(,%ecx,8)
    addl $0x200000, %eax
    incl %ecx
    cmpl $512, %ecx
    jne 3b
4:
    xorl %esi, %esi          /* esi = 0: BSP */
    jmp long_mode32

    /* The AP trampoline (smp.rs) far-jumps here in 32-bit protected mode with our GDT loaded. */
    .global ap_entry32
ap_entry32:
    movw ${kernel_ds}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $1, %esi            /* esi = 1: AP */

long_mode32:
    /* CR4 = PAE only (clears TSD, SMEP, SMAP whatever the loader left). */
    movl $0x20, %eax
    movl %eax, %cr4
    movl ${pml4}, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx   /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    /* CR0 = PG | NE | ET | PE (clears CD/NW left by INIT on APs). */
    movl $0x80000031, %eax
    movl %eax, %cr0
    ljmp ${kernel_cs64}, $long_mode64

    .code64
long_mode64:
    movw ${kernel_ds}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    lidt boot_idt_desc(%rip)
    testl %esi, %esi
    jnz ap_long_mode64

    /* BSP: CPL0 stack, TSS (RSP0, I/O bitmap offset and end marker), TSS descriptor base, then
     * iretq to CPL3. */
    leaq {kstack}+{kstack_size}(%rip), %rsp
    leaq {tss}(%rip), %rax
    movq %rsp, 4(%rax)
    movw ${iopb}, 102(%rax)
    movb $0xff, {tss_len}-1(%rax)
    leaq {gdt}(%rip), %rdx
    movw %ax, {tss_sel}+2(%rdx)
    shrq $16, %rax
    movb %al, {tss_sel}+4(%rdx)
    movb %ah, {tss_sel}+7(%rdx)
    shrq $16, %rax
    movl %eax, {tss_sel}+8(%rdx)
    movw ${tss_sel}, %ax
    ltr %ax
    pushq ${user_ss}
    leaq {ustack}+{ustack_size}(%rip), %rax
    pushq %rax
    pushq $0x3002            /* RFLAGS: IOPL=3 (see cpu::Tss), IF=0 */
    pushq ${user_cs}
    leaq user_entry(%rip), %rax
    pushq %rax
    movl %edi, %edi          /* start_info address, zero-extended */
    iretq

user_entry:
    /* CPL3 from here on. The call leaves the stack aligned as the ABI expects. */
    call {rust_main}
    ud2

ap_long_mode64:
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
    gdt = sym cpu::GDT,
    gdt_limit = const cpu::GDT_LIMIT,
    idt = sym cpu::IDT,
    idt_limit = const cpu::IDT_LIMIT,
    tss = sym cpu::TSS,
    iopb = const cpu::TSS_IOPB_OFFSET,
    tss_len = const cpu::TSS_LEN,
    kernel_cs32 = const cpu::KERNEL_CS32,
    kernel_cs64 = const cpu::KERNEL_CS64,
    kernel_ds = const cpu::KERNEL_DS,
    user_cs = const cpu::USER_CS,
    user_ss = const cpu::USER_DS,
    tss_sel = const cpu::TSS_SEL,
    pml4 = sym paging::PML4,
    pdpt = sym paging::PDPT,
    pds = sym paging::PDS,
    gib_pages = sym paging::GIB_PAGES,
    phys_bits = sym paging::PHYS_ADDR_BITS,
    table_flags = const paging::TABLE_FLAGS,
    leaf_flags = const paging::LEAF_FLAGS,
    kstack = sym KERNEL_STACK,
    kstack_size = const KERNEL_STACK_SIZE,
    ustack = sym USER_STACK,
    ustack_size = const USER_STACK_SIZE,
    ap_stacks = sym AP_STACKS,
    ap_stack_shift = const AP_STACK_SHIFT,
    max_apic_id = const smp::MAX_APIC_ID,
    rust_main = sym crate::rust_main,
    ap_main = sym smp::ap_main,
    options(att_syntax)
);
