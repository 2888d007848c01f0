#!/usr/bin/env bash
# Check the monitoring files:
#   - promtool check config / check rules / test rules;
#   - the Grafana dashboard: valid JSON, every panel and target on the ${datasource} variable,
#     every expr non-empty and parsable, a unit on every panel, rates over $__rate_interval;
#   - every metric name an expression uses is one the daemon exports (catches typos);
#   - writes every PromQL expression (alert rules, then dashboard) to one file, one per line,
#     with Grafana variables replaced ($__rate_interval -> 1m, $instance -> .*), so an
#     integration test can run each against a real Prometheus scraping a live daemon:
#       while IFS= read -r q; do curl -fsG --data-urlencode "query=$q" \
#         http://127.0.0.1:9090/api/v1/query; done < monitoring/out/expressions.promql
#
# Usage: bash monitoring/check.sh           (as root it installs Debian's prometheus package
#                                             for promtool when missing)
# Env:   PROMQL_OUT  where to write the expressions (default monitoring/out/expressions.promql);
#                    the metric names used go to the same directory, metrics.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED: $*"; }
step() { echo; echo "=== $*"; }

if ! command -v promtool >/dev/null 2>&1; then
    step "installing promtool (Debian package prometheus)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: promtool only; no node exporter, no service started in a container.
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool --version 2>&1 | head -1

# A Python with PyYAML (the rules are YAML): the one on PATH, or Debian's.
PY=""
for cand in python3 /usr/bin/python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import yaml' 2>/dev/null; then
        PY="$cand"
        break
    fi
done
if [ -z "$PY" ]; then
    step "installing python3-yaml"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-yaml >/dev/null
    PY=/usr/bin/python3
fi

step "promtool check config monitoring/prometheus.yml"
if promtool check config monitoring/prometheus.yml; then ok "prometheus.yml"; else bad "prometheus.yml"; fi

step "promtool check rules monitoring/alerts.yml"
if promtool check rules monitoring/alerts.yml; then ok "alerts.yml"; else bad "alerts.yml"; fi

step "promtool test rules monitoring/alerts_test.yml"
if promtool test rules monitoring/alerts_test.yml; then ok "alerts_test.yml"; else bad "alerts_test.yml"; fi

step "python3 -m json.tool monitoring/grafana/spoolfs.json"
if "$PY" -m json.tool monitoring/grafana/spoolfs.json >/dev/null; then
    ok "spoolfs.json is JSON"
else
    bad "spoolfs.json is not JSON"
fi

out="${PROMQL_OUT:-monitoring/out/expressions.promql}"
mkdir -p "$(dirname "$out")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

step "dashboard structure, expressions, metric names"
# Prints 'ok: ...' / 'FAILED: ...' lines; writes the expressions, the metric names, and a
# rules file holding each dashboard expression as a recording rule (for promtool to parse).
pyrc=0
"$PY" - monitoring/alerts.yml monitoring/grafana/spoolfs.json "$out" \
    "$(dirname "$out")/metrics.txt" "$tmp/dashboard_rules.yml" >"$tmp/py.log" 2>&1 <<'EOF' || pyrc=$?
import json, re, sys
import yaml

rules_path, dash_path, out_path, metrics_path, dash_rules_path = sys.argv[1:6]
failures = []
def check(cond, msg):
    print(("ok: " if cond else "FAILED: ") + msg)
    if not cond:
        failures.append(msg)

# What the daemon exports (the brief the metric set was defined by). Histograms are used
# through their _bucket/_sum/_count series.
COUNTERS = {"spoolfs_requests_total", "spoolfs_request_errors_total", "spoolfs_commits_total",
            "spoolfs_handoff_replies_total", "process_cpu_seconds_total"}
GAUGES = {"spoolfs_requests_in_flight", "spoolfs_actor_queue_depth", "spoolfs_actor_queue_capacity",
          "spoolfs_memfd_bytes", "spoolfs_memfd_dirty_bytes", "spoolfs_memfd_budget_bytes",
          "spoolfs_open_handles", "spoolfs_inodes", "spoolfs_db_size_bytes",
          "spoolfs_notify_queue_depth", "spoolfs_fuse_waiting_requests", "spoolfs_mounted",
          "spoolfs_build_info", "process_resident_memory_bytes", "process_open_fds",
          "process_max_fds", "process_start_time_seconds", "spoolfs_storage_failed",
          "spoolfs_data_dir_available_bytes", "spoolfs_space_reserve_bytes"}
HISTOGRAMS = {"spoolfs_request_duration_seconds", "spoolfs_actor_queue_wait_seconds",
              "spoolfs_commit_duration_seconds", "spoolfs_commit_batch_size",
              "spoolfs_notify_duration_seconds"}
KNOWN = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
UNITS = {"s", "ops", "bytes", "percentunit", "short"}
DS = {"type": "prometheus", "uid": "${datasource}"}

def one_line(expr):
    return " ".join(expr.split())

exprs = []  # (source, expr with variables replaced)

