//! Plugin logic against a fake agent; the parser under proptest.

use std::{cell::RefCell, collections::HashMap};

use proptest::prelude::*;
use serde_json::{json, Value};

use podnet_api::{
    client::ClientError,
    protocol::{ApiError, ErrorCode},
};

use crate::{
    entry::{execute, Outcome},
    plugin::AgentApi,
    spec::{self, parse_netconf, Role},
};

/// Records calls; answers from a closure.
struct Fake<F: Fn(&str, &Value) -> Result<Value, ClientError>> {
    calls: RefCell<Vec<(String, Value)>>,
    answer: F,
}

impl<F: Fn(&str, &Value) -> Result<Value, ClientError>> AgentApi for &Fake<F> {
    fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        let r = (self.answer)(method, &params);
        self.calls.borrow_mut().push((method.to_owned(), params));
        r
    }
}

fn vars(command: &str) -> HashMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "abc"),
        ("CNI_NETNS", "/proc/self/ns/net"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_UID=u1",
        ),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

fn run<F>(fake: &'static Fake<F>, command: &str, stdin: &str) -> Outcome
where
    F: Fn(&str, &Value) -> Result<Value, ClientError> + Sync,
{
    let log = std::env::temp_dir().join("podnet-cni-unit.log");
    let stdin = stdin.replace("LOG", &log.display().to_string());
    execute(&vars(command), stdin.as_bytes(), &|_| Box::new(fake))
}

const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"veth1","mac":"aa:bb:cc:dd:ee:ff"},{"name":"eth0","sandbox":"/proc/self/ns/net"}],"ips":[{"address":"10.244.1.5/24","gateway":"10.244.1.1","interface":1}]}"#;

fn leak<T>(t: T) -> &'static T {
    Box::leak(Box::new(t))
}

#[test]
fn chained_add_registers_and_passes_prev_result_through() {
    let fake = leak(Fake {
        calls: RefCell::new(Vec::new()),
        answer: |_: &str, _: &Value| Ok(json!({})),
    });
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"net","type":"podnet-cni","logFile":"LOG","prevResult":{PREV}}}"#
    );
    let out = run(fake, "ADD", &conf);
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap(),
        serde_json::from_str::<Value>(PREV).unwrap()
    );
    let calls = fake.calls.borrow();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, "endpoint.add");
    assert_eq!(
        calls[0].1,
        json!({"command":"ADD","endpoint":{"containerId":"abc","ifName":"eth0","network":"net","netns":"/proc/self/ns/net",
            "namespace":"shop","pod":"cart-1","podUid":"u1","interface":"veth1","ips":["10.244.1.5"]}})
    );
}

#[test]
fn a_link_local_gateway_gets_its_default_route_from_the_agent_not_the_ipam_result() {
    // IPAM: no default route through 169.254.1.1 (ptp could not add it).
    let fake = leak(Fake {
        calls: RefCell::new(Vec::new()),
        answer: |_: &str, _: &Value| {
            Ok(
                json!({"containerId":"abc","ifName":"eth0","network":"net","allocatedUnixMs":1,
                "ips":[{"ip":"10.0.1.9","prefix":"10.0.1.0/24","gateway":"169.254.1.1"}]}),
            )
        },
    });
    let conf = r#"{"cniVersion":"1.0.0","name":"net","type":"ptp","ipam":{"type":"podnet-cni","logFile":"LOG"}}"#;
    let out = run(fake, "ADD", conf);
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap(),
        json!({"cniVersion":"1.0.0",
            "ips":[{"address":"10.0.1.9/24","gateway":"169.254.1.1"}],
            "routes":[]})
    );
    // Chained: the route the agent added in the pod joins the result.
    let fake = leak(Fake {
        calls: RefCell::new(Vec::new()),
        answer: |_: &str, _: &Value| Ok(json!({"routes":[{"dst":"0.0.0.0/0","gw":"169.254.1.1"}]})),
    });
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"net","type":"podnet-cni","logFile":"LOG","prevResult":{PREV}}}"#
    );
    let out = run(fake, "ADD", &conf);
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    let mut expected = serde_json::from_str::<Value>(PREV).unwrap();
    expected["routes"] = json!([{"dst":"0.0.0.0/0","gw":"169.254.1.1"}]);
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap(),
        expected
    );
}

