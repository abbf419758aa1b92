//! Fuzzes the switch's frame parser, the rtnetlink link-message parser and the
//! forwarding core: arbitrary bytes become a sequence of frames from arbitrary ports,
//! link changes, guest MAC changes and timer ticks against a fixed switch, and every
//! decision is checked (never back to the input port, never uplink to uplink, at most
//! one uplink per frame, only ports of the frame's VLAN, no duplicates).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    basalt_net::pipeline::fuzzing::run(data);
});
