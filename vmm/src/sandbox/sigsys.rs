//! Reports a forbidden system call: with `--seccomp on` a call outside a thread's allow-list
//! raises `SIGSYS` in that thread (`SECCOMP_RET_TRAP`), and this handler writes one line,
//! `skiff: seccomp: thread kind '<kind>' made forbidden system call <nr> with arguments <a0>, <a1>,
//! <a2>, ... (exit code 159; ...)`, and ends the process with exit code 159 (128 + SIGSYS, as if the kernel had killed it).
//!
//! Trapping rather than `SECCOMP_RET_KILL_PROCESS` costs nothing more and names the call and the
//! thread, which the kernel's kill does not (its audit record needs root to read). The handler
//! only calls `write` and `exit_group`, which every allow-list has.

use std::cell::Cell;

use super::ThreadKind;

/// Exit code after a forbidden system call.
pub const EXIT_CODE: i32 = 128 + libc::SIGSYS;

thread_local! {
    /// The calling thread's kind, for the report (a const initialiser: reading it in the
    /// handler allocates nothing).
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Records the calling thread's kind for the report.
pub(super) fn set_thread_kind(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
}

/// The `SIGSYS` part of `siginfo_t` on Linux (`_sigsys` in the kernel's union): the syscall
/// number sits after the three ints and the padding, and the faulting address.
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

/// `SIGSYS` code for a seccomp trap.
const SYS_SECCOMP: i32 = 1;

/// Appends `text` to `buf` at `*len`, as far as it fits.
fn push(buf: &mut [u8], len: &mut usize, text: &[u8]) {
    for &b in text {
        if *len < buf.len() {
            buf[*len] = b;
            *len += 1;
        }
    }
}

/// Appends `n` in hexadecimal (`0x...`).
fn push_hex(buf: &mut [u8], len: &mut usize, n: u64) {
    push(buf, len, b"0x");
    let mut started = false;
    for shift in (0..16).rev() {
        let digit = ((n >> (shift * 4)) & 0xf) as usize;
        if digit != 0 || started || shift == 0 {
            started = true;
            push(buf, len, &[b"0123456789abcdef"[digit]]);
        }
    }
}

/// Appends `n` in decimal.
fn push_number(buf: &mut [u8], len: &mut usize, n: i64) {
    if n < 0 {
        push(buf, len, b"-");
    }
    let mut digits = [0u8; 20];
    let mut v = n.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    push(buf, len, &digits[i..]);
}

/// The report line for `syscall` made by a thread of `kind` with its first three arguments
/// `args` (when known); returns its length in `buf`.
fn format_report(
    buf: &mut [u8],
    kind: Option<ThreadKind>,
    syscall: i64,
    args: Option<[u64; 3]>,
) -> usize {
    let mut len = 0;
    push(buf, &mut len, b"skiff: seccomp: thread kind '");
    push(
        buf,
        &mut len,
        kind.map_or("unknown", ThreadKind::name).as_bytes(),
    );
    push(buf, &mut len, b"' made forbidden system call ");
    push_number(buf, &mut len, syscall);
    if let Some(args) = args {
        push(buf, &mut len, b" with arguments ");
        for (i, arg) in args.into_iter().enumerate() {
            if i > 0 {
                push(buf, &mut len, b", ");
            }
            push_hex(buf, &mut len, arg);
        }
        push(buf, &mut len, b", ...");
    }
    push(buf, &mut len, b" (exit code ");
    push_number(buf, &mut len, i64::from(EXIT_CODE));
    push(buf, &mut len, b"; see docs/sandbox.md)\n");
    len
}

/// The first three system call arguments from the interrupted thread's registers.
#[cfg(target_arch = "x86_64")]
fn call_args(context: *mut libc::c_void) -> Option<[u64; 3]> {
    if context.is_null() {
        return None;
    }
    // SAFETY: with SA_SIGINFO the third handler argument is the thread's ucontext_t.
    let regs = unsafe { &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let reg = |r: libc::c_int| regs[r as usize] as u64;
    Some([reg(libc::REG_RDI), reg(libc::REG_RSI), reg(libc::REG_RDX)])
}

#[cfg(not(target_arch = "x86_64"))]
fn call_args(_: *mut libc::c_void) -> Option<[u64; 3]> {
    None
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t, whose SIGSYS layout `SigsysInfo` mirrors.
    let info = unsafe { &*info.cast::<SigsysInfo>() };
    let syscall = if info.code == SYS_SECCOMP {
        i64::from(info.syscall)
    } else {
        -1
    };
    let kind = KIND.try_with(Cell::get).ok().flatten();
    let mut buf = [0u8; 200];
    let len = format_report(&mut buf, kind, syscall, call_args(context));
    // SAFETY: writes our stack buffer to stderr, then leaves without running anything else
    // (both calls are async-signal-safe and on every allow-list).
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_CODE);
    }
}

/// Installs the process-wide `SIGSYS` handler.
pub(super) fn install() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler only makes async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_the_thread_and_the_call() {
        let mut buf = [0u8; 200];
        let len = format_report(
            &mut buf,
            Some(ThreadKind::Disk),
            135,
            Some([0xffff_ffff, 0, 16]),
        );
        let line = std::str::from_utf8(&buf[..len]).unwrap();
        assert_eq!(
            line,
            "skiff: seccomp: thread kind 'disk' made forbidden system call 135 with arguments \
             0xffffffff, 0x0, 0x10, ... (exit code 159; see docs/sandbox.md)\n"
        );
        let len = format_report(&mut buf, None, -1, None);
        assert!(std::str::from_utf8(&buf[..len])
            .unwrap()
            .starts_with("skiff: seccomp: thread kind 'unknown' made forbidden system call -1 "));
    }

    #[test]
    fn a_short_buffer_truncates_instead_of_overflowing() {
        let mut buf = [0u8; 10];
        assert_eq!(format_report(&mut buf, Some(ThreadKind::Vcpu), 1, None), 10);
    }
}
