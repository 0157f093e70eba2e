"""The commands as a user runs them (subprocess) on bad input: one or two lines
naming what to fix and exit status 2, never a traceback; --help exits 0.

Most cases fail before any JAX compile. One workdir per session (a saved
checkpoint, tokenizer and VAE, as tests/test_export.py builds it) serves the
generate / export / train cases; each case works on a copy when it changes it.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("train", "generate", "eval", "export", "data", "vae", "info", "compile",
            "chameleon", "sweep", "edit_data")


def tfjax(cmd, *args, timeout=300):
  """Runs `tfjax-CMD ARGS` (as python -m tfjax.cli.CMD) from the repository root."""
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.run([sys.executable, "-m", f"tfjax.cli.{cmd}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env)


def assert_user_error(out, *needles):
  """Exit 2, no traceback, at most two lines, the last naming what to fix."""
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, \
      out.stderr[-3000:]
  errors = [ln for ln in out.stderr.splitlines() if ": error: " in ln]
  assert len(errors) == 1, out.stderr[-3000:]
  lines = out.stderr[out.stderr.index(errors[0]):].strip().splitlines()
  assert len(lines) <= 2, lines
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  return errors[0]


def make_workdir(wd):
  """A training workdir as the main job leaves it (checkpoint at step 5 with the
  portable config, config.json, data/tokenizer, vae/), without training: the
  state is zeros of the model's shapes, so nothing is compiled."""
  import jax
  import numpy as np
  from configs.tiny import get_config
  from tfjax.data import shapes
  from tfjax.data.tokenizer import train_tokenizer
  from tfjax.model import init_params
  from tfjax.paths import Paths
  from tfjax.train import mesh as mesh_lib
  from tfjax.train.checkpoint import Checkpointer, config_json
  from tfjax.train.optimizer import make_optimizer
  from tfjax.train.state import state_shardings
  from tfjax.vae import autoencoder, io as vae_io
  c = get_config()
  m = c.model
  m.dim, m.num_layers, m.num_heads, m.num_kv_heads, m.vocab_size = 64, 2, 4, 2, 512
  c.data.batch_size = 4
  c.diffusion.sample_steps, c.diffusion.sampler = 2, "ddim"
  paths = Paths.from_command_line(c, wd)
  _, _, captions = shapes.generate_split("train", 100, 64, seed=0)
  train_tokenizer(shapes.text_corpus("train", 100) + captions, 400, paths.tokenizer)
  arch = autoencoder.AutoencoderConfig(channels=(8, 8, 8, 8), blocks_per_level=1,
                                       latent_channels=8, norm_groups=4, mid_attention=False)
  zeros = lambda tree: jax.tree_util.tree_map(  # noqa: E731
      lambda s: jax.device_put(np.zeros(s.shape, s.dtype), getattr(s, "sharding", None)), tree)
  vae_params = jax.eval_shape(lambda: autoencoder.init_params(arch, jax.random.key(1), 64))
  vae_io.save(paths.vae, {"kind": "kl", "architecture": arch.to_json(), "scale": 1.0,
                          "shift": 0.0}, zeros(vae_params))
  abstract, _ = state_shardings(c, mesh_lib.make_mesh(c.mesh, jax.devices()[:1]),
                                make_optimizer(c.train), init_params)
  state = zeros(abstract)
  ckpt = Checkpointer(paths.checkpoints, c.train, async_save=False)
  ckpt.save(5, state, config=paths.portable_config(), force=True)
  ckpt.close()
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump(config_json(paths.portable_config()), f)
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("errors") / "run")
  make_workdir(wd)
  return wd


def copy_of(workdir, tmp_path, name="copy"):
  dest = str(tmp_path / name)
  shutil.copytree(workdir, dest)
  return dest


# ---- the command line ------------------------------------------------------
@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_exits_0(cmd):
  out = tfjax(cmd, "--help")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "flags:" in out.stdout
  # Every command spells its flags one way: words joined by underscores.
  names = re.findall(r"^\s+--(?:\[no\])?([A-Za-z0-9_.-]+)", out.stdout, re.M)
  assert names and not [n for n in names if "-" in n], names


