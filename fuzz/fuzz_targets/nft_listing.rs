//! The parsers of `nft -j` output (egressd's table listing, the ruleset's objects, counters) on
//! arbitrary text: parsed or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        egressd::dataplane::nft::fuzz_parsers(text);
    }
});
