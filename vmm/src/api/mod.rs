//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (`--api-socket PATH`), usable
//! with `curl --unix-socket PATH` and with `skiff ctl`.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `GET /vm` | | `{"state": "running"\|"paused", "vcpus", "memory_bytes", "snapshot_in_progress", "memory_private"}` |
//! | `PUT /vm/pause` | | `{"state": "paused", "pause_ms"}` |
//! | `PUT /vm/resume` | | `{"state": "running"}` |
//! | `PUT /vm/snapshot` | `{"dir": "/abs/path", "stop": false, "live": false, "diff": false}` | `{"dir", "kind", "parent", "bytes_written", "time_ms", "pause_ms", "state_ms", "write_ms", "blackout_ms", "live": {"passes": [{"pages", "bytes", "ms"}], "precopy_ms", "final_pass"} or null, "regions": [{"guest_address", "size", "file", "method", "copied_bytes"}], "stopped", "notes"}` |
//! | `GET /vm/snapshot/progress` | | `{"in_progress": true, "bytes_done", "bytes_total", "elapsed_ms"}` or `{"in_progress": false}` |
//! | `PUT /vm/shutdown` | | `{"state": "stopping"}` |
//!
//! Errors answer 4xx or 5xx with `{"error": "one line"}`: 400 bad request (bad JSON, a relative
//! or existing directory), 404 unknown path, 405 wrong method, 409 conflict (a snapshot is
//! already being written; resume during a snapshot; a diff with no earlier snapshot), 501 devices whose state cannot be saved
//! yet, 500 anything else.
//!
//! - `http`: request parsing and response formatting.
//! - `server`: the socket, as an event-loop subscriber that queues parsed requests.
//! - `client`: the `skiff ctl` side.
//! - `progress_bar`: `skiff ctl snapshot`'s progress bar on a terminal.

pub mod client;
pub mod http;
pub mod progress_bar;
pub mod server;

use std::path::PathBuf;

use serde::Deserialize;

use http::Request;

use crate::snapshot::SnapshotRequest;

/// A request the VM has to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /vm`.
    Status,
    /// `PUT /vm/pause`.
    Pause,
    /// `PUT /vm/resume`.
    Resume,
    /// `PUT /vm/snapshot`.
    Snapshot(SnapshotRequest),
    /// `GET /vm/snapshot/progress`.
    SnapshotProgress,
    /// `PUT /vm/shutdown`.
    Shutdown,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    dir: PathBuf,
    #[serde(default)]
    stop: bool,
    #[serde(default)]
    live: bool,
    #[serde(default)]
    diff: bool,
}

/// Maps a request to a route, or to the error status and message to answer with.
pub fn route(req: &Request) -> Result<Route, (u16, String)> {
    let check = |method: &str| {
        if req.method == method {
            Ok(())
        } else {
            Err((
                405,
                format!("{} {} is not allowed; use {method}", req.method, req.path),
            ))
        }
    };
    let want = |method: &str, route: Route| check(method).map(|()| route);
    match req.path.trim_end_matches('/') {
        "/vm" => want("GET", Route::Status),
        "/vm/pause" => want("PUT", Route::Pause),
        "/vm/resume" => want("PUT", Route::Resume),
        "/vm/shutdown" => want("PUT", Route::Shutdown),
        "/vm/snapshot/progress" => want("GET", Route::SnapshotProgress),
        "/vm/snapshot" => {
            check("PUT")?;
            let body: SnapshotBody = serde_json::from_slice(&req.body).map_err(|e| {
                (
                    400,
                    format!("snapshot body must be {{\"dir\": \"/absolute/path\", \"stop\": false, \"live\": false, \"diff\": false}}: {e}"),
                )
            })?;
            Ok(Route::Snapshot(SnapshotRequest {
                dir: body.dir,
                stop: body.stop,
                live: body.live,
                diff: body.diff,
            }))
        }
        _ => Err((404, format!("no such route: {} {}", req.method, req.path))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn routes() {
        assert_eq!(route(&req("GET", "/vm", "")), Ok(Route::Status));
        assert_eq!(route(&req("PUT", "/vm/pause/", "")), Ok(Route::Pause));
        assert_eq!(
            route(&req(
                "PUT",
                "/vm/snapshot",
                r#"{"dir": "/s", "stop": true}"#
            )),
            Ok(Route::Snapshot(SnapshotRequest {
                dir: "/s".into(),
                stop: true,
                live: false,
                diff: false,
            }))
        );
        assert_eq!(
            route(&req(
                "PUT",
                "/vm/snapshot",
                r#"{"dir": "/s", "live": true, "diff": true}"#
            )),
            Ok(Route::Snapshot(SnapshotRequest {
                dir: "/s".into(),
                stop: false,
                live: true,
                diff: true,
            }))
        );
        assert_eq!(
            route(&req("GET", "/vm/snapshot/progress", "")),
            Ok(Route::SnapshotProgress)
        );
        assert_eq!(route(&req("GET", "/vm/pause", "")).unwrap_err().0, 405);
        assert_eq!(route(&req("GET", "/nope", "")).unwrap_err().0, 404);
        assert_eq!(route(&req("PUT", "/vm/snapshot", "{}")).unwrap_err().0, 400);
        assert_eq!(
            route(&req(
                "PUT",
                "/vm/snapshot",
                r#"{"dir": "/s", "incremental": true}"#
            ))
            .unwrap_err()
            .0,
            400
        );
    }
}
