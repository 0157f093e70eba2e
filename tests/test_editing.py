"""Image editing: the shapes editing set, folder format, layout, checker, fine-tuning."""
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from tfjax.batch import Batch
from tfjax.config import BOI_ID, BOS_ID, EOI_ID, EOS_ID, default_config, validate
from tfjax.data import build, editing, editing_pipeline, latents, pipeline, shapes
from tfjax.eval import editing as edit_eval
from tfjax.ops.mask import transfusion_mask

P = 4  # patches per image: latent 4x4, patch 2


def tiny_config(root):
  c = default_config()
  d = c.data
  d.dir = root
  d.text_source, d.image_text_source = "shapes_text", "none"
  d.image_size, d.num_text_docs, d.vocab_size = 32, 300, 400
  d.seq_len, d.batch_size, d.max_images_per_seq = 64, 2, 4
  e = c.editing
  e.source, e.num_train, e.num_eval = "shapes", 24, 8
  m = c.model
  m.vocab_size = 400
  m.dim, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 1, 2, 2, 64
  m.latent_size, m.latent_channels, m.patch_size = 4, 4, 2
  c.vae.latent_channels = 4
  m.dtype, m.attention_impl, m.remat_policy, m.time_embed_dim = "float32", "xla", "none", 16
  t = c.train
  t.num_steps, t.warmup_steps, t.log_every, t.eval_every, t.checkpoint_every = 2, 0, 1, 0, 0
  t.learning_rate, t.end_learning_rate, t.weight_decay = 1e-3, 1e-3, 0.0
  c.mesh.data = 1
  return validate(c)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A text corpus + tokenizer (the 'pretraining' data) and the editing cache."""
  root = str(tmp_path_factory.mktemp("edit_data"))
  c = tiny_config(root)
  build.build_all(c, root)
  report = editing_pipeline.build_editing_latents(
      c, root, latents.PixelPatchEncoder(downsample=8, channels=4))
  assert {k: v["num_records"] for k, v in report.items()} == {
      "train": 24, "validation": 8, "test": 8}
  return root


# ------------------------------------------------------------------ the set --
def test_edits_change_one_thing_and_splits_share_no_scene():
  train = editing.generate_split("train", 80, 32, with_images=False)
  test = editing.generate_split("test", 24, 32, with_images=False)
  assert [ex["meta"]["edit"]["type"] for ex in train[:8]] == list(editing.EDIT_TYPES) * 2
  for ex in train + test:
    src, tgt, edit = ex["meta"]["source_scene"], ex["meta"]["target_scene"], ex["meta"]["edit"]
    n_src, n_tgt = len(src["objects"]), len(tgt["objects"])
    assert n_tgt == n_src + {"add": 1, "remove": -1}.get(edit["type"], 0)
    for i, o in enumerate(tgt["objects"]):  # still a valid, drawable scene
      assert editing._fits(o, tgt["objects"][:i] + tgt["objects"][i + 1:])
    if edit["type"] in ("recolor", "move"):
      changed = [i for i in range(n_src) if src["objects"][i] != tgt["objects"][i]]
      assert changed == [edit["object"]]
      assert ex["instruction"].startswith("make " if edit["type"] == "recolor" else "move ")
  keys = lambda exs: {shapes.canonical(ex["meta"][k]) for ex in exs
                      for k in ("source_scene", "target_scene")}
  assert not keys(train) & keys(test)
  assert all(shapes.split_of(ex["meta"]["source_scene"]) == "test" for ex in test)
  again = editing.generate_split("train", 8, 32, with_images=False)
  assert [e["instruction"] for e in again] == [e["instruction"] for e in train[:8]]


def test_edit_scenes_stay_within_scene_options():
  options = shapes.SceneOptions(max_objects=2, sizes=("large",))
  exs = editing.generate_split("train", 40, 32, with_images=False, options=options)
  assert [ex["meta"]["edit"]["type"] for ex in exs[:4]] == list(editing.EDIT_TYPES)
  for ex in exs:
    for key in ("source_scene", "target_scene"):
      objs = ex["meta"][key]["objects"]
      assert 1 <= len(objs) <= 2 and {o["size"] for o in objs} == {"large"}


def test_checker_scores_ground_truth_pairs():
  examples = editing.generate_split("test", 120, 64)
  metas = [ex["meta"] for ex in examples]
  truth = edit_eval.accuracy([ex["output"] for ex in examples], metas)
  assert truth["accuracy"] >= 0.99, truth
  assert set(truth["per_type"]) == set(editing.EDIT_TYPES)
  assert all(r["correct"] >= 0.99 for r in truth["per_type"].values()), truth["per_type"]
  # Returning the input unchanged edits nothing.
  identity = edit_eval.accuracy([ex["input"] for ex in examples], metas)
  assert identity["per_category"]["edited"] == 0.0
  # A blank image has none of the objects that should stay.
  blank = np.full_like(examples[0]["output"], 245)
  assert not edit_eval.check(blank, metas[0])["unchanged"]
  err = edit_eval.pixel_error(np.stack([ex["output"] for ex in examples]), examples)
  assert err["all"] == 0.0 and err["copy_input"] > 0


# ------------------------------------------------------------ folder format --
def test_folder_format_round_trip_and_bad_lines(tmp_path):
  root = str(tmp_path)
  examples = editing.generate_split("validation", 3, 32)
  editing.write_folder(examples, root, "train")
  src = editing.FolderSource(root, "train")
  assert len(src) == 3
  rec = src[1]
  assert rec["instruction"] == examples[1]["instruction"]
  np.testing.assert_array_equal(latents.decode_image(rec["output"]), examples[1]["output"])
  assert json.loads(rec["meta"]) == examples[1]["meta"]
  with open(os.path.join(root, "train.jsonl"), "a") as f:
    f.write(json.dumps({"input": "images/x.png", "instruction": "make it red"}) + "\n")
  with pytest.raises(ValueError, match=r"train.jsonl:4: missing keys \['output'\]"):
    editing.FolderSource(root, "train")
  with open(os.path.join(root, "validation.jsonl"), "w") as f:
    f.write(json.dumps({"input": "images/none.png", "output": "images/none.png",
                        "instruction": "add a red circle"}) + "\n")
  with pytest.raises(FileNotFoundError, match=r"validation.jsonl:1: input image"):
    editing.FolderSource(root, "validation")


# ------------------------------------------------------------------- layout --
@pytest.fixture(scope="module")
def edit_batch(built):
  c = tiny_config(built)
  it = pipeline.make_train_iterator(c, built, process_index=0, process_count=1)
  return next(it)


def test_layout_clean_input_then_diffused_output(edit_batch):
  b = edit_batch
  docs = 0
  for r in range(b["tokens"].shape[0]):
    n = int(b["image_valid"][r].sum())
    assert n % 2 == 0 and n > 0
    # Slots alternate input (clean) / output (diffused) in reading order.
    np.testing.assert_array_equal(b["image_clean"][r, :n], np.arange(n) % 2 == 0)
    for s in range(0, n, 2):
      docs += 1
      i0, o0 = b["image_starts"][r, s], b["image_starts"][r, s + 1]
      seg = b["segment_ids"][r, i0]
      start = np.argmax(b["segment_ids"][r] == seg)
      end = start + int((b["segment_ids"][r] == seg).sum())
      toks = b["tokens"][r, start:end]
      assert toks[0] == BOS_ID and toks[1] == BOI_ID and i0 == start + 2
      assert toks[2 + P] == EOI_ID and toks[-1] == EOS_ID
      assert toks[o0 - start - 1] == BOI_ID and toks[o0 - start + P] == EOI_ID
      instruction = toks[3 + P:o0 - start - 1]
      assert len(instruction) > 0 and (instruction > EOI_ID).all()
      # The instruction is a text target; nothing predicts the patches.
      assert b["text_loss_mask"][r, start + 2 + P:o0 - 2].all()
      assert not b["text_loss_mask"][r, i0 - 1:i0 + P - 1].any()
  assert docs == b["image_clean"].sum()


def test_masks_input_bidirectional_output_sees_input_and_instruction(edit_batch):
  b = edit_batch
  mask = np.asarray(transfusion_mask(jnp.asarray(b["segment_ids"]), jnp.asarray(b["image_ids"])))
  r = 0
  i0, o0 = int(b["image_starts"][r, 0]), int(b["image_starts"][r, 1])
  inp, out = np.arange(i0, i0 + P), np.arange(o0, o0 + P)
  instr = np.arange(i0 + P + 1, o0 - 1)
  assert mask[r][np.ix_(inp, inp)].all()            # input patches: bidirectional
  assert not mask[r][np.ix_(inp, instr)].any()      # ... and blind to what follows
  assert not mask[r][np.ix_(inp, out)].any()
  assert mask[r][np.ix_(out, out)].all()            # output patches: bidirectional
  assert mask[r][np.ix_(out, inp)].all()            # output sees the input image
  assert mask[r][np.ix_(out, instr)].all()          # ... and the instruction
  assert mask[r][np.ix_(instr, inp)].all()          # instruction sees the input
  assert not mask[r][np.ix_(instr, out)].any()


def test_no_diffusion_loss_or_noise_on_the_input_image(built, edit_batch):
  from tfjax import losses
  from tfjax.model import Transfusion, init_params
  c = tiny_config(built)
  batch = Batch.from_dict(jax.tree_util.tree_map(jnp.asarray, edit_batch))
  noisy, t, _ = losses.noise_images(jax.random.key(0), batch, c)
  clean = np.asarray(batch.image_clean)
  np.testing.assert_array_equal(np.asarray(noisy)[clean], np.asarray(batch.image_latents)[clean])
  assert (np.asarray(t)[clean] == 0).all()
  assert not np.allclose(np.asarray(noisy)[~clean & np.asarray(batch.image_valid)],
                         np.asarray(batch.image_latents)[~clean & np.asarray(batch.image_valid)])
  model = Transfusion(c.model)
  params = init_params(c.model, jax.random.key(1))
  loss = jax.jit(lambda p, bt: losses.transfusion_loss(p, bt, jax.random.key(2), model=model,
                                                       config=c)[1])
  m = loss(params, batch)
  assert float(m["num_images"]) == clean.sum()      # outputs only
  # The input image's latents matter only as the condition: the diffusion
  # loss still moves when they change (the output attends to them), but it
  # is never their reconstruction that is scored.
  as_noised = batch.replace(image_clean=jnp.zeros_like(batch.image_clean))
  assert float(loss(params, as_noised)["num_images"]) == 2 * clean.sum()


def test_mixed_with_pretraining_documents(built):
  c = tiny_config(built)
  c.editing.pretrain_fraction = 0.5
  it = pipeline.make_train_iterator(c, built, process_index=0, process_count=1)
  batches = [next(it) for _ in range(3)]
  state = it.get_state()
  want = next(it)
  has_text_only = any(len(set(b["segment_ids"][r][b["segment_ids"][r] > 0]))
                      > int(b["image_valid"][r].sum()) // 2
                      for b in batches for r in range(b["tokens"].shape[0]))
  assert has_text_only and any(b["image_clean"].any() for b in batches)
  it2 = pipeline.make_train_iterator(c, built, process_index=0, process_count=1)
  it2.set_state(state)
  got = next(it2)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _instruction_lengths(batches) -> list[int]:
  """Tokens between each editing document's input EOI and output BOI."""
  out = []
  for b in batches:
    for r in range(b["tokens"].shape[0]):
      n = int(b["image_valid"][r].sum())
      for s in range(0, n, 2):
        i0, o0 = int(b["image_starts"][r, s]), int(b["image_starts"][r, s + 1])
        out.append(o0 - 1 - (i0 + P + 1))
  return out


