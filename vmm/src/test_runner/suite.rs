//! The suite file (`skiff-test.toml`): VM entries (`[vm.NAME]`) and test entries (`[[test]]`),
//! parsed with `toml` and serde with unknown keys refused, then checked as a whole (every test
//! names a VM that exists, runs either an argv through an agent or a test-guest scenario, has a
//! valid pattern and requirement), and the suite's own keys (`watchdog`). Every error is one
//! line with the file, line and column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use super::requirements::{Requirement, RequirementError};

/// Default boot timeout (seconds).
const DEFAULT_BOOT_TIMEOUT: f64 = 60.0;
/// Default case timeout (seconds).
const DEFAULT_CASE_TIMEOUT: f64 = 60.0;

/// Why a suite file is unusable.
#[derive(Debug, Error)]
pub enum SuiteError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or a value of the wrong type.
    #[error("{}:{line}:{column}: {message}", .path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A key the format does not have.
    #[error("{}:{line}:{column}: {message}", .path.display())]
    UnknownKey {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A VM's kernel (or initrd, or disk) does not exist.
    #[error("{}:{line}:{column}: {what} {}: {source}", .path.display(), .file.display())]
    MissingFile {
        path: PathBuf,
        line: usize,
        column: usize,
        what: &'static str,
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `requires` expression that does not parse.
    #[error("{}:{line}:{column}: requires {expr:?}: {source}", .path.display())]
    Requirement {
        path: PathBuf,
        line: usize,
        column: usize,
        expr: String,
        #[source]
        source: RequirementError,
    },
    /// Any other inconsistency (unknown VM, both `run` and `scenario`, a bad pattern, ...).
    #[error("{}:{line}:{column}: {message}", .path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

/// Which agent a VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AgentKind {
    /// No agent: tests are test-guest scenarios, booted cold.
    #[default]
    None,
    /// The test guest's `agent-listen` scenario.
    Testguest,
    /// skiff's Linux agent (`skiff run --agent`).
    Linux,
}

/// A disk of a VM entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
}

/// `[vm.NAME]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    kernel: Spanned<PathBuf>,
    initrd: Option<Spanned<PathBuf>>,
    cmdline: Option<String>,
    cpus: Option<u32>,
    memory: Option<String>,
    #[serde(default)]
    disks: Vec<DiskEntry>,
    #[serde(default)]
    net: Vec<String>,
    #[serde(default)]
    agent: AgentKind,
    boot_timeout: Option<f64>,
    ready: Option<Spanned<String>>,
    #[serde(default)]
    setup: Vec<Vec<String>>,
    fork: Option<Spanned<bool>>,
    requires: Option<Spanned<String>>,
}

/// `[[test]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    name: Spanned<String>,
    vm: Spanned<String>,
    run: Option<Vec<String>>,
    scenario: Option<String>,
    timeout: Option<f64>,
    #[serde(default)]
    exit_code: i32,
    output: Option<Spanned<String>>,
    requires: Option<Spanned<String>>,
    #[serde(default)]
    retries: u32,
    unstable: Option<String>,
    #[serde(default)]
    exclusive: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSuite {
    watchdog: Option<Spanned<f64>>,
    #[serde(default)]
    vm: BTreeMap<String, RawVm>,
    #[serde(default)]
    test: Vec<RawTest>,
}

/// A VM entry, checked.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: Option<u32>,
    pub memory: Option<String>,
    pub disks: Vec<DiskEntry>,
    pub net: Vec<String>,
    pub agent: AgentKind,
    pub boot_timeout: Duration,
    /// The serial line that says an agent-less VM has booted (none: any line).
    pub ready: Option<regex::Regex>,
    pub setup: Vec<Vec<String>>,
    pub fork: bool,
    pub requires: Option<Requirement>,
}

