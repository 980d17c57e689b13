//! DNS discovery through the real binary: a hand-made DNS server on
//! 127.0.0.1 whose answers change under load, backends on other loopback
//! addresses (127.0.0.2 and up are loopback on Linux).

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use support::{wait_until, Binary, Http, Load, TestBackend};
use tokio::net::UdpSocket;

/// What the test DNS server does with a question for its name.
#[derive(Debug, Clone)]
enum Mode {
    /// A records with these addresses (TTL 1); AAAA: none.
    Answer(Vec<Ipv4Addr>),
    /// NXDOMAIN.
    NoSuchName,
    /// No answer at all, as a server that is down.
    Silent,
}

/// A DNS server on 127.0.0.1 answering for one name from a changeable
/// [`Mode`]; any other name is NXDOMAIN.
struct Dns {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl Dns {
    async fn start(name: &str, mode: Mode) -> Dns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(mode));
        let shared = Arc::clone(&mode);
        let name = name.to_ascii_lowercase();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let mode = shared.lock().unwrap().clone();
                if let Some(answer) = answer(&buf[..n], &name, &mode) {
                    let _ = socket.send_to(&answer, from).await;
                }
            }
        });
        Dns { addr, mode, task }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer to one DNS query (RFC 1035 section 4): header, the question
