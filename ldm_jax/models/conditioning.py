"""Text conditioning for the UNet's cross-attention: a word tokenizer and a transformer encoder.

As in the LDM paper's text-to-image model, the encoder is a small BERT-like transformer
trained jointly with the UNet (LDM's `BERTEmbedder`: token + learned position embeddings,
pre-LayerNorm blocks); its output [B, L, width] is the UNet's `context`, and the tokenizer's
mask is the UNet's `context_mask`. Class conditioning needs nothing here: the UNet embeds
labels itself (`UNet.num_classes`).

Null condition (classifier-free guidance): the null condition is the empty prompt
`NULL_PROMPT = ""`, which encodes to [BOS][EOS] followed by padding. Its context is whatever
the (trained) encoder makes of those two tokens, so it is learned with the model: drop a
caption to "" during training and encode "" for the unconditional branch when sampling.
"""
import collections
import json
import re
from typing import Any, Iterable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import UserError
from ldm_jax.models import layers

Dtype = Any

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
NULL_PROMPT = ""
_FORMAT = "ldm_jax.tokenizer"
_WORD = re.compile(r"[a-z0-9]+")


class Tokenizer:
  """Word-level tokenizer: lowercase, split on anything that is not [a-z0-9].

  Ids: [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, then the words, most frequent first (ties in
  alphabetical order). A sequence is [BOS] words [EOS] [PAD]...; words that do not fit in
  `max_length` are dropped (the [EOS] is always kept).
  """

  def __init__(self, vocab: Sequence[str]):
    vocab = list(vocab)
    if tuple(vocab[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
      raise UserError(f"tokenizer vocabulary must start with {SPECIAL_TOKENS}, got {vocab[:4]}")
    if len(set(vocab)) != len(vocab):
      raise UserError("tokenizer vocabulary has duplicate entries")
    self.vocab = vocab
    self._ids = {word: i for i, word in enumerate(vocab)}

  @staticmethod
  def words(text: str) -> list[str]:
    """The words of `text`: lowercase alphanumeric runs."""
    return _WORD.findall(text.lower())

  @classmethod
  def from_captions(cls, captions: Iterable[str], max_vocab: Optional[int] = None
                    ) -> "Tokenizer":
    """Builds the vocabulary of `captions`; `max_vocab` caps the total size (specials included)."""
    if max_vocab is not None and max_vocab < len(SPECIAL_TOKENS):
      raise UserError(f"max_vocab={max_vocab} is smaller than the {len(SPECIAL_TOKENS)} "
                      "special tokens")
    counts = collections.Counter(w for caption in captions for w in cls.words(caption))
    words = sorted(counts, key=lambda w: (-counts[w], w))
    if max_vocab is not None:
      words = words[:max_vocab - len(SPECIAL_TOKENS)]
    return cls(list(SPECIAL_TOKENS) + words)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Encodes a batch of texts: (ids int32 [B, max_length], mask bool [B, max_length]).

    The mask is True on [BOS], the words and [EOS], False on padding.
    """
    if isinstance(texts, str):
      raise UserError("Tokenizer.encode takes a list of strings, not a single string")
    if max_length < 2:
      raise UserError(f"max_length={max_length} leaves no room for [BOS] and [EOS]")
    ids = np.full((len(texts), max_length), PAD, np.int32)
    for row, text in enumerate(texts):
      tokens = [self._ids.get(w, UNK) for w in self.words(text)][:max_length - 2]
      seq = [BOS] + tokens + [EOS]
      ids[row, :len(seq)] = seq
    return ids, ids != PAD

  def decode(self, ids: Sequence[int]) -> str:
    """The words of one id sequence, joined by spaces ([BOS]/[PAD] skipped, stops at [EOS])."""
    out = []
    for i in np.asarray(ids).tolist():
      if i == EOS:
        break
      if i not in (PAD, BOS):
        out.append(self.vocab[i])
    return " ".join(out)

  def to_json(self) -> str:
    return json.dumps({"format": _FORMAT, "version": 1, "vocab": self.vocab})

  @classmethod
  def from_json(cls, text: str) -> "Tokenizer":
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise UserError(f"tokenizer JSON is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("version") != 1:
      raise UserError(f"not a version-1 {_FORMAT} JSON document")
    return cls(data["vocab"])

  def __eq__(self, other) -> bool:
    return isinstance(other, Tokenizer) and self.vocab == other.vocab

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size})"


class ClipTokenizer:
  """CLIP's byte-level BPE tokenizer read from a model folder (vocab.json and merges.txt, or
  the tokenizer.json that transformers 5 writes, with the tokenizer_config.json /
  special_tokens_map.json beside them), through transformers' `CLIPTokenizer`, local files
  only.

  `encode` pads and truncates to `max_length` (77 for SD) with the folder's pad token, as
  diffusers' StableDiffusionPipeline does; the mask is all True because SD's text encoder and
  UNet attend to every position, padding included.
  """

  FILES = ("vocab.json", "merges.txt")

  def __init__(self, folder: str):
    import os  # pylint: disable=g-import-not-at-top
    missing = [n for n in self.FILES if not os.path.isfile(os.path.join(folder, n))]
    if missing and not os.path.isfile(os.path.join(folder, "tokenizer.json")):
      raise UserError(f"tokenizer folder {folder!r} lacks {missing} (or tokenizer.json)")
    try:
      import transformers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise UserError("CLIP tokenization needs transformers (pip install -e .[sd])") from e
    self.folder = folder
    self._tok = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)

  @property
  def vocab_size(self) -> int:
    return len(self._tok)

  @property
  def model_max_length(self) -> int:
    return int(self._tok.model_max_length)

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B, max_length], mask bool [B, max_length], all True)."""
    if isinstance(texts, str):
      raise UserError("ClipTokenizer.encode takes a list of strings, not a single string")
    ids = self._tok(list(texts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np").input_ids.astype(np.int32)
    return ids, np.ones(ids.shape, bool)

  def __repr__(self) -> str:
    return f"ClipTokenizer({self.folder!r}, vocab_size={self.vocab_size})"


class _EncoderBlock(nn.Module):
  """Pre-LN transformer block: masked multi-head self-attention, then a GELU MLP."""
  num_heads: int
  mlp_ratio: int
  dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, mask, train):
    width = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
    drop = nn.Dropout(self.dropout, deterministic=not train)
    h = layers.CrossAttention(self.num_heads, width // self.num_heads, dtype=self.dtype,
                              name="attn")(norm("norm1")(x), None, mask)
    x = x + drop(h)
    h = nn.Dense(self.mlp_ratio * width, dtype=self.dtype, name="mlp_in")(norm("norm2")(x))
    h = nn.Dense(width, dtype=self.dtype, name="mlp_out")(nn.gelu(h, approximate=False))
    return x + drop(h)


class TextEncoder(nn.Module):
  """BERT-like transformer encoder: token ids [B, L] -> context [B, L, width].

  Padding (mask False) is excluded as an attention key, so the outputs at real tokens do
  not depend on the padding. Outputs at padded positions are meaningless; pass the same
  mask to the UNet as `context_mask`. Output dtype is `dtype`; parameters are float32.

  Attributes:
    vocab_size: rows of the token embedding (`Tokenizer.vocab_size`).
    max_length: number of learned positions (L may be shorter).
    width: model width = the UNet's `context_dim`.
    depth: transformer blocks.
    num_heads: attention heads (must divide width).
    mlp_ratio: MLP hidden width / width.
    dropout: dropout after attention and MLP (with `train=True`, rng "dropout").
    dtype: computation dtype.
  """
  vocab_size: int
  max_length: int = 32
  width: int = 512
  depth: int = 4
  num_heads: int = 8
  mlp_ratio: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids, mask=None, *, train: bool = False):
    """ids int [B, L] (L <= max_length); mask bool [B, L] (None: ids != [PAD])."""
    length = ids.shape[1]
    if length > self.max_length:
      raise UserError(f"TextEncoder: sequence length {length} > max_length {self.max_length}")
    if self.width % self.num_heads:
      raise UserError(f"TextEncoder: width {self.width} not divisible by {self.num_heads} heads")
    if mask is None:
      mask = ids != PAD
    init = nn.initializers.normal(0.02)
    x = nn.Embed(self.vocab_size, self.width, embedding_init=init, dtype=self.dtype,
                 name="token_embed")(ids)
    pos = self.param("pos_embed", init, (self.max_length, self.width), jnp.float32)
    x = x + pos[None, :length].astype(self.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for i in range(self.depth):
      x = _EncoderBlock(self.num_heads, self.mlp_ratio, self.dropout, self.dtype,
                        name=f"block{i}")(x, mask, train)
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm_out")(x)


CAPTION_TEMPLATES = (
    "a photo of {a} {name}",
    "{a} {name}",
    "{name}, grayscale product photo",
    "a grayscale photo of {a} {name}",
    "a picture of {a} {name}",
    "a low resolution image of {a} {name}",
)


def fashion_mnist_captions(labels: Sequence[int], class_names: Sequence[str],
                           rng: np.random.Generator) -> list[str]:
  """One simple caption per label: a random template (drawn from `rng`) with the class name.

  Names are lowercased ("Ankle boot" -> "a photo of an ankle boot"); the same labels and
  Generator state give the same captions.
  """
  labels = np.asarray(labels).reshape(-1)
  choice = rng.integers(len(CAPTION_TEMPLATES), size=labels.shape[0])
  captions = []
  for label, k in zip(labels.tolist(), choice.tolist()):
    if not 0 <= label < len(class_names):
      raise UserError(f"label {label} outside the {len(class_names)} class names")
    name = class_names[label].lower()
    article = "an" if name[:1] in "aeiou" and name else "a"
    captions.append(CAPTION_TEMPLATES[k].format(a=article, name=name))
  return captions
