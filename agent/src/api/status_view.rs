//! `podnetctl status` for people: sections for the agent, its kernel
//! programs, map fill, lost events, IPAM, routing and endpoints. Works on the
//! JSON answer, so an older agent's answer (missing keys) still renders.

use std::fmt::Write as _;

use serde_json::Value;

use super::view::{table, time_of_day_utc};

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn items(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// The status answer as sections of aligned lines and tables.
pub fn status_text(s: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "podnet {}  kernel {}  race hook {}  tc attach {}  uptime {}s",
        text(&s["version"]),
        text(&s["kernel"]),
        text(&s["race_hook"]),
        text(&s["tc_attach"]),
        u(&s["uptime_seconds"])
    );
    let _ = writeln!(out, "pins: {}", text(&s["bpffs"]));

    programs_section(&mut out, s);
    maps_section(&mut out, &s["kernel_objects"]);
    tail_sections(&mut out, s);
    out
}

fn programs_section(out: &mut String, s: &Value) {
    let objects = &s["kernel_objects"];
    out.push_str("\nPROGRAMS\n");
    let mut rows = vec![["SUBSYSTEM", "NAME", "ID", "ATTACHMENT", "PIN"].map(str::to_owned)];
    for p in items(&objects["programs"]) {
        let links = items(&p["links"]);
        let subsystem = text(&p["subsystem"]);
        let attachment = if subsystem == "conntrack" && u(&p["id"]) == u(&s["tracer_program_id"]) {
            text(&s["tracer_attachment"])
        } else if links.len() == 1 {
            "1 link".to_owned()
        } else {
            format!("{} links", links.len())
        };
        let pin = match links {
            [one] => text(one),
            [first, ..] => std::path::Path::new(&text(first))
                .parent()
                .map_or_else(String::new, |d| format!("{}/", d.display())),
            [] => "-".to_owned(),
        };
        rows.push([subsystem, text(&p["name"]), text(&p["id"]), attachment, pin]);
    }
    out.push_str(&table(rows.iter()));
    if objects["stats_enabled"] == Value::Bool(false) {
        out.push_str("(run time per program: set kernel.bpf_stats_enabled=1)\n");
    }
}

fn maps_section(out: &mut String, objects: &Value) {
    out.push_str("\nMAPS\n");
    let mut rows = vec![["SUBSYSTEM", "MAP", "ENTRIES", "CAPACITY", "FILL"].map(str::to_owned)];
    for m in items(&objects["maps"]) {
        let (entries, capacity) = (u(&m["entries"]), u(&m["capacity"]));
        let fill = (entries * 100)
            .checked_div(capacity)
            .map_or_else(|| "-".to_owned(), |pct| format!("{pct}%"));
        rows.push([
            text(&m["subsystem"]),
            text(&m["map"]),
            entries.to_string(),
            capacity.to_string(),
            fill,
        ]);
    }
    out.push_str(&table(rows.iter()));
}

