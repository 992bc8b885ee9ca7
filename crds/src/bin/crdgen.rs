//! Writes the CRD YAML generated from the types into `charts/airouter/crds/` (or the directory
//! given as the first argument). `cargo test -p airouter-crds` fails when the committed files
//! differ.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/airouter/crds")
        });
    std::fs::create_dir_all(&dir)?;
    for (file, yaml) in airouter_crds::crds() {
        let path = dir.join(file);
        std::fs::write(&path, yaml)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
