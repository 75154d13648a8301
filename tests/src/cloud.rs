//! A cloud for ENI-mode tests, on a node namespace's loopback: the EC2
//! emulator moto, a fake instance metadata service (`IMDSv2`), and a proxy in
//! front of moto that can answer calls with EC2's throttling error.
//!
//! moto does not create kernel links, so [`plug_links`] creates a veth with
//! each attached ENI's MAC in the node namespace, as the cloud would.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc, Arc, Mutex, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::{
    netns::{enter, netns_file, Netns},
    process::{spawn_in, NsChild},
    util::{unavailable, wait_for},
};

/// The Python of the tools venv (`cargo xtask setup`).
pub const PYTHON: &str = "/opt/podnet-tools/venv/bin/python";
/// moto's server.
pub const MOTO: &str = "/opt/podnet-tools/venv/bin/moto_server";
/// The token the fake IMDS hands out.
const TOKEN: &str = "podnet-test-token";
/// How long a proxied connection may stay silent.
const PROXY_IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a held call waits before its connection is closed.
pub const HOLD_LIMIT: Duration = Duration::from_secs(30);

/// EC2's answer to a throttled call (HTTP 503), as the real API sends it.
pub const THROTTLE_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>5f3c0f4e-0000-4000-8000-000000000000</RequestID></Response>";

/// Whether moto and its Python are installed; reports it (failing under
/// `CI=true`) when not.
pub fn moto_available() -> bool {
    Path::new(MOTO).exists() && Path::new(PYTHON).exists()
        || unavailable(
            "moto[server] is not installed in /opt/podnet-tools/venv (run `cargo xtask setup`)",
        )
}

fn helper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/eni/ec2.py")
}

/// moto's server behind a launcher that hands out each private address once,
/// as EC2 does (`fixtures/eni/moto_server.py` says why).
fn launcher() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/eni/moto_server.py")
}

/// moto running in a namespace; killed by PID on drop.
#[derive(Debug)]
pub struct Moto {
    child: Option<NsChild>,
    port: u16,
}

impl Moto {
    /// Starts moto on `127.0.0.1:port` in `node` and waits until it answers.
    pub fn start(node: &Netns, port: u16) -> Result<Self> {
        let launcher = launcher();
        let moto = Self {
            child: Some(spawn_in(
                node,
                &[
                    PYTHON,
                    launcher.to_str().unwrap_or_default(),
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ],
            )?),
            port,
        };
        if !wait_for(
            || moto.ec2(node, &["all-enis"]).is_ok(),
            Duration::from_secs(30),
        ) {
            bail!("moto did not come up");
        }
        Ok(moto)
    }