def test_instruction_dropout_in_training_only(built):
  """editing.instruction_dropout: that share of training documents lose their
  instruction (BOS BOI in EOI BOI out EOI EOS), the same ones on every run;
  evaluation documents keep theirs."""
  c = tiny_config(built)
  c.editing.instruction_dropout = 0.5
  take = lambda: [next(it) for it in [pipeline.make_train_iterator(
      c, built, process_index=0, process_count=1)] for _ in range(8)]
  first, again = take(), take()
  lengths = _instruction_lengths(first)
  dropped = sum(n == 0 for n in lengths)
  assert 0.2 * len(lengths) < dropped < 0.8 * len(lengths), lengths
  assert _instruction_lengths(again) == lengths
  for b in first:
    for r in range(b["tokens"].shape[0]):  # the output still follows BOI right after EOI
      for s in range(1, int(b["image_valid"][r].sum()), 2):
        assert b["tokens"][r, b["image_starts"][r, s] - 1] == BOI_ID
  evals = list(pipeline.make_eval_iterator(c, built, process_index=0, process_count=1))
  assert min(_instruction_lengths(evals)) > 0
  c.editing.instruction_dropout = 0.0
  assert min(_instruction_lengths(take())) > 0


def test_config_errors_name_the_key(built):
  c = tiny_config(built)
  c.data.max_images_per_seq = 1
  with pytest.raises(ValueError, match="data.max_images_per_seq"):
    pipeline.make_train_iterator(c, built, process_index=0, process_count=1)
  c = tiny_config(built)
  c.editing.latents = os.path.join(built, "nowhere")
  with pytest.raises(FileNotFoundError, match="editing.latents"):
    pipeline.make_train_iterator(c, built, process_index=0, process_count=1)


