"""tfjax.paths: what a workdir stores is relative to it; data elsewhere is absolute."""
import os

from configs.tiny import get_config
from tfjax.paths import Paths


def test_command_line_rules_and_portable_copy(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  wd = str(tmp_path / "runs" / "a")
  c = get_config()
  c.data.dir = "data"                       # relative to the workdir
  c.vae.path = "vaes/kl"                    # typed in a shell: relative to the current dir
  c.data.tokenizer = "/shared/llama.model"  # elsewhere, absolute
  p = Paths.from_command_line(c, wd)
  assert p.data == os.path.join(wd, "data") and p.latents == os.path.join(wd, "data", "latents")
  assert p.vae == str(tmp_path / "vaes" / "kl") and p.tokenizer == "/shared/llama.model"
  assert p.resolved_config().data.dir == p.data
  assert c.data.dir == "data"  # the user's config is not written to
  stored = p.portable_config()
  assert stored.data.dir == "data" and stored.data.latents == ""
  assert stored.vae.path == str(tmp_path / "vaes" / "kl")  # outside: stays absolute
  assert stored.data.tokenizer == "/shared/llama.model"
  # Read back from a moved workdir, relative paths follow it.
  moved = Paths.of(stored, str(tmp_path / "elsewhere"))
  assert moved.data == str(tmp_path / "elsewhere" / "data")
  assert moved.vae == str(tmp_path / "vaes" / "kl")
  # A VAE inside the workdir is stored relative, so a copy uses its own.
  c.vae.path = os.path.join(wd, "vae")
  assert Paths.from_command_line(c, wd).portable_config().vae.path == "vae"
