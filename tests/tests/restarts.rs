//! Agent restarts leave nothing behind in the kernel.
//!
//! Every start loads podnet's programs afresh; the links (or, before tcx,
//! classic filters) that a previous agent left attached are switched to the
//! new instances, so the previous ones lose their last reference and the
//! kernel frees them with their maps. Checked with bpftool's view of the
//! kernel: the programs and maps of one agent (those its open descriptors,
//! its pins and the filters in its node hold, and the maps those programs
//! use), their number and the BPF memory they take.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use podnet_tests::{
    require_root,
    vpc::{Vpc, VPC_CIDR},
    wait_for, Agent, Netns,
};
use serde_json::Value;

/// Restarts of the agent (SIGTERM, then a start that waits until ready).
const RESTARTS: usize = 20;

/// Runs bpftool with JSON output in `node` and parses it. Only the device
/// listing (`net show`) depends on the namespace; programs, maps, links and
/// pins are the whole machine's.
fn bpftool(node: &Netns, args: &[&str]) -> Result<Value> {
    let mut cmd = vec!["bpftool", "-j"];
    cmd.extend_from_slice(args);
    let out = node.run_ok(&cmd)?;
    serde_json::from_slice(&out.stdout).with_context(|| format!("{cmd:?}: not JSON"))
}

/// A program or map as bpftool lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Object {
    name: String,
    memlock: u64,
}

/// The kernel objects of one agent, by id, and the hooks its programs run on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct AgentObjects {
    programs: BTreeMap<u64, Object>,
    maps: BTreeMap<u64, Object>,
    /// Where a program of the agent runs (pin path or `dev/hook`) → program id.
    hooks: BTreeMap<String, u64>,
    /// Programs the agent process holds open.
    held: BTreeSet<u64>,
}

impl AgentObjects {
    fn memlock(&self) -> u64 {
        self.programs
            .values()
            .chain(self.maps.values())
            .map(|o| o.memlock)
            .sum()
    }

    /// Program names with how many instances of each the kernel holds.
    fn instances(&self) -> BTreeMap<&str, usize> {
        let mut out = BTreeMap::new();
        for p in self.programs.values() {
            *out.entry(p.name.as_str()).or_default() += 1;
        }
        out
    }

    /// Hooks that run a program the agent does not hold: a previous
    /// agent's instance.
    fn stale_hooks(&self) -> BTreeMap<&str, u64> {
        self.hooks
            .iter()
            .filter(|(_, id)| !self.held.contains(id))
            .map(|(hook, id)| (hook.as_str(), *id))
            .collect()
    }

    /// Hooks of the conntrack tracer: its pinned links.
    fn tracer_hooks(&self) -> usize {
        self.hooks
            .keys()
            .filter(|hook| hook.contains("/conntrack/"))
            .count()
    }

    fn summary(&self) -> String {
        format!(
            "{} programs {:?}, {} maps, {} bytes of BPF memory, {} hooks",
            self.programs.len(),
            self.instances(),
            self.maps.len(),
            self.memlock(),
            self.hooks.len()
        )
    }
}

/// Ids of the BPF objects the process `pid` holds open, from
/// `/proc/<pid>/fdinfo`: (programs, maps, programs of its links).
fn held_by(pid: u32) -> Result<(BTreeSet<u64>, BTreeSet<u64>)> {
    let (mut programs, mut maps) = (BTreeSet::new(), BTreeSet::new());
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        // A descriptor closed while listing is no longer held.
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        for line in info.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let Ok(id) = value.trim().parse::<u64>() else {
                continue;
            };
            match key {
                "prog_id" => programs.insert(id),
                "map_id" => maps.insert(id),
                _ => false,
            };
        }
    }
    Ok((programs, maps))
}

/// The agent's objects now: what its process holds, what its pins under
/// `bpffs` hold, the classic filters of podnet in `node`, and the maps of
/// all those programs.
fn agent_objects(agent: &Agent, node: &Netns) -> Result<AgentObjects> {
    let pid = agent.pid().context("agent not running")?;
    let (held, mut map_ids) = held_by(pid)?;
    let mut objects = AgentObjects {
        held: held.clone(),
        ..AgentObjects::default()
    };
    let mut program_ids = held;
    for link in bpftool(node, &["-f", "link", "show"])?
        .as_array()
        .into_iter()
        .flatten()
    {
        let pinned_here = link["pinned"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|p| Path::new(p).starts_with(agent.bpffs()));
        if let (Some(pin), Some(id)) = (pinned_here, link["prog_id"].as_u64()) {
            objects.hooks.insert(pin.to_owned(), id);
            program_ids.insert(id);
        }
    }
    for map in bpftool(node, &["-f", "map", "show"])?
        .as_array()
        .into_iter()
        .flatten()
    {
        let pinned_here = map["pinned"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|p| Path::new(p).starts_with(agent.bpffs()));
        if pinned_here {
            map_ids.extend(map["id"].as_u64());
        }
    }
    let net = bpftool(node, &["net", "show"])?;
    for tc in net
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|ns| ns["tc"].as_array().into_iter().flatten())
    {
        let name = tc["name"].as_str().unwrap_or_default();
        if let (true, Some(id)) = (name.starts_with("podnet_"), tc["id"].as_u64()) {
            let place = format!(
                "{}/{}/{name}",
                tc["devname"].as_str().unwrap_or_default(),
                tc["kind"].as_str().unwrap_or_default()
            );
            objects.hooks.insert(place, id);
            program_ids.insert(id);
        }
    }
    for prog in bpftool(node, &["prog", "show"])?
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(id) = prog["id"].as_u64().filter(|id| program_ids.contains(id)) else {
            continue;
        };
        map_ids.extend(
            prog["map_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64),
        );
        objects.programs.insert(
            id,
            Object {
                name: prog["name"].as_str().unwrap_or_default().to_owned(),
                memlock: prog["bytes_memlock"].as_u64().unwrap_or_default(),
            },
        );
    }
    for map in bpftool(node, &["map", "show"])?
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(id) = map["id"].as_u64().filter(|id| map_ids.contains(id)) else {
            continue;
        };
        objects.maps.insert(
            id,
            Object {
                name: map["name"].as_str().unwrap_or_default().to_owned(),
                memlock: map["bytes_memlock"].as_u64().unwrap_or_default(),
            },
        );
    }
    Ok(objects)
}

