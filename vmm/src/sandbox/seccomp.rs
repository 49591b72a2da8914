//! Compiles each thread kind's allow-list (`allow/`) into a BPF program with `seccompiler`, once,
//! and installs one on the calling thread.
//!
//! A call on the list runs; any other call gets the mode's action: `SECCOMP_RET_TRAP` with
//! `--seccomp on` (the `sigsys` handler reports it and ends skiff) or `SECCOMP_RET_LOG` with
//! `--seccomp log`. Filters stack: a thread started by a confined thread runs under its parent's
//! filter and its own, so a kind that starts threads must allow what they do before their own
//! filter is in (see `allow::thread_start`).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use super::allow;
use super::{SandboxError, SeccompMode, ThreadKind};

static FILTERS: OnceLock<BTreeMap<ThreadKind, BpfProgram>> = OnceLock::new();

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

/// Compiles every kind's filter (done before any thread starts, so installing one later
/// allocates nothing: the teardown process installs its own right after `fork`).
pub(super) fn compile_all(mode: SeccompMode) -> Result<(), SandboxError> {
    let mut filters = BTreeMap::new();
    for kind in ThreadKind::ALL {
        filters.insert(kind, compile(kind, mode)?);
    }
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Installs `kind`'s filter on the calling thread (nothing if none was compiled).
pub(super) fn apply(kind: ThreadKind) -> Result<(), seccompiler::Error> {
    match FILTERS.get().and_then(|f| f.get(&kind)) {
        Some(program) => seccompiler::apply_filter(program),
        None => Ok(()),
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
