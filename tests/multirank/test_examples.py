"""The examples, run the way a user runs them, so that they cannot rot (issue 6).

- examples/train_digits.py under horovodrun (MPI), horovodrun --gloo and plain mpirun: the
  RESULT line reports 2 ranks, a compression ratio above 10 and bit-identical ranks. Under
  horovodrun and mpirun rank 0 shows its progress, which must be four plain lines per epoch
  and no bar redraws (stderr is a pipe there: each redraw would become a launcher line); on a
  terminal it is a bar. The plain-mpirun run's accuracy history must equal the in-process
  simulation of examples/reproduce_paper.py (what makes that script's numbers the numbers of
  a real run).
- examples/migrate/: the two scripts differ in the import and the optimizer line only, both
  train on 2 ranks, and the hvd_signsgd one sends over 20x less than float32; the DDP pair
  (torchrun) differs in the import and the register_comm_hook line only, and both train.
- examples/compare_methods.py --quick and examples/reproduce_paper.py --quick write their tables
  and plots.
"""
from __future__ import annotations

import ast
import difflib
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
from harness import ROOT, job_env

EXAMPLES = ROOT / "examples"
MIGRATE = EXAMPLES / "migrate"


def untagged(stdout: str) -> str:
    """Launcher output without horovodrun's "[1,0]<stdout>:" tags, which it sometimes writes
    at the end of a line instead of the start of the next."""
    return re.sub(r"\[\d+,\d+\]<std(?:out|err)>:", "", stdout)


def parse_result(stdout: str) -> dict:
    """The key=value pairs of train_digits.py's RESULT line."""
    m = re.search(r"RESULT (.*)", untagged(stdout))
    assert m, "no RESULT line in:\n" + stdout[-3000:]
    return dict(pair.split("=", 1) for pair in m.group(1).split())


def run_script(argv, timeout):
    """Run a script that launches MPI jobs itself; the whole process tree is killed on
    timeout (its own session), so a hang fails the test instead of stalling it."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=job_env(),
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(ROOT))
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{argv[0]} timed out after {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out, time.monotonic() - t0


# --- train_digits.py under the three launchers ----------------------------------------------------

def assert_few_plain_progress_lines(job, epochs):
    """Rank 0's progress under a launcher: 4 lines per epoch (25/50/75/100%), no bar."""
    raw = job.stdout + job.stderr
    assert "\r" not in raw, "a progress bar redraws under the launcher:\n" + raw[-3000:]
    lines = [line.strip() for line in untagged(raw).splitlines() if line.strip()]
    progress = [line for line in lines if line.startswith("signum x2 epoch ")]
    for e in range(1, epochs + 1):
        mine = [line for line in progress if line.startswith(f"signum x2 epoch {e}/{epochs} ")]
        assert len(mine) == 4, (e, progress)
        assert re.search(r" loss [0-9.]+ train_acc [0-9.]+ sent \d+ B/step .* test_acc [0-9.]+$",
                         mine[-1]), mine[-1]
    # Besides progress: the RESULT and "wrote" lines, and room for a launcher warning or two.
    assert len(lines) <= 4 * epochs + 4, "\n".join(lines)


@pytest.mark.parametrize("launcher", ["horovodrun", "gloo", "mpirun"])
def test_train_digits_result_line(mpi_job, launcher, tmp_path):
    out = tmp_path / "result.json"
    progress = launcher != "gloo"       # gloo checks --no-progress
    args = ["--epochs", "2", "--out", out] + ([] if progress else ["--no-progress"])
    job = mpi_job(script=EXAMPLES / "train_digits.py", np=2, launcher=launcher, args=args,
                  timeout=300)
    assert job.returncode == 0 and not job.timed_out, job.diagnostics()
    result = parse_result(job.stdout)
    assert result["ranks"] == "2", job.diagnostics()
    assert float(result["compression_ratio"]) > 10, result
    assert result["ranks_identical"] == "True", result
    history = json.loads(out.read_text())["history"]
    assert len(history) == 2 and history[-1]["bytes_sent"] > 0
    if progress:
        assert_few_plain_progress_lines(job, epochs=2)
    else:
        assert " epoch " not in untagged(job.stdout + job.stderr), job.diagnostics()
    if launcher == "mpirun":
        # The simulation in reproduce_paper.py replays this run step for step (same data,
        # shards, batches, bucket layout and codecs): the same accuracy after every epoch.
        sys.path.insert(0, str(EXAMPLES))
        try:
            import reproduce_paper
        finally:
            sys.path.remove(str(EXAMPLES))
        sim = reproduce_paper.run_digits(reproduce_paper.DigitsRun("signum", ranks=2, epochs=2))
        assert sim["test_acc"] == [h["test_acc"] for h in history], (sim, history)


def test_train_digits_draws_a_bar_on_a_terminal(tmp_path):
    """One process (no launcher) with stderr on a pseudo-terminal: tqdm's bar, redrawn with
    carriage returns, and no plain progress lines."""
    master, slave = pty.openpty()
    # 24 x 100 characters: a new pseudo-terminal is 0 x 0, where tqdm draws nothing
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, EXAMPLES / "train_digits.py", "--epochs", "1",
                             "--out", tmp_path / "r.json"], stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL, text=True, env=job_env(),
                            start_new_session=True, cwd=str(tmp_path))
    os.close(slave)
    chunks = []

    def drain():    # the terminal's buffer is small: read while the bar is drawn
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:     # EIO: the other end is closed
                return
            if not data:
                return
            chunks.append(data)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        pytest.fail("train_digits.py timed out:\n" + stdout[-3000:])
    reader.join(10)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, stdout[-3000:] + terminal[-3000:]
    assert "\r" in terminal and "signum x1" in terminal, terminal[-3000:]
    assert " epoch 1/1 step " not in stdout, stdout
    assert parse_result(stdout)["ranks"] == "1", stdout


