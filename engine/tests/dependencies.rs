//! The engine cannot do IO: none of its direct dependencies is an async runtime, a
//! socket or QUIC library, a database or a cloud SDK. Adding one fails here; what the
//! engine needs done in the world it asks for as data (`StoreTask`, `Transmit`).

use std::path::Path;

/// Crates (or name prefixes, ending in `-`) the engine must not depend on directly.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "async-std",
    "smol",
    "mio",
    "socket2",
    "quinn",
    "quinn-proto",
    "quinn-udp",
    "rustls",
    "hyper",
    "reqwest",
    "sled",
    "aws-",
    "meridian-relay",
    "meridian-client",
];

fn forbidden(name: &str) -> bool {
    FORBIDDEN.iter().any(|f| {
        if f.ends_with('-') {
            name.starts_with(f)
        } else {
            name == *f
        }
    })
}

#[test]
fn the_engine_depends_on_no_io_crate() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let manifest: toml::Table = std::fs::read_to_string(&path)
        .expect("read Cargo.toml")
        .parse()
        .expect("parse Cargo.toml");
    let mut names = Vec::new();
    let mut tables = vec![("dependencies", manifest.get("dependencies"))];
    // Platform-specific dependencies count too.
    if let Some(targets) = manifest.get("target").and_then(|t| t.as_table()) {
        for target in targets.values() {
            tables.push(("target dependencies", target.get("dependencies")));
        }
    }
    for (_, table) in tables {
        let Some(table) = table.and_then(|t| t.as_table()) else {
            continue;
        };
        for (key, value) in table {
            // A renamed dependency names its crate in `package`.
            let package = value.get("package").and_then(|p| p.as_str()).unwrap_or(key);
            names.push(package.to_owned());
            names.push(key.clone());
        }
    }
    assert!(
        names.iter().any(|n| n == "automerge"),
        "the manifest was read: {names:?}"
    );
    let bad: Vec<&String> = names.iter().filter(|n| forbidden(n)).collect();
    assert!(
        bad.is_empty(),
        "the engine must not depend on {bad:?}: it decides, and its driver does the IO"
    );
}

#[test]
fn the_check_catches_what_it_forbids() {
    for name in [
        "tokio",
        "quinn",
        "sled",
        "aws-sdk-dynamodb",
        "aws-config",
        "hyper",
    ] {
        assert!(forbidden(name), "{name}");
    }
    for name in ["automerge", "foca", "bytes", "awsome"] {
        assert!(!forbidden(name), "{name}");
    }
}
