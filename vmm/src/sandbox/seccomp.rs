//! Compiles each thread kind's allow-list (`allow/`) into a BPF program with `seccompiler` when
//! the first thread of the kind starts, and installs it on the calling thread.
//!
//! A call on the list runs; any other call gets the mode's action: `SECCOMP_RET_TRAP` with
//! `--seccomp on` (the `sigsys` handler reports it and ends skiff) or `SECCOMP_RET_LOG` with
//! `--seccomp log`. Filters stack: a thread started by a confined thread runs under its parent's
//! filter and its own, so a kind that starts threads must allow what they do before their own
//! filter is in (see `allow::thread_start`).

use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use super::allow;
use super::{SandboxError, SeccompMode, ThreadKind};

/// Each kind's compiled filter, built when the first thread of that kind starts (compiling all
/// of them up front cost about half a millisecond of every start), and the mode they are for.
static FILTERS: [OnceLock<BpfProgram>; ThreadKind::ALL.len()] =
    [const { OnceLock::new() }; ThreadKind::ALL.len()];
static MODE: OnceLock<SeccompMode> = OnceLock::new();

fn target_arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    {
        TargetArch::x86_64
    }
    #[cfg(target_arch = "aarch64")]
    {
        TargetArch::aarch64
    }
}

/// The action for a call outside the allow-list.
fn mismatch_action(mode: SeccompMode) -> SeccompAction {
    match mode {
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::On | SeccompMode::Off => SeccompAction::Trap,
    }
}

/// The BPF program for `kind` under `mode`.
pub(super) fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SandboxError> {
    let error = |e: seccompiler::BackendError| SandboxError::Filter {
        kind: kind.name(),
        message: e.to_string(),
    };
    let rules = allow::rules_for(kind).map_err(error)?;
    let filter = SeccompFilter::new(
        rules.into_iter().collect(),
        mismatch_action(mode),
        SeccompAction::Allow,
        target_arch(),
    )
    .map_err(error)?;
    BpfProgram::try_from(filter).map_err(error)
}

/// Sets the mode the filters are compiled for (once, before any thread is confined).
pub(super) fn set_mode(mode: SeccompMode) {
    let _ = MODE.set(mode);
}

fn index(kind: ThreadKind) -> usize {
    ThreadKind::ALL
        .iter()
        .position(|&k| k == kind)
        .unwrap_or_default()
}

/// Compiles `kind`'s filter unless it already is. The teardown process needs its filter
/// compiled before `fork` (the child must not allocate), so `Teardown` calls this first.
pub(super) fn prepare(kind: ThreadKind) -> Result<(), SandboxError> {
    let slot = &FILTERS[index(kind)];
    if slot.get().is_none() {
        let mode = MODE.get().copied().unwrap_or_default();
        // Two threads of a kind starting at once may both compile; one result is kept.
        let _ = slot.set(compile(kind, mode)?);
    }
    Ok(())
}

/// Installs `kind`'s filter on the calling thread, compiling it first if needed.
pub(super) fn apply(kind: ThreadKind) -> Result<(), SandboxError> {
    prepare(kind)?;
    apply_prepared(kind).map_err(|e| SandboxError::Install {
        kind: kind.name(),
        message: e.to_string(),
    })
}

/// Installs `kind`'s filter if it was compiled (allocates nothing: for a forked child).
pub(super) fn apply_prepared(kind: ThreadKind) -> Result<(), seccompiler::Error> {
    match FILTERS[index(kind)].get() {
        Some(program) => seccompiler::apply_filter(program),
        None => Err(seccompiler::Error::EmptyFilter),
    }
}

/// The test trigger's call: `personality(0xffffffff)` only reads the persona, and no
/// allow-list has it.
pub(super) fn make_forbidden_call() {
    // SAFETY: personality with 0xffffffff queries the execution domain and changes nothing.
    unsafe { libc::personality(0xffff_ffff) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_both_modes() {
        for mode in [SeccompMode::On, SeccompMode::Log] {
            for kind in ThreadKind::ALL {
                let program = compile(kind, mode).expect("filter compiles");
                assert!(!program.is_empty(), "{kind:?}");
                // A BPF program has at most 4096 instructions.
                assert!(
                    program.len() < 4096,
                    "{kind:?}: {} instructions",
                    program.len()
                );
            }
        }
    }
}
