"""tfjax-generate: text and images from a trained model (workdir or export).

  tfjax-generate --model=DIR --prompt="a red circle above a blue square" \
      [--image=PATH ...] [--num_images=4] [--seed=0] --out=OUT

Without --image the prompt is drawn (text-to-image); with --image the images
come first and the model writes text after them (image-to-text), unless
--mode says otherwise ("auto" lets the model switch between text and images
itself). A literal "<image>" in the prompt places the next --image there.
--strength < 1 starts the drawn image from --init_image (default: the last
--image), as diffusers' image-to-image does; an editing model keeps more of
its input that way. --image_cfg_scale > 0 guides on the input images and on
the text apart (InstructPix2Pix), for a model fine-tuned with
editing.instruction_dropout.
Writes OUT/sample{i}_image{j}.png and OUT/generation.json (prompt, generated
text, image files, sampler settings).
"""
from __future__ import annotations

import json
import logging
import os

from absl import flags

from tfjax.cli.common import quiet_orbax, run

_MODEL = flags.DEFINE_string("model", None, "Training workdir or export directory.")
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt text.")
_IMAGE = flags.DEFINE_multi_string("image", [], "Input image file(s) (PNG/JPEG), repeatable.")
_NUM = flags.DEFINE_integer("num_images", 1, "Samples to draw for the prompt (a batch).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; same seed and prompt, same outputs.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_MODE = flags.DEFINE_enum("mode", "", ["", "auto", "image", "text"],
                          "image: draw after the prompt; text: write text; auto: the model "
                          "chooses; default: image without --image, text with it.")
_STEPS = flags.DEFINE_integer("steps", None, "Denoising steps (default: diffusion.sample_steps).")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddpm", "ddim"],
                             "Diffusion sampler (default: diffusion.sampler).")
_CFG = flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale; <= 0 turns it "
                          "off (default: diffusion.cfg_scale).")
_STRENGTH = flags.DEFINE_float("strength", None,
                               "Image-to-image (SDEdit): below 1 the drawn image starts from "
                               "--init_image (or the last --image) noised to this fraction of "
                               "the schedule and runs only that part; 1 = from pure noise "
                               "(default: diffusion.strength).")
_IMAGE_CFG = flags.DEFINE_float("image_cfg_scale", None,
                                "Guidance on the prompt's images apart from its text "
                                "(InstructPix2Pix's image guidance; --cfg_scale then guides on "
                                "the text): > 0 needs --mode=image and a model fine-tuned with "
                                "editing.instruction_dropout; 0 = off, one scale for the whole "
                                "prompt (default: diffusion.image_cfg_scale).")
_INIT_IMAGE = flags.DEFINE_string("init_image", None, "Image file the drawn image starts from "
                                  "when --strength < 1 (default: the last --image).")
_TEMPERATURE = flags.DEFINE_float("temperature", None,
                                  "Text sampling temperature, 0 = greedy (default: sample.temperature).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k filter, 0 = off (default: sample.top_k).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus filter, 1 = off (default: sample.top_p).")
_MAX_TOKENS = flags.DEFINE_integer("max_text_tokens", None,
                                   "Tokens per text stretch (default: sample.max_text_tokens).")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 1, "Images per sample at most (mode auto).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Samples generated together.")
_CACHE = flags.DEFINE_bool("prefix_cache", True, "Reuse the prefix's keys/values while denoising.")
_LONG = flags.DEFINE_enum("long_prompt", "error", ["error", "truncate"],
                          "A prompt longer than the model's trained sequence length "
                          "(data.seq_len): refuse it, or cut its text to fit with a warning.")


def _main(argv) -> None:
  del argv
  if not _MODEL.value or not _OUT.value:
    raise SystemExit("--model and --out are required")
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.generate.files import generate_to_dir
  quiet_orbax(logging.ERROR)
  record = generate_to_dir(_MODEL.value, _PROMPT.value, _IMAGE.value, _NUM.value, _SEED.value,
                    _OUT.value, _MODE.value, steps=_STEPS.value, sampler=_SAMPLER.value,
                    cfg_scale=_CFG.value, strength=_STRENGTH.value,
                    image_cfg_scale=_IMAGE_CFG.value,
                    init_image=_INIT_IMAGE.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                    top_p=_TOP_P.value, max_text_tokens=_MAX_TOKENS.value,
                    max_images=_MAX_IMAGES.value, batch_size=_BATCH.value,
                    prefix_cache=_CACHE.value, long_prompt=_LONG.value)
  for s in record["samples"]:
    print(json.dumps({"index": s["index"], "text": s["text"], "images": s["images"]}))
  print(f"wrote {os.path.join(_OUT.value, 'generation.json')}")


def main() -> None:
  run(_main, __name__)


if __name__ == "__main__":
  main()
