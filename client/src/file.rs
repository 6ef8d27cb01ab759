//! `client.toml`: the file `meridian dev` writes and apps can ship, read into a
//! [`ClientConfig`].
//!
//! ```toml
//! endpoint = "127.0.0.1:4433"        # any node of the tenant's cell
//! nodes = [{ id = "n2", endpoint = "127.0.0.1:4434" }]
//! server_name = "localhost"           # the name on the relays' certificates
//! ca_cert = "ca.pem"                  # relative to the file; omitted: the OS trust store
//! token = "v4.public.…"
//! store_dir = "offline"               # optional, relative to the file
//! router = "127.0.0.1:4500"           # optional
//! ```
//!
//! Keys for operators' tools (`tenant`, `router_admin`, `[control]`, a node's `admin`)
//! may be present and are ignored here.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{ClientConfig, ClientError};

/// The largest `client.toml` read (it holds a token and a few addresses).
const MAX_FILE_LEN: u64 = 1 << 20;

#[derive(Debug, Deserialize)]
struct File {
    endpoint: String,
    #[serde(default)]
    nodes: Vec<Node>,
    #[serde(default)]
    server_name: Option<String>,
    #[serde(default)]
    ca_cert: Option<PathBuf>,
    token: String,
    #[serde(default)]
    store_dir: Option<PathBuf>,
    #[serde(default)]
    router: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Node {
    endpoint: String,
}

impl ClientConfig {
    /// Reads a `client.toml` (see the module docs). Relative paths in it are relative
    /// to the file's directory. Without `ca_cert`, relays are checked against the
    /// operating system's trust store.
    pub fn from_file(path: &Path) -> Result<ClientConfig, ClientError> {
        let config_error =
            |reason: String| ClientError::Config(format!("{}: {reason}", path.display()));
        let len = std::fs::metadata(path)
            .map_err(|e| config_error(e.to_string()))?
            .len();
        if len > MAX_FILE_LEN {
            return Err(config_error(format!("larger than {MAX_FILE_LEN} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| config_error(e.to_string()))?;
        let file: File = toml::from_str(&text).map_err(|e| config_error(e.to_string()))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let ca_pem = match &file.ca_cert {
            Some(ca) => {
                let ca = base.join(ca);
                std::fs::read(&ca).map_err(|e| {
                    config_error(format!("cannot read CA certificate {}: {e}", ca.display()))
                })?
            }
            None => Vec::new(),
        };
        let mut config = ClientConfig::new(file.endpoint.clone(), ca_pem, file.token);
        if let Some(name) = file.server_name {
            config.server_name = name;
        }
        config.store_dir = file.store_dir.map(|dir| base.join(dir));
        config.router = file.router;
        config.nodes = file
            .nodes
            .into_iter()
            .map(|n| n.endpoint)
            .filter(|e| *e != file.endpoint)
            .collect();
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_relative_paths_and_ignores_operator_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), b"PEM").unwrap();
        let path = dir.path().join("client.toml");
        std::fs::write(
            &path,
            r#"
endpoint = "127.0.0.1:1"
nodes = [{ id = "a", endpoint = "127.0.0.1:1", admin = "x" }, { id = "b", endpoint = "127.0.0.1:2" }]
ca_cert = "ca.pem"
tenant = "t"
token = "tok"
store_dir = "offline"
router_admin = "127.0.0.1:3"
[control]
anything = 1
"#,
        )
        .unwrap();
        let config = ClientConfig::from_file(&path).unwrap();
        assert_eq!(config.ca_pem, b"PEM");
        assert_eq!(config.nodes, ["127.0.0.1:2"]);
        assert_eq!(config.store_dir, Some(dir.path().join("offline")));
        assert_eq!(config.token, "tok");
        assert_eq!(config.server_name, "localhost");
    }

    #[test]
    fn a_missing_file_or_key_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ClientConfig::from_file(&dir.path().join("nope.toml"));
        assert!(matches!(missing, Err(ClientError::Config(_))));
        let path = dir.path().join("client.toml");
        std::fs::write(&path, "endpoint = \"x\"\n").unwrap();
        let err = ClientConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("token"), "{err}");
    }
}
