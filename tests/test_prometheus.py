"""Metrics and monitoring (issue 16): the gateway's and the console proxy's /metrics pass `promtool check
metrics` and carry the seed's series; the SLO rules pass `promtool check rules` and their unit tests
(deploy/prometheus/rules.test.yml); and a real Prometheus, configured as `make run` configures it, scrapes
a real gateway and console proxy and fires the boot-failure alert when QEMU fails to start a VM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import Settings
from gateway.web.app import create_app
from tests.conftest import Session, assert_envelope, fake_gateway, truncate_all
from tests.fixtures.websockify import WebsockifyServer, free_port, start_websockify, stop_websockify
from tests.test_api import make_admin

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "vmgate.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    (PROMTOOL is None or PROMETHEUS is None) and not os.environ.get("VMGATE_TEST"),
    reason="Debian's prometheus package is not installed (make deps)")
pytestmark = needs_prometheus

# The seed's list (docs/OBSERVABILITY.md), as the gateway names them.
SEED_METRICS = ("vmgate_vm_provision_duration_seconds", "vmgate_vm_boot_success_total",
                "vmgate_vm_boot_failure_total", "vmgate_controller_reconcile_duration_seconds",
                "vmgate_api_requests_total", "vmgate_api_request_duration_seconds",
                "vmgate_db_query_duration_seconds", "vmgate_queue_depth", "vmgate_vm_time_to_console_seconds",
                "vmgate_vm_resume_duration_seconds")
VM = {"template": "tiny", "cpu": 1, "memory_mb": 256, "disk_gb": 1}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool is missing: make deps installs Debian's prometheus package"
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False)


def render(data_dir: Path, **env: str) -> list[str]:
    """`deploy/prometheus.sh argv` with DATA_DIR and ``env``: Prometheus's command line as make run has it."""
    result = subprocess.run([str(REPO / "deploy" / "prometheus.sh"), "argv"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=False, env={**os.environ, "DATA_DIR": str(data_dir), **env})
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if line]


def test_rules_pass_promtool_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(RULES / "rules.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(RULES / "rules.test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout + tested.stderr


def test_make_runs_config_passes_promtool(tmp_path: Path) -> None:
    argv = render(tmp_path, GATEWAY_PORT="18000", WEBSOCKIFY_METRICS_PORT="16081", PROMETHEUS_PORT="19090")
    assert argv[0] == "prometheus" and "--web.listen-address=127.0.0.1:19090" in argv
    conf = tmp_path / "prometheus" / "prometheus.yml"
    checked = promtool("check", "config", str(conf))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = conf.read_text()
    assert '"127.0.0.1:18000"' in text and '"127.0.0.1:16081"' in text and str(RULES / "rules.yml") in text
    assert render(tmp_path / "off", PROMETHEUS_PORT="0") == []


def test_the_dashboard_uses_series_the_rules_and_gateway_define() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 6
    rules = (RULES / "rules.yml").read_text()
    for expr in exprs:
        for word in expr.replace("(", " ").replace(")", " ").replace("{", " ").split():
            if word.startswith("vmgate:"):
                assert f"record: {word}" in rules, f"the dashboard queries {word}, which no rule records"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for slo in ("boot", "time to console", "api error"):
        assert slo in titles


async def test_gateway_metrics_pass_promtool_and_carry_the_seed_list(server: Any, sessions: Any) -> None:
    s: Session = sessions(server)
    await s.signup_and_login()
    status, vm = await s.request("POST", "/api/vms?wait=30", json=VM)
    assert status == 201, vm
    async with aiohttp.ClientSession() as http, http.get(server.make_url("/metrics")) as resp:
        assert resp.status == 200
        text = await resp.text()
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for name in SEED_METRICS:
        assert f"# HELP {name} " in text, f"{name} is missing from /metrics"
    assert 'vmgate_vm_boot_success_total{boot="create"} 1.0' in text
    assert 'vmgate_vm_time_to_console_seconds_count{start="cold"} 1.0' in text
    assert 'vmgate_api_requests_total{method="POST",route="/api/vms",status="201"} 1.0' in text
    db_count = next(line for line in text.splitlines() if line.startswith("vmgate_db_query_duration_seconds_count"))
    assert float(db_count.split()[-1]) > 5  # sign-up, login and a create are many statements


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def sessions_value(text: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith("vmgate_websockify_active_sessions "))
    return float(line.split()[-1])


@pytest.fixture
def console_proxy(redis_test_url: str, tmp_path: Path) -> Iterator[tuple[WebsockifyServer, int]]:
    """The console proxy with its /metrics on, as make run starts it: (server, metrics port)."""
    port = free_port()
    server = start_websockify(redis_test_url, tmp_path / "websockify.log",
                              extra_env={"WEBSOCKIFY_METRICS_PORT": str(port)})
    try:
        yield server, port
    finally:
        stop_websockify(server)


def test_console_proxy_counts_open_connections(console_proxy: tuple[WebsockifyServer, int]) -> None:
    server, port = console_proxy
    deadline = time.monotonic() + 10
    while True:
        try:
            text = scrape(port)
            break
        except OSError:
            assert time.monotonic() < deadline, "the console proxy's /metrics never answered"
            time.sleep(0.1)
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # (start_websockify's own probe connection may still be winding down)
    deadline = time.monotonic() + 10
    while sessions_value(scrape(port)) != 0:
        assert time.monotonic() < deadline, "connections counted before any was opened"
        time.sleep(0.1)
    # Connections that have not finished their WebSocket handshake have a process each already.
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(3)]
    try:
        deadline = time.monotonic() + 10
        while sessions_value(scrape(port)) != 3:
            assert time.monotonic() < deadline, f"never 3 open connections: {sessions_value(scrape(port))}"
            time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 20
    while sessions_value(scrape(port)) != 0:
        assert time.monotonic() < deadline, "closed connections are still counted"
        time.sleep(0.2)


