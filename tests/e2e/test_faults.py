"""Faults under load: each component killed, restarted or starved while the agent's
command keeps sending allowed and forbidden requests, through `copilot_here --engine
sandbox`, in one sandbox for the whole matrix.

The user command is the load (tests.harness.faults.LOAD): CLIENTS threads, each
looping over two allowed URLs (one by /etc/hosts, one by DNS through the DNS guard)
and three forbidden ones (HTTPS, plain HTTP, and a name the guard must refuse),
with a unique id in every path. It trusts the upstream's CA too, so a request that
went around the interceptor would be seen by the upstream. The probes of cases 6-8
run as the agent (appuser) beside it.

For each case, checked on the upstream's own per-request record and on the traffic
log: no forbidden request reached the upstream, every request that did has a start
line with its host and path, every component is back, and allowed requests succeed
again (the recovery time is measured, not assumed). The module's last test stops the
load and checks it ran through and exited 0. With SP_FAULTS_REPORT=<file> the rows
are written there as JSON (bench/faults_report.py turns them into RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import python_bin
from tests.harness.faults import (
    BURST,
    LOAD,
    REQUESTS,
    SLOW,
    Case,
    LoadReader,
    Stats,
    allowed,
    probe_lines,
    recovered,
    start_lines,
    summarize,
    unlogged,
    upstream_requests,
)
from tests.harness.sandbox import Internet, Resolver, Session, enforce, host_logs, write_config
from tests.harness.upstream import UpstreamCA

pytestmark = pytest.mark.e2e

RUN = secrets.token_hex(3)
CLIENTS = 4
PERIOD = 0.2  # seconds between a client's rounds
LOAD_LIMIT = 280  # seconds: the load ends by itself even if the test never stops it
LOAD_BUDGET = 50_000  # requests
RECOVERY_LIMIT = 30  # seconds a case may take to see allowed requests succeed again
OBSERVE = 2.0  # seconds of load every case watches after its fault is over, at least
CONFIG = "/work/.copilot_here/network.json"
STOP = "/work/.faults-stop"
DNS_NAME = "www.allowed.test"  # resolved through the DNS guard, not /etc/hosts
URLS = [
    "allow-hosts=https://api.github.com/allow/{id}",
    f"allow-dns=https://{DNS_NAME}/allow/{{id}}",
    "deny-https=https://evil.test/deny/{id}",
    "deny-http=http://evil.test/deny/{id}",
    "deny-dns=https://{id}.leak.test/deny/{id}",  # the guard answers NXDOMAIN
]
POLICY = enforce("api.github.com", "*.allowed.test", "badca.test", "wrongname.test")
PROGRAMS = ("interceptor", "dnsguard", "reloader", "logguard")


FIREWALL = [
    *("/opt/secure-proxy/venv/bin/secure-proxy-firewall", "verify", "--proxy-user"),
    *("proxy-user", "--policy", "/run/secure-proxy/policy.json", "--dns-guard-port", "58053"),
]


def failed_here(entry: dict[str, Any]) -> bool:
    """An allowed request that failed for a reason of the interceptor's or the policy's:
    not a lookup refused at once because it rode a conntrack entry of one of
    proxy-user's own lookups (rare, see README "Known limits"; "[Errno -3]" in 0 s)."""
    refused_lookup = "[Errno -3]" in entry.get("err", "") and entry["d"] < 0.1
    return entry["status"] != 200 and not refused_lookup


