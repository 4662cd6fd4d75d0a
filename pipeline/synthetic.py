"""The built-in synthetic knowledge base: the demo's data, and a controlled test bed for latent retrieval.

Every entity is a fictional person ("Varnel Ostrik") with eight facts (birthplace, employer, mentor, year a
workshop was founded, invention, instrument, home river, rival). Names, towns, organisations, objects and rivers
are built from random syllables, so no pretrained model knows an answer: the generator has to read it.
An entity's facts are spread over three or four passages of two or three sentences each, all titled with
the entity's name. A question names the entity, so it matches every passage of that entity, and only the
relation tells them apart: a frozen MiniLM gets recall@1 of about 0.5-0.6 and recall@5 near 1, and that gap
is what training the retriever closes.

Each fact has one question, worded differently from its passage sentence (different verbs and nouns), drawn
from two or three paraphrase templates. Facts are split into train/dev/test, so each question lives in
exactly one split. ``template_set="alt"`` keeps the same entities, facts, passage grouping, ids and splits
but words every passage and question with a disjoint set of templates: a test of generalisation to unseen
wording. Everything is deterministic given ``seed``.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data import write_jsonl

RELATIONS = ("birthplace", "employer", "mentor", "founded", "invention", "instrument", "river", "rival")

# Passage sentences: {name} is the entity (full name or surname), {ans} the answer string, verbatim.
# Question templates: {name} is always the full name. Verbs and nouns differ from the passage sentences.
TEMPLATES: dict[str, dict[str, dict[str, list[str]]]] = {
    "default": {
        "passage": {
            "birthplace": ["{name} was born in {ans}.", "{name} was born in the town of {ans}."],
            "employer": ["{name} worked for the {ans} for many years.",
                         "For most of a long career, {name} was employed by the {ans}."],
            "mentor": ["{name} trained under {ans}.", "{name} learned the craft as an apprentice of {ans}."],
            "founded": ["{name} opened a workshop in {ans}.", "In {ans}, {name} founded a small workshop."],
            "invention": ["{name} invented the {ans}.", "{name} is remembered as the creator of the {ans}."],
            "instrument": ["{name} played the {ans} every evening.", "{name} enjoyed playing the {ans} at festivals."],
            "river": ["{name} grew up on the banks of the river {ans}.",
                      "{name} spent a childhood beside the river {ans}."],
            "rival": ["{name} had a long rivalry with {ans}.", "{name} competed bitterly with {ans}."],
        },
        "question": {
            "birthplace": ["Which town is {name}'s birthplace?", "Where did {name} come into the world?",
                           "In what town did {name}'s life begin?"],
            "employer": ["Which organisation employed {name}?", "Who paid {name}'s wages?",
                         "What institution was {name} on the staff of?"],
            "mentor": ["Who mentored {name}?", "Who was {name}'s teacher?", "Under whose guidance did {name} study?"],
            "founded": ["When did {name} establish a workshop?", "What year saw {name} set up a workshop?",
                        "In which year did {name} start a workshop?"],
            "invention": ["What device is {name} credited with creating?", "Which contraption did {name} devise?",
                          "What is {name}'s best-known invention?"],
            "instrument": ["Which instrument did {name} love to perform on?", "What did {name} make music with?",
                           "What instrument was {name} fondest of?"],
            "river": ["Which river flowed past {name}'s childhood home?", "By what river was {name} raised?",
                      "Near which waterway did {name} spend the early years?"],
            "rival": ["Who was {name}'s rival?", "Whom did {name} compete against?",
                      "Which person was {name}'s great adversary?"],
        },
    },
    "alt": {
        "passage": {
            "birthplace": ["{ans} is the hometown of {name}.", "{name} first drew breath in {ans}."],
            "employer": ["{name} held a post at the {ans}.", "The {ans} gave {name} a job and kept it for decades."],
            "mentor": ["{ans} taught {name} everything about the trade.",
                       "{name} was a pupil of {ans} in youth."],
            "founded": ["The workshop of {name} opened its doors in {ans}.",
                        "{name} set up a workbench of their own in {ans}."],
            "invention": ["The {ans} was designed by {name}.", "{name} built the very first {ans}."],
            "instrument": ["{name} performed on the {ans} in public halls.",
                           "Music for {name} meant the {ans}, heard from the window most nights."],
            "river": ["The {ans} flowed past the house where {name} was a child.",
                      "As a youngster, {name} fished in the {ans}."],
            "rival": ["{ans} and {name} were bitter adversaries.", "{name} never forgave {ans}, an old foe."],
        },
        "question": {
            "birthplace": ["What is the native town of {name}?", "{name} hails from which place?"],
            "employer": ["Where did {name} have a job?", "Which body had {name} on its payroll?",
                         "{name} was an employee of which organisation?"],
            "mentor": ["Who instructed {name}?", "Who was the master of {name}?",
                       "From whom did {name} receive training?"],
            "founded": ["In what year did {name} begin running a workshop?",
                        "When was {name}'s workshop established?"],
            "invention": ["What did {name} invent?", "Which machine is credited to {name}?",
                          "What creation made {name} famous?"],
            "instrument": ["What instrument did {name} play?", "Which instrument is {name} associated with?"],
            "river": ["Which river ran beside {name}'s childhood house?", "What river did {name} know as a youngster?",
                      "Beside which river did {name} grow up?"],
            "rival": ["Who was the enemy of {name}?", "With whom did {name} feud?",
                      "Who did {name} regard as a rival?"],
        },
    },
    # Only for pre-training the shipped reader (jobs/pretrain_reader.py): wording disjoint from "default" and
    # "alt", so the demo's knowledge base and the held-out one are both unseen wording for it.
    "reading": {
        "passage": {
            "birthplace": ["The birth of {name} took place in {ans}.", "{ans} was where {name} arrived as a baby.",
                           "Records list {ans} as the place where {name} was delivered."],
            "employer": ["{name} drew a salary from the {ans}.", "The {ans} counted {name} among its workers.",
                         "For decades the {ans} relied on {name}."],
            "mentor": ["{name} studied at the side of {ans}.", "{ans} coached the young {name}.",
                       "The tutor of {name} was {ans}."],
            "founded": ["{name} launched a workshop in the year {ans}.", "{ans} was the year {name} began a workshop.",
                        "A workshop run by {name} started up in {ans}."],
            "invention": ["{name} came up with the {ans}.", "The {ans} is the brainchild of {name}.",
                          "People credit {name} with the {ans}."],
            "instrument": ["{name} practised the {ans} daily.", "The {ans} was the instrument of {name}.",
                           "Crowds heard {name} on the {ans}."],
            "river": ["{name} swam in the river {ans} as a child.", "The river {ans} ran near the first home of {name}.",
                      "Young {name} lived close to the {ans}."],
            "rival": ["{name} quarrelled for years with {ans}.", "{ans} opposed {name} at every turn.",
                      "The great competitor of {name} was {ans}."],
        },
        "question": {
            "birthplace": ["Where was {name} delivered?", "What place saw the birth of {name}?",
                           "Name the birth town of {name}."],
            "employer": ["Who gave {name} a salary?", "Which outfit counted {name} among its workers?",
                         "Name the organisation that relied on {name}."],
            "mentor": ["Who coached {name}?", "Who tutored {name}?", "At whose side did {name} study?"],
            "founded": ["In which year did {name} launch a workshop?", "When did the workshop of {name} start up?",
                        "What year did {name} begin a workshop?"],
            "invention": ["What did {name} come up with?", "What is the brainchild of {name}?",
                          "Which device do people credit to {name}?"],
            "instrument": ["What did {name} practise daily?", "On what instrument did crowds hear {name}?",
                           "Name the instrument of {name}."],
            "river": ["In which river did {name} swim as a child?", "What river ran near the first home of {name}?",
                      "Which river did young {name} live close to?"],
            "rival": ["With whom did {name} quarrel?", "Who opposed {name} at every turn?",
                      "Name the great competitor of {name}."],
        },
    },
}

# syllables for fictional names
_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "qu", "r", "s", "st", "t", "th",
           "tr", "v", "w", "z", "sk", "fen", "ol"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ai", "ei", "ou", "y"]
_CODAS = ["", "", "", "l", "n", "r", "rn", "s", "th", "ck", "nd", "m", "x", "v", "rk", "st"]
_FIRST_ENDINGS = ["el", "an", "is", "o", "a", "en", "ric", "wyn", "ia", "or", "et", "us"]
_LAST_ENDINGS = ["rik", "ston", "vane", "more", "dell", "wick", "quist", "by", "mont", "ley", "ard", "ow", "ix"]
_TOWN_SUFFIXES = ["dale", "mouth", "ford", "wick", "holm", "stead", "moor", "haven", "bury", "gate", "thorpe", "ness"]
_ORG_KINDS = ["Guild", "Institute", "Foundry", "Society", "Works", "Academy", "Observatory", "Company", "Collective",
              "Trust", "Assembly", "Bureau"]
_INVENTION_KINDS = ["lens", "loom", "engine", "compass", "valve", "lantern", "press", "clock", "pump", "kiln",
                    "sextant", "telegraph", "barometer", "spindle", "furnace", "prism"]
_INSTRUMENT_SUFFIXES = ["horn", "harp", "phone", "lute", "pipe", "drum", "fiddle", "viol", "chord", "flute"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _root(rng: random.Random, syllables: int = 2) -> str:
    return "".join(_syllable(rng) for _ in range(syllables))


def _unique(rng: random.Random, make, count: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = make(rng)
        if value.lower() not in taken and 3 <= len(value.replace(" ", "")) <= 24:
            taken.add(value.lower())
            out.append(value)
    return out


@dataclass
class KnowledgeBase:
    """Passages ``{id, title, text}`` and QA splits ``{id, question, answers, gold_passage_ids}``."""

    passages: list[dict]
    train: list[dict]
    dev: list[dict]
    test: list[dict]
    meta: dict = field(default_factory=dict)

    @property
    def questions(self) -> list[dict]:
        return self.train + self.dev + self.test


def _entities(seed: int, num_entities: int) -> list[dict]:
    """Entities, their facts and the grouping of facts into passages: independent of the template set."""
    rng = random.Random(f"latentrag-synthetic-{seed}-entities")
    taken: set[str] = set()
    first_names = _unique(rng, lambda r: (_syllable(r) + r.choice(_FIRST_ENDINGS)).capitalize(),
                          max(20, num_entities // 3), taken)
    surnames = _unique(rng, lambda r: (_syllable(r) + r.choice(_LAST_ENDINGS)).capitalize(), num_entities, taken)
    names = [f"{rng.choice(first_names)} {surname}" for surname in surnames]
    pool = max(30, num_entities // 3)
    towns = _unique(rng, lambda r: (_syllable(r) + r.choice(_TOWN_SUFFIXES)).capitalize(), pool, taken)
    orgs = _unique(rng, lambda r: f"{_root(r).capitalize()} {r.choice(_ORG_KINDS)}", pool, taken)
    rivers = _unique(rng, lambda r: _root(r).capitalize(), pool, taken)
    instruments = _unique(rng, lambda r: _syllable(r) + r.choice(_INSTRUMENT_SUFFIXES), max(20, num_entities // 10),
                          taken)
    inventions = _unique(rng, lambda r: f"{_root(r).capitalize()} {r.choice(_INVENTION_KINDS)}", num_entities, taken)

    entities = []
    for i, name in enumerate(names):
        others = [j for j in range(num_entities) if j != i]
        mentor, rival = rng.sample(others, 2) if len(others) >= 2 else (others * 2)[:2]
        facts = {
            "birthplace": rng.choice(towns),
            "employer": rng.choice(orgs),
            "mentor": names[mentor],
            "founded": str(rng.randint(1620, 1890)),
            "invention": inventions[i],
            "instrument": rng.choice(instruments),
            "river": rng.choice(rivers),
            "rival": names[rival],
        }
        order = list(RELATIONS)
        rng.shuffle(order)
        sizes = [2, 2, 2, 2] if rng.random() < 0.5 else rng.choice([[3, 3, 2], [3, 2, 3], [2, 3, 3]])
        groups, start = [], 0
        for size in sizes:
            groups.append(order[start:start + size])
            start += size
        entities.append({"index": i, "name": name, "surname": name.split()[-1], "facts": facts, "groups": groups})
    return entities


def generate_knowledge_base(seed: int = 0, num_entities: int = 400, template_set: str = "default",
                            dev_fraction: float = 0.1, test_fraction: float = 0.1) -> KnowledgeBase:
    """Build the synthetic knowledge base (about 3.5 passages and 8 questions per entity). Deterministic by seed.

    Entities, facts, passage/question ids and the split of facts are the same for every ``template_set``;
    only the wording changes.
    """
    if template_set not in TEMPLATES:
        raise ValueError(f"template_set must be one of {sorted(TEMPLATES)}, got {template_set!r}")
    if num_entities < 3:
        raise ValueError(f"num_entities must be >= 3, got {num_entities}")
    if dev_fraction < 0 or test_fraction < 0 or dev_fraction + test_fraction >= 1:
        raise ValueError("dev_fraction and test_fraction must be >= 0 and sum to less than 1")
    templates = TEMPLATES[template_set]
    text_rng = random.Random(f"latentrag-synthetic-{seed}-{template_set}-text")

    passages: list[dict] = []
    questions: list[dict] = []
    for ent in _entities(seed, num_entities):
        for k, group in enumerate(ent["groups"]):
            pid = f"e{ent['index']:05d}-p{k}"
            sentences = []
            for n, relation in enumerate(group):
                name = ent["name"] if n == 0 else ent["surname"]
                sentence = text_rng.choice(templates["passage"][relation]).format(name=name,
                                                                                  ans=ent["facts"][relation])
                sentences.append(sentence[0].upper() + sentence[1:])
            passages.append({"id": pid, "title": ent["name"], "text": " ".join(sentences)})
            for relation in group:
                question = text_rng.choice(templates["question"][relation]).format(name=ent["name"])
                questions.append({"id": f"e{ent['index']:05d}-{relation}", "question": question,
                                  "answers": [ent["facts"][relation]], "gold_passage_ids": [pid],
                                  "relation": relation})

    split_rng = random.Random(f"latentrag-synthetic-{seed}-split")
    order = sorted(questions, key=lambda q: q["id"])
    split_rng.shuffle(order)
    n_test = int(round(len(order) * test_fraction))
    n_dev = int(round(len(order) * dev_fraction))
    test, dev, train = order[:n_test], order[n_test:n_test + n_dev], order[n_test + n_dev:]
    meta = {"seed": seed, "num_entities": num_entities, "template_set": template_set, "dev_fraction": dev_fraction,
            "test_fraction": test_fraction, "num_passages": len(passages), "num_questions": len(questions)}
    return KnowledgeBase(passages=passages, train=train, dev=dev, test=test, meta=meta)


def write_knowledge_base(kb: KnowledgeBase, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write corpus.jsonl, train.jsonl, dev.jsonl and test.jsonl (each atomically) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("corpus", kb.passages), ("train", kb.train), ("dev", kb.dev), ("test", kb.test)):
        path = out_dir / f"{name}.jsonl"
        write_jsonl(rows, path)
        paths[name] = str(path)
    return paths
