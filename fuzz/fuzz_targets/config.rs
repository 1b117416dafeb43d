//! The YAML merge-config reader (multi-document recipes included) on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    fusekit::fuzzing::config(bytes);
});
