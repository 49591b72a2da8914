//! `POST /vm/exec`: the request body, parsed and checked once, and the answer's JSON.
//!
//! The body is untrusted: unknown fields, an empty `argv`, a NUL byte in any string (the
//! guest takes them as C strings), an `env` entry that is not `KEY=VALUE`, both stdin forms,
//! stdin that is not base64, and a timeout that is not a positive number of seconds are each
//! refused with one line naming the field. The HTTP layer already caps the body at 64 KiB,
//! which bounds everything here. Running the command is `exec_worker`'s job.

use std::time::Duration;

use agent_protocol::ExitStatus;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// The most bytes of stdout, and separately of stderr, an answer carries; the rest is read
/// from the agent (so the command is never blocked on it) and dropped, and the answer says
/// `stdout_truncated` / `stderr_truncated`.
pub const MAX_CAPTURE_BYTES: usize = 1 << 20;
/// The longest `timeout_secs` accepted (a day).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// How the answer carries stdout and stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputEncoding {
    /// As JSON strings; bytes that are not UTF-8 become U+FFFD.
    #[default]
    Text,
    /// As base64 (standard alphabet, padded): the exact bytes.
    Base64,
}

/// A checked `POST /vm/exec` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries (empty: the agent's environment).
    pub env: Vec<String>,
    /// The working directory in the guest (empty: the agent's).
    pub cwd: String,
    /// The command's whole standard input (it ends after these bytes).
    pub stdin: Vec<u8>,
    /// The command's time limit; the agent kills its process group when it passes.
    pub timeout: Option<Duration>,
    /// How the answer carries the output.
    pub output: OutputEncoding,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    argv: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    stdin_base64: Option<String>,
    #[serde(default)]
    timeout_secs: Option<f64>,
    #[serde(default)]
    output: OutputEncoding,
}

/// The body's shape, for error messages.
const SHAPE: &str = r#"{"argv": ["cmd", "arg"], "env": ["K=V"], "cwd": "/dir", "stdin": "text" or "stdin_base64": "...", "timeout_secs": 10, "output": "text"|"base64"}"#;

/// Parses and checks a request body; the error is the one line a 400 answer carries.
pub fn parse(body: &[u8]) -> Result<ExecRequest, String> {
    let body: ExecBody =
        serde_json::from_slice(body).map_err(|e| format!("exec body must be {SHAPE}: {e}"))?;
    if body.argv.first().is_none_or(String::is_empty) {
        return Err("exec: argv must name a program (a non-empty first entry)".into());
    }
    for (i, arg) in body.argv.iter().enumerate() {
        if arg.contains('\0') {
            return Err(format!("exec: argv[{i}] contains a NUL byte"));
        }
    }
    for entry in &body.env {
        if entry.contains('\0') || entry.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
            return Err(format!("exec: env entry {entry:?} is not KEY=VALUE"));
        }
    }
    let cwd = body.cwd.unwrap_or_default();
    if cwd.contains('\0') {
        return Err("exec: cwd contains a NUL byte".into());
    }
    let stdin = match (body.stdin, body.stdin_base64) {
        (Some(_), Some(_)) => return Err("exec: give stdin or stdin_base64, not both".into()),
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| format!("exec: stdin_base64 is not base64: {e}"))?,
        (None, None) => Vec::new(),
    };
    let timeout = match body.timeout_secs {
        None => None,
        Some(s) if s.is_finite() && s > 0.0 && s <= MAX_TIMEOUT.as_secs_f64() => {
            Some(Duration::from_secs_f64(s))
        }
        Some(s) => {
            return Err(format!(
                "exec: timeout_secs {s} is not a number of seconds above 0 and at most {}",
                MAX_TIMEOUT.as_secs()
            ))
        }
    };
    Ok(ExecRequest {
        argv: body.argv,
        env: body.env,
        cwd,
        stdin,
        timeout,
        output: body.output,
    })
}

/// One output stream as the answer carries it: at most `MAX_CAPTURE_BYTES` kept, the rest
/// counted.
#[derive(Debug, Default)]
pub struct CapturedOutput {
    kept: Vec<u8>,
    dropped: u64,
}

impl CapturedOutput {
    /// Whether bytes were dropped.
    pub fn truncated(&self) -> bool {
        self.dropped > 0
    }

    /// The kept bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.kept
    }
}

impl std::io::Write for CapturedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = MAX_CAPTURE_BYTES.saturating_sub(self.kept.len());
        let take = room.min(buf.len());
        self.kept.extend_from_slice(&buf[..take]);
        self.dropped += (buf.len() - take) as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The 200 answer: how the command ended and its output.
#[derive(Debug, Serialize)]
pub struct ExecAnswer {
    /// The exit code, when the command exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// Whether its timeout passed (the agent killed its process group).
    pub timed_out: bool,
    /// Its standard output (see `output`).
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
    /// Whether stdout was longer than `MAX_CAPTURE_BYTES` and cut there.
    pub stdout_truncated: bool,
    /// Whether stderr was.
    pub stderr_truncated: bool,
    /// How `stdout` and `stderr` are encoded.
    pub output: OutputEncoding,
    /// From the request's arrival to the command's end.
    pub duration_ms: f64,
}

