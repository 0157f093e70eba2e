"""Fine-tune a tiny shapes Transfusion model for image editing (issue 10).

The model is configs/tiny.py's; training starts from its export or workdir
(train.init_from) and runs a short schedule of its own on the shapes editing
set (tfjax/data/editing.py), alone or mixed with pretraining documents:

  tfjax-train --config=configs/tiny.py --workdir=/tmp/tfjax_tiny --config.data.max_objects=2
  tfjax-export --workdir=/tmp/tfjax_tiny --out=/tmp/tfjax_tiny_export --dtype=float32
  tfjax-edit-data --config=configs/edit_tiny.py \
      --config.data.dir=/tmp/tfjax_tiny/data --config.vae.path=/tmp/tfjax_tiny/vae
  tfjax-train --config=configs/edit_tiny.py --workdir=/tmp/tfjax_edit --stages=train \
      --config.train.init_from=/tmp/tfjax_tiny_export \
      --config.data.dir=/tmp/tfjax_tiny/data --config.vae.path=/tmp/tfjax_tiny/vae
  tfjax-eval --model=/tmp/tfjax_edit --suite=editing --json=/tmp/tfjax_edit/editing.json

data.dir must hold the pretraining tokenizer (and, for a mixed run, its
latent cache); vae.path the VAE the model was pretrained with.
"""
from configs import tiny  # the model is tiny.py's


def get_config():
  c = tiny.get_config()
  c.name = "edit_tiny"

  e = c.editing
  e.source = "shapes"         # or folder:PATH for your own pairs + JSONL
  e.num_train = 8000          # the paper's 8k editing examples
  e.num_eval = 200
  e.pretrain_fraction = 0.0   # >0 mixes in pretraining documents (needs their caches)
  # Edit scenes: one or two large objects (an add needs a one-object source, a
  # remove a two-object one), the sizes tiny.py pretrains on. Pretrain the
  # model you fine-tune with --config.data.max_objects=2 so that two-object
  # scenes are not new to it (benchmarks/SCIENCE.md, Editing).
  e.max_objects = 2
  e.object_sizes = c.data.object_sizes

  # An example is 2 images (2 x 18 positions) + an instruction (~8 tokens)
  # + BOS/EOS, about 46 positions: two examples per 128-position row.
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.data.max_images_per_seq = 4

  t = c.train
  t.init_from = ""            # REQUIRED: an export or training workdir of configs/tiny.py
  t.num_steps = 500           # 500 x 16 rows x 2 examples: 2 passes over 8k examples
  t.learning_rate = 3e-4      # lower than pretraining's 1e-3: keep what was learnt
  t.end_learning_rate = 3e-5
  t.warmup_steps = 20
  t.log_every = 25
  t.eval_every = 250
  t.eval_batches = 2
  t.checkpoint_every = 250
  return c
