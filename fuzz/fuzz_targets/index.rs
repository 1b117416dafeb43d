//! The `model.safetensors.index.json` reader on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    fusekit::fuzzing::index(bytes);
});
