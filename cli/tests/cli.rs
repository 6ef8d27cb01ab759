//! The `meridian` binary end to end: `dev`, `doc set/get/watch`, `token`, clean shutdown
//! and restart on the same data directory, and one-line errors.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Guard, meridian, start_dev, start_dev_with};

fn stop(mut guard: Guard) {
    let mut child = guard.0.take().expect("running");
    let pid = child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let status = child.wait().expect("wait");
    assert!(status.success(), "meridian dev exited with {status}");
}

fn run(args: &[&str], config: &Path) -> Output {
    meridian()
        .args(args)
        .arg("--config")
        .arg(config)
        .args(std::iter::empty::<&str>())
        .output()
        .expect("run meridian")
}

fn doc(cmd: &str, config: &Path, rest: &[&str]) -> Output {
    let mut command = meridian();
    command
        .args(["doc", cmd, "--config"])
        .arg(config)
        .args(rest);
    command.output().expect("run meridian doc")
}

#[test]
fn dev_deployment_serves_documents_and_keeps_them_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("client.toml");
    let dev = start_dev(dir.path(), 3);

    let set = doc("set", &config, &["notes", "title", "hello"]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let heads = String::from_utf8(set.stdout).unwrap();
    assert_eq!(heads.trim().len(), 64, "prints the heads");

    let mut watch = meridian()
        .args(["doc", "watch", "--config"])
        .arg(&config)
        .arg("notes")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut watched = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&watched.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "synced");
    assert_eq!(first["value"], serde_json::json!({"title": "hello"}));

    assert!(
        doc("set", &config, &["notes", "body", "world"])
            .status
            .success()
    );
    let update: serde_json::Value =
        serde_json::from_str(&watched.next().unwrap().unwrap()).unwrap();
    assert_eq!(update["event"], "update");
    assert_eq!(
        update["value"],
        serde_json::json!({"title": "hello", "body": "world"})
    );
    Command::new("kill")
        .args(["-INT", &watch.id().to_string()])
        .status()
        .unwrap();
    assert!(watch.wait().unwrap().success());

    stop(dev);
    let dev = start_dev(dir.path(), 3);
    let get = doc("get", &config, &["notes"]);
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(
        value,
        serde_json::json!({"title": "hello", "body": "world"})
    );

    // A bad token: one clear line, non-zero exit.
    let text = std::fs::read_to_string(&config).unwrap();
    let bad = dir.path().join("bad.toml");
    let token_line = text.lines().find(|l| l.starts_with("token")).unwrap();
    std::fs::write(&bad, text.replace(token_line, "token = \"v4.public.nope\"")).unwrap();
    let refused = doc("get", &bad, &["notes"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.starts_with("error: unauthorized"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // An unknown config key.
    std::fs::write(&bad, format!("{text}\ncolour = \"blue\"\n")).unwrap();
    let refused = doc("get", &bad, &["notes"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown field `colour`"));
    stop(dev);

    // An unreachable relay (the dev deployment is stopped).
    let refused = doc("get", &config, &["notes"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).starts_with("error: cannot reach relay"));
}

#[test]
fn tokens_minted_by_the_cli_are_accepted_by_a_configured_relay() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("acme.key");
    let keygen = meridian()
        .args(["token", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(keygen.status.success());
    let public = String::from_utf8(keygen.stdout).unwrap().trim().to_string();
    assert!(public.starts_with("k4.public."));

    // A relay from a config file, reusing the dev PKI for its certificate.
    let dev = start_dev(&dir.path().join("dev"), 1);
    stop(dev);
    let tls = dir.path().join("dev/tls");
    let relay_toml = dir.path().join("relay.toml");
    std::fs::write(
        &relay_toml,
        format!(
            "[node]\nid = \"n1\"\ncell = \"c1\"\njurisdiction = \"eu\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"node\"\n\
             [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[durable]\nkind = \"local\"\npath = \"durable\"\n\
             [[tenants]]\nid = \"acme\"\npublic_keys = [\"{public}\"]\n",
            tls.join("node.crt").display(),
            tls.join("node.key").display()
        ),
    )
    .unwrap();
    let mut relay = meridian()
        .args(["relay", "--config"])
        .arg(&relay_toml)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(relay.stderr.take().unwrap()).lines();
    let relay = Guard(Some(relay));
    let line = stderr.next().unwrap().unwrap();
    let addr = line.rsplit(' ').next().unwrap().to_string();
    std::thread::spawn(move || for _ in stderr {});

    let mint = |rights: &str, audience: &str| {
        let out = meridian()
            .args([
                "token",
                "mint",
                "--tenant",
                "acme",
                "--user",
                "u1",
                "--docs",
                "team/",
                "--rights",
                rights,
                "--ttl",
                "1h",
                "--audience",
                audience,
                "--key",
            ])
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let client_toml = |token: &str| {
        let path = dir.path().join("client.toml");
        std::fs::write(
            &path,
            format!(
                "endpoint = \"{addr}\"\nca_cert = \"{}\"\ntenant = \"acme\"\ntoken = \"{token}\"\n",
                tls.join("ca.crt").display()
            ),
        )
        .unwrap();
        path
    };
    let config = client_toml(&mint("read,write", "eu"));
    assert!(
        doc("set", &config, &["team/plan", "k", "v"])
            .status
            .success()
    );
    let outside = doc("set", &config, &["other/plan", "k", "v"]);
    assert!(!outside.status.success());
    assert!(
        String::from_utf8_lossy(&outside.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&outside.stderr)
    );
    let config = client_toml(&mint("read,write", "us"));
    assert!(!run(&["doc", "get", "team/plan"], &config).status.success());

    // `token revoke --user`: every token of u1 issued until now is refused (the relay
    // reads revocations from its durable tier about every second).
    let config = client_toml(&mint("read,write", "eu"));
    let revoke = meridian()
        .args([
            "token", "revoke", "--tenant", "acme", "--user", "u1", "--config",
        ])
        .arg(&relay_toml)
        .output()
        .unwrap();
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    // (A refusal at the handshake may come first: the `us` token above put 127.0.0.1 in
    // the penalty box for a moment.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let refused = doc("get", &config, &["team/plan"]);
        if String::from_utf8_lossy(&refused.stderr).contains("revoked") {
            assert!(!refused.status.success());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never revoked");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // A key rotation without a restart: the config names a new key, SIGHUP, and tokens
    // of the new key are accepted (minted a second later than the revocation).
    let new_key = dir.path().join("acme-2.key");
    let keygen = meridian()
        .args(["token", "keygen", "--out"])
        .arg(&new_key)
        .output()
        .unwrap();
    assert!(keygen.status.success());
    let new_public = String::from_utf8(keygen.stdout).unwrap().trim().to_string();
    let text = std::fs::read_to_string(&relay_toml).unwrap();
    std::fs::write(&relay_toml, text.replace(&public, &new_public)).unwrap();
    let pid = relay.0.as_ref().unwrap().id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mint_new = || {
        let out = meridian()
            .args([
                "token",
                "mint",
                "--tenant",
                "acme",
                "--user",
                "u1",
                "--docs",
                "team/",
                "--audience",
                "eu",
                "--key",
            ])
            .arg(&new_key)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let config = client_toml(&mint_new());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !doc("get", &config, &["team/plan"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new key was never accepted"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The old key is gone.
    let config = client_toml(&mint("read,write", "eu"));
    assert!(!doc("get", &config, &["team/plan"]).status.success());

    stop(relay);
}

#[test]
fn token_keygen_and_mint_print_json_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let json = |output: std::process::Output| -> serde_json::Value {
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).expect("one JSON object on stdout")
    };
    let printed = json(
        meridian()
            .args(["token", "keygen", "--json"])
            .output()
            .unwrap(),
    );
    assert!(
        printed["secret"]
            .as_str()
            .unwrap()
            .starts_with("k4.secret.")
    );
    assert!(
        printed["public"]
            .as_str()
            .unwrap()
            .starts_with("k4.public.")
    );

    let key = dir.path().join("acme.key");
    let written = json(
        meridian()
            .args(["token", "keygen", "--json", "--out"])
            .arg(&key)
            .output()
            .unwrap(),
    );
    assert!(
        written.get("secret").is_none(),
        "the secret stays in its file"
    );
    assert_eq!(
        written["secret_file"].as_str().unwrap(),
        key.to_str().unwrap()
    );
    let public = written["public"].as_str().unwrap().to_owned();

    let minted = json(
        meridian()
            .args([
                "token", "mint", "--tenant", "acme", "--user", "ann", "--ttl", "2h",
            ])
            .args(["--audience", "eu", "--json", "--key"])
            .arg(&key)
            .output()
            .unwrap(),
    );
    assert_eq!(minted["tenant"], "acme");
    assert_eq!(minted["user"], "ann");
    assert_eq!(minted["audience"], "eu");
    assert_eq!(
        minted["expires_at"].as_i64().unwrap() - minted["issued_at"].as_i64().unwrap(),
        7200
    );
    // The token is the one described, and verifies under the public key.
    let token = minted["token"].as_str().unwrap();
    let public = meridian_protocol::token::TenantPublicKey::from_paserk(&public).unwrap();
    let now = minted["issued_at"].as_i64().unwrap();
    let keys = [public];
    let capability = meridian_protocol::token::verify(
        token,
        |_| {
            Some(meridian_protocol::token::TenantTrust {
                keys: &keys,
                max_lifetime_secs: meridian_protocol::token::DEFAULT_MAX_LIFETIME_SECS,
            })
        },
        now,
        "eu",
    )
    .expect("verifies");
    assert_eq!(capability.id, minted["id"].as_str().unwrap());

    // Every flag can come from the environment; the command line wins.
    let from_env = json(
        meridian()
            .args(["token", "mint", "--user", "bob", "--json"])
            .env("MERIDIAN_TOKEN_MINT_TENANT", "acme")
            .env("MERIDIAN_TOKEN_MINT_USER", "ann")
            .env("MERIDIAN_TOKEN_MINT_KEY", &key)
            .env("MERIDIAN_TOKEN_MINT_AUDIENCE", "us")
            .output()
            .unwrap(),
    );
    assert_eq!(from_env["tenant"], "acme");
    assert_eq!(from_env["user"], "bob");
    assert_eq!(from_env["audience"], "us");
}

#[test]
fn logs_are_json_lines_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    stop(start_dev_with(
        &data,
        &["--nodes", "1", "--cells", "eu-a=eu-west-1:eu"],
    ));
    // A corrupt tenant record is skipped with a warning when the control plane is
    // scanned.
    let tenants = std::fs::read_dir(data.join("control"))
        .unwrap()
        .map(|entry| entry.unwrap().path().join("tenants"))
        .find(|path| path.is_dir())
        .expect("a jurisdiction's tenants");
    std::fs::write(tenants.join("broken.json"), "{ not json").unwrap();
    let list = |format: &str| {
        meridian()
            .args(["--log-format", format, "cell", "list", "--json", "--config"])
            .arg(data.join("client.toml"))
            .env("MERIDIAN_LOG", "warn")
            .output()
            .unwrap()
    };
    let json = list("json");
    assert!(json.status.success(), "{json:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&json.stderr)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    assert!(
        lines.iter().any(|line| line["level"] == "WARN"
            && line["fields"]["message"] == "corrupt control record skipped"),
        "{lines:?}"
    );
    // The same warning as text by default.
    let text = list("text");
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(
        stderr.contains("corrupt control record skipped"),
        "{stderr}"
    );
    assert!(!stderr.trim_start().starts_with('{'), "{stderr}");
}

/// `--worker-threads` (and `MERIDIAN_WORKER_THREADS`) size the runtime: any positive count
/// runs the command; zero is refused by name before anything runs.
#[test]
fn worker_threads_come_from_the_flag_or_the_environment() {
    for (flag, env) in [(Some("1"), None), (None, Some("3")), (Some("5"), Some("1"))] {
        let mut command = meridian();
        if let Some(threads) = flag {
            command.args(["--worker-threads", threads]);
        }
        if let Some(threads) = env {
            command.env("MERIDIAN_WORKER_THREADS", threads);
        }
        let output = command
            .args(["token", "keygen", "--json"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{flag:?} {env:?}: {output:?}");
    }
    for refused in [
        meridian()
            .args(["--worker-threads", "0", "token", "keygen", "--json"])
            .output()
            .unwrap(),
        meridian()
            .env("MERIDIAN_WORKER_THREADS", "0")
            .args(["token", "keygen", "--json"])
            .output()
            .unwrap(),
    ] {
        assert!(!refused.status.success());
        assert!(refused.stdout.is_empty(), "{refused:?}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("worker-threads"), "{stderr}");
    }
}
