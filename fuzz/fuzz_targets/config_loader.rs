//! The configuration loader on arbitrary text: every input is a config or a list of errors,
//! never a panic (the file is an operator's, but check-config must survive any typo).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = egressd::config::parse_str(text, "fuzz.toml");
        let _ = egressd::config::parse_objects(text, "fuzz.toml");
    }
});
