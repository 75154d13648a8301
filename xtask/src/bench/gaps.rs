//! For each target a run can miss: the cause measured on this project's
//! machines and what would close the gap, written under the targets table
//! for the targets that run missed.

/// (start of a figure's name, measured cause and plan).
const GAPS: &[(&str, &str)] = &[
    (
        "agent CPU with 1,000 endpoints under DNS and race load",
        "Within a few tenths of a percent of the target from run to run (2.95 %, 3.24 % and \
         3.09 % in earlier runs, 0.6 to 0.8 % at rest). `perf` on the agent under this load at \
         1,000 endpoints (18 s at 499 Hz): 61 % of its samples in the DNS event thread and most \
         of the rest in the race thread, the cost of each of the 30,000 records a second; about \
         30 % in the allocator (free 18 %, memmove 7 %, malloc 4 %), each record's owned \
         strings made and then freed when the recent-records ring drops the oldest; clock \
         reads 6 %; the registry lookup that names the pod, the only step that depends on the \
         number of endpoints, 1.3 %. So the cost grows with events, not with pods. Records now \
         share their pod's names, carry the mnemonics without allocating and read the clocks \
         once per batch. Plan: the query name kept in a fixed-size buffer, and records kept \
         in the recent-records ring without a copy per follower.",
    ),
    (
        "new pod's DNS programs attached after its ADD",
        "The slowest ADD is the one whose grace periods were longest. Each single ADD's DNS \
         reconcile is recorded in the ADD section: in a run on this machine the slowest tcx \
         ADD had its programs 57.7 ms after its start, of which its reconcile took 48.5 ms; the \
         reconcile took p50 28.5 / max 48.5 ms with tcx against 3.5 / 7.3 ms with classic \
         filters, so the two tcx attaches (each waiting for an RCU grace period under RTNL) took \
         about 12 to 21 ms each, against 0.2 ms expedited. With `--cni-add-wait` the ADD also \
         waits for the routing pass over the pod's own objects, which takes its turn at RTNL \
         behind those attaches (13 ms per pass with tcx against 2.7 ms with classic filters, ad \
         hoc at 1,000 endpoints). Plan: none left in the agent, whose own share is a few \
         milliseconds; with tcx the kernel's grace periods are the floor unless expedited, and \
         classic filters or expedited grace periods met the target in the same runs.",
    ),
    (
        "burst of 100 ADDs: programs attached after each ADD",
        "With tcx a burst outruns the attach rate: 100 ADDs back to back at 4 to 7 ms each \
         against two grace periods per pod (about 20 ms, serialised behind RTNL by the kernel); \
         with expedited grace periods, classic filters or `--cni-add-wait` (each ADD then \
         includes its own attach, so the runtime queues the burst instead of the kernel) the \
         burst met the target in a run. With tcx and normal grace periods the kernel's pace is \
         the floor: the agent's own share per pod (the DNS attach of its hooks alone, and a \
         routing pass over its own objects, both in the ADD section) is a few milliseconds, \
         plus its turns at RTNL behind the attaches. Plan: none in the agent; on bursty nodes \
         one of the three settings above.",
    ),
    (
        "DNS programs: cost per DNS packet",
        "Hash-map operations dominate (see the DNS section): the plan there, one per-client \
         entry instead of three and the request counter inside the latency entry.",
    ),
    (
        "DNS latency: podnet's CPU / a packet capture's",
        "With answers 0 to 1 s late most answers pass the slow threshold and each becomes a \
         ring-buffer record with its name; the programs' run time with thousands of pending \
         queries is most of podnet's share. Plan in the DNS section: a per-pod budget on slow \
         records and the merged per-client entry.",
    ),
    (
        "fast path",
        "The request/response ratios swing between runs on this bed by more than the targets' \
         margins (the ENI is a veth into a namespace, so the fast path's egress crosses two \
         veth hops where the direct baseline crosses one, and replies enter the pod by \
         `bpf_redirect_peer`); new connections over the kernel path, which pays kube-proxy's \
         rules and a conntrack entry, clear 1.15 in every run. Plan: an ENI that is a real NIC \
         queue (macvlan or a VM's NIC) and the median of more rounds.",
    ),
    (
        "/metrics scrape with 1,000 endpoints",
        "Met in the two runs before (3.87 and 4.09 ms at 1,000 endpoints); an ad hoc run of the \
         same agent right after the missed one, 1,000 endpoints with tcx, scraped in 3.7 to \
         4.1 ms. The missed run's machine was busier than usual: its iperf3 rounds with no \
         program ranged from 15.5 to 20.5 Gbit/s. Plan: the median of more scrapes spread over \
         the step, and the growth left from 10 to 1,000 endpoints (the batched map counts and \
         the DNS maps' walk) cut.",
    ),
    (
        "all programs attached: iperf3 throughput",
        "Rounds of the same configuration swing more than the target's margin on this machine: \
         in one run the rounds with no program gave 15.5 to 20.5 Gbit/s and those with every \
         program 15.5 to 20.3, the programs ahead in two of six; the full run before it met \
         the target (0.995). Plan: more rounds, pinned to one core each side.",
    ),
    (
        "all programs attached: sockperf latency",
        "Rounds of the same configuration swing by up to 15 % on this machine; the median of \
         six rounds was 1.003 and 1.060 in consecutive full runs. Plan: more rounds, pinned to \
         one core each side.",
    ),
];

/// The recorded cause and plan for a missed target, by its figure's name.
pub fn cause_and_plan(figure: &str) -> Option<&'static str> {
    GAPS.iter()
        .find(|(start, _)| figure.starts_with(start))
        .map(|(_, text)| *text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_target_finds_its_cause_by_the_start_of_its_name() {
        assert!(cause_and_plan(
            "burst of 100 ADDs: programs attached after each ADD, p99 (tcx, 1,000 endpoints)"
        )
        .is_some_and(|t| t.contains("RTNL")));
        assert!(
            cause_and_plan("fast path: request rate over a direct veth (median of rounds)")
                .is_some()
        );
        assert_eq!(cause_and_plan("CNI ADD: podnet's share, p99"), None);
    }
}
