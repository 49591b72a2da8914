//! The detached teardown process: holds the KVM VM until skiff has exited (reads a pipe to EOF),
//! with `/dev/null` as its standard descriptors, then leaves.

use seccompiler::BackendError;

use super::AllowList;

pub(super) fn add(list: &mut AllowList) -> Result<(), BackendError> {
    list.calls(&[
        libc::SYS_openat,
        libc::SYS_dup2,
        libc::SYS_dup3,
        libc::SYS_read,
    ]);
    Ok(())
}
