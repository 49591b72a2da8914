//! Creating the files behind guest RAM: a sealed memfd (default), a memfd on huge pages, or a
//! user file. Each backing is sized, and preallocated where it could otherwise fault lazily
//! (hugetlbfs always; any backing with `prealloc=on`), so every page is accessible before the
//! first vCPU runs.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::region::Mappable;

/// Linux's hugetlbfs magic number (`statfs.f_type`).
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Which kind of file holds guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingKind {
    /// An anonymous, sealed memfd.
    Memfd,
    /// An anonymous memfd on the host's default huge page size.
    HugetlbMemfd,
    /// A user file, created if missing and grown to size.
    File(PathBuf),
}

/// A created backing: the file, its page size, and whether skiff created it (so a failed start
/// can remove it again).
#[derive(Debug)]
pub struct Backing {
    /// The open file.
    pub file: Mappable,
    /// The backing's page size (4 KiB, or the huge page size).
    pub page_size: u64,
    /// Whether the file sits on hugetlbfs.
    pub hugetlb: bool,
    created: Option<PathBuf>,
}

/// Errors from creating a backing.
#[derive(Debug, Error)]
pub enum BackingError {
    /// memfd_create failed.
    #[error("cannot create the guest memory memfd")]
    Memfd(#[source] io::Error),
    /// The host has too few free huge pages.
    #[error(
        "hugepages=on needs {needed} free huge pages of {page_kib} KiB but the host has {free} \
         (raise /proc/sys/vm/nr_hugepages)"
    )]
    NoHugePages {
        /// Pages needed.
        needed: u64,
        /// Pages free.
        free: u64,
        /// Huge page size in KiB.
        page_kib: u64,
    },
    /// /proc/meminfo could not be read or parsed.
    #[error("cannot read the host's huge page counts from /proc/meminfo")]
    MemInfo(#[source] io::Error),
    /// The memory file could not be opened or created.
    #[error("cannot open memory file {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The memory file exists but is not a regular file.
    #[error("memory file {0} is not a regular file")]
    NotRegular(PathBuf),
    /// The memory file has other names: a snapshot taken with `snapshot --stop` may hold it as
    /// its memory file, and a VM writing it would change that snapshot.
    #[error(
        "memory file {path} has {links} hard links: a snapshot (taken with --stop) may hold it \
         as its memory, and this VM would overwrite that snapshot; restore the snapshot, or copy \
         the file, or add shared-with-snapshot=on to --memory to use it anyway"
    )]
    Linked {
        /// The path.
        path: PathBuf,
        /// Its link count.
        links: u64,
    },
    /// Another process holds the memory file's lock.
    #[error(
        "memory file {0} is in use by another process (locked: another VM runs on it, or a \
         copy-on-write restore maps it as a snapshot's memory)"
    )]
    Locked(PathBuf),
    /// Sizing the backing failed.
    #[error("cannot size guest memory backing {what} to {size:#x} bytes")]
    Resize {
        /// Which backing.
        what: String,
        /// Requested size.
        size: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Preallocating the backing failed.
    #[error("cannot preallocate {size:#x} bytes for guest memory backing {what}")]
    Prealloc {
        /// Which backing.
        what: String,
        /// Requested size.
        size: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Sealing the memfd failed.
    #[error("cannot seal the guest memory memfd")]
    Seal(#[source] io::Error),
    /// fstatfs failed.
    #[error("cannot inspect the filesystem of {what}")]
    Statfs {
        /// Which backing.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl Backing {
    /// Creates a backing of `size` bytes. `prealloc` allocates every page now.
    pub fn create(kind: &BackingKind, size: u64, prealloc: bool) -> Result<Self, BackingError> {
        Self::create_with(kind, size, prealloc, false)
    }

    /// `create`; `allow_linked` accepts a user file with other hard links (which a snapshot
    /// taken with `--stop` may hold: the VM then writes that snapshot's memory).
    pub fn create_with(
        kind: &BackingKind,
        size: u64,
        prealloc: bool,
        allow_linked: bool,
    ) -> Result<Self, BackingError> {
        let backing = match kind {
            BackingKind::Memfd => Self::memfd(size, false)?,
            BackingKind::HugetlbMemfd => Self::memfd(size, true)?,
            BackingKind::File(path) => Self::user_file(path, size, allow_linked)?,
        };
        // hugetlbfs pages are allocated on first fault and a shortage then kills the process
        // with SIGBUS, so they are always reserved up front.
        if prealloc || backing.hugetlb {
            if let Err(e) = backing.preallocate(size) {
                backing.discard();
                return Err(e);
            }
        }
        Ok(backing)
    }

    fn describe(&self) -> String {
        match &self.created {
            Some(p) => p.display().to_string(),
            None => "memfd".to_string(),
        }
    }

    fn memfd(size: u64, hugetlb: bool) -> Result<Self, BackingError> {
        let page_size = if hugetlb {
            check_free_huge_pages(size)?
        } else {
            arch::layout::PAGE_SIZE
        };
        let name = CString::from(c"skiff-guest-ram");
        let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        if hugetlb {
            flags |= libc::MFD_HUGETLB;
        }
        // SAFETY: `name` is a valid NUL-terminated string and memfd_create has no memory effects.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if raw < 0 {
            return Err(BackingError::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = File::from(fd);
        file.set_len(size).map_err(|source| BackingError::Resize {
            what: "memfd".into(),
            size,
            source,
        })?;
        // The size is fixed for the VM's life: seal it so no consumer can shrink the file under
        // another's mapping (which would turn accesses into SIGBUS).
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own, with an integer argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(BackingError::Seal(io::Error::last_os_error()));
        }
        Ok(Self {
            file: Mappable::new(OwnedFd::from(file)),
            page_size,
            hugetlb,
            created: None,
        })
    }

    fn user_file(path: &Path, size: u64, allow_linked: bool) -> Result<Self, BackingError> {
        let open_err = |source| BackingError::Open {
            path: path.to_path_buf(),
            source,
        };
        let existed = match std::fs::metadata(path) {
            Ok(m) if !m.file_type().is_file() || m.file_type().is_block_device() => {
                return Err(BackingError::NotRegular(path.to_path_buf()))
            }
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(open_err(e)),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        // Checked on what was opened, before anything is changed: a snapshot's memory file
        // must not become a running VM's RAM by accident.
        let links = std::os::unix::fs::MetadataExt::nlink(&file.metadata().map_err(open_err)?);
        if links > 1 && !allow_linked {
            return Err(BackingError::Linked {
                path: path.to_path_buf(),
                links,
            });
        }
        let mut backing = Self {
            file: Mappable::new(OwnedFd::from(file)),
            page_size: arch::layout::PAGE_SIZE,
            hugetlb: false,
            created: (!existed).then(|| path.to_path_buf()),
        };
        if let Err(e) = backing.finish_user_file(path, size) {
            backing.discard();
            return Err(e);
        }
        Ok(backing)
    }

    fn finish_user_file(&mut self, path: &Path, size: u64) -> Result<(), BackingError> {
        let fd = self.file_fd();
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } < 0 {
            return Err(BackingError::Locked(path.to_path_buf()));
        }
        let (hugetlb, block) = statfs(fd).map_err(|source| BackingError::Statfs {
            what: path.display().to_string(),
            source,
        })?;
        self.hugetlb = hugetlb;
        if hugetlb {
            self.page_size = block;
        }
        let file = self
            .file
            .try_clone_file()
            .map_err(|source| BackingError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let current = file
            .metadata()
            .map_err(|source| BackingError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        // An existing larger file keeps its size and contents; a shorter one grows (sparsely).
        if current < size {
            file.set_len(size).map_err(|source| BackingError::Resize {
                what: path.display().to_string(),
                size,
                source,
            })?;
        }
        Ok(())
    }

    fn file_fd(&self) -> i32 {
        use std::os::fd::AsFd;
        self.file.as_fd().as_raw_fd()
    }

    fn preallocate(&self, size: u64) -> Result<(), BackingError> {
        let len = i64::try_from(size).map_err(|_| BackingError::Prealloc {
            what: self.describe(),
            size,
            source: io::Error::from_raw_os_error(libc::EFBIG),
        })?;
        // SAFETY: fallocate on a descriptor we own; it only changes the file's allocation.
        let rc = unsafe { libc::fallocate(self.file_fd(), 0, 0, len) };
        if rc < 0 {
            return Err(BackingError::Prealloc {
                what: self.describe(),
                size,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The path of the memory file if skiff created it (so a failed start can remove it).
    pub fn created_path(&self) -> Option<&Path> {
        self.created.as_deref()
    }

    /// Removes a file skiff created, after a failed start. Files that existed stay.
    pub fn discard(&self) {
        if let Some(p) = &self.created {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Returns `(is_hugetlbfs, block_size)` for the filesystem holding `fd`.
fn statfs(fd: i32) -> io::Result<(bool, u64)> {
    // SAFETY: an all-zero statfs is a valid value to be overwritten by the kernel.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable statfs and `fd` is open.
    if unsafe { libc::fstatfs(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    Ok((magic == HUGETLBFS_MAGIC, st.f_bsize as u64))
}

/// Checks the host has enough free default-size huge pages for `size` bytes; returns the huge
/// page size.
fn check_free_huge_pages(size: u64) -> Result<u64, BackingError> {
    let info = std::fs::read_to_string("/proc/meminfo").map_err(BackingError::MemInfo)?;
    let (free, page_kib) = parse_huge_page_info(&info).ok_or_else(|| {
        BackingError::MemInfo(io::Error::new(
            io::ErrorKind::InvalidData,
            "no HugePages_Free/Hugepagesize lines",
        ))
    })?;
    let page = page_kib * 1024;
    let needed = size.div_ceil(page);
    if needed > free {
        return Err(BackingError::NoHugePages {
            needed,
            free,
            page_kib,
        });
    }
    Ok(page)
}

/// Parses `(HugePages_Free, Hugepagesize in KiB)` from /proc/meminfo text.
fn parse_huge_page_info(meminfo: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("HugePages_Free:")?, field("Hugepagesize:")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn memfd_is_sized_and_sealed() {
        let b = Backing::create(&BackingKind::Memfd, 1 << 20, false).unwrap();
        let f = b.file.try_clone_file().unwrap();
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);
        assert!(
            f.set_len(4096).is_err(),
            "sealed memfd must refuse to shrink"
        );
        assert!(!b.hugetlb);
        let _ = b.file.as_fd();
    }

    #[test]
    fn parses_meminfo() {
        let text = "MemTotal: 1 kB\nHugePages_Total:      4\nHugePages_Free:       3\nHugepagesize:    2048 kB\n";
        assert_eq!(parse_huge_page_info(text), Some((3, 2048)));
        assert_eq!(parse_huge_page_info("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn user_file_is_created_grown_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let b = Backing::create(&BackingKind::File(path.clone()), 8 << 20, false).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 << 20);
        let second = Backing::create(&BackingKind::File(path.clone()), 8 << 20, false);
        assert!(matches!(second, Err(BackingError::Locked(_))), "{second:?}");
        drop(b);
        // An existing larger file keeps its size.
        let b = Backing::create(&BackingKind::File(path.clone()), 4 << 20, true).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 << 20);
        drop(b);
    }

    #[test]
    fn a_file_with_other_links_needs_the_override_and_is_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        std::fs::write(&path, [7u8; 4096]).unwrap();
        std::fs::hard_link(&path, dir.path().join("memory-0.bin")).unwrap();
        let kind = BackingKind::File(path.clone());
        let e = Backing::create(&kind, 8 << 20, false).unwrap_err();
        assert!(matches!(e, BackingError::Linked { links: 2, .. }), "{e:?}");
        assert!(e.to_string().contains("shared-with-snapshot=on"), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096, "not grown");
        let b = Backing::create_with(&kind, 8 << 20, false, true).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 << 20);
        drop(b);
    }

    #[test]
    fn directory_is_not_a_memory_file() {
        let dir = tempfile::tempdir().unwrap();
        let r = Backing::create(&BackingKind::File(dir.path().to_path_buf()), 1 << 20, false);
        assert!(matches!(r, Err(BackingError::NotRegular(_))), "{r:?}");
    }

    #[test]
    fn hugepages_beyond_the_free_pool_are_refused() {
        // 1 TiB of huge pages is more than any test host has free.
        let r = Backing::create(&BackingKind::HugetlbMemfd, 1 << 40, false);
        assert!(matches!(r, Err(BackingError::NoHugePages { .. })), "{r:?}");
    }
}
