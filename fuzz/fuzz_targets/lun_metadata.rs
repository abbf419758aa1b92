//! Pool metadata decoding: superblocks, journal blocks and their records, checkpoint
//! bodies, and the state built from a checkpoint (with the same bytes replayed as
//! journal records on top), as `Pool::import` and `Pool::check` do it on a disk from
//! another appliance. Property: never panics, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    basalt_lun::fuzz_decode(data);
});
