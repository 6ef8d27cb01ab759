//! The HTTP API of `meridian dev --nodes 2`: each node serves it, a request for a
//! document the other node owns is forwarded to that node's API (once: a request a node
//! of the cell forwarded that meets `moved` again is answered 307), and what one node's
//! API wrote the other's reads.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use automerge::transaction::Transactable;
use common::start_dev;
use meridian_testkit::http;

fn api_listen(dir: &Path, node: usize) -> SocketAddr {
    common::node_listen(dir, node, "api")
}

fn token(dir: &Path) -> String {
    common::dev_token(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_serves_every_document_forwarding_to_its_owner() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let _dev = start_dev(dir, 2);
    let apis = [api_listen(dir, 1), api_listen(dir, 2)];
    let token = token(dir);
    let auth = format!("Bearer {token}");
    let key = std::fs::read_to_string(dir.join("cell.key")).expect("the cell's key");
    let key = hex::decode(key.trim()).expect("hex");
    let proof = meridian_relay::local::forward_proof(&key, &token);

    let mut on_node_2 = 0;
    for i in 0..12 {
        let id = format!("api-{i}");
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, "n", i as i64).expect("put");
        let change = doc
            .get_last_local_change()
            .expect("change")
            .raw_bytes()
            .to_vec();
        // Node 1 takes every write, forwarding those node 2 owns.
        let path = format!("/v1/docs/{id}/changes?wait=durable");
        let answer = http::post(apis[0], &path, &token, &change).await;
        assert_eq!(answer.status, 200, "{id}: {answer:?}");
        // Node 2 answers every read the same way.
        let read = format!("/v1/docs/{id}");
        let answer = http::get(apis[1], &read, &token).await;
        assert_eq!(answer.status, 200, "{id}: {answer:?}");
        assert_eq!(answer.json()["content"], serde_json::json!({"n": i}));

        // A client's own `Meridian-Forwarded` changes nothing: it is forwarded.
        let answer = http::request(
            apis[0],
            "GET",
            &read,
            &[("Authorization", &auth), ("Meridian-Forwarded", "1")],
            &[],
        )
        .await;
        assert_eq!(answer.status, 200, "{id}: {answer:?}");
        // A request a node of the cell forwarded is not forwarded again: the owner's
        // address.
        let answer = http::request(
            apis[0],
            "GET",
            &read,
            &[("Authorization", &auth), ("Meridian-Forwarded", &proof)],
            &[],
        )
        .await;
        match answer.status {
            200 => {}
            307 => {
                on_node_2 += 1;
                assert_eq!(
                    answer.header("location"),
                    Some(format!("http://{}{read}", apis[1]).as_str()),
                    "{answer:?}"
                );
                assert_eq!(answer.json()["code"], "redirect");
            }
            other => panic!("{id}: {other} {answer:?}"),
        }
    }
    assert!(
        (1..12).contains(&on_node_2),
        "documents are spread over both nodes ({on_node_2} of 12 on node 2)"
    );
}
