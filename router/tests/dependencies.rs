//! The router is a small process of its own: nothing in its dependency tree keeps
//! documents (Automerge), a node cache (sled) or cell gossip (foca). Adding one, even
//! through another crate, fails here.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

/// Crates the router's tree must not contain.
const FORBIDDEN: &[&str] = &[
    "automerge",
    "sled",
    "foca",
    "meridian-engine",
    "meridian-relay",
];

#[test]
fn the_routers_dependency_tree_holds_no_engine_cache_or_gossip() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The tree for this machine's platform: what the binary links here. (Unfiltered,
    // cargo wants every platform's crates, Windows' too, which an offline machine that
    // only ever built for Linux does not have.)
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc)
        .arg("-vV")
        .output()
        .expect("run rustc -vV");
    let version = String::from_utf8_lossy(&version.stdout);
    let host = version
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .expect("rustc -vV names the host");
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .args(["--filter-platform", host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata's JSON");
    // Package ids by name, and the resolved graph's edges (normal dependencies only:
    // what the binary links).
    let names: HashMap<&str, &str> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
        .collect();
    let nodes = metadata["resolve"]["nodes"].as_array().expect("resolve");
    let edges: HashMap<&str, Vec<&str>> = nodes
        .iter()
        .filter_map(|node| {
            let id = node["id"].as_str()?;
            let deps = node["deps"]
                .as_array()?
                .iter()
                .filter(|dep| {
                    dep["dep_kinds"].as_array().is_some_and(|kinds| {
                        kinds
                            .iter()
                            .any(|k| k["kind"].is_null() || k["kind"] == "build")
                    })
                })
                .filter_map(|dep| dep["pkg"].as_str())
                .collect();
            Some((id, deps))
        })
        .collect();
    let root = names
        .iter()
        .find(|(_, name)| **name == "meridian-router")
        .map(|(id, _)| *id)
        .expect("meridian-router in the workspace");
    let mut seen = BTreeSet::new();
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if seen.insert(id) {
            stack.extend(edges.get(id).into_iter().flatten().copied());
        }
    }
    let tree: BTreeSet<&str> = seen
        .iter()
        .filter_map(|id| names.get(id).copied())
        .collect();
    assert!(tree.contains("quinn"), "the tree was walked: {tree:?}");
    let bad: Vec<&&str> = FORBIDDEN.iter().filter(|f| tree.contains(**f)).collect();
    assert!(bad.is_empty(), "the router's tree holds {bad:?}");
}
