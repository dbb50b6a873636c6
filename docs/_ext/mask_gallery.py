"""The mask gallery: every constructor of :mod:`jattn.masks` drawn as its dense pattern and its
block map, so a reader sees which tiles a blocked implementation skips.

``write_gallery(outdir)`` writes one PNG per constructor (and one per combinator ``&``, ``|``,
``~``) and the MyST page ``outdir/masks.md`` that shows them. Each example is a snippet of
Python executed as written, so the page shows exactly the call that drew the picture. The
constructors are enumerated from the module, and one without a recipe here is an error, so a
new constructor cannot be left out silently. Every block map is checked against its dense
pattern: an EMPTY tile must hold no allowed pair, a FULL tile nothing else.

Run ``python docs/_ext/mask_gallery.py [outdir]`` (default ``docs/gallery``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

import jattn

masks = jattn.masks

T = S = 32  # the pattern every example draws
BLOCK = (8, 8)  # (block_q, block_kv), unless the mask brings its own tiles (block_selection)

KIND_NAMES = {masks.EMPTY: "EMPTY", masks.PARTIAL: "PARTIAL", masks.FULL: "FULL"}
KIND_COLOURS = {masks.EMPTY: "#e8e8e8", masks.PARTIAL: "#f4a259", masks.FULL: "#2a6f97"}
PATTERN_COLOURS = ("#ffffff", "#1d3557")  # False, True


@dataclasses.dataclass(frozen=True)
class Example:
    """One gallery section: ``code`` assigns ``mask``; ``meaning`` says what it means."""

    name: str
    code: str
    meaning: str


CONSTRUCTORS = (
    Example("causal", "mask = jattn.masks.causal()",
            "Query i sees the keys j <= i: tiles above the diagonal are EMPTY, tiles below it "
            "FULL, and only the diagonal tiles need the mask."),
    Example("local_window", "mask = jattn.masks.local_window(5, 0)",
            "A causal sliding window: query i sees keys i - 5 to i, so every tile more than one "
            "step below the diagonal is EMPTY."),
    Example("lengths", "mask = jattn.masks.lengths(q_lengths=28, kv_lengths=20)",
            "Padding: only the first 28 queries and the first 20 keys of the (single) example "
            "are real; tiles wholly past either length are EMPTY."),
    Example("segments", "mask = jattn.masks.segments(jnp.array([[0] * 10 + [1] * 14 + [2] * 8]))",
            "Packed documents of 10, 14 and 8 tokens: a token sees only tokens of its own "
            "document, and a tile that lies within one document on both axes is FULL."),
    Example("prefix_lm", "mask = jattn.masks.prefix_lm(12)",
            "Bidirectional over a prefix of 12 tokens, causal after it."),
    Example("token_types",
            "types = jnp.array([0] * 6 + [1] * 14 + [2] * 12)\n"
            "mask = jattn.masks.token_types(\n"
            "    types, allowed=[(0, 0), (1, 0), (1, 1), (2, 0), (2, 2)])",
            "An instruction (type 0) and two answers (types 1 and 2): everyone sees the "
            "instruction, each answer sees itself, and the answers do not see each other."),
    Example("composite_visual",
            "is_visual = jnp.array([False] * 8 + [True] * 16 + [False] * 8)\n"
            "mask = jattn.masks.composite_visual(is_visual)",
            "EE-MLLM composite attention: causal, but the 16 image tokens (positions 8 to 23) "
            "do not see each other, only themselves, so the image x image tiles off the "
            "diagonal are EMPTY."),
    Example("mixed_visual",
            "is_visual = jnp.array([False] * 8 + [True] * 16 + [False] * 8)\n"
            "mask = jattn.masks.mixed_visual(is_visual)",
            "Croc mixed attention: causal for text, bidirectional among the image tokens "
            "(positions 8 to 23)."),
    Example("modality_mutual",
            "is_visual = jnp.array([False] * 8 + [True] * 16 + [False] * 8)\n"
            "mask = jattn.masks.modality_mutual(is_visual)",
            "AKI modality-mutual attention: causal, and the image tokens (positions 8 to 23) "
            "also see the text that follows them."),
    Example("dense",
            "i, j = np.ogrid[:32, :32]\n"
            "mask = jattn.masks.dense((j <= i) & ((i - j < 4) | (j % 8 == 7)))",
            "Any boolean array: here a strided causal pattern (the last 4 keys plus every "
            "eighth key), whose allowed pairs are spread over every tile below the diagonal, "
            "so none of them is FULL or EMPTY."),
    Example("adjacency",
            "i, j = np.ogrid[:32, :32]\n"
            "grid_edge = abs(i // 8 - j // 8) + abs(i % 8 - j % 8) == 1\n"
            "mask = jattn.masks.adjacency(grid_edge)",
            "Graph attention over a 4 x 8 grid graph: each node sees its 4-connected "
            "neighbours and itself (self_loops)."),
    Example("neighborhood", "mask = jattn.masks.neighborhood((4, 8), 3)",
            "NATTEN neighbourhood attention on a 4 x 8 grid flattened row by row: each "
            "position sees the 3 x 3 window around it (shifted inward at the borders)."),
    Example("block_window", "mask = jattn.masks.block_window((32,), 8, halo=2)",
            "HaloNet blocks: blocks of 8 positions, each seeing its own block widened by 2 "
            "positions on either side; the diagonal tiles are FULL."),
    Example("block_selection",
            "indices = jnp.array([[0, 1, -1], [0, 2, 3], [1, 4, 5], [0, 6, 7]])\n"
            "mask = jattn.masks.block_selection(indices, 8, 4)",
            "Query block i (8 queries) sees the key blocks (4 keys each) listed in row i of "
            "indices (-1: none); drawn at the mask's own 8 x 4 tiles, so every tile is EMPTY "
            "or FULL."),
    Example("all_of",
            "mask = jattn.masks.all_of(\n"
            "    [jattn.masks.causal(), None, jattn.masks.lengths(kv_lengths=24)])",
            "The & of the masks that are not None: here causal attention over the first 24 "
            "keys."),
)

COMBINATIONS = (
    Example("combine_and",
            "mask = jattn.masks.causal() & jattn.masks.local_window(10, 10)",
            "And: allowed where both are; a tile is only as full as the emptier of the two "
            "(here a causal window of 11 keys)."),
    Example("combine_or",
            "mask = jattn.masks.local_window(3, 3) | jattn.masks.lengths(kv_lengths=4)",
            "Or: allowed where either is; a tile is as full as the fuller of the two (here a "
            "sliding window plus 4 global keys at the start, as attention sinks)."),
    Example("combine_not", "mask = ~jattn.masks.causal()",
            "Not: allowed where the mask is not, so EMPTY and FULL tiles swap (here the keys "
            "strictly after each query)."),
)

INTRO = """\
# Mask gallery

