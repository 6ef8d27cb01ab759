//! `meridian export` and `meridian import` on the local durable store: a tenant's
//! documents move to another tenant of the jurisdiction with their authors, and never to
//! another jurisdiction.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use automerge::transaction::Transactable;
use bytes::Bytes;
use common::meridian;
use meridian_protocol::{ChangeHash, DocId, TenantId, UserId};
use meridian_relay::engine::{DocKey, StoredChange};
use meridian_relay::store::{DurableStore, LocalDirStore};

fn key(tenant: &str, doc: &str) -> DocKey {
    DocKey {
        tenant: TenantId::new(tenant).unwrap(),
        doc: DocId::new(doc).unwrap(),
    }
}

/// Two authors editing one document concurrently, as the relay stores their changes.
fn two_authors(key: &DocKey) -> Vec<(DocKey, StoredChange)> {
    let mut a = automerge::AutoCommit::new();
    a.put(automerge::ROOT, "title", "first").unwrap();
    a.commit();
    let mut b = a.fork();
    b.put(automerge::ROOT, "by", "b").unwrap();
    b.commit();
    a.put(automerge::ROOT, "title", "second").unwrap();
    a.commit();
    let actor_a = a.get_actor().clone();
    let mut out = Vec::new();
    let mut merged = a.clone();
    merged.merge(&mut b).unwrap();
    for change in merged.get_changes(&[]) {
        let user = if change.actor_id() == &actor_a {
            "alice"
        } else {
            "bob"
        };
        out.push((
            key.clone(),
            StoredChange {
                hash: ChangeHash(change.hash().0),
                bytes: Bytes::copy_from_slice(change.raw_bytes()),
                user: UserId::new(user).unwrap(),
            },
        ));
    }
    out
}

fn relay_toml(dir: &Path, name: &str, jurisdiction: &str, public: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "[node]\nid = \"n1\"\ncell = \"c1\"\njurisdiction = \"{jurisdiction}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"node\"\n\
             [tls]\ncert_file = \"none.crt\"\nkey_file = \"none.key\"\n[durable]\nkind = \"local\"\npath = \"durable-{jurisdiction}\"\n\
             [[tenants]]\nid = \"acme\"\npublic_keys = [\"{public}\"]\n\
             [[tenants]]\nid = \"beta\"\npublic_keys = [\"{public}\"]\n"
        ),
    )
    .unwrap();
    path
}

/// Hash → user of every stored change of a document.
async fn authors(store: &LocalDirStore, key: &DocKey) -> BTreeMap<String, String> {
    store
        .load_all_changes(key)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.hash.to_hex(), c.user.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_imports_into_another_tenant_with_its_authors_and_not_abroad() {
    let dir = tempfile::tempdir().unwrap();
    let keygen = meridian()
        .args(["token", "keygen", "--out"])
        .arg(dir.path().join("acme.key"))
        .output()
        .unwrap();
    assert!(keygen.status.success());
    let public = String::from_utf8(keygen.stdout).unwrap().trim().to_string();
    let eu = relay_toml(dir.path(), "eu.toml", "eu", &public);
    let us = relay_toml(dir.path(), "us.toml", "us", &public);

    let store = LocalDirStore::open(dir.path().join("durable-eu")).unwrap();
    for doc in ["notes/a", "notes/b"] {
        store
            .write_changes(&two_authors(&key("acme", doc)))
            .await
            .unwrap();
    }

    let archive = dir.path().join("acme.mrx");
    let export = meridian()
        .args(["export", "--tenant", "acme", "--out"])
        .arg(&archive)
        .arg("--config")
        .arg(&eu)
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    assert!(String::from_utf8_lossy(&export.stdout).contains("exported 2 document(s)"));

    let import = meridian()
        .args(["import", "--tenant", "beta", "--config"])
        .arg(&eu)
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    let listed = store
        .documents(&TenantId::new("beta").unwrap())
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    for doc in ["notes/a", "notes/b"] {
        let from = authors(&store, &key("acme", doc)).await;
        assert_eq!(from.len(), 3);
        assert_eq!(authors(&store, &key("beta", doc)).await, from, "{doc}");
    }

    // Never into another jurisdiction, nor into a tenant the config does not serve.
    let abroad = meridian()
        .args(["import", "--config"])
        .arg(&us)
        .arg(&archive)
        .output()
        .unwrap();
    assert!(!abroad.status.success());
    assert!(String::from_utf8_lossy(&abroad.stderr).contains("jurisdiction"));
    let unknown = meridian()
        .args(["import", "--tenant", "gamma", "--config"])
        .arg(&eu)
        .arg(&archive)
        .output()
        .unwrap();
    assert!(!unknown.status.success());

    // One document only, and a file that is not an archive.
    let one = dir.path().join("one.mrx");
    let export = meridian()
        .args(["export", "--tenant", "acme", "--doc", "notes/b", "--out"])
        .arg(&one)
        .arg("--config")
        .arg(&eu)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&export.stdout).contains("exported 1 document(s)"));
    let garbage = dir.path().join("garbage.mrx");
    std::fs::write(&garbage, b"not an archive").unwrap();
    let refused = meridian()
        .args(["import", "--config"])
        .arg(&eu)
        .arg(&garbage)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a Meridian export"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_at_a_time_holds_the_documents_as_they_were_then() {
    let dir = tempfile::tempdir().unwrap();
    let keygen = meridian()
        .args(["token", "keygen", "--out"])
        .arg(dir.path().join("acme.key"))
        .output()
        .unwrap();
    let public = String::from_utf8(keygen.stdout).unwrap().trim().to_string();
    let eu = relay_toml(dir.path(), "eu.toml", "eu", &public);
    let store = LocalDirStore::open(dir.path().join("durable-eu")).unwrap();

    // Three changes of one chain: the first two before the chosen time, the third after;
    // and a document that only exists after it.
    let mut doc = automerge::AutoCommit::new();
    let mut chain = Vec::new();
    for title in ["draft", "good", "broken by mistake"] {
        doc.put(automerge::ROOT, "title", title).unwrap();
        doc.commit();
        let change = doc.get_last_local_change().unwrap();
        chain.push((
            key("acme", "report"),
            StoredChange {
                hash: ChangeHash(change.hash().0),
                bytes: Bytes::copy_from_slice(change.raw_bytes()),
                user: UserId::new("alice").unwrap(),
            },
        ));
    }
    store.write_changes(&chain[..2]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let then = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    store.write_changes(&chain[2..]).await.unwrap();
    store
        .write_changes(&two_authors(&key("acme", "later")))
        .await
        .unwrap();

    let archive = dir.path().join("then.mrx");
    let export = meridian()
        .args(["export", "--tenant", "acme", "--at-time", &then, "--out"])
        .arg(&archive)
        .arg("--config")
        .arg(&eu)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&export.stdout);
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    assert!(stdout.contains("skipped later"), "{stdout}");
    assert!(stdout.contains("exported 1 document(s)"), "{stdout}");

    // Restored into another tenant: the report as it was, before the mistake.
    let import = meridian()
        .args(["import", "--tenant", "beta", "--config"])
        .arg(&eu)
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    let restored = authors(&store, &key("beta", "report")).await;
    let expected: BTreeMap<String, String> = chain[..2]
        .iter()
        .map(|(_, c)| (c.hash.to_hex(), "alice".to_string()))
        .collect();
    assert_eq!(restored, expected);

    let bad = meridian()
        .args([
            "export",
            "--tenant",
            "acme",
            "--at-time",
            "yesterday",
            "--out",
        ])
        .arg(dir.path().join("x.mrx"))
        .arg("--config")
        .arg(&eu)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"));
}

