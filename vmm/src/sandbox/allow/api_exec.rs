//! A `POST /vm/exec` worker of the control API: it connects to the VM's own vsock socket
//! (`socket` for `AF_UNIX` only, `connect`), speaks the agent protocol over that connection with
//! blocking reads and writes under socket timeouts, polls it and the HTTP client's connection,
//! and writes the HTTP answer. It opens no files and starts no threads.

use seccompiler::BackendError;

use super::AllowList;

pub(super) fn add(list: &mut AllowList) -> Result<(), BackendError> {
    list.calls(&[
        libc::SYS_connect,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        // Read and write timeouts on both connections.
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_poll,
        libc::SYS_ppoll,
    ]);
    list.call_if_arg(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?;
    // std's `set_nonblocking(false)` on the client's connection before the answer.
    list.call_if_arg(libc::SYS_ioctl, 1, &[libc::FIONBIO])?;
    Ok(())
}
