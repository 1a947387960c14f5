"""Tiny Stable Diffusion folders in diffusers' layout with random weights: the references the
parity tests and benchmarks/sd_convert_sample.py compare against (hub downloads do not work
offline). Needs the parity extra (torch, diffusers, transformers), imported when called."""
import json
import os

WORDS = ("a", "photo", "of", "the", "cat", "dog", "and", "red", "blue", "car")
PROMPTS = ["a photo of the red cat", "blue car and the dog"]


def write_tokenizer(folder):
  """A small byte-level BPE vocabulary in CLIP's format: single characters (inner and
  word-final '</w>' forms), merges that build WORDS, and the two special tokens."""
  chars = sorted(set("".join(WORDS)) | set("!,."))
  vocab = [c for c in chars] + [c + "</w>" for c in chars]
  merges = []
  for word in WORDS:
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      merges.append(f"{parts[0]} {parts[1]}")
      parts = [parts[0] + parts[1]] + parts[2:]
      if parts[0] not in vocab:
        vocab.append(parts[0])
  merges = list(dict.fromkeys(merges))
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  import transformers  # pylint: disable=g-import-not-at-top
  tok = transformers.CLIPTokenizer(os.path.join(folder, "vocab.json"),
                                   os.path.join(folder, "merges.txt"),
                                   pad_token="<|endoftext|>", model_max_length=77)
  assert tok.convert_ids_to_tokens(tok("the cat").input_ids)[1:3] == ["the</w>", "cat</w>"]
  return tok


def save_sd_folder(folder, tok_dir, tok, text, unet, vae):
  """A StableDiffusionPipeline with SD 1.x's DDIM scheduler saved as a diffusers folder, the
  tokenizer as vocab.json + merges.txt (moved from `tok_dir`) as in SD's published folders.
  Returns (pipeline, folder)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
  pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                           scheduler=sched, safety_checker=None,
                                           feature_extractor=None,
                                           requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(folder, safe_serialization=True)
  # transformers 5 writes tokenizer.json; SD's folders hold vocab.json + merges.txt.
  out = os.path.join(folder, "tokenizer")
  os.remove(os.path.join(out, "tokenizer.json"))
  for name in ("vocab.json", "merges.txt"):
    os.replace(os.path.join(tok_dir, name), os.path.join(out, name))
  return pipe, folder
