"""The demo's own data, generated deterministically: the project runs without any shared data set.

Three corpora in the formats the real readers handle, each with the defects curation must catch:

- `demo_web`   JSONL (Dolma/C4 style): encyclopedic paragraphs, with cookie/nav boilerplate lines,
               exact and near duplicates, e-mail addresses and phone numbers, junk pages, and one page
               that quotes an item of the sealed demo eval set (the contamination firewall's target).
- `demo_forum` StackExchange-style XML (Posts, Comments, Users): questions, answers and comments by
               forum users (users become data subjects), including the DSR demo's canary user.
- `demo_books` two plain-text "books" with Project Gutenberg-style header and footer.

Plus instruction data (SFT), preference pairs (safety refusals) and the sealed demo eval items come
from `flywheel.tasks` generators with disjoint seeds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from xml.sax.saxutils import escape

NOUNS = ["otter", "lighthouse", "kettle", "village", "harbor", "train", "library", "bee", "mill", "fox", "reef", "turbine", "bridge", "violin", "marsh", "garden", "tower", "fleet", "forest", "station", "canal", "orchard", "quarry", "meadow", "glacier", "bakery", "workshop", "ferry", "observatory", "market", "vineyard", "chapel", "tunnel", "island", "valley", "archive", "printer", "loom", "compass", "lantern", "kiln", "granary", "windmill", "aqueduct", "beacon", "furnace", "harvest", "ledger", "museum", "pier", "plateau", "reservoir", "schooner", "telescope", "terrace", "theater", "vault", "waterfall", "weaver", "wharf", "sawmill", "cathedral", "dune", "estuary", "fjord", "geyser", "lagoon", "moor", "prairie", "savanna", "tundra", "volcano", "canyon", "delta", "basin", "ridge", "summit"]
ADJECTIVES = ["old", "quiet", "copper", "narrow", "northern", "wooden", "famous", "ancient", "busy", "small", "hidden", "coastal", "eastern", "restored", "tall", "crowded", "remote", "sheltered", "painted", "stone", "iron", "modest", "seasonal", "rural", "western", "southern", "gentle", "weathered", "sturdy", "colorful", "historic", "humble", "lively", "peaceful", "rugged", "silent", "sunny", "windy", "frozen", "fertile", "grand", "hollow", "misty", "rocky", "sandy", "shallow", "steep", "vast"]
VERBS = ["protects", "connects", "feeds", "shelters", "outlasts", "reflects", "measures", "follows", "welcomes", "supplies", "guides", "warms", "divides", "records", "carries", "surrounds", "attracts", "inspires", "overlooks", "borders", "crosses", "drains", "employs", "hosts", "limits", "marks", "powers", "preserves", "reaches", "serves", "shapes", "supports"]
PREPS = ("near", "beside", "above", "below", "behind", "across from", "north of", "south of", "around", "along")
ADVERBS = ("quietly", "steadily", "each spring", "throughout the year", "after heavy rain", "at dawn",
           "in most years", "without fail", "during the harvest", "when the wind turns", "every autumn",
           "on busy weekends", "in the long winters", "since the flood", "for most visitors")
FACTS = [
    "It was first described in {year} by a traveling naturalist named {name}.",
    "Locals say the {adj} {noun} has changed very little since {year}.",
    "A survey in {year} counted {n} of them along the {adj} {noun}.",
    "The name comes from an older word for {noun}, according to a {year} dictionary.",
    "Records from {year} mention it in a letter about the {noun} trade.",
    "Engineers measured a typical span of {n} meters in {year}.",
    "By {year} roughly {n} families depended on the {noun} for work.",
    "Visitors in {year} described the {noun} as {adj} and {adj2}.",
]
FIRST = ["Alice", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lina"]
LAST = ["Moreau", "Okafor", "Silva", "Tanaka", "Novak", "Haddad", "Larsen", "Costa", "Weber", "Rossi"]
SUBJECTS = [f"the {a} {n}" for a, n in zip(ADJECTIVES, NOUNS)]
OBJECTS = [f"the {n}" for n in NOUNS]
BOILERPLATE = [
    "We use cookies to improve your experience. By continuing you accept our cookie policy.",
    "Home | About | Contact | Privacy | Terms",
    "Subscribe to our newsletter for weekly updates.",
    "© 2026 Example Media Group. All rights reserved.",
]
# The DSR demo's canary: unique strings that must vanish from every store after erasure.
CANARY_USER = {"id": 4471, "name": "Quentin Zebrowski-Canary", "email": "quentin.canary.4471@example.org"}
CANARY_TEXT = "CANARY-7c1e-zebra-lantern"
CANARY_TITLE = "Why did the zebra lantern guild disband in 1871?"  # a question title only the canary wrote


def _sentence(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        s = (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} "
             f"{rng.choice(PREPS)} the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(ADVERBS)}.")
    elif r < 0.6:
        s = (f"In the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}, a {rng.choice(NOUNS)} {rng.choice(VERBS)} "
             f"{rng.randint(2, 90)} {rng.choice(NOUNS)}s {rng.choice(ADVERBS)}.")
    elif r < 0.8:
        s = (f"Few places {rng.choice(VERBS).removesuffix('s')} a {rng.choice(NOUNS)} as well as the "
             f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(PREPS)} the {rng.choice(NOUNS)}.")
    else:
        s = rng.choice(FACTS).format(year=rng.randint(1820, 2020), n=rng.randint(3, 900), noun=rng.choice(NOUNS),
                                     adj=rng.choice(ADJECTIVES), adj2=rng.choice(ADJECTIVES),
                                     name=f"{rng.choice(FIRST)} {rng.choice(LAST)}")
    return s


def paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def write_web(path: Path, *, n: int = 700, seed: int = 1, contamination: str | None = None) -> Path:
    rng = random.Random(seed)
    docs: list[dict] = []
    for i in range(n):
        text = "\n\n".join(paragraph(rng, rng.randint(3, 7)) for _ in range(rng.randint(2, 5)))
        if rng.random() < 0.35:
            text = rng.choice(BOILERPLATE[:2]) + "\n" + text + "\n" + rng.choice(BOILERPLATE[2:])
        if rng.random() < 0.1:
            name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
            text += f"\n\nContact {name} at {name.split()[0].lower()}.{rng.randint(10, 99)}@example.com or +1 415 555 {rng.randint(1000, 9999)}."
        docs.append({"id": f"web-{i:05d}", "text": text, "source": "demo_web", "added": "2026-10-01T00:00:00Z",
                     "url": f"https://example.org/page/{i}"})
    for i in range(n // 20):  # exact duplicates (mirrors)
        src = docs[rng.randrange(len(docs))]
        docs.append({**src, "id": f"web-dup-{i:04d}", "url": src["url"] + "?mirror=1"})
    for i in range(n // 20):  # near duplicates (light edits)
        src = docs[rng.randrange(n)]
        words = src["text"].split(" ")
        for _ in range(max(1, len(words) // 40)):
            words[rng.randrange(len(words))] = rng.choice(NOUNS)
        docs.append({**src, "id": f"web-near-{i:04d}", "text": " ".join(words), "url": src["url"] + "?v=2"})
    for i in range(12):  # junk a quality filter must drop
        junk = rng.choice([
            "ok",
            "$$$ ### @@@ %%% !!! *** ^^^ &&& " * 8,
            "\n".join(f"• item {k}" for k in range(40)),
            ("buy now " * 60).strip(),
        ])
        docs.append({"id": f"web-junk-{i:03d}", "text": junk, "source": "demo_web", "added": "2026-10-01T00:00:00Z",
                     "url": f"https://spam.example/{i}"})
    if contamination:
        docs.append({"id": "web-leak-0001", "source": "demo_web", "added": "2026-10-02T00:00:00Z",
                     "url": "https://example.org/answers", "text": paragraph(rng, 3) + "\n\nQuiz answer key: "
                     + contamination + "\n\n" + paragraph(rng, 2)})
    rng.shuffle(docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    return path


def write_forum(directory: Path, *, users: int = 30, posts: int = 160, seed: int = 2) -> Path:
    """StackExchange-style Posts.xml / Comments.xml / Users.xml."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    people = [{"id": 100 + k, "name": f"{rng.choice(FIRST)}{rng.choice(LAST)}{k}"} for k in range(users)]
    people.append({"id": CANARY_USER["id"], "name": CANARY_USER["name"]})
    u_rows = [f'  <row Id="{p["id"]}" DisplayName="{escape(p["name"])}" CreationDate="2025-01-0{1 + p["id"] % 9}T10:00:00.000" Reputation="{rng.randint(1, 900)}" />'
              for p in people]
    p_rows, c_rows = [], []
    post_id, comment_id = 1, 1
    questions: list[int] = []
    for k in range(posts):
        author = people[-1] if k % 40 == 7 else rng.choice(people[:-1])
        body = f"<p>{escape(paragraph(rng, rng.randint(4, 8)))}</p>"
        if author["id"] == CANARY_USER["id"]:
            body += f"<p>My name is {escape(CANARY_USER['name'])}, write to {CANARY_USER['email']}. {CANARY_TEXT}</p>"
        if questions and rng.random() < 0.55:
            parent = rng.choice(questions)
            p_rows.append(f'  <row Id="{post_id}" PostTypeId="2" ParentId="{parent}" CreationDate="2025-03-{1 + k % 28:02d}T12:00:00.000" Score="{rng.randint(-2, 30)}" Body="{escape(body, {chr(34): "&quot;"})}" OwnerUserId="{author["id"]}" />')
        else:
            title = escape(f"Why does {rng.choice(SUBJECTS)} {rng.choice(VERBS).rstrip('s')} {rng.choice(OBJECTS)}?")
            if author["id"] == CANARY_USER["id"]:
                title = escape(CANARY_TITLE)  # answers by other people reply to it
            p_rows.append(f'  <row Id="{post_id}" PostTypeId="1" CreationDate="2025-03-{1 + k % 28:02d}T11:00:00.000" Score="{rng.randint(0, 50)}" Title="{title}" Tags="&lt;history&gt;" Body="{escape(body, {chr(34): "&quot;"})}" OwnerUserId="{author["id"]}" />')
            questions.append(post_id)
        for _ in range(rng.randint(0, 2)):
            commenter = people[-1] if (post_id + comment_id) % 53 == 0 else rng.choice(people[:-1])
            text = _sentence(rng)
            if commenter["id"] == CANARY_USER["id"]:
                text += f" ({CANARY_TEXT})"
            c_rows.append(f'  <row Id="{comment_id}" PostId="{post_id}" Score="0" Text="{escape(text, {chr(34): "&quot;"})}" CreationDate="2025-03-{1 + k % 28:02d}T13:00:00.000" UserId="{commenter["id"]}" />')
            comment_id += 1
        post_id += 1
    for name, rows in (("Posts.xml", p_rows), ("Comments.xml", c_rows), ("Users.xml", u_rows)):
        tag = name.removesuffix(".xml").lower()
        (directory / name).write_text(f'<?xml version="1.0" encoding="utf-8"?>\n<{tag}>\n' + "\n".join(rows) + f"\n</{tag}>\n")
    return directory