#[test]
fn ipam_add_returns_addresses_gateway_and_routes() {
    let fake = leak(Fake {
        calls: RefCell::new(Vec::new()),
        answer: |_: &str, _: &Value| {
            Ok(
                json!({"containerId":"abc","ifName":"eth0","network":"net","allocatedUnixMs":1,
                "ips":[{"ip":"10.244.1.2","prefix":"10.244.1.0/24","gateway":"10.244.1.1"},
                       {"ip":"fd00::2","prefix":"fd00::/64","gateway":"fd00::1"}]}),
            )
        },
    });
    let conf = r#"{"cniVersion":"0.4.0","name":"net","type":"ptp","ipam":{"type":"podnet-cni","logFile":"LOG"}}"#;
    let out = run(fake, "ADD", conf);
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap(),
        json!({"cniVersion":"0.4.0",
            "ips":[{"address":"10.244.1.2/24","gateway":"10.244.1.1","version":"4"},
                   {"address":"fd00::2/64","gateway":"fd00::1","version":"6"}],
            "routes":[{"dst":"0.0.0.0/0","gw":"10.244.1.1"},{"dst":"::/0","gw":"fd00::1"}]})
    );
}

#[test]
fn errors_map_to_cni_codes() {
    let exhausted = leak(Fake {
        calls: RefCell::new(Vec::new()),
        answer: |m: &str, _: &Value| {
            Err(ClientError::Remote {
                method: m.to_owned(),
                error: ApiError::new(ErrorCode::ResourceExhausted, "no free address: node-cidr 10.0.0.0/30: 1/1 addresses allocated, 0 cooling down"),
            })
        },
    });
    let conf = r#"{"cniVersion":"1.1.0","name":"net","type":"ptp","ipam":{"type":"podnet-cni","logFile":"LOG"}}"#;
    let out = run(exhausted, "ADD", conf);
    assert_eq!(out.exit_code, 1);
    let e: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(e["code"], json!(101));
    assert_eq!(e["cniVersion"], json!("1.1.0"));
    assert!(e["details"]
        .as_str()
        .unwrap()
        .contains("1/1 addresses allocated"));

    // The agent could not make the change before the plugin's deadline:
    // nothing was changed, try again later.
    let late = leak(Fake {
        calls: RefCell::new(Vec::new()),
        answer: |m: &str, _: &Value| {
            Err(ClientError::Remote {
                method: m.to_owned(),
                error: ApiError::new(ErrorCode::DeadlineExceeded, "the caller's deadline passed 3 ms ago while the change waited for the disk; nothing was changed, retry later"),
            })
        },
    });
    let e: Value = serde_json::from_str(&run(late, "ADD", conf).stdout).unwrap();
    assert_eq!(e["code"], json!(11));
    assert_eq!(e["details"], json!("the caller's deadline passed 3 ms ago while the change waited for the disk; nothing was changed, retry later"));

    let down = leak(Fake {
        calls: RefCell::new(Vec::new()),
        answer: |_: &str, _: &Value| {
            Err(ClientError::NotRunning {
                path: "/run/podnet/agent.sock".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        },
    });
    let e: Value = serde_json::from_str(&run(down, "ADD", conf).stdout).unwrap();
    assert_eq!(e["code"], json!(100));
    let e: Value = serde_json::from_str(&run(down, "STATUS", conf).stdout).unwrap();
    assert_eq!(e["code"], json!(51));

    let status_exhausted = leak(Fake {
        calls: RefCell::new(Vec::new()),
        answer: |_: &str, _: &Value| {
            Ok(
                json!({"mode":"node-cidr","pools":[],"cooldowns":[],"allocations":1,"exhausted":"node-cidr 10.0.0.0/30: 1/1 addresses allocated, 0 cooling down"}),
            )
        },
    });
    let e: Value = serde_json::from_str(&run(status_exhausted, "STATUS", conf).stdout).unwrap();
    assert_eq!(e["code"], json!(50));

    // Chained without prevResult: invalid config, nothing called.
    let none = leak(Fake {
        calls: RefCell::new(Vec::new()),
        answer: |_: &str, _: &Value| Ok(json!({})),
    });
    let out = run(
        none,
        "ADD",
        r#"{"cniVersion":"1.0.0","name":"n","type":"podnet-cni","logFile":"LOG"}"#,
    );
    let e: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(e["code"], json!(7));
    assert!(none.calls.borrow().is_empty());
    // GC without valid attachments.
    let out = run(
        none,
        "GC",
        r#"{"cniVersion":"1.1.0","name":"n","type":"podnet-cni","logFile":"LOG"}"#,
    );
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap()["code"],
        json!(7)
    );
    // GC in the chained role collects endpoints and addresses of its network.
    let out = run(
        none,
        "GC",
        r#"{"cniVersion":"1.1.0","name":"n","type":"podnet-cni","logFile":"LOG","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
    );
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    let calls = none.calls.borrow();
    assert_eq!(
        calls.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
        ["endpoint.gc", "ipam.gc"]
    );
    assert_eq!(
        calls[0].1,
        json!({"command":"GC","network":"n","valid":[{"containerId":"a","ifName":"eth0"}]})
    );
}

#[test]
fn parser_decides_the_role_and_rejects_bad_keys() {
    let c = parse_netconf(br#"{"cniVersion":"1.0.0","name":"n","type":"bridge","ipam":{"type":"podnet-cni","socket":"/s","timeout":"500ms"}}"#).unwrap();
    assert_eq!(c.role, Role::Ipam);
    assert_eq!(c.keys.socket, "/s");
    assert_eq!(c.keys.timeout, std::time::Duration::from_millis(500));
    assert_eq!(c.keys.log_file, spec::DEFAULT_LOG_FILE);
    let c = parse_netconf(br#"{"cniVersion":"1.1.0","name":"n","type":"podnet-cni"}"#).unwrap();
    assert_eq!(c.role, Role::Chained);
    assert_eq!(c.keys.timeout, spec::DEFAULT_TIMEOUT);
    for (bad, code) in [
        (r#"{"cniVersion":"0.3.1","type":"podnet-cni"}"#, 1),
        (r#"{"type":"podnet-cni"}"#, 7),
        (
            r#"{"cniVersion":"1.0.0","type":"podnet-cni","timeout":"forever"}"#,
            7,
        ),
        (
            r#"{"cniVersion":"1.0.0","type":"podnet-cni","timeout":"0s"}"#,
            7,
        ),
        (
            r#"{"cniVersion":"1.0.0","type":"podnet-cni","socket":5}"#,
            7,
        ),
        (
            r#"{"cniVersion":"1.0.0","type":"ptp","ipam":{"type":"host-local"}}"#,
            7,
        ),
        (
            r#"{"cniVersion":"1.0.0","type":"podnet-cni","prevResult":[]}"#,
            7,
        ),
        ("[]", 6),
        ("", 6),
        (
            r#"{"cniVersion":"1.0.0","name":"n\u0000../x","type":"podnet-cni"}"#,
            7,
        ),
        (
            r#"{"cniVersion":"1.0.0","name":"../etc","type":"podnet-cni"}"#,
            7,
        ),
        (
            r#"{"cniVersion":"1.0.0","name":"a/b","type":"podnet-cni"}"#,
            7,
        ),
    ] {
        assert_eq!(
            parse_netconf(bad.as_bytes()).unwrap_err().code,
            code,
            "{bad}"
        );
    }
}

#[test]
fn bridge_prev_result_names_the_veth() {
    let prev = spec::parse_prev_result(&json!({"cniVersion":"1.0.0","interfaces":[
        {"name":"cni0","mac":"a"},{"name":"veth9","mac":"b"},{"name":"eth0","sandbox":"/run/netns/p"}],
        "ips":[{"address":"10.245.0.2/24","gateway":"10.245.0.1","interface":2}]}))
    .unwrap();
    let a = spec::attachment(&prev, "eth0");
    assert_eq!(a.host_interface.as_deref(), Some("veth9"));
    assert_eq!(a.ips, ["10.245.0.2".parse::<std::net::IpAddr>().unwrap()]);
}

proptest! {
    /// Whatever arrives on stdin, the parser answers with a config or a CNI
    /// error, never a panic.
    #[test]
    fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_netconf(&bytes);
        let _ = crate::plugin::version_request(&bytes);
    }

    /// Structured near-misses of a real configuration.
    #[test]
    fn parser_handles_json_shapes(
        version in prop_oneof![Just("1.0.0"), Just("0.4.0"), Just("1.1.0"), Just("2.0.0"), Just("")],
        ty in prop_oneof![Just("podnet-cni"), Just("ptp"), Just("")],
        timeout in prop_oneof![Just("2s"), Just("1.5s"), Just("10ms"), Just("-1s"), Just("1e9s"), Just("s")],
        prev in prop_oneof![Just("null"), Just("{}"), Just("[]"), Just(PREV)],
    ) {
        let text = format!(r#"{{"cniVersion":"{version}","name":"n","type":"{ty}","timeout":"{timeout}","ipam":{{"type":"podnet-cni"}},"prevResult":{prev}}}"#);
        match parse_netconf(text.as_bytes()) {
            Ok(c) => {
                prop_assert!(spec::SUPPORTED_VERSIONS.contains(&c.cni_version.as_str()));
                if let Some(p) = &c.prev_result {
                    let _ = spec::parse_prev_result(p);
                }
            }
            Err(e) => prop_assert!([1, 6, 7].contains(&e.code)),
        }
    }
}