@dataclass
class Matrix:
    s: Session
    load: LoadReader
    project: Path
    internet: Internet
    resolver: Resolver
    records: Path
    rows: list[Stats] = field(default_factory=list)
    names_asked: list[str] = field(default_factory=list)
    queries: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    probe_stdout: str = ""

    @property
    def log(self) -> Path:
        return host_logs(self.project) / "traffic.jsonl"

    def root(self, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
        r = self.s.root(argv, timeout=timeout)
        assert r.returncode == 0, (argv, r.stdout, r.stderr)
        return r

    def as_agent(self, code: str, *args: str, timeout: float = 60) -> list[dict[str, Any]]:
        """A probe run as the agent (appuser) beside the load; its per-request lines."""
        argv = ["runuser", "-u", "appuser", "--", python_bin(), "-c", code, RUN, *args]
        self.probe_stdout = self.root(argv, timeout=timeout).stdout
        return probe_lines(self.probe_stdout)

    def resolver_names(self) -> list[str]:
        """Names the resolver was asked since the last call (its records kept)."""
        out = []
        while not self.resolver.seen.empty():
            query = self.resolver.seen.get()
            query["seen"] = time.time()
            self.queries.append(query)
            out.append(query["name"])
        return out

    def pid(self, name: str) -> str:
        """The program's pid (supervisord's process; the interceptor's: its pool)."""
        return self.root(["supervisorctl", "pid", name]).stdout.strip()

    def pids(self, program: str) -> list[str]:
        """The pids of all of a program's processes (the interceptor: its pool's and
        every worker's)."""
        pid = self.pid(program)
        workers = self.s.root(["pgrep", "-P", pid]).stdout.split()
        return sorted([pid, *workers])

    def wait_worker_again(self, n: int, not_pid: str, limit: float = 15) -> str:
        """Interceptor worker n's new pid once its pool has forked it again."""
        deadline = time.monotonic() + limit
        while True:
            pid = str(self.s.worker_pid(n))
            if pid not in (not_pid, "0"):
                return pid
            assert time.monotonic() < deadline, (n, not_pid)
            time.sleep(0.1)

    def states(self) -> dict[str, str]:
        return self.s.program_states()

    def wait_running(self, name: str, not_pid: str, limit: float = 15) -> str:
        """The program's new pid once supervisord has it RUNNING again."""
        deadline = time.monotonic() + limit
        while True:
            if self.states().get(name) == "RUNNING":
                pid = self.pid(name)
                if pid not in (not_pid, "0", ""):
                    return pid
            assert time.monotonic() < deadline, (name, self.states())
            time.sleep(0.1)

    def all_running(self, limit: float = 10) -> None:
        """Every service RUNNING (supervisord's startsecs passed) and the firewall done."""
        deadline = time.monotonic() + limit
        while True:
            states = self.states()
            if all(states.get(p) == "RUNNING" for p in PROGRAMS):
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.1)
        assert states.get("firewall") == "EXITED", states

    def healthy(self) -> None:
        """Each allowed URL has succeeded in a request started from now on."""
        now = time.time()
        self.load.wait("a healthy start", lambda es: recovered(es, now, now), RECOVERY_LIMIT)

    def case(
        self,
        name: str,
        proves: str,
        inject: Callable[[Case], None],
        clear: Callable[[Case], None] | None = None,
        hold: float = 0.0,
    ) -> tuple[Case, Stats]:
        """Healthy, then the fault (held `hold` seconds, then cleared; a probe marks
        itself over), then wait for allowed requests to succeed again and watch the
        load OBSERVE seconds at least; check the case's invariants."""
        self.healthy()
        case = Case(name, proves)
        case.inject()
        inject(case)
        if clear is not None:
            time.sleep(hold)
            clear(case)
            case.over()
        self.load.wait(
            f"{name}: recovery",
            lambda es: recovered(es, case.begin, case.clear),
            RECOVERY_LIMIT,
        )
        time.sleep(max(0.0, case.clear + OBSERVE - time.time()))
        case.end = time.time()
        self.load.settled(case.end)
        reached = upstream_requests(self.records, RUN)
        stats = summarize(case, self.load.snapshot(), reached, start_lines(self.log))
        stats.window = {  # seconds from the matrix's start
            k: round(v - self.started, 2)
            for k, v in (("begin", case.begin), ("fault", case.fault), ("clear", case.clear))
        } | {"end": round(case.end - self.started, 2)}
        self.rows.append(stats)
        asked = self.resolver_names()
        self.names_asked += asked

        # The invariants of every case.
        window = case.window(self.load.snapshot()) + case.probes
        assert stats.forbidden_reached == 0, [e for e in window if e["id"] in reached]
        assert not [e for e in window if not allowed(e) and e["status"] == 200], window
        assert stats.unlogged == 0, unlogged(
            [r for rid, r in reached.items() if rid in {e["id"] for e in window}],
            start_lines(self.log),
        )
        assert stats.recovered_after is None or stats.recovered_after < RECOVERY_LIMIT, stats
        leaked = [n for n in asked if n != DNS_NAME]
        assert not leaked, json.dumps(
            [
                [e for e in self.load.snapshot() if f"{e['id']}.leak.test" in leaked],
                [q for q in self.queries if q["name"] in leaked],
                [ln for ln in self.log.read_text().splitlines() if any(n in ln for n in leaked)],
                {"begin": case.begin, "fault": case.fault, "end": case.end},
            ]
        )
        self.all_running()
        assert not self.load.ended.is_set(), self.load.other
        return case, stats