impl ExecAnswer {
    /// The answer for a command that ended with `status`.
    pub fn new(
        status: ExitStatus,
        stdout: &CapturedOutput,
        stderr: &CapturedOutput,
        output: OutputEncoding,
        duration: Duration,
    ) -> Self {
        let (exit_code, signal, timed_out) = match status {
            ExitStatus::Code(c) => (Some(c), None, false),
            ExitStatus::Signal(s) => (None, Some(s), false),
            ExitStatus::TimedOut => (None, None, true),
        };
        let encode = |b: &[u8]| match output {
            OutputEncoding::Text => String::from_utf8_lossy(b).into_owned(),
            OutputEncoding::Base64 => base64::engine::general_purpose::STANDARD.encode(b),
        };
        Self {
            exit_code,
            signal,
            timed_out,
            stdout: encode(stdout.bytes()),
            stderr: encode(stderr.bytes()),
            stdout_truncated: stdout.truncated(),
            stderr_truncated: stderr.truncated(),
            output,
            duration_ms: duration.as_secs_f64() * 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_full_body_parses() {
        let r = parse(
            br#"{"argv": ["grep", "x"], "env": ["A=1", "B="], "cwd": "/tmp",
                 "stdin_base64": "eHl6AA==", "timeout_secs": 1.5, "output": "base64"}"#,
        )
        .unwrap();
        assert_eq!(r.argv, ["grep", "x"]);
        assert_eq!(r.env, ["A=1", "B="]);
        assert_eq!(r.cwd, "/tmp");
        assert_eq!(r.stdin, b"xyz\0");
        assert_eq!(r.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(r.output, OutputEncoding::Base64);
        let r = parse(br#"{"argv": ["true"], "stdin": "line\n"}"#).unwrap();
        assert_eq!((r.stdin.as_slice(), r.timeout), (&b"line\n"[..], None));
        assert_eq!((r.cwd.as_str(), r.output), ("", OutputEncoding::Text));
    }

    #[test]
    fn bad_bodies_are_refused_with_the_field_named() {
        for (body, want) in [
            (&br#"{"argv": ["true"]"#[..], "exec body must be"),
            (br#"not json"#, "exec body must be"),
            (br#"{"argv": "true"}"#, "exec body must be"),
            (
                br#"{"argv": ["true"], "shell": true}"#,
                "unknown field `shell`",
            ),
            (br#"{"argv": []}"#, "argv must name a program"),
            (br#"{"argv": [""]}"#, "argv must name a program"),
            (br#"{"argv": ["a", "b\u0000"]}"#, "argv[1] contains a NUL"),
            (
                br#"{"argv": ["a"], "env": ["NOEQUALS"]}"#,
                "\"NOEQUALS\" is not KEY=VALUE",
            ),
            (br#"{"argv": ["a"], "env": ["=x"]}"#, "is not KEY=VALUE"),
            (
                br#"{"argv": ["a"], "cwd": "/\u0000"}"#,
                "cwd contains a NUL",
            ),
            (
                br#"{"argv": ["a"], "stdin": "", "stdin_base64": ""}"#,
                "not both",
            ),
            (br#"{"argv": ["a"], "stdin_base64": "***"}"#, "not base64"),
            (br#"{"argv": ["a"], "timeout_secs": 0}"#, "timeout_secs 0"),
            (br#"{"argv": ["a"], "timeout_secs": -1}"#, "timeout_secs -1"),
            (
                br#"{"argv": ["a"], "timeout_secs": 1e300}"#,
                "at most 86400",
            ),
            (
                br#"{"argv": ["a"], "output": "hex"}"#,
                "unknown variant `hex`",
            ),
        ] {
            let e = parse(body).unwrap_err();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(body));
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn capture_keeps_the_cap_and_counts_the_rest() {
        let mut out = CapturedOutput::default();
        let chunk = vec![b'a'; 300_000];
        for _ in 0..4 {
            assert_eq!(out.write(&chunk).unwrap(), chunk.len());
        }
        assert_eq!(out.bytes().len(), MAX_CAPTURE_BYTES);
        assert!(out.truncated());
        let mut small = CapturedOutput::default();
        small.write_all(b"ok").unwrap();
        assert!(!small.truncated());
    }

    #[test]
    fn answers_encode_the_status_and_output() {
        let mut out = CapturedOutput::default();
        out.write_all(&[0xff, b'a']).unwrap();
        let err = CapturedOutput::default();
        let a = ExecAnswer::new(
            ExitStatus::Signal(9),
            &out,
            &err,
            OutputEncoding::Text,
            Duration::from_millis(2),
        );
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["exit_code"], serde_json::Value::Null);
        assert_eq!(v["signal"], 9);
        assert_eq!(v["timed_out"], false);
        assert_eq!(v["stdout"], "\u{fffd}a");
        assert_eq!(v["output"], "text");
        let a = ExecAnswer::new(
            ExitStatus::TimedOut,
            &out,
            &err,
            OutputEncoding::Base64,
            Duration::ZERO,
        );
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(
            (v["timed_out"].clone(), v["stdout"].clone()),
            (true.into(), "/2E=".into())
        );
    }
}
