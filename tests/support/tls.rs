//! TLS for the tests: a private CA (rcgen) that signs leaf certificates,
//! rustls clients that trust only that CA, a keep-alive HTTPS client, and
//! [`TlsBackend`], an HTTPS test server that counts TCP accepts, handshakes
//! and requests per connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls::{SupportedProtocolVersion, ALL_VERSIONS};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{Answer, Binary};

/// The crypto provider the balancer uses too (rustls with aws-lc-rs), passed
/// explicitly so no process-wide default has to be installed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A private certificate authority made for one test.
pub struct TestCa {
    pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// A new CA called `name` (a fresh key each time, so two CAs never
    /// trust each other's leaves).
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate as PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Writes the CA certificate to `dir/file`; returns the path.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, &self.pem).unwrap();
        path
    }

    /// A root store holding only this CA.
    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        Arc::new(roots)
    }

    /// A server certificate for `names` (DNS names, wildcards, or IP
    /// addresses), signed by this CA, with a fresh key.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
            ca_pem: self.pem.clone(),
        }
    }
}

/// A leaf certificate and its key.
pub struct Leaf {
    /// The leaf certificate alone, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The leaf certificate, DER: what a client sees first in the chain.
    pub der: CertificateDer<'static>,
    key_der: Vec<u8>,
    ca_pem: String,
}

impl Leaf {
    /// The full chain as served: the leaf, then its CA.
    pub fn chain_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.ca_pem)
    }

    /// Writes `dir/<stem>.crt` (full chain) and `dir/<stem>.key`; returns
    /// the two file names (relative to `dir`, as a config names them).
    pub fn write(&self, dir: &Path, stem: &str) -> (String, String) {
        let (cert, key) = (format!("{stem}.crt"), format!("{stem}.key"));
        std::fs::write(dir.join(&cert), self.chain_pem()).unwrap();
        std::fs::write(dir.join(&key), &self.key_pem).unwrap();
        (cert, key)
    }

    /// A rustls server config serving this leaf (TLS 1.2 and 1.3, ALPN
    /// `http/1.1`).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let chain = vec![self.der.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(ALL_VERSIONS)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// A client config trusting only `ca`, TLS 1.2 and 1.3, offering ALPN
/// `http/1.1`.
pub fn client_config(ca: &TestCa) -> Arc<ClientConfig> {
    client_config_with(ca, ALL_VERSIONS, &[b"http/1.1"])
}

/// A client config trusting only `ca`, with these protocol versions and
/// ALPN protocols (in preference order).
pub fn client_config_with(
    ca: &TestCa,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A server name from text: a DNS name sends SNI, an IP address does not
/// (rustls never sends SNI for an IP).
pub fn server_name(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_string()).unwrap()
}

/// Connects to `addr` and completes a TLS handshake for `name`, within
/// 10 s (a hang is an error too).
pub async fn connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await?;
        TlsConnector::from(config)
            .connect(server_name(name), tcp)
            .await
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no TLS handshake within 10 s",
            ))
        })
}

/// The leaf certificate the server presented on `stream`.
pub fn served_cert(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server sent a certificate")
        .clone()
        .into_owned()
}

