//! How podnetctl shows endpoints and IPAM use.

use std::fmt::Write as _;

use podnet_api::{endpoint::EndpointRecord, wire::IpamStatus};

/// One line per endpoint: pod, container/ifname, host interface, addresses.
pub fn endpoints_table(endpoints: &[EndpointRecord]) -> String {
    if endpoints.is_empty() {
        return "No endpoints registered by podnet-cni.\n".to_owned();
    }
    let mut rows = vec![[
        "POD".to_owned(),
        "ATTACHMENT".to_owned(),
        "HOST IF".to_owned(),
        "ADDRESSES".to_owned(),
    ]];
    for e in endpoints {
        rows.push([
            format!("{}/{}", e.namespace, e.pod),
            format!("{}/{}", short(&e.container_id), e.if_name),
            e.interface.clone().unwrap_or_else(|| "-".into()),
            e.ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    let mut widths = [0usize; 4];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let _ = writeln!(
            out,
            "{:w0$}  {:w1$}  {:w2$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    out
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Pools with their use, then cooldowns.
pub fn ipam_text(status: &IpamStatus) -> String {
    let mut out = format!("mode: {}\n", status.mode);
    if status.pools.is_empty() && status.eni.is_none() {
        out.push_str("no pools (start the agent with --node-cidr)\n");
    }
    for p in &status.pools {
        let _ = writeln!(
            out,
            "{} (gateway {}): {} free",
            p.describe(),
            p.gateway.map_or_else(|| "-".into(), |g| g.to_string()),
            p.free
        );
    }
    if let Some(eni) = &status.eni {
        out.push_str(&crate::ipam::eni::view::eni_text(eni));
    }
    let _ = writeln!(out, "allocations: {}", status.allocations);
    if let Some(why) = &status.exhausted {
        let _ = writeln!(out, "EXHAUSTED: {why}");
    }
    for c in &status.cooldowns {
        let _ = writeln!(
            out,
            "cooling down: {} until {} UTC",
            c.ip,
            crate::api::view::time_of_day_utc(c.until_unix_ms)
        );
    }
    out
}