    /// Its endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs the boto3 helper (`fixtures/eni/ec2.py`) in `node` and parses its
    /// JSON output.
    pub fn ec2(&self, node: &Netns, args: &[&str]) -> Result<Value> {
        let helper = helper();
        let ep = self.endpoint();
        let mut cmd = vec![PYTHON, helper.to_str().unwrap_or_default(), ep.as_str()];
        cmd.extend_from_slice(args);
        let out = node.run(&cmd)?;
        if !out.status.success() {
            bail!(
                "ec2.py {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// This instance's ENIs as moto has them, by device index.
    pub fn enis(&self, node: &Netns, instance: &str) -> Result<Vec<Value>> {
        let mut list = self
            .ec2(node, &["enis", instance])?
            .as_array()
            .cloned()
            .unwrap_or_default();
        list.sort_by_key(|e| e["device_index"].as_u64());
        Ok(list)
    }

    /// Creates a veth named `en<device index>` with the MAC of every attached
    /// ENI that has no link yet, as the cloud would hot-plug the interface.
    /// Returns how many links it added.
    pub fn plug_links(&self, node: &Netns, instance: &str) -> Result<usize> {
        let present: BTreeSet<String> = links(node)?
            .iter()
            .filter_map(|l| l["address"].as_str().map(str::to_owned))
            .collect();
        let mut added = 0;
        for e in self.enis(node, instance)? {
            let mac = e["mac"].as_str().unwrap_or_default().to_owned();
            if present.contains(&mac) {
                continue;
            }
            let name = format!("en{}", e["device_index"]);
            let peer = format!("{name}p");
            node.run_ok(&[
                "ip", "link", "add", &name, "address", &mac, "type", "veth", "peer", "name", &peer,
            ])?;
            node.run_ok(&["ip", "link", "set", &peer, "up"])?;
            added += 1;
        }
        Ok(added)
    }

    /// Polls `cond` every [`PLUG_POLL`] for up to `timeout`, plugging the
    /// links of newly attached ENIs ([`Moto::plug_links`]) before each check,
    /// so an agent waiting for its new ENI's link sees it. Returns whether
    /// `cond` became true.
    pub fn plug_until(
        &self,
        node: &Netns,
        instance: &str,
        timeout: Duration,
        mut cond: impl FnMut() -> bool,
    ) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            self.plug_links(node, instance)?;
            if cond() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(PLUG_POLL);
        }
    }
}

/// A node in the EC2 world: its namespace, moto on `127.0.0.1` in it, the
/// instance moto's setup made, the fake metadata service, and a link for each
/// of the instance's ENIs.
#[derive(Debug)]
pub struct Ec2World {
    /// The node namespace.
    pub node: Netns,
    /// The EC2 emulator.
    pub moto: Moto,
    /// The metadata service.
    pub imds: FakeImds,
    /// What `ec2.py setup` made (instance, subnets, groups, zone).
    pub id: Value,
    /// The instance id.
    pub instance: String,
}

impl Ec2World {
    /// Sets it up in a new namespace named after `name`, moto on `moto_port`.
    pub fn new(moto_port: u16, name: &str) -> Result<Self> {
        let node = Netns::new(name)?;
        let moto = Moto::start(&node, moto_port)?;
        let id = moto.ec2(&node, &["setup"])?;
        let instance = id["instance_id"].as_str().unwrap_or_default().to_owned();
        let imds = FakeImds::start(&node, &id)?;
        moto.plug_links(&node, &instance)?;
        Ok(Self {
            node,
            moto,
            imds,
            id,
            instance,
        })
    }

    /// Plugs the links of new ENIs until `done` or `timeout` ([`Moto::plug_until`]).
    pub fn until(&self, timeout: Duration, done: impl FnMut() -> bool) -> Result<bool> {
        self.moto
            .plug_until(&self.node, &self.instance, timeout, done)
    }
}

/// How often [`Moto::plug_until`] checks its condition.
pub const PLUG_POLL: Duration = Duration::from_millis(300);

/// The links of `node` as `ip -j link show` reports them (`ifname`,
/// `address`, `mtu`, `flags`, ...).
pub fn links(node: &Netns) -> Result<Vec<Value>> {
    let out = node.run_ok(&["ip", "-j", "link", "show"])?;
    Ok(serde_json::from_slice::<Value>(&out.stdout)?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            let _ = c.kill();
        }
    }
}

