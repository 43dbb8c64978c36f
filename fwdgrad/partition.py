"""Non-IID splits of a task's training data over a fleet of devices.

Devices in the field do not see the same data: one user's voice, one writer's digits. A fleet simulation
that split the data uniformly would hide what makes federated training hard (each device pulls the shared
model towards its own data), so the default splits are skewed on purpose:

- ``labels``: classes are dealt round-robin, device k gets every class c with c % N == k (disjoint
  label subsets; for MNIST / digits with 3 devices: {0,3,6,9}, {1,4,7}, {2,5,8});
- ``voices``: the spoken-keyword set (``keywords``), one flite voice per device (voices dealt round-robin
  when there are fewer devices than voices);
- ``iid``: a seeded uniform split, the control.

Splits are of the run's training samples (``TrainData.x_train``, i.e. after ``train_samples``), so a fleet
and a single-device run of the same config train on the same images.
"""
from __future__ import annotations

import numpy as np

from .config import TrainConfig

SPLITS = ("labels", "voices", "iid")


def client_indices(cfg: TrainConfig, labels: np.ndarray, clients: int, split: str) -> list[np.ndarray]:
    """Indices into the run's training samples for each of ``clients`` devices (sorted, disjoint)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if clients < 1:
        raise ValueError(f"a fleet needs at least one device, got clients={clients}")
    if split == "iid":
        order = np.random.default_rng([cfg.seed, 0xF1EE7]).permutation(len(labels))
        parts = [np.sort(p) for p in np.array_split(order, clients)]
    else:
        groups = labels if split == "labels" else voice_of_training_clips(cfg)
        names = np.unique(groups)
        if clients > len(names):
            kind = "classes" if split == "labels" else "voices"
            raise ValueError(f"split {split!r} deals {kind} to devices, and there are {len(names)} {kind} for "
                             f"{clients} devices: use at most {len(names)} clients or split = 'iid'")
        parts = [np.flatnonzero(np.isin(groups, names[k::clients])) for k in range(clients)]
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(f"devices {empty} get no training samples: raise train_samples or use fewer clients")
    return parts


def voice_of_training_clips(cfg: TrainConfig) -> np.ndarray:
    """The flite voice (0..4) of each of the run's training clips of the ``keywords`` data set.

    ``fwdgrad.data.keywords.build_flite`` renders voice by voice, renditions within a voice, words within
    a rendition, and keeps the adaptation renditions as the training split, so the raw clip i is spoken by
    voice i // (renditions * words); the run's samples are ``task.train_indices`` of those."""
    from .data.datasets import load_dataset
    from .data.keywords import FLITE_TRAIN_RENDITIONS, FLITE_VOICES, WORDS
    from .task import train_indices

    if cfg.dataset != "keywords":
        raise ValueError(f"split 'voices' is for the spoken-keyword data set (dataset = 'keywords'), not "
                         f"{cfg.dataset!r}: use split = 'labels' or 'iid'")
    raw = len(load_dataset("keywords", "train").labels)
    per_voice = len(FLITE_TRAIN_RENDITIONS) * len(WORDS)
    if raw != per_voice * len(FLITE_VOICES):
        raise ValueError(f"the keywords training split has {raw} clips, not {per_voice} for each of "
                         f"{len(FLITE_VOICES)} voices: rebuild it (delete its cache and load it again)")
    return (np.arange(raw) // per_voice)[train_indices(cfg, raw)]
