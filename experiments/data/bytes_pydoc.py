"""`bytes_pydoc`: byte windows of the Python documentation shipped with Python.

The text is the standard library's ``pydoc_data/topics.py``: the ``topics`` dict
that ``help("assert")``, ``help("if")``, ... print, generated from the Python
Language Reference and Library Reference (about 79 topics, 466 kB of English prose
with some grammar and code examples on Python 3.11). It comes with every CPython
installation, so nothing is downloaded. The corpus is the topics' texts in sorted
key order joined by ``"\\n\\n"``, encoded as UTF-8: a byte vocabulary of 256.

Windows and splits (``split_windows``), deterministic and disjoint:

* the corpus is cut into consecutive windows of ``CONTEXT + 1`` bytes (the tail
  shorter than a window is dropped); no byte is in two windows;
* windows are grouped ``GROUP`` at a time in corpus order; every ``VAL_EVERY``-th
  group (groups 9, 19, 29, ...) is ``validation``, the others ``train``, so
  validation samples the whole documentation, not its last topics;
* an example is ``image`` = the window's first ``CONTEXT`` bytes (int32 [CONTEXT])
  and ``label`` = its last ``CONTEXT`` bytes (the next byte at every position).

The text differs between Python versions, so the prepared arrays are cached under
a directory named after the corpus's SHA-256 (``version_dir``); the arrays record
the Python version and the hash.

Example:
  arrays = build_arrays()
  arrays["train/image"].shape  # (6469, 64) on Python 3.11.7
"""

from __future__ import annotations

import hashlib
import platform

import numpy as np

NUM_CLASSES = 256
CONTEXT = 64
GROUP = 16
VAL_EVERY = 10
# The builder's version; with the corpus hash it keys the prepared-array cache of
# experiments/data/builders.py (a new version or another text is a new cache).
VERSION = '1.0.0'


def corpus_bytes() -> bytes:
  """The documentation topics of this Python, sorted by key, joined, as UTF-8."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return '\n\n'.join(topics.topics[k] for k in sorted(topics.topics)).encode('utf-8')


def version_dir(corpus: bytes | None = None) -> str:
  """The cache directory name: ``VERSION`` and the first 12 hex digits of the hash."""
  corpus = corpus_bytes() if corpus is None else corpus
  return f'{VERSION}-{hashlib.sha256(corpus).hexdigest()[:12]}'


def split_windows(corpus: bytes, context: int = CONTEXT, group: int = GROUP,
                  val_every: int = VAL_EVERY) -> dict[str, np.ndarray]:
  """The window indices of each split; window ``i`` is bytes ``i*(context+1)`` to
  ``(i+1)*(context+1) - 1`` of ``corpus``.

  Returns:
    ``{'train': int64 [N_train], 'validation': int64 [N_val]}``, increasing.
  """
  num_windows = len(corpus) // (context + 1)
  index = np.arange(num_windows)
  is_val = (index // group) % val_every == val_every - 1
  return {'train': index[~is_val], 'validation': index[is_val]}


def build_arrays(corpus: bytes | None = None, context: int = CONTEXT) -> dict[str, np.ndarray]:
  """The prepared splits, as ``experiments.data.builders`` caches them.

  Returns:
    ``{'<split>/image': int32 [N, context] (input bytes), '<split>/label': int32
    [N, context] (next bytes), 'num_classes', 'python_version', 'sha256'}`` for the
    splits ``train`` and ``validation``.
  """
  corpus = corpus_bytes() if corpus is None else corpus
  data = np.frombuffer(corpus, np.uint8)
  windows = data[:len(corpus) // (context + 1) * (context + 1)].reshape(-1, context + 1)
  arrays = {'num_classes': np.asarray(NUM_CLASSES),
            'python_version': np.asarray(platform.python_version()),
            'sha256': np.asarray(hashlib.sha256(corpus).hexdigest())}
  for split, rows in split_windows(corpus, context).items():
    arrays[f'{split}/image'] = windows[rows, :-1].astype(np.int32)
    arrays[f'{split}/label'] = windows[rows, 1:].astype(np.int32)
  return arrays
