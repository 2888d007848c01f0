#!/usr/bin/env python3
"""End-to-end check of spoolfs's observability, against a real Prometheus on loopback.

1. Mount a fresh spoolfs with its metrics endpoint on a free port.
2. Start Prometheus scraping it every second; wait until the target is up.
3. Do known numbers of file operations that map 1:1 to FUSE requests (mkdir, symlink,
   unlink, rmdir), and check through the Prometheus HTTP API that
   spoolfs_requests_total{op=...} moved by exactly those amounts.
4. Run every PromQL expression of monitoring/alerts.yml and the Grafana dashboard against
   that Prometheus (each must evaluate), and check every spoolfs_/process_ metric they name
   exists in /metrics.
5. Parse /metrics with the strict OpenMetrics parser of the Python prometheus_client.
6. /healthz and /readyz answer; `spoolfs status` reports ready.
7. `mount -t fuse.spoolfs` (the mount helper) mounts with fstab-style options; umount unmounts.

Every mount and process it starts is cleaned up, also on failure. Prints
`monitoring: N passed, M failed` last.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPOOLFS = os.environ.get("SPOOLFS_BIN", os.path.join(REPO, "target/release/spoolfs"))
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

results = []  # (name, ok, detail)


def check(name, ok, detail=""):
    results.append((name, ok, detail))
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)
    return ok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(what, predicate, timeout=30.0, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def is_mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def lazy_umount(path):
    if is_mounted(path):
        subprocess.run(["umount", "-l", path], check=False)


class Prometheus:
    def __init__(self, work, target):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = os.path.join(work, "prometheus.yml")
        with open(config, "w") as f:
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "spoolfs", "static_configs": [{"targets": [target]}]}
                    ],
                },
                f,
            )
        self.log = open(os.path.join(work, "prometheus.log"), "w")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={os.path.join(work, 'tsdb')}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, expr):
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url)
        try:
            return status, json.loads(body)
        except ValueError:
            # While its storage starts, Prometheus answers 503 with a plain-text body.
            return status, {}

    def value(self, expr):
        status, body = self.query(expr)
        result = body.get("data", {}).get("result", [])
        if status != 200 or not result:
            return None
        return float(result[0]["value"][1])

    def scrapes(self):
        """Number of successful scrapes so far (to wait for a fresh one)."""
        return self.value('count_over_time(up{job="spoolfs"}[1h])') or 0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def expressions():
    """Every PromQL expression in the alert rules and the dashboard."""
    exprs = []
    with open(os.path.join(REPO, "monitoring/alerts.yml")) as f:
        for group in yaml.safe_load(f)["groups"]:
            for rule in group["rules"]:
                exprs.append((f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]))
    dash_dir = os.path.join(REPO, "monitoring/grafana")
    for name in sorted(os.listdir(dash_dir)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(dash_dir, name)) as f:
            dash = json.load(f)
        panels = list(dash.get("panels", []))
        while panels:
            p = panels.pop()
            panels.extend(p.get("panels", []))
            for t in p.get("targets", []):
                if t.get("expr"):
                    expr = (t["expr"].replace("$__rate_interval", "1m").replace("$__interval", "1m")
                            .replace("$instance", ".*").replace("${instance}", ".*"))
                    exprs.append((f"panel {p.get('title')!r}", expr))
    return exprs


def metric_names(expr):
    return set(re.findall(r"\b((?:spoolfs|process)_[a-z0-9_]+)", expr))


def main():
    if os.geteuid() != 0:
        print("monitoring: must run as root (mounts spoolfs)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="spoolfs-monitoring.")
    os.chmod(work, 0o755)
    data, mnt, mnt2 = (os.path.join(work, d) for d in ("data", "mnt", "mnt2"))
    for d in (mnt, mnt2):
        os.mkdir(d)
    port = free_port()
    metrics_url = f"http://127.0.0.1:{port}"
    prom = None
    helper = "/sbin/mount.fuse.spoolfs"
    installed_helper = False
    try:
        subprocess.run(
            [SPOOLFS, "mount", "--metrics-addr", f"127.0.0.1:{port}", data, mnt], check=True
        )
        check("mount is type fuse.spoolfs", any(
            line.split()[4] == mnt and " - fuse.spoolfs " in line
            for line in open("/proc/self/mountinfo")))
        wait_for("metrics endpoint", lambda: http_get(f"{metrics_url}/healthz")[0] == 200)
        check("/healthz answers 200", http_get(f"{metrics_url}/healthz")[0] == 200)
        check("/readyz answers 200 while mounted", http_get(f"{metrics_url}/readyz")[0] == 200)
        st = subprocess.run([SPOOLFS, "status", mnt], capture_output=True, text=True)
        check("spoolfs status: exit 0 and ready", st.returncode == 0 and "state: ready" in st.stdout,
              st.stdout + st.stderr)

        prom = Prometheus(work, f"127.0.0.1:{port}")
        wait_for("Prometheus API", lambda: prom.value("vector(1)") == 1.0, timeout=60)
        wait_for("target up", lambda: prom.value('up{job="spoolfs"}') == 1.0, timeout=60)
        check("Prometheus scrapes spoolfs: up == 1", True)

        ops = {"mkdir": 10, "symlink": 7, "unlink": 7, "rmdir": 10}

        def counters():
            return {op: prom.value(f'spoolfs_requests_total{{op="{op}"}}') or 0.0 for op in ops}

        n = prom.scrapes()
        wait_for("a fresh scrape", lambda: prom.scrapes() > n + 1)
        before = counters()
        for i in range(ops["mkdir"]):
            os.mkdir(os.path.join(mnt, f"d{i}"))
        for i in range(ops["symlink"]):
            os.symlink("target", os.path.join(mnt, f"s{i}"))
        for i in range(ops["unlink"]):
            os.unlink(os.path.join(mnt, f"s{i}"))
        for i in range(ops["rmdir"]):
            os.rmdir(os.path.join(mnt, f"d{i}"))
        n = prom.scrapes()
        wait_for("a fresh scrape", lambda: prom.scrapes() > n + 1)
        after = counters()
        for op, count in ops.items():
            moved = after[op] - before[op]
            check(f"spoolfs_requests_total{{op={op!r}}} moved by {count}", moved == count,
                  f"moved by {moved}")
        errors = prom.value('sum(spoolfs_request_errors_total{op=~"mkdir|symlink|unlink|rmdir"})')
        check("no errors counted for those operations", not errors, f"{errors}")

        status, exposition = http_get(f"{metrics_url}/metrics")
        exposed = {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", exposition, re.M)}
        for expr_name, expr in expressions():
            status, body = prom.query(expr)
            check(f"PromQL of {expr_name} evaluates", status == 200 and body.get("status") == "success",
                  "" if status == 200 else f"{expr!r}: {body.get('error')}")
            missing = {m for m in metric_names(expr)
                       if not any(e == m or e.startswith(m + "_") or m.startswith(e) for e in exposed)}
            check(f"metrics of {expr_name} exist in /metrics", not missing, ", ".join(sorted(missing)))

        try:
            families = list(text_string_to_metric_families(exposition))
            check("exposition parses as strict OpenMetrics", True, f"{len(families)} families")
        except Exception as e:  # the parser raises ValueError subclasses
            check("exposition parses as strict OpenMetrics", False, repr(e))

        # The mount helper: mount(8) runs /sbin/mount.fuse.spoolfs for type fuse.spoolfs.
        if not os.path.exists(helper):
            os.symlink(os.path.abspath(SPOOLFS), helper)
            installed_helper = True
        data2 = os.path.join(work, "data2")
        r = subprocess.run(
            ["mount", "-t", "fuse.spoolfs", data2, mnt2, "-o",
             "defaults,nofail,_netdev,x-systemd.automount,metrics_addr_unused_by_mount"],
            capture_output=True, text=True)
        # Unknown options are refused (exit != 0) with a message; fstab-only ones are ignored.
        check("mount -t fuse.spoolfs refuses an unknown option", r.returncode != 0 and "unknown mount option" in r.stderr,
              r.stderr.strip())
        r = subprocess.run(["mount", "-t", "fuse.spoolfs", data2, mnt2, "-o",
                            "defaults,nofail,_netdev,x-systemd.automount,dev,suid"],
                           capture_output=True, text=True)
        check("mount -t fuse.spoolfs mounts", r.returncode == 0 and is_mounted(mnt2), r.stderr.strip())
        with open(os.path.join(mnt2, "hello"), "w") as f:
            f.write("hello")
        r = subprocess.run(["umount", mnt2], capture_output=True, text=True)
        check("umount unmounts it", r.returncode == 0 and not is_mounted(mnt2), r.stderr.strip())

        subprocess.run([SPOOLFS, "umount", mnt], check=True)
        check("spoolfs umount: mount gone", not is_mounted(mnt))
        st = subprocess.run([SPOOLFS, "status", mnt], capture_output=True, text=True)
        check("spoolfs status after umount exits 3", st.returncode == 3, st.stderr.strip())
    except Exception as e:
        check("integration run", False, repr(e))
    finally:
        if prom:
            prom.stop()
        for d in (mnt2, mnt):
            lazy_umount(d)
        if installed_helper:
            os.unlink(helper)
        if not any(is_mounted(d) for d in (mnt, mnt2)):
            shutil.rmtree(work, ignore_errors=True)
    passed = sum(1 for _, ok, _ in results if ok)
    failed = len(results) - passed
    print(f"monitoring: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
