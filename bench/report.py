"""From raw measurements to report.md, summary.csv, measurements.csv and ratios.png.

Can be run on its own to re-render a results dir:  python3 bench/report.py RESULTS_DIR

Conventions:
- Every number in the tables is the median of the repeats.
- Ratios are spoolfs / other of the metric as measured, so for rates (messages/s, MB/s,
  ops/s) a ratio above 1 means spoolfs is faster, and for costs and latencies (marked ↓)
  a ratio below 1 means spoolfs is faster.
- MB/s and GB/s are decimal (10^6, 10^9 bytes), as in the targets.
- The targets are the issue's; they are reported here, never asserted by tests (timings on
  shared machines are not pass/fail material).
"""

import csv
import json
import math
import os
import statistics
import sys

FS = ("ext4", "tmpfs", "spoolfs")

# metric key -> (label, unit, better, shown in the main table)
METRICS = {
    "enqueue": {
        "msgs_per_s": ("throughput", "messages/s", "higher", True),
        "p50_ms": ("p50 latency", "ms", "lower", True),
        "p99_ms": ("p99 latency", "ms", "lower", True),
        "mib_per_s": ("payload", "MiB/s", "higher", False),
    },
    "delivery": {
        "msgs_per_s": ("throughput", "messages/s", "higher", True),
        "p50_ms": ("p50 latency", "ms", "lower", True),
        "p99_ms": ("p99 latency", "ms", "lower", True),
        "readdir_ms": ("readdir of the queue", "ms", "lower", True),
    },
    "metadata": {
        "create_per_s": ("create", "ops/s", "higher", True),
        "stat_per_s": ("stat", "ops/s", "higher", True),
        "readdir_entries_per_s": ("readdir", "entries/s", "higher", True),
        "unlink_per_s": ("unlink", "ops/s", "higher", True),
        "mknod_per_s": ("create without open/close (mknod)", "ops/s", "higher", True),
    },
    "dirsize": {
        "create_us": ("create cost", "µs/create", "lower", True),
        "create_per_s": ("create", "ops/s", "higher", False),
        "create_p99_us": ("create p99", "µs", "lower", False),
    },
    "data": {
        "seqwrite_128k_mbps": ("seq write 128 KiB (+fsync)", "MB/s", "higher", True),
        "seqwrite_1m_mbps": ("seq write 1 MiB (+fsync)", "MB/s", "higher", True),
        "seqread_cold_128k_mbps": ("seq read 128 KiB, cold", "MB/s", "higher", True),
        "seqread_warm_128k_mbps": ("seq read 128 KiB, warm", "MB/s", "higher", True),
        "seqread_cold_1m_mbps": ("seq read 1 MiB, cold", "MB/s", "higher", True),
        "seqread_warm_1m_mbps": ("seq read 1 MiB, warm", "MB/s", "higher", True),
        "randread_cold_4k_iops": ("random read 4 KiB, cold", "IOPS", "higher", True),
        "randread_warm_4k_iops": ("random read 4 KiB, warm", "IOPS", "higher", True),
    },
}

WORKLOAD_TITLES = {
    "enqueue": "Spool enqueue",
    "delivery": "Spool delivery",
    "metadata": "Metadata",
    "dirsize": "Create in a directory of",
    "data": "Data",
}


def fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def fmt_ratio(r):
    return "–" if r is None else f"{r:.2f}×"


def summarize(records):
    """{(workload, case, metric): {fs: {"median", "values", "n_failed"}}} in first-seen order."""
    out = {}
    order = []
    for rec in records:
        key_base = (rec["workload"], rec["case"])
        if key_base not in order:
            order.append(key_base)
    for wl, case in order:
        for metric in METRICS.get(wl, {}):
            row = {}
            for fs in FS:
                runs = [r for r in records
                        if (r["workload"], r["case"], r["fs"]) == (wl, case, fs)]
                vals = [r["metrics"][metric] for r in runs
                        if r["status"] == "ok" and metric in r["metrics"]]
                row[fs] = {
                    "median": statistics.median(vals) if vals else None,
                    "values": vals,
                    "failed": sum(1 for r in runs if r["status"] != "ok"),
                }
            if any(row[fs]["values"] or row[fs]["failed"] for fs in FS):
                out[(wl, case, metric)] = row
    return out