impl VmSpec {
    /// A VM entry for `kernel` with `agent` and the defaults a suite file gives (for Rust tests
    /// through `test_vm`); set the other fields as needed.
    pub fn new(name: &str, kernel: impl Into<PathBuf>, agent: AgentKind) -> Self {
        Self {
            name: name.to_string(),
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            cpus: None,
            memory: None,
            disks: Vec::new(),
            net: Vec::new(),
            agent,
            boot_timeout: Duration::from_secs_f64(DEFAULT_BOOT_TIMEOUT),
            ready: None,
            setup: Vec::new(),
            fork: false,
            requires: None,
        }
    }
}

/// What a test runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseRun {
    /// An argv executed by the VM's agent.
    Argv(Vec<String>),
    /// A test-guest scenario, appended to the VM's command line (cold boot, no agent).
    Scenario(String),
}

/// A test entry, checked.
#[derive(Debug, Clone)]
pub struct CaseSpec {
    pub name: String,
    pub vm: String,
    pub run: CaseRun,
    pub timeout: Duration,
    pub exit_code: i32,
    pub output: Option<regex::Regex>,
    pub requires: Option<Requirement>,
    pub retries: u32,
    pub unstable: Option<String>,
    pub exclusive: bool,
}

/// A whole suite, checked.
#[derive(Debug, Clone)]
pub struct Suite {
    /// The suite watchdog's limit (`watchdog = SECONDS`).
    pub watchdog: Option<Duration>,
    pub vms: BTreeMap<String, VmSpec>,
    /// In file order.
    pub cases: Vec<CaseSpec>,
}

/// Line and column (1-based) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn seconds(v: Option<f64>, default: f64) -> Option<Duration> {
    let s = v.unwrap_or(default);
    (s.is_finite() && s > 0.0 && s < 1e9).then(|| Duration::from_secs_f64(s))
}