def test_config_mistakes(tmp_path):
  out = tfjax("train", "--config=configs/tiny.py", f"--workdir={tmp_path}",
              "--config.train.num_stepz=3")
  assert_user_error(out, "--config.train.num_stepz", "num_steps")
  assert_user_error(tfjax("train", "--config=configs/nope.py", f"--workdir={tmp_path}"),
                    "configs/nope.py", "no such file")
  afile = tmp_path / "file"
  afile.write_text("x")
  assert_user_error(tfjax("train", "--config=configs/tiny.py", f"--workdir={afile}"),
                    f"--workdir={afile}", "not a directory")
  assert_user_error(tfjax("info", "--config=configs/tiny.py", "--config.model.dim=33"),
                    "model.num_heads")
  assert_user_error(tfjax("train", "--config=configs/tiny.py"), "--workdir")
  # --verbose shows the traceback of the same mistake.
  out = tfjax("info", "--config=configs/tiny.py", "--config.model.dim=33", "--verbose")
  assert out.returncode != 0 and "Traceback" in out.stderr


def test_preempted_exit_status(tmp_path):
  """A command that raises Preempted (a signal stopped it after saving) exits 75."""
  script = ("import sys; from tfjax.cli.common import run\n"
            "from tfjax.train.preemption import Preempted\n"
            "def main(argv):\n  raise Preempted('stopped by SIGTERM')\n"
            "run(main, '__main__')\n")
  env = {**os.environ, "PYTHONPATH": ROOT}
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=env)
  assert out.returncode == 75, out.stderr
  assert "Traceback" not in out.stderr and "SIGTERM" in out.stderr


