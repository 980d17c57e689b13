//! TLS through the real binary: termination on `tls_listen_address` (SNI,
//! ALPN, minimum version, `X-Forwarded-Proto`), certificates checked at
//! start-up, by `--check` and on reload, HTTPS backends verified against a
//! private CA, pooled and health-checked over TLS, and a TLS port that cuts
//! off clients that do not speak TLS.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use support::tls::{
    client_config, client_config_with, header_values, presented_cert, server_name, tls_addr,
    TestCa, TlsBackend, TlsHttp,
};
use support::{wait_until, Binary, Http, TestBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A balancer config: both listeners and the admin API on port 0, checks
/// rare enough to stay out of the way, and `extra` keys on top.
fn config(backends: Value, extra: Value) -> Value {
    let mut config = json!({
        "listen_address": "127.0.0.1:0",
        "admin_address": "127.0.0.1:0",
        "backend_servers": backends,
        "health_check_interval": 30,
    });
    for (key, value) in extra.as_object().expect("extra keys are an object") {
        config[key] = value.clone();
    }
    config
}

/// `config` with a TLS listener serving the `(cert, key)` file pairs.
fn tls_config(backends: Value, certificates: &[(String, String)], extra: Value) -> Value {
    let list: Vec<Value> = certificates
        .iter()
        .map(|(cert, key)| json!({"cert": cert, "key": key}))
        .collect();
    let mut config = config(backends, extra);
    config["tls_listen_address"] = json!("127.0.0.1:0");
    config["tls_certificates"] = Value::Array(list);
    config
}

/// Writes `config` as `dir/lb.json`; returns its path.
fn write_config(dir: &Path, config: &Value) -> PathBuf {
    let path = dir.join("lb.json");
    std::fs::write(&path, serde_json::to_string_pretty(config).unwrap()).unwrap();
    path
}

/// The admin listener's address, from the log (its line may come after
/// the one saying where the balancer listens).
async fn admin(binary: &Binary) -> Http {
    let started = std::time::Instant::now();
    loop {
        if let Some(addr) = binary.admin_addr() {
            return Http::new(addr);
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no admin line: {}",
            binary.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A site: a CA, one leaf for `site.test` (and 127.0.0.1) written next to
/// the config, and the balancer serving it in front of `backends`.
struct Site {
    dir: tempfile::TempDir,
    ca: TestCa,
    leaf: support::tls::Leaf,
    binary: Binary,
    tls: SocketAddr,
}

impl Site {
    async fn start(backends: Value, extra: Value) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("site CA");
        let leaf = ca.leaf(&["site.test", "127.0.0.1"]);
        let files = leaf.write(dir.path(), "site");
        let path = write_config(dir.path(), &tls_config(backends, &[files], extra));
        let binary = Binary::spawn(&path, &[]).await;
        let tls = tls_addr(&binary).await;
        Site {
            dir,
            ca,
            leaf,
            binary,
            tls,
        }
    }

    async fn client(&self) -> TlsHttp {
        TlsHttp::connect(self.tls, "site.test", client_config(&self.ca)).await
    }
}

#[tokio::test]
async fn a_closed_tls_connection_ends_with_close_notify() {
    // `Connection: close` over TLS: the answer, then a `close_notify`,
    // which a rustls client reads as a clean end (`Ok(0)`); a bare TCP
    // close would be `UnexpectedEof` (truncation cannot be ruled out).
    let backend = TestBackend::start("closing").await;
    let site = Site::start(json!([backend.address()]), json!({})).await;
    let mut tls = support::tls::connect(site.tls, "site.test", client_config(&site.ca))
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer))
        .await
        .expect("the balancer closes within 10 s");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("closing"), "{text}");
    assert!(read.is_ok(), "not a clean TLS close: {read:?}");
    assert_eq!(backend.hits(), 1);
}

