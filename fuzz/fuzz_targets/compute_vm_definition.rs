//! VM definitions (`vm.json`, and the body of `POST /api/v1/vms`): any input either
//! parses and validates or is refused with a field-named error, never panics; whatever
//! is accepted round-trips through JSON and turns into a QEMU command line without
//! panicking.
#![no_main]

use basalt_compute::definition::VmDefinition;
use basalt_compute::qemu::{Accel, QemuCommand};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match VmDefinition::from_json(text) {
        Ok(def) => {
            let again = VmDefinition::from_json(&def.to_json()).expect("an accepted definition re-parses");
            assert_eq!(def, again);
            for i in 0..def.nics.len() {
                let mac = def.nic_mac(i).expect("every NIC has a MAC");
                assert_eq!(mac[0] & 1, 0, "unicast");
            }
            let _ = QemuCommand::build(&def, Path::new("/vms/x"), &[], &[], Accel::Tcg);
        }
        Err(e) => assert!(!e.field.is_empty()),
    }
});
