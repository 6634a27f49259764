"""The built image, run through the host CLI (`copilot_here --engine podman`), with
the container attached to a network namespace whose only neighbour is a
test-internet host (tests.harness.Topology). No traffic leaves this machine.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from runtime import paths
from runtime.host.hostlogs import default_logs_dir
from tests.harness import Topology, python_bin
from tests.harness.imagereqs import canonical, left_out, pinned
from tests.harness.upstream import UpstreamCA, wait_ready

pytestmark = pytest.mark.timeout(600)

# Runs in the container as the user command (Debian's python3 is in the image).
FETCH = textwrap.dedent(
    """
    import json, sys, urllib.request, urllib.error
    for url in sys.argv[1:]:
        try:
            with urllib.request.urlopen(url, timeout=15) as r:
                status, body = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read().decode()
        except OSError as e:
            status, body = "ERR", repr(e)
        print("RESULT", url, status, json.dumps(body), flush=True)
    """
)

LIVE_EDIT = textwrap.dedent(
    """
    import os, sys, time, urllib.request, urllib.error
    def get(url):
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError as e:
            return repr(e)
    url = sys.argv[1]
    print("BEFORE", get(url), flush=True)
    open("/work/phase1", "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists("/work/edited") and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.monotonic()
    status = None
    while time.monotonic() - start < 10:
        status = get(url)
        if status == 200:
            break
        time.sleep(0.1)
    print("AFTER", status, round(time.monotonic() - start, 2), flush=True)
    """
)

ALLOWED, BLOCKED, LATER = "allowed.test", "blocked.test", "later.test"
NAMES = [ALLOWED, BLOCKED, LATER]
REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- CLI
# How the test reaches the engine through the CLI: kept in one place.


def network_args(topo: Topology) -> list[str]:
    """Attach the container to the topology's box namespace (podman `ns:` network)."""
    return [f"--engine-arg=--network=ns:/run/netns/{topo.box}"]


def drop_net_caps_args() -> list[str]:
    """Run without NET_ADMIN/NET_RAW (the CLI then leaves out its own --cap-add)."""
    return ["--cap-drop", "NET_ADMIN", "--cap-drop", "NET_RAW"]


def cli_argv(
    image: str,
    topo: Topology,
    command: Sequence[str],
    extra: Sequence[str] = (),
) -> list[str]:
    argv = [sys.executable, "-m", "runtime.host.cli", "--engine", "podman", "--image", image]
    for name in NAMES:
        argv += ["--add-host", f"{name}:{topo.net_ip}"]
    argv += [*network_args(topo), *extra, "--", *command]
    return argv


def run_cli(
    argv: Sequence[str], project: Path, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv),
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    print(f"$ {shlex.join(argv)}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


def results(stdout: str) -> dict[str, tuple[str, str]]:
    """url -> (status, body) as the command in the container saw them."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            _, url, status, body = line.split(" ", 3)
            found[url] = (status, json.loads(body))
    return found


def echoed(body: str) -> dict[str, object]:
    """What the test-internet server saw (it echoes the request as JSON)."""
    return json.loads(body)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def upstream_ca(tmp_path_factory: pytest.TempPathFactory) -> UpstreamCA:
    """The test internet's CA: the CLI hands it to the interceptor through
    SECURE_PROXY_UPSTREAM_CA, as a user behind a corporate proxy would."""
    return UpstreamCA.create(tmp_path_factory.mktemp("upstream-ca"), names=NAMES)


@pytest.fixture
def net(topology: Topology, upstream_ca: UpstreamCA) -> Topology:
    """The box namespace (the container's network) and the test internet's server
    (HTTPS on 443, HTTP on 80, echoing each request) on the net host."""
    server = topology.net_popen(
        [
            *(python_bin(), "-m", "tests.harness.upstream", "serve"),
            *("--cert", str(upstream_ca.server_cert), "--key", str(upstream_ca.server_key)),
        ],
        env={"PYTHONPATH": str(REPO_ROOT)},
        text=True,
    )
    wait_ready(server)
    return topology


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory the container's appuser (uid 1000) may write to."""
    proj = tmp_path / "project"
    proj.mkdir()
    for p in (tmp_path, proj):
        p.chmod(0o777)
    return proj


@pytest.fixture
def env(cli_env: dict[str, str], tmp_path: Path, upstream_ca: UpstreamCA) -> dict[str, str]:
    home = tmp_path / "home"  # no global config unless a test writes one
    home.mkdir()
    return {
        **cli_env,
        "HOME": str(home),
        "XDG_STATE_HOME": str(tmp_path / "state"),  # approvals: the test's own
        "SECURE_PROXY_UPSTREAM_CA": str(upstream_ca.ca_cert),
    }


def write_config(project: Path, rules: list[dict[str, object]], env: dict[str, str]) -> Path:
    """The user's repo config, approved as the user would (a run refuses it otherwise)."""
    from runtime.host import hoststate, trust

    cfg = project / ".copilot_here" / "network.json"
    cfg.parent.mkdir(exist_ok=True)
    text = (
        json.dumps(
            {
                "enabled": True,
                "mode": "enforce",
                "log_to_file": True,
                "inherit_defaults": False,
                "allowed_rules": rules,
            },
            indent=2,
        )
        + "\n"
    )
    cfg.write_text(text)
    trust.approve(hoststate.state_root(Path(env["HOME"]), env), cfg, text.encode())
    return cfg


def traffic_lines(logs: Path) -> list[dict[str, object]]:
    path = logs / "traffic.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- tests


def test_enforce_allows_blocks_and_logs_on_the_host(
    image: str, net: Topology, project: Path, env: dict[str, str]
) -> None:
    write_config(project, [{"host": ALLOWED}], env)
    ok, bad = f"https://{ALLOWED}/hello", f"https://{BLOCKED}/secret"
    plain_bad = f"http://{BLOCKED}/plain"
    command = ["python3", "-c", FETCH, ok, bad, plain_bad]
    result = run_cli(cli_argv(image, net, command), project, env)
    assert result.returncode == 0, result.stderr
    got = results(result.stdout)
    # HTTPS through the interceptor: the command trusts its CA (set up by init in
    # this image), the interceptor trusts the upstream's CA (mounted by the CLI).
    assert got[ok][0] == "200", got
    seen = echoed(got[ok][1])
    assert (seen["host"], seen["sni"], seen["path"]) == (ALLOWED, ALLOWED, "/hello"), seen
    for url in (bad, plain_bad):
        status, body = got[url]
        assert status == "403", got
        assert f"BLOCKED: GET {url}" in body, body
    assert "Rules ENABLED (mode: enforce)" in result.stderr

    # The log on the host (the CLI's default logs dir, in the XDG state dir): a
    # start and an end line per request.
    lines = traffic_lines(default_logs_dir(project, Path(env["HOME"]), env))
    assert {line["id"] for line in lines if line["phase"] == "start"} == {
        line["id"] for line in lines if line["phase"] == "end"
    }, lines
    lines = [line for line in lines if line["phase"] == "end"]
    seen_lines = {
        (line["scheme"], line["host"], line["path"], str(line["action"]).lower(), line["status"])
        for line in lines
    }
    assert seen_lines == {
        ("https", ALLOWED, "/hello", "allow", 200),
        ("https", BLOCKED, "/secret", "block", 403),
        ("http", BLOCKED, "/plain", "block", 403),
    }, lines


def test_no_config_is_allow_all_without_a_log_and_the_exit_code_comes_back(
    image: str, net: Topology, project: Path, env: dict[str, str]
) -> None:
    url = f"https://{BLOCKED}/anything"
    # Untouched: the request meets the upstream's own certificate (trusted here by
    # the test CA alone), and the container needs no NET_ADMIN.
    ca = paths.CONTAINER_UPSTREAM_CA
    script = (
        f"SSL_CERT_FILE={ca} python3 -c {shlex.quote(FETCH)} {url}; [ -t 0 ] || echo NO-TTY; exit 7"
    )
    argv = cli_argv(image, net, ["sh", "-c", script], drop_net_caps_args())
    result = run_cli(argv, project, env)
    assert result.returncode == 7, result.stderr
    status, body = results(result.stdout)[url]
    assert status == "200", body
    assert echoed(body)["host"] == BLOCKED
    assert "NO-TTY" in result.stdout
    assert "allow-all" in result.stderr
    assert traffic_lines(default_logs_dir(project, Path(env["HOME"]), env)) == []


def test_live_edit_with_network_config_write(
    image: str, net: Topology, project: Path, env: dict[str, str]
) -> None:
    cfg = write_config(project, [{"host": ALLOWED}], env)
    url = f"https://{LATER}/now"
    name = f"sp-image-test-{net.run_id}"
    extra = ["--network-config-write", f"--engine-arg=--name={name}"]
    proc = subprocess.Popen(
        cli_argv(image, net, ["python3", "-c", LIVE_EDIT, url], extra),
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (project / "phase1").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the container never made its first request"
            time.sleep(0.1)
        # The image's HEALTHCHECK (run by hand: no systemd timers here) sees the
        # interceptor's readiness marker.
        health = subprocess.run(
            ["podman", "healthcheck", "run", name],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert health.returncode == 0, (health.stdout, health.stderr)
        # Edit in place on the host, as a user would.
        data = json.loads(cfg.read_text())
        data["allowed_rules"].append({"host": LATER})
        with cfg.open("r+") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.truncate()
        (project / "edited").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(out, err)
    assert proc.returncode == 0, err
    assert "BEFORE 403" in out
    after = next(line.split() for line in out.splitlines() if line.startswith("AFTER"))
    assert after[1] == "200", out
    assert float(after[2]) < 5.0, f"the edit took {after[2]}s to apply"


def test_the_agent_cannot_plant_a_repo_config_and_a_planted_one_is_refused(
    image: str, net: Topology, project: Path, env: dict[str, str]
) -> None:
    # Podman mounts a read-only empty directory over /work/.copilot_here (a
    # subdirectory of the /work bind mount), even with --network-config-write.
    (project / ".copilot_here").mkdir()
    (project / ".copilot_here").chmod(0o777)  # the user's own: only the mount may stop it
    script = (
        "( echo '{\"enabled\": false}' > /work/.copilot_here/network.json ) 2>/dev/null "
        "&& echo PLANT:DONE || echo PLANT:denied; echo END"
    )
    result = run_cli(
        cli_argv(image, net, ["sh", "-c", script], ["--network-config-write"]), project, env
    )
    assert result.returncode == 0, result.stderr
    assert "PLANT:denied" in result.stdout and "END" in result.stdout, result.stdout
    assert not (project / ".copilot_here" / "network.json").exists()
    # A cloned repository's config: the container is not started until approved.
    (project / ".copilot_here" / "network.json").write_text('{"enabled": false}\n')
    result = run_cli(cli_argv(image, net, ["sh", "-c", "echo COMMAND-RAN"]), project, env)
    assert result.returncode == 1
    assert "COMMAND-RAN" not in result.stdout
    assert "copilot_here --network-trust" in result.stderr


def test_under_a_pseudo_terminal_the_command_sees_a_tty(
    image: str, net: Topology, project: Path, env: dict[str, str]
) -> None:
    inner = shlex.join(
        cli_argv(image, net, ["sh", "-c", "[ -t 0 ] && [ -t 1 ] && echo HAS-A-TTY; exit 5"])
    )
    result = subprocess.run(
        ["script", "-qefc", inner, "/dev/null"],
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    print(result.stdout, result.stderr)
    assert "HAS-A-TTY" in result.stdout
    assert result.returncode == 5


def test_without_net_admin_the_container_exits_with_the_firewall_message(
    image: str, net: Topology, project: Path, env: dict[str, str]
) -> None:
    write_config(project, [{"host": ALLOWED}], env)  # active: the firewall must start
    result = run_cli(
        cli_argv(image, net, ["sh", "-c", "echo COMMAND-RAN"], drop_net_caps_args()),
        project,
        env,
    )
    assert result.returncode != 0
    assert "COMMAND-RAN" not in result.stdout
    assert "NET_ADMIN" in result.stderr and "--cap-add" in result.stderr, result.stderr


WAIT_FOR_GO = """
touch /work/started
i=0; while [ ! -e /work/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
echo from-the-container > /work/written; ls -n /work/written; echo END
"""


def test_a_project_path_with_colon_and_comma_is_mounted_whole_named_and_labelled(
    image: str, net: Topology, tmp_path: Path, env: dict[str, str]
) -> None:
    """`--mount` with the path quoted as Docker/Podman's CSV reader wants it: `-v`
    would have split this path at ':'. The container is named after the project
    and labelled with what started it."""
    from runtime.host.engines import container_name

    project = tmp_path / 'odd:name,with "quote"'
    project.mkdir()
    project.chmod(0o777)
    write_config(project, [{"host": ALLOWED}], env)
    proc = subprocess.Popen(
        cli_argv(image, net, ["sh", "-c", WAIT_FOR_GO]),
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (project / "started").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the container never started"
            time.sleep(0.1)
        name = container_name(str(project.resolve()))
        inspect = subprocess.run(
            ["podman", "container", "inspect", name, "--format", "{{json .Config.Labels}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        (project / "go").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(out, err)
    assert proc.returncode == 0, err
    assert "END" in out
    assert (project / "written").read_text() == "from-the-container\n"
    assert inspect.returncode == 0, inspect.stderr
    labels = json.loads(inspect.stdout)
    assert labels["copilot_here.project"] == str(project.resolve()), labels
    assert labels["copilot_here.started-by"].startswith("copilot_here "), labels


# --------------------------------------------------------------------------- the image itself


def test_image_metadata(image_info: dict) -> None:
    config = image_info["Config"]
    assert config["Entrypoint"] == ["/usr/local/bin/secure-proxy-init"]
    assert not config.get("Cmd"), "init picks the command: Copilot CLI when present, else bash"
    health = image_info.get("Healthcheck") or config.get("Healthcheck") or {}
    for marker in (paths.interceptor_marker(), paths.firewall_marker()):  # the defaults
        assert str(marker) in " ".join(health.get("Test", [])), (marker, health)
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    assert "DEBIAN_FRONTEND" not in env, "build-time settings must not reach the user's shell"
    labels = config.get("Labels") or {}
    for key in ("title", "version", "revision", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), labels


def test_image_has_what_runs_and_nothing_for_building(image: str) -> None:
    check = textwrap.dedent(
        """
        set -u
        for tool in gcc cc make npm copilot; do
            command -v $tool >/dev/null && echo "HAS $tool"
        done
        for path in /root/.cache /wheels /src /build /opt/secure-proxy/venv/bin/pip; do
            [ -e $path ] && echo "HAS $path"
        done
        find / -xdev -name .git 2>/dev/null | sed 's/^/HAS /'
        ls -d /opt/secure-proxy/venv/lib/python3*/site-packages/tests 2>/dev/null | sed 's/^/HAS /'
        ls /var/lib/apt/lists | grep -v '^lock$\\|^partial$' | sed 's/^/HAS apt list /'
        ls /var/cache/apt/archives/*.deb 2>/dev/null | sed 's/^/HAS /'
        id proxy-user >/dev/null && echo "OK proxy-user"
        for f in defaults.json network.schema.json; do
            [ -f /opt/secure-proxy/$f ] && echo "OK $f"
        done
        /opt/secure-proxy/venv/bin/python \\
            -c 'import iptc, mitmproxy, supervisor, runtime.container.init' \\
            && echo "OK imports"
        """
    )
    result = subprocess.run(
        [
            "podman",
            "run",
            "--rm",
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--network",
            "none",
            "--entrypoint",
            "sh",
            image,
            "-c",
            check,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    print(result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("HAS")] == []
    assert {
        "OK proxy-user",
        "OK defaults.json",
        "OK network.schema.json",
        "OK imports",
    } <= set(lines)


# Runs in the image: the venv's distributions, and the interceptor's master built.
DISTRIBUTIONS = textwrap.dedent(
    """
    import asyncio, json, sys
    from importlib import metadata
    dists = {d.metadata["Name"]: d.version for d in metadata.distributions()}
    import runtime.container.interceptor.main as main
    async def build():
        return [type(a).__name__ for a in main.make_master().addons.chain]
    chain = asyncio.run(build())
    print("RESULT", json.dumps({"dists": dists, "chain": chain, "modules": sorted(sys.modules)}))
    """
)


def podman_run(image: str, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *("podman", "run", "--rm", "--runtime", "runc", "--network", "none"),
            *("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"),
            *("--entrypoint", argv[0], image, *argv[1:]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_venv_holds_the_pinned_closure_and_nothing_left_out(image: str) -> None:
    """image/runtime-requirements.txt is what the venv holds: mitmproxy without its
    console/web/onboarding/proxy-auth dependencies, no pip or setuptools; the
    interceptor's master builds there (its start is in the enforce tests above);
    Debian's python3-venv is not installed (the venv comes ready from the builder)."""
    venv_python = "/opt/secure-proxy/venv/bin/python"
    result = podman_run(image, [venv_python, "-c", DISTRIBUTIONS])
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.split("RESULT ", 1)[1])
    dists = {canonical(name): version for name, version in found["dists"].items()}
    sneaked = sorted(set(dists) & (left_out() | {"pip", "setuptools"}))
    assert sneaked == [], f"left out of image/runtime-requirements.txt but installed: {sneaked}"
    expected = {**pinned(), "copilot-here-secure-proxy": dists.get("copilot-here-secure-proxy")}
    assert dists == expected, {
        k: (dists.get(k), expected.get(k)) for k in set(dists) ^ set(expected)
    }
    assert "PolicyGate" in found["chain"] and "Proxyserver" in found["chain"], found["chain"]
    top = {m.split(".")[0] for m in found["modules"]}
    assert not top & {"flask", "tornado", "urwid", "ldap3", "passlib"}, top
    dpkg = podman_run(image, ["dpkg-query", "-W", "-f", "${Status}", "python3-venv"])
    assert "install ok installed" not in dpkg.stdout, dpkg.stdout
    # pip's default hosts still recorded for the default rules (read from the builder's
    # pip wheel now that python3-venv's is gone).
    recorded = podman_run(image, ["cat", "/opt/secure-proxy/registries.json"])
    assert json.loads(recorded.stdout)["pypi"], recorded.stdout


def test_size_the_runtime_adds(image: str, base_image: str) -> None:
    """Recorded for BENCHMARKS.md; the bound only catches a gross regression."""

    def size(ref: str) -> int:
        out = subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Size}}", ref],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.strip())

    added = size(image) - size(base_image)
    print(f"[image] runtime adds {added / 1e6:.1f} MB to {base_image}", file=sys.stderr)
    assert added < 200e6, f"the runtime adds {added / 1e6:.0f} MB"


def test_podman_gets_the_sign_in_token_by_name_and_the_copilot_state_persists(
    image: str, net: Topology, project: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """The real engine: `-e GH_TOKEN` with the value in podman's environment reaches the
    init; with rules the agent holds a placeholder of the same shape, without rules the
    token itself. ~/.copilot is the host's directory, across runs."""
    import hashlib
    import os

    token = "gho_" + "Tk4" * 12
    env = {**env, "GH_TOKEN": token, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("GITHUB_TOKEN", None)
    show = (
        'printf %s "$GH_TOKEN" | sha256sum | cut -c1-64 | sed "s/^/SHA /"; '
        'echo "SHAPE ${#GH_TOKEN} $(printf %s "$GH_TOKEN" | cut -c1-4)"; '
    )
    dry = run_cli(cli_argv(image, net, ["true"], ["--dry-run"]), project, env)
    assert dry.returncode == 0 and "-e GH_TOKEN" in dry.stdout, dry.stderr
    assert token not in dry.stdout + dry.stderr

    write_config(project, [{"host": ALLOWED}], env)
    script = show + "echo kept > ~/.copilot/marker && echo WROTE"
    result = run_cli(cli_argv(image, net, ["sh", "-c", script]), project, env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    real = hashlib.sha256(token.encode()).hexdigest()
    assert "WROTE" in lines and f"SHAPE {len(token)} gho_" in lines, lines
    assert f"SHA {real}" not in lines and token not in result.stdout + result.stderr
    assert "(the agent sees a placeholder)" in result.stderr

    other = tmp_path / "project2"  # no config: the token itself, and the same ~/.copilot
    other.mkdir()
    other.chmod(0o777)
    script = show + "cat ~/.copilot/marker"
    result = run_cli(cli_argv(image, net, ["sh", "-c", script], drop_net_caps_args()), other, env)
    assert result.returncode == 0, result.stderr
    assert f"SHA {real}" in result.stdout.splitlines() and "kept" in result.stdout
    state = tmp_path / "config" / "copilot-cli-docker"
    assert state.stat().st_uid == (os.getuid() or 1000)
