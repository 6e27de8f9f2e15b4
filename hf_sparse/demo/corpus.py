"""A seeded generator of English-like text, so demos, benchmarks and tests need no download.

The text has the kinds of structure that make a small language model's perplexity sensitive to
pruning: a Zipfian vocabulary, subject-verb agreement, recurring named characters within a story
(copying), counting sequences and small arithmetic facts.
"""

from __future__ import annotations

import random

__all__ = ["generate_corpus", "generate_documents"]

_NAMES = [
    "Alice",
    "Bruno",
    "Chen",
    "Dara",
    "Emil",
    "Farah",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Luca",
    "Mira",
    "Nadia",
    "Omar",
    "Petra",
    "Quinn",
    "Rosa",
    "Sami",
    "Tomas",
    "Uma",
    "Vera",
    "Wes",
    "Yara",
]
_NOUNS = [
    ("cat", "cats"),
    ("dog", "dogs"),
    ("bird", "birds"),
    ("farmer", "farmers"),
    ("teacher", "teachers"),
    ("child", "children"),
    ("river", "rivers"),
    ("tree", "trees"),
    ("house", "houses"),
    ("ship", "ships"),
    ("king", "kings"),
    ("queen", "queens"),
    ("horse", "horses"),
    ("baker", "bakers"),
    ("garden", "gardens"),
    ("letter", "letters"),
    ("window", "windows"),
    ("mountain", "mountains"),
    ("engine", "engines"),
    ("student", "students"),
    ("doctor", "doctors"),
    ("city", "cities"),
    ("book", "books"),
    ("stone", "stones"),
    ("lamp", "lamps"),
    ("boat", "boats"),
    ("fox", "foxes"),
    ("wolf", "wolves"),
    ("apple", "apples"),
    ("bridge", "bridges"),
    ("painter", "painters"),
    ("sailor", "sailors"),
    ("clock", "clocks"),
]
_VERBS = [
    ("sees", "see"),
    ("likes", "like"),
    ("follows", "follow"),
    ("finds", "find"),
    ("carries", "carry"),
    ("watches", "watch"),
    ("helps", "help"),
    ("paints", "paint"),
    ("builds", "build"),
    ("visits", "visit"),
    ("remembers", "remember"),
    ("forgets", "forget"),
    ("opens", "open"),
    ("cleans", "clean"),
]
_INTRANSITIVE = [
    ("sleeps", "sleep"),
    ("sings", "sing"),
    ("waits", "wait"),
    ("runs", "run"),
    ("laughs", "laugh"),
    ("works", "work"),
    ("rests", "rest"),
    ("travels", "travel"),
]
_ADJECTIVES = [
    "old",
    "young",
    "small",
    "large",
    "quiet",
    "bright",
    "dark",
    "happy",
    "tired",
    "clever",
    "green",
    "red",
    "cold",
    "warm",
    "gentle",
    "strange",
    "brave",
    "slow",
    "quick",
    "famous",
]
_PLACES = [
    "the village",
    "the forest",
    "the market",
    "the harbour",
    "the old mill",
    "the library",
    "the valley",
    "the castle",
    "the station",
    "the school",
    "the island",
    "the farm",
]
_TIMES = ["in the morning", "at night", "every day", "after dinner", "in winter", "on sunday", "at noon"]
_NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
]


def _zipf_choice(rng: random.Random, items: list, s: float = 1.1):
    weights = [1.0 / (rank + 1) ** s for rank in range(len(items))]
    return rng.choices(items, weights=weights, k=1)[0]


def _noun_phrase(rng: random.Random, plural: bool) -> str:
    noun = _zipf_choice(rng, _NOUNS)[1 if plural else 0]
    if rng.random() < 0.5:
        noun = f"{rng.choice(_ADJECTIVES)} {noun}"
    return f"the {noun}"


def _sentence(rng: random.Random, cast: list[str]) -> str:
    kind = rng.random()
    if kind < 0.30:  # a named character acts: copying names seen earlier in the story
        who = rng.choice(cast)
        verb = _zipf_choice(rng, _VERBS)[0]
        obj = _noun_phrase(rng, rng.random() < 0.4)
        tail = f" in {rng.choice(_PLACES)}" if rng.random() < 0.5 else ""
        return f"{who} {verb} {obj}{tail} ."
    if kind < 0.55:  # agreement: singular subject takes -s, plural does not
        plural = rng.random() < 0.5
        subject = _noun_phrase(rng, plural)
        if rng.random() < 0.5:
            verb = _zipf_choice(rng, _VERBS)[1 if plural else 0]
            return f"{subject} {verb} {_noun_phrase(rng, rng.random() < 0.5)} {rng.choice(_TIMES)} ."
        verb = _zipf_choice(rng, _INTRANSITIVE)[1 if plural else 0]
        return f"{subject} {verb} in {rng.choice(_PLACES)} ."
    if kind < 0.70:  # arithmetic facts
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{_NUMBERS[a]} plus {_NUMBERS[b]} is {_NUMBERS[a + b]} ."
    if kind < 0.80:  # counting
        start = rng.randint(0, 10)
        length = rng.randint(3, 6)
        return " ".join(_NUMBERS[start : start + length]) + " ."
    if kind < 0.92:  # two characters meet
        a, b = rng.sample(cast, 2)
        return f"{a} meets {b} at {rng.choice(_PLACES)[4:]} and {b} greets {a} ."
    who = rng.choice(cast)
    return (
        f"{who} is {rng.choice(_ADJECTIVES)} and {rng.choice(['very', 'rather', 'always'])} {rng.choice(_ADJECTIVES)} ."
    )


def generate_documents(n_docs: int, seed: int = 0, sentences: tuple[int, int] = (6, 14)) -> list[str]:
    """``n_docs`` short stories, each with its own cast of three named characters."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        cast = rng.sample(_NAMES, 3)
        count = rng.randint(*sentences)
        docs.append(" ".join(_sentence(rng, cast) for _ in range(count)))
    return docs


def generate_corpus(n_docs: int = 2000, seed: int = 0) -> str:
    """The documents of :func:`generate_documents` joined by blank lines, as one string."""
    return "\n\n".join(generate_documents(n_docs, seed=seed))