# --- examples/migrate -----------------------------------------------------------------------------

def test_migration_scripts_differ_in_import_and_optimizer_only():
    before = (MIGRATE / "horovod_train.py").read_text().splitlines()
    after = (MIGRATE / "hvd_signsgd_train.py").read_text().splitlines()
    diff = list(difflib.unified_diff(before, after, lineterm="", n=0))
    removed = [line[1:] for line in diff if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    added = [line for line in added if line.strip()]     # blank lines around the import
    assert removed == ["optimizer = hvd.DistributedOptimizer(optimizer, "
                       "named_parameters=model.named_parameters())"], removed
    assert added[0] == "import hvd_signsgd", added
    # The rest is one statement (it may wrap): the hvd_signsgd optimizer wrapper.
    stmt = ast.parse("\n".join(added[1:])).body
    assert len(stmt) == 1 and isinstance(stmt[0], ast.Assign), added
    assert ast.unparse(stmt[0].value.func) == "hvd_signsgd.DistributedOptimizer", added
    # The README shows the current diff.
    readme = (MIGRATE / "README.md").read_text()
    shown = "".join(difflib.unified_diff(
        (MIGRATE / "horovod_train.py").read_text().splitlines(keepends=True),
        (MIGRATE / "hvd_signsgd_train.py").read_text().splitlines(keepends=True),
        "horovod_train.py", "hvd_signsgd_train.py"))
    assert shown in readme, "examples/migrate/README.md shows an outdated diff"


@pytest.mark.parametrize("script", ["horovod_train.py", "hvd_signsgd_train.py"])
def test_migration_scripts_train(mpi_job, script):
    job = mpi_job(script=MIGRATE / script, np=2, launcher="horovodrun", timeout=300)
    assert job.returncode == 0 and not job.timed_out, job.diagnostics()
    stdout = untagged(job.stdout)
    acc = re.search(r"final test accuracy ([0-9.]+)", stdout)
    assert acc and float(acc.group(1)) > 0.85, job.diagnostics()
    if script == "hvd_signsgd_train.py":
        ratios = [float(r) for r in re.findall(r"\(x([0-9.]+) less than fp32\)", stdout)]
        # ~16x: the digits' always-blank pixels leave exact zeros in the first layer's
        # memory, which are marked (sign(0) = 0, README); without zeros it would be ~31x
        assert ratios and min(ratios) > 12, job.diagnostics()


def test_ddp_migration_scripts_differ_in_import_and_hook_only():
    before = (MIGRATE / "ddp_train.py").read_text().splitlines(keepends=True)
    after = (MIGRATE / "hvd_signsgd_ddp_train.py").read_text().splitlines(keepends=True)
    diff = list(difflib.unified_diff(before, after, "ddp_train.py", "hvd_signsgd_ddp_train.py"))
    removed = [line for line in diff[2:] if line.startswith("-")]
    added = [line[1:].strip() for line in diff[2:] if line.startswith("+") and line[1:].strip()]
    assert removed == [], removed
    assert added == ["import hvd_signsgd.ddp",
                     'model.register_comm_hook(hvd_signsgd.ddp.State(method="ef_signsgd"), '
                     'hvd_signsgd.ddp.hook)'], added
    assert "".join(diff) in (MIGRATE / "README.md").read_text(), \
        "examples/migrate/README.md shows an outdated DDP diff"


@pytest.mark.parametrize("script", ["ddp_train.py", "hvd_signsgd_ddp_train.py"])
def test_ddp_migration_scripts_train(script):
    from harness import run_job
    job = run_job(script=MIGRATE / script, np=2, launcher="torchrun", timeout=300)
    assert job.returncode == 0 and not job.timed_out, job.diagnostics()
    acc = re.search(r"final test accuracy ([0-9.]+)", job.stdout)
    assert acc and float(acc.group(1)) > 0.85, job.diagnostics()


# --- compare_methods.py and reproduce_paper.py smoke runs -----------------------------------------

def test_compare_methods_quick(tmp_path):
    rc, out, _ = run_script([EXAMPLES / "compare_methods.py", "--quick", "--methods", "none",
                             "signum", "--epochs", "1", "--np", "2", "--timeout", "240",
                             "--outdir", tmp_path], timeout=600)
    assert rc == 0, out[-4000:]
    table = (tmp_path / "compare_methods.md").read_text()
    assert "| none |" in table and "| signum |" in table, table
    for png in ("accuracy_vs_epoch.png", "accuracy_vs_megabytes.png"):
        assert (tmp_path / png).stat().st_size > 5000, png
    data = json.loads((tmp_path / "compare_methods.json").read_text())
    signum = data["runs"]["signum"][0]
    # > 12, not ~31: the zero marks of the digits' always-blank pixels (see above)
    assert signum["ranks"] == 2 and signum["compression_ratio"] > 12, signum


def test_reproduce_paper_quick(tmp_path):
    rc, out, seconds = run_script([EXAMPLES / "reproduce_paper.py", "--quick", "--outdir",
                                   tmp_path], timeout=180)
    assert rc == 0, out[-4000:]
    report = (tmp_path / "paper_reproduction.md").read_text()
    for section in ("9.1", "9.3", "9.4", "9.5", "9.6", "9.7", "9.8", "9.9"):
        assert f"| {section} |" in report, section
    for png in re.findall(r"\]\(([\w.]+\.png)\)", report):
        assert (tmp_path / png).stat().st_size > 5000, png
    # A smoke run is meant to take well under a minute; allow for a loaded CI machine.
    assert seconds < 120, f"--quick took {seconds:.0f} s"
