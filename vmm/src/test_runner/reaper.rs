//! The reaper: a discarded VM's process group is sent SIGKILL at once, and the wait for its exit
//! (unmapping guest memory, the kernel's VM teardown: milliseconds) happens on a thread of its
//! own, off the next case's critical path. Bounded, and drained before the run ends, so no VM
//! outlives `skiff test`.

use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::vm_process::VmProcess;

/// Discarded VMs the reaper holds before `Reaper::discard` waits for room.
const REAP_BACKLOG: usize = 16;
/// How often the reaper looks at the VMs it waits for.
const REAP_TICK: Duration = Duration::from_millis(2);

/// Reaps discarded VMs on a thread of its own: a killed VM's exit (its memory unmapped, its
/// KVM VM destroyed) costs milliseconds that would otherwise be on the next case's critical
/// path. At most `REAP_BACKLOG` wait in the channel and as many on the thread; `discard` waits
/// when both are full. `finish` (or dropping it) waits until every VM handed over is reaped.
#[derive(Debug)]
pub struct Reaper {
    sender: Mutex<Option<SyncSender<VmProcess>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Reaper {
    /// Starts the reaping thread; with none (the thread cannot start), VMs are reaped in place.
    pub fn start() -> Self {
        let (sender, receiver) = sync_channel::<VmProcess>(REAP_BACKLOG);
        let thread = std::thread::Builder::new()
            .name("vm-reaper".into())
            .spawn(move || {
                let mut waiting: Vec<VmProcess> = Vec::new();
                let mut open = true;
                while open || !waiting.is_empty() {
                    if open && waiting.is_empty() {
                        // Nothing to look at: sleep until a VM comes (or the run ends).
                        match receiver.recv() {
                            Ok(vm) => waiting.push(vm),
                            Err(_) => open = false,
                        }
                    } else if open && waiting.len() < REAP_BACKLOG {
                        match receiver.recv_timeout(REAP_TICK) {
                            Ok(vm) => waiting.push(vm),
                            Err(RecvTimeoutError::Timeout) => {}
                            Err(RecvTimeoutError::Disconnected) => open = false,
                        }
                    } else {
                        std::thread::sleep(REAP_TICK);
                    }
                    // `ended` reaps: a VM that has exited is done with.
                    waiting.retain_mut(|vm| vm.ended().is_none());
                }
            })
            .ok();
        Self {
            sender: Mutex::new(thread.as_ref().map(|_| sender)),
            thread: Mutex::new(thread),
        }
    }

    /// Kills `vm`'s process group now and leaves the wait for its exit to the reaper.
    pub fn discard(&self, mut vm: VmProcess) {
        vm.signal_kill();
        let sender = self
            .sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match sender {
            // A send error hands the VM back, dropped here: reaped in place.
            Some(s) => drop(s.send(vm)),
            None => drop(vm),
        }
    }

    /// Waits until every discarded VM is reaped; later discards are reaped in place.
    pub fn finish(&self) {
        self.sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::test_runner::vm_process::LiveGroups;

    fn gone(pid: u32) -> bool {
        !Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn discard_returns_at_once_and_finish_reaps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let reaper = Reaper::start();
        let mut pids = Vec::new();
        for _ in 0..3 {
            let vm = VmProcess::spawn(Path::new("/bin/sleep"), &["30".into()], dir.path(), None)
                .unwrap();
            pids.push(vm.pid());
            let started = Instant::now();
            reaper.discard(vm);
            assert!(started.elapsed() < Duration::from_secs(1));
        }
        reaper.finish();
        for pid in pids {
            assert!(gone(pid), "{pid} was not reaped");
        }
    }

    #[test]
    fn the_watchdog_set_kills_live_groups_and_refuses_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let live = Arc::new(LiveGroups::new());
        let mut vm = VmProcess::spawn(
            Path::new("/bin/sleep"),
            &["30".into()],
            dir.path(),
            Some(&live),
        )
        .unwrap();
        assert_eq!(live.kill_all(), 1);
        let status = vm
            .wait_until(Instant::now() + Duration::from_secs(10))
            .unwrap();
        assert_eq!(crate::test_runner::vm_process::exit_code(status), 128 + 9);
        let refused = VmProcess::spawn(
            Path::new("/bin/sleep"),
            &["30".into()],
            dir.path(),
            Some(&live),
        )
        .unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::Interrupted);
    }
}
