//! The command line skiff.exe accepts: `skiff run` with the options a WHP VM has (kernel,
//! initrd, command line, vCPUs, `--memory size=SIZE[,file=PATH]`, `--serial`, `--timeout`),
//! parsed with the same value parsers as on Linux and turned into a `WindowsVmConfig`. The
//! options of Linux-only parts (virtio devices, vhost-user, the control API, the sandbox,
//! huge pages) are not accepted here, so clap names them as unknown in one line.
//!
//! Platform-neutral; unit-tested on Linux.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::config::{
    parse_cpus, parse_size, parse_timeout, ConfigError, KeyValueSpec, SerialConfig,
    DEFAULT_CMDLINE, DEFAULT_MEMORY, SMALL_PAGE,
};

use super::boot::BootFiles;

/// Where guest RAM lives on Windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamBacking {
    /// A pagefile-backed section (the default).
    Pagefile,
    /// A section over this file (`file=`): created if missing, grown if shorter.
    File(PathBuf),
}

/// Guest RAM: its size and backing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowsMemory {
    /// Bytes.
    pub size: u64,
    /// The section behind it.
    pub backing: RamBacking,
}

const MEMORY_KEYS: KeyValueSpec = KeyValueSpec {
    option: "--memory",
    keys: &["size", "file"],
    bare: Some("size"),
};

/// `--memory` as typed on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowsMemoryArg(pub WindowsMemory);

impl FromStr for WindowsMemoryArg {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut size = None;
        let mut backing = RamBacking::Pagefile;
        for (key, value) in MEMORY_KEYS.split(s)? {
            match key {
                "size" => size = Some(parse_size(value)?),
                _ if value.is_empty() => return Err(ConfigError::EmptyPath("--memory file=")),
                _ => backing = RamBacking::File(PathBuf::from(value)),
            }
        }
        let size = size.ok_or(ConfigError::MissingSize)?;
        arch::layout::ram_ranges(size).map_err(ConfigError::MemorySize)?;
        if size % SMALL_PAGE != 0 {
            return Err(ConfigError::MemoryAlignment(size));
        }
        Ok(Self(WindowsMemory { size, backing }))
    }
}

/// skiff.exe's command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "skiff",
    version,
    about = "skiff on Windows: runs a VM on the Windows Hypervisor Platform (docs/windows.md)"
)]
pub struct WindowsCli {
    /// What to do.
    #[command(subcommand)]
    pub command: WindowsCommand,
}

/// skiff.exe's subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum WindowsCommand {
    /// Boot a kernel and run it until the guest ends.
    Run(WindowsRunArgs),
}

/// `skiff run --kernel PATH ...` on Windows.
#[derive(Debug, clap::Args)]
pub struct WindowsRunArgs {
    /// Kernel image: an ELF vmlinux (booted through PVH when it has the PVH note) or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_cpus)]
    pub cpus: u32,
    /// Guest RAM: size=SIZE[,file=PATH] (default 256M, a pagefile-backed section).
    #[arg(long, value_name = "SPEC")]
    pub memory: Option<WindowsMemoryArg>,
    /// Serial port (COM1) output: stdio, file=PATH or off.
    #[arg(long, value_name = "MODE", default_value = "stdio")]
    pub serial: SerialConfig,
    /// End the guest after this many seconds (exit code 124).
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
}

/// Everything needed to build and run one VM on Windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowsVmConfig {
    /// What to boot.
    pub boot: BootFiles,
    /// Guest RAM.
    pub memory: WindowsMemory,
    /// Serial port output.
    pub serial: SerialConfig,
    /// Ends the VM after this long.
    pub timeout: Option<Duration>,
}