A mask from `jattn.masks` says which keys each query may attend to, and each picture below
shows it twice. On the left is the dense pattern `mask.materialize(T, S)`: query positions run
down, key positions across, and a filled cell means that the query may attend to that key. On
the right is the block map `mask.block_map(T, S, block_q, block_kv)`, which sorts every tile of
block_q queries x block_kv keys into EMPTY (no allowed pair), FULL (only allowed pairs) or
PARTIAL (some of each). `jattn.chunked_attention` and the Pallas kernels read this map: they
skip EMPTY tiles entirely and skip the mask arithmetic on FULL ones, so only PARTIAL tiles pay
for evaluating the mask.

The examples assume `import jattn`, `import jax.numpy as jnp` and `import numpy as np`.
"""


def constructor_names() -> list[str]:
    """The public constructor functions of :mod:`jattn.masks`, sorted by name."""
    return sorted(
        name for name, fn in inspect.getmembers(masks, inspect.isfunction)
        if not name.startswith("_") and name.islower() and fn.__module__ == masks.__name__)


def build(example: Example) -> masks.Mask:
    """Run the example's code and return the mask it assigns."""
    namespace = {"jattn": jattn, "jnp": jnp, "np": np}
    exec(example.code, namespace)
    return namespace["mask"]


def check_sound(name: str, pattern: np.ndarray, kinds: np.ndarray, block_q: int,
                block_kv: int) -> None:
    """Raise AssertionError unless every EMPTY tile of ``kinds`` holds no True of ``pattern``
    and every FULL tile holds only True."""
    wrong = []
    for (i, j), kind in np.ndenumerate(kinds):
        tile = pattern[i * block_q:(i + 1) * block_q, j * block_kv:(j + 1) * block_kv]
        if (kind == masks.EMPTY and tile.any()) or (kind == masks.FULL and not tile.all()):
            wrong.append(f"tile ({i}, {j}) is {KIND_NAMES[int(kind)]}")
    if wrong:
        raise AssertionError(f"{name}: block map unsound against the dense pattern: "
                             + "; ".join(wrong))


