//! Fuzz target: the `key=value` option parsers (`--memory`, `--disk`, `--net`, `--vhost-user`,
//! `--serial`) and the plain values (`--cpus`, `--timeout`, sizes). The first byte picks the
//! parser, the rest is the option's text. A refusal must be one line; an accepted size must
//! be what its digits and suffix say.
#![no_main]

use std::error::Error;
use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use vmm::config::{
    parse_cpus, parse_size, parse_timeout, DiskArg, MemoryArg, NetConfig, SerialConfig,
    VhostUserArg, MAX_VCPUS,
};

fn one_line<T>(r: Result<T, impl Error>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            let line = devices::error_chain(&e);
            assert!(!line.contains('\n'), "a multi-line error: {line:?}");
            None
        }
    }
}

fn parse<T: FromStr>(s: &str) -> Option<T>
where
    T::Err: Error,
{
    one_line(T::from_str(s))
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, text)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(text) else {
        return;
    };
    match which % 8 {
        0 => {
            if let Some(m) = parse::<MemoryArg>(s) {
                let size = s
                    .split(',')
                    .filter_map(|p| match p.split_once('=') {
                        Some(("size", v)) => Some(v),
                        None if !p.is_empty() => Some(p),
                        _ => None,
                    })
                    .last()
                    .and_then(|v| parse_size(v).ok());
                assert_eq!(Some(m.0.size), size, "--memory {s:?}");
            }
        }
        1 => drop(parse::<DiskArg>(s)),
        2 => drop(parse::<NetConfig>(s)),
        3 => drop(parse::<VhostUserArg>(s)),
        4 => drop(parse::<SerialConfig>(s)),
        5 => {
            if let Some(n) = one_line(parse_cpus(s)) {
                assert!((1..=MAX_VCPUS).contains(&n), "--cpus {n}");
            }
        }
        6 => {
            if let Some(t) = one_line(parse_timeout(s)) {
                assert!(!t.is_zero(), "--timeout {s:?} gave zero");
            }
        }
        _ => {
            if let Some(n) = one_line(parse_size(s)) {
                assert_eq!(parse_size(&n.to_string()), Ok(n), "size {s:?} = {n}");
            }
        }
    }
});
