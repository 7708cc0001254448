"""Bench scripts that CI cannot run in full still start and stop cleanly here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_without_cuda_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "gpu_check: no CUDA device; every check here is GPU-only: skipped"


BAD_ARGS = [  # (script, arguments, what argparse says): refused before any work, in one line
    ("label_throughput.py", ["--n", "0"], "argument --n: 0 is below 1"),
    ("label_throughput.py", ["--classes", "81"], "argument --classes: 81 is not in 1..80"),
    ("label_throughput.py", ["--runner", "ray,foo"], "argument --runner: 'foo': not one of ray, local, auto"),
    ("detector_chunks.py", ["--chunks", "1,4,2"], "argument --chunks: '1,4,2' is not in ascending order"),
    ("detector_chunks.py", ["--repeats", "x"], "argument --repeats: 'x' is not a whole number"),
    ("ragged_masks.py", ["--epochs", "1"], "argument --epochs: 1 is below 2"),
    ("export_latency.py", ["--imgsz", "33"], "argument --imgsz: 33 is not a multiple of 32"),
    ("export_latency.py", ["--model", "README.md"], "--model README.md is a text file, not an ultralytics"),
    ("curate_sync.py", ["--repeat", "0"], "argument --repeat: 0 is below 1"),
    ("finetune_overfit.py", ["--lr", "nan"], "argument --lr: nan is not a finite number > 0"),
    ("label_memory.py", ["--every", "-5"], "argument --every: -5 is below 1"),
    ("sam3_classes.py", ["--threads", "-1"], "argument --threads: -1 is below 0"),
    ("student_vs_stock.py", ["--epochs", "0"], "argument --epochs: 0 is below 1"),
    ("train_overhead.py", ["--imgsz", "0"], "argument --imgsz: 0 is below 1"),
    ("gpu_check.py", ["--ft-steps", "0"], "argument --ft-steps: 0 is below 1"),
]


def test_bench_scripts_refuse_bad_numbers_before_any_work():
    for script, args, says in BAD_ARGS:
        r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        assert r.returncode == 2, (script, args, r.stdout, r.stderr)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"{script}: error: {says}"), (script, args, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