/// A verifier that does the normal checks (through rustls's WebPKI
/// verifier) and remembers the leaf it was shown, so a test can see which
/// certificate a server chose even when it does not match the name asked for.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    seen: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.clone().into_owned());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Connects to `addr` asking for `name` (SNI) with a client trusting `ca`
/// and returns the leaf the server presented, whether or not it is valid
/// for `name`, and whether the handshake succeeded.
pub async fn presented_cert(
    addr: SocketAddr,
    name: &str,
    ca: &TestCa,
) -> (Option<CertificateDer<'static>>, std::io::Result<()>) {
    let seen = Arc::new(Mutex::new(None));
    let verifier = Recording {
        inner: WebPkiServerVerifier::builder_with_provider(ca.roots(), provider())
            .build()
            .unwrap(),
        seen: Arc::clone(&seen),
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(ALL_VERSIONS)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let outcome = connect(addr, name, Arc::new(config)).await.map(drop);
    let seen = seen.lock().unwrap().take();
    (seen, outcome)
}

/// A keep-alive HTTP/1.1 client over one TLS connection (hyper's client
/// connection on a rustls stream): every request goes over the same
/// connection, so a test can tell an old connection from a new one.
pub struct TlsHttp {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authority: String,
    /// The leaf certificate this connection was served.
    pub cert: CertificateDer<'static>,
    /// The negotiated TLS version.
    pub version: rustls::ProtocolVersion,
    /// The negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    task: JoinHandle<()>,
}

impl TlsHttp {
    /// Connects to `addr` as `name` with `config`; panics if the handshake
    /// fails.
    pub async fn connect(addr: SocketAddr, name: &str, config: Arc<ClientConfig>) -> TlsHttp {
        let stream = connect(addr, name, config)
            .await
            .unwrap_or_else(|e| panic!("TLS handshake with {addr} as {name}: {e}"));
        let cert = served_cert(&stream);
        let (version, alpn) = {
            let session = stream.get_ref().1;
            (
                session.protocol_version().expect("a negotiated version"),
                session.alpn_protocol().map(<[u8]>::to_vec),
            )
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("an HTTP/1.1 connection");
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        TlsHttp {
            sender,
            authority: name.to_string(),
            cert,
            version,
            alpn,
            task,
        }
    }

    /// `GET path` with extra headers, over this connection, within 20 s.
    pub async fn get_with(&mut self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = Request::get(path).header("host", &self.authority);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.send(request.body(Full::default()).unwrap()).await
    }

    /// `GET path` over this connection.
    pub async fn get(&mut self, path: &str) -> Answer {
        self.get_with(path, &[]).await
    }

    /// Sends a request over this connection and reads the whole answer;
    /// panics on a transport error or after 20 s.
    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Answer {
        let exchange = async {
            self.sender.ready().await?;
            let response = self.sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .expect("an answer within 20 s")
            .expect("an answer over the TLS connection")
    }

    /// Whether the connection can still send (hyper saw no close).
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}

impl Drop for TlsHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a TLS test backend saw.
#[derive(Debug, Default)]
pub struct TlsBackendState {
    /// TCP connections accepted (health-check connects included).
    pub tcp_accepts: AtomicUsize,
    /// TLS handshakes completed.
    pub handshakes: AtomicUsize,
    /// Requests received.
    pub hits: AtomicUsize,
    /// Each request as `(connection number, path)`, in arrival order.
    pub requests: Mutex<Vec<(usize, String)>>,
    /// The SNI of each completed handshake.
    pub server_names: Mutex<Vec<Option<String>>>,
    /// Headers of the last request.
    pub last_headers: Mutex<Vec<(String, String)>>,
    /// Wakes every open connection to drop it (see
    /// [`TlsBackend::drop_connections`]).
    kick: tokio::sync::Notify,
}

/// An HTTPS/1.1 server on 127.0.0.1 serving one leaf certificate; answers
/// every request `200` with its name.
pub struct TlsBackend {
    /// The name it answers with.
    pub name: String,
    addr: SocketAddr,
    /// What it saw.
    pub state: Arc<TlsBackendState>,
    task: JoinHandle<()>,
}

impl TlsBackend {
    /// Starts one on an ephemeral port serving `leaf`.
    pub async fn start(name: &str, leaf: &Leaf) -> TlsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(TlsBackendState::default());
        let acceptor = TlsAcceptor::from(leaf.server_config());
        let task = tokio::spawn(tls_accept_loop(
            listener,
            acceptor,
            name.to_string(),
            Arc::clone(&state),
        ));
        TlsBackend {
            name: name.to_string(),
            addr,
            state,
            task,
        }
    }

    /// `host:port` for a config.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> usize {
        self.state.handshakes.load(Ordering::SeqCst)
    }

    /// The paths requested so far.
    pub fn paths(&self) -> Vec<String> {
        let requests = self.state.requests.lock().unwrap();
        requests.iter().map(|(_, p)| p.clone()).collect()
    }

    /// Closes every open connection (a TLS `close_notify` and a FIN), as a
    /// backend ending idle keep-alive connections does; keeps listening.
    pub fn drop_connections(&self) {
        self.state.kick.notify_waiters();
    }

    /// How many distinct connections carried a request for `path`.
    pub fn connections_for(&self, path: &str) -> usize {
        let requests = self.state.requests.lock().unwrap();
        let mut connections: Vec<usize> = requests
            .iter()
            .filter(|(_, p)| p == path)
            .map(|(c, _)| *c)
            .collect();
        connections.sort_unstable();
        connections.dedup();
        connections.len()
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    name: String,
    state: Arc<TlsBackendState>,
) {
    // Connections live in this set, so aborting the loop drops them all.
    let mut connections = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let number = state.tcp_accepts.fetch_add(1, Ordering::SeqCst);
        let (acceptor, name, state) = (acceptor.clone(), name.clone(), Arc::clone(&state));
        connections.spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            state.handshakes.fetch_add(1, Ordering::SeqCst);
            let kick_state = Arc::clone(&state);
            let sni = tls.get_ref().1.server_name().map(str::to_string);
            state.server_names.lock().unwrap().push(sni);
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let (name, state) = (name.clone(), Arc::clone(&state));
                async move {
                    state.hits.fetch_add(1, Ordering::SeqCst);
                    state
                        .requests
                        .lock()
                        .unwrap()
                        .push((number, request.uri().path().to_string()));
                    *state.last_headers.lock().unwrap() = request
                        .headers()
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.to_string(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect();
                    let mut response = Response::new(Full::new(Bytes::from(name)));
                    *response.status_mut() = StatusCode::OK;
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let kicked = Arc::clone(&kick_state);
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = kicked.kick.notified() => {
                    // Ends the connection the way a server does: finish
                    // what is in flight, then close_notify and FIN.
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
}

/// The balancer's TLS listener address, from its log, waiting up to 10 s
/// for the line (it may come after the plain listener's).
pub async fn tls_addr(binary: &Binary) -> SocketAddr {
    let started = std::time::Instant::now();
    loop {
        if let Some(addr) = binary.tls_addr() {
            return addr;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no `TLS listener on https://` line: {}",
            binary.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The values of header `name` (lowercase) in recorded `headers`.
pub fn header_values(headers: &[(String, String)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .collect()
}
