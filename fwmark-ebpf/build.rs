//! Rebuild the classifier when bpf-linker changes (cargo cannot see that
//! dependency otherwise).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found in PATH; run `cargo xtask setup`"),
    }
}
