"""Cross-dataset evaluation: a head fitted on one dataset scored on another's faces.

Datasets name and order their classes their own way (FER2013's `happy`, CK+'s `happy` at another
index, JAFFE's `HA`), so classes are matched by their canonical expression (`names.EXPRESSIONS`).
Only the shared classes are scored: the head's output is restricted to its rows that the data
has (a FER2013 head never predicts a class CK+ lacks), and faces of a class the head does not
know (CK+'s contempt for a FER2013 head) are left out and counted, by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fercache.errors import UserError
from fercache.heads import softmax


@dataclass(frozen=True)
class ClassMap:
    """How a head's classes meet a dataset's: per shared class, its data label and head row."""

    classes: list[str]  # the shared classes, in the data's order, by the data's names
    canonical: list[str]  # their canonical expressions
    data_labels: np.ndarray  # per shared class: its label in the data
    head_rows: np.ndarray  # per shared class: the head's row of the same expression
    left_out: list[str]  # data classes the head does not know
    unused: list[str]  # head classes the data lacks (their outputs are never predicted)

    def restrict(self, y: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows kept: faces of a shared class, their labels 0..S-1 over `classes`, the head's logits
        restricted to the shared rows, S columns in the same order)."""
        index = np.full(int(max(y.max(initial=0), self.data_labels.max(initial=0))) + 1, -1)
        index[self.data_labels] = np.arange(len(self.data_labels))
        shared = index[np.asarray(y, dtype=np.int64)]
        keep = shared >= 0
        return keep, shared[keep], np.asarray(logits)[keep][:, self.head_rows]

    def left_out_counts(self, y: np.ndarray, data_classes: list[str]) -> dict[str, int]:
        """Faces left out per data class the head does not know."""
        counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=len(data_classes))
        return {c: int(counts[data_classes.index(c)]) for c in self.left_out}


def class_map(head_classes: list[str], head_canonical: list[str], data_classes: list[str],
              data_canonical: list[str]) -> ClassMap:
    """Match a head's classes to a dataset's by canonical expression; no shared class is a `UserError`."""
    row_of = {c: i for i, c in enumerate(head_canonical)}
    shared = [i for i, c in enumerate(data_canonical) if c in row_of]
    if not shared:
        raise UserError(f"the head's classes ({', '.join(head_classes)}) share no expression with the data's "
                        f"({', '.join(data_classes)})")
    present = {data_canonical[i] for i in shared}
    return ClassMap([data_classes[i] for i in shared], [data_canonical[i] for i in shared], np.array(shared),
                    np.array([row_of[data_canonical[i]] for i in shared]),
                    [c for i, c in enumerate(data_classes) if i not in shared],
                    [c for c, e in zip(head_classes, head_canonical) if e not in present])


def restricted_scores(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities over the restricted rows and their argmax."""
    proba = softmax(np.asarray(logits, dtype=np.float64))
    return proba, proba.argmax(axis=1)
