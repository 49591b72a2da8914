//! The process exit codes skiff documents, and the one-line report for each way a guest ends.
//!
//! | code | meaning |
//! |---|---|
//! | 0..=255 | the guest wrote this byte to the debug-exit port 0xf4 |
//! | 0 | the guest powered off, or the control API stopped it |
//! | 1 | skiff could not start or run the VM (the message says why) |
//! | 2 | invalid command line |
//! | 120 | the guest asked for a reset or reboot |
//! | 121 | a vCPU triple-faulted |
//! | 122 | the hypervisor could not run a vCPU (KVM internal error, e.g. emulation failure) |
//! | 124 | `--timeout` expired |
//! | 128+N | skiff was stopped by signal N (130 for SIGINT, 143 for SIGTERM) |
//!
//! `skiff exec` exits with the command's own code (128+N when a signal N killed it), 124 when
//! the command's `--timeout` expired, and these codes for its own failures:
//!
//! | code | meaning |
//! |---|---|
//! | 200 | skiff could not set up or start the VM (missing kernel, bad option, initramfs) |
//! | 201 | the guest never came up: no agent connected within `--boot-timeout`, or the VM ended first |
//! | 202 | this host's KVM cannot run Linux user space (PVM): the kernel reached `Run /init`, no agent |
//! | 203 | the agent was lost while the command ran (connection closed, VM ended) |
//! | 204 | the guest broke the agent protocol (garbage on the connection) |
//! | 205 | virtiofsd is missing, could not start, or died |
//! | 206 | the agent could not set the command up (e.g. its working directory is missing) |
//!
//! A command that does not exist in the guest gives 127, and one that cannot be executed 126,
//! as a shell does.

use devices::vm_exit::GuestEnd;

/// skiff failed (bad input, set-up or run-time error).
pub const VMM_ERROR: u8 = 1;
/// Command-line usage error.
pub const USAGE: u8 = 2;
/// Guest reset or reboot.
pub const GUEST_RESET: u8 = 120;
/// Triple fault.
pub const TRIPLE_FAULT: u8 = 121;
/// Hypervisor internal error.
pub const INTERNAL_ERROR: u8 = 122;
/// Timeout.
pub const TIMEOUT: u8 = 124;
/// `skiff exec`: set-up or VM start failed.
pub const EXEC_SETUP: u8 = 200;
/// `skiff exec`: the guest never came up (no agent).
pub const EXEC_NO_AGENT: u8 = 201;
/// `skiff exec`: the host's KVM cannot run Linux user space (PVM).
pub const EXEC_PVM_HOST: u8 = 202;
/// `skiff exec`: the agent was lost mid-command.
pub const EXEC_AGENT_LOST: u8 = 203;
/// `skiff exec`: the guest sent something that is not the agent protocol.
pub const EXEC_GARBAGE: u8 = 204;
/// `skiff exec`: virtiofsd missing, failed to start, or died.
pub const EXEC_VIRTIOFSD: u8 = 205;
/// `skiff exec`: the agent could not set the command up.
pub const EXEC_NOT_STARTED: u8 = 206;

/// The exit code for `end`, and the line to print on stderr (none for a guest's own clean exit).
pub fn report(end: GuestEnd) -> (u8, Option<String>) {
    match end {
        GuestEnd::DebugExit(v) => (v, None),
        GuestEnd::PowerOff => (0, None),
        GuestEnd::Reset => (
            GUEST_RESET,
            Some(format!("guest requested a reset (exit code {GUEST_RESET})")),
        ),
        GuestEnd::TripleFault { vcpu } => (
            TRIPLE_FAULT,
            Some(format!("vCPU {vcpu} triple-faulted (exit code {TRIPLE_FAULT})")),
        ),
        GuestEnd::InternalError { vcpu, suberror } => (
            INTERNAL_ERROR,
            Some(format!(
                "vCPU {vcpu} hit a hypervisor internal error, suberror {suberror} (exit code {INTERNAL_ERROR})"
            )),
        ),
        GuestEnd::Timeout => (
            TIMEOUT,
            Some(format!("timeout expired, guest stopped (exit code {TIMEOUT})")),
        ),
        GuestEnd::VmmError => (VMM_ERROR, Some("the VMM failed while running the guest".into())),
        GuestEnd::Stopped => (0, Some("stopped through the control API (exit code 0)".into())),
        GuestEnd::HostSignal(sig) => {
            let code = 128u8.saturating_add(u8::try_from(sig).unwrap_or(127));
            (code, Some(format!("stopped by signal {sig} (exit code {code})")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_documented() {
        assert_eq!(report(GuestEnd::DebugExit(42)), (42, None));
        assert_eq!(report(GuestEnd::PowerOff).0, 0);
        assert_eq!(report(GuestEnd::Reset).0, GUEST_RESET);
        assert_eq!(report(GuestEnd::TripleFault { vcpu: 1 }).0, TRIPLE_FAULT);
        assert_eq!(
            report(GuestEnd::InternalError {
                vcpu: 0,
                suberror: 1
            })
            .0,
            INTERNAL_ERROR
        );
        assert_eq!(report(GuestEnd::Timeout).0, TIMEOUT);
        assert_eq!(report(GuestEnd::HostSignal(libc::SIGINT)).0, 130);
        assert_eq!(report(GuestEnd::HostSignal(libc::SIGTERM)).0, 143);
        assert!(report(GuestEnd::Reset).1.unwrap().contains("reset"));
    }
}