def ratio(row, other):
    s, o = row["spoolfs"]["median"], row[other]["median"]
    if s is None or o in (None, 0):
        return None
    return s / o


def spread(vals):
    """(max - min) / median: how much the repeats disagree."""
    if len(vals) < 2 or statistics.median(vals) == 0:
        return None
    return (max(vals) - min(vals)) / statistics.median(vals)


def targets(summary, dir_sizes):
    """The issue's targets, each with what was measured and whether it is met."""
    def med(wl, case, metric, fs="spoolfs"):
        row = summary.get((wl, case, metric))
        return row[fs]["median"] if row else None

    def rat(wl, case, metric, other):
        row = summary.get((wl, case, metric))
        return ratio(row, other) if row else None

    def case_for(wl, prefix):
        for (w, c, _m) in summary:
            if w == wl and c.startswith(prefix):
                return c
        return None

    t = []

    def add(what, measured, shown, ok, note=""):
        if measured is None:
            status = "not measured"
        else:
            status = "met" if ok(measured) else "**MISSED**"
        t.append({"target": what, "measured": shown if measured is not None else "–",
                  "status": status + (f" ({note})" if note else ""), "value": measured})

    c8 = case_for("enqueue", "8 writers")
    c1 = case_for("enqueue", "1 writer")
    r = rat("enqueue", c8, "msgs_per_s", "ext4")
    add("spool enqueue, 8 writers ≥ 2× ext4", r, fmt_ratio(r), lambda x: x >= 2)
    r = rat("enqueue", c1, "msgs_per_s", "ext4")
    add("spool enqueue, 1 writer ≥ 1× ext4", r, fmt_ratio(r), lambda x: x >= 1)
    cm = case_for("metadata", "")
    v = med("metadata", cm, "create_per_s")
    add("create ≥ 15,000/s", v, f"{fmt(v)}/s", lambda x: x >= 15000)
    v = med("metadata", cm, "unlink_per_s")
    add("unlink ≥ 40,000/s", v, f"{fmt(v)}/s", lambda x: x >= 40000)
    r = rat("metadata", cm, "stat_per_s", "tmpfs")
    add("stat ≥ 0.5× tmpfs", r, fmt_ratio(r), lambda x: x >= 0.5)

    # Flatness: cost at the largest directory measured over the cost at the smallest.
    costs = [(int(c.split()[0].replace(",", "")), row["spoolfs"]["median"])
             for (w, c, m), row in summary.items() if w == "dirsize" and m == "create_us"]
    costs = sorted((n, c) for n, c in costs if c is not None)
    if len(costs) >= 2:
        (n0, c0), (n1, c1_) = costs[0], costs[-1]
        f = c1_ / c0
        note = "" if n1 >= 1_000_000 else f"only up to {n1:,} entries measured; --big for 1,000,000"
        add("create cost flat within 1.5× from 1,000 to 1,000,000 entries", f,
            f"{f:.2f}× ({fmt(c0)} µs at {n0:,} → {fmt(c1_)} µs at {n1:,})",
            lambda x: x <= 1.5, note)
    else:
        add("create cost flat within 1.5× from 1,000 to 1,000,000 entries", None, "", None)

    cd = case_for("data", "")
    for tag, label in (("128k", "128 KiB"), ("1m", "1 MiB")):
        v = med("data", cd, f"seqwrite_{tag}_mbps")
        add(f"sequential write ≥ 1 GB/s ({label} blocks)", v,
            f"{v / 1000:.3f} GB/s" if v else "", lambda x: x >= 1000)
    for tag, label in (("128k", "128 KiB"), ("1m", "1 MiB")):
        r = rat("data", cd, f"seqread_warm_{tag}_mbps", "tmpfs")
        add(f"warm sequential read ≥ 0.5× tmpfs ({label} blocks)", r, fmt_ratio(r),
            lambda x: x >= 0.5)
    r = rat("data", cd, "randread_warm_4k_iops", "tmpfs")
    add("warm 4 KiB random read ≥ 0.5× tmpfs", r, fmt_ratio(r), lambda x: x >= 0.5)
    return t