async def prometheus_get(http: aiohttp.ClientSession, base: str, path: str, **params: str) -> Any:
    async with http.get(base + path, params=params) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["status"] == "success", body
        return body["data"]


async def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what} never happened; last answer: {last}")


def start_prometheus(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def failing_qemu(tmp_path: Path) -> str:
    """A QEMU_BINARY that answers ``--version`` as the real one and fails every VM start, as a QEMU that
    cannot get its memory does: the boot fails in the local driver, after the API accepted the create."""
    qemu = tmp_path / "qemu-system-x86_64"
    real = shutil.which("qemu-system-x86_64")
    assert real is not None, "QEMU is missing (make deps)"
    qemu.write_text(f"""#!/bin/sh
[ "$1" = --version ] && exec {real} --version
echo "qemu-system-x86_64: cannot set up guest memory 'pc.ram': Cannot allocate memory" >&2
exit 1
""")
    qemu.chmod(0o755)
    return str(qemu)


@pytest.mark.qemu
async def test_prometheus_scrapes_the_stack_and_a_failed_boot_fires_the_alert(
        aiohttp_server: Any, app_settings: Settings, tiny_images_dir: Path, failing_qemu: str, database_url: str,
        sessions: Any,
        console_proxy: tuple[WebsockifyServer, int], tmp_path: Path) -> None:
    settings = dataclasses.replace(app_settings, images_dir=tiny_images_dir, driver="local", qemu_binary=failing_qemu)
    gateway = await aiohttp_server(create_app(settings))
    truncate_all(database_url)
    prom_port = free_port()
    argv = render(tmp_path / "prom", GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(gateway.port),
                  WEBSOCKIFY_METRICS_PORT=str(console_proxy[1]), PROMETHEUS_PORT=str(prom_port),
                  PROMETHEUS_SCRAPE_INTERVAL="1s")
    prometheus = start_prometheus(argv, tmp_path / "prometheus.log")
    base = f"http://127.0.0.1:{prom_port}"
    try:
        async with aiohttp.ClientSession() as http:
            async def targets_up() -> Any:
                try:
                    data = await prometheus_get(http, base, "/api/v1/targets")
                except aiohttp.ClientError:
                    return None
                health = {t["labels"]["job"]: t["health"] for t in data["activeTargets"]}
                return health if set(health.values()) == {"up"} and len(health) == 3 else None

            health = await wait_for("every target up", targets_up)
            assert set(health) == {"vmgate-gateway", "vmgate-console", "prometheus"}

            s: Session = sessions(gateway)
            await s.signup_and_login()
            status, vm = await s.request("POST", "/api/vms?wait=30", json=VM)
            assert status == 503 and vm["error"]["code"] == "provisioning_failed", vm

            async def alert_firing() -> Any:
                data = await prometheus_get(http, base, "/api/v1/alerts")
                return [a for a in data["alerts"]
                        if a["labels"]["alertname"] == "VMBootFailuresFastBurn" and a["state"] == "firing"]

            firing = await wait_for("VMBootFailuresFastBurn firing", alert_firing)
            assert firing[0]["labels"]["severity"] == "page"

            # Every rule evaluates without an error against the real series.
            groups = (await prometheus_get(http, base, "/api/v1/rules"))["groups"]
            bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] == "err"]
            assert not bad, bad
            # And so does every query of the dashboard.
            for panel in json.loads(DASHBOARD.read_text())["panels"]:
                for target in panel.get("targets", []):
                    await prometheus_get(http, base, "/api/v1/query", query=target["expr"])
            # The console proxy's gauge is there.
            result = (await prometheus_get(http, base, "/api/v1/query",
                                           query="vmgate_websockify_active_sessions"))["result"]
            assert result and result[0]["value"][1] == "0"
    finally:
        stop(prometheus)