def draw(title: str, pattern: np.ndarray, kinds: np.ndarray, block_q: int, block_kv: int,
         path: Path) -> None:
    """Write the two-panel picture: dense pattern left, block map right."""
    fig = Figure(figsize=(8, 3.6))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    extent = (0, S, T, 0)  # cell (q, kv) covers [kv, kv + 1) x [q, q + 1)
    left.imshow(pattern, cmap=ListedColormap(PATTERN_COLOURS), vmin=0, vmax=1,
                extent=extent, interpolation="nearest")
    left.set_title(f"dense pattern, T = {T}, S = {S}", fontsize=10)
    order = sorted(KIND_NAMES)
    right.imshow(np.repeat(np.repeat(kinds, block_q, 0), block_kv, 1)[:T, :S],
                 cmap=ListedColormap([KIND_COLOURS[k] for k in order]),
                 norm=BoundaryNorm([*order, order[-1] + 1], len(order)), extent=extent,
                 interpolation="nearest")
    counts = ", ".join(f"{int((kinds == k).sum())} {KIND_NAMES[k]}" for k in order)
    right.set_title(f"block map, {block_q} x {block_kv} tiles: {counts}", fontsize=10)
    right.legend(handles=[Patch(facecolor=KIND_COLOURS[k], edgecolor="0.5",
                                label=KIND_NAMES[k]) for k in order],
                 loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False)
    for ax in (left, right):
        for y in range(block_q, T, block_q):
            ax.axhline(y, color="0.55", linewidth=0.6)
        for x in range(block_kv, S, block_kv):
            ax.axvline(x, color="0.55", linewidth=0.6)
        ax.set_xticks(range(0, S + 1, block_kv))
        ax.set_yticks(range(0, T + 1, block_q))
        ax.tick_params(labelsize=8)
        ax.set_xlabel("key position", fontsize=9)
        ax.set_ylabel("query position", fontsize=9)
    fig.suptitle(title, fontsize=11, family="monospace")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def render(example: Example, title: str, outdir: Path) -> str:
    """Build, check and draw one example under ``title``; return its Markdown section body."""
    mask = build(example)
    block_q, block_kv = mask.tiles() or BLOCK
    # One compilation per mask instead of one per array operation (XLA compiles dominate).
    pattern, kinds = map(np.asarray, jax.jit(
        lambda m: (m.materialize(T, S), m.block_map(T, S, block_q, block_kv)))(mask))
    if pattern.shape[:2] != (1, 1) or kinds.shape[:2] != (1, 1):
        raise ValueError(f"{example.name}: expected one example and head, got pattern "
                         f"{pattern.shape} and block map {kinds.shape}")
    pattern, kinds = pattern[0, 0], kinds[0, 0]
    check_sound(example.name, pattern, kinds, block_q, block_kv)
    draw(title, pattern, kinds, block_q, block_kv, outdir / f"{example.name}.png")
    return (f"```python\n{example.code}\n```\n\n{example.meaning}\n\n"
            f"![{example.name}: dense pattern and block map]({example.name}.png)\n")


def write_gallery(outdir: Path) -> list[str]:
    """Write the pictures and ``outdir/masks.md``; return the constructor names drawn.

    Raises:
        LookupError: a constructor of :mod:`jattn.masks` has no example here, or an example
            names no constructor.
        AssertionError: a block map is unsound against its dense pattern.
    """
    names = constructor_names()
    covered = [e.name for e in CONSTRUCTORS]
    if sorted(covered) != names:
        raise LookupError(f"mask gallery: constructors without an example: "
                          f"{sorted(set(names) - set(covered))}; examples of no constructor: "
                          f"{sorted(set(covered) - set(names))}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sections = [INTRO]
    for example in CONSTRUCTORS:
        title = f"jattn.masks.{example.name}"
        sections.append(f"## {title}\n\n{render(example, title, outdir)}")
    sections.append("## Combining masks\n\nMasks combine with `&` (`jattn.masks.And`), "
                    "`|` (`jattn.masks.Or`) and `~` (`jattn.masks.Not`); the block map of a "
                    "combination is computed from the block maps of its parts.\n")
    for example, (operator, cls) in zip(COMBINATIONS, (("a & b", "And"), ("a | b", "Or"),
                                                       ("~a", "Not")), strict=True):
        title = example.code.removeprefix("mask = ").replace("jattn.masks.", "")
        sections.append(f"### `{operator}`: jattn.masks.{cls}\n\n"
                        f"{render(example, title, outdir)}")
    (outdir / "masks.md").write_text("\n".join(sections))
    return covered


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", type=Path, default=Path("docs/gallery"),
                        help="folder for the PNGs and masks.md (default: docs/gallery)")
    drawn = write_gallery(parser.parse_args().outdir)
    print(f"drew {len(drawn)} constructors: {', '.join(drawn)}")
