//! Fuzz target: the bytes a (malicious) vhost-user backend sends back to skiff's frontend,
//! run through the whole request sequence of `devices::vhost_user::fuzzing::frontend_replies`
//! over a socket pair. Any panic, hang or sanitizer report is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|replies: &[u8]| {
    let _ = devices::vhost_user::fuzzing::frontend_replies(replies);
});