#[tokio::test]
async fn https_reaches_the_backend_marked_https_and_plain_stays_http() {
    let backend = TestBackend::start("plain-b").await;
    let site = Site::start(json!([backend.address()]), json!({})).await;

    // The client claims `http`; the balancer knows better.
    let mut client = site.client().await;
    for round in 0..3 {
        let answer = client
            .get_with("/hello", &[("x-forwarded-proto", "http")])
            .await;
        assert_eq!(answer.status, StatusCode::OK, "round {round}");
        assert_eq!(answer.text(), "plain-b");
        let headers = backend.state.last_headers.lock().unwrap().clone();
        assert_eq!(
            header_values(&headers, "x-forwarded-proto"),
            ["https"],
            "{headers:?}"
        );
    }
    assert_eq!(backend.hits(), 3);

    // The plain listener keeps working and says `http`, whatever the
    // client sent.
    let plain = Http::new(site.binary.addr().unwrap());
    let answer = plain
        .send(
            Request::get(format!("{}/plain", plain.base()))
                .header("x-forwarded-proto", "https")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let headers = backend.state.last_headers.lock().unwrap().clone();
    assert_eq!(
        header_values(&headers, "x-forwarded-proto"),
        ["http"],
        "{headers:?}"
    );
}

#[tokio::test]
async fn alpn_negotiates_http_1_1() {
    let backend = TestBackend::start("alpn").await;
    let site = Site::start(json!([backend.address()]), json!({})).await;
    // A client that would rather speak h2 still gets HTTP/1.1, the only
    // protocol the balancer offers, and a working request on it.
    let config = client_config_with(&site.ca, rustls::ALL_VERSIONS, &[b"h2", b"http/1.1"]);
    let mut client = TlsHttp::connect(site.tls, "site.test", config).await;
    assert_eq!(client.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(client.get("/").await.text(), "alpn");
    // A client that offers no ALPN at all is served too.
    let config = client_config_with(&site.ca, rustls::ALL_VERSIONS, &[]);
    let mut client = TlsHttp::connect(site.tls, "site.test", config).await;
    assert_eq!(client.alpn, None);
    assert_eq!(client.get("/").await.text(), "alpn");
}

#[tokio::test]
async fn sni_picks_the_certificate_by_name_and_falls_back_to_the_first() {
    let backend = TestBackend::start("sni").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("sni CA");
    // Both carry 127.0.0.1, so a client connecting by IP (no SNI) can
    // verify whichever it gets; which one it gets is the point.
    let plain_leaf = ca.leaf(&["a.test", "127.0.0.1"]);
    let wildcard = ca.leaf(&["*.example.test", "127.0.0.1"]);
    let a = plain_leaf.write(dir.path(), "a");
    let w = wildcard.write(dir.path(), "wildcard");

    // (SNI sent, the leaf expected, whether it verifies for that name)
    let cases_a_first = [
        ("a.test", &plain_leaf, true),
        ("www.example.test", &wildcard, true),
        ("api.example.test", &wildcard, true),
        // A wildcard covers exactly one label.
        ("deep.www.example.test", &plain_leaf, false),
        ("example.test", &plain_leaf, false),
        ("unknown.test", &plain_leaf, false),
        // An IP name: rustls sends no SNI at all.
        ("127.0.0.1", &plain_leaf, true),
    ];
    let path = write_config(
        dir.path(),
        &tls_config(
            json!([backend.address()]),
            &[a.clone(), w.clone()],
            json!({}),
        ),
    );
    let binary = Binary::spawn(&path, &[]).await;
    let tls = tls_addr(&binary).await;
    for (name, expected, valid) in cases_a_first {
        let (seen, outcome) = presented_cert(tls, name, &ca).await;
        assert!(
            seen.as_ref() == Some(&expected.der),
            "SNI {name:?}: the wrong certificate ({outcome:?})"
        );
        assert_eq!(outcome.is_ok(), valid, "SNI {name:?}: {outcome:?}");
    }
    // A chosen certificate serves requests too.
    let mut client = TlsHttp::connect(tls, "www.example.test", client_config(&ca)).await;
    assert_eq!(client.get("/").await.text(), "sni");
    drop(binary);

    // The fallback is the first in the list, not a favourite: reversed,
    // the wildcard is served to unknown names and to no SNI.
    let path = write_config(
        dir.path(),
        &tls_config(json!([backend.address()]), &[w, a], json!({})),
    );
    let binary = Binary::spawn(&path, &[]).await;
    let tls = tls_addr(&binary).await;
    for (name, expected) in [
        ("unknown.test", &wildcard),
        ("127.0.0.1", &wildcard),
        ("a.test", &plain_leaf),
    ] {
        let (seen, outcome) = presented_cert(tls, name, &ca).await;
        assert!(
            seen.as_ref() == Some(&expected.der),
            "reversed, SNI {name:?}: the wrong certificate ({outcome:?})"
        );
    }
}

#[tokio::test]
async fn tls_min_version_1_3_refuses_a_tls_1_2_client() {
    let backend = TestBackend::start("v").await;
    let tls12 = &[&rustls::version::TLS12];
    let tls13 = &[&rustls::version::TLS13];
    let alpn: &[&[u8]] = &[b"http/1.1"];

    // By default ("1.2") both versions are served: the 1.2-only client
    // is a working client.
    let site = Site::start(json!([backend.address()]), json!({})).await;
    let mut old = TlsHttp::connect(
        site.tls,
        "site.test",
        client_config_with(&site.ca, tls12, alpn),
    )
    .await;
    assert_eq!(old.version, rustls::ProtocolVersion::TLSv1_2);
    assert_eq!(old.get("/").await.status, StatusCode::OK);
    let new = TlsHttp::connect(
        site.tls,
        "site.test",
        client_config_with(&site.ca, tls13, alpn),
    )
    .await;
    assert_eq!(new.version, rustls::ProtocolVersion::TLSv1_3);
    drop(site);

    let site = Site::start(
        json!([backend.address()]),
        json!({"tls_min_version": "1.3"}),
    )
    .await;
    let hits = backend.hits();
    let refused = support::tls::connect(
        site.tls,
        "site.test",
        client_config_with(&site.ca, tls12, alpn),
    )
    .await;
    assert!(refused.is_err(), "a TLS 1.2 client got in");
    let mut new = TlsHttp::connect(
        site.tls,
        "site.test",
        client_config_with(&site.ca, tls13, alpn),
    )
    .await;
    assert_eq!(new.version, rustls::ProtocolVersion::TLSv1_3);
    assert_eq!(new.get("/").await.status, StatusCode::OK);
    assert_eq!(backend.hits(), hits + 1);
}

#[tokio::test]
async fn a_reloaded_certificate_serves_new_connections_while_old_ones_keep_working() {
    let backend = TestBackend::start("r").await;
    let site = Site::start(json!([backend.address()]), json!({})).await;
    let mut old = site.client().await;
    assert_eq!(old.cert, site.leaf.der);
    assert_eq!(old.get("/").await.status, StatusCode::OK);

    // New files at the same paths, then SIGHUP.
    let renewed = site.ca.leaf(&["site.test", "127.0.0.1"]);
    renewed.write(site.dir.path(), "site");
    site.binary.signal("HUP");
    let started = std::time::Instant::now();
    let mut fresh = loop {
        let client = site.client().await;
        if client.cert == renewed.der {
            break client;
        }
        assert_eq!(client.cert, site.leaf.der, "neither the old nor the new");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the renewed certificate is not served: {}",
            site.binary.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(fresh.get("/").await.status, StatusCode::OK);

    // The connection opened before the reload still carries requests.
    for _ in 0..3 {
        let answer = old.get("/after-reload").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), "r");
    }
    assert!(old.is_open());
    assert_eq!(old.cert, site.leaf.der);
}

#[tokio::test]
async fn a_reload_with_bad_certificate_files_is_rejected_and_the_old_one_keeps_serving() {
    let backend = TestBackend::start("k").await;
    let site = Site::start(json!([backend.address()]), json!({})).await;
    let admin = admin(&site.binary).await;
    let mut open = site.client().await;
    let other = site.ca.leaf(&["site.test"]);

    // `needles`: any of these names will do (a mismatch may be reported
    // against the key or the certificate).
    let reject = |what: &'static str, needles: &'static [&'static str]| {
        let admin = admin.clone();
        async move {
            let answer = admin.post("/reload", "").await;
            assert_eq!(
                answer.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{what}: {}",
                answer.text()
            );
            let outcome: Value = serde_json::from_slice(&answer.body).unwrap();
            let error = outcome["error"].as_str().unwrap_or_default().to_string();
            assert!(
                needles.iter().any(|n| error.contains(n)),
                "{what}: {outcome}"
            );
        }
    };

    // A key that belongs to another certificate.
    std::fs::write(site.dir.path().join("other.key"), &other.key_pem).unwrap();
    let files = [("site.crt".to_string(), "other.key".to_string())];
    write_config(
        site.dir.path(),
        &tls_config(json!([backend.address()]), &files, json!({})),
    );
    reject("a key of another certificate", &["other.key", "site.crt"]).await;
    // A file that is not there.
    let files = [("gone.crt".to_string(), "site.key".to_string())];
    write_config(
        site.dir.path(),
        &tls_config(json!([backend.address()]), &files, json!({})),
    );
    reject("a missing certificate", &["gone.crt"]).await;
    // An empty certificate file.
    std::fs::write(site.dir.path().join("empty.crt"), "").unwrap();
    let files = [("empty.crt".to_string(), "site.key".to_string())];
    write_config(
        site.dir.path(),
        &tls_config(json!([backend.address()]), &files, json!({})),
    );
    reject("an empty certificate file", &["empty.crt"]).await;

    // The old certificate still serves, old and new connections alike.
    assert_eq!(open.get("/").await.status, StatusCode::OK);
    let fresh = site.client().await;
    assert_eq!(fresh.cert, site.leaf.der);

    // And a good reload after them is taken: the rejections were about
    // the files, not about reloading certificates at all.
    let renewed = site.ca.leaf(&["site.test"]);
    let files = renewed.write(site.dir.path(), "renewed");
    write_config(
        site.dir.path(),
        &tls_config(json!([backend.address()]), &[files], json!({})),
    );
    let answer = admin.post("/reload", "").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(site.client().await.cert, renewed.der);
}

/// Runs the binary with `args` in a bounded time (30 s, then killed) and
/// returns (exit code, stdout, stderr).
async fn run_bounded(args: &[&str]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rust_load_balancer"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{}` still running after 30 s: {}",
                args.join(" "),
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (status.code(), read(&out), read(&err))
}

#[tokio::test]
async fn bad_certificate_files_fail_check_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("check CA");
    let leaf = ca.leaf(&["site.test"]);
    let other = ca.leaf(&["site.test"]);
    leaf.write(dir.path(), "site");
    std::fs::write(dir.path().join("other.key"), &other.key_pem).unwrap();
    std::fs::write(dir.path().join("empty.crt"), "").unwrap();
    std::fs::write(dir.path().join("empty.key"), "").unwrap();
    // PEM files holding the wrong kind of thing.
    std::fs::write(dir.path().join("keyonly.crt"), &leaf.key_pem).unwrap();
    std::fs::write(dir.path().join("certonly.key"), &leaf.cert_pem).unwrap();

    let check = |files: Value, extra: Value| {
        let mut config = config(json!(["127.0.0.1:9"]), extra);
        config["tls_listen_address"] = json!("127.0.0.1:0");
        if !files.is_null() {
            config["tls_certificates"] = files;
        }
        let path = write_config(dir.path(), &config);
        async move { run_bounded(&["--check", "--config", path.to_str().unwrap()]).await }
    };

    // The good files pass: what fails below fails for its file.
    let (code, out, err) = check(json!([{"cert": "site.crt", "key": "site.key"}]), json!({})).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = check(
        json!([{"cert": "site.crt", "key": "site.key"}]),
        json!({"tls_min_version": "1.3"}),
    )
    .await;
    assert_eq!(code, Some(0), "tls_min_version 1.3: {out}{err}");

    let cases = [
        (
            "a missing certificate",
            json!([{"cert": "missing.crt", "key": "site.key"}]),
            &["missing.crt"][..],
        ),
        (
            "a missing key",
            json!([{"cert": "site.crt", "key": "missing.key"}]),
            &["missing.key"][..],
        ),
        (
            "a key of another certificate",
            json!([{"cert": "site.crt", "key": "other.key"}]),
            &["other.key", "site.crt"][..],
        ),
        (
            "an empty certificate file",
            json!([{"cert": "empty.crt", "key": "site.key"}]),
            &["empty.crt"][..],
        ),
        (
            "an empty key file",
            json!([{"cert": "site.crt", "key": "empty.key"}]),
            &["empty.key"][..],
        ),
        (
            "a certificate file with only a key",
            json!([{"cert": "keyonly.crt", "key": "site.key"}]),
            &["keyonly.crt"][..],
        ),
        (
            "a key file with only a certificate",
            json!([{"cert": "site.crt", "key": "certonly.key"}]),
            &["certonly.key"][..],
        ),
        // A bad second entry is found too, not just the first.
        (
            "a bad second pair",
            json!([{"cert": "site.crt", "key": "site.key"}, {"cert": "empty.crt", "key": "site.key"}]),
            &["empty.crt"][..],
        ),
    ];
    for (what, files, needles) in cases {
        let (code, out, err) = check(files, json!({})).await;
        assert_eq!(code, Some(1), "{what}: {out}{err}");
        assert!(
            needles.iter().any(|n| err.contains(n)),
            "{what}: stderr names none of {needles:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
    }

    // The keys themselves are checked.
    let (code, _, err) = check(Value::Null, json!({})).await;
    assert_eq!(
        code,
        Some(1),
        "tls_listen_address without certificates: {err}"
    );
    assert!(err.contains("tls_certificates"), "{err}");
    let (code, _, err) = check(
        json!([{"cert": "site.crt", "key": "site.key"}]),
        json!({"tls_min_version": "1.1"}),
    )
    .await;
    assert_eq!(code, Some(1), "tls_min_version 1.1: {err}");
    assert!(err.contains("tls_min_version"), "{err}");
}

#[tokio::test]
async fn bad_certificate_files_stop_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("start CA");
    let leaf = ca.leaf(&["site.test"]);
    leaf.write(dir.path(), "site");
    std::fs::write(
        dir.path().join("other.key"),
        ca.leaf(&["site.test"]).key_pem,
    )
    .unwrap();
    let files = [("site.crt".to_string(), "other.key".to_string())];
    let path = write_config(
        dir.path(),
        &tls_config(json!(["127.0.0.1:9"]), &files, json!({})),
    );
    let (code, _, err) = run_bounded(&["--config", path.to_str().unwrap()]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("other.key") || err.contains("site.crt"),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_upstream_ca_file_fails_check_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let backends = json!([{"address": "127.0.0.1:9", "tls": true}]);
    let path = write_config(
        dir.path(),
        &config(
            backends.clone(),
            json!({"upstream_ca_file": "nowhere-ca.pem"}),
        ),
    );
    let (code, _, err) = run_bounded(&["--check", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("nowhere-ca.pem"), "{err}");
    // With the file there, the same config passes.
    TestCa::new("ca").write(dir.path(), "nowhere-ca.pem");
    let (code, out, err) = run_bounded(&["--check", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, Some(0), "{out}{err}");
}

/// The balancer with an HTTPS backend behind the CA in `ca_file`
/// (relative to the config's folder).
async fn upstream(dir: &Path, backend: Value, ca: &TestCa, extra: Value) -> Binary {
    ca.write(dir, "upstream-ca.pem");
    let mut extra = extra;
    extra["upstream_ca_file"] = json!("upstream-ca.pem");
    // Failures must show as 502s here, never as a backend taken out; and
    // one attempt per request, unless `extra` says otherwise.
    extra["unhealthy_threshold"] = json!(1000);
    if extra.get("max_retries").is_none() {
        extra["max_retries"] = json!(0);
    }
    let path = write_config(dir, &config(json!([backend]), extra));
    Binary::spawn(&path, &[]).await
}

#[tokio::test]
async fn an_https_backend_behind_a_private_ca_is_verified_and_reached() {
    let ca = TestCa::new("backend CA");
    let backend = TlsBackend::start("tls-b", &ca.leaf(&["backend.test"])).await;
    let dir = tempfile::tempdir().unwrap();
    let entry =
        json!({"address": backend.address(), "tls": true, "tls_server_name": "backend.test"});
    let binary = upstream(dir.path(), entry, &ca, json!({})).await;
    let http = Http::new(binary.addr().unwrap());
    for _ in 0..3 {
        let answer = http.get("/over-tls").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", binary.log());
        assert_eq!(answer.text(), "tls-b");
    }
    assert_eq!(backend.hits(), 3);
    assert!(
        backend
            .state
            .server_names
            .lock()
            .unwrap()
            .iter()
            .all(|n| n.as_deref() == Some("backend.test")),
        "the balancer sent another SNI: {:?}",
        backend.state.server_names.lock().unwrap()
    );
    let headers = backend.state.last_headers.lock().unwrap().clone();
    assert_eq!(header_values(&headers, "x-forwarded-proto"), ["http"]);
}

#[tokio::test]
async fn the_default_backend_server_name_is_the_address_host() {
    let ca = TestCa::new("backend CA");
    let dir = tempfile::tempdir().unwrap();
    // A certificate for the IP in the address: verified without a
    // `tls_server_name`.
    let by_ip = TlsBackend::start("by-ip", &ca.leaf(&["127.0.0.1"])).await;
    let entry = json!({"address": by_ip.address(), "tls": true});
    let binary = upstream(dir.path(), entry, &ca, json!({})).await;
    let answer = Http::new(binary.addr().unwrap()).get("/").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", binary.log());
    assert_eq!(answer.text(), "by-ip");
    drop(binary);

    // A certificate for another name only: the default name (127.0.0.1)
    // does not match it.
    let by_name = TlsBackend::start("by-name", &ca.leaf(&["backend.test"])).await;
    let entry = json!({"address": by_name.address(), "tls": true});
    let binary = upstream(dir.path(), entry, &ca, json!({})).await;
    let answer = Http::new(binary.addr().unwrap()).get("/").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text());
    assert_eq!(by_name.hits(), 0);
}

/// A log line naming `address` that says something about a certificate.
async fn wait_for_tls_failure_line(binary: &Binary, address: &str) -> String {
    let found = |log: &str| {
        log.lines()
            .find(|l| l.contains(address) && l.to_lowercase().contains("certificate"))
            .map(str::to_string)
    };
    let started = std::time::Instant::now();
    loop {
        if let Some(line) = found(&binary.log()) {
            return line;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no log line names {address} and the certificate problem: {}",
            binary.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_https_backend_signed_by_another_ca_is_a_502_naming_the_backend() {
    let trusted = TestCa::new("trusted CA");
    let stranger = TestCa::new("stranger CA");
    let backend = TlsBackend::start("untrusted", &stranger.leaf(&["backend.test"])).await;
    let dir = tempfile::tempdir().unwrap();
    let entry =
        json!({"address": backend.address(), "tls": true, "tls_server_name": "backend.test"});
    let binary = upstream(dir.path(), entry, &trusted, json!({})).await;
    let answer = Http::new(binary.addr().unwrap()).get("/").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text());
    assert_eq!(backend.hits(), 0, "a request went to an unverified backend");
    let line = wait_for_tls_failure_line(&binary, &backend.address()).await;
    assert!(!line.contains("panicked"), "{line}");
}

#[tokio::test]
async fn an_unverifiable_https_backend_is_logged_with_the_default_max_retries() {
    // The default max_retries (2) with one backend: the failed attempt
    // may be retried, but there is no other backend, so the client gets
    // the failure, and the log must still say which backend and why.
    let trusted = TestCa::new("trusted CA");
    let stranger = TestCa::new("stranger CA");
    let backend = TlsBackend::start("untrusted", &stranger.leaf(&["backend.test"])).await;
    let dir = tempfile::tempdir().unwrap();
    let entry =
        json!({"address": backend.address(), "tls": true, "tls_server_name": "backend.test"});
    let binary = upstream(dir.path(), entry, &trusted, json!({"max_retries": 2})).await;
    let answer = Http::new(binary.addr().unwrap()).get("/").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text());
    assert_eq!(backend.hits(), 0);
    wait_for_tls_failure_line(&binary, &backend.address()).await;
}

#[tokio::test]
async fn an_https_backend_with_another_name_is_a_502_naming_the_backend() {
    let ca = TestCa::new("backend CA");
    let backend = TlsBackend::start("misnamed", &ca.leaf(&["backend.test"])).await;
    let dir = tempfile::tempdir().unwrap();
    let entry = json!({"address": backend.address(), "tls": true, "tls_server_name": "other.test"});
    let binary = upstream(dir.path(), entry, &ca, json!({})).await;
    let answer = Http::new(binary.addr().unwrap()).get("/").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text());
    assert_eq!(backend.hits(), 0, "a request went to a misnamed backend");
    wait_for_tls_failure_line(&binary, &backend.address()).await;
}

#[tokio::test]
async fn tls_backend_connections_are_pooled() {
    let ca = TestCa::new("backend CA");
    let backend = TlsBackend::start("pooled", &ca.leaf(&["backend.test"])).await;
    let dir = tempfile::tempdir().unwrap();
    let entry =
        json!({"address": backend.address(), "tls": true, "tls_server_name": "backend.test"});
    let binary = upstream(dir.path(), entry, &ca, json!({"worker_threads": 1})).await;
    let http = Http::new(binary.addr().unwrap());
    for _ in 0..10 {
        assert_eq!(http.get("/pooled").await.status, StatusCode::OK);
    }
    assert_eq!(backend.hits(), 10);
    // One worker, sequential requests: one TLS connection carried them all
    // (health-check connects, if any, carry no `/pooled`).
    assert_eq!(
        backend.connections_for("/pooled"),
        1,
        "{:?}",
        backend.state.requests.lock().unwrap()
    );
}

#[tokio::test]
async fn a_pooled_tls_connection_the_backend_closed_is_replaced() {
    let ca = TestCa::new("backend CA");
    let backend = TlsBackend::start("renewed", &ca.leaf(&["backend.test"])).await;
    let dir = tempfile::tempdir().unwrap();
    let entry =
        json!({"address": backend.address(), "tls": true, "tls_server_name": "backend.test"});
    // No retries on other backends: only noticing the closed connection
    // (or resending on a fresh one) saves the next request.
    let binary = upstream(dir.path(), entry, &ca, json!({"worker_threads": 1})).await;
    let http = Http::new(binary.addr().unwrap());
    assert_eq!(http.get("/kept").await.status, StatusCode::OK);
    assert_eq!(backend.connections_for("/kept"), 1);

    // The backend ends its idle connections, as servers do.
    backend.drop_connections();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let answer = http.get("/kept").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", binary.log());
    }
    assert_eq!(backend.hits(), 4);
    assert_eq!(backend.connections_for("/kept"), 2);
}

#[tokio::test]
async fn health_checks_of_a_tls_backend_speak_tls_and_verify_it() {
    let ca = TestCa::new("backend CA");
    let stranger = TestCa::new("stranger CA");
    let good = TlsBackend::start("good", &ca.leaf(&["backend.test"])).await;
    let bad = TlsBackend::start("bad", &stranger.leaf(&["backend.test"])).await;
    let dir = tempfile::tempdir().unwrap();
    ca.write(dir.path(), "upstream-ca.pem");
    let entries = json!([
        {"address": good.address(), "tls": true, "tls_server_name": "backend.test"},
        {"address": bad.address(), "tls": true, "tls_server_name": "backend.test"},
    ]);
    let path = write_config(
        dir.path(),
        &config(
            entries,
            json!({
                "upstream_ca_file": "upstream-ca.pem",
                "health_check_path": "/healthz",
                "health_check_interval": 0.2,
                "health_check_timeout": 1,
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
            }),
        ),
    );
    let binary = Binary::spawn(&path, &[]).await;
    let admin = admin(&binary).await;

    // The good backend only speaks TLS: a `GET /healthz` arriving means the
    // check did the handshake.
    wait_until("a health check over TLS", Duration::from_secs(10), || {
        good.paths().iter().filter(|p| *p == "/healthz").count() >= 2
    })
    .await;
    // The one the CA does not vouch for fails its checks.
    let started = std::time::Instant::now();
    loop {
        let backends: Value = serde_json::from_slice(&admin.get("/backends").await.body).unwrap();
        let healthy = |address: &str| {
            backends
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["address"] == address)
                .map(|b| b["healthy"].clone())
        };
        if healthy(&bad.address()) == Some(json!(false)) {
            assert_eq!(healthy(&good.address()), Some(json!(true)), "{backends}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the unverifiable backend stays healthy: {backends}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(bad.paths().is_empty(), "{:?}", bad.paths());
    // Requests go to the good one.
    let http = Http::new(binary.addr().unwrap());
    for _ in 0..4 {
        assert_eq!(http.get("/").await.text(), "good");
    }
}

/// Sends `bytes` to `addr`, then reads until the balancer closes the
/// connection (at most 8 s); returns what came back, or panics if it
/// stayed open.
async fn sent_then_closed(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    if !bytes.is_empty() {
        // A connection cut off while this is still sending is cut off.
        let _ = stream.write_all(bytes).await;
    }
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(8), async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the TLS port kept a connection open 8 s after {:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
    );
    received
}

#[tokio::test]
async fn plain_http_garbage_and_stalled_handshakes_are_cut_off_at_the_tls_port() {
    let backend = TestBackend::start("guarded").await;
    let site = Site::start(
        json!([backend.address()]),
        json!({"client_header_timeout": 1}),
    )
    .await;

    // The first half of a real ClientHello, then nothing.
    let mut hello = Vec::new();
    let mut tls =
        rustls::ClientConnection::new(client_config(&site.ca), server_name("site.test")).unwrap();
    tls.write_tls(&mut hello).unwrap();
    let half = hello[..hello.len() / 2].to_vec();
    // A ClientHello announcing 1 MiB, sent as six full 16 KiB handshake
    // records (96 KiB): past what any server buffers for one message.
    let mut huge = Vec::new();
    for record in 0..6 {
        huge.extend_from_slice(&[0x16, 0x03, 0x01, 0x40, 0x00]);
        let mut payload = vec![0x41u8; 0x4000];
        if record == 0 {
            payload[..4].copy_from_slice(&[0x01, 0x10, 0x00, 0x00]);
        }
        huge.extend_from_slice(&payload);
    }

    let cases: [(&str, &[u8]); 5] = [
        ("plain HTTP", b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n"),
        ("garbage", b"\x00\xffnot tls at all\r\n\r\n\x16\x03"),
        ("silence", b""),
        ("half a ClientHello", &half),
        ("a 1 MiB ClientHello", &huge),
    ];
    // All at once: each is cut off by itself.
    let tasks: Vec<_> = cases
        .iter()
        .map(|(what, bytes)| {
            let (what, bytes, addr) = (*what, bytes.to_vec(), site.tls);
            tokio::spawn(async move { (what, sent_then_closed(addr, &bytes).await) })
        })
        .collect();
    for task in tasks {
        let (what, received) = task.await.unwrap();
        assert!(
            !received.starts_with(b"HTTP/"),
            "{what}: answered in plain HTTP: {:?}",
            String::from_utf8_lossy(&received)
        );
    }
    assert_eq!(backend.hits(), 0, "a request reached the backend");

    // After a complete handshake the head has client_header_timeout as
    // well: nothing at all, or half a head, and the connection is closed.
    for (what, bytes) in [
        ("a silent TLS client", &b""[..]),
        ("half a head over TLS", &b"GET / HTTP/1.1\r\nHost: site"[..]),
    ] {
        let mut stream = support::tls::connect(site.tls, "site.test", client_config(&site.ca))
            .await
            .expect("a handshake");
        stream.write_all(bytes).await.unwrap();
        stream.flush().await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(8), async {
            let mut chunk = [0u8; 1024];
            let mut received = Vec::new();
            while let Ok(n) = stream.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                received.extend_from_slice(&chunk[..n]);
            }
            received
        })
        .await;
        // A 408 before the close would do too; a request would not.
        assert!(closed.is_ok(), "{what}: still open after 8 s");
    }
    assert_eq!(backend.hits(), 0, "a request reached the backend");

    // The port still serves TLS clients.
    let mut client = site.client().await;
    assert_eq!(client.get("/").await.text(), "guarded");
    assert_eq!(backend.hits(), 1);
}

#[tokio::test]
async fn idle_tls_connections_are_not_parked_and_serve_on() {
    // A plain and a TLS connection, each idle after one request. Once the
    // plain one is parked (the sweep has passed both), the TLS one still
    // is not, and answers on the same connection.
    let backend = TestBackend::start("b").await;
    let site = Site::start(json!([backend.address()]), json!({})).await;
    let admin = admin(&site.binary).await;
    let mut tls = site.client().await;
    assert_eq!(tls.get("/").await.status, StatusCode::OK);
    let plain = Http::new(site.binary.addr().expect("the plain listener"));
    assert_eq!(plain.get("/").await.status, StatusCode::OK);
    let parked = || async {
        let text = admin.get("/metrics").await.text();
        text.lines()
            .find_map(|line| line.strip_prefix("lb_client_connections_parked "))
            .map(|value| value.trim().to_string())
    };
    let started = std::time::Instant::now();
    while parked().await.as_deref() != Some("1") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the plain connection not parked within 10 s: {:?}",
            parked().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(parked().await.as_deref(), Some("1"));
    let answer = tls.get("/").await;
    assert_eq!(answer.status, StatusCode::OK);
    // Over the same connection: TlsHttp has no other.
    assert_eq!(answer.text(), "b");
}
