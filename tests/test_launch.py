"""Launchers: every --dry-run prints the commands it would run, and nothing runs."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*cmd, env=None):
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, **(env or {})})
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_tpu_pod_dry_runs():
  py, script = sys.executable, "launch/tpu_pod.py"
  where = ["--name=tfjax-pod", "--zone=us-east5-a", "--dry-run"]
  create = run(py, script, "create", "--type=v5p-128", "--spot", *where)
  assert "gcloud compute tpus tpu-vm create tfjax-pod" in create
  assert "--accelerator-type=v5p-128" in create and "--spot" in create
  copy = run(py, script, "copy", *where)
  assert "tpu-vm scp --recurse" in copy and "--worker=all" in copy
  assert "pip install" in copy
  go = run(py, script, "run", "--config=configs/transfusion_160m.py",
           "--workdir=gs://b/run", *where, "--", "--config.train.num_steps=7")
  assert "--worker=all" in go
  assert ("tfjax-train --config=configs/transfusion_160m.py --workdir=gs://b/run "
          "--stages=train --config.train.num_steps=7") in go
  logs = run(py, script, "logs", "--workers=2", "--out=/nonexistent/logs", *where)
  assert logs.count("tpu-vm scp") == 2 and "--worker=1" in logs
  assert not os.path.exists("/nonexistent/logs")
  assert "delete tfjax-pod" in run(py, script, "delete", *where)


def test_slurm_dry_run():
  out = run("bash", "launch/slurm.sbatch", "--dry-run", "configs/tiny.py", "/shared/run",
            "--config.train.num_steps=3")
  assert out.startswith("srun ")
  assert "TFJAX_COORDINATOR=node01:12345" in out
  assert "TFJAX_PROCESS_ID=$SLURM_PROCID" in out and "CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in out
  assert "--config=configs/tiny.py --workdir=/shared/run" in out
  assert "--config.train.num_steps=3" in out
  per_node = run("bash", "launch/slurm.sbatch", "--dry-run", "configs/tiny.py", "/r",
                 env={"TFJAX_PER_NODE": "1"})
  assert "CUDA_VISIBLE_DEVICES" not in per_node


def test_local_dry_run(tmp_path):
  wd = tmp_path / "run"
  out = run("bash", "launch/local.sh", "--dry-run", "configs/tiny.py", str(wd),
            "--config.train.num_steps=5")
  assert "--config=configs/tiny.py" in out and f"--workdir={wd}" in out
  assert "--config.train.num_steps=5" in out
  assert not wd.exists()


def test_distributed_env_detection(monkeypatch):
  from tfjax.train import distributed
  for k in ("TFJAX_COORDINATOR", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert not distributed.wanted("auto")
  monkeypatch.setenv("SLURM_NTASKS", "16")
  assert distributed.wanted("auto") and not distributed.wanted("off")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
  assert distributed.wanted("auto")