/// Waits until `tc_hooks` TC hooks and the conntrack tracer's hooks (its
/// pinned links: the drop tracepoint, and the confirm probe where kprobes
/// exist) run the agent's programs, each one the agent holds (links and
/// filters stay across a restart: they are in place at once, and are
/// switched to the new agent's programs while it starts), and returns its
/// objects then.
fn settled(agent: &Agent, node: &Netns, tc_hooks: usize) -> Result<AgentObjects> {
    let mut last = AgentObjects::default();
    let ok = wait_for(
        || {
            agent_objects(agent, node).is_ok_and(|o| {
                let tracer = o.tracer_hooks();
                let done =
                    tracer > 0 && o.hooks.len() == tc_hooks + tracer && o.stale_hooks().is_empty();
                last = o;
                done
            })
        },
        Duration::from_secs(20),
    );
    if !ok {
        bail!(
            "not {tc_hooks} TC hooks and the tracer's on programs the agent holds after 20 s: {}; hooks on programs it does not hold: {:#?}\nagent log:\n{}",
            last.summary(),
            last.stale_hooks(),
            agent.log()
        );
    }
    Ok(last)
}

/// 20 restarts of an agent with DNS programs on 4 pods and an uplink, the
/// fast path on the pods and both ENIs, and the conntrack tracer: after the
/// 20th restart the kernel holds exactly the programs, maps and BPF memory
/// it held after the first, one instance of each program, and every hook
/// runs the instance the running agent loaded.
#[test]
fn restarts_leave_the_same_programs_maps_and_bpf_memory() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let vpc = Vpc::builder()
        .name("rs-links")
        .enis(2)
        .pods_per_eni(2)
        .build()?;
    let enis = tempfile::NamedTempFile::new()?;
    std::fs::write(enis.path(), vpc.enis_yaml())?;
    let enis_arg = enis.path().to_string_lossy().into_owned();
    let uplink = vpc.enis()[0].name().to_owned();
    let mut agent = Agent::start_with(
        vpc.node(),
        &vpc.endpoints(),
        &[
            "--enis",
            &enis_arg,
            "--vpc-cidrs",
            VPC_CIDR,
            "--fast-path",
            "--uplinks",
            &uplink,
        ],
    )?;
    let pods = vpc.pods().len();
    // DNS: both hooks of every pod and of the uplink; fast path: ingress
    // of every pod and ENI.
    let hooks = 2 * (pods + 1) + pods + vpc.enis().len();
    let first = settled(&agent, vpc.node(), hooks)?;
    eprintln!("first start: {}", first.summary());
    let mut after = Vec::new();
    for restart in 1..=RESTARTS {
        agent.restart(vpc.node())?;
        let objects = settled(&agent, vpc.node(), hooks)?;
        eprintln!("restart {restart}: {}", objects.summary());
        after.push(objects);
    }
    let (one, twenty) = (&after[0], &after[RESTARTS - 1]);
    let totals = |o: &AgentObjects| (o.hooks.len(), o.programs.len(), o.maps.len(), o.memlock());
    assert_eq!(
        totals(twenty),
        totals(one),
        "hooks, programs, maps and BPF memory after restart {RESTARTS} ({}) and after restart 1 ({})",
        twenty.summary(),
        one.summary()
    );
    // Nothing of an earlier agent is left: the same as after the first start.
    assert_eq!(
        totals(one),
        totals(&first),
        "after restart 1 ({}) and after the first start ({})",
        one.summary(),
        first.summary()
    );
    for (when, objects) in [
        ("the first start", &first),
        ("restart 1", one),
        ("restart 20", twenty),
    ] {
        assert!(
            objects.instances().values().all(|n| *n == 1),
            "after {when}: {}",
            objects.summary()
        );
        assert_eq!(objects.stale_hooks(), BTreeMap::new(), "after {when}");
    }
    Ok(())
}
