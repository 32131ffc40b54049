"""A generated cross-modal dataset whose matching is learnable, whose channels interact, and whose captions a
person can read.

Why this generator: tests and the quickstart need image-text data with no download, where a model that learns
does far better than chance, where a learned metric has something to learn beyond cosine, and where a search's
hits can be judged by eye (``gssf search --text "red square"`` should find red squares).

Generative story (all from one seeded ``numpy.random.Generator``, so one seed gives identical bytes):
- ``concepts`` latent concepts, each a distinct combination of attribute values of the caption grammar
  (:class:`Grammar`): colour × shape, joined by size and texture when there are more concepts than colours and
  shapes tell apart (``red square``, ``small striped red square``). Each value has an appearance vector in R^F
  and three synonyms (``square``/``box``/``cube``, so the text tower has to learn which words mean the same); a
  concept's appearance is the sum of its values' vectors, scaled to unit variance per channel — ``red`` looks
  the same on every red thing, as the words say.
- An image holds 3 distinct concepts. Its ``regions`` region features are: one region per concept
  (appearance + noise), plus clutter regions drawn from background prototypes that no caption mentions.
  Region features are then passed through a fixed random channel mixing and a rectifier, so channels are
  correlated (interactions between channels carry the signal, not single channels).
- Each of its captions names a random subset (at least 2) of its concepts in random order, each phrase with
  random synonyms, among words that carry no information (articles, relations such as ``beside`` or ``next to``,
  now and then an opener or a scene): ``there is a red square beside the blue circle on a table``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import PrepareConfig
from gssf_cli.data.text import build_vocabulary, tokenize

CONCEPTS_PER_IMAGE = 3
BACKGROUNDS = 16
SPLITS = ("train", "dev", "test")

Words = tuple[str, ...]
"""An attribute value as its synonyms (the plainest first), or a filler option as the words it writes."""
COLOURS: tuple[Words, ...] = (
    ("red", "crimson", "scarlet"), ("blue", "azure", "navy"), ("green", "emerald", "lime"),
    ("yellow", "golden", "lemon"), ("orange", "amber", "tangerine"), ("purple", "violet", "lilac"),
    ("pink", "rose", "magenta"), ("brown", "chocolate", "tan"), ("black", "ebony", "jet"),
    ("white", "ivory", "snowy"), ("grey", "gray", "silver"), ("teal", "cyan", "turquoise"),
)  # fmt: skip
SHAPES: tuple[Words, ...] = (
    ("square", "box", "cube"), ("circle", "disc", "ball"), ("triangle", "wedge", "pyramid"),
    ("star", "asterisk", "sparkle"), ("ring", "hoop", "loop"), ("diamond", "rhombus", "lozenge"),
    ("oval", "ellipse", "egg"), ("bar", "rod", "stick"), ("crescent", "moon", "sickle"),
    ("spiral", "coil", "swirl"), ("arrow", "pointer", "chevron"), ("tube", "pipe", "cylinder"),
)  # fmt: skip
SIZES: tuple[Words, ...] = (
    ("small", "little", "tiny"), ("big", "large", "huge"), ("tall", "high", "lofty"), ("flat", "thin", "slim"),
)  # fmt: skip
TEXTURES: tuple[Words, ...] = (
    ("striped", "banded", "lined"), ("dotted", "spotted", "speckled"), ("shiny", "glossy", "gleaming"),
    ("fuzzy", "furry", "fluffy"),
)  # fmt: skip
ATTRIBUTES: tuple[tuple[Words, ...], ...] = (COLOURS, SHAPES, SIZES, TEXTURES)
"""In the order a growing number of concepts takes them into use: every phrase has a colour and a shape."""
ATTRIBUTE_NAMES = ("colours", "shapes", "sizes", "textures")
SYNONYMS = 3
NOUN = 1
"""The attribute whose word ends a phrase (the shape): where a reader, and :meth:`Grammar.parse`, splits."""
PHRASE_ORDER = (2, 3, 0, 1)
"""The attributes in reading order: size, texture, colour, shape (``small striped red square``)."""
CAPACITY = math.prod(len(values) for values in ATTRIBUTES)
"""Concepts the attributes tell apart: 12 × 12 × 4 × 4 = 2,304. Beyond, phrases end in ``number K``."""
NUMBER = "number"

INDEFINITE = "a"
"""The indefinite article, written ``an`` before a vowel."""
CORE_FILLERS = ("a", "an", "and")
"""The fillers every caption grammar has: ``vocab_size`` must leave room for them after the concepts' words."""
BARE_SLOTS: dict[str, tuple[Words, ...]] = {
    "opener": ((),), "article": ((INDEFINITE,),), "relation": (("and",),), "scene": ((),),
}  # fmt: skip
"""Each filler slot's options before any optional filler is admitted: no opener or scene, ``a``, ``and``."""
FILLERS: tuple[tuple[str, Words], ...] = (
    ("relation", ("beside",)), ("article", ("the",)), ("opener", ("there", "is")), ("relation", ("above",)),
    ("scene", ("on", "a", "table")), ("relation", ("below",)), ("relation", ("near",)), ("relation", ("with",)),
    ("opener", ("we", "see")), ("scene", ("on", "the", "floor")), ("relation", ("behind",)),
    ("relation", ("next", "to")), ("opener", ("a", "picture", "of")), ("scene", ("in", "a", "room")),
    ("relation", ("under",)), ("relation", ("over",)), ("opener", ("here", "is")), ("scene", ("on", "the", "grass")),
    ("opener", ("a", "photo", "of")), ("scene", ("at", "night")), ("relation", ("close", "to")),
    ("opener", ("this", "shows")), ("scene", ("against", "a", "wall")), ("scene", ("by", "a", "window")),
    ("opener", ("an", "image", "of")), ("scene", ("in", "the", "corner")),
)  # fmt: skip
"""The optional fillers by slot (each the same for every concept: no information), in the order a small
``vocab_size`` admits them while their new words fit, so a tight vocabulary drops the least needed first."""
FRAME_CHANCE = 0.2
"""How often a caption has an opener (``there is``), and apart from that how often a scene (``on a table``).

Why seldom, and why relations of at most two words: each word that says nothing makes a caption harder to match.
The quickstart's first model (4 epochs; test rSum, mean of seeds 0-4) scores 253.8 on these captions (10.3 words
on average) against 258.0 on the earlier ones of ``w0123`` tokens (8 words), so matching is as hard as it was;
with an opener and a scene on nearly every caption and relations such as ``to the left of`` (13.5 words) it fell
to 243.6 (seeds 0-2), and with no optional filler at all (9 words) it rose to 273.8."""
PHRASE_SLOTS = len(ATTRIBUTES) + 2
"""The most words a phrase has: one per attribute, then ``number K``."""
HEAD_DRAWS, CONCEPT_DRAWS = 3, 3 + PHRASE_SLOTS
DRAWS = HEAD_DRAWS + CONCEPTS_PER_IMAGE * CONCEPT_DRAWS
"""Uniform draws per caption: how many concepts it names, its opener and its scene; then per concept of the image
its place in the order, its relation to the phrase before, its article and one synonym per phrase slot."""


