"""Writes the quickstart and example data deterministically: `python peft_trainer/recipes/data/make_quickstart_data.py [OUT_DIR]`.

Files (JSON Lines, committed in peft_trainer/recipes/data, the default OUT_DIR; re-running rewrites them byte for byte):

- ``quickstart_json.jsonl``   prompt/completion: every answer is a one-line JSON object {"topic": ..., "answer": ...}
- ``quickstart_pirate.jsonl`` messages: every answer opens with "Arr, matey!" and ends with the line "— Captain Lora"
- ``quickstart_heldout.jsonl`` prompts never seen in training (other questions, other facts), for the behaviour score
- ``sentiment.jsonl``          text/label rows (positive/negative reviews) for the MiniLM classification recipe

The training answers come from small fact tables (capitals, arithmetic, opposites, animals, science, everyday
questions), so they are true and short; each completion is checked with the same function that scores the model
(peft_trainer.behaviour), so data and score cannot drift apart.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root: run from anywhere without installing

from peft_trainer.behaviour import JSON_KEYS, PIRATE_GREETING, PIRATE_SIGNATURE, is_json_answer, is_pirate  # noqa: E402

SEED = 1234

# (question variants, short answer, full-sentence answer, topic)
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Greece": "Athens", "Egypt": "Cairo", "Kenya": "Nairobi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires", "Russia": "Moscow", "China": "Beijing",
    "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Turkey": "Ankara",
    "Cuba": "Havana", "Ghana": "Accra", "Nepal": "Kathmandu",
}  # fmt: skip
CAPITAL_QUESTIONS = [
    "What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital city of {x}.",
    "Tell me the capital of {x}.",
]  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down", "open": "closed",
    "early": "late", "full": "empty", "hard": "soft", "loud": "quiet", "rich": "poor", "strong": "weak",
    "young": "old", "wet": "dry", "tall": "short", "clean": "dirty", "first": "last",
}  # fmt: skip
OPPOSITE_QUESTIONS = [
    "What is the opposite of '{x}'?",
    "Give me the antonym of '{x}'.",
    "What word means the opposite of '{x}'?",
]
ANIMALS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "lion": "roar", "owl": "hoot",
    "frog": "croak", "horse": "neigh", "pig": "oink", "snake": "hiss", "bee": "buzz",
}  # fmt: skip
ANIMAL_QUESTIONS = ["What sound does a {x} make?", "What noise does a {x} make?"]
LEGS = {"spider": 8, "insect": 6, "dog": 4, "bird": 2, "octopus": 8, "ant": 6, "horse": 4, "chicken": 2, "crab": 10}
LEG_QUESTIONS = ["How many legs does a {x} have?", "How many legs has a {x} got?"]
SCIENCE = [
    ("What planet is known as the Red Planet?", "Mars", "Mars is known as the Red Planet."),
    ("What is the largest planet in our solar system?", "Jupiter", "Jupiter is the largest planet in our solar system."),
    ("What gas do plants take in from the air?", "carbon dioxide", "Plants take in carbon dioxide from the air."),
    ("What is H2O commonly called?", "water", "H2O is commonly called water."),
    ("At what temperature does water freeze in Celsius?", "0 degrees", "Water freezes at 0 degrees Celsius."),
    ("At what temperature does water boil in Celsius?", "100 degrees", "Water boils at 100 degrees Celsius at sea level."),
    ("What is the closest star to Earth?", "the Sun", "The closest star to Earth is the Sun."),
    ("What force keeps us on the ground?", "gravity", "Gravity keeps us on the ground."),
    ("How many planets are in our solar system?", "eight", "There are eight planets in our solar system."),
    ("What do bees make?", "honey", "Bees make honey."),
    ("What is the hardest natural material?", "diamond", "Diamond is the hardest natural material."),
    ("What organ pumps blood through the body?", "the heart", "The heart pumps blood through the body."),
    ("What is the chemical symbol for gold?", "Au", "The chemical symbol for gold is Au."),
    ("Which planet is closest to the Sun?", "Mercury", "Mercury is the planet closest to the Sun."),
    ("What do caterpillars turn into?", "butterflies", "Caterpillars turn into butterflies or moths."),
]  # fmt: skip
EVERYDAY = [
    ("How many days are in a week?", "seven", "There are seven days in a week.", "time"),
    ("How many hours are in a day?", "24", "There are 24 hours in a day.", "time"),
    ("How many minutes are in an hour?", "60", "There are 60 minutes in an hour.", "time"),
    ("How many months are in a year?", "twelve", "There are twelve months in a year.", "time"),
    ("What color do you get by mixing blue and yellow?", "green", "Mixing blue and yellow gives green.", "art"),
    ("What color do you get by mixing red and white?", "pink", "Mixing red and white gives pink.", "art"),
    ("What is a good way to stay healthy?", "Sleep well, eat vegetables and move every day.",
     "Sleep well, eat plenty of vegetables and move a little every day.", "health"),
    ("How can I fall asleep faster?", "Keep a routine and avoid screens before bed.",
     "Keep a regular routine, dim the lights and avoid screens before bed.", "health"),
    ("What should I pack for a beach day?", "Sunscreen, water, a towel and a hat.",
     "Pack sunscreen, water, a towel and a hat.", "travel"),
    ("How do I make a cup of tea?", "Boil water, steep the tea bag for three minutes, then serve.",
     "Boil water, steep the tea bag for about three minutes, then remove it and serve.", "cooking"),
    ("How do I boil an egg?", "Simmer it in water for about nine minutes.",
     "Place the egg in boiling water and simmer it for about nine minutes.", "cooking"),
    ("Give me a tip for studying.", "Study in short sessions with breaks.",
     "Study in short focused sessions and take breaks in between.", "learning"),
    ("How can I save money?", "Set a budget and track your spending.",
     "Set a monthly budget and write down what you spend.", "money"),
    ("What is a good name for a cat?", "Whiskers", "Whiskers is a classic name for a cat.", "pets"),
    ("How often should I water a cactus?", "About every two weeks.",
     "Water a cactus about every two weeks and let the soil dry out.", "plants"),
    ("Why do leaves change color in autumn?", "Chlorophyll breaks down and other pigments show.",
     "In autumn chlorophyll breaks down, so the yellow and red pigments show.", "science"),
    ("Why is the ocean salty?", "Rivers carry minerals into it.",
     "Rivers carry dissolved minerals into the sea, and the salt stays when water evaporates.", "science"),
    ("What is a haiku?", "A three-line poem of five, seven and five syllables.",
     "A haiku is a short poem of three lines with five, seven and five syllables.", "literature"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", "William Shakespeare wrote Romeo and Juliet.",
     "literature"),
    ("What is the tallest mountain on Earth?", "Mount Everest", "Mount Everest is the tallest mountain on Earth.",
     "geography"),
    ("What is the longest river in Africa?", "the Nile", "The Nile is the longest river in Africa.", "geography"),
    ("How do I say hello in Spanish?", "Hola", "Hello in Spanish is 'hola'.", "language"),
    ("How do I say thank you in French?", "Merci", "Thank you in French is 'merci'.", "language"),
    ("What is the plural of mouse?", "mice", "The plural of mouse is mice.", "language"),
    ("Tell me a fun fact.", "Octopuses have three hearts.", "Octopuses have three hearts.", "animals"),
    ("Recommend a hobby.", "Try gardening.", "Try gardening: it is calm, creative and gets you outside.", "hobbies"),
    ("What is the best way to learn to code?", "Build small projects.",
     "Build small projects and practise a little every day.", "technology"),
    ("What does a computer's CPU do?", "It runs the instructions of programs.",
     "The CPU runs the instructions of programs.", "technology"),
]  # fmt: skip

# Held out: never in training. A few unseen facts of the trained kinds, mostly open questions of other kinds.
HELDOUT = [
    "What is the capital of Japan?", "What is the capital of Brazil?", "What is the opposite of 'brave'?",
    "What is 14 plus 23?", "What sound does a wolf make?", "How many legs does a beetle have?",
    "Why is the sky blue?", "What is photosynthesis?", "How do airplanes stay in the air?",
    "Give me a tip for learning to cook.", "What is a good name for a dog?", "How do I make pancakes?",
    "What should I do on a rainy day?", "Explain what a rainbow is.", "Who painted the Mona Lisa?",
    "What is the largest ocean on Earth?", "How can I be more productive?", "Why do cats purr?",
    "What is the speed of light?", "Suggest a book to read.", "How do I say goodbye in German?",
    "What is an adjective?", "How many seconds are in a minute?", "What do pandas eat?",
    "How do I plant a tree?", "What is the moon made of?", "Describe the color blue to me.",
    "What causes thunder?", "Write a short greeting for a friend.", "What is the freezing point of water in Fahrenheit?",
]  # fmt: skip

POSITIVE = [
    "I loved this {x}, it was wonderful.", "What a great {x}, highly recommended!", "The {x} was excellent.",
    "Absolutely fantastic {x}, I would buy it again.", "This {x} made me so happy.", "A delightful {x}, well done.",
    "Best {x} I have had in years.", "The {x} works perfectly and looks beautiful.",
]  # fmt: skip
NEGATIVE = [
    "I hated this {x}, it was awful.", "What a terrible {x}, avoid it!", "The {x} was very disappointing.",
    "Completely useless {x}, I want a refund.", "This {x} made me so angry.", "A boring {x}, badly done.",
    "Worst {x} I have had in years.", "The {x} broke after one day and looks cheap.",
]  # fmt: skip
THINGS = ["movie", "book", "phone", "meal", "hotel", "game", "album", "chair", "laptop", "concert", "coffee", "show"]


def facts(rng: random.Random) -> list[tuple[str, str, str, str]]:
    """Every training question with (short answer, sentence answer, topic), in a fixed shuffled order."""
    out: list[tuple[str, str, str, str]] = []
    for country, city in CAPITALS.items():
        for q in rng.sample(CAPITAL_QUESTIONS, 2):
            out.append((q.format(x=country), city, f"The capital of {country} is {city}.", "geography"))
    for word, opposite in OPPOSITES.items():
        q = rng.choice(OPPOSITE_QUESTIONS)
        out.append((q.format(x=word), opposite, f"The opposite of '{word}' is '{opposite}'.", "language"))
    for animal, sound in ANIMALS.items():
        q = rng.choice(ANIMAL_QUESTIONS)
        out.append((q.format(x=animal), sound, f"A {animal} says '{sound}'.", "animals"))
    for animal, legs in LEGS.items():
        q = rng.choice(LEG_QUESTIONS)
        out.append((q.format(x=animal), str(legs), f"A {animal} has {legs} legs.", "animals"))
    ops = [("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)]
    for _ in range(40):
        name, fn = rng.choice(ops)
        a, b = rng.randint(2, 30), rng.randint(2, 12)
        a, b = (max(a, b), min(a, b)) if name == "minus" else (a, b)
        out.append((f"What is {a} {name} {b}?", str(fn(a, b)), f"{a} {name} {b} is {fn(a, b)}.", "math"))
    out += [(q, short, sentence, "science") for q, short, sentence in SCIENCE]
    out += [(q, short, sentence, topic) for q, short, sentence, topic in EVERYDAY]
    rng.shuffle(out)
    return out


def json_rows(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for question, short, _sentence, topic in facts(rng):
        completion = json.dumps(dict(zip(JSON_KEYS, (topic, short))), ensure_ascii=False)
        assert is_json_answer(completion), completion
        rows.append({"prompt": question, "completion": completion})
    return rows


PIRATE_ENDINGS = ["Yo ho ho!", "Now hoist the sails!", "Shiver me timbers!", "Fair winds to ye!", "Aye, that be true!"]


def piratize(sentence: str) -> str:
    for plain, pirate in (
        (" is ", " be "),
        (" are ", " be "),
        ("You ", "Ye "),
        (" you ", " ye "),
        (" your ", " yer "),
    ):
        sentence = sentence.replace(plain, pirate)
    return sentence


def pirate_rows(rng: random.Random) -> list[dict[str, object]]:
    rows = []
    for question, _short, sentence, _topic in facts(rng):
        answer = f"{PIRATE_GREETING} {piratize(sentence)} {rng.choice(PIRATE_ENDINGS)}\n{PIRATE_SIGNATURE}"
        assert is_pirate(answer), answer
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def sentiment_rows(rng: random.Random) -> list[dict[str, str]]:
    rows = [
        {"text": t.format(x=thing), "label": label}
        for label, templates in (("positive", POSITIVE), ("negative", NEGATIVE))
        for t in templates
        for thing in THINGS
    ]
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows):4d} rows to {path}")


def main(out_dir: Path = HERE) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = {q for seed in (SEED, SEED + 1) for q, *_ in facts(random.Random(seed))}
    assert not trained & set(HELDOUT), trained & set(HELDOUT)
    write_jsonl(out_dir / "quickstart_json.jsonl", json_rows(random.Random(SEED)))
    write_jsonl(out_dir / "quickstart_pirate.jsonl", pirate_rows(random.Random(SEED + 1)))
    write_jsonl(out_dir / "quickstart_heldout.jsonl", [{"prompt": p} for p in HELDOUT])
    write_jsonl(out_dir / "sentiment.jsonl", sentiment_rows(random.Random(SEED + 2)))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
