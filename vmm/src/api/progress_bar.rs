//! `skiff ctl snapshot`: waiting for a snapshot's answer, with a progress bar on a terminal.
//!
//! The snapshot request waits on its own connection for its answer (which comes when the
//! snapshot is complete, however long that takes), while this thread polls
//! `GET /vm/snapshot/progress` on short-lived connections. Each poll must be answered within
//! `ctl --timeout`: that is how a hung server is told from a long snapshot. When stderr is a
//! terminal the counters are drawn with `indicatif`: bytes of memory written out of the touched
//! total, the rate and the time; without one `skiff ctl` prints nothing but the answer. Not
//! here: the counters themselves (`snapshot/progress.rs`).

use std::path::Path;
use std::thread;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::client::{request, request_within, ClientError};

/// How often the counters are asked for.
const POLL: Duration = Duration::from_millis(100);
/// The bar's layout.
const TEMPLATE: &str = "snapshot [{bar:40}] {binary_bytes}/{binary_total_bytes} \
                        ({binary_bytes_per_sec}, {elapsed})";

/// Sends `PUT /vm/snapshot` with `body` and waits for the answer while every progress poll is
/// answered within `timeout`; with `draw`, draws the write's progress on stderr meanwhile.
/// Returns the answer as `client::request` does.
pub fn snapshot_with_progress(
    socket: &Path,
    body: &str,
    timeout: Duration,
    draw: bool,
) -> Result<(u16, String), ClientError> {
    let (sock, body) = (socket.to_path_buf(), body.to_string());
    let answer = thread::Builder::new()
        .name("skiff-ctl-snapshot".into())
        .spawn(move || request(&sock, "PUT", "/vm/snapshot", Some(&body)))
        .map_err(|source| ClientError::Io {
            path: socket.to_path_buf(),
            source,
        })?;
    let target = if draw {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(0), target);
    if let Ok(style) = ProgressStyle::with_template(TEMPLATE) {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut seen = false;
    while !answer.is_finished() {
        thread::sleep(POLL);
        match poll(socket, timeout) {
            Ok(Some((done, total))) => {
                seen = true;
                bar.set_length(total);
                bar.set_position(done);
            }
            Ok(None) => {}
            // The answer may have come while the poll waited; else the server is silent.
            Err(e @ ClientError::Timeout { .. }) if !answer.is_finished() => {
                bar.finish_and_clear();
                return Err(e);
            }
            Err(_) => {}
        }
    }
    let result = answer.join().unwrap_or_else(|_| {
        Err(ClientError::RequestPanicked {
            path: socket.to_path_buf(),
        })
    });
    match &result {
        Ok((status, _)) if draw && seen && (200..300).contains(status) => {
            bar.set_position(bar.length().unwrap_or(0));
            bar.finish();
            // indicatif leaves the cursor after the bar: the answer starts on a line of its own.
            eprintln!();
        }
        // A snapshot too short to be seen, or one that failed: no bar left behind.
        _ => bar.finish_and_clear(),
    }
    result
}

/// The running snapshot's `(bytes_done, bytes_total)`, or `None` when none runs or the answer
/// is unusable; an error when the server did not answer within `timeout`.
fn poll(socket: &Path, timeout: Duration) -> Result<Option<(u64, u64)>, ClientError> {
    let (status, body) = request_within(socket, "GET", "/vm/snapshot/progress", None, timeout)?;
    if status != 200 {
        return Ok(None);
    }
    Ok(parse_progress(&body))
}

fn parse_progress(body: &str) -> Option<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    if v.get("in_progress")?.as_bool() != Some(true) {
        return None;
    }
    Some((
        v.get("bytes_done")?.as_u64()?,
        v.get("bytes_total")?.as_u64()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::job::ProgressStatus;
    use crate::snapshot::progress::ProgressReading;

    #[test]
    fn reads_what_the_server_sends() {
        let running = ProgressStatus {
            in_progress: true,
            counters: Some(ProgressReading {
                bytes_done: 5,
                bytes_total: 9,
            }),
            elapsed_ms: Some(1.5),
        };
        let idle = ProgressStatus {
            in_progress: false,
            counters: None,
            elapsed_ms: None,
        };
        let text = serde_json::to_string(&running).unwrap();
        assert_eq!(parse_progress(&text), Some((5, 9)), "{text}");
        let text = serde_json::to_string(&idle).unwrap();
        assert_eq!(text, r#"{"in_progress":false}"#);
        assert_eq!(parse_progress(&text), None);
        assert_eq!(parse_progress("garbage"), None);
    }
}
