//! Compiles `trellis/v1/trellis.proto` (client + server) and writes the file descriptor set that
//! gRPC reflection serves.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() && std::path::Path::new("/usr/bin/protoc").exists() {
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("PROTOC", "/usr/bin/protoc") };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=trellis/v1/trellis.proto");
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("trellis_descriptor.bin"))
        .compile_protos(&["trellis/v1/trellis.proto"], &["."])?;
    Ok(())
}
