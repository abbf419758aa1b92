// Links the system libiscsi (Debian: libiscsi-dev). The FFI declarations are written by
// hand in src/ffi.rs (no bindgen); a test checks their struct layout against the C
// header with the system C compiler.
fn main() {
    println!("cargo:rustc-link-lib=iscsi");
    println!("cargo:rerun-if-changed=build.rs");
}