/// A listener thread inside a namespace, stopped on drop.
#[derive(Debug)]
struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `127.0.0.1:0` in `node` and hands every connection to `serve`
    /// on the same thread, inside the namespace (so `serve` may open
    /// connections in it too).
    fn start(node: &Netns, serve: impl Fn(TcpStream) + Send + 'static) -> Result<Self> {
        let file = netns_file(node)?;
        let name = node.name().to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let listener = enter(&file, &name).and_then(|()| {
                let l = TcpListener::bind("127.0.0.1:0")?;
                l.set_nonblocking(true)?;
                Ok(l)
            });
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(l.local_addr().map(|a| a.port()).map_err(Into::into));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => serve(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(5))
            .context("listener thread did not start")??;
        Ok(Self {
            port,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP request: method, path, headers (lower-case names), body.
struct Request {
    line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one request; `None` at end of stream.
fn read_request(reader: &mut impl BufRead) -> Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let mut req = Request {
        line: line.trim_end().to_owned(),
        headers,
        body: Vec::new(),
    };
    let length: usize = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    req.body = vec![0; length];
    reader.read_exact(&mut req.body)?;
    Ok(Some(req))
}

/// The fake instance metadata service (`IMDSv2` only) for the instance
/// `identity` (the output of `ec2.py setup`).
#[derive(Debug)]
pub struct FakeImds(Server);

impl FakeImds {
    /// Starts it on the loopback of `node`.
    pub fn start(node: &Netns, identity: &Value) -> Result<Self> {
        let id = identity.clone();
        Ok(Self(Server::start(node, move |conn| {
            let id = id.clone();
            std::thread::spawn(move || {
                let _ = serve_imds(conn, &id);
            });
        })?))
    }

    /// Its endpoint (`--imds-endpoint`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.0.port)
    }
}

/// A container credentials endpoint as EKS Pod Identity's agent serves it:
/// `GET` with the token in `Authorization` answers temporary credentials
/// for an hour; any other token gets 401.
#[derive(Debug)]
pub struct CredentialsEndpoint {
    server: Server,
    served: Arc<AtomicU32>,
}

impl CredentialsEndpoint {
    /// Starts it on the loopback of `node`, expecting `token` and handing
    /// out `access_key_id`.
    pub fn start(node: &Netns, token: &str, access_key_id: &str) -> Result<Self> {
        let handed_out = Arc::new(AtomicU32::new(0));
        let (token, key, counter) = (
            token.to_owned(),
            access_key_id.to_owned(),
            handed_out.clone(),
        );
        let server = Server::start(node, move |conn| {
            let (token, key, counter) = (token.clone(), key.clone(), counter.clone());
            std::thread::spawn(move || {
                let _ = serve_credentials(conn, &token, &key, &counter);
            });
        })?;
        Ok(Self {
            server,
            served: handed_out,
        })
    }

    /// Its URL (`AWS_CONTAINER_CREDENTIALS_FULL_URI`).
    pub fn uri(&self) -> String {
        format!("http://127.0.0.1:{}/v1/credentials", self.server.port)
    }

    /// Credentials handed out so far.
    pub fn served(&self) -> u32 {
        self.served.load(Ordering::SeqCst)
    }
}

fn serve_credentials(conn: TcpStream, token: &str, key: &str, served: &AtomicU32) -> Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    while let Some(req) = read_request(&mut reader)? {
        let (status, text) = if req.header("authorization") == Some(token) {
            served.fetch_add(1, Ordering::SeqCst);
            let expires = std::time::SystemTime::now() + Duration::from_hours(1);
            let secs = expires
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            (
                200,
                json!({
                    "AccessKeyId": key, "SecretAccessKey": "pod-identity-secret",
                    "Token": "pod-identity-session", "Expiration": utc(secs)
                })
                .to_string(),
            )
        } else {
            (401, String::new())
        };
        write!(
            out,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        )?;
        out.flush()?;
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SSZ` of `secs` since the epoch.
fn utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Serves one keep-alive connection.
fn serve_imds(conn: TcpStream, id: &Value) -> Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    while let Some(req) = read_request(&mut reader)? {
        let mut parts = req.line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let token = req.header("x-aws-ec2-metadata-token").unwrap_or_default();
        let (status, text) = imds_answer(method, path, token, id);
        write!(
            out,
            "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        )?;
        out.flush()?;
    }
    Ok(())
}

fn imds_answer(method: &str, path: &str, token: &str, id: &Value) -> (u16, String) {
    if method == "PUT" && path == "/latest/api/token" {
        return (200, TOKEN.to_owned());
    }
    if token != TOKEN {
        return (401, String::new());
    }
    let s = |k: &str| id[k].as_str().unwrap_or_default().to_owned();
    let mac = s("mac");
    let iface = format!("network/interfaces/macs/{mac}/");
    let Some(key) = path.strip_prefix("/latest/meta-data/") else {
        return (404, String::new());
    };
    let value = match key {
        "instance-id" => s("instance_id"),
        "instance-type" => s("instance_type"),
        "placement/region" => s("region"),
        "placement/availability-zone" => s("availability_zone"),
        "mac" => mac.clone(),
        "iam/security-credentials/" => "podnet-node".to_owned(),
        "iam/security-credentials/podnet-node" => json!({
            "Code": "Success", "AccessKeyId": "ASIATESTING", "SecretAccessKey": "testing",
            "Token": "testing", "Expiration": "2099-01-01T00:00:00Z"
        })
        .to_string(),
        k if k == format!("{iface}subnet-id") => s("subnet_id"),
        k if k == format!("{iface}subnet-ipv4-cidr-block") => s("subnet_cidr"),
        k if k == format!("{iface}security-group-ids") => id["security_groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n"),
        _ => return (404, String::new()),
    };
    (200, value)
}

/// One EC2 call that went through a [`ThrottleProxy`].
#[derive(Clone, Debug)]
pub struct ProxiedCall {
    /// When the request arrived.
    pub at: Instant,
    /// Its `Action`.
    pub action: String,
    /// Its form-encoded parameters, in order (`(name, value)`, decoded).
    pub params: Vec<(String, String)>,
    /// The access key its `SigV4` signature names (`None`: unsigned).
    pub access_key: Option<String>,
    /// The answer's body.
    pub answer: String,
    /// Whether the proxy answered it with `RequestLimitExceeded`.
    pub throttled: bool,
}

/// Decodes one `application/x-www-form-urlencoded` component.
fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One answer moto gave to a listing: when, to which request, what.
#[derive(Debug)]
struct Listing {
    at: Instant,
    request: Vec<u8>,
    head: String,
    body: Vec<u8>,
}

#[derive(Debug, Default)]
struct ProxyState {
    throttle_left: AtomicU32,
    calls: Mutex<Vec<ProxiedCall>>,
    /// How old a `DescribeNetworkInterfaces` answer may be (zero: fresh).
    listing_age: Mutex<Duration>,
    listings: Mutex<Vec<Listing>>,
    /// Calls of this action are never forwarded nor answered (the caller
    /// waits until it gives up, or dies).
    held: Mutex<Option<String>>,
    /// moto's port.
    upstream: u16,
}

impl ProxyState {
    /// moto's answer to `req`, or, with a listing age set, the oldest answer
    /// moto gave to the same listing within that age: EC2's Describe calls
    /// lag behind its changes (eventual consistency).
    fn answer(&self, req: &Request, action: &str) -> Result<(String, Vec<u8>)> {
        let fresh = forward(req, self.upstream)?;
        let age = *self
            .listing_age
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if action != "DescribeNetworkInterfaces" || age.is_zero() {
            return Ok(fresh);
        }
        let mut listings = self.listings.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        listings.retain(|l| now.duration_since(l.at) <= age);
        listings.push(Listing {
            at: now,
            request: req.body.clone(),
            head: fresh.0,
            body: fresh.1,
        });
        let oldest = listings
            .iter()
            .find(|l| l.request == req.body)
            .context("the listing just recorded is gone")?;
        Ok((oldest.head.clone(), oldest.body.clone()))
    }
}

/// An HTTP proxy in front of moto that answers the next N calls with HTTP
/// 503 `RequestLimitExceeded` (EC2's throttling error), can serve listings
/// up to a given age, and passes every other call through, recording each
/// call. One request per connection.
#[derive(Debug)]
pub struct ThrottleProxy {
    server: Server,
    state: Arc<ProxyState>,
}

impl ThrottleProxy {
    /// Starts it on the loopback of `node`, forwarding to `127.0.0.1:upstream`.
    pub fn start(node: &Netns, upstream: u16) -> Result<Self> {
        let state = Arc::new(ProxyState {
            upstream,
            ..ProxyState::default()
        });
        let s = state.clone();
        let server = Server::start(node, move |conn| {
            if let Err(e) = proxy_one(conn, &s) {
                eprintln!("podnet-tests: throttle proxy: {e:#}");
            }
        })?;
        Ok(Self { server, state })
    }

    /// Its endpoint (`--cloud-endpoint`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port)
    }

    /// Answers the next `n` calls with `RequestLimitExceeded`.
    pub fn throttle_next(&self, n: u32) {
        self.state.throttle_left.store(n, Ordering::SeqCst);
    }

    /// From now on answers `DescribeNetworkInterfaces` with the oldest of
    /// moto's answers of the last `age` (as EC2's listings lag its changes).
    pub fn serve_listings_up_to(&self, age: Duration) {
        *self
            .state
            .listing_age
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = age;
    }

    /// From now on never forwards nor answers calls of `action`; each such
    /// connection is closed after at most [`HOLD_LIMIT`].
    pub fn hold(&self, action: &str) {
        *self
            .state
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(action.to_owned());
    }

    /// Ends [`ThrottleProxy::hold`]: held connections are closed unanswered.
    pub fn release(&self) {
        *self
            .state
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Throttled answers still to give.
    pub fn throttle_left(&self) -> u32 {
        self.state.throttle_left.load(Ordering::SeqCst)
    }

    /// Every call so far, in order of arrival.
    pub fn calls(&self) -> Vec<ProxiedCall> {
        self.state
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn proxy_one(conn: TcpStream, state: &ProxyState) -> Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(PROXY_IO_TIMEOUT))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let Some(req) = read_request(&mut reader)? else {
        return Ok(());
    };
    let body = String::from_utf8_lossy(&req.body).into_owned();
    let action = body
        .split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .unwrap_or_default()
        .to_owned();
    let throttled = state
        .throttle_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    // `Credential=<access key>/<date>/<region>/<service>/aws4_request`.
    let access_key = req
        .header("authorization")
        .and_then(|a| a.split("Credential=").nth(1))
        .and_then(|c| c.split('/').next())
        .map(str::to_owned);
    let index = {
        let mut calls = state.calls.lock().unwrap_or_else(PoisonError::into_inner);
        calls.push(ProxiedCall {
            at: Instant::now(),
            action: action.clone(),
            params: body
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (form_decode(k), form_decode(v)))
                .collect(),
            access_key,
            answer: String::new(),
            throttled,
        });
        calls.len() - 1
    };
    let is_held = || {
        state
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_deref()
            == Some(action.as_str())
    };
    if is_held() {
        let until = Instant::now() + HOLD_LIMIT;
        while is_held() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        return Ok(());
    }
    let (head, body) = if throttled {
        (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/xml;charset=UTF-8".to_owned(),
            THROTTLE_BODY.as_bytes().to_vec(),
        )
    } else {
        state.answer(&req, &action)?
    };
    if let Some(call) = state
        .calls
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_mut(index)
    {
        call.answer = String::from_utf8_lossy(&body).into_owned();
    }
    write!(
        out,
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(&body)?;
    out.flush()?;
    Ok(())
}

/// Sends `req` to moto as HTTP/1.0 (so the answer ends at end of stream) and
/// returns the answer's status line and headers (without length and
/// connection headers) and its body.
fn forward(req: &Request, upstream: u16) -> Result<(String, Vec<u8>)> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream)).context("connecting to moto")?;
    up.set_read_timeout(Some(PROXY_IO_TIMEOUT))?;
    let line = req
        .line
        .rsplit_once(' ')
        .map_or(req.line.as_str(), |(l, _)| l);
    let mut head = format!("{line} HTTP/1.0\r\n");
    for (k, v) in &req.headers {
        if !matches!(k.as_str(), "connection" | "content-length") {
            let _ = std::fmt::Write::write_fmt(&mut head, format_args!("{k}: {v}\r\n"));
        }
    }
    let _ = std::fmt::Write::write_fmt(
        &mut head,
        format_args!("content-length: {}\r\n\r\n", req.body.len()),
    );
    up.write_all(head.as_bytes())?;
    up.write_all(&req.body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("moto's answer has no header end")?;
    let text = String::from_utf8_lossy(&answer[..split]).into_owned();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let name = l.split(':').next().unwrap_or_default().to_ascii_lowercase();
            !matches!(
                name.as_str(),
                "content-length" | "connection" | "transfer-encoding" | "keep-alive"
            )
        })
        .collect();
    Ok((kept.join("\r\n"), answer[split + 4..].to_vec()))
}
