#!/usr/bin/env bash
# Observability end to end against a real Prometheus (see integration.py), plus promtool
# checks of the rules. Needs root, Debian's prometheus package (prometheus + promtool) and
# PyPI (prometheus_client, PyYAML) — installed into a cached venv here.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
venv=${SPOOLFS_TEST_VENV:-/var/tmp/spoolfs-test-venv}
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import prometheus_client, yaml' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q prometheus_client==0.21.1 PyYAML==6.0.2
fi
command -v promtool >/dev/null || { echo "monitoring: promtool missing (apt-get install prometheus)" >&2; exit 1; }
promtool check rules "$repo/monitoring/alerts.yml"
promtool test rules "$repo/monitoring/alerts_test.yml"
exec "$venv/bin/python" "$repo/tests/monitoring/integration.py"