# Targets shown next to the ratios in the main table: (workload, case prefix, metric) -> text
TARGET_NOTES = {
    ("enqueue", "8 writers", "msgs_per_s"): "≥ 2× ext4",
    ("enqueue", "1 writer", "msgs_per_s"): "≥ 1× ext4",
    ("metadata", "", "create_per_s"): "≥ 15,000/s",
    ("metadata", "", "unlink_per_s"): "≥ 40,000/s",
    ("metadata", "", "stat_per_s"): "≥ 0.5× tmpfs",
    ("dirsize", "", "create_us"): "flat: ≤ 1.5× the 1,000-entry cost",
    ("data", "", "seqwrite_128k_mbps"): "≥ 1,000 MB/s",
    ("data", "", "seqwrite_1m_mbps"): "≥ 1,000 MB/s",
    ("data", "", "seqread_warm_128k_mbps"): "≥ 0.5× tmpfs",
    ("data", "", "seqread_warm_1m_mbps"): "≥ 0.5× tmpfs",
    ("data", "", "randread_warm_4k_iops"): "≥ 0.5× tmpfs",
}


def target_note(wl, case, metric):
    for (w, prefix, m), text in TARGET_NOTES.items():
        if w == wl and m == metric and case.startswith(prefix):
            return text
    return ""


def failed_note(row):
    bad = [f"{fs}: {row[fs]['failed']} failed" for fs in FS if row[fs]["failed"]]
    return " (" + ", ".join(bad) + ")" if bad else ""


