//! How skiff ends: the process exit codes it documents, the reason behind each, and the one
//! line on stderr. `ExitStatus` is the whole verdict; `main.rs` prints its line and writes it
//! to `--exit-status-file` (`exit_status_file.rs`).
//!
//! | code | reason | meaning |
//! |---|---|---|
//! | 0..=255 | `guest-exit` | the guest wrote this byte to the debug-exit port 0xf4 |
//! | 0 | `poweroff` | the guest powered off (ACPI) |
//! | 0 | `stopped` | the control API stopped it (`shutdown`, `snapshot --stop`) |
//! | 1 | `error` | skiff could not start or run the VM (the line says why) |
//! | 2 | `usage` | invalid command line |
//! | 120 | `reset` | the guest asked for a reset or reboot |
//! | 121 | `triple-fault` | a vCPU triple-faulted |
//! | 122 | `internal-error` | the hypervisor could not run a vCPU (e.g. emulation failure) |
//! | 123 | | Windows: the Windows Hypervisor Platform is missing or disabled |
//! | 124 | `timeout` | `--timeout` expired |
//! | 128+N | `signal` | skiff was stopped by signal N (130 for SIGINT, 143 for SIGTERM) |
//! | 159 | | a skiff thread made a system call its seccomp filter forbids (128 + SIGSYS; one `skiff: seccomp:` line names it) |
//!
//! The rule that lets a caller tell the guest's verdict from skiff's: the guest's own ends
//! (`guest-exit`, `poweroff`) print no `skiff:` verdict line; every other end prints exactly one,
//! and it is the last line skiff writes. Log lines (`skiff: warn: ...`, `skiff: error: ...`)
//! are not verdicts.
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
//! | 207 | `--snapshot DIR` is not a snapshot `skiff exec` can use (unreadable, no vsock device, no agent listening) |
//! | 208 | the guest's kernel has no driver for a device `skiff exec` needs: no agent connected and it never set up its virtio-vsock device, or the agent connected without it having set up a `--rootfs`/`--share` virtio-fs device |
//!
//! A command that does not exist in the guest gives 127, and one that cannot be executed 126,
//! as a shell does.

use devices::vm_exit::GuestEnd;
use serde::Serialize;

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
/// Windows: the Windows Hypervisor Platform is missing or disabled.
pub const HYPERVISOR_UNAVAILABLE: u8 = 123;
/// Timeout.
pub const TIMEOUT: u8 = 124;
/// A forbidden system call (`--seccomp on`): 128 + SIGSYS.
pub const SECCOMP_VIOLATION: u8 = 159;
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
/// `skiff exec --snapshot`: not a snapshot it can use (unreadable, no vsock, no agent).
pub const EXEC_SNAPSHOT: u8 = 207;
/// `skiff exec`: the guest never drove its virtio-vsock device (no agent came) or a virtio-fs
/// device (the agent came without it).
pub const EXEC_NO_DRIVER: u8 = 208;

/// Why skiff ended, as `--exit-status-file` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitReason {
    /// The guest wrote its exit code to the debug-exit port.
    GuestExit,
    /// The guest powered off.
    Poweroff,
    /// The control API stopped the VM.
    Stopped,
    /// The guest asked for a reset.
    Reset,
    /// A vCPU triple-faulted.
    TripleFault,
    /// The hypervisor could not run a vCPU.
    InternalError,
    /// `--timeout` expired.
    Timeout,
    /// A signal stopped skiff.
    Signal,
    /// skiff failed to start or run the VM.
    Error,
    /// The command line was invalid.
    Usage,
}

impl ExitReason {
    /// Whether the guest decided this end (no verdict line on stderr).
    pub fn is_guest_verdict(self) -> bool {
        matches!(self, Self::GuestExit | Self::Poweroff)
    }
}

