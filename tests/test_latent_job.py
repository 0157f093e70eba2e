"""The sharded, resumable latent job: two simulated processes on 8 fake CPU
devices, kill-and-resume, exactly-once records, bf16 storage, skips by reason."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from array_record.python import array_record_module

from tfjax.config import default_config
from tfjax.data import example_shards, latent_job, latents, shard_writer
from tfjax.vae.autoencoder import AutoencoderConfig, AutoencoderKL
from tfjax.vae.io import LoadedVAE


def job_config(pattern, **data):
  c = default_config()
  c.data.image_size = 32
  c.data.image_text_source = f"webdataset:{pattern}"
  c.data.latents_batch_size = 4   # 3 batches per whole input shard of 12
  c.data.validation_percent = 20
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def tiny_vae():
  """A random AutoencoderKL, 32x32x3 -> 4x4x4 (the values do not matter here)."""
  arch = AutoencoderConfig(channels=(4, 4, 4, 4), blocks_per_level=1, latent_channels=4,
                           norm_groups=2, mid_attention=False)
  module = AutoencoderKL(arch)
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  return LoadedVAE(module, params, 0.5, 0.1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("wds"))
  return example_shards.write_webdataset(d, num_shards=5, per_shard=12, size=40)


@pytest.fixture(scope="module")
def vae():
  return tiny_vae()


def read_cache(out):
  """{key: (split, caption, latents)} over the cache's shards; fails on a duplicate."""
  meta = latents.read_metadata(out)
  seen = {}
  for split, entry in meta["splits"].items():
    for shard in entry["shards"]:
      reader = array_record_module.ArrayRecordReader(os.path.join(out, shard))
      for raw in reader.read_all():
        rec = latents.decode_record(raw)
        assert rec["id"] not in seen, f"duplicate record {rec['id']}"
        seen[rec["id"]] = (split, rec["caption"], rec["latents"])
      reader.close()
  return meta, seen


def two_processes(config, vae, out, **kw):
  """Process 0 then 1 of 2, each on its own half of the 8 devices."""
  devs = jax.devices()
  assert len(devs) == 8
  r0 = latent_job.run_latent_job(config, vae, out, process_index=0, process_count=2,
                                 devices=devs[:4], progress=False, **kw)
  r1 = latent_job.run_latent_job(config, vae, out, process_index=1, process_count=2,
                                 devices=devs[4:], progress=False, **kw)
  return r0, r1


@pytest.fixture(scope="module")
def reference(shards, vae, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ref"))
  c = job_config(os.path.join(os.path.dirname(shards["paths"][0]), "*.tar"))
  r0, r1 = two_processes(c, vae, out)
  return out, r0, r1


def test_two_processes_write_every_record_once(shards, reference):
  out, r0, r1 = reference
  assert not r0["complete"] and r1["complete"]       # the last one to finish writes metadata
  assert r0["shards_this_process"] == 3 and r1["shards_this_process"] == 2  # inputs 0,2,4 / 1,3
  meta, recs = read_cache(out)
  assert sorted(recs) == sorted(shards["good"])
  assert meta["dtype"] == "bfloat16" and meta["latent_shape"] == [4, 4, 4]
  assert (meta["scale"], meta["shift"]) == (0.5, 0.1)
  split, caption, z = recs[shards["good"][0]]
  assert z.dtype == ml_dtypes.bfloat16 and caption
  assert {s for s, _, _ in recs.values()} == {"train", "validation"}
  # Every planted bad record is skipped, counted by reason and named in skips.jsonl.
  with open(os.path.join(out, shard_writer.SKIPS_FILE)) as f:
    skips = {r["key"]: r["reason"] for r in map(json.loads, f)}
  assert skips == shards["bad"]
  total = {}
  for e in meta["splits"].values():
    for reason, n in e["skip_counts"].items():
      total[reason] = total.get(reason, 0) + n
  assert total == meta["skip_counts"] and sum(total.values()) == len(shards["bad"])
  # The bad records are in inputs 0 and 4 (truncated), both process 0's.
  assert r0["skipped"] == total and r1["skipped"] == {}


def test_latents_are_the_vaes_in_bfloat16(shards, reference, vae):
  out, _, _ = reference
  _, recs = read_cache(out)
  from tfjax.data import prepare, streams
  key = shards["good"][5]
  shard, _ = key.split("/")
  rec = next(r for r in streams.iter_webdataset(os.path.join(
      os.path.dirname(shards["paths"][0]), shard)) if r.key == key)
  img = prepare.prepare_image(rec.value["image"], prepare.ImagePolicy.from_config(
      job_config("unused")))
  want = np.asarray(vae.encode(img[None].astype(np.float32) / 127.5 - 1.0))[0]
  got = recs[key][2].astype(np.float32)
  np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)  # bfloat16 storage