# -------------------------------------------------------------- fine-tuning --
def _digest(root):
  h = hashlib.sha256()
  for d, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      h.update(f.encode())
      with open(os.path.join(d, f), "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def finetuned(built, tmp_path_factory):
  """A 'pretrained' run (seed 7, saved at step 0), its export, and a fine-tune from it."""
  from tfjax import export as export_lib
  from tfjax.train.loop import train
  tmp = tmp_path_factory.mktemp("finetune")
  pre = tiny_config(built)
  pre.editing.source = "none"
  pre.train.seed, pre.train.num_steps, pre.train.synthetic_data = 7, 0, True
  pre_dir, exp_dir, ft_dir = (str(tmp / n) for n in ("pre", "export", "ft"))
  one = jax.devices()[:1]
  train(pre, pre_dir, devices=one)
  export_lib.export(pre_dir, exp_dir, dtype="float32")
  before = _digest(exp_dir), _digest(os.path.join(pre_dir, "checkpoints"))
  ft = tiny_config(built)
  ft.train.init_from = exp_dir
  ft.train.ema_decay = 0.9
  result = train(ft, ft_dir, devices=one)
  return dict(config=ft, result=result, pre_dir=pre_dir, exp_dir=exp_dir, ft_dir=ft_dir,
              before=before, tmp=tmp, devices=one)


def test_finetune_starts_from_export_and_changes_only_what_it_should(finetuned):
  from tfjax import checkpoints
  from tfjax.model import init_params
  ft, result, exp_dir = finetuned["config"], finetuned["result"], finetuned["exp_dir"]
  assert result.step == ft.train.num_steps == int(result.state.step)  # its own schedule
  exported = checkpoints.unflatten(
      safetensors.numpy.load_file(os.path.join(exp_dir, checkpoints.EXPORT_PARAMS)))
  tuned = jax.device_get(result.state.params)
  fresh = jax.device_get(init_params(ft.model, jax.random.split(jax.random.key(0))[0]))
  # Adam moves each weight by at most ~learning_rate per step: the tuned
  # weights lie that close to the export, and not to a fresh init.
  bound = 2.5 * ft.train.learning_rate * ft.train.num_steps
  flat = jax.tree_util.tree_leaves
  from_export = max(float(np.max(np.abs(a - b))) for a, b in zip(flat(tuned), flat(exported)))
  from_fresh = max(float(np.max(np.abs(a - b))) for a, b in zip(flat(tuned), flat(fresh)))
  assert 0 < from_export <= bound < from_fresh
  moved = sum(not np.array_equal(a, b) for a, b in zip(flat(tuned), flat(exported)))
  assert moved > len(flat(tuned)) // 2
  # The EMA started from the export too (not from the fresh init).
  ema = jax.device_get(result.state.ema)
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(flat(ema), flat(exported))) <= bound
  # The export and the pretraining run are left as they were.
  assert (_digest(exp_dir),
          _digest(os.path.join(finetuned["pre_dir"], "checkpoints"))) == finetuned["before"]
  # An export of another architecture is refused, naming the key.
  import flax.linen as nn
  from tfjax.model import abstract_params
  wrong = tiny_config(ft.data.dir)
  wrong.model.mlp_dim = 96
  with pytest.raises(ValueError, match="train.init_from.*mlp"):
    checkpoints.load_export_params(exp_dir, nn.unbox(abstract_params(wrong.model)))


def test_edit_generation_and_suite(finetuned):
  """The input image and instruction in, one image out, scored per edit type."""
  from tfjax.data.tokenizer import Tokenizer
  from tfjax.generate.diffusion import DiffusionParams
  from tfjax.generate.mixed import Generator
  c = finetuned["config"]
  tok = Tokenizer.load(os.path.join(c.data.dir, "tokenizer"))
  gen = Generator(c, finetuned["result"].state.params, tok,
                  latents.PixelPatchEncoder(downsample=8, channels=4))
  examples = edit_eval.suite_examples(c, 4, split="validation")
  dp = DiffusionParams(num_steps=2, sampler="ddim", cfg_scale=2.0)
  res = edit_eval.evaluate(gen, examples, jax.random.key(0), diffusion_params=dp)
  assert res["images"].shape == (4, 32, 32, 3) and res["num_examples"] == 4
  assert set(res["per_type"]) == set(editing.EDIT_TYPES)
  assert 0 <= res["pixel_error"]["all"] <= 1 and res["pixel_error"]["copy_input"] > 0
