//! The host's capabilities, probed once per `skiff test` run: `kvm`, `hardware-kvm` or
//! `emulated-kvm` (PVM: `/sys/module/kvm_pvm`, guest kernel mode emulated), `linux-userspace`
//! (hardware KVM: a Linux guest's user space runs), `hugepages`, `net-admin`, `io-uring`,
//! `virtiofsd`, `vsock`, `landlock`, the CPU count and memory size, plus whatever
//! `SKIFF_TEST_CAPABILITIES` declares (names separated by commas or spaces).

use std::collections::BTreeSet;
use std::path::Path;

/// The environment variable that adds capabilities.
pub const EXTRA_CAPABILITIES_ENV: &str = "SKIFF_TEST_CAPABILITIES";

/// What this host can do.
#[derive(Debug, Clone)]
pub struct HostCapabilities {
    names: BTreeSet<String>,
    cpus: u64,
    mem_bytes: u64,
}

impl HostCapabilities {
    /// A fixed set (for tests and for callers with their own probe).
    pub fn with(names: BTreeSet<String>, cpus: u64, mem_bytes: u64) -> Self {
        Self {
            names,
            cpus,
            mem_bytes,
        }
    }

    /// Probes this host, adding `SKIFF_TEST_CAPABILITIES`.
    pub fn probe() -> Self {
        let mut names = BTreeSet::new();
        let mut add = |name: &str, present: bool| {
            if present {
                names.insert(name.to_string());
            }
        };
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        add("kvm", kvm);
        add("hardware-kvm", kvm && !pvm);
        add("emulated-kvm", kvm && pvm);
        add("linux-userspace", kvm && !pvm);
        add("hugepages", hugepages());
        add("net-admin", net_admin());
        add("io-uring", io_uring());
        add(
            "virtiofsd",
            crate::exec::virtiofsd::find_virtiofsd().is_ok(),
        );
        // skiff's virtio-vsock device is in-process: it needs nothing from the host kernel.
        add("vsock", true);
        add("landlock", landlock());
        if let Ok(extra) = std::env::var(EXTRA_CAPABILITIES_ENV) {
            for name in extra.split([',', ' ']).filter(|n| !n.is_empty()) {
                names.insert(name.to_string());
            }
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        Self {
            names,
            cpus,
            mem_bytes: mem_total(),
        }
    }

    /// Whether the host has the capability called `name`.
    pub fn has_cap(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// The host's CPU count.
    pub fn cpus(&self) -> u64 {
        self.cpus
    }

    /// The host's memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// The named capabilities, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// A one-line summary (`--list` and the jsonl header show it).
    pub fn summary(&self) -> String {
        format!(
            "{} cpus={} mem={}M",
            self.names().collect::<Vec<_>>().join(" "),
            self.cpus,
            self.mem_bytes >> 20
        )
    }
}

fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib.saturating_mul(1024))
}

fn hugepages() -> bool {
    std::fs::read_dir("/sys/kernel/mm/hugepages").is_ok_and(|dir| {
        dir.flatten().any(|d| {
            std::fs::read_to_string(d.path().join("free_hugepages"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    })
}

fn net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    effective & (1 << CAP_NET_ADMIN) != 0 && Path::new("/dev/net/tun").exists()
}

fn io_uring() -> bool {
    // io_uring_params is 120 bytes; a zeroed one asks for defaults.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes `params` (120 bytes, the size of struct
    // io_uring_params) and returns a new descriptor or -1; nothing else is touched.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` was just returned by io_uring_setup and is owned by nobody else.
    unsafe { libc::close(fd as i32) };
    true
}

fn landlock() -> bool {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with a null attribute, size 0 and the VERSION flag, landlock_create_ruleset only
    // returns the ABI version (or -1); it creates nothing.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    abi >= 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_consistent() {
        let host = HostCapabilities::probe();
        let has = |n: &str| host.has_cap(n);
        assert!(has("vsock"));
        assert!(!(has("hardware-kvm") && has("emulated-kvm")));
        assert_eq!(has("linux-userspace"), has("hardware-kvm"));
        assert!(host.cpus() >= 1);
        assert!(host.mem_bytes() >= 1 << 20);
    }
}
