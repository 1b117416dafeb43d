//! The safetensors validator on arbitrary bytes: it must refuse or accept without panicking,
//! and what it accepts must describe ranges that lie inside the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    fusekit::fuzzing::safetensors_header(bytes);
});
