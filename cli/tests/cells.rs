//! Two `eu` cells and one `us` cell as real processes on 127.0.0.1 (`meridian dev
//! --cells`), clients of an `eu` tenant editing documents: the home cell dies and the
//! tenant fails over to the other `eu` cell; both die and clients get "unavailable",
//! never the `us` cell; a cell comes back and service resumes; a drain moves the tenant
//! with no client error.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_client::{ClientConfig, ConnectionState};

use common::{Guard, Workload, meridian, signal, start_dev_with, wait_for};

const SPEC: &str = "eu-a=eu-west-1:eu,eu-b=eu-central-1:eu,us-a=us-east-1:us";
const NODES: usize = 2;
const CLIENTS: usize = 3;
const DOCS: usize = 6;

fn client_config(dir: &Path) -> ClientConfig {
    let text = std::fs::read_to_string(dir.join("client-eu.toml")).expect("client-eu.toml");
    let file: toml::Value = toml::from_str(&text).expect("client toml");
    let ca = std::fs::read(PathBuf::from(file["ca_cert"].as_str().expect("ca"))).expect("ca");
    let mut config = ClientConfig::new(
        file["endpoint"].as_str().expect("endpoint"),
        ca,
        file["token"].as_str().expect("token"),
    );
    config.router = Some(file["router"].as_str().expect("router").to_owned());
    config.reconnect_max = Duration::from_secs(1);
    config
}

/// `meridian tenant locate` for the eu dev tenant: `Ok(cell)` or the error text.
fn locate(dir: &Path) -> Result<String, String> {
    let out = meridian()
        .args(["tenant", "locate", "--tenant", "dev-eu", "--config"])
        .arg(dir.join("client.toml"))
        .output()
        .expect("meridian tenant locate");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let cell = stdout
        .lines()
        .find_map(|l| l.strip_prefix("cell"))
        .map(|c| c.trim().to_owned())
        .expect("a cell line");
    let jurisdiction = stdout
        .lines()
        .find_map(|l| l.strip_prefix("jurisdiction"))
        .map(|j| j.trim().to_owned());
    assert_eq!(jurisdiction.as_deref(), Some("eu"), "{stdout}");
    Ok(cell)
}

fn cell_pids(dir: &Path, cell: &str) -> Vec<u32> {
    (1..=NODES)
        .map(|i| {
            std::fs::read_to_string(dir.join(format!("cells/{cell}/node-{i}.pid")))
                .expect("pid file")
                .trim()
                .parse()
                .expect("pid")
        })
        .collect()
}

/// Starts a cell's nodes again from their configs (same identity and addresses).
fn restart_cell(dir: &Path, cell: &str) -> Vec<Guard> {
    (1..=NODES)
        .map(|i| {
            let log = std::fs::File::create(dir.join(format!("cells/{cell}/node-{i}.restart.log")))
                .expect("log");
            Guard(Some(
                meridian()
                    .args(["relay", "--config"])
                    .arg(dir.join(format!("cells/{cell}/node-{i}.toml")))
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().expect("log"))
                    .stderr(log)
                    .spawn()
                    .expect("restart relay"),
            ))
        })
        .collect()
}

/// The router's view of one cell's health, from its `/cell`.
async fn router_sees_up(dir: &Path, cell: &str) -> bool {
    let text = std::fs::read_to_string(dir.join("client.toml")).expect("client.toml");
    let file: toml::Value = toml::from_str(&text).expect("client toml");
    let admin = file["router_admin"]
        .as_str()
        .expect("router_admin")
        .parse()
        .expect("addr");
    let Ok((200, body)) = meridian_relay::http::get(admin, "/cell").await else {
        return false;
    };
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    view["cells"]
        .as_array()
        .expect("cells")
        .iter()
        .any(|c| c["cell"] == cell && c["up"] == true)
}

