"""Do to a tiny dfine-train run what clusters do (signals, kill -9 + restarts, re-runs); print what happens.

Each fault runs the real command line (``python -m dfine.cli.train`` or torchrun around it) on CPU with the
quickstart data, and is injected ``--delay`` seconds after epoch 1 begins (the issue measured 20 s).

    python tools/fault_drill.py --tries 3 --out /tmp/drill
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the checkout under test (--code: another, e.g. before a fix)
SIZE = 96


def overrides(run: Path, data: Path, epochs: int, images: int) -> list[str]:
    return [
        f"output_dir={run}",
        "seed=0",
        f"epochs={epochs}",
        "device=cpu",
        f"train_dataloader.dataset.root={data}",
        f"val_dataloader.dataset.root={data}",
        f"train_dataloader.dataset.num_images={images}",
        "val_dataloader.dataset.num_images=2",
        "train_dataloader.total_batch_size=2",
        "val_dataloader.total_batch_size=2",
        "train_dataloader.num_workers=0",
        "val_dataloader.num_workers=0",
        f"eval_spatial_size=[{SIZE}, {SIZE}]",
        f"train_dataloader.dataset.transforms.ops=[{{type: Resize, size: [{SIZE}, {SIZE}]}}, "
        "{type: ConvertPILImage, dtype: float32, scale: true}, "
        "{type: ConvertBoxes, fmt: cxcywh, normalize: true}]",
        "train_dataloader.dataset.transforms.policy=null",
        f"train_dataloader.collate_fn.base_size={SIZE}",
        f"val_dataloader.dataset.transforms.ops=[{{type: Resize, size: [{SIZE}, {SIZE}]}}, "
        "{type: ConvertPILImage, dtype: float32, scale: true}]",
        "model.encoder.hidden_dim=32",
        "model.encoder.dim_feedforward=64",
        "model.decoder.hidden_dim=32",
        "model.decoder.feat_channels=[32, 32]",
        "model.decoder.dim_feedforward=64",
        "model.decoder.num_layers=2",
        "model.decoder.num_queries=16",
        "model.decoder.num_denoising=10",
        "print_freq=1",
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(
    prefix: list[str], flags: list[str], extra: list[str], log: Path, env: dict[str, str]
) -> subprocess.Popen:
    command = [*prefix, "-m", "dfine.cli.train", "-c", str(ROOT / "configs" / "quickstart.yml"), *flags]
    command += ["-u", *extra]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    with open(log, "ab") as handle:
        # cwd=ROOT: python -m puts the working folder first on sys.path, so it picks the dfine that runs
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment, cwd=ROOT)


def wait_for_epoch_one(run: Path, process: subprocess.Popen, timeout: float = 600) -> bool:
    log, deadline = run / "train.log", time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if log.is_file() and "epoch 1/" in log.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


def worker_pid(agent: int, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == agent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def last_pth(run: Path) -> str:
    path = run / "last.pth"
    if not path.is_file():
        return "no last.pth"
    saved = torch.load(path, weights_only=True, map_location="cpu")
    interrupted = saved.get("interrupted")
    where = (
        f"mid-epoch {interrupted['epoch']} (step {interrupted['global_step']})"
        if interrupted
        else "epoch end"
    )
    return f"epoch={saved['epoch']} {where}"


def signal_fault(
    out: Path, data: Path, name: str, prefix: list[str], sig: int, delay: float, env=None
) -> str:
    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (out / f"{name}.log").unlink(missing_ok=True)  # logs are appended to: start each fault afresh
    process = launch(prefix, [], overrides(run, data, 5, 48), out / f"{name}.log", env or {})
    if not wait_for_epoch_one(run, process):
        process.kill()
        return f"{name}: never reached epoch 1"
    time.sleep(delay)
    sent = time.time()
    process.send_signal(sig)
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        code = "hung (killed after 120 s)"
    text = (out / f"{name}.log").read_text(errors="replace")
    said = text.count("preempted: stopped on")
    took = time.time() - sent
    return f"{name}: rc {code} after {took:.1f} s; {said} rank(s) said 'preempted'; {last_pth(run)}"


def restart_fault(out: Path, data: Path, name: str, static: bool, try_index: int) -> str:
    run = out / f"{name}-{try_index}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (out / f"{run.name}.log").unlink(missing_ok=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1"]
    if static:
        torchrun += [f"--master-port={free_port()}"]
        env = {}
    else:
        torchrun += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=drill"]
        env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    process = launch(torchrun, ["-r", "auto"], overrides(run, data, 3, 16), out / f"{run.name}.log", env)
    if not wait_for_epoch_one(run, process):
        process.kill()
        return f"{run.name}: never reached epoch 1"
    pid = worker_pid(process.pid, 1)
    if pid:
        os.kill(pid, signal.SIGKILL)
    try:
        code = process.wait(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        code = "hung"
    return f"{run.name}: rc {code}; {last_pth(run)}"


def rerun_fault(out: Path, data: Path) -> str:
    run = out / "rerun"
    shutil.rmtree(run, ignore_errors=True)
    (out / "rerun.log").unlink(missing_ok=True)
    prefix = [sys.executable]
    first = launch(prefix, [], overrides(run, data, 1, 4), out / "rerun.log", {}).wait()
    before = (run / "last.pth").stat().st_mtime_ns
    second = launch(prefix, [], overrides(run, data, 1, 4), out / "rerun.log", {}).wait()
    unchanged = (run / "last.pth").stat().st_mtime_ns == before
    return f"rerun without -r: first rc {first}, second rc {second}, last.pth untouched: {unchanged}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/dfine-fault-drill"))
    parser.add_argument("--delay", type=float, default=20.0, help="seconds into epoch 1 for the signals")
    parser.add_argument("--tries", type=int, default=3, help="kill -9 + restart tries per launch recipe")
    parser.add_argument("--code", type=Path, default=None, help="run this dfine checkout instead of this one")
    args = parser.parse_args()
    if args.code is not None:
        global ROOT
        ROOT = args.code.resolve()
    print(f"dfine from {ROOT}", flush=True)
    out, data = args.out, args.out / "data"
    out.mkdir(parents=True, exist_ok=True)
    single = [sys.executable]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    usr1 = {"TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}
    lines = [
        rerun_fault(out, data),
        signal_fault(out, data, "sigterm-1-process", single, signal.SIGTERM, args.delay),
        signal_fault(out, data, "sigusr1-1-process", single, signal.SIGUSR1, args.delay),
        signal_fault(out, data, "sigterm-torchrun-2-ranks", two, signal.SIGTERM, args.delay),
        signal_fault(out, data, "sigusr1-torchrun-2-ranks-forwarded", two, signal.SIGUSR1, args.delay, usr1),
    ]
    for line in lines:
        print(line, flush=True)
    for static, name in ((False, "restart-c10d-unshared-store"), (True, "restart-static-master-port")):
        for index in range(args.tries):
            print(restart_fault(out, data, name, static, index), flush=True)


if __name__ == "__main__":
    main()
