//! A host file's type in words (`a FIFO`, `a directory`, ...), for the one-line errors that
//! refuse a path of the wrong kind: disks here, kernels, initrds and snapshot files in `vmm`.

use std::os::unix::fs::FileTypeExt;

/// The file type of `t` in words, for error messages.
pub fn describe(t: &std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "an unknown file type"
    }
}