@pytest.fixture(scope="module")
def matrix(module_topology, staged_source) -> Iterator[Matrix]:
    topo = module_topology
    work = Path(tempfile.mkdtemp(prefix="sp-faults-", dir="/tmp"))
    project = Path(tempfile.mkdtemp(prefix="sp-proj-", dir="/tmp"))
    for path in (work, project):
        path.chmod(0o755)
    # badca.test: a certificate from a CA nobody trusts. wrongname.test: the server's
    # trusted certificate, which is not for that name.
    rogue = UpstreamCA.create(work / "rogue", names=["badca.test"])
    records = work / "upstream-records.jsonl"
    internet = Internet.start(
        topo,
        work,
        staged_source,
        names=["api.github.com", "evil.test", DNS_NAME],
        hosts=["api.github.com", "evil.test", "badca.test", "wrongname.test"],
        record=records,
        alt_certs={"badca.test": (rogue.server_cert, rogue.server_key)},
    )
    resolver = Resolver.start(topo, {DNS_NAME: [topo.net_ip]}, staged_source)
    write_config(project, POLICY)
    argv = [python_bin(), "-c", LOAD, RUN, str(CLIENTS), str(PERIOD), str(LOAD_LIMIT)]
    argv += [str(LOAD_BUDGET), STOP, *URLS]
    try:
        with Session(project, ["--network-config-write", "--", *argv], internet) as s:
            load = LoadReader(s)
            load.started()
            m = Matrix(s, load, project, internet, resolver, records)
            yield m
            (project / ".faults-stop").touch()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(project, ignore_errors=True)


# --------------------------------------------------------------------------- 1-3 processes


def test_interceptor_worker_killed_with_9_is_forked_again(matrix: Matrix):
    pool, before = matrix.pid("interceptor"), str(matrix.s.worker_pid(0))
    matrix.case(
        "interceptor worker kill -9",
        "An interceptor worker (the first) dies mid-traffic: the connections it held "
        "and the new ones sent to it fail closed (refused) until its pool forks it again, "
        "nothing goes around it, the command keeps running.",
        lambda c: matrix.root(["kill", "-9", before]),
    )
    matrix.wait_worker_again(0, before)
    assert matrix.pid("interceptor") == pool  # the pool forked it; supervisord did nothing


def test_interceptor_killed_with_9_is_restarted(matrix: Matrix):
    before, pool = matrix.pids("interceptor"), matrix.pid("interceptor")
    _, stats = matrix.case(
        "interceptor kill -9",
        "The interceptor's pool dies mid-traffic and its workers with it: connections "
        "fail closed (refused) until supervisord restarts it, nothing goes around it, "
        "the command keeps running.",
        lambda c: matrix.root(["kill", "-9", pool]),
    )
    pool = matrix.wait_running("interceptor", pool)
    assert stats.failed > 0, stats  # the outage was real
    workers = matrix.s.root(["pgrep", "-P", pool]).stdout.split()
    assert workers and not set(workers) & set(before), (workers, before)


