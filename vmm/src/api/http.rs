//! Just enough HTTP/1.1 for the control API: parse one request (headers with `httparse`, a body
//! by `Content-Length`), and format one response. Every connection carries one request and is
//! closed after the response (`Connection: close`), which `curl` and `skiff ctl` both expect.
//! Requests are untrusted: the whole header block and the body have size limits,
//! `Content-Length` is plain decimal digits (one value), and nothing here panics.

/// Largest header block accepted (request line and headers, up to the blank line).
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Largest body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 32;

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
}

/// The outcome of parsing the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A whole request.
    Complete(Request),
    /// Not a request this server takes: the status to answer and a one-line reason.
    Invalid(u16, String),
}

/// Parses `buf`, the bytes a connection has sent so far.
pub fn parse_request(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEADER_BYTES => {
            return Parsed::Invalid(431, "request headers are too large".into())
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEADER_BYTES => {
            return Parsed::Invalid(431, "request headers are too large".into())
        }
        Ok(httparse::Status::Partial) => return Parsed::Incomplete,
        Err(e) => return Parsed::Invalid(400, format!("malformed HTTP request: {e}")),
    };
    let mut length: Option<usize> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = match content_length(h.value) {
                Ok(n) => n,
                Err(invalid) => return invalid,
            };
            if length.is_some_and(|l| l != n) {
                return Parsed::Invalid(400, "conflicting Content-Length headers".into());
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Invalid(
                411,
                "chunked bodies are not supported; send Content-Length".into(),
            );
        }
    }
    let length = length.unwrap_or(0);
    let Some(body) = buf.get(head_len..) else {
        return Parsed::Incomplete;
    };
    if body.len() < length {
        return Parsed::Incomplete;
    }
    let path = req.path.unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    Parsed::Complete(Request {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        body: body[..length].to_vec(),
    })
}

/// A `Content-Length` value: decimal digits only (no sign, no spaces inside, no hex), at most
/// `MAX_BODY_BYTES`.
fn content_length(value: &[u8]) -> Result<usize, Parsed> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        let shown = String::from_utf8_lossy(value);
        return Err(Parsed::Invalid(
            400,
            format!("invalid Content-Length {shown:?}: want decimal digits"),
        ));
    }
    // Digits only, so a failed parse is an overflow: far too large either way.
    match std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<usize>().ok())
    {
        Some(n) if n <= MAX_BODY_BYTES => Ok(n),
        _ => Err(Parsed::Invalid(
            413,
            format!(
                "request body of {} bytes is too large",
                String::from_utf8_lossy(digits)
            ),
        )),
    }
}

/// The reason phrase for the statuses the API uses.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// A complete response with a JSON body.
pub fn response(status: u16, json: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        reason(status),
        json.len() + 1
    )
    .into_bytes()
    .into_iter()
    .chain(std::iter::once(b'\n'))
    .collect()
}

/// `{"error": "<message>"}` as JSON text.
pub fn error_body(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_curl_request_with_and_without_body() {
        let get =
            b"GET /vm HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/7.88\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            parse_request(get),
            Parsed::Complete(Request {
                method: "GET".into(),
                path: "/vm".into(),
                body: vec![]
            })
        );
        let put = b"PUT /vm/snapshot?x=1 HTTP/1.1\r\nContent-Length: 13\r\n\r\n{\"dir\":\"/x\"}\n";
        let Parsed::Complete(r) = parse_request(put) else {
            panic!("not complete")
        };
        assert_eq!(r.path, "/vm/snapshot");
        assert_eq!(r.body, b"{\"dir\":\"/x\"}\n");
        assert_eq!(parse_request(&put[..put.len() - 3]), Parsed::Incomplete);
        assert_eq!(
            parse_request(b"GET /vm HTTP/1.1\r\nHost"),
            Parsed::Incomplete
        );
    }

    #[test]
    fn refuses_what_it_does_not_take() {
        assert!(matches!(
            parse_request(b"\x00\x01 garbage\r\n\r\n"),
            Parsed::Invalid(400, _)
        ));
        let big = b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n";
        assert!(matches!(parse_request(big), Parsed::Invalid(413, _)));
        let chunked = b"PUT /vm/snapshot HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(parse_request(chunked), Parsed::Invalid(411, _)));
        let mut long = b"GET /vm HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES + 1));
        assert!(matches!(parse_request(&long), Parsed::Invalid(431, _)));
        // A complete header block is held to the same limit: 70 KB in a few long headers.
        let mut block = b"GET /vm HTTP/1.1\r\n".to_vec();
        for i in 0..7 {
            block.extend(format!("X-{i}: ").as_bytes());
            block.extend(std::iter::repeat_n(b'a', 10_000));
            block.extend(b"\r\n");
        }
        block.extend(b"\r\n");
        assert!(matches!(parse_request(&block), Parsed::Invalid(431, _)));
        // Content-Length is plain digits.
        for bad in ["+2", "-1", "0x10", "2 2", "", "1e3", " +2"] {
            let req = format!("PUT /vm/pause HTTP/1.1\r\nContent-Length: {bad}\r\n\r\nxx");
            assert!(
                matches!(parse_request(req.as_bytes()), Parsed::Invalid(400, _)),
                "Content-Length {bad:?} accepted"
            );
        }
        let huge = b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert!(matches!(parse_request(huge), Parsed::Invalid(413, _)));
        let twice = b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nxxx";
        assert!(matches!(parse_request(twice), Parsed::Invalid(400, _)));
        let same = b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nxx";
        assert!(matches!(parse_request(same), Parsed::Complete(_)));
    }

    #[test]
    fn response_has_length_and_json() {
        let r = String::from_utf8(response(409, &error_body("busy \"now\""))).unwrap();
        assert!(r.starts_with("HTTP/1.1 409 Conflict\r\n"), "{r}");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "busy \"now\"");
    }
}