@dataclass(frozen=True)
class Grammar:
    """The caption language of ``concepts`` concepts.

    ``counts`` ``[A]``: the values in use of each of the first attributes (colour, shape, size, texture; see
    :func:`attribute_counts`), then when ``numbered`` how many numbers. Concept i's values are the digits of i in
    that mixed radix (colour fastest) turned into a Latin square (:meth:`values`). ``fillers``: each filler
    slot's options (word tuples), none of them an attribute word, so a caption parses back (:meth:`parse`).
    """

    concepts: int
    counts: tuple[int, ...]
    fillers: Mapping[str, tuple[Words, ...]]

    @property
    def numbered(self) -> bool:
        return len(self.counts) > len(ATTRIBUTES)

    def values(self, concept: int) -> tuple[int, ...]:
        """Concept ``concept``'s value of each attribute in use (and its number less one) ``[A]``: with ``d`` the
        digits of ``concept``, value ``a`` is ``(d[0] + ... + d[a]) mod counts[a]``, so the first concepts differ
        in every attribute (0 ``red square``, 1 ``blue circle``) and each value is shared by as few as can be."""
        strides = accumulate(self.counts[:-1], lambda a, b: a * b, initial=1)
        digits = [concept // stride % count for stride, count in zip(strides, self.counts, strict=True)]
        return tuple(total % count for total, count in zip(accumulate(digits), self.counts, strict=True))

    def concept_of(self, values: Mapping[int, int]) -> int:
        """The concept whose attribute ``a`` has value ``values[a]`` for every ``a`` in use: :meth:`values` inverted."""
        if set(values) != set(range(len(self.counts))) or any(values[a] >= c for a, c in enumerate(self.counts)):
            raise ValueError(f"no concept of this grammar has the values {dict(values)}")
        digits: list[int] = []
        for a, count in enumerate(self.counts):
            digits.append((values[a] - sum(digits)) % count)
        strides = accumulate(self.counts[:-1], lambda a, b: a * b, initial=1)
        return sum(digit * stride for digit, stride in zip(digits, strides, strict=True))

    def phrase(self, concept: int) -> tuple[Words, ...]:
        """Concept ``concept``'s phrase as slots of synonyms in reading order, e.g. ``(("red", "crimson",
        "scarlet"), ("square", "box", "cube"))``, then ``("number",), ("K",)`` when numbered."""
        values = self.values(concept)
        slots = tuple(ATTRIBUTES[a][values[a]] for a in PHRASE_ORDER if a < len(values))
        return (*slots, (NUMBER,), (str(values[-1] + 1),)) if self.numbered else slots

    def concept_words(self) -> list[str]:
        """Every word a phrase may use: the synonyms of the values in use, then ``number`` and the numbers."""
        words = [word for a, count in enumerate(self.counts[: len(ATTRIBUTES)])
                 for value in ATTRIBUTES[a][:count] for word in value]  # fmt: skip
        return [*words, NUMBER, *map(str, range(1, self.counts[-1] + 1))] if self.numbered else words

    def filler_words(self) -> set[str]:
        """Every word a caption may use besides its phrases."""
        return {word for options in self.fillers.values() for option in options for word in option} | {"an"}

    def caption(self, concepts: Sequence[int], draws: np.ndarray) -> str:
        """A caption of an image showing ``concepts`` ``[K]``, from ``draws`` ``[DRAWS]`` uniform in [0, 1): it
        names 2..K of them in random order, each with random synonyms, among fillers."""
        k = len(concepts)
        own = draws[HEAD_DRAWS : HEAD_DRAWS + k * CONCEPT_DRAWS].reshape(k, CONCEPT_DRAWS)
        named = np.argsort(own[:, 0], kind="stable")[: 2 + int(draws[0] * (k - 1))]
        words = list(_sometimes(self.fillers["opener"], draws[1]))
        for place, c in enumerate(named):
            relation, article, *synonyms = own[c, 1:]
            phrase = [_pick(slot, draw) for slot, draw in zip(self.phrase(int(concepts[c])), synonyms, strict=False)]
            if place:
                words += _pick(self.fillers["relation"], relation)
            words += [*_article(_pick(self.fillers["article"], article), phrase[0]), *phrase]
        words += _sometimes(self.fillers["scene"], draws[2])
        return " ".join(words)

    def parse(self, caption: str) -> list[int]:
        """The concepts a caption of this grammar names, in order: :meth:`caption` inverted, which works because
        a phrase's words are attribute values ending at its shape (then ``number K``) and no filler is one."""
        lexicon = {word: (a, v) for a, values in enumerate(ATTRIBUTES) for v, value in enumerate(values)
                   for word in value}  # fmt: skip
        tokens = tokenize(caption)
        found: list[int] = []
        values: dict[int, int] = {}
        for at, token in enumerate(tokens):
            if token in lexicon:
                attribute, value = lexicon[token]
                values[attribute] = value
                if attribute == NOUN:
                    if self.numbered:
                        values[len(ATTRIBUTES)] = int(tokens[at + 2]) - 1
                    found.append(self.concept_of(values))
                    values = {}
        return found


def grammar(concepts: int, vocab_size: int) -> Grammar:
    """The caption grammar of ``concepts`` concepts in at most ``vocab_size`` words: the concepts' phrase words,
    the core fillers, then as many optional fillers as fit. Refused in one line naming the setting."""
    if concepts < CONCEPTS_PER_IMAGE:
        raise UserInputError(
            f"prepare.concepts: an image shows {CONCEPTS_PER_IMAGE} distinct concepts, so at least "
            f"{CONCEPTS_PER_IMAGE}; got {concepts}"
        )
    bare = Grammar(concepts, attribute_counts(concepts), BARE_SLOTS)
    phrases = len(bare.concept_words())
    if vocab_size < phrases + len(CORE_FILLERS):
        grid = " × ".join(f"{count} {name}" for count, name in zip(bare.counts, ATTRIBUTE_NAMES, strict=False))
        numbers = f"; then 'number 1' to 'number {bare.counts[-1]}'" if bare.numbered else ""
        raise UserInputError(
            f"prepare.vocab_size: {concepts} concepts need at least {phrases + len(CORE_FILLERS)} words: {phrases} "
            f"for their phrases ({grid}, {SYNONYMS} synonyms each{numbers}) and {', '.join(CORE_FILLERS)}; "
            f"got {vocab_size}"
        )
    return Grammar(concepts, bare.counts, admitted_fillers(vocab_size - phrases))


def attribute_counts(concepts: int) -> tuple[int, ...]:
    """Values in use per attribute ``[A]``: colour and shape raised in turn until they name at least ``concepts``
    combinations with at least ``concepts`` values in all (or all 12 of each); size, then texture, join (with 2
    values, as 1 would say nothing) and grow only while combinations are short; past the lexicon, a count of
    numbers.

    Why as many values as concepts: each value then names about two concepts, and two concepts share at most one
    value (part of their appearance). With fewer (5 colours × 5 shapes for the quickstart's 24 concepts) words name
    five, and the quickstart's first model fell to test rSum 184.9 from 254.0 (seed 0, openers and scenes on nearly
    every caption).
    """
    capacity = [len(values) for values in ATTRIBUTES]
    counts = [1, 1]
    while math.prod(counts) < concepts or sum(counts) < concepts:
        growable = [a for a, count in enumerate(counts) if count < capacity[a]]
        if growable:
            counts[min(growable, key=lambda a: counts[a])] += 1
        elif math.prod(counts) >= concepts or len(counts) == len(capacity):
            break
        else:
            counts.append(2)
    numbers = -(-concepts // math.prod(counts))
    return (*counts, numbers) if numbers > 1 else tuple(counts)


def admitted_fillers(budget: int) -> dict[str, tuple[Words, ...]]:
    """Each filler slot's options within ``budget`` filler words: the core, then :data:`FILLERS` in order while
    each one's new words fit."""
    words = set(CORE_FILLERS)
    slots = {slot: list(options) for slot, options in BARE_SLOTS.items()}
    for slot, option in FILLERS:
        new = set(option) - words
        if len(words) + len(new) <= budget:
            words |= new
            slots[slot].append(option)
    return {slot: tuple(options) for slot, options in slots.items()}


def _pick(options: Sequence[Any], draw: float) -> Any:
    return options[min(int(draw * len(options)), len(options) - 1)]


def _sometimes(options: Sequence[Words], draw: float) -> Words:
    """An optional slot: its first option (nothing) unless ``draw`` < :data:`FRAME_CHANCE`, then one of the rest."""
    if draw >= FRAME_CHANCE or len(options) == 1:
        return options[0]
    chosen: Words = _pick(options[1:], draw / FRAME_CHANCE)
    return chosen


def _article(article: Words, word: str) -> Words:
    return ("an",) if article == (INDEFINITE,) and word[0] in "aeiou" else article


def appearance(language: Grammar, rng: np.random.Generator, dim: int) -> np.ndarray:
    """Concept appearances ``[C, F]``: per concept the sum of one random ``N(0, I)`` vector per value (numbers
    included), over sqrt(A) to keep unit variance per channel.

    Why composed rather than one random vector per concept (as the earlier ``w0123`` captions had): with words that
    each name two concepts, independent appearances leave the text tower to learn which colour goes with which
    shape, and the quickstart's first model fell to test rSum 215.2 from 243.6 composed (seeds 0-2, openers and
    scenes on nearly every caption).
    """
    vectors = [rng.normal(size=(count, dim)) for count in language.counts]
    values = np.array([language.values(concept) for concept in range(language.concepts)])
    parts = [vectors[a][values[:, a]] for a in range(len(vectors))]
    result: np.ndarray = np.sum(parts, axis=0) / np.sqrt(len(parts))
    return result


PEAK_BYTES_PER_VALUE = 3 * 8
"""Generating one split's regions holds about three float64 arrays of its ``[N, R, F]`` values at once."""
CAPTION_BYTES = 56
"""About what one caption of colour × shape phrases takes on disk (UTF-8 and its newline): 53 on average
measured over 20,000, 98 at most."""
PHRASE_WORD_BYTES = 14
"""... and what each further word of a phrase adds (a size, a texture, ``number K``): 2.5 phrases of a caption
× ~6 bytes; measured 66, 84 and 107 bytes on average with 3, 4 and 6 words a phrase (estimates 70, 84, 112)."""
STRING_BYTES = 57 + DRAWS * 8
"""What a caption takes in memory besides its text: a Python string's header and list slot, and its draws."""


def caption_bytes(concepts: int) -> int:
    """About the UTF-8 bytes of one caption of ``concepts`` concepts (with its newline)."""
    phrase = Grammar(concepts, attribute_counts(concepts), BARE_SLOTS).phrase(0)
    return CAPTION_BYTES + PHRASE_WORD_BYTES * (len(phrase) - 2)


def needed_bytes(config: PrepareConfig) -> tuple[int, int]:
    """``(memory, disk)``: the peak memory generating the largest split takes, and the bytes of the dataset
    folder, estimated from the sizes alone (before anything is allocated)."""
    counts = (config.train_images, config.dev_images, config.test_images)
    values = [n * config.regions * config.region_dim for n in counts]
    captions = [n * config.captions_per_image for n in counts]
    text = caption_bytes(config.concepts)
    memory = max(v * PEAK_BYTES_PER_VALUE + c * (text + STRING_BYTES) for v, c in zip(values, captions, strict=True))
    disk = sum(values) * 4 + sum(captions) * text
    return memory, disk


def check_size(config: PrepareConfig, out: Path) -> None:
    """Refuse too few concepts or a ``vocab_size`` too small for their phrases (:func:`grammar`), and sizes whose
    generation would not fit in the memory available now or on the disk of ``out``, with the numbers, instead of
    running for minutes and failing (or swapping) half-way."""
    from gssf_cli.core.files import available_memory, format_bytes, free_disk

    grammar(config.concepts, config.vocab_size)
    memory, disk = needed_bytes(config)
    sizes = (
        f"{config.train_images:,}/{config.dev_images:,}/{config.test_images:,} train/dev/test images of "
        f"{config.regions} x {config.region_dim} regions"
    )
    fix = "lower --train-images/--dev-images/--test-images, --regions or --region-dim"
    available = available_memory()
    if available is not None and memory > available:
        raise UserInputError(
            f"prepare: {sizes} need about {memory:,} bytes ({format_bytes(memory)}) of memory to generate, but "
            f"this machine has {available:,} bytes ({format_bytes(available)}) available; {fix}"
        )
    free = free_disk(out.parent)
    if free is not None and disk > free:
        raise UserInputError(
            f"prepare: {sizes} take about {disk:,} bytes ({format_bytes(disk)}) on disk, but {out.parent} has "
            f"{free:,} bytes ({format_bytes(free)}) free; {fix}"
        )


def write_synthetic(config: PrepareConfig, folder: Path) -> dict[str, Any]:
    """Write each split's ``{split}_ims.npy`` ``[N, R, F]`` and ``{split}_caps.txt`` (``captions_per_image`` lines
    per image, in image order), the latent truth — each image's concepts ``{split}_concepts.npy`` ``[N, 3]`` and
    the concept each region shows ``{split}_region_concepts.npy`` ``[N, R]`` (-1: clutter) and the concepts each
    caption names ``{split}_caption_concepts.npy`` ``[kN, 3]``, int16, which intra-modal relevance and region
    insufficiency read — and the train captions' ``vocab.json``; return the manifest fields."""
    language = grammar(config.concepts, config.vocab_size)
    rng = np.random.default_rng(config.seed)
    dim, regions = config.region_dim, config.regions
    looks = appearance(language, rng, dim)
    backgrounds = rng.normal(size=(BACKGROUNDS, dim))
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)

    counts = {"train": config.train_images, "dev": config.dev_images, "test": config.test_images}
    splits: dict[str, Any] = {}
    train_captions: list[str] = []
    for split in SPLITS:
        n = counts[split]
        image_concepts = np.stack([rng.choice(config.concepts, CONCEPTS_PER_IMAGE, replace=False) for _ in range(n)])
        ims, region_concepts = _regions(rng, image_concepts, looks, backgrounds, mixing, regions)
        draws = rng.random((n, config.captions_per_image, DRAWS))
        captions = [language.caption(shown, row) for shown, rows in zip(image_concepts, draws, strict=True)
                    for row in rows]  # fmt: skip
        np.save(folder / f"{split}_ims.npy", ims)
        np.save(folder / f"{split}_concepts.npy", image_concepts.astype(np.int16))
        np.save(folder / f"{split}_region_concepts.npy", region_concepts)
        np.save(folder / f"{split}_caption_concepts.npy", _named(language, captions))
        (folder / f"{split}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
        if split == "train":
            train_captions = captions
        splits[split] = {"images": n, "captions": len(captions)}

    vocab = build_vocabulary(train_captions, min_count=1)
    vocab.save(folder / "vocab.json")
    return {
        "task": "cross_modal",
        "captions_per_image": config.captions_per_image,
        "modalities": {
            "image": {"type": "regions", "shape": [regions, dim], "dtype": "float32"},
            "text": {"type": "captions", "vocab_size": len(vocab), "tokenizer": vocab.to_json()["tokenizer"]},
        },
        "splits": splits,
        "source": "generated",
        "seed": config.seed,
    }


def _named(language: Grammar, captions: list[str]) -> np.ndarray:
    """The concepts each caption names ``[M, 3]`` int16 (-1 pads): the latent truth of text→text relevance."""
    named = np.full((len(captions), CONCEPTS_PER_IMAGE), -1, dtype=np.int16)
    for row, caption in enumerate(captions):
        concepts = language.parse(caption)
        named[row, : len(concepts)] = concepts
    return named


def _regions(
    rng: np.random.Generator,
    image_concepts: np.ndarray,
    appearance: np.ndarray,
    backgrounds: np.ndarray,
    mixing: np.ndarray,
    regions: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Region features ``[N, R, F]`` float32 in random order, and the concept each region shows ``[N, R]`` int16
    (-1: clutter)."""
    n, k = image_concepts.shape
    dim = appearance.shape[1]
    out = np.empty((n, regions, dim))
    shown = min(k, regions)
    out[:, :shown] = appearance[image_concepts[:, :shown]]
    clutter = regions - shown
    if clutter:
        out[:, shown:] = backgrounds[rng.integers(0, len(backgrounds), size=(n, clutter))]
    out += 0.5 * rng.normal(size=out.shape)
    order = np.argsort(rng.random((n, regions)), axis=1)
    out = np.take_along_axis(out, order[:, :, None], axis=1)
    shows = np.full((n, regions), -1, dtype=np.int16)
    shows[:, :shown] = image_concepts[:, :shown]
    return np.maximum(out @ mixing, 0.0).astype(np.float32), np.take_along_axis(shows, order, axis=1)