impl WindowsRunArgs {
    /// The VM configuration these arguments describe (defaults filled in).
    pub fn into_config(self) -> WindowsVmConfig {
        WindowsVmConfig {
            boot: BootFiles {
                kernel: self.kernel,
                initrd: self.initrd,
                cmdline: self.cmdline,
                cpus: self.cpus,
            },
            memory: self.memory.map_or(
                WindowsMemory {
                    size: DEFAULT_MEMORY,
                    backing: RamBacking::Pagefile,
                },
                |m| m.0,
            ),
            serial: self.serial,
            timeout: self.timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<WindowsVmConfig, String> {
        let argv = ["skiff", "run"].iter().chain(args);
        match WindowsCli::try_parse_from(argv) {
            Ok(cli) => {
                let WindowsCommand::Run(run) = cli.command;
                Ok(run.into_config())
            }
            Err(e) => Err(e.render().to_string()),
        }
    }

    #[test]
    fn defaults_match_linux() {
        let cfg = parse(&["--kernel", "testguest"]).unwrap();
        assert_eq!(cfg.boot.kernel, PathBuf::from("testguest"));
        assert_eq!(cfg.boot.cmdline, DEFAULT_CMDLINE);
        assert_eq!(cfg.boot.cpus, 1);
        assert_eq!(cfg.boot.initrd, None);
        assert_eq!(
            cfg.memory,
            WindowsMemory {
                size: 256 << 20,
                backing: RamBacking::Pagefile
            }
        );
        assert_eq!(cfg.serial, SerialConfig::Stdio);
        assert_eq!(cfg.timeout, None);
    }

    #[test]
    fn every_option_reaches_the_config() {
        let cfg = parse(&[
            "--kernel",
            "bzImage",
            "--initrd",
            "initrd.cpio",
            "--cmdline",
            "console=ttyS0 quiet",
            "--cpus",
            "4",
            "--memory",
            "size=1G,file=C:\\vm\\ram",
            "--serial",
            "file=serial.log",
            "--timeout",
            "2.5",
        ])
        .unwrap();
        assert_eq!(cfg.boot.initrd, Some(PathBuf::from("initrd.cpio")));
        assert_eq!(cfg.boot.cmdline, "console=ttyS0 quiet");
        assert_eq!(cfg.boot.cpus, 4);
        assert_eq!(cfg.memory.size, 1 << 30);
        assert_eq!(cfg.memory.backing, RamBacking::File("C:\\vm\\ram".into()));
        assert_eq!(cfg.serial, SerialConfig::File("serial.log".into()));
        assert_eq!(cfg.timeout, Some(Duration::from_millis(2500)));
    }

    /// The `skiff run` examples in docs/windows.md parse with skiff.exe's command line (the
    /// Linux one checks them too, in `cli::examples`).
    #[test]
    fn the_windows_page_s_examples_parse() {
        let mut path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/windows.md").to_string();
        if cfg!(windows) && path.starts_with('/') {
            // Under wine the build's Unix path is reached through the Z: drive.
            path = format!("Z:{}", path.replace('/', "\\"));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut in_code = false;
        let mut examples = 0;
        for line in text.lines() {
            if line.starts_with("```") {
                in_code = !in_code;
            } else if in_code && line.starts_with("skiff run ") {
                let mut words = Vec::new();
                for (i, part) in line.split('\'').enumerate() {
                    if i % 2 == 1 {
                        words.push(part.to_string());
                    } else {
                        words.extend(part.split_whitespace().map(str::to_string));
                    }
                }
                if let Err(e) = WindowsCli::try_parse_from(&words) {
                    panic!("docs/windows.md: {line}: {e}");
                }
                examples += 1;
            }
        }
        assert!(examples >= 3, "only {examples} examples in docs/windows.md");
    }

    #[test]
    fn bad_values_and_linux_only_options_are_one_line_errors() {
        let first_line =
            |args: &[&str]| parse(args).unwrap_err().lines().next().unwrap().to_string();
        assert!(first_line(&["--kernel", "k", "--cpus", "0"])
            .contains("--cpus 0 is out of range: expected 1 to 254"));
        assert!(
            first_line(&["--kernel", "k", "--memory", "size=1G,hugepages=on"])
                .contains("hugepages")
        );
        assert!(first_line(&["--kernel", "k", "--disk", "path=x"])
            .contains("unexpected argument '--disk'"));
        assert!(first_line(&["--kernel", "k", "--serial", "tcp"]).contains("invalid --serial"));
        assert!(parse(&["--cpus", "2"])
            .unwrap_err()
            .contains("--kernel <PATH>"));
        assert_eq!(
            "file=x".parse::<WindowsMemoryArg>(),
            Err(ConfigError::MissingSize)
        );
        assert_eq!(
            "size=64M,file=".parse::<WindowsMemoryArg>(),
            Err(ConfigError::EmptyPath("--memory file="))
        );
        assert_eq!(
            "size=10000001".parse::<WindowsMemoryArg>(),
            Err(ConfigError::MemoryAlignment(10_000_001))
        );
        assert!(matches!(
            "size=1M".parse::<WindowsMemoryArg>(),
            Err(ConfigError::MemorySize(_))
        ));
    }
}