class Killed(Exception):
  pass


def test_killed_mid_shard_resumes_without_duplicates(shards, reference, vae, tmp_path):
  out = str(tmp_path / "cache")
  c = job_config(os.path.join(os.path.dirname(shards["paths"][0]), "*.tar"))
  calls = []

  def kill_in_second_shard(index, batch):
    calls.append((index, batch))
    if (index, batch) == (2, 3):  # input 2's first batch is written by now
      raise Killed

  with pytest.raises(Killed):
    latent_job.run_latent_job(c, vae, out, process_index=0, process_count=2,
                              devices=jax.devices()[:4], progress=False,
                              on_batch=kill_in_second_shard)
  assert os.path.exists(shard_writer.done_path(out, 0))
  assert not os.path.exists(shard_writer.done_path(out, 2))
  assert glob.glob(os.path.join(out, "*.tmp"))          # input 2's half-written files
  with pytest.raises(FileNotFoundError):                 # not usable: no metadata yet
    latents.read_metadata(out)
  r0, r1 = two_processes(c, vae, out)
  assert r0["shards_already_done"] == 1 and r0["shards_done_now"] == 2 and r1["complete"]
  assert not glob.glob(os.path.join(out, "*.tmp"))
  _, recs = read_cache(out)
  _, ref = read_cache(reference[0])
  assert sorted(recs) == sorted(ref)
  for k in ref:
    np.testing.assert_array_equal(recs[k][2], ref[k][2])

  # Killed after a shard's files were renamed but before its marker: redone, not doubled.
  os.remove(shard_writer.done_path(out, 3))
  os.remove(os.path.join(out, latents.METADATA_FILE))
  r1 = latent_job.run_latent_job(c, vae, out, process_index=1, process_count=2,
                                 devices=jax.devices()[4:], progress=False)
  assert r1["shards_done_now"] == 1 and r1["complete"]
  assert sorted(read_cache(out)[1]) == sorted(ref)


def test_settings_mismatch_and_float32(shards, vae, tmp_path):
  pattern = os.path.join(os.path.dirname(shards["paths"][0]), "*.tar")
  out = str(tmp_path / "f32")
  c = job_config(pattern, latents_dtype="float32")
  latent_job.run_latent_job(c, latents.PixelPatchEncoder(8, 4), out, process_index=0,
                            process_count=1, devices=jax.devices()[:1], progress=False)
  meta, recs = read_cache(out)
  assert meta["dtype"] == "float32" and next(iter(recs.values()))[2].dtype == np.float32
  with pytest.raises(ValueError, match="dtype"):
    latent_job.run_latent_job(job_config(pattern), latents.PixelPatchEncoder(8, 4), out,
                              process_index=0, process_count=1, progress=False)
  with pytest.raises(FileNotFoundError, match="data.image_text_source"):
    latent_job.run_latent_job(job_config(str(tmp_path / "none/*.tar")), vae, out,
                              process_index=0, process_count=1, progress=False)


