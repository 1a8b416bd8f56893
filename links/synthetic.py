"""Synthetic output tuples that mimic a building site, for tests and demos without models.

A scene of walking people (count drifting between 1 and 12) and two parked cars is "seen" by
three fake models with the real zoo's output specs:

- ``yolox_nano``: person/vehicle/object counts and boxes (persons found with p=0.95, the cars
  with p=0.9, an occasional false positive), ordered by score;
- ``hog_people``: person count and boxes (persons found with p=0.7, jittered boxes);
- ``mobilenet_v2``: 1000 class probabilities whose top class follows the crowd level.

The correlations are of the kind real models show (counts agree up to misses, boxes overlap),
so links have something to learn and the trivial predictors are beatable.
"""

from __future__ import annotations

import numpy as np

from mlink.links.tuples import TupleSet
from mlink.models.spec import BOX_DIM, OutputSpec, Task

MAX_BOXES = 100


def _boxes_spec() -> OutputSpec:
    return OutputSpec("boxes", "sequence", BOX_DIM, Task.BOXES, "synthetic boxes", max_len=MAX_BOXES)


def _count(name: str) -> OutputSpec:
    return OutputSpec(name, "vector", 1, Task.COUNT, "synthetic count")


SYNTHETIC_MODELS: dict[str, tuple[OutputSpec, ...]] = {
    "yolox_nano": (_count("person_count"), _count("vehicle_count"), _count("object_count"), _boxes_spec()),
    "hog_people": (_count("person_count"), _boxes_spec()),
    "mobilenet_v2": (OutputSpec("probs", "vector", 1000, Task.CLASS, "synthetic ImageNet probabilities"),),
}


def _seq(boxes: list[np.ndarray]) -> np.ndarray:
    if not boxes:
        return np.zeros((0, BOX_DIM), dtype=np.float32)
    arr = np.stack(boxes).astype(np.float32)
    return arr[np.argsort(-arr[:, 4], kind="stable")]


def _move_people(rng: np.random.Generator, people: list[np.ndarray], i: int) -> list[np.ndarray]:
    """Frame ``i``: people enter or leave towards a slowly varying count, then walk; their boxes."""
    target = int(np.clip(round(6 + 5 * np.sin(i / 40.0) + rng.normal(0, 1.0)), 1, 12))
    while len(people) < target:
        people.append(
            np.array([rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.6), rng.normal(0, 0.01), rng.normal(0, 0.005)])
        )
    while len(people) > target:
        people.pop(int(rng.integers(len(people))))
    for p in people:
        p[:2] = np.clip(p[:2] + p[2:], 0.05, 0.95)
    return [np.array([p[0] - 0.03, p[1] - 0.08, p[0] + 0.03, p[1] + 0.08]) for p in people]


def _yolox_boxes(
    rng: np.random.Generator, pboxes: list[np.ndarray], cars: list[np.ndarray]
) -> tuple[list[np.ndarray], int, int]:
    """A good detector: most people and cars, jittered, now and then a false box; with its counts."""
    ybox, n_person, n_vehicle = [], 0, 0
    for b in pboxes:
        if rng.random() < 0.95:
            ybox.append(np.r_[np.clip(b + rng.normal(0, 0.004, 4), 0, 1), rng.uniform(0.5, 0.95)])
            n_person += 1
    for b in cars:
        if rng.random() < 0.9:
            ybox.append(np.r_[np.clip(b + rng.normal(0, 0.002, 4), 0, 1), rng.uniform(0.6, 0.9)])
            n_vehicle += 1
    if rng.random() < 0.1:
        c = rng.uniform(0.1, 0.9, 2)
        ybox.append(np.r_[c - 0.02, c + 0.02, rng.uniform(0.3, 0.4)])
    return ybox, n_person, n_vehicle


def _hog_boxes(rng: np.random.Generator, pboxes: list[np.ndarray]) -> list[np.ndarray]:
    """A weaker people detector: misses more, looser boxes, now and then a false one."""
    hbox = []
    for b in pboxes:
        if rng.random() < 0.7:
            hbox.append(np.r_[np.clip(b + rng.normal(0, 0.01, 4), 0, 1), rng.uniform(0.2, 1.0)])
    if rng.random() < 0.1:
        c = rng.uniform(0.1, 0.9, 2)
        hbox.append(np.r_[np.clip([c[0] - 0.03, c[1] - 0.08, c[0] + 0.03, c[1] + 0.08], 0, 1), rng.uniform(0.1, 0.3)])
    return hbox


def _class_probs(rng: np.random.Generator, classes: np.ndarray, n_people: int) -> np.ndarray:
    """A classifier whose top class follows the crowd's size (four levels)."""
    level = min(n_people // 4, 3)
    logits = rng.normal(0, 0.5, 1000)
    logits[classes] += 2.0
    logits[classes[level]] += 3.0 + rng.normal(0, 0.8)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return probs


def synthetic_tuples(n: int = 400, seed: int = 0, stream: str = "synthetic") -> TupleSet:
    rng = np.random.default_rng(seed)
    ts = TupleSet.for_models(SYNTHETIC_MODELS)
    people: list[np.ndarray] = []  # each: cx, cy, vx, vy
    cars = [np.array([0.1, 0.7, 0.25, 0.8]), np.array([0.7, 0.75, 0.85, 0.85])]
    classes = rng.choice(1000, size=4, replace=False)
    for i in range(n):
        pboxes = _move_people(rng, people, i)
        ybox, n_person, n_vehicle = _yolox_boxes(rng, pboxes, cars)
        hbox = _hog_boxes(rng, pboxes)
        probs = _class_probs(rng, classes, len(people))
        ts.append_models(
            stream,
            i * 0.5,
            {
                "yolox_nano": {
                    "person_count": np.array([n_person], np.float32),
                    "vehicle_count": np.array([n_vehicle], np.float32),
                    "object_count": np.array([len(ybox)], np.float32),
                    "boxes": _seq(ybox),
                },
                "hog_people": {"person_count": np.array([len(hbox)], np.float32), "boxes": _seq(hbox)},
                "mobilenet_v2": {"probs": probs.astype(np.float32)},
            },
        )
    return ts