# Alert rules.
rules = yaml.safe_load(open(rules_path))
for group in rules["groups"]:
    for rule in group["rules"]:
        name = rule.get("alert") or rule.get("record")
        expr = one_line(str(rule.get("expr", "")))
        check(bool(expr), f"rule {name}: expr non-empty")
        check(rule.get("labels", {}).get("severity") in {"critical", "warning", "info"},
              f"rule {name}: severity label")
        ann = rule.get("annotations", {})
        check(bool(ann.get("summary")) and "Runbook" in ann.get("description", ""),
              f"rule {name}: summary and description with a runbook hint")
        exprs.append((f"alert {name}", expr))

# Dashboard.
dash = json.load(open(dash_path))
check(dash.get("schemaVersion", 0) >= 36, f"dashboard schemaVersion {dash.get('schemaVersion')}")
tvars = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
dsvar = tvars.get("datasource", {})
check(dsvar.get("type") == "datasource" and dsvar.get("query") == "prometheus",
      "dashboard: template variable `datasource` of type datasource (prometheus)")

def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))  # panels inside collapsed rows

ids = set()
panels = [p for p in all_panels(dash.get("panels", [])) if p.get("type") != "row"]
check(len(panels) > 0, f"dashboard: {len(panels)} panels")
for p in panels:
    t = p.get("title", f"panel {p.get('id')}")
    check(p.get("id") not in ids, f"panel {t!r}: unique id")
    ids.add(p.get("id"))
    check(p.get("datasource") == DS, f"panel {t!r}: datasource is ${{datasource}}")
    unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
    check(unit in UNITS, f"panel {t!r}: unit {unit!r}")
    targets = p.get("targets", [])
    check(len(targets) > 0, f"panel {t!r}: has targets")
    for tg in targets:
        expr = one_line(tg.get("expr", ""))
        check(bool(expr), f"panel {t!r} target {tg.get('refId')}: expr non-empty")
        check(tg.get("datasource") == DS, f"panel {t!r} target {tg.get('refId')}: datasource")
        ranges = re.findall(r"\[([^\]]*)\]", expr)
        check(all(r == "$__rate_interval" for r in ranges),
              f"panel {t!r} target {tg.get('refId')}: ranges use $__rate_interval {ranges}")
        exprs.append((f"panel {t}", expr))
# The instance variable's query: label_values(SELECTOR, label) runs SELECTOR.
for v in tvars.values():
    q = v.get("query")
    q = q.get("query", "") if isinstance(q, dict) else (q or "")
    m = re.match(r"\s*label_values\((.*),\s*\w+\s*\)\s*$", q)
    if v.get("type") == "query" and m:
        exprs.append((f"variable {v['name']}", one_line(m.group(1))))

def substitute(expr):
    expr = expr.replace("${__rate_interval}", "1m").replace("$__rate_interval", "1m")
    expr = expr.replace("${instance}", ".*").replace("$instance", ".*")
    return expr

final, seen = [], set()
for src, e in exprs:
    e = substitute(e)
    check("$" not in e, f"{src}: no Grafana variable left after substitution")
    if e not in seen:
        seen.add(e)
        final.append(e)
with open(out_path, "w") as f:
    f.write("\n".join(final) + "\n")
print(f"wrote {len(final)} expressions to {out_path}")

# Dashboard expressions as recording rules: promtool then parses every one of them.
dash_rules = {"groups": [{"name": "dashboard", "rules": [
    {"record": f"dashboard:expr_{i}", "expr": e}
    for i, (src, e) in enumerate((s, substitute(x)) for s, x in exprs if not s.startswith("alert "))]}]}
with open(dash_rules_path, "w") as f:
    yaml.safe_dump(dash_rules, f)

# Metric names.
used = sorted({m for _, e in exprs for m in re.findall(r"\b((?:spoolfs|process)_[A-Za-z0-9_]+)\b", e)})
unknown = [m for m in used if m not in KNOWN]
check(not unknown, f"every metric name used is exported by the daemon {unknown or ''}")
for h in HISTOGRAMS:
    check(h not in used, f"histogram {h} used through _bucket/_sum/_count only")
with open(metrics_path, "w") as f:
    f.write("\n".join(used) + "\n")
print("metric names used (" + str(len(used)) + "):")
for m in used:
    print("  " + m)
bases = {re.sub(r"_(bucket|sum|count)$", "", m) if re.sub(r"_(bucket|sum|count)$", "", m) in HISTOGRAMS else m
         for m in used}
unused = sorted((COUNTERS | GAUGES | HISTOGRAMS) - bases)
print("exported but not used by any expression: " + (", ".join(unused) if unused else "none"))
sys.exit(1 if failures else 0)
EOF
cat "$tmp/py.log"
passed=$((passed + $(grep -c '^ok: ' "$tmp/py.log" || true)))
failed=$((failed + $(grep -c '^FAILED: ' "$tmp/py.log" || true)))
if [ "$pyrc" -ne 0 ] && ! grep -q '^FAILED: ' "$tmp/py.log"; then
    bad "dashboard/expression checker exited $pyrc"
fi

step "promtool check rules (dashboard expressions as recording rules)"
if [ -s "$tmp/dashboard_rules.yml" ] && promtool check rules "$tmp/dashboard_rules.yml"; then
    ok "every dashboard expression parses"
else
    bad "a dashboard expression does not parse"
fi

echo
echo "monitoring: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