/// The complete verdict: exit code, reason and the line for stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitStatus {
    /// Why skiff ended.
    pub reason: ExitReason,
    /// The process exit code.
    pub code: u8,
    /// skiff's verdict line (without `skiff: `); `None` for the guest's own end.
    pub detail: Option<String>,
    /// The signal that stopped skiff (`reason: signal` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Guest output bytes that never reached their sink (stdout, `--serial file=`).
    pub guest_output_dropped_bytes: u64,
    /// Why guest output was dropped, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_output_note: Option<String>,
}

impl ExitStatus {
    /// The verdict for a run that ended with `end`. `detail`, when a vCPU gave one, replaces
    /// the standard line; `dropped_bytes` of guest output were lost, as `output_note` says.
    pub fn from_end(
        end: GuestEnd,
        detail: Option<String>,
        dropped_bytes: u64,
        output_note: Option<String>,
    ) -> Self {
        let (reason, code, line) = describe(end);
        let signal = match end {
            GuestEnd::HostSignal(sig) => Some(sig),
            _ => None,
        };
        let detail = if reason.is_guest_verdict() {
            None
        } else {
            Some(detail.unwrap_or(line))
        };
        Self {
            reason,
            code,
            detail,
            signal,
            guest_output_dropped_bytes: dropped_bytes,
            guest_output_note: output_note,
        }
    }

    /// skiff could not start or run the VM: `message` says why.
    pub fn error(message: String) -> Self {
        Self::skiff(ExitReason::Error, VMM_ERROR, message)
    }

    /// The command line was invalid: `message` says how.
    pub fn usage(message: String) -> Self {
        Self::skiff(ExitReason::Usage, USAGE, message)
    }

    fn skiff(reason: ExitReason, code: u8, message: String) -> Self {
        Self {
            reason,
            code,
            detail: Some(message),
            signal: None,
            guest_output_dropped_bytes: 0,
            guest_output_note: None,
        }
    }

    /// The line to print on stderr after `skiff: `, if any: the verdict (with the dropped
    /// output appended) for skiff's ends; for the guest's own end a warning, and only when
    /// output was dropped.
    pub fn stderr_line(&self) -> Option<String> {
        match (&self.detail, &self.guest_output_note) {
            (Some(line), Some(note)) => Some(format!("{line}; {note}")),
            (Some(line), None) => Some(line.clone()),
            (None, Some(note)) => Some(format!("warn: {note}")),
            (None, None) => None,
        }
    }
}

