//! Fuzz target: the control API's HTTP request parser. The first input byte says where the
//! bytes are split into two reads; the server parses what it has after each. A complete request
//! must not change when more bytes arrive, a body must respect its limit, and a refusal must
//! carry a status the server answers with.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::http::{parse_request, Parsed, MAX_BODY_BYTES};

fn check(p: &Parsed) {
    match p {
        Parsed::Incomplete => {}
        Parsed::Complete(r) => {
            assert!(
                r.body.len() <= MAX_BODY_BYTES,
                "a {}-byte body",
                r.body.len()
            );
            assert!(!r.path.contains('?'), "a query string in {:?}", r.path);
        }
        Parsed::Invalid(status, reason) => {
            assert!((400..500).contains(status), "status {status}");
            assert!(!reason.contains('\n'), "a multi-line reason: {reason:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(bytes.len());
    let first = parse_request(&bytes[..at]);
    let whole = parse_request(bytes);
    check(&first);
    check(&whole);
    if let Parsed::Complete(r) = first {
        assert_eq!(
            whole,
            Parsed::Complete(r),
            "more bytes changed a complete request"
        );
    }
});
