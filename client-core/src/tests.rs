//! The pool's decisions, driven by hand.

use super::*;

fn doc(name: &str) -> DocId {
    DocId::new(name).unwrap()
}

fn welcome(session: u64, nodes: &[&str]) -> Welcome {
    Welcome {
        session,
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
    }
}

fn config(nodes: &[&str]) -> PoolConfig {
    PoolConfig {
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        reconnect_initial: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(5),
        router: None,
        seed: 7,
    }
}

fn opened(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::OpenStream { doc, addr, .. } => Some((doc.as_str().to_owned(), addr.clone())),
            _ => None,
        })
        .collect()
}

fn connects(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Connect { addr } => Some(addr.clone()),
            _ => None,
        })
        .collect()
}

fn generation_of(actions: &[Action], name: &str) -> u64 {
    actions
        .iter()
        .find_map(|a| match a {
            Action::OpenStream {
                doc, generation, ..
            } if doc.as_str() == name => Some(*generation),
            _ => None,
        })
        .expect("a stream for the document")
}

/// A document goes to the primary first, follows `moved` to its owner, and the pool
/// connects to the owner for it.
#[test]
fn a_document_follows_moved_to_its_owner() {
    let t = Instant::now();
    let (mut pool, _) = Pool::new(config(&["a:1"]), "a:1", welcome(1, &["a:1", "b:1"]));
    pool.open(doc("d"));
    let (actions, _) = pool.poll(t);
    assert_eq!(opened(&actions), vec![("d".into(), "a:1".into())]);
    let generation = generation_of(&actions, "d");
    pool.handle_doc_ended(t, &doc("d"), generation, Some("b:1".into()));
    let (actions, _) = pool.poll(t);
    assert_eq!(connects(&actions), vec!["b:1".to_string()]);
    assert!(
        opened(&actions).is_empty(),
        "waits for the owner's connection"
    );
    assert_eq!(
        pool.handle_established(t, "b:1", Ok(welcome(2, &["a:1", "b:1"]))),
        Ok(Some(3))
    );
    let (actions, _) = pool.poll(t);
    assert_eq!(opened(&actions), vec![("d".into(), "b:1".into())]);
    // A stale report (an older stream's end) changes nothing.
    pool.handle_doc_ended(t, &doc("d"), generation, None);
    let (actions, _) = pool.poll(t);
    assert!(actions.is_empty(), "{actions:?}");
}

/// An unreachable node is backed off from, with jitter, doubling; the primary moves
/// away from it and the documents go through the next node.
#[test]
fn an_unreachable_node_is_backed_off_and_the_primary_moves() {
    let t = Instant::now();
    let (mut pool, generation) =
        Pool::new(config(&["a:1", "b:1"]), "a:1", welcome(1, &["a:1", "b:1"]));
    pool.open(doc("d"));
    let (actions, _) = pool.poll(t);
    let stream = generation_of(&actions, "d");
    assert_eq!(pool.handle_lost(t, "a:1", generation, None), Ok(()));
    pool.handle_doc_ended(t, &doc("d"), stream, None);
    // The primary moved to the next node; the document waits a little before it
    // subscribes again.
    let (actions, _) = pool.poll(t);
    assert_eq!(
        connects(&actions),
        vec!["b:1".to_string()],
        "the primary moved"
    );
    assert!(opened(&actions).is_empty());
    assert_eq!(
        pool.handle_established(t, "b:1", Err(Failure::Other("refused".into()))),
        Ok(None)
    );
    // Both are backed off now (the primary is back on a:1): the next attempt waits
    // between half and all of the first delay.
    let (actions, wake) = pool.poll(t);
    assert!(connects(&actions).is_empty(), "{actions:?}");
    let wait = wake.expect("a wake-up") - t;
    assert!(
        wait >= Duration::from_millis(50) && wait <= Duration::from_millis(100),
        "{wait:?}"
    );
    let (actions, _) = pool.poll(t + wait);
    assert_eq!(connects(&actions), vec!["a:1".to_string()]);
    // a:1 fails again: its delay doubles.
    pool.handle_established(t + wait, "a:1", Err(Failure::Other("refused".into())))
        .unwrap();
    let (_, wake) = pool.poll(t + wait);
    let second = wake.expect("a wake-up") - (t + wait);
    assert!(second > Duration::ZERO, "{second:?}");
}

