"""Why a rewrite never applies: the refusal reasons several rule families share, one wording each.

A refusal reason starts with one of these constants (details may follow after ": "), so tests and
`--explain` readers can match them. A family's own reasons live beside its rules.

- `SHARED_MODULE`: a module called twice, or whose weights are read elsewhere, computes the same
  weights at every use; rewriting them for one use changes the others (torch.fx's own conv-BN
  `fuse` corrupts exactly this case silently).
- `OTHER_USERS`: the tensor between the ops is read by something else, which needs it as it is.
- `TRAINING` / `NO_RUNNING_STATS`: a BN in training mode, or without running statistics,
  normalizes with batch statistics: it is no fixed affine map.
- `SUBCLASS`: a subclass of a torch conv/linear/BN/pool type may compute something else in its
  forward (weight standardization, an activation tail): the algebra is not known to apply.
- `SHAPES_UNKNOWN`: ranks and channel counts decide legality; without example inputs (or when
  shape propagation cannot run an op) they are unknown.
"""

from __future__ import annotations

SHARED_MODULE = ("shared module: it is used more than once (called elsewhere or its weights "
                 "read), so rewriting its weights would change its other uses")
OTHER_USERS = "the intermediate tensor has other users: they need its value as it is"
TRAINING = "BN is in training mode: it normalizes with batch statistics (call .eval())"
NO_RUNNING_STATS = ("BN has no running statistics (track_running_stats=False): it always uses "
                    "batch statistics")
SUBCLASS = ("a subclass of a torch conv/linear/BN/pool type (its forward may differ, e.g. weight "
            "standardization): the rewrite's algebra is not known to apply")
SHAPES_UNKNOWN = ("shapes unknown (no example inputs, or shape propagation cannot run an op): "
                  "give example inputs")