/// copied, then A records (TTL 1) for `name` when asked for A.
fn answer(query: &[u8], name: &str, mode: &Mode) -> Option<Vec<u8>> {
    if query.len() < 12 || query[4..6] != [0, 1] {
        return None;
    }
    // The question: labels up to a zero byte, then type and class.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let question = query.get(12..question_end)?;
    let asked = labels.join(".");
    let ips = match mode {
        Mode::Silent => return None,
        Mode::NoSuchName => None,
        Mode::Answer(_) if asked != name => None,
        Mode::Answer(ips) => Some(ips.clone()),
    };
    let records: Vec<Ipv4Addr> = match (&ips, qtype) {
        (Some(ips), 1) => ips.clone(),
        _ => Vec::new(),
    };
    let rcode = if ips.is_none() { 3 } else { 0 };
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&query[0..2]); // id
    out.push(0x84 | (query[2] & 0x01)); // QR, AA, RD as asked
    out.push(0x80 | rcode); // RA, rcode
    out.extend_from_slice(&[0, 1]); // one question
    out.extend_from_slice(&(records.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // no authority, no additional
    out.extend_from_slice(question);
    for ip in records {
        out.extend_from_slice(&[0xc0, 12]); // the name: a pointer to the question's
        out.extend_from_slice(&[0, 1, 0, 1]); // A, IN
        out.extend_from_slice(&1u32.to_be_bytes()); // TTL 1 s
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

/// Test backends on `ips`, all on one port (the entry's), each answering
/// with its address as name.
async fn backends_on(ips: &[Ipv4Addr]) -> Vec<TestBackend> {
    let first = TestBackend::start_on(
        SocketAddr::new(ips[0].into(), 0),
        &ips[0].to_string(),
        Arc::default(),
    )
    .await;
    let port = first.addr().port();
    let mut all = vec![first];
    for ip in &ips[1..] {
        all.push(
            TestBackend::start_on(
                SocketAddr::new((*ip).into(), port),
                &ip.to_string(),
                Arc::default(),
            )
            .await,
        );
    }
    all
}

/// The binary on a config naming `svc.test:PORT`, resolved by `dns`
/// every second.
async fn start_binary(dir: &std::path::Path, dns: &Dns, port: u16) -> (Binary, Http, Http) {
    let path = dir.join("lb.json");
    std::fs::write(
        &path,
        format!(
            r#"{{ "listen_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0",
                 "backend_servers": [{{"address": "svc.test:{port}", "weight": 2, "labels": {{"zone": "a"}}}}],
                 "resolver": "{}", "dns_refresh": 1, "health_check_interval": 0.5 }}"#,
            dns.addr
        ),
    )
    .unwrap();
    let binary = Binary::spawn(&path, &[]).await;
    let started = std::time::Instant::now();
    let admin = loop {
        if let Some(addr) = binary.admin_addr() {
            break addr;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no admin line: {}",
            binary.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let http = Http::new(binary.addr().unwrap());
    (binary, http, Http::new(admin))
}

/// `/backends` as (address, id, source).
async fn listed(admin: &Http) -> Vec<(String, u64, Option<String>)> {
    let backends: serde_json::Value =
        serde_json::from_slice(&admin.get("/backends").await.body).unwrap();
    backends
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["id"].as_u64().unwrap(),
                b["source"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_join_and_leave_under_load_without_a_failed_request() {
    let backends = backends_on(&[ip(2), ip(3), ip(4)]).await;
    let port = backends[0].addr().port();
    let [b2, b3, b4] = [&backends[0], &backends[1], &backends[2]];
    let dns = Dns::start("svc.test", Mode::Answer(vec![ip(2), ip(3)])).await;
    let dir = tempfile::tempdir().unwrap();
    let (binary, http, admin) = start_binary(dir.path(), &dns, port).await;

    // Resolved at start-up: both addresses serve at once.
    for _ in 0..4 {
        assert_eq!(
            http.get("/").await.status,
            StatusCode::OK,
            "{}",
            binary.log()
        );
    }
    assert!(b2.hits() > 0 && b3.hits() > 0 && b4.hits() == 0);
    let first = listed(&admin).await;
    let addr = |b: &TestBackend| b.addr().to_string();
    assert_eq!(
        first.iter().map(|(a, _, _)| a.clone()).collect::<Vec<_>>(),
        [addr(b2), addr(b3)]
    );
    assert!(first
        .iter()
        .all(|(_, id, source)| *id >= 1 && source.as_deref() == Some("svc.test")));
    let id_of = |list: &[(String, u64, Option<String>)], b: &TestBackend| {
        list.iter()
            .find(|(a, _, _)| *a == addr(b))
            .map(|(_, id, _)| *id)
    };

    let load = Load::start(&http, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // {.2, .3} -> {.3, .4}: .4 joins, .2 leaves.
    dns.set(Mode::Answer(vec![ip(3), ip(4)]));
    wait_until("127.0.0.4 gets traffic", Duration::from_secs(10), || {
        b4.hits() > 0
    })
    .await;
    // Requests that started on the old set may still reach .2 just now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b2_after = b2.hits();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        b2.hits(),
        b2_after,
        "127.0.0.2 left the answer but still gets requests"
    );
    let second = listed(&admin).await;
    assert_eq!(
        second.iter().map(|(a, _, _)| a.clone()).collect::<Vec<_>>(),
        [addr(b3), addr(b4)]
    );
    assert_eq!(
        id_of(&second, b3),
        id_of(&first, b3),
        "an address that stays keeps its id"
    );
    let id4 = id_of(&second, b4).unwrap();
    assert!(
        first.iter().all(|(_, id, _)| *id != id4),
        "a new address gets a new id"
    );

    // -> {.2, .3, .4}: .2 comes back, with the id it had.
    dns.set(Mode::Answer(vec![ip(2), ip(3), ip(4)]));
    wait_until(
        "127.0.0.2 gets traffic again",
        Duration::from_secs(10),
        || b2.hits() > b2_after,
    )
    .await;
    let third = listed(&admin).await;
    assert_eq!(third.len(), 3);
    assert_eq!(
        id_of(&third, b2),
        id_of(&first, b2),
        "a returning address keeps its id"
    );
    let mut ids: Vec<u64> = third.iter().map(|(_, id, _)| *id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "ids are distinct: {third:?}");

    let hits_before = [b2.hits(), b3.hits(), b4.hits()];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = load.stop().await;
    assert_eq!(
        failed,
        0,
        "{failed} failed requests of {}: {}",
        ok + failed,
        binary.log()
    );
    assert!(ok > 100, "only {ok} requests");
    for (b, before) in [b2, b3, b4].iter().zip(hits_before) {
        assert!(b.hits() > before, "{} got no traffic at the end", b.name);
    }
    // Discovered backends are checked and measured like configured ones.
    let metrics = String::from_utf8_lossy(&admin.get("/metrics").await.body).to_string();
    assert!(metrics.contains(&addr(b4)), "{metrics}");
    let log = binary.log();
    assert!(log.contains("backend names resolved to a new set"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_does_not_resolve_yet_is_503_and_a_failed_lookup_keeps_the_addresses() {
    let backends = backends_on(&[ip(5)]).await;
    let port = backends[0].addr().port();
    let dns = Dns::start("svc.test", Mode::NoSuchName).await;
    let dir = tempfile::tempdir().unwrap();
    let (binary, http, admin) = start_binary(dir.path(), &dns, port).await;

    // Started, with a warning, and no backend to send to.
    assert!(
        binary
            .log()
            .contains("backend name svc.test has no address"),
        "{}",
        binary.log()
    );
    assert_eq!(http.get("/").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(listed(&admin).await.is_empty());

    // It resolves: served.
    dns.set(Mode::Answer(vec![ip(5)]));
    let started = std::time::Instant::now();
    while http.get("/").await.status != StatusCode::OK {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still 503: {}",
            binary.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed_now = listed(&admin).await;
    assert_eq!(listed_now.len(), 1);
    assert_eq!(
        listed_now[0].1, 1,
        "the first discovered id follows the one config entry"
    );

    // The DNS server stops answering: the last addresses stay, logged once.
    dns.set(Mode::Silent);
    let failure = "cannot resolve backend name svc.test";
    let load = Load::start(&http, 2);
    wait_until(
        "the failed lookup is logged",
        Duration::from_secs(15),
        || binary.log().contains(failure),
    )
    .await;
    // At least one more failing round (a lookup gives up after a few
    // seconds; the next starts a second later).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let (ok, failed) = load.stop().await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} failed while DNS was down: {}",
        ok + failed,
        binary.log()
    );
    assert_eq!(binary.log().matches(failure).count(), 1, "{}", binary.log());

    // Back: logged once more.
    let again = "backend name svc.test resolves again";
    assert_eq!(binary.log().matches(again).count(), 1, "{}", binary.log());
    dns.set(Mode::Answer(vec![ip(5)]));
    wait_until("it resolves again", Duration::from_secs(15), || {
        binary.log().matches(again).count() == 2
    })
    .await;
    assert_eq!(http.get("/").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_0_2_0_module_is_configured_again_when_the_set_changes() {
    let backends = backends_on(&[ip(6), ip(7)]).await;
    let port = backends[0].addr().port();
    let dns = Dns::start("svc.test", Mode::Answer(vec![ip(6)])).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.json");
    std::fs::write(
        &path,
        serde_json::json!({
            "listen_address": "127.0.0.1:0",
            "backend_servers": ["127.0.0.1:1", {"address": format!("svc.test:{port}"), "weight": 2, "labels": {"zone": "a"}}],
            "strategy": support::dist("probe.wasm"),
            "resolver": dns.addr.to_string(),
            "dns_refresh": 1,
        })
        .to_string(),
    )
    .unwrap();
    let binary = Binary::spawn(&path, &["--log-format", "json"]).await;
    let configures = || -> Vec<serde_json::Value> {
        binary
            .strategy_events()
            .into_iter()
            .filter(|e| e["event"] == "configure")
            .collect()
    };
    let first = configures();
    assert_eq!(first.len(), 1, "{}", binary.log());
    let entry = |id: u64, last: u8| serde_json::json!({"id": id, "address": format!("127.0.0.{last}:{port}"), "weight": 2, "labels": [["zone", "a"]]});
    // Entry 0 is the configured IP (id 0); entry 1, the name, is no id.
    assert_eq!(
        first[0]["backends"],
        serde_json::json!([{"id": 0, "address": "127.0.0.1:1", "weight": 1, "labels": []}, entry(2, 6)])
    );
    dns.set(Mode::Answer(vec![ip(6), ip(7)]));
    wait_until(
        "configure with the new list",
        Duration::from_secs(10),
        || configures().len() >= 2,
    )
    .await;
    let last = configures().pop().unwrap();
    assert_eq!(
        last["backends"],
        serde_json::json!([{"id": 0, "address": "127.0.0.1:1", "weight": 1, "labels": []}, entry(2, 6), entry(3, 7)])
    );
}