/// The reason, exit code and standard line for `end`.
fn describe(end: GuestEnd) -> (ExitReason, u8, String) {
    match end {
        GuestEnd::DebugExit(v) => (
            ExitReason::GuestExit,
            v,
            format!("the guest exited with code {v}"),
        ),
        GuestEnd::PowerOff => (ExitReason::Poweroff, 0, "the guest powered off".into()),
        GuestEnd::Reset => (
            ExitReason::Reset,
            GUEST_RESET,
            format!("guest requested a reset (exit code {GUEST_RESET})"),
        ),
        GuestEnd::TripleFault { vcpu } => (
            ExitReason::TripleFault,
            TRIPLE_FAULT,
            format!("vCPU {vcpu} triple-faulted (exit code {TRIPLE_FAULT})"),
        ),
        GuestEnd::InternalError { vcpu, suberror } => (
            ExitReason::InternalError,
            INTERNAL_ERROR,
            format!(
                "vCPU {vcpu} hit a hypervisor internal error, suberror {suberror} (exit code {INTERNAL_ERROR})"
            ),
        ),
        GuestEnd::Timeout => (
            ExitReason::Timeout,
            TIMEOUT,
            format!("timeout expired, guest stopped (exit code {TIMEOUT})"),
        ),
        GuestEnd::VmmError => (
            ExitReason::Error,
            VMM_ERROR,
            format!("the VMM failed while running the guest (exit code {VMM_ERROR})"),
        ),
        GuestEnd::Stopped => (
            ExitReason::Stopped,
            0,
            "stopped through the control API (exit code 0)".into(),
        ),
        GuestEnd::HostSignal(sig) => {
            let code = 128u8.saturating_add(u8::try_from(sig).unwrap_or(127));
            (
                ExitReason::Signal,
                code,
                format!("stopped by signal {sig} (exit code {code})"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // SIGINT and SIGTERM (2 and 15 on every platform skiff builds for).
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;

    fn status(end: GuestEnd) -> ExitStatus {
        ExitStatus::from_end(end, None, 0, None)
    }

    #[test]
    fn codes_and_reasons_are_distinct_and_documented() {
        let s = status(GuestEnd::DebugExit(42));
        assert_eq!(
            (s.reason, s.code, s.stderr_line()),
            (ExitReason::GuestExit, 42, None)
        );
        // A guest can exit with skiff's own codes; the reason and the missing line tell.
        let s = status(GuestEnd::DebugExit(143));
        assert_eq!(
            (s.reason, s.code, s.stderr_line()),
            (ExitReason::GuestExit, 143, None)
        );
        let s = status(GuestEnd::PowerOff);
        assert_eq!(
            (s.reason, s.code, s.stderr_line()),
            (ExitReason::Poweroff, 0, None)
        );
        assert_eq!(status(GuestEnd::Reset).code, GUEST_RESET);
        assert_eq!(status(GuestEnd::TripleFault { vcpu: 1 }).code, TRIPLE_FAULT);
        let internal = GuestEnd::InternalError {
            vcpu: 0,
            suberror: 1,
        };
        assert_eq!(status(internal).code, INTERNAL_ERROR);
        assert_eq!(status(GuestEnd::Timeout).code, TIMEOUT);
        let s = status(GuestEnd::HostSignal(SIGINT));
        assert_eq!(
            (s.reason, s.code, s.signal),
            (ExitReason::Signal, 130, Some(2))
        );
        assert_eq!(status(GuestEnd::HostSignal(SIGTERM)).code, 143);
        assert!(status(GuestEnd::Reset)
            .stderr_line()
            .unwrap()
            .contains("reset"));
        assert_eq!(status(GuestEnd::Stopped).reason, ExitReason::Stopped);
        let skiffs = [
            VMM_ERROR,
            USAGE,
            GUEST_RESET,
            TRIPLE_FAULT,
            INTERNAL_ERROR,
            TIMEOUT,
        ];
        assert!(!skiffs.contains(&HYPERVISOR_UNAVAILABLE));
        // A vCPU's own description replaces the standard line.
        let s = ExitStatus::from_end(GuestEnd::VmmError, Some("vCPU 0: boom".into()), 0, None);
        assert_eq!(s.stderr_line().as_deref(), Some("vCPU 0: boom"));
    }

    #[test]
    fn dropped_output_joins_the_verdict_line_or_warns_alone() {
        let note = || Some("7 bytes of guest output dropped (stdout was not drained)".into());
        let s = ExitStatus::from_end(GuestEnd::HostSignal(SIGTERM), None, 7, note());
        let line = s.stderr_line().unwrap();
        assert!(
            line.starts_with(
                "stopped by signal 15 (exit code 143); 7 bytes of guest output dropped"
            ),
            "{line}"
        );
        let s = ExitStatus::from_end(GuestEnd::DebugExit(0), None, 7, note());
        assert!(
            s.stderr_line().unwrap().starts_with("warn: 7 bytes"),
            "{s:?}"
        );
        assert_eq!(s.guest_output_dropped_bytes, 7);
    }

    #[test]
    fn json_names_the_reason() {
        let s = status(GuestEnd::TripleFault { vcpu: 0 });
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["reason"], "triple-fault");
        assert_eq!(v["code"], 121);
        assert!(v.get("signal").is_none());
        let v = serde_json::to_value(ExitStatus::usage("bad".into())).unwrap();
        assert_eq!(
            (v["reason"].as_str(), v["code"].as_u64()),
            (Some("usage"), Some(2))
        );
    }
}