/// Records every connection state any client goes through.
fn watch_states(work: &Workload) -> Arc<Mutex<Vec<ConnectionState>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    for client in &work.clients {
        let (client, seen) = (client.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let state = client.state();
                {
                    let mut seen = seen.lock().expect("states");
                    if seen.last() != Some(&state) {
                        seen.push(state);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eu_tenant_fails_over_between_eu_cells_and_never_to_us() {
    meridian_relay::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let _dev = start_dev_with(dir, &["--nodes", &NODES.to_string(), "--cells", SPEC]);

    let mut work = Workload::start((0..CLIENTS).map(|_| client_config(dir)).collect(), DOCS).await;
    work.edit(60, Duration::from_millis(2)).await;
    work.converge(Duration::from_secs(60)).await;
    let home = locate(dir).expect("the eu tenant is placed");
    assert!(home == "eu-a" || home == "eu-b", "{home}");
    let other = if home == "eu-a" { "eu-b" } else { "eu-a" };
    assert!(work.take_errors().is_empty());

    // Kill every node of the home cell while clients keep writing: the tenant fails
    // over to the other eu cell; clients follow and converge with nothing Durable lost.
    let killed = Instant::now();
    for pid in cell_pids(dir, &home) {
        signal(pid, "-KILL");
    }
    work.edit(60, Duration::from_millis(10)).await;
    work.converge(Duration::from_secs(90)).await;
    eprintln!(
        "failover: clients converged in {other} {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(locate(dir).as_deref(), Ok(other));

    // Kill the other eu cell too: "unavailable", never the us cell. Edits wait locally.
    for pid in cell_pids(dir, other) {
        signal(pid, "-KILL");
    }
    let clients = work.clients.clone();
    wait_for(
        "every client to report unavailable",
        Duration::from_secs(60),
        || {
            let clients = clients.clone();
            async move {
                clients
                    .iter()
                    .all(|c| matches!(c.state(), ConnectionState::Unavailable(_)))
            }
        },
    )
    .await;
    for client in &work.clients {
        assert!(matches!(
            client.wait_connected().await,
            Err(meridian_client::ClientError::Unavailable(_))
        ));
    }
    let answer = locate(dir);
    assert!(
        answer.as_ref().is_err_and(|e| e.contains("unavailable")),
        "{answer:?}"
    );
    work.edit(30, Duration::from_millis(5)).await;

    // One eu cell comes back: service resumes there and the waiting edits become Durable.
    let _back = restart_cell(dir, other);
    work.converge(Duration::from_secs(90)).await;
    // The router marks the cell up after its hysteresis (two good probe rounds).
    wait_for(
        "the router to locate the tenant again",
        Duration::from_secs(30),
        || async { locate(dir).as_deref() == Ok(other) },
    )
    .await;

    // The first cell comes back as well; draining the serving cell moves the tenant
    // there, and clients follow with no error (a redirect is not one).
    let _first_back = restart_cell(dir, &home);
    wait_for(
        "the router to see the restarted cell up",
        Duration::from_secs(60),
        || router_sees_up(dir, &home),
    )
    .await;
    work.take_errors();
    let states = watch_states(&work);
    let status = meridian()
        .args(["cell", "drain", other, "--config"])
        .arg(dir.join("client.toml"))
        .status()
        .expect("meridian cell drain");
    assert!(status.success());
    work.edit(60, Duration::from_millis(20)).await;
    work.converge(Duration::from_secs(90)).await;
    assert_eq!(locate(dir).as_deref(), Ok(home.as_str()));
    let errors = work.take_errors();
    assert!(errors.is_empty(), "errors during the drain: {errors:?}");
    let states = states.lock().expect("states").clone();
    assert!(
        states.iter().all(|s| !matches!(
            s,
            ConnectionState::Unavailable(_) | ConnectionState::Failed(_)
        )),
        "{states:?}"
    );

    // The us cell never served the eu tenant, and no router or relay refused a
    // residency violation.
    let list = meridian()
        .args(["cell", "list", "--json", "--config"])
        .arg(dir.join("client.toml"))
        .output()
        .expect("meridian cell list");
    let cells: serde_json::Value = serde_json::from_slice(&list.stdout).expect("cell list json");
    let us = cells
        .as_array()
        .expect("cells")
        .iter()
        .find(|c| c["cell"] == "us-a")
        .expect("us-a listed");
    assert_eq!(
        us["tenants"], 1,
        "only the us dev tenant lives in us-a: {us}"
    );
    for client in &work.clients {
        client.close().await;
    }
}
