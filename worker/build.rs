//! Link libtorch so the binary starts without LD_LIBRARY_PATH and keeps `libtorch_cuda.so` on
//! GPU machines (the linker's `--as-needed` would otherwise drop it; docs/precision.md §GPU).
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rerun-if-changed=build.rs");
}