@pytest.mark.browser
async def test_the_admin_page_draws_the_objectives_from_prometheus(
        aiohttp_server: Any, app_settings: Settings, database_url: str, sessions: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    from tests.fixtures.browser import ARTIFACTS, base_url, chromium, log_in, new_page, require_assets

    require_assets()
    prom_port = free_port()
    settings = dataclasses.replace(app_settings, prometheus_url=f"http://127.0.0.1:{prom_port}")
    gateway = await fake_gateway(aiohttp_server, settings, database_url)
    admin: Session = sessions(gateway)
    await admin.signup_and_login("boss@example.test", "correct horse battery")
    assert admin.user is not None
    make_admin(database_url, admin.user["id"])
    user: Session = sessions(gateway)
    await user.signup_and_login()
    status, body = await admin.request("GET", "/api/admin/slo")
    assert_envelope(status, body, 503, "metrics_unavailable")  # configured, but nothing answers there yet

    argv = render(tmp_path / "prom", GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(gateway.port),
                  WEBSOCKIFY_METRICS_PORT=str(free_port()), PROMETHEUS_PORT=str(prom_port),
                  PROMETHEUS_SCRAPE_INTERVAL="1s")
    prometheus = start_prometheus(argv, tmp_path / "prometheus.log")
    try:
        async def up() -> Any:
            with contextlib.suppress(aiohttp.ClientError):
                status, body = await admin.request("GET", "/api/admin/slo")
                return body if status == 200 else None
            return None

        await wait_for("Prometheus answering", up)

        async def gateway_scraped() -> Any:
            async with aiohttp.ClientSession() as http:
                data = await prometheus_get(http, f"http://127.0.0.1:{prom_port}", "/api/v1/query",
                                            query='up{job="vmgate-gateway"} == 1')
            return data["result"]

        # Counters must be seen at 0 before the create makes them 1, or rate() has nothing to compare.
        await wait_for("the gateway scraped", gateway_scraped)
        status, vm = await user.request("POST", "/api/vms?wait=30", json=VM)
        assert status == 201, vm

        async def figures() -> Any:
            body = await up()
            now = {f["key"]: f["now"] for f in (body or {}).get("figures", [])}
            return body if now.get("boot_success") == 1 and now.get("time_to_console_p95") else None

        body = await wait_for("the recording rules' figures", figures)
        by_key = {f["key"]: f for f in body["figures"]}
        assert set(by_key) == {"boot_success", "time_to_console_p95", "api_error_ratio"}
        assert by_key["boot_success"]["objective"] == 0.99 and by_key["boot_success"]["points"]
        assert 0 < by_key["time_to_console_p95"]["now"] < 20
        assert by_key["api_error_ratio"]["now"] == 0  # nothing failed
        # Only admins: anyone else gets what a missing page gets; a bad range is a 400.
        assert (await user.request("GET", "/api/admin/slo"))[0] == 404
        assert (await user.request("GET", "/admin/slo"))[0] == 404
        status, body = await admin.request("GET", "/api/admin/slo?hours=0")
        assert_envelope(status, body, 400, "bad_request")

        async with chromium() as browser, new_page(browser, "admin-slo") as page:
            await log_in(page, gateway, "boss@example.test", "correct horse battery")
            await page.goto(base_url(gateway) + "/admin/slo")
            figures_shown = page.locator(".slo-figure")
            await expect(figures_shown).to_have_count(3)
            await expect(page.locator(".slo-figure[data-key=boot_success] [data-now]")).to_have_text("100.00 %")
            await expect(page.locator(".slo-figure[data-key=boot_success] path.series")).to_have_count(1)
            objective = page.locator(".slo-figure[data-key=time_to_console_p95] line[data-objective]")
            await expect(objective).to_have_count(1)
            await page.screenshot(path=str(ARTIFACTS / "admin-slo.png"), full_page=True)
            shutil.copy(ARTIFACTS / "admin-slo.png", REPO / "docs" / "screenshots" / "admin-slo.png")
    finally:
        stop(prometheus)
