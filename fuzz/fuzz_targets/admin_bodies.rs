//! The admin API's request bodies (JSON and TOML applies, label changes, member additions) on
//! arbitrary bytes: accepted or refused with a message, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = egressd::config::parse_apply_body(data, false, "request body");
    let _ = egressd::config::parse_apply_body(data, true, "request body");
    let _ = egressd::config::parse_label_change(data, "request body");
    let _ = egressd::config::parse_member_add(data, "request body");
});