/// Three `moved` in a row within moments (members still disagreeing) back the document
/// off; the bounces are forgotten once a stream lived for a while.
#[test]
fn bouncing_between_members_backs_off() {
    let t = Instant::now();
    let (mut pool, _) = Pool::new(config(&["a:1"]), "a:1", welcome(1, &["a:1", "b:1"]));
    pool.handle_established(t, "b:1", Ok(welcome(2, &["a:1", "b:1"])))
        .unwrap();
    pool.open(doc("d"));
    let mut owner = "b:1";
    for bounce in 1..=3 {
        let (actions, _) = pool.poll(t);
        let generation = generation_of(&actions, "d");
        assert!(bounce <= 3);
        pool.handle_doc_ended(t, &doc("d"), generation, Some(owner.into()));
        owner = if owner == "b:1" { "a:1" } else { "b:1" };
    }
    let (actions, wake) = pool.poll(t);
    assert!(opened(&actions).is_empty(), "backed off after 3 bounces");
    assert_eq!(wake, Some(t + Duration::from_millis(150)));
}

/// A connection no document uses, and not the primary, closes after a while.
#[test]
fn unused_connections_close() {
    let t = Instant::now();
    let (mut pool, _) = Pool::new(config(&["a:1"]), "a:1", welcome(1, &["a:1", "b:1"]));
    pool.handle_established(t, "b:1", Ok(welcome(2, &["a:1", "b:1"])))
        .unwrap();
    let (actions, wake) = pool.poll(t);
    assert!(actions.is_empty());
    assert_eq!(wake, Some(t + UNUSED_CONNECTION_CLOSE));
    let (actions, _) = pool.poll(t + UNUSED_CONNECTION_CLOSE);
    assert_eq!(
        actions,
        vec![Action::Close {
            addr: "b:1".into(),
            reason: "unused"
        }]
    );
    assert_eq!(pool.connections().collect::<Vec<_>>(), vec!["a:1"]);
}

/// Without a router, a `redirect` is followed only when it names a newer placement; the
/// old cell's connections close and the documents go to the new cell.
#[test]
fn redirects_are_followed_only_forward() {
    let t = Instant::now();
    let (mut pool, _) = Pool::new(config(&["a:1"]), "a:1", welcome(1, &["a:1"]));
    pool.open(doc("d"));
    pool.poll(t);
    pool.handle_redirect(t, "east".into(), vec!["e:1".into()], 5);
    let (actions, _) = pool.poll(t);
    assert!(actions.contains(&Action::Close {
        addr: "a:1".into(),
        reason: "redirected"
    }));
    assert_eq!(connects(&actions), vec!["e:1".to_string()]);
    pool.handle_established(t, "e:1", Ok(welcome(3, &["e:1"])))
        .unwrap();
    // An older placement, or the same one again, is ignored.
    pool.handle_redirect(t, "west".into(), vec!["w:1".into()], 4);
    pool.handle_redirect(t, "west".into(), vec!["w:1".into()], 5);
    let (actions, _) = pool.poll(t);
    assert!(connects(&actions).is_empty(), "{actions:?}");
}

/// With a router: when the last connection dies the pool asks where the tenant lives,
/// and a newer home moves it there.
#[test]
fn a_client_with_a_router_locates_when_its_cell_is_gone() {
    let t = Instant::now();
    let mut config = config(&["a:1"]);
    config.router = Some(RouterConfig {
        router: "router:1".into(),
        tenant: TenantId::new("acme").unwrap(),
        home: Some(("west".into(), 1)),
    });
    let (mut pool, generation) = Pool::new(config, "a:1", welcome(1, &["a:1"]));
    assert_eq!(pool.handle_lost(t, "a:1", generation, None), Ok(()));
    let (actions, _) = pool.poll(t);
    assert!(actions.contains(&Action::Locate {
        router: "router:1".into(),
        tenant: TenantId::new("acme").unwrap()
    }));
    // Only one locate at a time.
    let (actions, _) = pool.poll(t);
    assert!(!actions.iter().any(|a| matches!(a, Action::Locate { .. })));
    pool.handle_located(
        t,
        Ok(Home {
            cell: "east".into(),
            nodes: vec!["e:1".into()],
            epoch: 2,
        }),
    )
    .unwrap();
    let (actions, _) = pool.poll(t);
    assert!(
        connects(&actions).contains(&"e:1".to_string()),
        "{actions:?}"
    );
    assert_eq!(
        pool.handle_located(t, Err(Failure::UnknownTenant("gone".into()))),
        Err(Stop("unknown tenant: gone".into()))
    );
}

/// A refused token or an unknown tenant stops the pool for good.
#[test]
fn a_refused_token_stops_the_pool() {
    let t = Instant::now();
    let (mut pool, generation) = Pool::new(config(&["a:1"]), "a:1", welcome(1, &["a:1"]));
    assert_eq!(
        pool.handle_lost(t, "a:1", generation, Some("expired".into())),
        Err(Stop("expired".into()))
    );
    assert_eq!(
        pool.handle_established(t, "a:1", Err(Failure::Unauthorized("bad".into()))),
        Err(Stop("bad".into()))
    );
    assert_eq!(pool.state(), PoolState::Connecting);
}
