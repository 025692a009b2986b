//! Builds the eBPF classifier (`fwmark-ebpf`) for `bpfel-unknown-none` with
//! the nightly toolchain and bpf-linker, and leaves the object in `OUT_DIR`,
//! where `src/datapath.rs` embeds it. `cargo xtask setup` installs what this
//! needs.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "fwmark-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../fwmark-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default()).context(
        "building the eBPF classifier failed; run `cargo xtask setup` \
         (it installs nightly's rust-src and bpf-linker)",
    )
}