# ---- data ------------------------------------------------------------------
def test_bad_caption_byte_names_file_and_line(tmp_path):
  from PIL import Image
  folder = tmp_path / "images"
  folder.mkdir()
  Image.new("RGB", (8, 8)).save(folder / "a.png")
  lines = [b'{"file": "a.png", "caption": "a cat"}', b'{"file": "a.png", "caption": "caf\xe9"}']
  (folder / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  data = tmp_path / "data"
  out = tfjax("data", "build", "--config=configs/tiny.py", f"--data_dir={data}",
              f"--config.data.image_text_source=folder:{folder}")
  assert_user_error(out, f"{folder / 'captions.jsonl'}:2", "UTF-8")
  assert not os.path.exists(data / "tfds" / "tfjax_folder"), "half-built dataset left behind"
  # A missing image names its line too.
  (folder / "captions.jsonl").write_text('{"file": "a.png"}\n{"file": "b.png"}\n')
  out = tfjax("data", "build", "--config=configs/tiny.py", f"--data_dir={data}",
              f"--config.data.image_text_source=folder:{folder}")
  assert_user_error(out, "captions.jsonl:2", "b.png")


# ---- generate --------------------------------------------------------------
def test_generate_counts_and_out_folder(workdir, tmp_path):
  out_dir = tmp_path / "gen"
  for flag in ("--num_images=0", "--num_images=-2", "--batch_size=0", "--steps=0"):
    out = tfjax("generate", f"--model={workdir}", "--prompt=a red circle", f"--out={out_dir}",
                flag)
    assert_user_error(out, flag)
  assert not out_dir.exists()
  foreign = tmp_path / "photos"
  foreign.mkdir()
  (foreign / "holiday.png").write_bytes(b"x")
  out = tfjax("generate", f"--model={workdir}", "--prompt=a red circle", f"--out={foreign}")
  assert_user_error(out, f"--out={foreign}", "not empty")
  assert os.listdir(foreign) == ["holiday.png"]
  assert_user_error(tfjax("generate", f"--model={tmp_path / 'none'}", "--prompt=x",
                          f"--out={out_dir}"), "neither an export")
  assert not out_dir.exists()


def test_generate_refuses_a_prompt_longer_than_trained(workdir, tmp_path):
  prompt = " ".join(["a red circle and a blue square"] * 60)
  out = tfjax("generate", f"--model={workdir}", f"--prompt={prompt}",
              f"--out={tmp_path / 'gen'}")
  assert_user_error(out, "data.seq_len", "--long_prompt=truncate")
  # Only the user's mistake is printed: no Orbax INFO lines on the way.
  assert "orbax" not in out.stderr.lower(), out.stderr[-2000:]


def test_out_folder_of_an_earlier_generation_is_cleared(tmp_path):
  from tfjax.generate.files import MARKER_FILE, prepare_out
  out = tmp_path / "gen"
  prepare_out(str(out))
  for name in ("sample0_image0.png", "sample5_image0.png", "generation.json", "notes.txt"):
    (out / name).write_text("old")
  prepare_out(str(out))
  assert sorted(os.listdir(out)) == sorted([MARKER_FILE, "notes.txt"])


# ---- workdirs that move ----------------------------------------------------
def test_moved_and_copied_workdirs_read_their_own_files(workdir, tmp_path):
  from tfjax import checkpoints
  moved = copy_of(workdir, tmp_path, "moved")
  copied = copy_of(workdir, tmp_path, "copied")
  stored = json.load(open(os.path.join(moved, "config.json")))
  assert stored["data"]["dir"] == "data" and stored["vae"]["path"] == ""
  for wd in (moved, copied):
    config = checkpoints.workdir_config(wd)
    assert config.data.dir == os.path.join(wd, "data")
    assert checkpoints.tokenizer_dir(config, wd) == os.path.join(wd, "data", "tokenizer")
    assert checkpoints.vae_dir(config, wd) == os.path.join(wd, "vae")
  # The original gone: the move still exports a complete model.
  shutil.rmtree(os.path.join(copied, "data"))
  out = tfjax("export", f"--workdir={moved}", f"--out={tmp_path / 'export'}")
  assert out.returncode == 0, out.stderr[-3000:]
  meta = json.load(open(tmp_path / "export" / "tfjax_export.json"))
  assert meta["tokenizer"] and meta["vae"]
  assert "Metadata file does not exist" not in out.stderr
  assert "orbax" not in out.stderr.lower(), out.stderr[-2000:]
  # Exported files get the umask's permissions, not safetensors' 0600.
  mode = os.stat(tmp_path / "export" / "params.safetensors").st_mode & 0o777
  mask = os.umask(0)
  os.umask(mask)
  assert mode == 0o666 & ~mask, oct(mode)
  vae_mode = os.stat(os.path.join(workdir, "vae", "params.safetensors")).st_mode & 0o777
  assert vae_mode == 0o666 & ~mask, oct(vae_mode)
  # A copy whose own tokenizer is gone does not read the original's.
  assert checkpoints.tokenizer_dir(checkpoints.workdir_config(copied), copied) is None


def test_export_out_that_is_not_an_export_is_left_alone(workdir, tmp_path):
  precious = tmp_path / "home"
  precious.mkdir()
  (precious / "thesis.tex").write_text("x")
  out = tfjax("export", f"--workdir={workdir}", f"--out={precious}")
  assert_user_error(out, f"--out={precious}", "not a tfjax export")
  assert os.listdir(precious) == ["thesis.tex"]


# ---- checkpoints -----------------------------------------------------------
def _damage(ckpt_step_dir):
  for root, _, files in os.walk(os.path.join(ckpt_step_dir, "state")):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")


def test_damaged_only_checkpoint_stops_naming_the_step(workdir, tmp_path):
  wd = copy_of(workdir, tmp_path)
  _damage(os.path.join(wd, "checkpoints", "5"))
  out = tfjax("export", f"--workdir={wd}", f"--out={tmp_path / 'e'}")
  assert_user_error(out, "checkpoint step 5", "damaged", "restore an older copy")
  out = tfjax("train", "--config=configs/tiny.py", f"--workdir={wd}", "--stages=train",
              "--config.train.synthetic_data=true", "--config.model.dim=64",
              "--config.model.num_layers=2", "--config.model.num_heads=4",
              "--config.model.num_kv_heads=2", "--config.model.vocab_size=512",
              "--config.data.batch_size=8")
  assert_user_error(out, "step", "5", "--config.train.restart=true")
  assert not os.path.exists(os.path.join(wd, "checkpoints", "5"))
  assert os.listdir(os.path.join(wd, "checkpoints_damaged"))
  # Run again: still no silent start from step 0.
  out = tfjax("train", "--config=configs/tiny.py", f"--workdir={wd}", "--stages=train",
              "--config.train.synthetic_data=true", "--config.model.dim=64",
              "--config.model.num_layers=2", "--config.model.num_heads=4",
              "--config.model.num_kv_heads=2", "--config.model.vocab_size=512",
              "--config.data.batch_size=8")
  assert_user_error(out, "checkpoints_damaged", "--config.train.restart=true")


def test_num_steps_below_the_checkpoint_is_an_error(workdir, tmp_path):
  wd = copy_of(workdir, tmp_path)
  out = tfjax("train", "--config=configs/tiny.py", f"--workdir={wd}", "--stages=train",
              "--config.train.synthetic_data=true", "--config.train.num_steps=3",
              "--config.model.dim=64", "--config.model.num_layers=2",
              "--config.model.num_heads=4", "--config.model.num_kv_heads=2",
              "--config.model.vocab_size=512", "--config.data.batch_size=8")
  assert_user_error(out, "train.num_steps=3", "step 5")


# ---- launchers -------------------------------------------------------------
def _fake_train(tmp_path, body):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  script = bin_dir / "tfjax-train"
  script.write_text("#!/bin/bash\n" + body)
  script.chmod(0o755)
  return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_local_launcher_resumes_after_preemption(tmp_path):
  wd = tmp_path / "run"
  count = tmp_path / "count"
  # Pre-empted (75) twice, then done.
  env = _fake_train(tmp_path, f'n=$(cat {count} 2>/dev/null || echo 0); echo $((n+1)) > {count}\n'
                              f'echo "run $n"; [ $n -ge 2 ] && exit 0; exit 75\n')
  out = subprocess.run(["bash", "launch/local.sh", "configs/tiny.py", str(wd)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env=env)
  assert out.returncode == 0, out.stdout + out.stderr
  assert count.read_text().strip() == "3"
  assert open(wd / "train.log").read().count("resuming") == 2


def test_local_launcher_stops_with_75_when_it_is_signalled(tmp_path):
  import signal
  import time
  wd = tmp_path / "run"
  started = tmp_path / "started"
  # Saves (sleep) on TERM, then exits 75 as tfjax-train does.
  env = _fake_train(tmp_path, f"trap 'sleep 1; echo saved; exit 75' TERM\ntouch {started}\n"
                              "while :; do sleep 0.1; done\n")
  p = subprocess.Popen(["bash", "launch/local.sh", "configs/tiny.py", str(wd)], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  for _ in range(300):
    if started.exists():
      break
    time.sleep(0.1)
  p.send_signal(signal.SIGTERM)
  stdout, _ = p.communicate(timeout=60)
  assert p.returncode == 75, stdout
  assert "resuming" not in stdout and "saved" in open(wd / "train.log").read()


def test_slurm_and_tpu_launchers_resume_on_75():
  out = subprocess.run(["bash", "launch/slurm.sbatch", "--dry-run", "configs/tiny.py", "/r"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert "exit 75" in out.stdout and "scontrol requeue" in out.stdout
  out = subprocess.run([sys.executable, "launch/tpu_pod.py", "run", "--name=p", "--zone=z",
                        "--config=configs/tiny.py", "--workdir=/w", "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert "-ne 75" in out.stdout and "resuming" in out.stdout


def test_moved_workdir_of_the_old_format_finds_its_data(workdir, tmp_path):
  """Workdirs saved with an absolute data.dir (before tfjax.paths) still work once moved."""
  from tfjax import checkpoints
  wd = copy_of(workdir, tmp_path, "old")
  path = os.path.join(wd, "config.json")
  stored = json.load(open(path))
  stored["data"]["dir"] = "/gone/run/data"
  json.dump(stored, open(path, "w"))
  shutil.rmtree(os.path.join(wd, "checkpoints", "5", "config"))  # config.json is read then
  config = checkpoints.workdir_config(wd)
  assert checkpoints.tokenizer_dir(config, wd) == os.path.join(wd, "data", "tokenizer")


def test_tokenizer_corpus_bad_byte_names_file_and_line(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_bytes(b"a red circle\nan \xff blue square\n")
  out = tfjax("data", "tokenizer", "--config=configs/tiny.py", f"--corpus={corpus}",
              f"--out={tmp_path / 'tok'}")
  assert_user_error(out, f"{corpus}:2", "UTF-8")


def test_long_prompt_truncate_cuts_text_from_the_end():
  from tfjax.generate.mixed import fit_prompt
  row = [("tokens", [1]), ("image", None), ("text", list(range(10, 30))), ("tokens", [3])]
  fitted = fit_prompt(row, limit=30, image_slots=16, index=0, policy="truncate")
  assert fitted == [("tokens", [1]), ("image", None), ("tokens", list(range(10, 22))),
                    ("tokens", [3])]
  with pytest.raises(ValueError, match="data.seq_len"):
    fit_prompt(row, limit=30, image_slots=16, index=0)
  assert fit_prompt(row, limit=38, image_slots=16, index=0)[2] == ("tokens", list(range(10, 30)))
  with pytest.raises(ValueError, match="images alone"):
    fit_prompt(row, limit=10, image_slots=16, index=0, policy="truncate")


def test_disk_full_is_found_behind_orbax():
  from tfjax.errors import disk_full
  inner = ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state/0" in OCDBT database at local '
                     'file "/w/checkpoints/2.orbax-checkpoint-tmp/state/": Failed to write 11841536 '
                     "bytes to file 8: No space left on device [os_error_code='28']")
  try:
    try:
      raise inner
    except ValueError as e:
      raise RuntimeError("Save Finalize thread failed") from e
  except RuntimeError as outer:
    assert disk_full(outer) == "/w/checkpoints/2"
  assert disk_full(OSError(28, "No space left on device", "/w/x")) == "/w/x"
  assert disk_full(ValueError("bad value")) is None