/// Reads and checks the suite file at `path`; relative paths in it are relative to its directory.
pub fn load(path: &Path) -> Result<Suite, SuiteError> {
    let text = std::fs::read_to_string(path).map_err(|source| SuiteError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parses `text` as the suite file at `path`.
pub fn parse(path: &Path, text: &str) -> Result<Suite, SuiteError> {
    let base = path.parent().unwrap_or(Path::new("."));
    let at = |offset: usize| line_col(text, offset);
    let raw: RawSuite = toml::from_str(text).map_err(|e| {
        let (line, column) = at(e.span().map_or(0, |s| s.start));
        let message = e.message().trim().replace('\n', " ");
        if message.starts_with("unknown field") {
            SuiteError::UnknownKey {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        } else {
            SuiteError::Malformed {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        }
    })?;
    let invalid = |offset: usize, message: String| {
        let (line, column) = at(offset);
        SuiteError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            message,
        }
    };
    let requirement = |r: &Option<Spanned<String>>| -> Result<Option<Requirement>, SuiteError> {
        let Some(r) = r else { return Ok(None) };
        Requirement::parse(r.get_ref()).map(Some).map_err(|source| {
            let (line, column) = at(r.span().start);
            SuiteError::Requirement {
                path: path.to_path_buf(),
                line,
                column,
                expr: r.get_ref().clone(),
                source,
            }
        })
    };
    let existing = |p: &Spanned<PathBuf>, what: &'static str| -> Result<PathBuf, SuiteError> {
        let full = base.join(p.get_ref());
        std::fs::metadata(&full).map_err(|source| {
            let (line, column) = at(p.span().start);
            SuiteError::MissingFile {
                path: path.to_path_buf(),
                line,
                column,
                what,
                file: full.clone(),
                source,
            }
        })?;
        Ok(full)
    };
    let watchdog = match &raw.watchdog {
        None => None,
        Some(w) => Some(seconds(Some(*w.get_ref()), 0.0).ok_or_else(|| {
            invalid(
                w.span().start,
                "watchdog must be a positive number of seconds".to_string(),
            )
        })?),
    };
    let mut vms = BTreeMap::new();
    for (name, vm) in raw.vm {
        let kernel = existing(&vm.kernel, "kernel")?;
        let initrd = vm
            .initrd
            .as_ref()
            .map(|i| existing(i, "initrd"))
            .transpose()?;
        let boot_timeout = seconds(vm.boot_timeout, DEFAULT_BOOT_TIMEOUT).ok_or_else(|| {
            invalid(
                vm.kernel.span().start,
                format!("vm {name:?}: boot_timeout must be a positive number of seconds"),
            )
        })?;
        let ready = match &vm.ready {
            None => None,
            Some(p) if vm.agent != AgentKind::None => {
                return Err(invalid(
                    p.span().start,
                    format!("vm {name:?}: ready is for VMs without an agent (an agent VM is up when its agent answers)"),
                ))
            }
            Some(p) => Some(regex::Regex::new(p.get_ref()).map_err(|e| {
                invalid(
                    p.span().start,
                    format!(
                        "vm {name:?}: ready pattern: {}",
                        e.to_string().replace('\n', " ")
                    ),
                )
            })?),
        };
        let fork_at = vm.fork.as_ref().map_or(0, |f| f.span().start);
        let fork = vm.fork.as_ref().is_some_and(|f| *f.get_ref());
        if fork && vm.agent == AgentKind::None {
            return Err(invalid(
                fork_at,
                format!(
                    "vm {name:?}: fork = true needs an agent (agent = \"testguest\" or \"linux\")"
                ),
            ));
        }
        if fork && !vm.net.is_empty() {
            return Err(invalid(
                fork_at,
                format!("vm {name:?}: fork = true with a tap (net): a tap cannot be given to every fork; use fork = false"),
            ));
        }
        if !vm.setup.is_empty() && vm.agent == AgentKind::None {
            return Err(invalid(
                vm.kernel.span().start,
                format!("vm {name:?}: setup commands need an agent"),
            ));
        }
        if let Some(empty) = vm.setup.iter().position(Vec::is_empty) {
            return Err(invalid(
                vm.kernel.span().start,
                format!("vm {name:?}: setup command {empty} is an empty argv"),
            ));
        }
        let disks = vm
            .disks
            .iter()
            .map(|d| DiskEntry {
                path: base.join(&d.path),
                readonly: d.readonly,
            })
            .collect();
        vms.insert(
            name.clone(),
            VmSpec {
                name,
                kernel,
                initrd,
                cmdline: vm.cmdline.unwrap_or_default(),
                cpus: vm.cpus,
                memory: vm.memory,
                disks,
                net: vm.net,
                agent: vm.agent,
                boot_timeout,
                ready,
                setup: vm.setup,
                fork,
                requires: requirement(&vm.requires)?,
            },
        );
    }
    let mut cases: Vec<CaseSpec> = Vec::new();
    for t in raw.test {
        let start = t.name.span().start;
        let name = t.name.get_ref().clone();
        if name.is_empty() || name.chars().any(|c| c.is_control() || c == '/') {
            return Err(invalid(start, format!("test name {name:?}: expected a non-empty name without '/' or control characters")));
        }
        if cases.iter().any(|c| c.name == name) {
            return Err(invalid(start, format!("test {name:?} is defined twice")));
        }
        let Some(vm) = vms.get(t.vm.get_ref()) else {
            return Err(invalid(
                t.vm.span().start,
                format!(
                    "test {name:?}: no vm {:?} (the file has: {})",
                    t.vm.get_ref(),
                    vms.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        };
        let run = match (t.run, t.scenario) {
            (Some(argv), None) if !argv.is_empty() => CaseRun::Argv(argv),
            (None, Some(s)) if !s.trim().is_empty() => CaseRun::Scenario(s),
            _ => {
                return Err(invalid(
                    start,
                    format!(
                        "test {name:?}: give exactly one of run = [argv...] and scenario = \"...\""
                    ),
                ))
            }
        };
        match (&run, vm.agent) {
            (CaseRun::Argv(_), AgentKind::None) => {
                return Err(invalid(
                    start,
                    format!(
                        "test {name:?}: run = [...] needs vm {:?} to have an agent",
                        vm.name
                    ),
                ))
            }
            (CaseRun::Scenario(_), a) if a != AgentKind::None => {
                return Err(invalid(
                    start,
                    format!(
                        "test {name:?}: scenario needs a vm without an agent (vm {:?} has one)",
                        vm.name
                    ),
                ))
            }
            _ => {}
        }
        let timeout = seconds(t.timeout, DEFAULT_CASE_TIMEOUT).ok_or_else(|| {
            invalid(
                start,
                format!("test {name:?}: timeout must be a positive number of seconds"),
            )
        })?;
        let output = match &t.output {
            None => None,
            Some(p) => Some(regex::Regex::new(p.get_ref()).map_err(|e| {
                invalid(
                    p.span().start,
                    format!(
                        "test {name:?}: output pattern: {}",
                        e.to_string().replace('\n', " ")
                    ),
                )
            })?),
        };
        cases.push(CaseSpec {
            name,
            vm: t.vm.get_ref().clone(),
            run,
            timeout,
            exit_code: t.exit_code,
            output,
            requires: requirement(&t.requires)?,
            retries: t.retries,
            unstable: t.unstable,
            exclusive: t.exclusive,
        });
    }
    Ok(Suite {
        watchdog,
        vms,
        cases,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn kernel_dir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), b"x").unwrap();
        let file = dir.path().join("skiff-test.toml");
        (dir, file)
    }

    #[test]
    fn a_complete_suite_parses() {
        let (_d, file) = kernel_dir();
        let s = parse(
            &file,
            "watchdog = 90\n[vm.tg]\nkernel = \"k\"\nagent = \"testguest\"\nfork = true\nsetup = [[\"true\"]]\n\
             [[test]]\nname = \"a\"\nvm = \"tg\"\nrun = [\"exit=3\"]\nexit_code = 3\nretries = 2\n\
             requires = \"kvm & !hardware-kvm | cpus>=2\"\n",
        )
        .unwrap();
        assert_eq!(s.cases.len(), 1);
        assert_eq!(s.cases[0].run, CaseRun::Argv(vec!["exit=3".into()]));
        assert!(s.vms["tg"].fork);
        assert_eq!(s.cases[0].retries, 2);
        assert_eq!(s.watchdog, Some(Duration::from_secs(90)));
    }

    #[test]
    fn errors_carry_line_and_column() {
        let (_d, file) = kernel_dir();
        let e = parse(&file, "[vm.tg]\nkernel = \"k\"\ncolour = 1\n").unwrap_err();
        assert!(
            matches!(
                e,
                SuiteError::UnknownKey {
                    line: 3,
                    column: 1,
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(&file, "[vm.tg]\nkernel = \n").unwrap_err();
        assert!(matches!(e, SuiteError::Malformed { line: 2, .. }), "{e}");
        let e = parse(&file, "[vm.tg]\nkernel = \"nope\"\n").unwrap_err();
        assert!(
            matches!(
                e,
                SuiteError::MissingFile {
                    line: 2,
                    column: 10,
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(
            &file,
            "[vm.tg]\nkernel = \"k\"\n[[test]]\nname = \"a\"\nvm = \"tg\"\nscenario = \"hello\"\nrequires = \"kvm &\"\n",
        )
        .unwrap_err();
        assert!(matches!(e, SuiteError::Requirement { line: 7, .. }), "{e}");
        let e = parse(
            &file,
            "[vm.tg]\nkernel = \"k\"\n[[test]]\nname = \"a\"\nvm = \"x\"\nscenario = \"hello\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("no vm \"x\""), "{e}");
        let e = parse(&file, "watchdog = -1\n[vm.tg]\nkernel = \"k\"\n").unwrap_err();
        assert!(
            matches!(
                e,
                SuiteError::Invalid {
                    line: 1,
                    column: 12,
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(
            &file,
            "[vm.tg]\nkernel = \"k\"\nagent = \"testguest\"\nready = \"up\"\n",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("ready is for VMs without an agent"),
            "{e}"
        );
    }
}
