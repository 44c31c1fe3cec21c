"""Head sets for cross-model patching, chosen from two head-score files (a source's and a target's).

With S = the source's retrieval heads and T = the target's (score > each file's threshold, or --threshold):

* ``intersection``: S ∩ T (Zhao et al. patch these from the real-data model into a synthetic one);
* ``complement``: S - T, the source's heads the target lacks;
* ``random:K``: K heads drawn uniformly from outside S ∪ T, once per draw (seeded by seed, K and draw);
* ``top:K``: the source's K best-scoring heads;
* ``L-H,L-H,...``: an explicit list.

Pure numpy: every set is resolved, and every impossible request refused, before a model is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from harness_ext.core.errors import NeedlesError
from harness_ext.heads.scorefile import HeadScores
from harness_ext.heads.scores import Head, head_set, ranked_heads

_KK = re.compile(r"^(random|top):(\d+)$")
_LIST = re.compile(r"^\d+-\d+(,\d+-\d+)*$")
_FIX = "use intersection, complement, random:K, top:K (K >= 1) or an explicit list such as 0-3,12-7"


@dataclass(frozen=True)
class SetSpec:
    """One --sets entry as parsed (heads are only known for an explicit list)."""

    text: str
    kind: str  # intersection | complement | random | top | list
    k: int | None = None
    heads: tuple[Head, ...] = ()


@dataclass(frozen=True)
class HeadSet:
    """A resolved set: one list of heads per draw (a single draw except for random:K)."""

    name: str
    kind: str
    draws: tuple[tuple[Head, ...], ...]


def parse_set(text: str) -> SetSpec:
    """One --sets entry: intersection, complement, random:K, top:K or L-H,L-H."""
    t = text.strip()
    if t in ("intersection", "complement"):
        return SetSpec(t, t)
    m = _KK.match(t)
    if m:
        if int(m.group(2)) < 1:
            raise NeedlesError(f"--sets {text!r}: K must be at least 1", fix=_FIX)
        return SetSpec(t, m.group(1), int(m.group(2)))
    if _LIST.match(t):
        heads = [tuple(int(x) for x in item.split("-")) for item in t.split(",")]
        if len(set(heads)) != len(heads):
            raise NeedlesError(f"--sets {text!r} names a head twice", fix="list each layer-head once")
        return SetSpec(t, "list", len(heads), tuple(sorted(heads)))  # type: ignore[arg-type]
    raise NeedlesError(f"--sets {text!r} is not a head set", fix=_FIX)


def parse_sets(texts: Sequence[str]) -> list[SetSpec]:
    """Every --sets entry, refusing duplicates (they would be reported twice under one name)."""
    specs = [parse_set(t) for t in texts]
    names = [s.text for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise NeedlesError(f"--sets names {dup[0]!r} twice", fix="give each set once")
    if not specs:
        raise NeedlesError("--sets is empty", fix=_FIX)
    return specs


def check_grids(source: HeadScores, target: HeadScores, num_layers: int, num_heads: int) -> None:
    """Both score files must describe the models' head grid (heads are matched by index)."""
    for side, s in (("--source-heads", source), ("--target-heads", target)):
        if (s.num_layers, s.num_heads) != (num_layers, num_heads):
            raise NeedlesError(
                f"{side} has a {s.num_layers}x{s.num_heads} head grid ({s.format_name}), the models "
                f"{num_layers}x{num_heads}",
                fix="use head-score files computed on these models (`needles heads --model ...`)",
            )


def resolve_sets(
    specs: Sequence[SetSpec],
    source: HeadScores,
    target: HeadScores,
    draws: int = 5,
    seed: int = 0,
    threshold: float | None = None,
) -> list[HeadSet]:
    """The heads of every set (grids already checked equal); refuses empty sets and K beyond what is available."""
    layers, per_layer = source.num_layers, source.num_heads
    s_heads = head_set(source.scores, source.threshold if threshold is None else threshold)
    t_heads = head_set(target.scores, target.threshold if threshold is None else threshold)
    out = []
    for spec in specs:
        if spec.kind == "intersection":
            heads = sorted(s_heads & t_heads)
            _nonempty(spec, heads, f"the source's {len(s_heads)} and the target's {len(t_heads)} heads share none")
            out.append(HeadSet(spec.text, spec.kind, (tuple(heads),)))
        elif spec.kind == "complement":
            heads = sorted(s_heads - t_heads)
            _nonempty(spec, heads, f"all {len(s_heads)} source heads are also target heads")
            out.append(HeadSet(spec.text, spec.kind, (tuple(heads),)))
        elif spec.kind == "top":
            if spec.k > layers * per_layer:  # type: ignore[operator]
                raise NeedlesError(f"{spec.text}: the models have only {layers * per_layer} heads", fix="lower K")
            out.append(HeadSet(spec.text, spec.kind, (tuple(sorted(ranked_heads(source.scores)[: spec.k])),)))
        elif spec.kind == "random":
            pool = sorted({(la, h) for la in range(layers) for h in range(per_layer)} - s_heads - t_heads)
            if spec.k > len(pool):  # type: ignore[operator]
                raise NeedlesError(
                    f"{spec.text}: only {len(pool)} heads lie outside both head sets", fix="lower K (or --threshold)"
                )
            runs = []
            for d in range(draws):
                rng = np.random.default_rng([seed, spec.k, d])
                picks = rng.choice(len(pool), size=spec.k, replace=False)
                runs.append(tuple(sorted(pool[int(i)] for i in picks)))
            out.append(HeadSet(spec.text, spec.kind, tuple(runs)))
        else:
            bad = [h for h in spec.heads if not (h[0] < layers and h[1] < per_layer)]
            if bad:
                raise NeedlesError(
                    f"--sets {spec.text}: head {bad[0][0]}-{bad[0][1]} does not exist in a {layers}x{per_layer} model",
                    fix="use layer-head indices below the models' layer and head counts",
                )
            out.append(HeadSet(spec.text, spec.kind, (spec.heads,)))
    return out


def _nonempty(spec: SetSpec, heads: list, why: str) -> None:
    if not heads:
        raise NeedlesError(
            f"--sets {spec.text} is empty: {why}", fix="lower --threshold, or choose other sets (top:K, random:K)"
        )
