//! A writer for the "newc" cpio format the Linux kernel unpacks as an initramfs: directories,
//! character devices and regular files, then the trailer. Only what skiff's initramfs needs;
//! it never reads archives.

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Writes a newc archive entry by entry; `finish` writes the trailer.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// A directory (parents must come first).
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// A character device node with major and minor numbers.
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// A regular file with `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Writes the trailer and pads the archive to a multiple of 512 bytes, so another archive
    /// can be appended; returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, 1, (0, 0), &[])?;
        let pad = (512 - self.written % 512) % 512;
        self.put(&vec![0u8; pad as usize])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: over 4 GiB"))
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let name_len = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name too long"))?;
        // ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
        // rdevminor, namesize, check.
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_len, 0,
        ];
        let mut header = Vec::with_capacity(110 + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        self.put(&header)?;
        self.pad4()?;
        self.put(data)?;
        self.pad4()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..pad as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed entry: name, mode, rdev, data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Parses a newc archive back into entries.
    fn parse(mut a: &[u8]) -> Vec<Entry> {
        let start_len = a.len();
        let mut out = Vec::new();
        loop {
            assert_eq!(&a[..6], MAGIC);
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&a[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name = std::str::from_utf8(&a[110..110 + namesize as usize - 1])
                .unwrap()
                .to_string();
            let data_at = (110 + namesize as usize).div_ceil(4) * 4;
            let data = a[data_at..data_at + size as usize].to_vec();
            let next = (data_at + size as usize).div_ceil(4) * 4;
            a = &a[next..];
            if name == TRAILER {
                assert_eq!((start_len - a.len()) % 4, 0);
                assert!(a.iter().all(|&b| b == 0), "only padding after the trailer");
                return out;
            }
            out.push((name, mode, (rmaj, rmin), data));
        }
    }

    #[test]
    fn archive_round_trips() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("init", 0o755, b"abcde").unwrap();
        w.file("empty", 0o644, b"").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let entries = parse(&bytes);
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[0].0, "dev");
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(entries[1].2, (5, 1));
        assert_eq!(entries[1].1, S_IFCHR | 0o600);
        assert_eq!(
            entries[2],
            ("init".into(), S_IFREG | 0o755, (0, 0), b"abcde".to_vec())
        );
        assert_eq!(entries[3].3, b"");
    }
}
