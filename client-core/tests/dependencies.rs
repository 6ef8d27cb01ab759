//! The pool's core does no IO and reads no clock: its dependencies are an allow-list, so
//! that an async runtime, a QUIC stack or a source of entropy cannot slip in (the cell
//! simulation and the engine's tests run it without them).

const ALLOWED: &[&str] = &["meridian-protocol"];

#[test]
fn the_pool_core_depends_only_on_the_protocol() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let manifest: toml::Table = std::fs::read_to_string(&path)
        .expect("read Cargo.toml")
        .parse()
        .expect("parse Cargo.toml");
    let mut tables = vec![manifest.get("dependencies")];
    if let Some(targets) = manifest.get("target").and_then(|t| t.as_table()) {
        tables.extend(targets.values().map(|t| t.get("dependencies")));
    }
    for table in tables.into_iter().flatten() {
        for (name, value) in table.as_table().expect("a table of dependencies") {
            let package = value
                .get("package")
                .and_then(|p| p.as_str())
                .unwrap_or(name);
            assert!(
                ALLOWED.contains(&package),
                "meridian-client-core must not depend on {package}: it runs without IO"
            );
        }
    }
}
