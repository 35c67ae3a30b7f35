"""Train examples/train_digits.py once per registered method and seed, compare accuracy and bytes.

    python examples/compare_methods.py                          # every method, 4 ranks, 3 seeds
    python examples/compare_methods.py --methods none signum topk --seeds 1
    python examples/compare_methods.py --quick --np 2 --outdir /tmp/cmp   # smoke run
    python examples/compare_methods.py --from-json examples/results/compare_methods.json

Every run is a real multi-rank job (`mpirun -np 4 --oversubscribe python train_digits.py ...`)
on the same data, shards and seeds, so the byte counts are the optimizer's own
(compression_stats()). Writes into --outdir (default examples/results/):

    compare_methods.md          the table: bits per coordinate, final test accuracy, MB sent
                                per rank, compression ratio, wall time
    accuracy_vs_epoch.png       test accuracy against epoch (mean over seeds, min-max band)
    accuracy_vs_megabytes.png   test accuracy against megabytes sent per rank (log x)
    compare_methods.json        every run's history; --from-json redraws from it

Learning rate and momentum: train_digits.DEFAULTS where the method has an entry; otherwise
FALLBACK below (then the DEFAULTS of "none", an SGD-like setting, for a method neither knows).
Method options for methods that take a size (Top-k ratio and so on) come from OPTIONS.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_digits as td  # noqa: E402

from hvd_signsgd import METHODS, make_method  # noqa: E402

# Method options used in the comparison; a method not listed runs with its defaults.
OPTIONS = {
    "topk": {"ratio": 0.01},
    "threshold": {"density": 0.01},   # lambda from the 1/(2 sqrt(k)) rule for ~1% per bucket
    "randomk": {"ratio": 0.01},
    "ecx": {"alpha": 0.1},            # the moving average is the wrapped SGD's momentum 1 - alpha
}

# lr / momentum for methods that train_digits.DEFAULTS does not (yet) list: the best of a short
# sweep (simulated 4-rank runs of train_digits, 8 epochs, 2 seeds). The error-feedback
# sparsifiers train best without momentum, like ef_signsgd; ECX needs momentum 1 - alpha, and
# train_digits' SGD has no dampening, so its lr is ~1/alpha times smaller than SGD's.
FALLBACK = {
    "topk": dict(lr=1.0, momentum=0.0),
    "threshold": dict(lr=0.5, momentum=0.0),
    "randomk": dict(lr=1.0, momentum=0.0),
    "ecx": dict(lr=0.02, momentum=0.9),
}


def settings_for(method: str) -> tuple[dict, str]:
    """(lr/momentum, where they came from)."""
    if method in td.DEFAULTS:
        return dict(td.DEFAULTS[method]), "DEFAULTS"
    if method in FALLBACK:
        return dict(FALLBACK[method]), "FALLBACK"
    return dict(td.DEFAULTS["none"]), "DEFAULTS[none]"


def nominal_bits(method: str, options: dict) -> str:
    """What the method sends per coordinate, from its definition (headers, scales and the
    tensors that travel dense excluded)."""
    if method not in METHODS:          # --from-json of a method this checkout does not have
        return "?"
    bits = f"{make_method(method, **options).bits_per_coordinate:g}"
    for key in ("ratio", "density"):
        if key in options:
            return f"{100 * options[key]:g}% x {bits}"
    return bits


def launch_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:   # Open MPI refuses root without these
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def run_one(args, method: str, seed: int, workdir: Path) -> dict:
    """One mpirun job of train_digits.py; its JSON result, or {"error": ...}."""
    opts = OPTIONS.get(method, {})
    hp, _ = settings_for(method)
    out = workdir / f"{method}-seed{seed}.json"
    cmd = [*shlex.split(args.mpirun), "-np", str(args.np), sys.executable,
           str(HERE / "train_digits.py"), "--method", method, "--seed", str(seed),
           "--epochs", str(args.epochs), "--lr", str(hp["lr"]), "--momentum", str(hp["momentum"]),
           "--no-progress", "--out", str(out)]
    for k, v in opts.items():
        cmd += ["--opt", f"{k}={v}"]
    t0 = time.time()
    # Own session: on a timeout the whole job (launcher and ranks) is killed, not just mpirun.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=launch_env(), stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"timed out after {args.timeout:g} s"}
    if proc.returncode != 0 or not out.exists():
        tail = (stderr or stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result = json.loads(out.read_text())
    result["launch_seconds"] = time.time() - t0
    return result


# --- table and plots ------------------------------------------------------------------------------

def summarize(method, runs):
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    acc = [r["test_acc"] for r in ok]
    sent = statistics.mean(r["bytes_sent_per_rank"] for r in ok)
    fp32 = statistics.mean(r["fp32_bytes_per_rank"] for r in ok)
    return {
        "acc_mean": statistics.mean(acc),
        "acc_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "acc_min": min(acc), "acc_max": max(acc), "n": len(ok), "failed": len(runs) - len(ok),
        "mb": sent / 1e6, "ratio": fp32 / max(sent, 1),
        "bits": 32.0 * sent / fp32,    # payload bits per gradient coordinate, all included
        "seconds": statistics.mean(r["seconds"] for r in ok),
    }


def write_table(data, path: Path):
    s = data["settings"]
    lines = [
        "# Compression methods on the digits MLP",
        "",
        f"`python examples/compare_methods.py{' --quick' if s['quick'] else ''}`: "
        f"examples/train_digits.py under `{s['mpirun']} -np {s['np']}`, {s['epochs']} epochs, "
        f"seeds {s['seeds']}, batch 32 per rank, i.i.d. shards. Accuracy: final test accuracy, "
        f"mean ± standard deviation over seeds (min-max in brackets). MB: megabytes (10^6 B) "
        f"each rank sent in the whole run, headers, scales and the small tensors that travel "
        f"dense included; ratio: float32 bytes of the same gradients / bytes sent; bits/coord: "
        f"the method's nominal payload (sparse: density x bits per sent coordinate) and the "
        f"measured one (32 / ratio). Wall: rank 0's training loop in seconds, on a shared "
        f"2-core machine with {s['np']} ranks: only a rough guide.",
        "",
        "| method | options | lr / momentum | bits/coord nominal | bits/coord measured "
        "| test accuracy | MB sent / rank | ratio | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in data["runs"].items():
        opts = ", ".join(f"{k}={v}" for k, v in OPTIONS.get(method, {}).items()) or "-"
        hp, src = settings_for(method)
        hp = data["hyper"].get(method, hp)
        summ = summarize(method, runs)
        if summ is None:
            err = runs[0].get("error", "?") if runs else "not run"
            lines.append(f"| {method} | {opts} | {hp['lr']} / {hp['momentum']} | "
                         f"{nominal_bits(method, OPTIONS.get(method, {}))} | - | "
                         f"failed: {err[:80]} | - | - | - |")
            continue
        spread = (f"{summ['acc_mean']:.3f} ± {summ['acc_sd']:.3f} "
                  f"({summ['acc_min']:.3f}-{summ['acc_max']:.3f})" if summ["n"] > 1
                  else f"{summ['acc_mean']:.3f}")
        if summ["failed"]:
            spread += f", {summ['failed']} run(s) failed"
        lines.append(f"| {method} | {opts} | {hp['lr']} / {hp['momentum']} | "
                     f"{nominal_bits(method, OPTIONS.get(method, {}))} | {summ['bits']:.2f} | "
                     f"{spread} | {summ['mb']:.3f} | {summ['ratio']:.1f} | "
                     f"{summ['seconds']:.1f} |")
    sources = {m: settings_for(m)[1] for m in data["runs"]}
    fallback = [m for m, src in sources.items() if src != "DEFAULTS"]
    if fallback:
        lines += ["", f"lr / momentum of {', '.join(fallback)}: compare_methods.FALLBACK "
                      f"(train_digits.DEFAULTS has no entry for them)."]
    path.write_text("\n".join(lines) + "\n")


def _style(i, method):
    """Colour per method; line style per family, so 11 curves stay tellable apart."""
    colors = plt.get_cmap("tab20").colors
    family = ("dense" if method in ("none", "fp16")
              else "sparse" if method in METHODS
              and make_method(method, **OPTIONS.get(method, {})).bits_per_coordinate > 16
              else "sign")
    return dict(color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                linestyle={"dense": ":", "sign": "-", "sparse": "--"}[family],
                marker="o", markersize=3, linewidth=1.6)


def plot(data, outdir: Path):
    curves = {}
    for method, runs in data["runs"].items():
        ok = [r for r in runs if "error" not in r]
        if ok:
            curves[method] = ok
    epochs = data["settings"]["epochs"]
    x = list(range(1, epochs + 1))

    fig, ax = plt.subplots(figsize=(8.5, 5))
    for i, (method, runs) in enumerate(curves.items()):
        accs = list(zip(*[[h["test_acc"] for h in r["history"]] for r in runs]))
        style = _style(i, method)
        ax.plot(x, [statistics.mean(a) for a in accs], label=method, **style)
        if len(runs) > 1:
            ax.fill_between(x, [min(a) for a in accs], [max(a) for a in accs],
                            color=style["color"], alpha=0.12, linewidth=0)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits MLP, {data['settings']['np']} ranks "
                 f"(mean over {len(data['settings']['seeds'])} seed(s), band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    fig.tight_layout()
    fig.savefig(outdir / "accuracy_vs_epoch.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8.5, 5))
    for i, (method, runs) in enumerate(curves.items()):
        mb = [statistics.mean(r["history"][e]["bytes_sent"] for r in runs) / 1e6
              for e in range(epochs)]
        acc = [statistics.mean(r["history"][e]["test_acc"] for r in runs) for e in range(epochs)]
        ax.plot(mb, acc, label=method, **_style(i, method))
    ax.set_xscale("log")
    ax.set_xlabel("megabytes sent per rank (cumulative, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy against communication (one point per epoch)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    fig.tight_layout()
    fig.savefig(outdir / "accuracy_vs_megabytes.png", dpi=110)
    plt.close(fig)


# --- driver ----------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=None,
                   help="default: every method in hvd_signsgd.METHODS")
    p.add_argument("--np", type=int, default=4, help="ranks per run")
    p.add_argument("--epochs", type=int, default=None, help="default 8 (--quick: 2)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3, "
                   "--quick: 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, 1 seed")
    p.add_argument("--mpirun", default="mpirun --oversubscribe",
                   help="launcher command before -np (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--outdir", type=Path, default=HERE / "results")
    p.add_argument("--from-json", type=Path, default=None,
                   help="redraw the table and plots from a compare_methods.json")
    args = p.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)

    if args.from_json:
        data = json.loads(args.from_json.read_text())
    else:
        methods = args.methods or list(METHODS)
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            p.error(f"unknown method(s) {unknown}; registered: {', '.join(METHODS)}")
        args.epochs = args.epochs or (2 if args.quick else 8)
        seeds = list(range(args.seeds or (1 if args.quick else 3)))
        data = {"settings": {"np": args.np, "epochs": args.epochs, "seeds": seeds,
                             "quick": args.quick, "mpirun": args.mpirun},
                "hyper": {m: settings_for(m)[0] for m in methods}, "runs": {}}
        t_all = time.time()
        with tempfile.TemporaryDirectory(prefix="compare-") as work:
            for method in methods:
                data["runs"][method] = []
                for seed in seeds:
                    r = run_one(args, method, seed, Path(work))
                    data["runs"][method].append(r)
                    status = (r["error"] if "error" in r else
                              f"test acc {r['test_acc']:.3f}, {r['bytes_sent_per_rank'] / 1e6:.3f}"
                              f" MB/rank, ratio {r['compression_ratio']:.1f}, "
                              f"{r['launch_seconds']:.0f} s")
                    print(f"{method:16s} seed {seed}: {status}", flush=True)
        print(f"{len(methods) * len(seeds)} runs in {time.time() - t_all:.0f} s")
        (args.outdir / "compare_methods.json").write_text(json.dumps(data, indent=1))
    write_table(data, args.outdir / "compare_methods.md")
    plot(data, args.outdir)
    print((args.outdir / "compare_methods.md").read_text())
    print(f"wrote {args.outdir}/compare_methods.md, accuracy_vs_epoch.png, "
          f"accuracy_vs_megabytes.png, compare_methods.json")
    failed = [m for m, runs in data["runs"].items() if any("error" in r for r in runs)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
