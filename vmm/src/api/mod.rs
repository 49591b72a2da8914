//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (`--api-socket PATH`), usable
//! with `curl --unix-socket PATH` and with `skiff ctl`.
//!
//! The routes are the `ROUTES` table below; `docs/api.md` describes them for users and
//! `docs/api.openapi.json` for machines (a test keeps that file equal to `ROUTES`).
//!
//! - `http`: request parsing and response formatting.
//! - `server`: the socket, as an event-loop subscriber that queues parsed requests.
//! - `client`: the `skiff ctl` side.
//! - `exec`: `POST /vm/exec`'s body and answer; `exec_worker`: running it off the event loop.
//! - `progress_bar`: `skiff ctl snapshot`'s progress bar on a terminal.

pub mod client;
pub mod exec;
pub mod exec_worker;
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
    /// `POST /vm/exec`.
    Exec(exec::ExecRequest),
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

/// Every route the server answers, as (method, path). `route` looks requests up here first, so
/// a path missing from this table is a 404 whatever `route` matches; a test checks this table
/// against `docs/api.openapi.json`.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/vm"),
    ("PUT", "/vm/pause"),
    ("PUT", "/vm/resume"),
    ("PUT", "/vm/shutdown"),
    ("GET", "/vm/snapshot/progress"),
    ("PUT", "/vm/snapshot"),
    ("POST", "/vm/exec"),
];

/// Maps a request to a route, or to the error status and message to answer with.
pub fn route(req: &Request) -> Result<Route, (u16, String)> {
    let path = req.path.trim_end_matches('/');
    let Some(&(method, _)) = ROUTES.iter().find(|(_, p)| *p == path) else {
        return Err((404, format!("no such route: {} {}", req.method, req.path)));
    };
    if req.method != method {
        return Err((
            405,
            format!("{} {} is not allowed; use {method}", req.method, req.path),
        ));
    }
    match path {
        "/vm" => Ok(Route::Status),
        "/vm/pause" => Ok(Route::Pause),
        "/vm/resume" => Ok(Route::Resume),
        "/vm/shutdown" => Ok(Route::Shutdown),
        "/vm/snapshot/progress" => Ok(Route::SnapshotProgress),
        "/vm/exec" => exec::parse(&req.body)
            .map(Route::Exec)
            .map_err(|e| (400, e)),
        "/vm/snapshot" => {
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
        assert_eq!(
            route(&req("POST", "/vm/exec", r#"{"argv": ["true"]}"#)),
            Ok(Route::Exec(exec::parse(br#"{"argv": ["true"]}"#).unwrap()))
        );
        assert_eq!(route(&req("POST", "/vm/exec", "{")).unwrap_err().0, 400);
        assert_eq!(route(&req("PUT", "/vm/exec", "")).unwrap_err().0, 405);
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

    /// The OpenAPI description in docs/ lists exactly the routes the server answers, and each
    /// one (with the description's example body) reaches a route rather than a 404 or 405.
    #[test]
    fn openapi_description_matches_routes() {
        let spec: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/api.openapi.json"))
                .expect("docs/api.openapi.json is JSON");
        let paths = spec["paths"].as_object().expect("paths");
        let mut described = Vec::new();
        for (path, ops) in paths {
            for (method, op) in ops.as_object().expect("operations") {
                let method = method.to_uppercase();
                let body = op["requestBody"]["content"]["application/json"]["example"].to_string();
                let body = if body == "null" { String::new() } else { body };
                let answer = route(&req(&method, path, &body));
                assert!(answer.is_ok(), "{method} {path}: {answer:?}");
                described.push((method, path.clone()));
            }
        }
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| ((*m).to_string(), (*p).to_string()))
            .collect();
        described.sort();
        served.sort();
        assert_eq!(described, served);
    }
}