def write_books(directory: Path, *, seed: int = 3) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for k, title in enumerate(["A Year Beside the Salt Marsh", "Letters from the Clock Tower"]):
        chapters = "\r\n\r\n".join(
            f"CHAPTER {c + 1}\r\n\r\n" + "\r\n\r\n".join(paragraph(rng, rng.randint(4, 8)) for _ in range(6))
            for c in range(8)
        )
        text = (
            f"The Project Gutenberg eBook of {title}\r\n\r\nThis eBook is for the use of anyone anywhere at no cost.\r\n\r\n"
            f"Title: {title}\r\nAuthor: Demo Author {k + 1}\r\nLanguage: English\r\n\r\n"
            f"*** START OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\r\n\r\n{chapters}\r\n\r\n"
            f"*** END OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\r\n\r\n"
            "Updated editions will replace the previous one. Section 1. General Terms of Use.\r\n"
        )
        (directory / f"book_{k + 1}.txt").write_bytes(text.encode())
    return directory


def write_structured(path: Path, *, n_docs: int = 500, seed: int = 4) -> Path:
    """Structured text for pretraining (the seed: include JSON, tables, logs): JSON records and worked
    question/answer pages drawn from the *train* split of the structured-task generators."""
    from models.evalsets import generate_arithmetic_task, generate_json_task

    rng = random.Random(seed)
    tasks = generate_json_task(n_docs * 3, seed) + generate_arithmetic_task(n_docs * 2, seed)
    rng.shuffle(tasks)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n_docs):
            chunk = tasks[i * 5:(i + 1) * 5]
            intro = paragraph(rng, 2)
            body = "\n\n".join(f"Question: {t['prompt']}\nAnswer: {t['answer']}" for t in chunk)
            f.write(json.dumps({"id": f"structured-{i:05d}", "text": f"{intro}\n\n{body}", "source": "demo_structured",
                                "added": "2026-10-03T00:00:00Z", "url": f"https://example.org/records/{i}"}) + "\n")
    return path