/// The standard output of a command that must succeed.
fn succeeded(output: std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `meridian doc purge` and `meridian tenant purge` on the local store: nothing without
/// `--yes`; then the document (or the tenant's documents) is gone from the durable tier,
/// later writes of it (an offline client's, an old archive's) are left out, and
/// `meridian audit` says who purged what.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_delete_documents_for_good_and_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let keygen = succeeded(
        meridian()
            .args(["token", "keygen", "--out"])
            .arg(dir.path().join("tenant.key"))
            .output()
            .unwrap(),
    );
    let eu = relay_toml(dir.path(), "eu.toml", "eu", keygen.trim());
    let store = LocalDirStore::open(dir.path().join("durable-eu")).unwrap();
    for (tenant, doc) in [
        ("acme", "notes/a"),
        ("acme", "notes/b"),
        ("beta", "x"),
        ("beta", "y"),
    ] {
        store
            .write_changes(&two_authors(&key(tenant, doc)))
            .await
            .unwrap();
    }
    let run = |args: &[&str]| {
        meridian()
            .args(args)
            .arg("--config")
            .arg(&eu)
            .output()
            .unwrap()
    };
    let purge = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--operator", "ops@example"]);
        run(&all)
    };
    let stored = |tenant: &str, doc: &str| {
        let key = key(tenant, doc);
        let store = store.clone();
        async move { store.load_all_changes(&key).await.unwrap().len() }
    };

    let refused = purge(&["doc", "purge", "notes/a", "--tenant", "acme"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    assert_eq!(stored("acme", "notes/a").await, 3);

    let out = succeeded(purge(&[
        "doc", "purge", "notes/a", "--tenant", "acme", "--yes",
    ]));
    assert!(out.contains("1 document(s), 3 change(s)"), "{out}");
    assert_eq!(stored("acme", "notes/a").await, 0);
    let acme = TenantId::new("acme").unwrap();
    assert_eq!(
        store.documents(&acme).await.unwrap(),
        vec![DocId::new("notes/b").unwrap()]
    );
    // An offline client's late write (replayed by a relay) does not bring it back.
    store
        .write_changes(&two_authors(&key("acme", "notes/a")))
        .await
        .unwrap();
    assert_eq!(stored("acme", "notes/a").await, 0);

    // Nor does an archive made before the purge.
    let archive = dir.path().join("before.cbor");
    let archive_path = archive.to_str().unwrap();
    succeeded(run(&["export", "--tenant", "acme", "--out", archive_path]));
    succeeded(purge(&[
        "doc", "purge", "notes/b", "--tenant", "acme", "--yes",
    ]));
    let out = succeeded(run(&["import", archive_path]));
    assert!(out.contains("skipped notes/b: it was purged"), "{out}");
    assert!(out.contains("imported 0 document(s)"), "{out}");
    assert_eq!(stored("acme", "notes/b").await, 0);

    succeeded(purge(&["tenant", "purge", "beta", "--yes"]));
    assert!(
        store
            .documents(&TenantId::new("beta").unwrap())
            .await
            .unwrap()
            .is_empty()
    );
    // A tenant the config does not serve cannot be purged through it.
    assert!(
        !purge(&["tenant", "purge", "gamma", "--yes"])
            .status
            .success()
    );

    let records: serde_json::Value =
        serde_json::from_str(&succeeded(run(&["audit", "--json"]))).unwrap();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(records[0]["action"], "doc purge");
    assert_eq!(records[0]["operator"], "ops@example");
    assert_eq!(records[0]["doc"], "notes/a");
    assert_eq!(records[0]["report"]["changes"], 3);
    assert_eq!(records[1]["doc"], "notes/b");
    assert_eq!(records[2]["action"], "tenant purge");
    assert_eq!(records[2]["tenant"], "beta");
    assert_eq!(records[2]["report"]["documents"], 2);
}
