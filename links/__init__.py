"""mlink.links: model links (MLink) that predict one model's output from other models' outputs.

Nodes are served outputs keyed ``"model:output"``. The pieces:

- :class:`TupleSet` (``tuples``): aligned output tuples of all nodes, saved as versioned datasets;
- ``arch``: the four link architectures ``Vec2Vec``, ``Seq2Vec``, ``Vec2Seq``, ``Seq2Seq``;
- ``boxset``/``matching``: order-free links from box sets, ``BoxSet`` (boxes -> boxes, trained
  with a matching loss) and ``BoxCount`` (boxes -> count); ``candidates``: which architectures
  a pair may have, and the held-out choice among them (``fitting`` trains them);
- ``train``: :class:`TrainConfig` and the training loop (RMSprop, early stopping, seeded);
- :class:`Ensemble` (``ensemble``): h_{A,j} for any subset A of active source models;
- :class:`LinkMatrix` (``matrix``): accuracies of links, ensembles and trivial predictors;
  ``crossval``: the same by K-fold cross-validation over a whole profile;
- ``store``: save/load with manifest and checksums;
- :class:`LinkSet`: the top-level API over a whole site.

Typical use::

    links = LinkSet.train(tuples, val_share=0.2, progress=True)
    print(links.matrix(test_tuples).table())
    links.save("links/building")
    links = LinkSet.load("links/building", expect_specs=tuples.specs)
    outputs = links.predict({"yolox_nano"}, {"yolox_nano:person_count": ..., "yolox_nano:boxes": ...})

This package sees model outputs only; it never loads or looks inside a model.
"""

from mlink.links.arch import ARCHS, Link, Seq2Seq, Seq2Vec, Vec2Seq, Vec2Vec, link_class, make_link
from mlink.links.boxset import BoxCount, BoxSet
from mlink.links.candidates import candidate_classes
from mlink.links.encode import SEQ_CAP, Batch
from mlink.links.ensemble import Ensemble
from mlink.links.errors import DatasetError, IncompatibleLinksError, LinkError, LinkStoreError
from mlink.links.linkset import LinkSet
from mlink.links.matrix import LinkMatrix
from mlink.links.train import FitResult, TrainConfig
from mlink.links.tuples import TupleSet, node_key, node_model

__all__ = [
    "ARCHS",
    "SEQ_CAP",
    "Batch",
    "BoxCount",
    "BoxSet",
    "DatasetError",
    "Ensemble",
    "FitResult",
    "IncompatibleLinksError",
    "Link",
    "LinkError",
    "LinkMatrix",
    "LinkSet",
    "LinkStoreError",
    "Seq2Seq",
    "Seq2Vec",
    "TrainConfig",
    "TupleSet",
    "Vec2Seq",
    "Vec2Vec",
    "candidate_classes",
    "link_class",
    "make_link",
    "node_key",
    "node_model",
]