def markdown(res):
    meta = res["meta"]
    records = res["measurements"]
    summary = summarize(records)
    p = meta["params"]
    lines = []
    w = lines.append
    w("# spoolfs benchmark report")
    w("")
    w(f"- Run: {meta['started']} → {meta.get('finished', '(unfinished)')}, "
      f"{meta.get('duration_s', 0) / 60:.1f} min wall time; results in `{meta['out_dir']}`")
    w(f"- spoolfs: `{meta['spoolfs_version']}` at commit `{meta['git']}`; "
      f"mount args: `{' '.join(p['spoolfs_args']) or '(defaults)'}`")
    w(f"- Machine: {meta['cpu']}, {meta['cores']} cores, {meta['mem_gib']:.0f} GiB RAM, "
      f"kernel {meta['kernel']}; {meta['fio']}, Python {meta['python']}")
    w(f"- ext4: `{meta['ext4_dir']}` ({meta['ext4_type']} `{meta.get('ext4_options', '')}`, "
      f"same filesystem and disk as the spoolfs data dir `{meta['spoolfs_data_parent']}`); "
      f"tmpfs: `{meta['tmpfs_dir']}`")
    load = meta.get("load", {})
    if load:
        total_wall = sum(v["wall_s"] for v in load.values())
        mean_other = sum(v["other_cores"] * v["wall_s"] for v in load.values()) / max(total_wall, 1e-9)
        noisy = mean_other > 0.2
        w(f"- {'**Machine not idle**: ' if noisy else 'Machine load: '}other processes (and "
          f"kernel threads) used {mean_other:.2f} of {meta['cores']} cores on average during the "
          f"run (per workload in the daemon table){'; numbers are noisier and lower than on an idle machine' if noisy else ''}.")
    w(f"- Each number is the median of {p['repeats']} runs; filesystems are measured in "
      f"rotating order within each repeat. Ratios are spoolfs ÷ the other filesystem: for "
      f"↑ metrics above 1× means spoolfs is faster, for ↓ metrics (costs, latencies) below 1× "
      f"does. MB/s = 10⁶ bytes/s.")
    w(f"- Sizes: enqueue/delivery {p['messages']:,} messages (1–64 KiB, mean ≈ 8 KiB, seed "
      f"{p['seed']}); metadata {p['meta_files']:,} files; directory sizes "
      f"{', '.join(f'{s:,}' for s in p['dir_sizes'])} (+{p['dir_batch']:,} timed creates each); "
      f"data file {p['data_size_h']}, random reads {p['rand_seconds']} s per run.")
    w("")
    w("## Results")
    w("")
    w("| Workload | Metric | | ext4 | tmpfs | spoolfs | spoolfs/ext4 | spoolfs/tmpfs | Target |")
    w("|---|---|---|--:|--:|--:|--:|--:|---|")
    for (wl, case, metric), row in summary.items():
        label, unit, better, shown = METRICS[wl][metric]
        if not shown:
            continue
        title = f"{WORKLOAD_TITLES[wl]} {case}"
        arrow = "↑" if better == "higher" else "↓"
        cells = [fmt(row[fs]["median"]) for fs in FS]
        w(f"| {title} | {label} ({unit}){failed_note(row)} | {arrow} | " + " | ".join(cells) +
          f" | {fmt_ratio(ratio(row, 'ext4'))} | {fmt_ratio(ratio(row, 'tmpfs'))} | "
          f"{target_note(wl, case, metric)} |")
    w("")
    w("## Targets (from the issue)")
    w("")
    w("| Target | Measured (spoolfs) | Status |")
    w("|---|---|---|")
    for t in targets(summary, p["dir_sizes"]):
        w(f"| {t['target']} | {t['measured']} | {t['status']} |")
    w("")
    # Flatness of the other filesystems, for context.
    flat = []
    for fs in FS:
        cs = sorted((int(c.split()[0].replace(",", "")), row[fs]["median"])
                    for (wl, c, m), row in summary.items()
                    if wl == "dirsize" and m == "create_us" and row[fs]["median"])
        if len(cs) >= 2:
            flat.append(f"{fs} {cs[-1][1] / cs[0][1]:.2f}×")
    if flat:
        w(f"Create cost at the largest over the smallest directory, per filesystem: "
          f"{', '.join(flat)}.")
        w("")
    w("## spoolfs daemon")
    w("")
    w("One daemon per workload (fresh data dir). CPU = utime + stime of all its threads over "
      "the whole workload, setup and cleanup included (/proc/PID/stat); peak RSS = VmHWM "
      "(/proc/PID/status) just before unmount; database = size of spoolfs.redb at the end; "
      "unmount = time `spoolfs umount` took (final commit).")
    w("")
    w("| Workload | CPU s | CPU in timed runs, s | peak RSS MiB | database MiB | unmount s | exit "
      "| workload wall s | other load, cores |")
    w("|---|--:|--:|--:|--:|--:|---|--:|--:|")
    for d in res["daemons"]:
        timed = sum(r.get("daemon_cpu_s") or 0 for r in records
                    if r["workload"] == d["workload"] and r["fs"] == "spoolfs")
        w(f"| {d['workload']} | {fmt(d.get('cpu_s'))} | {fmt(timed)} | "
          f"{fmt(d.get('peak_rss_mib'))} | {fmt(d.get('db_mib'))} | {fmt(d.get('umount_s'))} | "
          f"{d.get('exit', '?')} | {fmt(load.get(d['workload'], {}).get('wall_s'))} | "
          f"{fmt(load.get(d['workload'], {}).get('other_cores'))} |")
    w("")
    problems = [r for r in records if r["status"] != "ok"]
    daemon_problems = [d for d in res["daemons"] if d["problems"] or d.get("log_notable")]
    w("## Problems observed")
    w("")
    if not problems and not daemon_problems and not res.get("errors"):
        w("None: every measurement completed, every daemon exited 0 with no WARN/ERROR lines.")
    for r in problems:
        w(f"- **{r['status']}**: {WORKLOAD_TITLES[r['workload']]} {r['case']}, {r['fs']}, "
          f"repeat {r['repeat'] + 1}: {r.get('error', '')}")
    for d in daemon_problems:
        for pr in d["problems"]:
            w(f"- **spoolfs daemon ({d['workload']})**: {pr}")
        if d.get("hang_diagnostics"):
            w(f"  - hang diagnostics: `{d['hang_diagnostics']}`")
        if d.get("log_notable"):
            w(f"- spoolfs log ({d['workload']}, `{d['stderr_log']}`), WARN/ERROR/panic lines:")
            w("")
            w("  ```")
            for line in d["log_notable"][:20]:
                w("  " + line[:300])
            w("  ```")
    for e in res.get("errors", []):
        w(f"- **driver**: {e}")
    w("")
    w("## Files")
    w("")
    w("`results.json` (everything, per run), `measurements.csv` (one row per run and metric), "
      "`summary.csv` (medians and ratios), `ratios.png`, `run.log`, "
      "`spoolfs-WORKLOAD.stderr.log` (each daemon's log).")
    if res.get("plot_error"):
        w("")
        w(f"(No plot: {res['plot_error']})")
    return "\n".join(lines) + "\n", summary