def write_eval_tasks(path: Path, *, n_json: int = 60, n_arith: int = 60) -> list[dict]:
    """The demo's sealed eval items (JSON formatting + arithmetic, eval split) as JSONL."""
    from models.evalsets import EVAL_SEED, generate_arithmetic_task, generate_json_task

    items = generate_json_task(n_json, EVAL_SEED, split="eval") + generate_arithmetic_task(n_arith, EVAL_SEED, split="eval")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": it["id"], "prompt": it["prompt"], "answer": it["answer"], "task": it.get("task")}) + "\n" for it in items)
    return items


def write_all(root: Path) -> dict[str, Path]:
    """Everything the demo reads, under `root` (the demo's data root). Idempotent: same bytes each run."""
    from flywheel.tasks import write_harmful_eval

    evals = write_eval_tasks(root / "evals" / "demo_tasks.jsonl")
    write_harmful_eval(root / "evals" / "harmful.jsonl")
    leak = evals[0]
    return {
        "demo_web": write_web(root / "corpora" / "demo_web.jsonl", contamination=f"{leak['prompt']} {leak['answer']}"),
        "demo_forum": write_forum(root / "corpora" / "demo_forum"),
        "demo_books": write_books(root / "corpora" / "demo_books"),
        "demo_structured": write_structured(root / "corpora" / "demo_structured.jsonl"),
        "evals": root / "evals" / "demo_tasks.jsonl",
    }
