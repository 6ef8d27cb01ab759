//! `uniffi-bindgen`: generates the Swift, Kotlin and Python bindings of `meridian-ffi`
//! from its built library, with the UniFFI version the library was built with.

fn main() {
    uniffi::uniffi_bindgen_main()
}