def write_csvs(res, summary, out_dir):
    with open(os.path.join(out_dir, "measurements.csv"), "w", newline="") as f:
        c = csv.writer(f)
        c.writerow(["workload", "case", "fs", "repeat", "status", "metric", "value", "unit"])
        for r in res["measurements"]:
            if r["status"] != "ok":
                c.writerow([r["workload"], r["case"], r["fs"], r["repeat"], r["status"], "", "", ""])
            for m, v in r["metrics"].items():
                unit = METRICS.get(r["workload"], {}).get(m, ("", ""))[1]
                c.writerow([r["workload"], r["case"], r["fs"], r["repeat"], r["status"], m, v, unit])
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        c = csv.writer(f)
        c.writerow(["workload", "case", "metric", "unit", "better", "ext4", "tmpfs", "spoolfs",
                    "spoolfs_over_ext4", "spoolfs_over_tmpfs", "spoolfs_spread", "runs"])
        for (wl, case, metric), row in summary.items():
            label, unit, better, _ = METRICS[wl][metric]
            c.writerow([wl, case, metric, unit, better] +
                       [row[fs]["median"] for fs in FS] +
                       [ratio(row, "ext4"), ratio(row, "tmpfs"),
                        spread(row["spoolfs"]["values"]),
                        len(row["spoolfs"]["values"])])


def plot(summary, path):
    """Horizontal bars of spoolfs/ext4 and spoolfs/tmpfs for every rate (↑) metric, log
    scale, with 1× marked and the ratio targets drawn as ticks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Rates only, so all bars read "right = spoolfs faster"; the directory-size rows are a
    # cost (µs/create) in the table and are plotted as their rate (creates/s).
    rows = [(k, row) for k, row in summary.items()
            if row["spoolfs"]["median"] is not None
            and ((METRICS[k[0]][k[2]][2] == "higher" and METRICS[k[0]][k[2]][3])
                 or (k[0] == "dirsize" and k[2] == "create_per_s"))]
    if not rows:
        raise RuntimeError("no spoolfs results to plot")
    labels = [f"{WORKLOAD_TITLES[wl]} {case}: {METRICS[wl][m][0]}" for (wl, case, m), _ in rows]
    n = len(rows)
    fig, ax = plt.subplots(figsize=(11, 0.42 * n + 1.8))
    y = list(range(n))
    h = 0.38
    for off, other, color in ((-h / 2, "ext4", "#4c72b0"), (h / 2, "tmpfs", "#dd8452")):
        vals = [ratio(row, other) or float("nan") for _, row in rows]
        ax.barh([i + off for i in y], vals, height=h, color=color, label=f"spoolfs / {other}")
        for i, v in zip(y, vals):
            if not math.isnan(v):
                ax.text(v, i + off, f" {v:.2g}×", va="center", fontsize=7)
    for i, ((wl, case, m), _) in enumerate(rows):
        note = target_note(wl, case, m)
        for other, off in (("ext4", -h / 2), ("tmpfs", h / 2)):
            if note.endswith(other):
                tgt = float(note.split("≥")[1].split("×")[0])
                ax.plot([tgt, tgt], [i + off - h / 2, i + off + h / 2], color="red", lw=2.5)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("spoolfs ÷ other (rates; > 1 = spoolfs faster; log scale). Red: target ratio")
    ax.set_title("spoolfs relative to ext4 and tmpfs (medians)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        res = json.load(f)
    text, summary = markdown(res)
    write_csvs(res, summary, out_dir)
    try:
        plot(summary, os.path.join(out_dir, "ratios.png"))
    except Exception as e:  # no matplotlib, or nothing measured: the report still stands
        res["plot_error"] = f"{type(e).__name__}: {e}"
        text, summary = markdown(res)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    print(render(sys.argv[1]))