def test_main_job_stages_data_and_latents(tmp_path):
  """tfjax-train's data and latents stages on a stream source, and the held-out
  records the samples stage draws from it."""
  from tfjax.jobs import runner, samples, transfusion
  from tfjax.vae import io
  shards = example_shards.write_all(str(tmp_path / "shards"), shards=2, per_shard=12, size=40)
  vae = tiny_vae()
  vae_dir = io.save(str(tmp_path / "vae"), {"kind": "kl", "architecture": vae.config.to_json(),
                                            "scale": 0.5, "shift": 0.1}, vae.params)
  c = job_config(str(tmp_path / "shards" / "wds" / "*.tar"), vocab_size=320)
  c.data.text_source = f"jsonl:{tmp_path}/shards/jsonl/*.jsonl"
  c.model.update(latent_size=4, latent_channels=4, patch_size=2, vocab_size=320)
  c.vae.update(path=vae_dir, channels=(4, 4, 4, 4), latent_channels=4, norm_groups=2)
  transfusion.run(c, str(tmp_path / "run"), stages=("data", "vae", "latents"))
  data = tmp_path / "run" / "data"
  meta = latents.read_metadata(str(data / "latents"))
  n = sum(e["num_records"] for e in meta["splits"].values())
  assert n == len(shards["webdataset"]["good"]) and meta["scale"] == 0.5
  assert (data / "text" / "metadata.json").exists() and (data / "tokenizer").exists()
  # Each stage's CPU seconds beside its wall seconds (where a shared machine's minutes go).
  cpu = json.loads((tmp_path / "run" / runner.CPU_SECONDS_FILE).read_text())
  assert set(cpu) == {"data", "vae", "latents"} and cpu["latents"] > 0  # data can round to 0.0
  c.data.dir = str(data)
  held = samples.held_out(c, 3)
  assert len(held) == 3 and held[0]["image"].shape == (32, 32, 3) and held[0]["caption"]


def test_cli_job_killed_by_sigkill_resumes(tmp_path):
  """`tfjax-data latents` killed (SIGKILL) after its third shard, then rerun."""
  import signal
  import subprocess
  import sys
  import time
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  shards = example_shards.write_webdataset(str(tmp_path / "wds"), num_shards=24, per_shard=16,
                                           size=64, bad=False)
  out = tmp_path / "latents"
  cmd = [sys.executable, "-m", "tfjax.cli.data", "latents", "--pixel_patch", "--noprogress",
         "--config=" + os.path.join(root, "configs", "tiny.py"), f"--data_dir={tmp_path}",
         f"--config.data.image_text_source=webdataset:{tmp_path}/wds/*.tar",
         f"--config.data.latents={out}", "--config.data.latents_batch_size=1",
         "--config.data.prepare_threads=1", "--process_index=0", "--process_count=1"]
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while not os.path.exists(shard_writer.done_path(str(out), 2)) and proc.poll() is None:
    assert time.time() < deadline, "the job made no progress"
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len(glob.glob(os.path.join(out, shard_writer.DONE_DIR, "*.json")))
  assert 3 <= done < 24 and not (out / latents.METADATA_FILE).exists()
  rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  report = json.loads(rerun.stdout)
  assert report["complete"] and report["shards_already_done"] == done
  _, recs = read_cache(str(out))
  assert sorted(recs) == sorted(shards["good"])


def test_parquet_source_through_the_job(tmp_path):
  exp = example_shards.write_parquet(str(tmp_path / "pq"), num_files=2, per_file=10, size=40)
  c = job_config("unused", image_text_source=f"parquet:{tmp_path}/pq/*.parquet")
  out = str(tmp_path / "cache")
  report = latent_job.run_latent_job(c, latents.PixelPatchEncoder(8, 4), out, process_index=0,
                                     process_count=1, devices=jax.devices()[:2], progress=False)
  assert report["complete"] and report["skipped"] == {
      r: list(exp["bad"].values()).count(r) for r in set(exp["bad"].values())}
  assert sorted(read_cache(out)[1]) == sorted(exp["good"])


def test_mesh_encoder_is_an_encoder_over_every_device(vae):
  """build_latent_cache's (random-access sources) encoder on 8 devices: same latents."""
  enc = latent_job.MeshEncoder(tiny_vae(), jax.devices(), 8)
  x = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
  got = enc.encode(x)
  assert got.shape == (5, 4, 4, 4) and (enc.scale, enc.shift) == (0.5, 0.1)
  np.testing.assert_allclose(got, np.asarray(vae.encode(x)), rtol=1e-4, atol=1e-4)
  assert repr(enc) == repr(vae)