fn tail_sections(out: &mut String, s: &Value) {
    out.push_str("\nEVENTS\n");
    let _ = writeln!(
        out,
        "received  conntrack {}  dns {}",
        u(&s["events_received"]),
        u(&s["dns"]["events_received"])
    );
    let lost: Vec<String> = s["events_lost"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {}", u(v))).collect())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "lost      {}",
        if lost.is_empty() {
            "-".to_owned()
        } else {
            lost.join("  ")
        }
    );
    let follow = &s["follow"];
    if follow.is_object() {
        let followers = items(&follow["followers"]);
        let _ = writeln!(
            out,
            "followed  {} published  {} of {} followers  buffer {}",
            u(&follow["published"]),
            followers.len(),
            u(&follow["max_followers"]),
            u(&follow["buffer"])
        );
        for f in followers {
            let _ = writeln!(
                out,
                "  follower {}  sent {}  lost {}",
                u(&f["id"]),
                u(&f["sent"]),
                u(&f["lost"])
            );
        }
    }

    let ipam = &s["ipam"];
    out.push_str("\nIPAM\n");
    let _ = writeln!(
        out,
        "mode {}  allocated {}  free {}  cooldown {}",
        text(&ipam["mode"]),
        u(&ipam["allocated"]),
        u(&ipam["free"]),
        u(&ipam["cooldown"])
    );

    let r = &s["route_reconcile"];
    out.push_str("\nROUTING\n");
    let when = match u(&r["unix_ms"]) {
        0 => "never".to_owned(),
        ms => format!("{} UTC", time_of_day_utc(ms)),
    };
    let _ = writeln!(
        out,
        "last reconcile {when}  result {}  took {:.1} ms  errors {}  repairs since start {}",
        text(&r["result"]),
        r["duration_seconds"].as_f64().unwrap_or(0.0) * 1000.0,
        u(&r["errors"]),
        u(&r["repairs"])
    );

    out.push_str("\nENDPOINTS\n");
    let _ = writeln!(out, "{}", u(&s["endpoints"]));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sections_from_a_status_answer() {
        let status = json!({
            "version": "0.1.0", "kernel": "6.18.0", "race_hook": "tracepoint",
            "tc_attach": "tcx", "uptime_seconds": 12, "bpffs": "/sys/fs/bpf/podnet",
            "tracer_attachment": "adopted", "tracer_program_id": 41,
            "events_received": 3, "dns": {"events_received": 5},
            "events_lost": {"conntrack": 0, "dns": 2},
            "kernel_objects": {
                "stats_enabled": false,
                "programs": [
                    {"subsystem": "conntrack", "name": "podnet_kfree_skb", "id": 41,
                     "links": ["/sys/fs/bpf/podnet/conntrack/link_kfree_skb"]},
                    {"subsystem": "dns", "name": "podnet_dns_pod_ingress", "id": 52,
                     "links": ["/sys/fs/bpf/podnet/dns/links/a", "/sys/fs/bpf/podnet/dns/links/b"]}
                ],
                "maps": [{"subsystem": "conntrack", "map": "CT_DROPS", "entries": 2, "capacity": 8}]
            },
            "ipam": {"mode": "eni", "allocated": 3, "free": 7, "cooldown": 1},
            "route_reconcile": {"unix_ms": 3_723_004, "result": "success",
                                "duration_seconds": 0.0015, "errors": 0, "repairs": 4},
            "endpoints": 3
        });
        assert_eq!(
            status_text(&status),
            "\
podnet 0.1.0  kernel 6.18.0  race hook tracepoint  tc attach tcx  uptime 12s
pins: /sys/fs/bpf/podnet

PROGRAMS
SUBSYSTEM  NAME                    ID  ATTACHMENT  PIN
conntrack  podnet_kfree_skb        41  adopted     /sys/fs/bpf/podnet/conntrack/link_kfree_skb
dns        podnet_dns_pod_ingress  52  2 links     /sys/fs/bpf/podnet/dns/links/
(run time per program: set kernel.bpf_stats_enabled=1)

MAPS
SUBSYSTEM  MAP       ENTRIES  CAPACITY  FILL
conntrack  CT_DROPS  2        8         25%

EVENTS
received  conntrack 3  dns 5
lost      conntrack 0  dns 2

IPAM
mode eni  allocated 3  free 7  cooldown 1

ROUTING
last reconcile 01:02:03.004 UTC  result success  took 1.5 ms  errors 0  repairs since start 4

ENDPOINTS
3
"
        );
    }

    #[test]
    fn followers_are_listed_under_events() {
        let text = status_text(
            &json!({"follow": {"published": 12, "buffer": 4096, "max_followers": 8,
            "followers": [{"id": 3, "sent": 12, "lost": 0}, {"id": 5, "sent": 2, "lost": 9}]}}),
        );
        assert!(
            text.contains(
                "followed  12 published  2 of 8 followers  buffer 4096\n  follower 3  sent 12  lost 0\n  follower 5  sent 2  lost 9\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn an_empty_answer_still_renders() {
        let text = status_text(&json!({}));
        assert!(text.contains("last reconcile never"), "{text}");
        assert!(text.contains("lost      -"), "{text}");
    }
}
