//! Link libtorch so the binary starts without LD_LIBRARY_PATH and keeps `libtorch_cuda.so` on
//! GPU machines (TOOLCHAIN.md: `--as-needed` would otherwise drop it).
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rerun-if-changed=build.rs");
}