@pytest.mark.parametrize("program", PROGRAMS)
def test_supervisorctl_restart(matrix: Matrix, program: str):
    before = matrix.pid(program)

    def restart(case: Case) -> None:
        out = matrix.root(["supervisorctl", "restart", program], timeout=30).stdout
        assert f"{program}: started" in out, out

    matrix.case(
        f"supervisorctl restart {program}",
        f"A restart of the {program} alone: the rest keeps running, the firewall stays, "
        "allowed traffic comes back by itself.",
        restart,
    )
    matrix.wait_running(program, before)


def test_firewall_run_again(matrix: Matrix):
    """The firewall program is one-shot: running it again re-applies the lock in place."""

    def ours() -> list[str]:
        out = ""
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
            out += matrix.root([tool]).stdout
        return sorted(ln for ln in out.splitlines() if ln.startswith("-A"))

    before = ours()

    def rerun(case: Case) -> None:
        out = matrix.root(["supervisorctl", "start", "firewall"], timeout=30).stdout
        assert "firewall: started" in out, out
        deadline = time.monotonic() + 15
        while matrix.states().get("firewall") != "EXITED":
            assert time.monotonic() < deadline, matrix.states()
            time.sleep(0.1)

    matrix.case(
        "firewall run again",
        "Re-applying the lock while traffic flows opens no gap: no forbidden request "
        "and no unlogged one reaches the upstream.",
        rerun,
    )
    log = matrix.root(["tail", "-n", "5", "/var/log/secure-proxy/firewall.log"]).stdout
    assert ours() == before, log
    verify = matrix.s.root(FIREWALL)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize("program", ["reloader", "logguard"])
def test_killed_with_9(matrix: Matrix, program: str):
    before = matrix.pid(program)
    matrix.case(
        f"{program} kill -9",
        f"The {program} dies: supervisord restarts it, the traffic never notices.",
        lambda c: matrix.root(["kill", "-9", before]),
    )
    matrix.wait_running(program, before)
    if program == "logguard":  # the new one repairs tampering again
        matrix.root(["chmod", "0666", "/logs/traffic.jsonl"])
        deadline = time.monotonic() + 3
        while matrix.root(["stat", "-c", "%a", "/logs/traffic.jsonl"]).stdout.strip() != "644":
            assert time.monotonic() < deadline, "the restarted log guard repaired nothing"
            time.sleep(0.1)
    # The restarted reloader is exercised by the broken live edit below.


# --------------------------------------------------------------------------- 4 live edit


def test_broken_live_edit_keeps_the_last_good_policy(matrix: Matrix):
    good = json.dumps(POLICY, indent=2) + "\n"
    policy_before = matrix.root(["cat", "/run/secure-proxy/policy.json"]).stdout
    reloader_log = "/var/log/secure-proxy/reloader.log"
    applied_before = matrix.root(["cat", reloader_log]).stdout.count("applied ")

    def write(text: str) -> None:  # through the writable mount, inside the sandbox
        matrix.root(["sh", "-c", 'printf %s "$1" > "$2"', "-", text, CONFIG])

    def fix(case: Case) -> None:
        write(good)
        deadline = time.monotonic() + 5
        while matrix.root(["cat", reloader_log]).stdout.count("applied ") == applied_before:
            assert time.monotonic() < deadline, "the fixed config was never applied"
            time.sleep(0.1)

    def broken(case: Case) -> None:
        write('{"enabled": true, "mode": "enforce", "allowed_rules": [')
        time.sleep(1.5)
        write("")  # an editor that truncates first
        time.sleep(1.5)
        case.notes["policy_kept"] = (
            matrix.root(["cat", "/run/secure-proxy/policy.json"]).stdout == policy_before
        )

    case, stats = matrix.case(
        "broken live edit",
        "Invalid JSON, then an empty file, written through the writable config mount: "
        "the last good policy keeps running (allowed still pass, forbidden still "
        "refused) until the fix is applied.",
        broken,
        fix,
    )
    assert case.notes["policy_kept"]
    window = case.window(matrix.load.snapshot())
    assert not [e for e in window if allowed(e) and failed_here(e)], stats
    log = matrix.root(["cat", reloader_log]).stdout
    assert "invalid edit, keeping the last good policy" in log, log


