//! The desired-state document parser: any input either parses or is refused with
//! located errors, never panics; whatever parses exports to a document that parses back
//! to the same state.
#![no_main]

use basalt_config::DesiredState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(state) = DesiredState::from_toml(text) {
        let exported = state.to_toml();
        let again = DesiredState::from_toml(&exported).expect("an export parses");
        assert_eq!(state, again);
    }
});
