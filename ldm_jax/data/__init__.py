"""Data layer: random-access sources (Fashion-MNIST, TFDS, image folders) and batch pipelines."""
from ldm_jax.data.fashion_mnist import CLASS_NAMES
from ldm_jax.data.images import load_image
from ldm_jax.data.stream import BatchStream
from ldm_jax.data.stream import default_data_config
from ldm_jax.data.stream import eval_batches
from ldm_jax.data.stream import global_indices
from ldm_jax.data.stream import preprocess
from ldm_jax.data.sources import compare_fingerprints
from ldm_jax.data.sources import fashion_mnist_source
from ldm_jax.data.sources import folder_source
from ldm_jax.data.sources import make_source
from ldm_jax.data.sources import tfds_source

__all__ = [
    'BatchStream', 'CLASS_NAMES', 'compare_fingerprints', 'default_data_config', 'eval_batches',
    'fashion_mnist_source', 'folder_source', 'global_indices', 'load_image', 'make_source',
    'preprocess', 'tfds_source',
]