# --------------------------------------------------------------------------- 5 resolver down


def test_upstream_resolver_unreachable(matrix: Matrix):
    topo = matrix.internet.topo
    rules = [
        ["-d", address, "-p", proto, "--dport", "53", "-j", "DROP"]
        for address in matrix.resolver.addresses
        for proto in ("udp", "tcp")
    ]

    def iptables(op: str) -> None:
        for rule in rules:
            r = topo.net_run(["iptables-legacy", "-w", op, "INPUT", *rule])
            assert r.returncode == 0, r.stderr

    try:
        case, _ = matrix.case(
            "upstream resolver unreachable",
            "The resolver behind the DNS guard drops every query for 4 s: names fail "
            "(SERVFAIL), hosts-file traffic is untouched, no refused name leaks, "
            "lookups work again as soon as the resolver answers.",
            lambda c: iptables("-I"),
            lambda c: iptables("-D"),
            hold=4.0,
        )
    finally:
        for rule in rules:
            topo.net_run(["iptables-legacy", "-w", "-D", "INPUT", *rule])
    during = [e for e in case.window(matrix.load.snapshot()) if e["t"] < case.clear]
    dns_failed = [e for e in during if e["kind"] == "allow-dns" and e["status"] != 200]
    assert dns_failed, during  # the outage was real
    assert not [e for e in during if e["kind"] == "allow-hosts" and e["status"] != 200]
    lines = [json.loads(line) for line in matrix.log.read_text().splitlines() if line]
    guard = [x for x in lines if x.get("kind") == "dns" and x["host"] == DNS_NAME]
    assert "SERVFAIL" in {x["rcode"] for x in guard}, guard[-5:]  # the guard said so


# --------------------------------------------------------------------------- 6 bad certificates


def test_upstream_with_a_bad_certificate_gets_502(matrix: Matrix):
    def probe(case: Case) -> None:
        case.probes = matrix.as_agent(
            REQUESTS,
            "badcert",
            "5",
            "badcert-unknown-ca=https://badca.test/allow/{id}",
            "badcert-wrong-name=https://wrongname.test/allow/{id}",
        )
        case.over()

    case, stats = matrix.case(
        "upstream with a bad certificate",
        "An allowed host whose certificate is signed by an unknown CA, or is for another "
        "name: 502, and the upstream never receives the request (verification is never "
        "skipped).",
        probe,
    )
    assert len(case.probes) == 10
    assert {p["status"] for p in case.probes} == {502}, case.probes
    assert all("Certificate verify failed" in p["body"] for p in case.probes), case.probes
    reached = upstream_requests(matrix.records, RUN)
    assert not [p for p in case.probes if p["id"] in reached], stats
    ends = {}
    for line in matrix.log.read_text().splitlines():
        record = json.loads(line)
        if record.get("phase") == "end" and "badcert" in (record.get("path") or ""):
            ends[record["path"]] = record["status"]
    assert sorted(set(ends.values())) == [502], ends
    assert len(ends) == 10, ends


# --------------------------------------------------------------------------- 7-8 connections


def test_2000_concurrent_connections(matrix: Matrix):
    before = matrix.pids("interceptor")

    def burst(case: Case) -> None:
        case.probes = matrix.as_agent(BURST, "burst", "2000", "40", timeout=90)
        case.over()

    case, stats = matrix.case(
        "2,000 concurrent connections",
        "2,000 connections open at once (3 in 10 to the allowed host, the rest to a "
        "forbidden one; 1 in 5 over TLS), then a request on each: the interceptor "
        "survives (same process), forbidden ones never arrive, the load carries on.",
        burst,
    )
    assert matrix.pids("interceptor") == before  # they survived, no restart
    probes = case.probes
    assert len(probes) == 2000
    by_status: dict[int, int] = {}
    for p in probes:
        by_status[p["status"]] = by_status.get(p["status"], 0) + 1
    [summary] = [ln for ln in matrix.probe_stdout.splitlines() if ln.startswith("SUMMARY ")]
    stats.notes.update(json.loads(summary.split(" ", 1)[1]), statuses=by_status)
    assert stats.notes["peak_open"] == 2000, stats.notes  # all open at once
    ok = [p for p in probes if allowed(p) and p["status"] == 200]
    # Served, most of them (the rest may time out on a busy machine: counted as failed).
    assert len(ok) >= 0.5 * sum(1 for p in probes if allowed(p)), by_status
    reached = upstream_requests(matrix.records, RUN)
    assert all(p["id"] in reached for p in ok)


