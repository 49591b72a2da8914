//! Ending skiff without making the caller wait for the kernel's VM teardown.
//!
//! Destroying a KVM VM with an in-kernel irqchip waits for SRCU grace periods: about 20 ms here,
//! more than the rest of a short VM's life. `Teardown::detach` hands the last references to the
//! VM's descriptors to a detached grandchild process, which holds them until skiff has exited
//! and then closes them, so skiff's exit status reaches its caller at once. The grandchild has
//! no stdin, stdout or stderr (a caller reading skiff's output sees EOF when skiff exits), no
//! file lock (a memory file's `flock` is released first) and no descriptor but the VM's and the
//! vCPUs' (so a disk's lock, a tap or a vhost-user socket is released when skiff exits).

use crate::hypervisor::Vm;
use crate::memory::GuestRam;

/// What is left of a VM after its vCPUs have stopped.
pub struct Teardown {
    vm: Box<dyn Vm>,
    ram: GuestRam,
}

impl std::fmt::Debug for Teardown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Teardown").finish_non_exhaustive()
    }
}

impl Teardown {
    /// Holds the VM and its memory until `detach` or drop.
    pub fn new(vm: Box<dyn Vm>, ram: GuestRam) -> Self {
        Self { vm, ram }
    }

    /// Tears the VM down synchronously (the VM's memory slots point into `ram`: VM first).
    pub fn now(self) {
        drop(self.vm);
        drop(self.ram);
    }

    /// Leaves the final close of the VM's descriptors to a detached process that outlives this
    /// one, then returns; the caller should exit promptly. Falls back to `now` if `fork` fails.
    pub fn detach(self) {
        self.ram.release_file_lock();
        // Everything but the VM and its vCPUs is closed before the grandchild is forked, so
        // disks (and their locks), taps, sockets and rings are released when skiff exits, not
        // after the teardown.
        let to_close = descriptors_but_the_vm();
        let mut fds = [0i32; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return self.now();
        }
        let [read_end, write_end] = fds;
        // SAFETY: every vCPU thread has been joined; the child only calls async-signal-safe
        // functions (fork, close, dup2, open, read, _exit) before it exits.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: closes descriptors this (intermediate) process inherited and owns, before
            // forking, so the grandchild never holds them; skiff waits for this process.
            unsafe {
                for &fd in &to_close {
                    if fd != read_end {
                        libc::close(fd);
                    }
                }
                libc::close(write_end);
            }
            // SAFETY: as above; the grandchild is reparented to init when the child exits.
            if unsafe { libc::fork() } == 0 {
                // SAFETY: replaces the standard descriptors; reads into a local buffer;
                // `_exit` skips destructors that belong to the parent.
                unsafe {
                    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                    for fd in 0..3 {
                        libc::dup2(null, fd);
                    }
                    let mut byte = 0u8;
                    // Returns 0 (EOF) once skiff, the last holder of the write end, has exited.
                    while libc::read(read_end, (&mut byte as *mut u8).cast(), 1) != 0 {}
                    libc::_exit(0);
                }
            }
            // SAFETY: the intermediate child leaves at once, without running destructors.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: closes our copy of the read end; reaps the intermediate child (after which
        // the grandchild holds nothing but the VM).
        unsafe {
            libc::close(read_end);
            if child > 0 {
                libc::waitpid(child, std::ptr::null_mut(), 0);
            }
        }
        if child < 0 {
            // SAFETY: closes the write end we still own.
            unsafe { libc::close(write_end) };
            return self.now();
        }
        // Our references close when this process exits; the grandchild's are the last.
        std::mem::forget(self);
        let _ = write_end;
    }
}

/// Every descriptor of this process from 3 up except the KVM VM's and vCPUs'
/// (`anon_inode:kvm-vm`, `anon_inode:kvm-vcpu:N`), which the teardown grandchild keeps. Read
/// before `fork` (the children may only make async-signal-safe calls); the listing's own
/// descriptor may be in it, closed by then and perhaps reused, so callers skip their own. Without
/// `/proc` the list is empty: the grandchild then holds everything until skiff has exited (disks
/// stay locked a little longer, nothing breaks).
fn descriptors_but_the_vm() -> Vec<i32> {
    let mut close = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return close;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if fd > 2 && !target.to_string_lossy().starts_with("anon_inode:kvm-") {
            close.push(fd);
        }
    }
    close
}
