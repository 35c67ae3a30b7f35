"""Turn bench_comm.py's raw results (one JSON per host count and link rate) into RESULTS.md
(tables, the issue's targets checked against the measurements) and PNG plots.

    python examples/netsim/report.py --raw examples/netsim/results/raw --out examples/netsim/results
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

ONE_BIT = ("signsgd", "signum", "ssdm", "ef_signsgd")
# issue 12: speed-up at 1 Gbit/s against Horovod fp32 and fp16 (4 hosts, ResNet-50 shapes)
TARGET_1G = {"signsgd": (12, 7), "signum": (10, 6), "ssdm": (10, 6), "ef_signsgd": (10, 6)}
TARGET_TOPK1_1G = 8
# issue 12: encode + decode at unlimited bandwidth, as a share of Horovod fp32's sync
SHARE_1BIT, SHARE_TOPK1 = 0.10, 0.20
MODEL_TITLES = {"resnet50": "ResNet-50", "bert_base": "BERT-base", "tiny": "tiny (smoke test)"}


def rate_bits(rate: str) -> float:
    """'100mbit' -> 1e8; 'off' (no limit) sorts last."""
    m = re.fullmatch(r"([0-9.]+)([kmg]?)(bit|bps)", rate.lower())
    if not m:
        return math.inf
    v = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return v * (8 if m.group(3) == "bps" else 1)


def rate_title(rate: str) -> str:
    b = rate_bits(rate)
    if math.isinf(b):
        return "unlimited"
    return f"{b / 1e9:g} Gbit/s" if b >= 1e9 else f"{b / 1e6:g} Mbit/s"


def load(raw: Path) -> list[dict]:
    runs = []
    for f in sorted(raw.glob("h*-*.json")):
        d = json.loads(f.read_text())
        d["file"] = f.name
        runs.append(d)
    if not runs:
        raise SystemExit(f"report: no results in {raw}")
    return runs


class Results:
    """Index: (hosts, model, rate, contender) -> sync result; (hosts, rate) -> e2e list."""

    def __init__(self, runs):
        self.runs = runs
        self.sync, self.e2e, self.meta = {}, {}, {}
        for run in runs:
            n, rate = run["meta"]["ranks"], run["meta"]["rate"]
            self.meta[(n, rate)] = run["meta"]
            for r in run["sync"]:
                self.sync[(n, r["model"], rate, r["contender"])] = r
            self.e2e[(n, rate)] = run.get("e2e", [])
        self.hosts = sorted({k[0] for k in self.sync} | {k[0] for k in self.e2e})
        self.rates = sorted({k[2] for k in self.sync} | {k[1] for k in self.e2e}, key=rate_bits)
        self.models = list(dict.fromkeys(k[1] for k in self.sync))
        self.contenders = list(dict.fromkeys(k[3] for k in self.sync))

    def get(self, n, model, rate, contender):
        r = self.sync.get((n, model, rate, contender))
        return r if r and "time" in r else None

    def idle(self, n, rate):
        """Per-rank background tx rate (bytes/s) of that run, or None."""
        return (self.meta.get((n, rate)) or {}).get("idle_tx_bytes_per_s")

    def median(self, n, model, rate, contender):
        r = self.get(n, model, rate, contender)
        return r["time"]["median"] if r else None


def ms(x: float) -> str:
    return f"{1e3 * x:.0f}" if x >= 0.1 else f"{1e3 * x:.1f}" if x >= 0.01 else f"{1e3 * x:.2f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def time_cell(r) -> str:
    if r is None:
        return "–"
    if "skipped" in r:
        return "n/a"
    if "failed" in r:
        return "failed"
    t = r["time"]
    return f"{ms(t['median'])} [{ms(t['min'])}–{ms(t['max'])}] n={t['n']}"


def per_step(r, key: str) -> list[float]:
    """A per-rank total over the timed steps, as a per-step value for each rank."""
    return [v / r["steps"] for v in r[key]]


def iface_ratio(r, idle=None):
    """Interface tx bytes over the ring model (compression_stats' wire_bytes_sent), per rank.
    With idle (the run's per-rank background rate, bytes/s, measured while nothing was
    exchanged), the background expected over the counting window is subtracted first."""
    if not r.get("iface_tx") or r["iface_tx"][0] is None:
        return None
    tx = list(r["iface_tx"])
    if idle is not None:
        if not r.get("window_s") or None in idle:
            return None
        tx = [t - b * w for t, b, w in zip(tx, idle, r["window_s"])]
    return [t / max(w, 1) for t, w in zip(tx, r["wire_bytes_sent"])]


def sync_section(res: Results, n: int, model: str) -> list[str]:
    title = MODEL_TITLES.get(model, model)
    # a skipped contender's entry has no numel
    some = next((r for k, r in res.sync.items() if k[0] == n and k[1] == model and "numel" in r),
                None)
    if some is None:
        return []       # every contender was skipped: "Not measured" lists them
    lines = [f"### {title}, {n} hosts ({some['numel'] / 1e6:.1f} M parameters, "
             f"{4 * some['numel'] / 1e6:.0f} MB of float32 gradients)", ""]
    rates = [r for r in res.rates if any(k[:3] == (n, model, r) for k in res.sync)]
    heads = [rate_title(r) for r in rates]

    lines += ["Time per synchronisation, ms: median [min–max] over n timed steps (the slowest "
              "rank's time in each step).", ""]
    rows = [[f"`{c}`"] + [time_cell(res.sync.get((n, model, rate, c))) for rate in rates]
            for c in res.contenders if any((n, model, rate, c) in res.sync for rate in rates)]
    lines += table(["contender"] + heads, rows)

    lines += ["Speed-up of the median: against Horovod fp32 allreduce / against Horovod fp16.", ""]
    rows = []
    for c in res.contenders:
        if c in ("hvd_fp32",):
            continue
        cells = []
        for rate in rates:
            t = res.median(n, model, rate, c)
            f32 = res.median(n, model, rate, "hvd_fp32")
            f16 = res.median(n, model, rate, "hvd_fp16")
            if t is None:
                cells.append("–")
                continue
            a = f"×{f32 / t:.1f}" if f32 else "–"
            b = f"×{f16 / t:.1f}" if f16 else "–"
            cells.append(f"{a} / {b}")
        if any(x != "–" for x in cells):
            rows.append([f"`{c}`"] + cells)
    lines += table(["contender"] + heads, rows)

    ours = [c for c in res.contenders
            if any((r := res.get(n, model, rate, c)) and r["kind"] == "hvd_signsgd"
                   for rate in rates)]
    if ours:
        lines += ["hvd_signsgd's own split (compression_stats(), median over steps and ranks), "
                  "ms: encode / communicate (waiting for the collective) / decode. The gradients "
                  "are views of the buckets (written in place, as backward does after "
                  "`zero_grad(set_to_none=False)`), so neither includes a copy of them; "
                  "encode includes the NaN/Inf check.", ""]
        rows = []
        for c in ours:
            cells = []
            for rate in rates:
                r = res.get(n, model, rate, c)
                cells.append("–" if r is None else
                             f"{ms(r['seconds_encode'])} / {ms(r['seconds_communicate'])} / "
                             f"{ms(r['seconds_decode'])}")
            rows.append([f"`{c}`"] + cells)
        lines += table(["contender"] + heads, rows)

    lines += ["Bytes per rank per step. *payload*: what the rank hands to the collectives "
              "(compression_stats `bytes_sent`); *ring model*: what a ring algorithm puts on the "
              "rank's link (`wire_bytes_sent`: allgather = gathered total minus own payload, "
              "allreduce = 2(n-1)/n of the tensor; for Horovod's own optimizer the same "
              "formula on its fused float32/float16 tensor); *interface*: the bytes the host's "
              "veth really transmitted in the timed window (TCP/IP headers, ACKs and the "
              "per-step barrier included), mean over ranks; *iface / model*: range over ranks "
              "and rates; *(iface − background) / model*: the same after subtracting "
              "Horovod's and MPI's control traffic, which flows all the time (the run's idle "
              "rate, measured for 1 s before the benchmark, times the counting window): it "
              "matters next to small payloads and CPU-bound steps.", ""]
    rows = []
    for c in res.contenders:
        found_at = [(rate, r) for rate in rates if (r := res.get(n, model, rate, c))]
        if not found_at:
            continue
        found = [r for _, r in found_at]
        r0 = found[0]
        payload = (f"{statistics.mean(per_step(r0, 'bytes_sent')) / 1e6:.3f}"
                   if "bytes_sent" in r0 else "–")
        ratio = (f"{r0['dense_fp32_bytes'][0] / max(r0['bytes_sent'][0], 1):.1f}"
                 if "dense_fp32_bytes" in r0 else
                 ("2.0" if c == "hvd_fp16" else "1.0"))
        model_b = statistics.mean(per_step(r0, "wire_bytes_sent")) / 1e6
        tx = [statistics.mean(per_step(r, "iface_tx")) for r in found if r["iface_tx"][0]
              is not None]
        ratios = [x for r in found for x in (iface_ratio(r) or [])]
        net = [x for rate, r in found_at for x in
               (iface_ratio(r, res.idle(n, rate)) or [])]
        span = lambda xs: f"{min(xs):.3f}–{max(xs):.3f}" if xs else "–"
        rows.append([f"`{c}`", ratio, payload, f"{model_b:.3f}",
                     f"{statistics.mean(tx) / 1e6:.3f}" if tx else "–", span(ratios), span(net)])
    lines += table(["contender", "fp32 bytes / payload", "payload MB", "ring model MB",
                    "interface MB", "iface / model", "(iface − background) / model"], rows)
    return lines


def e2e_section(res: Results, n: int) -> list[str]:
    rates = [r for r in res.rates if res.e2e.get((n, r))]
    if not rates:
        return []
    some = res.e2e[(n, rates[0])][0]
    lines = [f"### End-to-end training steps, {n} hosts (wide MLP, {some['numel'] / 1e6:.1f} M "
             f"parameters, batch {some['batch']} per rank)", "",
             "ms per step (forward, backward, exchange, update), median [min–max]. *overlap*: "
             "the exchange starts from the gradient hooks during backward (the normal use); "
             "*after backward*: gradients from torch.autograd.grad (no hook fires), everything "
             "launched by step(). *compute only*: the same steps with a plain torch optimizer "
             "and no exchange.", ""]
    labels = list(dict.fromkeys(r["contender"] for rate in rates for r in res.e2e[(n, rate)]))
    rows = []
    for label in labels:
        for overlap in ((False,) if label == "compute_only" else (True, False)):
            cells = []
            for rate in rates:
                r = next((x for x in res.e2e[(n, rate)] if x["contender"] == label
                          and x["overlap"] == overlap), None)
                cells.append(time_cell(r))
            mode = "–" if label == "compute_only" else ("overlap" if overlap else
                                                         "after backward")
            rows.append([f"`{label}`", mode] + cells)
    lines += table(["contender", "exchange", *[rate_title(r) for r in rates]], rows)
    return lines


def check_targets(res: Results, topk1: str) -> list[str]:
    """The targets of issue 12 (4 hosts, ResNet-50 shapes), met or not, with the numbers."""
    n, model = 4, "resnet50"
    out = ["## Targets (4 hosts, ResNet-50 shapes)", ""]
    rate1g = next((r for r in res.rates if rate_bits(r) == 1e9), None)

    def line(ok, text):
        out.append(f"- **{'met' if ok else 'MISSED'}**: {text}" if ok is not None
                   else f"- not measured: {text}")

    f32 = res.median(n, model, rate1g, "hvd_fp32") if rate1g else None
    f16 = res.median(n, model, rate1g, "hvd_fp16") if rate1g else None
    for c in ONE_BIT:
        t = res.median(n, model, rate1g, c) if rate1g else None
        if t is None or f32 is None or f16 is None:
            line(None, f"`{c}` at 1 Gbit/s against Horovod fp32 and fp16")
            continue
        x32, x16 = TARGET_1G[c]
        ok = f32 / t >= x32 and f16 / t >= x16
        line(ok, f"`{c}` at 1 Gbit/s: {ms(t)} ms per sync, ×{f32 / t:.1f} faster than Horovod "
                 f"fp32 ({ms(f32)} ms; target ×{x32}) and ×{f16 / t:.1f} faster than Horovod "
                 f"fp16 ({ms(f16)} ms; target ×{x16})")
    t = res.median(n, model, rate1g, topk1) if rate1g else None
    r = res.sync.get((n, model, rate1g, topk1))
    if t is None or f32 is None:
        why = r.get("skipped") or r.get("failed") if r else "not in this run"
        line(None, f"`{topk1}` at 1 Gbit/s ≥ ×{TARGET_TOPK1_1G} faster than Horovod fp32 "
                   f"({why})")
    else:
        line(f32 / t >= TARGET_TOPK1_1G, f"`{topk1}` at 1 Gbit/s: {ms(t)} ms, ×{f32 / t:.1f} "
                                         f"faster than Horovod fp32 (target ×{TARGET_TOPK1_1G})")
    out += not_slower(res, n, model, line)
    out += e2e_within(res, n, line)

    # bytes: per hvd_signsgd contender, the worst rank and rate
    per = {}
    for (hn, m, rate, c), r in res.sync.items():
        if hn == n and m == model and "time" in r and r["kind"] == "hvd_signsgd":
            raw = iface_ratio(r)
            net = iface_ratio(r, res.idle(n, rate))
            if raw:
                per.setdefault(c, []).append((raw, net or []))
    if not per:
        line(None, "interface bytes against compression_stats (not on the simulated cluster)")
    for c in res.contenders:
        if c not in per:
            continue
        raw = [x for a, _ in per[c] for x in a]
        net = [x for _, b in per[c] for x in b]
        ok = max(abs(x - 1) for x in raw) <= 0.10
        text = (f"`{c}`: interface tx bytes / compression_stats `wire_bytes_sent` (ring model) "
                f"= {min(raw):.3f}–{max(raw):.3f} over ranks and rates (target within 10%)")
        if not ok and net:
            text += (f"; {min(net):.3f}–{max(net):.3f} after subtracting Horovod's background "
                     f"control traffic at its idle rate (an estimate: that traffic depends on "
                     f"how busy Horovod's background thread is), i.e. the excess is control "
                     f"traffic of the size of this tiny payload, not payload")
        line(ok, text)

    off = next((r for r in res.rates if math.isinf(rate_bits(r))), None)
    base = res.median(n, model, off, "hvd_fp32") if off else None
    for c, share in [(c, SHARE_1BIT) for c in ONE_BIT] + [(topk1, SHARE_TOPK1)]:
        r = res.get(n, model, off, c) if off else None
        if r is None or base is None:
            line(None, f"`{c}` encode+decode at unlimited bandwidth")
            continue
        ed = r["seconds_encode"] + r["seconds_decode"]
        line(ed <= share * base, f"`{c}` at unlimited bandwidth: encode + decode = {ms(ed)} ms "
                                 f"= {100 * ed / base:.0f}% of Horovod fp32's {ms(base)} ms per "
                                 f"sync (target ≤ {100 * share:.0f}%)")
    return out + [""]


def spread(r) -> str:
    t = r["time"]
    return f"median of {t['n']}, range {ms(t['min'])}–{ms(t['max'])}"


def e2e_within(res: Results, n: int, line) -> list[str]:
    """Issue 12: with overlap, each 1-bit method's training step within compute-only + 1.5x its
    wire time (the allgather's (n-1)·d/8 bytes per rank at the link rate). The lines give both
    steps' ranges: with all ranks on shared cores, compute-only alone can move by more than the
    wire time from step to step."""
    for rate in res.rates:
        runs = res.e2e.get((n, rate)) or []
        base = next((r for r in runs if r["contender"] == "compute_only"), None)
        for r in runs:
            if r["contender"] not in ONE_BIT or not r["overlap"] or base is None:
                continue
            wire = (n - 1) * r["numel"] / 8 / (rate_bits(rate) / 8)
            t, c = r["time"]["median"], base["time"]["median"]
            line(t <= c + 1.5 * wire,
                 f"`{r['contender']}` end to end at {rate_title(rate)} with overlap: "
                 f"{ms(t)} ms per step ({spread(r)}) against compute only {ms(c)} ms "
                 f"({spread(base)}) + 1.5 × {ms(wire)} ms wire = {ms(c + 1.5 * wire)} ms "
                 f"(×{(t - c) / wire:.1f} the wire time on top)")
    return []


def not_slower(res: Results, n: int, model: str, line) -> list[str]:
    """Issue 12: at 10 Gbit/s and unlimited, no hvd_signsgd contender slower than Horovod fp32."""
    for rate in res.rates:
        if rate_bits(rate) < 10e9:
            continue
        base = res.median(n, model, rate, "hvd_fp32")
        mine = {c: res.median(n, model, rate, c) for c in res.contenders
                if c not in ("hvd_fp32", "hvd_fp16", "none")}
        mine = {c: t for c, t in mine.items() if t is not None}
        if base is None or not mine:
            line(None, f"no method slower than Horovod fp32 at {rate_title(rate)}")
            continue
        worst = max(mine, key=mine.get)
        line(mine[worst] <= base, f"at {rate_title(rate)} the slowest method, `{worst}`, takes "
                                  f"{ms(mine[worst])} ms against Horovod fp32's {ms(base)} ms "
                                  f"(target: no method slower)")
    return []


def profile_section(res: Results) -> list[str]:
    """cProfile of one extra synchronize() per hvd_signsgd contender (rank 0's main thread),
    for the target configuration (4 hosts, ResNet-50) or else the largest one measured."""
    keys = [k for k, r in res.sync.items() if r.get("profile")]
    if not keys:
        return []
    n = 4 if any(k[0] == 4 for k in keys) else max(k[0] for k in keys)
    model = "resnet50" if any(k[1] == "resnet50" for k in keys) else keys[0][1]
    lines = [f"## Where the time goes ({n} hosts, {MODEL_TITLES.get(model, model)})", "",
             "cProfile of one more `synchronize()` after the timed steps, rank 0's main thread "
             "(Horovod's background thread, which runs the collectives, is not in it). Own time "
             "per function, ms, and its share of that step; the step's time includes time "
             "spent waiting in `hvd.synchronize` (the collective).", ""]
    # the two rates of the targets (1 Gbit/s, unlimited); all of them are in the raw JSON
    shown = [r for r in res.rates if rate_bits(r) == 1e9 or math.isinf(rate_bits(r))]
    for rate in shown or res.rates:
        for c in res.contenders:
            r = res.sync.get((n, model, rate, c))
            if not r or not r.get("profile"):
                continue
            prof = r["profile"]
            lines += [f"**`{c}` at {rate_title(rate)}**: profiled step {ms(prof['step_s'])} ms "
                      f"(timed median {ms(r['time']['median'])} ms)", ""]
            rows = [[f"`{x['function']}`", str(x["calls"]), ms(x["own_s"]),
                     f"{100 * x['own_s'] / prof['step_s']:.0f}%"] for x in prof["top"][:8]]
            lines += table(["function", "calls", "own ms", "share"], rows)
    return lines


def run_line(n: int, rate: str, meta: dict) -> str:
    load = lambda key: "/".join(meta.get(key) or ["?"])
    return (f"{n} hosts at {rate_title(rate)} {meta['started']} "
            f"({load('loadavg_start')} → {load('loadavg_end')})")


def machine_lines(res: Results) -> list[str]:
    meta = next(iter(res.meta.values()))
    m = meta.get("machine") or {}
    idle = [x for mt in res.meta.values() for x in (mt.get("idle_tx_bytes_per_s") or [])
            if x is not None]
    lines = [f"- Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
             f"{m.get('mem_mib', 0) / 1024:.0f} GiB, {m.get('os', '?')}, kernel "
             f"{m.get('kernel', '?')}",
             f"- Software: Python {m.get('python')}, torch {m.get('torch')}, Horovod "
             f"{m.get('horovod')} (MPI controller and MPI CPU ops, no Gloo), {m.get('mpi')}, "
             f"hvd_signsgd {m.get('hvd_signsgd')} ({m.get('kernels')} kernels), "
             f"{m.get('torch_threads')} torch thread per rank",
             f"- Cluster: 1 rank per simulated host (network + UTS namespace), veth links to a "
             f"bridge, tbf rate limit on both directions of each link, TCP only (btl tcp,self); "
             f"Open MPI collectives pinned: `{meta.get('coll') or 'default'}` (allreduce ring, "
             f"allgather(v) ring). All hosts share the machine's {m.get('cores', '?')} cores: "
             f"with more ranks than cores, mpi_yield_when_idle is on and the ranks' "
             f"computation (encode, decode, reductions) competes for the cores too.",
             "- Runs (start; the machine's load average at start → end, our own ranks "
             "included): " + ", ".join(run_line(n, r, mt) for (n, r), mt in
                                       sorted(res.meta.items(),
                                              key=lambda x: (x[0][0], rate_bits(x[0][1]))))]
    if idle:
        lines.append(f"- Background traffic with nothing to exchange (Horovod's and MPI's "
                     f"control messages): {min(idle) / 1e3:.1f}–{max(idle) / 1e3:.1f} kB/s "
                     f"per rank")
    return lines + [""]


def plots(res: Results, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    for n in res.hosts:
        for model in res.models:
            rates = [r for r in res.rates if any(k[:3] == (n, model, r) for k in res.sync)]
            if not rates:
                continue
            fig, ax = plt.subplots(figsize=(7.5, 5))
            xs = list(range(len(rates)))
            for c in res.contenders:
                pts = [(x, res.get(n, model, r, c)) for x, r in zip(xs, rates)]
                pts = [(x, r["time"]) for x, r in pts if r]
                if not pts:
                    continue
                med = [1e3 * t["median"] for _, t in pts]
                err = [[1e3 * (t["median"] - t["min"]) for _, t in pts],
                       [1e3 * (t["max"] - t["median"]) for _, t in pts]]
                style = "--" if c.startswith("hvd_") else "-"
                ax.errorbar([x for x, _ in pts], med, yerr=err, marker="o", ls=style,
                            capsize=3, label=c)
            ax.set_xticks(xs, [rate_title(r) for r in rates])
            ax.set_yscale("log")
            ax.set_xlabel("link bandwidth per host (each direction)")
            ax.set_ylabel("time per synchronisation, ms (median, min–max)")
            ax.set_title(f"{MODEL_TITLES.get(model, model)} gradients, {n} hosts")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            name = f"sync_{model}_h{n}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            files.append(name)
        rates = [r for r in res.rates if res.e2e.get((n, r))]
        if rates:
            fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 4.5),
                                     squeeze=False)
            for ax, rate in zip(axes[0], rates):
                runs = res.e2e[(n, rate)]
                labels = list(dict.fromkeys(r["contender"] for r in runs))
                for i, label in enumerate(labels):
                    for overlap, dx, color in ((True, -0.2, "tab:blue"),
                                               (False, 0.2, "tab:orange")):
                        r = next((x for x in runs if x["contender"] == label
                                  and x["overlap"] == overlap), None)
                        if r:
                            ax.bar(i + (0 if label == "compute_only" else dx),
                                   1e3 * r["time"]["median"], width=0.4, color=color
                                   if label != "compute_only" else "tab:gray")
                ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
                ax.set_ylabel("ms per training step (median)")
                ax.set_title(f"wide MLP, {n} hosts, {rate_title(rate)}")
                ax.bar([], [], color="tab:blue", label="overlap with backward")
                ax.bar([], [], color="tab:orange", label="after backward")
                ax.bar([], [], color="tab:gray", label="compute only")
                ax.legend(fontsize=8)
            fig.tight_layout()
            name = f"e2e_h{n}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            files.append(name)
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--raw", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--command", default="examples/netsim/run_bench.sh",
                   help="the command line that reproduces these results")
    p.add_argument("--topk1", default="topk:ratio=0.01", help="the Top-k 1%% contender")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = Results(load(Path(args.raw)))
    files = [] if args.no_plots else plots(res, out)

    lines = ["# Communication benchmark: hvd_signsgd against Horovod on a bandwidth-limited "
             "network", "",
             f"Reproduce (root; sets up the simulated cluster, runs, writes this file and the "
             f"plots, tears down): `{args.command}`", ""]
    lines += machine_lines(res)
    lines += ["What is timed: p.grad of every parameter is written in place (random normal, "
              "sign flipped every step, plus a small varying part; untimed), then the "
              "optimizer's `synchronize()`, which launches every exchange and waits for it: "
              "`hvd_fp32` / `hvd_fp16` are the stock `hvd.DistributedOptimizer` "
              "(Compression.none / fp16, Horovod's tensor fusion); the other rows are "
              "`hvd_signsgd.DistributedOptimizer(..., method=...)` (buckets of 25 MB).", ""]
    lines += check_targets(res, args.topk1)
    skipped = {(r["contender"], r.get("skipped") or r.get("failed")) for r in res.sync.values()
               if "time" not in r}
    if skipped:
        lines += ["Not measured:", ""] + [f"- `{c}`: {why}" for c, why in sorted(skipped)] + [""]
    for n in res.hosts:
        lines += [f"## {n} hosts", ""]
        for model in res.models:
            if any(k[0] == n and k[1] == model for k in res.sync):
                lines += sync_section(res, n, model)
        lines += e2e_section(res, n)
    lines += profile_section(res)
    if files:
        lines += ["## Plots", ""] + [f"![{f}]({f})" for f in files] + [""]
    (out / "RESULTS.md").write_text("\n".join(lines))
    print(f"report: wrote {out / 'RESULTS.md'} and {len(files)} plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