def test_slow_clients_hold_connections(matrix: Matrix):
    def slow(case: Case) -> None:
        case.probes = matrix.as_agent(SLOW, "slow", "300", "6", timeout=60)
        case.over()

    case, _ = matrix.case(
        "slow clients (slowloris)",
        "300 connections send their request head one line a second for 6 s: the "
        "normal stream is not slowed into failures, nothing partial is forwarded, and "
        "each slow request is judged once complete.",
        slow,
    )
    probes = case.probes
    assert len(probes) == 300
    assert {p["status"] for p in probes if allowed(p)} == {200}, probes[:4]
    assert {p["status"] for p in probes if not allowed(p)} == {403}, probes[:4]
    reached = upstream_requests(matrix.records, RUN)
    for p in probes:
        if allowed(p):
            assert reached[p["id"]]["t"] >= p["done"], p  # only once the head was complete
    during = [e for e in case.window(matrix.load.snapshot()) if e["t"] < case.clear]
    assert not [e for e in during if allowed(e) and failed_here(e)], during


# --------------------------------------------------------------------------- the command


def test_the_command_ran_through_and_exited_0(matrix: Matrix):
    logs = matrix.root(["sh", "-c", "tail -n 40 /var/log/secure-proxy/*.log"]).stdout
    (matrix.project / ".faults-stop").touch()
    assert matrix.s.wait(timeout=60) == 0, matrix.s.stderr
    assert matrix.load.ended.wait(10)
    [end] = [ln for ln in matrix.load.other if ln.startswith("LOAD-END ")]
    entries = matrix.load.snapshot()
    assert json.loads(end.split(" ", 1)[1])["sent"] == len(entries)  # every request reported
    reached = upstream_requests(matrix.records, RUN)
    assert not [r for r in reached.values() if r["path"].startswith("/deny/")]
    assert not unlogged(reached.values(), start_lines(matrix.log))
    time.sleep(0.5)
    matrix.names_asked += matrix.resolver_names()
    assert set(matrix.names_asked) <= {DNS_NAME}, matrix.names_asked
    # Between the faults allowed requests do not fail, but for the rare timeout on this
    # shared machine or lookup refused (see failed_here): a user query riding one of
    # the DNS guard's flows again (a few in a hundred) would show here.
    windows = [(row.window["begin"], row.window["end"]) for row in matrix.rows]

    def in_a_window(e: dict[str, Any]) -> bool:  # in flight at any time of one
        start = e["t"] - matrix.started
        return any(start < end and start + e["d"] >= begin for begin, end in windows)

    between = [e for e in entries if allowed(e) and not in_a_window(e)]
    quiet = [e for e in between if e["status"] != 200]
    assert len(quiet) <= max(3, len(between) // 100), json.dumps([quiet, logs])
    report = os.environ.get("SP_FAULTS_REPORT")
    if report:
        data = {
            "run": RUN,
            "clients": CLIENTS,
            "period_s": PERIOD,
            "observe_s": OBSERVE,
            "urls": URLS,
            "seconds": round(time.time() - matrix.started, 1),
            "load_requests": len(entries),
            "load_allowed_failed": sum(1 for e in entries if allowed(e) and e["status"] != 200),
            "load_allowed_failed_between_faults": [e.get("err", e["status"]) for e in quiet],
            "reached_upstream": len(reached),
            "cases": [row.to_json() for row in matrix.rows],
        }
        Path(report).write_text(json.dumps(data, indent=2) + "\n")
        with open(report + ".requests.jsonl", "w") as out:  # every request, for a closer look
            for entry in entries:
                out.write(json.dumps(entry) + "\n")
